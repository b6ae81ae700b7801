"""The Keras callback on the shared session: one bound per run with the file agreeing with ``guard.alerts``,
copies of the bound records, a failed retrace that is reported, warnings attributed to the user's code,
the final check at the end of ``fit``, the one cadence, epoch logs from the checks, and the record schema
(old states and saved models still load)."""
from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest

from boundguard import BoundGuardError, BoundGuardWarning
from boundguard.integrations.keras import BoundActivation, BoundGuard, apply_bounds
from boundguard.surgery import BoundRecord

from conftest import ASYNC, LAG, assert_clean, data, dense, fit, guard, keras, predict

RANGE = ("output_out_of_range", "missing_output_activation")


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_two_range_alerts_one_bound_file_and_memory_agree(tmp_path):
    x, y = data("binary")
    g = guard(tmp_path, bounds=(0, 1), on_violation="bound")
    model = dense(bias=3.0)  # out of range and no output activation: two range alerts at step 1
    fit(model, x, y, g, epochs=1)
    memory = {a.code: a.action for a in g.alerts if a.code in RANGE and a.step == 1}
    assert sorted(memory.values()) == ["bound", "warn"], memory
    on_file = {r["code"]: r["action"] for r in _records(tmp_path / "alerts.jsonl")
               if r.get("event") == "new" and r["code"] in memory}
    assert on_file == memory
    (rec,) = g.bounds_inserted
    bound_alert = next(a for a in g.alerts if a.action == "bound")
    assert bound_alert.details["inserted"] == rec
    p = predict(model, x * 100)
    assert p.min() >= 0 and p.max() <= 1


def test_bounds_inserted_are_copies(tmp_path):
    x, y = data("binary")
    g = guard(tmp_path, bounds=(0, 1), on_violation="bound")
    fit(dense(bias=3.0), x, y, g, epochs=1)
    g.bounds_inserted[0]["kind"] = "tanh"
    g.bounds_inserted.clear()
    assert [r["kind"] for r in g.bounds_inserted] == ["sigmoid"]
    assert [r["kind"] for r in g.state_dict()["monitor"]["inserted"]] == ["sigmoid"]


def test_one_record_schema(tmp_path):
    x, y = data("binary")
    g = guard(tmp_path, bounds=(0, 1), on_violation="bound")
    model = dense(bias=3.0)
    fit(model, x, y, g, epochs=1)
    (rec,) = g.bounds_inserted
    assert rec == BoundRecord.from_dict(rec).to_dict()
    assert {k: rec[k] for k in ("kind", "lo", "hi", "dim", "step", "path", "output")} == {
        "kind": "sigmoid", "lo": 0.0, "hi": 1.0, "dim": -1, "step": 1, "path": [], "output": True}
    assert rec["module"] == model.layers[-1].name
    bound = next(a for a in g.alerts if a.action == "bound")
    on_file = next(r for r in _records(tmp_path / "alerts.jsonl") if r.get("action") == "bound")
    assert on_file["details"]["inserted"] == rec == bound.details["inserted"]


def test_a_failed_retrace_is_reported_not_swallowed(tmp_path):
    x, y = data("binary")
    g = guard(tmp_path, bounds=(0, 1), on_violation="bound")
    model = dense(bias=3.0)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    real = model.make_train_function
    failed: list[int] = []

    def make_train_function(force=False):
        if g.step >= 1 and not failed:  # the retrace after the bound insertion at the first check
            failed.append(g.step)
            raise RuntimeError("synthetic retrace failure")
        return real(force=force)

    model.make_train_function = make_train_function
    fit(model, x, y, g, compile=False, epochs=1)
    assert failed == [1]
    assert not g.bounds_inserted
    assert not isinstance(model.layers[-1].activation, BoundActivation), "no bound in force without a record"
    assert {a.action for a in g.alerts if a.code in RANGE} == {"warn"}
    (note,) = [a for a in g.alerts if a.code == "probe_incomplete" and a.where == "bound"]
    assert "retracing the train step failed" in note.message and "synthetic retrace failure" in note.message
    on_file = [r for r in _records(tmp_path / "alerts.jsonl") if r["code"] == "probe_incomplete"]
    assert [r["where"] for r in on_file] == ["bound"]
    assert not g._session.disabled
    assert_clean(model)


def test_alert_warnings_point_at_the_users_fit_call(tmp_path):
    x, y = data("binary")
    model = dense()
    model.compile(optimizer="adam", loss="mse")
    g = BoundGuard(bounds=(0, 1), check_every_n_steps=4, alerts_path=tmp_path / "alerts.jsonl")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(x, y, epochs=1, batch_size=32, verbose=0, callbacks=[g])
    ours = [w for w in caught if issubclass(w.category, BoundGuardWarning)]
    assert any("missing_output_activation" in str(w.message) for w in ours), [str(w.message) for w in ours]
    assert {w.filename for w in ours} == {__file__}


def test_the_end_of_fit_is_judged(tmp_path):
    """Targets outside the bounds only in batch 58 of a 60-step fit, with checks every 50 steps: seen at the
    end."""
    x, y = data("binary", n=60 * 32)
    y = y.copy()
    y[57 * 32 + 3] = 3.0
    g = guard(tmp_path, bounds=(0, 1), check_every_n_steps=50)
    model = dense(activation="sigmoid")
    fit(model, x, y, g, epochs=1, shuffle=False)
    (alert,) = [a for a in g.alerts if a.code == "target_out_of_range"]
    assert alert.step == 60
    assert g.last_snapshot.first_step == 51 and g.last_snapshot.step == 60
    assert any(r["code"] == "target_out_of_range" for r in _records(tmp_path / "alerts.jsonl"))
    assert_clean(model)


@pytest.mark.parametrize("action", ["halt", "raise"])
def test_nan_tripwire_acts_at_the_nan_step(tmp_path, action):
    """A NaN input in batch 8 with checks every 50 steps: judged, and acted on, at step 8 (Keras hands the
    batch-end hook the running loss as a host number; a NaN step makes it NaN). Under asynchronous dispatch
    (torch, JAX) Keras' callback thread sees that loss while the next batches train: the check comes at a
    batch boundary after step 8 that depends on timing, before the end of fit (step 40), and a halt lets
    one more batch run."""
    x, y = data("binary", n=40 * 32)
    x = x.copy()
    x[7 * 32 + 3, 0] = np.nan
    g = guard(tmp_path, bounds=(0, 1), check_every_n_steps=50, on_violation=action)
    model = dense(activation="sigmoid")
    if action == "raise":
        with pytest.raises(BoundGuardError):
            fit(model, x, y, g, epochs=1, shuffle=False)
    else:
        fit(model, x, y, g, epochs=1, shuffle=False)
    steps = {a.code: a.step for a in g.alerts}
    judged = steps["nonfinite_input"]
    assert steps["nonfinite_loss"] == judged
    if ASYNC:
        assert 8 <= judged <= 40, steps
    else:
        assert judged == 8, steps
    if action == "halt":  # no batch ran after the halt (one under async dispatch; none after the last)
        assert g._session.step == min(judged + LAG, 40)
    assert g.last_snapshot.step == g._session.step


def test_one_cadence_no_epoch_end_check(tmp_path):
    x, y = data("binary")  # 8 steps per epoch
    g = guard(tmp_path, bounds=(0, 1), check_every_n_steps=5)
    fit(dense(activation="sigmoid"), x, y, g, loss="binary_crossentropy", epochs=2)
    stats = [r for r in _records(tmp_path / "stats.jsonl") if r["type"] == "stats"]
    assert [(r["first_step"], r["step"]) for r in stats] == [(1, 1), (2, 5), (6, 10), (11, 15), (16, 16)]


def test_epoch_logs_come_from_the_checks_of_the_epoch(tmp_path):
    """Keys are the same every epoch; an epoch without a check logs NaN for its statistics."""
    x, y = data("binary")  # 8 steps per epoch; checks at 1 and 20 (end of fit at 24)
    g = guard(tmp_path, check_every_n_steps=20)
    history = fit(dense(activation="sigmoid"), x, y, g, loss="binary_crossentropy", epochs=3)
    out_max = history.history["boundguard/output_max"]
    assert len(out_max) == 3 and 0 < out_max[0] < 1 and math.isnan(out_max[1]) and 0 < out_max[2] < 1
    assert len(history.history["boundguard/alerts"]) == 3


def test_a_halt_does_not_carry_over_to_the_next_fit(tmp_path):
    x, y = data("binary")
    model = dense()
    g = guard(tmp_path, bounds=(0, 1), on_violation="halt", check_every_n_steps=4)
    fit(model, x, y, g, epochs=1)
    assert int(model.optimizer.iterations.numpy()) == 1 + LAG
    fit(model, x, y, g, epochs=1, compile=False)  # 8 more steps: the same alerts are active, nothing new halts
    assert int(model.optimizer.iterations.numpy()) == 9 + LAG


def test_old_state_and_record_dicts_still_load(tmp_path):
    """A state saved by the previous Keras adapter: records as plain dicts with the same keys."""
    old = {"module": "dense_out", "path": [], "kind": "scaled_sigmoid", "lo": -3, "hi": 3, "dim": -1,
           "step": 7, "attr": None, "output": True}
    state = {"monitor": {"inserted": [old], "alerts": [], "notes": []}, "step": 9}
    g = BoundGuard(bounds=(-3, 3), alerts_path=tmp_path / "a.jsonl")
    g.load_state_dict(state)
    assert g.step == 9 and g.bounds_inserted[0]["kind"] == "scaled_sigmoid" and g.bounds_inserted[0]["lo"] == -3.0
    model = dense()
    applied = apply_bounds(model, state)
    assert applied == g.bounds_inserted
    act = model.layers[-1].activation
    assert isinstance(act, BoundActivation) and (act.kind, act.lo, act.hi) == ("scaled_sigmoid", -3.0, 3.0)


def test_saved_activation_name_and_config_are_unchanged(tmp_path):
    """Models saved by the previous version name ``boundguard>BoundActivation`` with this config."""
    assert keras.saving.get_registered_name(BoundActivation) == "boundguard>BoundActivation"
    act = BoundActivation("softmax", axis=-1)
    assert act.get_config() == {"kind": "softmax", "lo": 0.0, "hi": 1.0, "axis": -1}
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation=act)])
    model.save(tmp_path / "m.keras")
    cfg = json.dumps(model.get_config())
    assert "boundguard>BoundActivation" in cfg
    loaded = keras.models.load_model(tmp_path / "m.keras")
    x = np.random.default_rng(0).standard_normal((5, 4)).astype("float32")
    np.testing.assert_allclose(predict(loaded, x), predict(model, x), rtol=1e-6)


def test_retrace_failure_in_apply_bounds_warns(tmp_path):
    model = dense()
    model.compile(optimizer="adam", loss="mse")

    def broken(force=False):
        raise RuntimeError("no trace today")

    model.make_train_function = broken
    rec = {"module": model.layers[-1].name, "kind": "sigmoid"}
    with pytest.warns(BoundGuardWarning, match="no trace today"):
        apply_bounds(model, [rec])
    assert isinstance(model.layers[-1].activation, BoundActivation)


@pytest.mark.parametrize("kw", [dict(check_every=5), dict(target_key="y")])
def test_unknown_keyword_names_the_option(kw):
    with pytest.raises(TypeError) as info:
        BoundGuard(**kw)
    assert next(iter(kw)) in str(info.value)


def test_an_internal_error_while_judging_switches_off(tmp_path, monkeypatch):
    """The session calls ``Monitor.judge`` (then ``publish``): an error there warns once, training goes on."""
    from boundguard.monitor import Monitor

    def boom(self, snap):
        raise RuntimeError("synthetic judge failure")

    monkeypatch.setattr(Monitor, "judge", boom)
    x, y = data("binary")
    model = dense(activation="sigmoid")
    g = BoundGuard(alerts_path=tmp_path / "alerts.jsonl")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = fit(model, x, y, g, loss="binary_crossentropy", epochs=2, quiet=False)
    ours = [w for w in caught if issubclass(w.category, BoundGuardWarning)]
    assert len(ours) == 1 and "synthetic judge failure" in str(ours[0].message)
    assert len(history.history["loss"]) == 2 and g._session.disabled
    assert_clean(model)


@pytest.mark.parametrize("spe", [1, 3])
def test_an_interval_longer_than_the_buffer_is_spilled_not_lost(tmp_path, monkeypatch, spe):
    """With the device buffer cut to 4 rows, a 10-step interval moves full blocks to the host before its
    check: the statistics judged are those of the run with one block (same seed, same data)."""
    import boundguard.integrations.keras.callback as cb

    if spe > 1 and keras.backend.backend() == "torch":
        pytest.skip("Keras' torch backend runs one step per execution (steps_per_execution must be 1)")

    def run(name):
        keras.utils.set_random_seed(0)
        x, y = data("prob", n=24 * 32)
        y = y.copy()
        y[5 * 32 + 1] = 2.0  # a target outside the bounds in step 6: in a spilled block
        g = guard(tmp_path / name, bounds=(0, 1), check_every_n_steps=10)
        model = dense(activation="sigmoid")
        model.compile(optimizer=keras.optimizers.SGD(1e-2), loss="mse", steps_per_execution=spe)
        fit(model, x, y, g, epochs=1, shuffle=False, compile=False)
        return [{k: v for k, v in r.items() if k != "time"} for r in _records(tmp_path / name / "stats.jsonl")
                if r["type"] == "stats"], [(a.code, a.step, a.value) for a in g.alerts]

    whole = run("whole")
    monkeypatch.setattr(cb, "ROW_CAP", 4)
    spills = []
    spill = cb.DeviceBuffer.spill
    monkeypatch.setattr(cb.DeviceBuffer, "spill", lambda self, steps: spills.append(steps) or spill(self, steps))
    spilled = run("spilled")
    assert spills and max(spills) <= 4 + spe - 1
    assert spilled[0] == whole[0] and spilled[1] == whole[1]
    assert any(code == "target_out_of_range" for code, _, _ in whole[1])
    assert sum(r["loss.count"] for r in whole[0]) == 24
