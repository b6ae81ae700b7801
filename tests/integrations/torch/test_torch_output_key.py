"""``output_key=``: the user names the head of a model with several outputs; a key that names nothing
is a note, and the heaviest loss is watched instead."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from boundguard.integrations.torch import watch
from torch import nn


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 16), nn.Tanh())
        self.reg = nn.Linear(16, 1)
        self.cls = nn.Linear(16, 1)

    def forward(self, x):
        h = self.body(x)
        return {"reg": self.reg(h), "cls": self.cls(h)}


def run(tmp_path, **opts):
    model = TwoHeads()
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        guard = watch(model, check_every_n_steps=5, on_violation="log", alerts_path=tmp_path / "a.jsonl", **opts)
        for _ in range(10):
            x = torch.randn(32, 4, generator=g)
            y_reg, y_cls = 5 + 3 * x[:, :1], (x[:, 1:2] > 0).float()
            out = model(x)
            loss = F.mse_loss(out["reg"], y_reg) + 0.1 * F.binary_cross_entropy_with_logits(out["cls"], y_cls)
            opt.zero_grad()
            loss.backward()
            opt.step()
            guard.step(loss=loss, inputs=x)
        guard.close()
    return guard


def test_default_watches_the_heaviest_loss(tmp_path):
    facts = run(tmp_path).engine.session.facts
    assert facts.loss_where == "mse_loss" and facts.pred_where == "reg"


def test_output_key_names_the_head(tmp_path):
    guard = run(tmp_path, output_key="cls")
    facts = guard.engine.session.facts
    assert facts.loss_where == "binary_cross_entropy_with_logits" and facts.pred_where == "cls"
    assert facts.grad_where == "cls"
    assert not [a for a in guard.alerts if a.severity != "info"], guard.alerts  # its own targets: binary


def test_an_output_key_that_names_nothing_is_a_note(tmp_path):
    guard = run(tmp_path, output_key="nope")
    assert guard.engine.session.facts.loss_where == "mse_loss"
    (note,) = [a for a in guard.alerts if a.code == "probe_incomplete" and "output_key" in a.message]
    assert "'nope'" in note.message and note.severity == "info"


@pytest.mark.parametrize("bad", [1.5, True, b"cls"])
def test_output_key_is_validated_at_construction(bad):
    with pytest.raises(TypeError, match="output_key"):
        watch(TwoHeads(), output_key=bad)


class Quantiles(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 16), nn.Tanh())
        self.q50 = nn.Linear(16, 1)
        self.q90 = nn.Linear(16, 1)

    def forward(self, x):
        h = self.body(x)
        return {"q50": self.q50(h), "q90": self.q90(h)}


def _pinball(pred, y, q):  # a loss written by hand from tensor ops: no torch loss function to find
    e = y - pred
    return torch.maximum(q * e, (q - 1) * e).mean()


@pytest.mark.parametrize("key", [None, "q90"])
def test_output_key_names_the_prediction_of_a_hand_written_loss(tmp_path, key):
    model = Quantiles()
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        guard = watch(model, check_every_n_steps=5, on_violation="log", alerts_path=tmp_path / "a.jsonl",
                      output_key=key)
        for _ in range(6):
            x = torch.randn(32, 4, generator=g)
            y = x[:, :1] + 0.3 * torch.randn(32, 1, generator=g)
            out = model(x)
            loss = _pinball(out["q50"], y, 0.5) + _pinball(out["q90"], y, 0.9)
            opt.zero_grad()
            loss.backward()
            opt.step()
            guard.step(loss=loss, inputs=x, targets=y)
        guard.close()
    facts = guard.engine.session.facts
    assert facts.pred_where == ("q90" if key else "q50")
    (note,) = [a for a in guard.alerts if a.code == "probe_incomplete" and a.where == "loss"]
    assert "output_key=" in note.fix
