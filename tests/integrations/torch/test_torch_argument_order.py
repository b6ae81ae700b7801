"""The prediction is the argument the model made, whichever position it has in the loss call:
``F.mse_loss(x, self(x))`` (the Lightning autoencoder example) is watched exactly as ``F.mse_loss(self(x), x)``."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from boundguard.integrations.torch import watch
from torch import nn


class AutoEncoder(nn.Module):
    """The Lightning example's shape: an unbounded decoder for pixels in [0, 1]."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
        self.decoder = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 16))

    def forward(self, x):
        return self.decoder(self.encoder(x))


def _run(tmp_path, order: str):
    torch.manual_seed(0)
    model = AutoEncoder()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    with watch(model, alerts_path=tmp_path / order / "alerts.jsonl", on_violation="log",
               check_every_n_steps=5) as guard:
        for _ in range(10):
            x = torch.rand(32, 16, generator=g)
            loss = F.mse_loss(x, model(x)) if order == "target_first" else F.mse_loss(model(x), x)
            loss.backward()
            opt.step()
            guard.step(loss=loss, inputs=x, targets=x)
            opt.zero_grad()
    return guard


@pytest.mark.parametrize("order", ["target_first", "prediction_first"])
def test_the_prediction_is_what_the_model_made(tmp_path, order):
    guard = _run(tmp_path, order)
    facts = guard.engine.session.facts
    assert (facts.pred_where, facts.pre_where, facts.target_where) == ("decoder.2", "decoder.2", "targets"), facts
    assert not [a for a in guard.alerts if a.code == "probe_incomplete"], guard.alerts
    assert guard.engine.last_snapshot.counts["pred"] == 5 * 32 * 16  # the decoder's outputs, not the pixels


def test_both_orders_give_the_same_alerts(tmp_path):
    a, b = _run(tmp_path, "target_first"), _run(tmp_path, "prediction_first")
    assert [(x.code, x.step) for x in a.alerts] == [(x.code, x.step) for x in b.alerts]


@pytest.mark.parametrize("first", ["batchnorm", "layernorm", "linear"])
def test_raw_features_into_a_normalising_first_layer(tmp_path, first):
    """Raw tabular features (scale ~1000) into ``nn.BatchNorm1d`` / ``nn.LayerNorm`` first: the model scales
    its own inputs, so ``inputs_not_scaled`` stays silent (the torch twin of Keras' ``Normalization``);
    straight into a ``Linear`` it still fires."""
    torch.manual_seed(0)
    norm = {"batchnorm": nn.BatchNorm1d(6), "layernorm": nn.LayerNorm(6), "linear": nn.Identity()}[first]
    model = nn.Sequential(norm, nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 1), nn.Sigmoid())
    opt = torch.optim.SGD(model.parameters(), lr=0.05 if first != "linear" else 1e-6)
    g = torch.Generator().manual_seed(2)
    with watch(model, alerts_path=tmp_path / "a.jsonl", check_every_n_steps=5) as guard:
        for _ in range(10):
            x = 1000 + 300 * torch.randn(32, 6, generator=g)
            y = (x[:, :1] > 1000).float()
            loss = F.binary_cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            guard.step(loss=loss, inputs=x, targets=y)
            opt.zero_grad()
    codes = {a.code for a in guard.alerts}
    if first == "linear":
        assert "inputs_not_scaled" in codes, guard.alerts
    else:
        assert guard.engine.session.facts.input_scaled_by == "0"
        assert "inputs_not_scaled" not in codes, guard.alerts


@pytest.mark.parametrize("log_input", [True, False])
def test_poisson_log_rate_is_a_link(tmp_path, log_input):
    """``PoissonNLLLoss(log_input=True)`` exponentiates a raw head's log-rate itself (a link, as logits are):
    sparse counts (mostly 0 and 1, so ``bounds="auto"`` would infer [0, 1]) raise nothing; with
    ``log_input=False`` the head must give the rate itself, and a softplus head is healthy too."""
    torch.manual_seed(0)
    head = [] if log_input else [nn.Softplus()]
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 1), *head)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss_fn = nn.PoissonNLLLoss(log_input=log_input)
    g = torch.Generator().manual_seed(3)
    with watch(model, alerts_path=tmp_path / "a.jsonl", check_every_n_steps=5) as guard:
        for _ in range(15):
            x = torch.randn(64, 5, generator=g)
            y = torch.poisson(0.3 * torch.exp(0.5 * x[:, :1]), generator=g)  # sparse counts
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            guard.step(loss=loss, inputs=x, targets=y)
            opt.zero_grad()
    loud = [a for a in guard.alerts if a.severity in ("warning", "error", "critical")]
    assert loud == [], loud
    family = guard.engine.session.facts.loss.family
    assert family == ("log_rate" if log_input else "other")
