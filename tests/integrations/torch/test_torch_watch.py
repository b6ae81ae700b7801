"""``watch()`` in a plain PyTorch loop: the contract's example, actions (halt / raise / bound),
what the probe infers (activation, loss), the logits trap, incomplete probes, and that monitoring
changes nothing about training."""
from __future__ import annotations

import json
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from boundguard.integrations.torch import Guard, apply_bounds, watch
from torch import nn

from boundguard import Alert, BoundGuardError, BoundGuardWarning
from boundguard.alerts import SCHEMA_VERSION
from helpers import loud

pytestmark = pytest.mark.filterwarnings("ignore::boundguard.alerts.BoundGuardWarning")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ----------------------------------------------------------------------------------------- helpers
class Head(nn.Module):
    """``Linear(4, out)`` followed by ``act`` inside forward (a module, a torch function or a lambda)."""

    def __init__(self, act=None, out: int = 1, hidden: int = 0):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, hidden), nn.ReLU()) if hidden else nn.Identity()
        self.fc = nn.Linear(hidden or 4, out)
        self.act = act if isinstance(act, nn.Module) else None
        self._fn = None if isinstance(act, nn.Module) else act

    def forward(self, x):
        z = self.fc(self.body(x))
        if self.act is not None:
            return self.act(z)
        return self._fn(z) if self._fn is not None else z


def unit_data(n=32, out=1, binary=False):
    x = torch.randn(n, 4)
    y = torch.rand(n, out)
    return x, (y > 0.5).float() if binary else y


def class_data(n=32, classes=3):
    return torch.randn(n, 4), torch.randint(0, classes, (n,))


def train(model, loss_fn, data, steps=4, guard=None, lr=0.05, seed=0):
    """A plain loop; returns the per-step losses. Data come from a generator seeded separately from the model."""
    torch.manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        x, y = data()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        if guard is not None:
            guard.step(loss=loss, inputs=x, targets=y)  # (before zero_grad: it reads the head's gradients)
        opt.zero_grad()
        if guard is not None and guard.should_stop:
            break
        losses.append(float(loss.detach()))
    return losses


def opts(tmp_path, **kw):
    kw.setdefault("on_violation", "log")
    kw.setdefault("check_every_n_steps", 2)
    kw.setdefault("alerts_path", tmp_path / "alerts.jsonl")
    return kw


# ----------------------------------------------------------------------------------------- the contract's loop
def test_contract_example(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(4, 1)  # raw head, probability targets: the classic bug
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    loss_fn = nn.MSELoss()
    loader = [unit_data() for _ in range(6)]
    guard = watch(model, bounds=(0, 1), on_violation="log", check_every_n_steps=2,
                  alerts_path=tmp_path / "alerts.jsonl")
    for x, y in loader:
        loss = loss_fn(model(x), y)
        loss.backward(); optimizer.step(); optimizer.zero_grad()
        guard.step(loss=loss, inputs=x, targets=y)
    guard.close()
    alerts = guard.alerts
    assert all(isinstance(a, Alert) for a in alerts)
    assert "missing_output_activation" in {a.code for a in alerts}
    assert [a.step for a in alerts] == sorted(a.step for a in alerts)  # oldest first
    for a in alerts:
        assert a.severity in ("info", "warning", "error", "critical")
        assert isinstance(a.where, str) and a.message and a.fix
        assert a.epoch is None  # a plain loop has no epochs: watch() is never told one
    lines = [json.loads(l) for l in (tmp_path / "alerts.jsonl").read_text().splitlines()]
    assert {r["code"] for r in lines} == {a.code for a in alerts}
    assert all(r["schema"] == SCHEMA_VERSION for r in lines)
    assert (tmp_path / "stats.jsonl").exists()
    assert guard.engine.step == 6


def test_context_manager_removes_every_hook(tmp_path):
    model = Head(nn.Sigmoid(), hidden=8)
    hooks_before = {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()}
    with watch(model, **opts(tmp_path)) as guard:
        train(model, F.mse_loss, unit_data, steps=3, guard=guard)
    assert guard._closed
    assert {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()} == hooks_before
    assert guard.step(loss=torch.tensor(1.0)) == []  # a closed guard ignores further steps


def test_step_arguments_are_optional(tmp_path):
    model = Head(nn.Sigmoid())
    with watch(model, **opts(tmp_path)) as guard:
        for _ in range(3):
            model(torch.randn(8, 4)).sum().backward()
            guard.step()
    assert guard.engine.step == 3
    assert not guard.engine.disabled


def test_watch_validates_its_arguments(tmp_path):
    with pytest.raises(TypeError, match="Module"):
        watch(lambda x: x)
    with pytest.raises(TypeError, match="bogus"):
        watch(nn.Linear(4, 1), bogus=1)
    with pytest.raises(ValueError, match="on_violation"):
        watch(nn.Linear(4, 1), on_violation="explode")


def test_statistics_accumulate_between_checks(tmp_path):
    """Targets outside the bounds at step 3 alone are reported at the next check (step 5), not lost; a NaN
    input at step 3 trips the NaN tripwire and is reported at step 3 itself."""
    for fault, code, at in (("target", "target_out_of_range", 5), ("nan", "nonfinite_input", 3)):
        model = Head(nn.Sigmoid())
        guard = watch(model, **opts(tmp_path / fault, check_every_n_steps=5))
        for step in range(1, 7):
            x, y = unit_data(8)
            if step == 3 and fault == "nan":
                x[0, 0] = math.nan
            if step == 3 and fault == "target":
                y[0, 0] = 2.0
            loss = F.mse_loss(model(x), y)  # (a training forward: gradients on)
            guard.step(loss=loss, inputs=x, targets=y)
        guard.close()
        by_code = {a.code: a for a in guard.alerts}
        assert by_code[code].step == at, (fault, guard.alerts)
        if fault == "nan":
            assert by_code["nonfinite_input"].value == 1 and by_code["nonfinite_loss"].details["first_step"] == 3


def test_a_long_interval_costs_a_fixed_buffer(tmp_path):
    """check_every_n_steps=200000: the rows stay one block of ROW_CAP (folded on the device), the only part
    that grows is one fp32 loss cell per step (0.8 MB), and the first steps cost what they cost at 50."""
    from boundguard.integrations.torch import Reducer

    model = Head(nn.Sigmoid())
    guard = watch(model, **opts(tmp_path, check_every_n_steps=200_000))
    for _ in range(3):
        x, y = unit_data(8)
        loss = F.mse_loss(model(x), y)  # (a training forward: gradients on)
        guard.step(loss=loss, inputs=x, targets=y)
    red = guard.engine.reducer
    assert red.n_rows == Reducer.ROW_CAP and len(red.cells) == Reducer.ROW_CAP
    assert red.raw.numel() < 1_000_000  # bytes, all of it
    guard.close()
    snap = guard.engine.session.last_snapshot
    assert snap.steps == 2 and len(snap.losses) == 2


def test_nan_tripwire_rearms_after_a_clean_check(tmp_path):
    """NaN inputs at steps 3 and 7 of a model that does not train (no NaN reaches the weights): each trips a
    check at its own step, because the clean check at step 5 re-armed the tripwire."""
    model = Head(nn.Sigmoid())
    guard = watch(model, **opts(tmp_path, check_every_n_steps=5))
    checks = []
    check = guard.engine.session.check
    guard.engine.session.check = lambda *a, **k: checks.append(guard.engine.session.step) or check(*a, **k)
    for step in range(1, 9):
        x, y = unit_data(8)
        if step in (3, 7):
            x[0, 0] = math.nan
        loss = F.mse_loss(model(x), y)  # (a training forward: gradients on)
        guard.step(loss=loss, inputs=x, targets=y)
    guard.close()
    assert checks == [1, 3, 5, 7, 8]
    assert [a.step for a in guard.alerts if a.code == "nonfinite_input"] == [3]  # one alert, seen again at 7
    assert next(a for a in guard.alerts if a.code == "nonfinite_input").last_step == 7


# ----------------------------------------------------------------------------------------- actions
def test_interval_statistics_match_the_tensors_the_model_produced(tmp_path):
    """Two forward passes per step (the head module runs twice: the merge path) over a 3-step interval:
    the snapshot's numbers are those of every prediction, pre-activation, target and input of the interval."""
    model = Head(nn.Sigmoid(), hidden=8)
    seen = {"pred": [], "pre": [], "target": [], "input": []}

    def record(module, args, out):
        seen["pre"].append(args[0].detach().reshape(-1))
        seen["pred"].append(out.detach().reshape(-1))

    model.act.register_forward_hook(record)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = watch(model, **opts(tmp_path, bounds=(0.2, 0.8), check_every_n_steps=4))
    for step in range(1, 5):
        if step == 2:
            for v in seen.values():
                v.clear()  # the interval of the check at step 4 is steps 2-4
        x1, y1 = unit_data(8)
        x2, y2 = unit_data(8)
        x2 = x2 * 3
        loss = F.mse_loss(model(x1), y1) + F.mse_loss(model(x2), y2)
        loss.backward(); opt.step(); opt.zero_grad()
        x, y = torch.cat([x1, x2]), torch.cat([y1, y2])
        seen["target"].append(y.reshape(-1)); seen["input"].append(x.reshape(-1))
        guard.step(loss=loss, inputs=x, targets=y)
    guard.close()
    snap = guard.engine.last_snapshot
    assert (snap.first_step, snap.step) == (2, 4)
    for kind, ts in seen.items():
        t = torch.cat(ts)
        assert snap.counts[kind] == t.numel(), kind
        assert snap.values[f"{kind}.min"] == pytest.approx(float(t.min()), rel=1e-6)
        assert snap.values[f"{kind}.max"] == pytest.approx(float(t.max()), rel=1e-6)
    pred, pre = torch.cat(seen["pred"]), torch.cat(seen["pre"])
    assert snap.values["pred.below"] == int((pred < 0.2).sum()) and snap.values["pred.above"] == int((pred > 0.8).sum())
    assert snap.values["pre.sumsq"] == pytest.approx(float((pre.double() ** 2).sum()), rel=1e-5)
    assert snap.values["pre.tail"] == int((pre.abs() > 6).sum())


def test_halt_sets_should_stop(tmp_path):
    model = nn.Linear(4, 1)
    guard = watch(model, **opts(tmp_path, bounds=(0, 1), on_violation="halt"))
    losses = train(model, F.mse_loss, unit_data, steps=10, guard=guard)
    assert guard.should_stop
    assert losses == []  # stopped at the first check, step 1
    assert {a.action for a in loud(guard.alerts)} == {"halt"}


def test_raise_raises_from_step_with_the_alert(tmp_path):
    model = nn.Linear(4, 1)
    guard = watch(model, **opts(tmp_path, bounds=(0, 1), on_violation="raise"))
    with pytest.raises(BoundGuardError) as info:
        train(model, F.mse_loss, unit_data, steps=3, guard=guard)
    alert = info.value.alert
    assert isinstance(alert, Alert) and alert.code in ("output_out_of_range", "missing_output_activation")
    assert alert.action == "raise" and alert.step == 1
    assert pickle.loads(pickle.dumps(info.value)).alert == alert


def test_actions_override_per_code(tmp_path):
    model = nn.Linear(4, 1)
    guard = watch(model, **opts(tmp_path, bounds=(0, 1), on_violation="raise",
                                actions={"output_out_of_range": "log", "missing_output_activation": "log"}))
    train(model, F.mse_loss, unit_data, steps=3, guard=guard)
    assert not guard.should_stop and {a.action for a in loud(guard.alerts)} == {"log"}


@pytest.mark.parametrize("bounds,kind", [((0, 1), "sigmoid"), ((-1, 1), "tanh"), ((2, 5), "scaled_sigmoid")])
def test_bound_inserts_a_bounding_activation(tmp_path, bounds, kind):
    torch.manual_seed(0)
    model = Head(hidden=8)
    keys = list(model.state_dict())
    lo, hi = bounds
    data = lambda: (torch.randn(32, 4), lo + (hi - lo) * torch.rand(32, 1))
    with pytest.warns(BoundGuardWarning, match="inserted"), \
            watch(model, **opts(tmp_path, bounds=bounds, on_violation="bound")) as guard:
        train(model, F.mse_loss, data, steps=4, guard=guard)
    (rec,) = guard.bounds_inserted
    assert rec["kind"] == kind
    assert list(model.state_dict()) == keys  # parameter names unchanged
    x = torch.randn(256, 4) * 100
    with torch.no_grad():
        out = model(x)
        raw = F.linear(model.body(x), model.fc.weight, model.fc.bias)  # the head without its hooks
    assert out.min() >= lo and out.max() <= hi
    assert raw.min() < lo and raw.max() > hi  # the raw head really leaves the bounds
    # the same bound replays on a fresh copy from the guard
    fresh = Head(hidden=8)
    fresh.load_state_dict(model.state_dict())
    assert apply_bounds(fresh, guard) == guard.bounds_inserted
    apply_bounds(fresh, guard)  # idempotent
    with torch.no_grad():
        assert torch.equal(fresh(x), out)


def test_bound_replays_from_state_on_resume(tmp_path):
    model = Head(hidden=8)
    with watch(model, **opts(tmp_path, bounds=(0, 1), on_violation="bound")) as guard:
        train(model, F.mse_loss, unit_data, steps=3, guard=guard)
    state = pickle.loads(pickle.dumps(guard.state_dict()))
    fresh = Head(hidden=8)
    fresh.load_state_dict(model.state_dict())
    resumed = watch(fresh, **opts(tmp_path, bounds=(0, 1), on_violation="bound", alerts_path=tmp_path / "r.jsonl"))
    resumed.load_state_dict(state)
    assert resumed.alerts == guard.alerts
    assert resumed.bounds_inserted == guard.bounds_inserted
    x = torch.randn(64, 4) * 50
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    resumed.close()


# ----------------------------------------------------------------------------------------- the probe
ACTIVATIONS = [
    ("nn.Sigmoid", lambda: Head(nn.Sigmoid()), "sigmoid", {}),
    ("torch.sigmoid", lambda: Head(torch.sigmoid), "sigmoid", {}),
    ("F.softmax", lambda: Head(lambda z: F.softmax(z, dim=-1), out=3), "softmax", None),
    ("torch.clamp", lambda: Head(lambda z: torch.clamp(z, 0, 1)), "clamp", {"lo": 0.0, "hi": 1.0}),
    ("F.hardtanh", lambda: Head(F.hardtanh), "clamp", {"lo": -1.0, "hi": 1.0}),
    ("nn.Tanh", lambda: Head(nn.Tanh()), "tanh", {}),
    ("scaled-sigmoid", lambda: Head(lambda z: 2 + (5 - 2) * torch.sigmoid(z)), "scaled_sigmoid", {"lo": 2.0, "hi": 5.0}),
    ("identity", lambda: Head(), "identity", {}),
    ("hidden+nn.Sigmoid", lambda: Head(nn.Sigmoid(), hidden=8), "sigmoid", {}),
]


@pytest.mark.parametrize("make,activation,params", [pytest.param(*a[1:], id=a[0]) for a in ACTIVATIONS])
def test_activation_is_inferred(tmp_path, make, activation, params):
    model = make()
    out = model.fc.out_features
    with watch(model, **opts(tmp_path, bounds=None)) as guard:
        train(model, F.mse_loss, lambda: unit_data(out=out), steps=2, guard=guard)
    facts = guard.engine.monitor.facts
    assert facts.activation == activation
    if params is None:  # softmax: over the class dimension, however it is spelled
        assert facts.activation_params["dim"] in (-1, 1)
    else:
        assert facts.activation_params == pytest.approx(params)
    assert facts.pre_where is not None
    assert not [a for a in guard.alerts if a.code == "probe_incomplete"]


class SeqLogits(nn.Module):
    """(batch, seq, classes) logits flattened with .view(-1, C) inside the loss call."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x).view(4, -1, 3)


LOSSES = [
    ("nn.MSELoss", lambda: Head(nn.Sigmoid()), nn.MSELoss(), unit_data, "mse_loss", "regression"),
    ("F.mse_loss", lambda: Head(nn.Sigmoid()), F.mse_loss, unit_data, "mse_loss", "regression"),
    ("nn.BCELoss", lambda: Head(nn.Sigmoid()), nn.BCELoss(), lambda: unit_data(binary=True),
     "binary_cross_entropy", "probability"),
    ("nn.BCEWithLogitsLoss", lambda: Head(), nn.BCEWithLogitsLoss(), lambda: unit_data(binary=True),
     "binary_cross_entropy_with_logits", "logits"),
    ("F.cross_entropy-view", SeqLogits, lambda o, y: F.cross_entropy(o.view(-1, 3), y), class_data,
     "cross_entropy", "logits"),
]


@pytest.mark.parametrize("make,loss_fn,data,name,family", [pytest.param(*c[1:], id=c[0]) for c in LOSSES])
def test_loss_is_detected(tmp_path, make, loss_fn, data, name, family):
    model = make()
    with watch(model, **opts(tmp_path)) as guard:
        train(model, loss_fn, data, steps=3, guard=guard)
    loss = guard.engine.monitor.facts.loss
    assert (loss.name, loss.family) == (name, family)
    assert guard.engine.last_snapshot.losses.size > 0


def _big_logits_head(out):
    torch.manual_seed(0)
    m = Head(out=out)
    with torch.no_grad():
        m.fc.weight.mul_(8.0)
    return m


@pytest.mark.parametrize("bounds", [(0, 1), "auto"])
@pytest.mark.parametrize("case", ["bce-with-logits", "cross-entropy", "F.cross_entropy-view"])
def test_logits_trap_raw_logits_are_not_violations(tmp_path, case, bounds):
    """Logits losses make the predictions link(raw): raw logits far outside (0, 1) are fine."""
    if case == "bce-with-logits":
        model, loss_fn, data = _big_logits_head(1), nn.BCEWithLogitsLoss(), lambda: unit_data(binary=True)
    elif case == "cross-entropy":
        model, loss_fn, data = _big_logits_head(3), nn.CrossEntropyLoss(), class_data
    else:
        torch.manual_seed(0)
        model, loss_fn, data = SeqLogits(), lambda o, y: F.cross_entropy(o.view(-1, 3), y), class_data
        with torch.no_grad():
            model.fc.weight.mul_(8.0)
    with torch.no_grad():
        raw = model(torch.randn(64, 4))
    assert raw.min() < -1 and raw.max() > 2  # the raw output really leaves (0, 1)
    with watch(model, **opts(tmp_path, bounds=bounds)) as guard:
        train(model, loss_fn, data, steps=6, guard=guard, lr=0.01)
    assert loud(guard.alerts) == []


def test_unlocatable_loss_gives_one_info_alert(tmp_path):
    model = Head(nn.Sigmoid())
    with watch(model, **opts(tmp_path)) as guard:
        train(model, lambda o, y: ((o - y) ** 2).mean(), unit_data, steps=5, guard=guard)
    incomplete = [a for a in guard.alerts if a.code == "probe_incomplete"]
    assert len(incomplete) == 1
    assert incomplete[0].severity == "info" and incomplete[0].fix
    assert loud(guard.alerts) == []
    assert not guard.engine.disabled
    assert guard.engine.monitor.facts.loss is None
    # the loss value itself is still watched: the last snapshot is the final check at close (step 5)
    assert list(guard.engine.last_snapshot.loss_steps) == [5]


# ----------------------------------------------------------------------------------------- no side effects
def _dropout_model():
    torch.manual_seed(123)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 1))


def test_monitoring_does_not_change_training(tmp_path):
    """Same seed with and without watch (alerts fire, no action): bit-identical weights and RNG state."""
    data = [unit_data() for _ in range(7)]

    def run(use_guard):
        model = _dropout_model()
        it = iter(data)
        guard = watch(model, **opts(tmp_path, bounds=(0, 1), alerts_path=tmp_path / f"{use_guard}.jsonl")) \
            if use_guard else None
        losses = train(model, F.mse_loss, lambda: next(it), steps=7, guard=guard, seed=7)
        if guard is not None:
            guard.close()
            assert loud(guard.alerts)  # the guard did find something, and only recorded it
        return model.state_dict(), losses, torch.get_rng_state()

    (w1, l1, rng1), (w2, l2, rng2) = run(False), run(True)
    assert l1 == l2
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
    assert torch.equal(rng1, rng2)


def test_guard_state_round_trips_through_pickle_and_json(tmp_path):
    model = nn.Linear(4, 1)
    with watch(model, **opts(tmp_path, bounds=(0, 1))) as guard:
        train(model, F.mse_loss, unit_data, steps=5, guard=guard)
    state = guard.state_dict()
    for restored_state in (pickle.loads(pickle.dumps(state)), json.loads(json.dumps(state))):
        other = Guard(nn.Linear(4, 1), **opts(tmp_path, bounds=(0, 1), alerts_path=tmp_path / "o.jsonl"))
        other.load_state_dict(restored_state)
        assert other.alerts == guard.alerts
        assert other.engine.step == guard.engine.step
        assert other.engine.monitor.history.to_dict() == guard.engine.monitor.history.to_dict()
        other.close()


# ----------------------------------------------------------------------------------------- scenarios in a loop
SCENARIOS = [
    # (id, model, loss, data, options, codes that must fire (empty: a healthy run, nothing >= warning))
    ("softmax-then-cross-entropy", lambda: Head(nn.Softmax(dim=1), out=3), nn.CrossEntropyLoss(), class_data, {},
     {"activation_loss_mismatch"}),
    ("sigmoid-then-bce-with-logits", lambda: Head(nn.Sigmoid()), nn.BCEWithLogitsLoss(),
     lambda: unit_data(binary=True), {}, {"activation_loss_mismatch"}),
    ("softmax-then-nll", lambda: Head(nn.Softmax(dim=1), out=3), nn.NLLLoss(), class_data, {},
     {"activation_loss_mismatch"}),
    ("sigmoid-head-targets-to-10", lambda: Head(nn.Sigmoid()), nn.MSELoss(),
     lambda: (torch.randn(32, 4), 10 * torch.rand(32, 1)), {"bounds": None}, {"target_out_of_range"}),
    ("clamped-head", lambda: Head(lambda z: torch.clamp(z, 0, 1)), nn.MSELoss(),
     lambda: (3 * torch.randn(32, 4), torch.rand(32, 1)), {"bounds": (0, 1)}, {"output_saturated"}),
    ("unscaled-inputs", lambda: Head(), nn.MSELoss(), lambda: (1000 * torch.randn(32, 4), torch.rand(32, 1)),
     {"bounds": None}, {"inputs_not_scaled"}),
    ("healthy-log-softmax-nll", lambda: Head(nn.LogSoftmax(dim=1), out=3), nn.NLLLoss(), class_data, {}, set()),
    ("healthy-sigmoid-bce", lambda: Head(nn.Sigmoid(), hidden=8), nn.BCELoss(), lambda: unit_data(binary=True),
     {}, set()),
    ("healthy-cross-entropy", lambda: Head(out=3, hidden=8), nn.CrossEntropyLoss(), class_data, {}, set()),
    ("healthy-regression", lambda: Head(hidden=8), nn.MSELoss(), lambda: (torch.randn(32, 4), 5 * torch.randn(32, 1)),
     {}, set()),
]


@pytest.mark.parametrize("make,loss_fn,data,options,codes", [pytest.param(*s[1:], id=s[0]) for s in SCENARIOS])
def test_scenarios(tmp_path, make, loss_fn, data, options, codes):
    model = make()
    with watch(model, **opts(tmp_path, **options)) as guard:
        train(model, loss_fn, data, steps=4, guard=guard, lr=0.01)
    if codes:
        assert codes <= {a.code for a in guard.alerts}
    else:
        assert loud(guard.alerts) == []


def test_bound_to_a_distribution_inserts_softmax(tmp_path):
    model = Head(out=3, hidden=8)
    onehot = lambda: (torch.randn(32, 4), F.one_hot(torch.randint(0, 3, (32,)), 3).float())
    with watch(model, **opts(tmp_path, bounds="distribution", on_violation="bound")) as guard:
        train(model, F.mse_loss, onehot, steps=3, guard=guard)
    (rec,) = guard.bounds_inserted
    assert rec["kind"] == "softmax"
    with torch.no_grad():
        out = model(30 * torch.randn(64, 4))
    assert out.min() >= 0 and out.max() <= 1
    torch.testing.assert_close(out.sum(1), torch.ones(64))


def test_list_of_input_tensors_is_watched(tmp_path):
    """``guard.step(inputs=[a, b])``: every float tensor of the list is watched (a NaN in the second too)."""
    model = Head(nn.Sigmoid())
    guard = watch(model, **opts(tmp_path, check_every_n_steps=1))
    x, y = unit_data(8)
    extra = torch.randn(8, 3)
    extra[2, 1] = math.nan
    loss = F.mse_loss(model(x), y)  # (a training forward: gradients on)
    guard.step(loss=loss, inputs=[x, extra, torch.arange(8)], targets=y)
    guard.close()
    snap = guard.engine.session.last_snapshot
    assert snap.counts["input"] == x.numel() + extra.numel()  # the integer tensor is not a feature
    assert any(a.code == "nonfinite_input" for a in guard.alerts)
