"""halt, raise and bound end to end; save/load after bound; state round trip and resume; logs; files;
the model left clean; internal errors; monitoring that does not change training; option validation."""
from __future__ import annotations

import json
import pickle
import subprocess
import sys
import warnings

import numpy as np
import pytest

from boundguard import BoundGuardError, BoundGuardWarning
from boundguard.integrations.keras import BoundActivation, BoundGuard, apply_bounds

from conftest import (BACKEND, LAG, assert_clean, data, dense, describe, fit, guard, keras, predict, severe)

pytestmark = pytest.mark.filterwarnings("ignore::boundguard.alerts.BoundGuardWarning")


# ------------------------------------------------------------------------------------- halt / raise
def test_halt_stops_after_the_check_step(tmp_path):
    x, y = data("binary")
    g = guard(tmp_path, bounds=(0, 1), on_violation="halt", check_every_n_steps=10)
    model = dense()
    history = fit(model, x, y, g, epochs=5)
    assert len(history.history["loss"]) == 1
    # halt at the first check stops after that batch (under asynchronous dispatch, after the next one)
    assert int(model.optimizer.iterations.numpy()) == 1 + LAG
    assert {a.action for a in g.alerts if a.severity != "info"} == {"halt"}
    assert_clean(model)


@pytest.mark.one_backend
def test_halt_only_for_the_codes_named(tmp_path):
    x, y = data("binary")
    g = guard(tmp_path, bounds=(0, 1), on_violation="log", actions={"nonfinite_loss": "halt"})
    history = fit(dense(), x, y, g, epochs=3)
    assert len(history.history["loss"]) == 3
    assert any(a.code == "missing_output_activation" and a.action == "log" for a in g.alerts)


def test_halt_on_a_nan_run(tmp_path):
    x, y = data("linear")
    g = guard(tmp_path, bounds=None, on_violation="halt", check_every_n_steps=3)
    model = dense()
    fit(model, x, y, g, optimizer=keras.optimizers.SGD(1e6), epochs=20)
    assert severe(g.alerts) & {"nonfinite_loss", "nonfinite_output", "loss_diverging", "preactivation_exploding"}, \
        describe(g.alerts)
    stop = min(a.step for a in g.alerts if a.action == "halt")  # the check that halted
    assert int(model.optimizer.iterations.numpy()) == stop + LAG


@pytest.mark.one_backend
def test_inferred_range_alerts_warn_instead_of_stopping(tmp_path):
    """A range guessed from the targets (bounds="auto") never stops a run by itself: declare bounds= to enforce it."""
    x, y = data("binary")
    g = guard(tmp_path, on_violation="raise")  # auto: binary targets → (0, 1), inferred
    history = fit(dense(), x, y, g, epochs=2)
    assert len(history.history["loss"]) == 2
    (a,) = [a for a in g.alerts if a.code == "missing_output_activation" and a.step == 1]
    assert a.bounds_inferred and a.action == "warn"
    h = guard(tmp_path, on_violation="log", actions={"missing_output_activation": "raise"})
    with pytest.raises(BoundGuardError):  # an explicit per-code action still applies
        fit(dense(), x, y, h, epochs=2)


def test_raise_carries_the_alert_and_leaves_the_model_clean(tmp_path):
    x, y = data("binary")
    g = guard(tmp_path, bounds=(0, 1), on_violation="raise")
    model = dense()
    with pytest.raises(BoundGuardError) as info:
        fit(model, x, y, g)
    assert info.value.alert.code in {"output_out_of_range", "missing_output_activation"}
    assert info.value.alert is g.alerts[-1] or info.value.alert in g.alerts
    assert_clean(model)
    model.save(tmp_path / "m.keras")  # nothing of the callback is left to serialize
    lines = (tmp_path / "alerts.jsonl").read_text().splitlines()
    assert any(json.loads(line)["action"] == "raise" for line in lines)


# ------------------------------------------------------------------------------------- bound
@pytest.mark.parametrize("bounds,kind,target", [((0, 1), "sigmoid", "binary"), ((-3, 3), "scaled_sigmoid", "wide"),
                                                ("symmetric", "tanh", "signed")])
def test_bound_keeps_predictions_in_range_and_survives_save_load(tmp_path, bounds, kind, target):
    x, y = data(target)
    model = dense(bias=5.0)
    names = [w.path for w in model.weights]
    g = guard(tmp_path, bounds=bounds, on_violation="bound")
    with pytest.warns(BoundGuardWarning, match="inserted"):
        fit(model, x, y, g, quiet=False)
    (rec,) = g.bounds_inserted
    assert rec["kind"] == kind and rec["step"] == 1
    lo, hi = g.monitor.bounds.lo, g.monitor.bounds.hi
    p = predict(model, x * 100)
    assert p.min() >= lo and p.max() <= hi
    assert [w.path for w in model.weights] == names, "bounding must not rename or add parameters"
    assert_clean(model)
    assert isinstance(model.layers[-1].activation, BoundActivation)
    # after the bound the statistics see bounded predictions: no new range alert
    assert not [a for a in g.alerts if a.code == "output_out_of_range" and a.step > 1]
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")  # no custom_objects
    np.testing.assert_allclose(predict(loaded, x), predict(model, x), rtol=1e-6, atol=1e-6)
    assert isinstance(loaded.layers[-1].activation, BoundActivation)


def test_bound_distribution_inserts_softmax(tmp_path):
    x, y = data("onehot")
    model = dense(3)
    g = guard(tmp_path, bounds="distribution", on_violation="bound")
    fit(model, x, y, g)
    assert g.bounds_inserted[0]["kind"] == "softmax"
    p = predict(model, x)
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-5)


@pytest.mark.one_backend
def test_bound_is_inserted_once_per_run(tmp_path):
    x, y = data("binary")
    g = guard(tmp_path, bounds=(0, 1), on_violation="bound")
    fit(dense(bias=3.0), x, y, g)
    assert len(g.bounds_inserted) == 1
    assert [a.action for a in g.alerts if a.severity != "info"].count("bound") == 1


@pytest.mark.one_backend
def test_bound_without_a_located_activation_is_a_note(tmp_path):
    x, y = data("binary", d=2)
    x = np.repeat(x[:, None, :1], 5, axis=1)  # (n, 5, 1) sequences
    model = keras.Sequential([keras.Input((5, 1)), keras.layers.SimpleRNN(1)])  # no activation attribute
    g = guard(tmp_path, bounds=(0, 1), on_violation="bound")
    fit(model, x, y, g)
    assert not g.bounds_inserted
    notes = [a for a in g.alerts if a.code == "probe_incomplete"]
    assert any(a.where == "bound" for a in notes) and any(a.where == "pre-activation" for a in notes)


# ------------------------------------------------------------------------------------- state
@pytest.mark.one_backend
def test_state_dict_round_trip(tmp_path):
    x, y = data("binary")
    g = guard(tmp_path, bounds=(0, 1), on_violation="bound")
    fit(dense(bias=3.0), x, y, g)
    state = g.state_dict()
    state = pickle.loads(pickle.dumps(state))
    json.dumps(state["monitor"]["history"])
    h = BoundGuard(bounds=(0, 1), on_violation="bound", alerts_path=tmp_path / "b.jsonl")
    h.load_state_dict(state)
    assert h.alerts == g.alerts and h.bounds_inserted == g.bounds_inserted and h.step == g.step
    assert h.state_dict()["monitor"] == g.state_dict()["monitor"]
    with pytest.raises(TypeError, match="state_dict"):
        h.load_state_dict([1, 2])


def test_resume_replays_the_bound_on_a_rebuilt_model(tmp_path):
    x, y = data("binary")
    g = guard(tmp_path, bounds=(0, 1), on_violation="bound")
    first = dense(bias=3.0)
    fit(first, x, y, g, epochs=1)
    weights = first.get_weights()
    rebuilt = dense()  # the same architecture from code: its head is linear again
    rebuilt.set_weights(weights)
    h = guard(tmp_path, bounds=(0, 1), on_violation="bound")
    h.load_state_dict(g.state_dict())
    fit(rebuilt, x, y, h, epochs=1)
    assert isinstance(rebuilt.layers[-1].activation, BoundActivation)
    assert h.bounds_inserted == g.bounds_inserted  # replayed, not inserted a second time
    assert h.step == 2 * g.step
    p = predict(rebuilt, x * 100)
    assert p.min() >= 0 and p.max() <= 1


@pytest.mark.one_backend
def test_apply_bounds_for_inference(tmp_path):
    x, y = data("binary")
    g = guard(tmp_path, bounds=(0, 1), on_violation="bound")
    trained = dense(bias=3.0)
    fit(trained, x, y, g, epochs=1)
    fresh = dense()
    fresh.set_weights(trained.get_weights())
    assert apply_bounds(fresh, g.state_dict()) == g.bounds_inserted
    np.testing.assert_allclose(predict(fresh, x), predict(trained, x), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------- logs and files
@pytest.mark.one_backend
def test_epoch_logs_carry_the_statistics(tmp_path):
    x, y = data("binary")
    g = guard(tmp_path)
    csv = keras.callbacks.CSVLogger(str(tmp_path / "log.csv"))
    history = fit(dense(activation="sigmoid"), x, y, [g, csv], loss="binary_crossentropy", epochs=3)
    keys = {k for k in history.history if k.startswith("boundguard/")}
    assert {"boundguard/output_min", "boundguard/output_max", "boundguard/out_of_bounds_share",
            "boundguard/preact_absmax", "boundguard/preact_rms", "boundguard/input_rms",
            "boundguard/loss_mean", "boundguard/alerts"} == keys
    for k in keys:
        assert len(history.history[k]) == 3
    out_max = history.history["boundguard/output_max"]
    assert all(0 < v < 1 for v in out_max)
    header = (tmp_path / "log.csv").read_text().splitlines()[0]
    assert "boundguard/output_max" in header
    # the epoch's loss mean covers every step of the epoch (8 steps of 32)
    assert history.history["boundguard/loss_mean"][0] == pytest.approx(history.history["loss"][0], rel=1e-4)


@pytest.mark.one_backend
def test_alerts_and_statistics_files(tmp_path):
    x, y = data("binary")
    g = guard(tmp_path, bounds=(0, 1), check_every_n_steps=3)
    fit(dense(), x, y, g)
    assert g.alerts_path == tmp_path / "alerts.jsonl"
    alerts = [json.loads(line) for line in (tmp_path / "alerts.jsonl").read_text().splitlines()]
    assert alerts and all(r["schema"] >= 1 and r["type"] == "alert" for r in alerts)
    stats = [json.loads(line) for line in (tmp_path / "stats.jsonl").read_text().splitlines()]
    run = [r for r in stats if r["type"] == "run"]
    checks = [r["step"] for r in stats if r["type"] == "stats"]
    assert run and run[0]["facts"]["activation"] == "identity"
    assert checks == [1, 3, 6, 9, 12, 15, 16]  # first step, every 3 steps, and the end of fit (16 steps)
    rec = next(r for r in stats if r["type"] == "stats" and r["step"] == 3)
    assert rec["first_step"] == 2 and rec["pred.n"] == 2 * 32 and rec["input.n"] == 2 * 32 * 4


@pytest.mark.one_backend
def test_default_alerts_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    x, y = data("binary")
    g = BoundGuard(bounds=(0, 1), on_violation="log")
    fit(dense(), x, y, g, epochs=1)
    assert g.alerts_path.resolve() == (tmp_path / "boundguard" / "alerts.jsonl").resolve()
    assert (tmp_path / "boundguard" / "alerts.jsonl").read_text().strip()
    assert (tmp_path / "boundguard" / "stats.jsonl").read_text().strip()


# ------------------------------------------------------------------------------------- clean model
def test_model_is_clean_after_fit_and_predicts_like_before(tmp_path):
    x, y = data("binary")
    model = dense(activation="sigmoid")
    g = guard(tmp_path)
    fit(model, x, y, g, loss="binary_crossentropy")
    assert_clean(model)
    assert model.layers[-1].activation is keras.activations.sigmoid
    before = predict(model, x)
    model.save(tmp_path / "m.keras")
    np.testing.assert_allclose(predict(keras.models.load_model(tmp_path / "m.keras"), x), before, rtol=1e-6)
    # a later fit without the callback writes nothing to the callback's buffer
    fit(model, x, y, [], loss="binary_crossentropy", compile=False, epochs=1)
    assert not np.isfinite(g._buffer.peek()[:, 0]).any()


def test_a_save_during_fit_holds_none_of_the_callback(tmp_path):
    """A checkpoint written while the callback runs (on JAX its buffer is one of the model's metrics then)
    holds only the model's own variables, loads with plain load_model, and the logs hold no buffer."""
    import h5py
    import zipfile

    x, y = data("binary")
    model = dense(activation="sigmoid")
    model.compile(optimizer="adam", loss="binary_crossentropy", metrics=["accuracy"])
    before = [v.name for v in model.weights]
    ckpt = keras.callbacks.ModelCheckpoint(str(tmp_path / "ckpt.keras"))
    history = fit(model, x, y, [guard(tmp_path), ckpt], compile=False, epochs=1)
    assert not [k for k in history.history if "buffer" in k], sorted(history.history)
    with zipfile.ZipFile(tmp_path / "ckpt.keras") as z:
        z.extract("model.weights.h5", tmp_path)
    names: list[str] = []
    with h5py.File(tmp_path / "model.weights.h5") as f:
        f.visit(names.append)
    assert not [n for n in names if "boundguard" in n], names
    loaded = keras.models.load_model(tmp_path / "ckpt.keras")
    assert [v.name for v in loaded.weights] == before
    np.testing.assert_allclose(predict(loaded, x), predict(model, x), rtol=1e-6, atol=1e-6)
    assert_clean(model)


@pytest.mark.one_backend
def test_a_run_that_raised_leaves_nothing_for_the_next(tmp_path, monkeypatch):
    x, y = data("binary")
    model = dense(activation="sigmoid")
    with monkeypatch.context() as m:
        m.setattr(BoundGuard, "_finalize_facts", lambda self: 1 / 0)
        with pytest.raises(ZeroDivisionError):  # strict: out of fit without on_train_end
            fit(model, x, y, guard(tmp_path), loss="binary_crossentropy")
    g = guard(tmp_path)
    fit(model, x, y, g, loss="binary_crossentropy", compile=False, epochs=1)
    assert g.step == 8 and g.last_snapshot.counts["pred"] == 4 * 32  # steps 5..8
    assert_clean(model)


@pytest.mark.one_backend
def test_reused_callback_counts_steps_across_fits(tmp_path):
    x, y = data("binary")
    model = dense(activation="sigmoid")
    g = guard(tmp_path)
    fit(model, x, y, g, loss="binary_crossentropy", epochs=1)
    fit(model, x, y, g, loss="binary_crossentropy", epochs=1, compile=False)
    assert g.step == 16 and g.last_snapshot.step == 16
    assert_clean(model)


def test_validation_steps_are_not_counted(tmp_path):
    x, y = data("binary")
    g = guard(tmp_path, check_every_n_steps=100)
    fit(dense(activation="sigmoid"), x, y, g, loss="binary_crossentropy", epochs=1, validation_data=(x, y))
    assert g.last_snapshot.counts["target"] == 7 * 32  # steps 2..8 of the epoch: no validation batch


# ------------------------------------------------------------------------------------- no side effects
def _weights_after(tmp_path, with_guard: bool):
    keras.utils.set_random_seed(7)
    x, y = data("binary")
    model = dense(activation="sigmoid")
    cbs = [guard(tmp_path, bounds=(0, 1), on_violation="log", check_every_n_steps=3)] if with_guard else []
    fit(model, x, y, cbs, loss="binary_crossentropy", epochs=2)
    return model.get_weights()


def test_monitoring_does_not_change_training(tmp_path):
    a = _weights_after(tmp_path, False)
    b = _weights_after(tmp_path, True)
    for u, v in zip(a, b):
        assert np.array_equal(u, v), "weights differ with the callback"


def test_reads_happen_only_at_checks(tmp_path, monkeypatch):
    """The callback moves statistics to the host once per check and never in between."""
    from boundguard.integrations import keras as adapter

    reads: list[int] = []
    g = guard(tmp_path, check_every_n_steps=5)
    real = adapter.ops.convert_to_numpy

    def counting(v):
        reads.append(g.step)
        return real(v)

    monkeypatch.setattr(adapter.ops, "convert_to_numpy", counting)
    x, y = data("binary", n=20 * 32)
    fit(dense(activation="sigmoid"), x, y, g, loss="binary_crossentropy", epochs=1)
    # step 0: at train begin the output activation is run once on a grid (no statistics involved)
    assert [r for r in reads if r > 0] == [1, 5, 10, 15, 20] and reads.count(0) <= 1


# ------------------------------------------------------------------------------------- internal errors
@pytest.mark.one_backend
def test_internal_error_warns_once_and_switches_off(tmp_path, monkeypatch):
    def boom(self, *a, **k):
        raise RuntimeError("synthetic failure")

    monkeypatch.setattr(BoundGuard, "_write_row", boom)
    x, y = data("binary")
    model = dense(activation="sigmoid")
    g = BoundGuard(alerts_path=tmp_path / "alerts.jsonl")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = fit(model, x, y, g, loss="binary_crossentropy", epochs=2, quiet=False)
    ours = [w for w in caught if issubclass(w.category, BoundGuardWarning)]
    assert len(ours) == 1 and "synthetic failure" in str(ours[0].message)
    assert len(history.history["loss"]) == 2 and g._session.disabled
    assert_clean(model)


@pytest.mark.one_backend
def test_internal_error_at_a_check_switches_off(tmp_path, monkeypatch):
    monkeypatch.setattr(BoundGuard, "_finalize_facts", lambda self: 1 / 0)
    x, y = data("binary")
    model = dense(activation="sigmoid")
    g = BoundGuard(alerts_path=tmp_path / "alerts.jsonl")
    with pytest.warns(BoundGuardWarning, match="ZeroDivisionError"):
        fit(model, x, y, g, loss="binary_crossentropy", quiet=False)
    assert g._session.disabled
    assert_clean(model)


@pytest.mark.one_backend
def test_strict_reraises(tmp_path, monkeypatch):
    monkeypatch.setattr(BoundGuard, "_finalize_facts", lambda self: 1 / 0)
    x, y = data("binary")
    model = dense(activation="sigmoid")
    with pytest.raises(ZeroDivisionError):
        fit(model, x, y, guard(tmp_path), loss="binary_crossentropy")


# ------------------------------------------------------------------------------------- options
@pytest.mark.parametrize("kw,exc,words", [
    (dict(on_violation="explode"), ValueError, ["on_violation", "explode"]),
    (dict(bounds=(1, 0)), ValueError, ["bounds", "lo < hi"]),
    (dict(bounds="probabilty"), ValueError, ["bounds", "probabilty"]),
    (dict(check_every_n_steps=0), ValueError, ["check_every_n_steps", "0"]),
    (dict(check_every_n_steps=2.5), TypeError, ["check_every_n_steps", "2.5"]),
    (dict(actions={"nonsense": "halt"}), ValueError, ["actions", "nonsense"]),
    (dict(thresholds={"loss_spike": {"nope": 1}}), ValueError, ["loss_spike", "nope"]),
    (dict(strict="yes"), TypeError, ["strict", "yes"]),
])
@pytest.mark.one_backend
def test_invalid_options_are_named(kw, exc, words):
    with pytest.raises(exc) as info:
        BoundGuard(**kw)
    for w in words:
        assert w in str(info.value)


@pytest.mark.one_backend
@pytest.mark.parametrize("option, closest", [("check_every", "check_every_n_steps"), ("target_key", "output_key")])
def test_unknown_keyword_teaches_the_valid_ones(option, closest):
    """As watch() does: the option, the closest valid one and every option the Keras callback takes (it has
    no input_key / target_key: Keras hands it x and y)."""
    with pytest.raises(TypeError) as err:
        BoundGuard(**{option: 5})
    msg = str(err.value)
    assert msg.startswith(f"BoundGuard() got an unknown option {option!r}"), msg
    assert f"(did you mean {closest!r}?)" in msg, msg
    assert msg.endswith("valid options: bounds, on_violation, actions, check_every_n_steps, alerts_path, "
                        "thresholds, output_key, name, strict"), msg


@pytest.mark.one_backend
def test_missing_keras_names_the_extra():
    code = ("import sys; sys.modules['keras'] = None\n"
            "try:\n    import boundguard.integrations.keras\nexcept ImportError as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    assert "pip install 'boundguard[keras]'" in out


@pytest.mark.one_backend
def test_importing_boundguard_imports_no_framework():
    frameworks = ("keras", "tensorflow", "torch", "jax")
    code = f"import sys, boundguard; print(sorted(m for m in {frameworks!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    assert out.strip() == "[]"


@pytest.mark.skipif(BACKEND == "torch", reason="steps_per_execution > 1 is a TensorFlow/JAX feature in Keras")
def test_steps_per_execution(tmp_path):
    x, y = data("binary")
    model = dense()
    model.compile(optimizer="adam", loss="mse", steps_per_execution=3)
    g = guard(tmp_path, bounds=(0, 1), check_every_n_steps=4)
    fit(model, x, y, g, compile=False, epochs=1)
    assert g.step == 8
    assert "missing_output_activation" in severe(g.alerts)
    assert g.last_snapshot.counts["pred"] == (8 - g.last_snapshot.first_step + 1) * 32
