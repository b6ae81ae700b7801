"""Logits a softmax cross-entropy reads (``from_logits=True``): the step reads the logsumexp of their rows
(``pre.lse``, ``pre.lse_rows``; on at most ``LSE_ELEMENTS`` elements a step), ``logits_growing`` fires on a
run whose logits run away, and the soft cap ``cap * tanh(z / cap)`` that ``bound`` inserts is a
``BoundActivation`` of kind ``softcap``: recorded, replayed on resume, applied by ``apply_bounds``, and saved
and loaded with ``model.save`` / ``keras.models.load_model``.

The model is the catalogue's: ``Input(4) → Dense(8, tanh) → Dense(4)`` on separable classes (the largest
feature), ``SparseCategoricalCrossentropy(from_logits=True)``; SGD at 100 makes the logits run away within
the first checks, at 0.1 they stay near their start."""
from __future__ import annotations

import numpy as np
import pytest

from boundguard.integrations.keras import BoundActivation, apply_bounds
from boundguard.integrations.keras import buffer as keras_buffer
from boundguard.integrations.keras.graph import loss_info

from conftest import assert_clean, data, dense, describe, fit, guard, keras, predict, severe

pytestmark = [pytest.mark.filterwarnings("ignore::boundguard.alerts.BoundGuardWarning"),
              pytest.mark.filterwarnings("ignore:.*from_logits=True.*:UserWarning")]

CAP = 30.0  # the rule's cap_floor: these runs' early logits are small


def _sce():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _train(tmp_path, model, lr: float, *, epochs: int = 4, shuffle: bool = True, **options):
    x, y = data("separable")
    options.setdefault("check_every_n_steps", 2)
    g = guard(tmp_path, **options)
    history = fit(model, x, y, g, loss=_sce(), optimizer=keras.optimizers.SGD(lr), epochs=epochs, shuffle=shuffle)
    return g, history


def _raw_logits(model, x) -> np.ndarray:
    """The head's logits without its activation: ``tanh(x W1 + b1) W2 + b2``."""
    (w1, b1), (w2, b2) = (layer.get_weights() for layer in model.layers)
    return np.tanh(x @ w1 + b1) @ w2 + b2


def _lse(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    m = z.max(-1)
    return m + np.log(np.exp(z - m[..., None]).sum(-1))


# ------------------------------------------------------------------------------------- the statistic
def test_the_mean_logsumexp_is_read_on_the_logits(tmp_path):
    """Learning rate 0: the logits stay those of the initial weights. Checks at steps 1, 8 and 16: the last
    one's interval is the second epoch, every row once."""
    x, _ = data("separable")
    model = dense(4)
    g, history = _train(tmp_path, model, 0.0, epochs=2, check_every_n_steps=8)
    snap = g.last_snapshot
    assert snap.first_step == 9 and snap.values["pre.lse_rows"] == 256  # the 8 steps of 32 rows
    np.testing.assert_allclose(snap.mean_lse(), _lse(_raw_logits(model, x)).mean(), rtol=1e-5)
    assert np.isfinite(history.history["boundguard/logit_lse_mean"]).all()


def test_at_most_lse_elements_a_step_are_read(tmp_path, monkeypatch):
    monkeypatch.setattr(keras_buffer, "LSE_ELEMENTS", 4 * 10)  # 10 rows of 4 classes (set before the trace)
    x, _ = data("separable")
    model = dense(4)
    g, _ = _train(tmp_path, model, 0.0, epochs=2, check_every_n_steps=8, bounds=None, shuffle=False)
    snap = g.last_snapshot
    assert snap.values["pre.lse_rows"] == 8 * 10  # the first 10 rows of each of the 8 steps of the interval
    rows = np.concatenate([x[i:i + 10] for i in range(0, 256, 32)])
    np.testing.assert_allclose(snap.mean_lse(), _lse(_raw_logits(model, rows)).mean(), rtol=1e-5)


@pytest.mark.parametrize("activation,loss,target", [
    ("softmax", "sparse_categorical_crossentropy", "separable"),  # probabilities, not logits
    (None, "mse", "linear"),  # a regression head
])
def test_other_heads_read_no_logsumexp(tmp_path, activation, loss, target):
    x, y = data(target)
    model = dense(4 if target == "separable" else 1, activation)
    g = guard(tmp_path, bounds=None)
    fit(model, x, y, g, loss=loss, epochs=1)
    assert g.last_snapshot.values["pre.lse_rows"] == 0 and g.last_snapshot.mean_lse() is None
    assert not g.monitor.history.logit_recent


def test_binary_logits_read_no_logsumexp(tmp_path):
    """One logit a sigmoid reads: no class dimension, nothing to read."""
    x, y = data("binary")
    g = guard(tmp_path)
    fit(dense(), x, y, g, loss=keras.losses.BinaryCrossentropy(from_logits=True), epochs=1)
    assert g.last_snapshot.values["pre.lse_rows"] == 0


# ------------------------------------------------------------------------------------- the rule
def test_runaway_logits_are_caught(tmp_path):
    model = dense(4)
    g, _ = _train(tmp_path, model, 100.0)
    fired = [a for a in g.alerts if a.code == "logits_growing"]
    assert fired, describe(g.alerts)
    a = fired[0]
    assert a.severity == "warning" and a.where == f"{model.layers[-1].name} pre-activation"
    assert a.details["absmax"] >= 50 and a.details["lse"] >= a.details["early_lse"] + 20
    assert a.details["cap"] == CAP


def test_sane_logits_are_read_and_clean(tmp_path):
    g, _ = _train(tmp_path, dense(4), 0.1)
    assert not severe(g.alerts), describe(g.alerts)
    h = g.monitor.history
    assert len(h.logit_recent) == 8 and h.logit_recent[-1][1] < 5  # the signal is read, and modest


# ------------------------------------------------------------------------------------- the soft cap
def test_the_soft_cap_is_inserted_and_keeps_the_logits_within_the_cap(tmp_path):
    x, _ = data("separable")
    model = dense(4)
    names = [w.path for w in model.weights]
    g, _ = _train(tmp_path, model, 100.0, actions={"logits_growing": "bound"})
    (rec,) = g.bounds_inserted
    assert rec["kind"] == "softcap" and (rec["lo"], rec["hi"]) == (-CAP, CAP) and rec["module"] == model.layers[-1].name
    act = model.layers[-1].activation
    assert isinstance(act, BoundActivation) and act.kind == "softcap" and act.hi == CAP
    assert [w.path for w in model.weights] == names, "bounding must not rename or add parameters"
    assert_clean(model)
    assert loss_info(model) == ("sparse_categorical_crossentropy", True)  # the loss still reads logits
    facts = g.monitor.facts
    assert facts.logit_cap == CAP and facts.activation == "identity"
    assert [a.action for a in g.alerts if a.code == "logits_growing"] == ["bound"]  # silent once capped
    p, raw = predict(model, x * 100), _raw_logits(model, x * 100)
    assert np.abs(raw).max() > 3 * CAP  # (the raw logits are far beyond the cap)
    # within (-cap, cap): tanh of the largest rounds to 1 in float32, so the bound is reached, not passed
    assert np.abs(p).max() <= CAP
    np.testing.assert_allclose(p, CAP * np.tanh(raw / CAP), rtol=1e-4, atol=1e-4)


@pytest.mark.one_backend
def test_the_soft_cap_survives_save_and_load(tmp_path):
    x, _ = data("separable")
    model = dense(4)
    _train(tmp_path, model, 100.0, actions={"logits_growing": "bound"})
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")  # no custom_objects
    act = loaded.layers[-1].activation
    assert isinstance(act, BoundActivation) and (act.kind, act.lo, act.hi) == ("softcap", -CAP, CAP)
    np.testing.assert_allclose(predict(loaded, x * 100), predict(model, x * 100), rtol=1e-6, atol=1e-6)
    assert loss_info(loaded) == ("sparse_categorical_crossentropy", True)
    # training the loaded model on with a new guard: the cap on the model is known, the rule stays silent
    x, y = data("separable")
    g = guard(tmp_path, check_every_n_steps=2)
    fit(loaded, x, y, g, compile=False, epochs=1)
    assert g.monitor.facts.logit_cap == CAP and g.monitor.facts.activation == "identity"
    assert not [a for a in g.alerts if a.code in ("logits_growing", "probe_incomplete")], describe(g.alerts)


def test_resume_replays_the_soft_cap(tmp_path):
    x, y = data("separable")
    first = dense(4)
    g, _ = _train(tmp_path, first, 100.0, actions={"logits_growing": "bound"}, epochs=1)
    assert [r["kind"] for r in g.bounds_inserted] == ["softcap"]
    rebuilt = dense(4)  # the same architecture from code: its head is linear again
    rebuilt.set_weights(first.get_weights())
    h = guard(tmp_path, check_every_n_steps=2, actions={"logits_growing": "bound"})
    h.load_state_dict(g.state_dict())
    fit(rebuilt, x, y, h, loss=_sce(), optimizer=keras.optimizers.SGD(100.0), epochs=1)
    act = rebuilt.layers[-1].activation
    assert isinstance(act, BoundActivation) and act.kind == "softcap"
    assert h.bounds_inserted == g.bounds_inserted  # replayed, not inserted a second time
    assert h.monitor.facts.logit_cap == CAP and h.monitor.facts.activation == "identity"
    assert np.abs(predict(rebuilt, x * 100)).max() <= CAP


@pytest.mark.one_backend
def test_apply_bounds_sets_the_soft_cap_for_inference(tmp_path):
    x, _ = data("separable")
    trained = dense(4)
    g, _ = _train(tmp_path, trained, 100.0, actions={"logits_growing": "bound"}, epochs=1)
    fresh = dense(4)
    fresh.set_weights(trained.get_weights())
    assert apply_bounds(fresh, g.state_dict()) == g.bounds_inserted
    np.testing.assert_allclose(predict(fresh, x), predict(trained, x), rtol=1e-6, atol=1e-6)


@pytest.mark.one_backend
def test_a_soft_cap_needs_a_positive_finite_cap():
    with pytest.raises(ValueError, match="positive, finite"):
        BoundActivation("softcap", lo=0.0, hi=0.0)
    cap = BoundActivation.from_config(BoundActivation("softcap", -5.0, 5.0).get_config())
    z = keras.ops.convert_to_tensor(np.array([-1e6, -5.0, 0.0, 5.0, 1e6], "float32"))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(cap(z)), 5.0 * np.tanh(np.array([-2e5, -1, 0, 1, 2e5])),
                               rtol=1e-6)
