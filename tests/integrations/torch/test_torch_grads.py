"""Gradient health on real training loops: each gradient code fires on its scenario and stays silent on
its healthy twin; the head's gradients are reduced on the device (no host read between checks)."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from boundguard.integrations.torch import watch
from torch import nn

GRAD_CODES = {"nonfinite_gradient", "gradient_exploding", "gradient_vanishing"}


class Net(nn.Module):
    def __init__(self, out: str = "identity", bias: float | None = None):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 16), nn.Tanh())
        self.fc = nn.Linear(16, 1)
        if bias is not None:
            nn.init.constant_(self.fc.bias, bias)
        self.out = out

    def forward(self, x):
        z = self.fc(self.body(x))
        if self.out == "sigmoid":
            return torch.sigmoid(z)
        if self.out == "relu":
            return F.relu(z)
        return z


class RootHead(nn.Module):
    """|Wx|^0.5: the derivative of a fractional power is infinite at 0, so a batch row of zeros gives
    NaN gradients (0 * inf) while the prediction and the loss stay finite."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 1, bias=False)

    def forward(self, x):
        return self.fc(x).abs().pow(0.5)


def train(tmp_path, model, steps=60, lr=0.01, x_scale=1.0, every=5, target="unit", zero_row=False, **opts):
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        guard = watch(model, check_every_n_steps=every, on_violation="log", alerts_path=tmp_path / "a.jsonl", **opts)
        losses = []
        for _ in range(steps):
            x = torch.randn(32, 4, generator=g)
            if zero_row:
                x[0] = 0.0
            y = torch.sigmoid(x[:, :1] + x[:, 1:2]) if target == "unit" else x[:, :1] * 3 + 1
            opt.zero_grad()
            loss = F.mse_loss(model(x * x_scale), y)
            loss.backward()
            opt.step()
            guard.step(loss=loss, inputs=x * x_scale, targets=y)
            losses.append(float(loss))
        guard.close()
    return guard, losses


def grad_codes(guard):
    return {a.code: a for a in guard.alerts if a.code in GRAD_CODES}


def test_nonfinite_gradients_with_a_finite_loss_fire(tmp_path):
    guard, losses = train(tmp_path, RootHead(), steps=3, zero_row=True)
    assert math.isfinite(losses[0])
    a = grad_codes(guard)["nonfinite_gradient"]
    assert a.step == 1 and a.severity == "critical" and a.where == "fc"
    assert "nonfinite_output" not in {x.code for x in guard.alerts if x.step == 1}


def test_exploding_head_gradients_fire(tmp_path):
    guard, losses = train(tmp_path, Net(), steps=60, lr=0.6, target="linear")
    assert losses[-1] > 10 * losses[0] or not math.isfinite(losses[-1])  # the run really blew up
    assert "gradient_exploding" in grad_codes(guard)


def test_vanishing_head_gradients_of_a_dead_relu_head_fire(tmp_path):
    """A ReLU output whose pre-activations are all negative (a dead head): no gradient at all reaches it
    and the loss stays where it started."""
    guard, losses = train(tmp_path, Net("relu", bias=-10.0), steps=40)
    assert losses[-1] > 0.5 * losses[0]  # it really does not learn
    a = grad_codes(guard)["gradient_vanishing"]
    assert a.where == "fc" and "initial level" in a.message


@pytest.mark.parametrize("out,target,lr", [("sigmoid", "unit", 0.5), ("identity", "linear", 0.05)])
def test_healthy_twins_are_silent(tmp_path, out, target, lr):
    guard, losses = train(tmp_path, Net(out), steps=120, lr=lr, target=target)
    assert losses[-1] < losses[0]  # it learns
    assert not grad_codes(guard), guard.alerts
    snap = guard.engine.session.last_snapshot
    assert snap.counts["grad"] > 0 and math.isfinite(snap.values["grad.normsq_max"])


def test_a_model_whose_loss_converges_to_zero_is_not_vanishing(tmp_path):
    """Gradients shrink by orders of magnitude as an MSE converges to ~0: not a vanishing head."""
    model = nn.Sequential(nn.Linear(4, 1))
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 1, generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        guard = watch(model, check_every_n_steps=10, on_violation="log", alerts_path=tmp_path / "a.jsonl")
        for _ in range(300):
            x = torch.randn(32, 4, generator=g)
            loss = F.mse_loss(model(x), x @ w)
            opt.zero_grad()
            loss.backward()
            opt.step()
            guard.step(loss=loss, inputs=x, targets=x @ w)
        guard.close()
    assert float(loss) < 1e-6
    assert not grad_codes(guard), guard.alerts


@pytest.mark.parametrize("order", ["step_then_zero_grad", "zero_grad_then_step"])
def test_gradients_never_there_are_said_once(tmp_path, order):
    """``guard.step()`` after ``optimizer.zero_grad()`` (or DeepSpeed ZeRO, which leaves ``param.grad``
    empty) sees no gradient: one info note says gradient checks are off; the right order says nothing."""
    torch.manual_seed(0)
    model = Net("sigmoid")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with watch(model, alerts_path=tmp_path / "a.jsonl", check_every_n_steps=2) as guard:
        for _ in range(5):
            x, y = torch.randn(8, 4), torch.rand(8, 1)
            loss = F.binary_cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            if order == "zero_grad_then_step":
                opt.zero_grad()
            guard.step(loss=loss, inputs=x, targets=y)
            opt.zero_grad()
    notes = [a for a in guard.alerts if a.code == "probe_incomplete" and "gradient" in a.message]
    if order == "step_then_zero_grad":
        assert notes == [] and guard.engine.last_snapshot.counts["grad"] == 1
    else:
        assert len(notes) == 1 and "fc" in notes[0].message and "zero_grad" in notes[0].fix, guard.alerts
