"""Every alert code that applies to PyTorch: a real Lightning run that fires it, and a healthy twin."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from boundguard import BoundGuardError
from boundguard.catalogue import CATALOGUE
from boundguard.integrations.lightning import BoundGuard

from conftest import Tiny, data, fit
from helpers import severe


def guard(tmp_path, **kw):
    kw.setdefault("check_every_n_steps", 10)
    kw.setdefault("on_violation", "log")
    return BoundGuard(alerts_path=tmp_path / "alerts.jsonl", strict=True, **kw)


class NaNInputs(torch.utils.data.Dataset):
    def __init__(self, x, y, bad):
        self.x, self.y, self.bad = torch.from_numpy(x), torch.from_numpy(y), bad

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        x = self.x[i].clone()
        if i in self.bad:
            x[0] = float("nan")
        return x, self.y[i]


def _spike(step, loss):
    return loss + (50.0 if step == 25 else 0.0)


def _diverge(step, loss):
    return loss + (0.0 if step < 15 else 2.0 * (step - 14))


def _nan_loss(step, loss):
    return loss * (float("nan") if step == 12 else 1.0)


class WhereSqrt(nn.Module):
    """``torch.where(z > 100, sqrt(z - 1000), z)``: the forward pass takes z (finite), but the branch not
    taken is NaN and its gradient is 0 * NaN: the classic NaN gradient through ``torch.where``."""

    def forward(self, z):
        return torch.where(z > 100, torch.sqrt(z - 1000), z)


def _dead_relu_head():
    m = Tiny(head=nn.ReLU())
    nn.init.constant_(m.fc.bias, -20.0)  # every pre-activation negative: no gradient reaches the head
    return m


# code → (model factory, data kind, guard options, extra)
FIRING = {
    "output_out_of_range": (lambda: Tiny(), "binary", dict(bounds=(0, 1))),
    "missing_output_activation": (lambda: Tiny(), "binary", dict(bounds=(0, 1))),
    "activation_loss_mismatch": (lambda: Tiny(head=nn.Softmax(dim=1), loss_fn=nn.CrossEntropyLoss(), out=4), "classes", {}),
    "target_out_of_range": (lambda: Tiny(head=nn.Sigmoid()), "wide", {}),
    "output_saturated": (lambda: Tiny(head=nn.Hardtanh(-1, 1), lr=0.05), "sym3", dict(bounds="symmetric")),
    "preactivation_exploding": (lambda: Tiny(head=nn.Sigmoid(), loss_fn=nn.BCELoss(), scale=1e4), "binary", {}),
    "regression_loss_on_probabilities": (lambda: Tiny(head=nn.Sigmoid()), "binary", {}),
    "inputs_not_scaled": (lambda: Tiny(head=nn.Sigmoid(), loss_fn=nn.BCELoss()), "binary", dict(x_scale=500.0)),
    "nonfinite_output": (lambda: Tiny(scale=1e39), "regression", {}),
    "nonfinite_loss": (lambda: Tiny(head=nn.Sigmoid(), script=_nan_loss), "unit", {}),
    "loss_diverging": (lambda: Tiny(head=nn.Sigmoid(), loss_fn=nn.BCELoss(), script=_diverge), "binary", {}),
    "loss_spike": (lambda: Tiny(head=nn.Sigmoid(), loss_fn=nn.BCELoss(), script=_spike), "binary", {}),
    "loss_plateau": (lambda: Tiny(head=nn.Sigmoid(), loss_fn=nn.BCELoss(), lr=0.0), "binary",
                     dict(thresholds={"loss_plateau": {"patience": 30}})),
    "nonfinite_gradient": (lambda: Tiny(head=WhereSqrt()), "regression", {}),
    "gradient_exploding": (lambda: Tiny(lr=0.6), "regression", {}),
    # SGD at lr 20 on separable classes: the logits run away within a few checks
    "logits_growing": (lambda: Tiny(loss_fn=nn.CrossEntropyLoss(), out=4, lr=20.0), "classes",
                       dict(check_every_n_steps=5)),
    "gradient_vanishing": (_dead_relu_head, "unit", {}),
    # (B, 1) predictions against (B,) targets: MSE broadcasts to every pair, only the mean can be learnt (a
    # loss that starts at the baseline is judged after start_steps: 30 here, for a 60-step test)
    "loss_at_baseline": (lambda: Tiny(loss_fn=lambda p, y: F.mse_loss(p, y.squeeze(-1)), lr=0.05), "regression",
                         dict(thresholds={"loss_at_baseline": {"warmup_steps": 30, "start_steps": 30}})),
}


@pytest.mark.parametrize("code", sorted(FIRING) + ["nonfinite_input"])
def test_code_fires(tmp_path, code):
    torch.manual_seed(0)
    if code == "nonfinite_input":
        x, y = data(kind="binary")
        ds = NaNInputs(x, y, bad={100})
        g = guard(tmp_path)
        from conftest import trainer
        t = trainer([g], max_steps=40)
        t.fit(Tiny(head=nn.Sigmoid()), torch.utils.data.DataLoader(ds, batch_size=32))
        fired = {a.code for a in g.alerts}
        assert code in fired, fired
        a = next(a for a in g.alerts if a.code == code)
        assert a.severity == "critical" and a.step == 4  # batch 4 holds row 100: the NaN tripwire checks there
        return
    factory, kind, opts = FIRING[code]
    opts = dict(opts)
    x_scale = opts.pop("x_scale", 1.0)
    x, y = data(kind=kind, x_scale=x_scale)
    g = guard(tmp_path, **opts)
    fit(factory(), x, y, g, max_steps=60)
    fired = {a.code for a in g.alerts}
    assert code in fired, [(a.code, a.message) for a in g.alerts]
    a = next(a for a in g.alerts if a.code == code)
    assert a.severity in (CATALOGUE[code].severity, "warning")  # inferred bounds downgrade range errors
    assert a.message and a.fix and a.where
    assert a.step >= 1


HEALTHY = {
    "sigmoid + BCELoss": (lambda: Tiny(head=nn.Sigmoid(), loss_fn=nn.BCELoss()), "binary", {}),
    "sigmoid + BCELoss, declared (0, 1)": (lambda: Tiny(head=nn.Sigmoid(), loss_fn=nn.BCELoss()), "binary", dict(bounds=(0, 1))),
    "raw logits + BCEWithLogitsLoss, (0, 1)": (lambda: Tiny(loss_fn=nn.BCEWithLogitsLoss()), "binary", dict(bounds=(0, 1))),
    "raw logits + CrossEntropyLoss": (lambda: Tiny(loss_fn=nn.CrossEntropyLoss(), out=4), "classes", {}),
    "raw logits + F.cross_entropy, (0, 1)": (lambda: Tiny(loss_fn=F.cross_entropy, out=4), "classes", dict(bounds=(0, 1))),
    "log_softmax + NLLLoss": (lambda: Tiny(head=nn.LogSoftmax(dim=1), loss_fn=nn.NLLLoss(), out=4), "classes", {}),
    "sigmoid + MSE on unit targets": (lambda: Tiny(head=nn.Sigmoid()), "unit", {}),
    "tanh + MSE, symmetric": (lambda: Tiny(head=nn.Tanh()), "sym", dict(bounds="symmetric")),
    "linear regression, unbounded targets": (lambda: Tiny(lr=1e-3), "regression", {}),
    "softmax + MSE on soft targets": (lambda: Tiny(head=nn.Softmax(dim=1), out=4), "onehot", dict(bounds="distribution")),
}


@pytest.mark.parametrize("name", sorted(HEALTHY))
def test_healthy_twin_is_quiet(tmp_path, name):
    torch.manual_seed(0)
    factory, kind, opts = HEALTHY[name]
    x, y = data(kind=kind)
    g = guard(tmp_path, **opts)
    fit(factory(), x, y, g, max_steps=60)
    assert not severe(g.alerts), [(a.code, a.severity, a.message) for a in g.alerts]


def test_every_torch_code_has_a_firing_scenario():
    covered = set(FIRING) | {"nonfinite_input"}
    assert covered == set(CATALOGUE) - {"probe_incomplete"}


def test_inferred_bounds_say_so(tmp_path):
    torch.manual_seed(0)
    x, y = data(kind="binary")
    g = guard(tmp_path)  # bounds="auto": binary targets → (0, 1), inferred
    fit(Tiny(), x, y, g, max_steps=30)
    a = next(a for a in g.alerts if a.code == "missing_output_activation")
    assert a.bounds_inferred and "inferred" in a.message
    oor = [a for a in g.alerts if a.code == "output_out_of_range"]
    assert oor and all(a.severity == "warning" and a.bounds_inferred for a in oor)


def test_auto_bounds_distribution_for_class_targets(tmp_path):
    torch.manual_seed(0)
    x, y = data(kind="classes")
    g = guard(tmp_path)
    fit(Tiny(head=nn.Softmax(dim=1), loss_fn=nn.CrossEntropyLoss(), out=4), x, y, g, max_steps=10)
    assert g._engine.monitor.bounds.kind == "distribution"


def test_functional_activation_and_loss_are_found(tmp_path):
    class Functional(Tiny):
        def forward(self, x):
            return torch.sigmoid(self.fc(self.body(x)))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.binary_cross_entropy_with_logits(self(x), y)

    torch.manual_seed(0)
    x, y = data(kind="binary")
    g = guard(tmp_path)
    fit(Functional(), x, y, g, max_steps=10)
    facts = g._engine.monitor.facts
    assert facts.activation == "sigmoid" and facts.pre_where == "fc"
    assert "activation_loss_mismatch" in severe(g.alerts)


def test_nan_loss_between_checks_trips_at_its_step(tmp_path):
    """A NaN loss in one batch between checks (step 5 of a 20-step interval): the NaN tripwire judges it at
    step 5, not at the next check."""
    torch.manual_seed(0)
    x, y = data(kind="binary")
    g = guard(tmp_path, check_every_n_steps=20)
    fit(Tiny(head=nn.Sigmoid(), script=lambda s, l: l * (math.nan if s == 4 else 1.0)),
        x, y, g, max_steps=20)
    a = next(a for a in g.alerts if a.code == "nonfinite_loss")
    assert a.step == 5 and a.details["first_step"] == 5


@pytest.mark.parametrize("action", ["halt", "raise"])
def test_nan_tripwire_acts_within_one_step(tmp_path, action):
    """A NaN loss from step 8 on with checks every 50 steps: reported and acted on at step 8."""
    torch.manual_seed(0)
    x, y = data(kind="binary")
    g = guard(tmp_path, check_every_n_steps=50, on_violation=action)
    model = Tiny(head=nn.Sigmoid(), script=lambda s, l: l * (math.nan if s >= 7 else 1.0))
    if action == "raise":
        with pytest.raises(BoundGuardError):
            fit(model, x, y, g, max_steps=40)
    else:
        assert fit(model, x, y, g, max_steps=40).global_step == 8
    a = next(a for a in g.alerts if a.code == "nonfinite_loss")
    assert a.step == 8


def test_crash_mid_step_is_explained(tmp_path):
    """BCELoss raises on a NaN prediction; the alert from the unfinished step says why."""
    torch.manual_seed(0)
    x, y = data(kind="binary")
    ds = NaNInputs(x, y, bad={100})
    g = guard(tmp_path)
    from conftest import trainer
    t = trainer([g], max_steps=40)
    with pytest.raises(RuntimeError, match="between 0 and 1"):
        t.fit(Tiny(head=nn.Sigmoid(), loss_fn=nn.BCELoss()), torch.utils.data.DataLoader(ds, batch_size=32))
    a = next(a for a in g.alerts if a.code == "nonfinite_input")
    assert a.step == 4 and a.details.get("during_exception")
    assert "nonfinite_input" in (tmp_path / "alerts.jsonl").read_text()
