"""Every alert code that applies to Keras: a real ``model.fit`` that fires it, and a healthy twin that raises
nothing of severity warning or above. Plus the seed's Example 1 (sigmoid + binary cross-entropy) clean."""
from __future__ import annotations

import math

import numpy as np
import pytest

from boundguard.catalogue import CATALOGUE

from conftest import Script, clip_activation, data, dense, describe, fit, guard, keras, severe

pytestmark = [pytest.mark.filterwarnings("ignore::boundguard.alerts.BoundGuardWarning"),
              pytest.mark.filterwarnings("ignore:.*from_logits=True.*:UserWarning")]


def _nan_rows(x):
    x = x.copy()
    x[5, 1] = np.nan
    return x


_EARLY_BASELINE = {"loss_at_baseline": {"warmup_steps": 10, "start_steps": 10}}


def _logits_head(lr: float):
    """A Dense(4) linear head read by a softmax cross-entropy on logits, on separable classes, trained by SGD
    at ``lr``: at 100 the logits run away within the first checks (largest magnitude in the hundreds, mean
    logsumexp ~100 nats by step 6, from ~1.5); at 0.1 they stay near their start."""
    return (dense(4), data("separable"), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            dict(check_every_n_steps=2), dict(optimizer=keras.optimizers.SGD(lr)))


# code → (model, data(kind), loss, guard options, fit options)
FIRING = {
    "output_out_of_range": lambda: (dense(bias=3.0), data("binary"), "mse", dict(bounds=(0, 1)), {}),
    "missing_output_activation": lambda: (dense(), data("binary"), "mse", dict(bounds=(0, 1)), {}),
    "activation_loss_mismatch": lambda: (dense(activation="sigmoid"), data("binary"),
                                         keras.losses.BinaryCrossentropy(from_logits=True), {}, {}),
    "target_out_of_range": lambda: (dense(activation="sigmoid"), data("big"), "mse", {}, {}),
    "output_saturated": lambda: (dense(activation=clip_activation(), kernel=3.0), data("wide"), "mse",
                                 dict(bounds="symmetric"), {}),
    "preactivation_exploding": lambda: (dense(kernel=1e5), data("linear"), "mse", dict(bounds=None),
                                        dict(optimizer=keras.optimizers.SGD(0.0))),
    "regression_loss_on_probabilities": lambda: (dense(activation="sigmoid"), data("binary"), "mse", {}, {}),
    "inputs_not_scaled": lambda: (dense(activation="sigmoid"), data("binary", scale=1000.0), "binary_crossentropy",
                                  {}, {}),
    # mse: torch's binary cross-entropy refuses NaN probabilities before any callback could see them
    "nonfinite_input": lambda: (dense(activation="sigmoid"), (_nan_rows(data("binary")[0]), data("binary")[1]),
                                "mse", {}, dict(shuffle=False)),
    "nonfinite_output": lambda: (dense(kernel=math.nan), data("linear"), "mse", dict(bounds=None), {}),
    # a learning rate of 0: the loss stays at the constant predictor's (the targets' variance) or above
    "loss_at_baseline": lambda: (dense(), data("linear"), "mse", dict(bounds=None, thresholds=_EARLY_BASELINE),
                                 dict(optimizer=keras.optimizers.SGD(0.0))),
    "logits_growing": lambda: _logits_head(100.0),
}

HEALTHY = {
    "output_out_of_range": lambda: (dense(activation="sigmoid", bias=3.0), data("binary"), "binary_crossentropy",
                                    dict(bounds=(0, 1)), {}),
    "missing_output_activation": lambda: (dense(activation="sigmoid"), data("binary"), "binary_crossentropy",
                                          dict(bounds=(0, 1)), {}),
    "activation_loss_mismatch": lambda: (dense(), data("binary"), keras.losses.BinaryCrossentropy(from_logits=True),
                                         dict(bounds=(0, 1)), {}),
    "target_out_of_range": lambda: (dense(activation="sigmoid"), data("prob"), "binary_crossentropy", {}, {}),
    "output_saturated": lambda: (dense(activation="tanh"), data("signed"), "mse", dict(bounds="symmetric"), {}),
    "preactivation_exploding": lambda: (dense(), data("linear"), "mse", dict(bounds=None), {}),
    "regression_loss_on_probabilities": lambda: (dense(activation="sigmoid"), data("binary"), "binary_crossentropy",
                                                 {}, {}),
    "inputs_not_scaled": lambda: (dense(activation="sigmoid"), data("binary"), "binary_crossentropy", {}, {}),
    "nonfinite_input": lambda: (dense(activation="sigmoid"), data("binary"), "binary_crossentropy", {}, {}),
    "nonfinite_output": lambda: (dense(), data("linear"), "mse", dict(bounds=None), {}),
    # the same model learning: below the baseline once warmed up (30 steps here)
    "loss_at_baseline": lambda: (dense(), data("linear"), "mse",
                                 dict(bounds=None, thresholds={"loss_at_baseline": {"warmup_steps": 30}}),
                                 dict(epochs=6, optimizer=keras.optimizers.Adam(5e-2))),
    "logits_growing": lambda: _logits_head(0.1),
}


def _run(tmp_path, scenario):
    model, (x, y), loss, options, fit_kw = scenario()
    g = guard(tmp_path, **options)
    fit(model, x, y, g, loss=loss, **fit_kw)
    return g


@pytest.mark.parametrize("code", sorted(FIRING))
def test_fires(tmp_path, code):
    g = _run(tmp_path, FIRING[code])
    fired = [a for a in g.alerts if a.code == code]
    assert fired, describe(g.alerts)
    a = fired[0]
    expected = CATALOGUE[code].severity
    assert a.severity in {expected, "warning", "error"} if a.bounds_inferred else a.severity in {expected, "error"}
    assert a.message and a.fix and a.where


@pytest.mark.one_backend
@pytest.mark.parametrize("code", sorted(HEALTHY))
def test_healthy_twin(tmp_path, code):
    g = _run(tmp_path, HEALTHY[code])
    assert not severe(g.alerts), describe(g.alerts)
    assert code not in {a.code for a in g.alerts}


def test_sigmoid_then_from_logits_names_both(tmp_path):
    g = _run(tmp_path, FIRING["activation_loss_mismatch"])
    (a,) = [a for a in g.alerts if a.code == "activation_loss_mismatch"]
    assert a.severity == "error" and a.step == 1
    assert "sigmoid" in a.message and "binary_crossentropy" in a.where


def test_softmax_then_sparse_from_logits(tmp_path):
    x, y = data("classes")
    g = guard(tmp_path)
    fit(dense(3, "softmax"), x, y, g, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    assert "activation_loss_mismatch" in severe(g.alerts), describe(g.alerts)


def test_probability_loss_on_linear_output(tmp_path):
    x, y = data("binary")
    g = guard(tmp_path)
    fit(dense(), x, y, g, loss="binary_crossentropy", epochs=1)
    assert "activation_loss_mismatch" in severe(g.alerts), describe(g.alerts)


def test_linear_head_with_from_logits_is_healthy_with_declared_bounds(tmp_path):
    """Predictions are sigmoid(raw output): raw logits outside (0, 1) are no violation."""
    x, y = data("binary")
    g = guard(tmp_path, bounds=(0, 1))
    fit(dense(bias=5.0), x, y, g, loss=keras.losses.BinaryCrossentropy(from_logits=True))
    assert not severe(g.alerts), describe(g.alerts)
    assert g.last_snapshot.counts["pred"] == 0 and g.last_snapshot.counts["pre"] > 0


def test_softmax_classifier_is_healthy(tmp_path):
    x, y = data("classes")
    g = guard(tmp_path)
    fit(dense(3, "softmax"), x, y, g, loss="sparse_categorical_crossentropy")
    assert not severe(g.alerts), describe(g.alerts)
    assert g.monitor.bounds.kind == "distribution" and g.monitor.bounds.inferred


def test_onehot_targets_infer_a_distribution(tmp_path):
    x, y = data("onehot")
    g = guard(tmp_path)
    fit(dense(3, "softmax"), x, y, g, loss="categorical_crossentropy", epochs=1)
    assert not severe(g.alerts), describe(g.alerts)
    assert g.monitor.bounds.kind == "distribution"


@pytest.mark.one_backend
def test_linear_classifier_with_probability_loss_is_not_a_distribution(tmp_path):
    x, y = data("onehot")
    g = guard(tmp_path)
    fit(dense(3), x, y, g, loss="categorical_crossentropy", epochs=1)
    assert severe(g.alerts) & {"output_out_of_range", "missing_output_activation", "activation_loss_mismatch"}


@pytest.mark.one_backend
def test_clip_saturates_and_targets_beyond_it(tmp_path):
    """The seed's Example 3 on a tiny model: clip to [-1, 1] with targets in [-3, 3]."""
    g = _run(tmp_path, FIRING["output_saturated"])
    assert {"output_saturated", "target_out_of_range"} <= severe(g.alerts), describe(g.alerts)
    facts = g.monitor.facts
    assert (facts.activation, facts.activation_params) == ("clamp", {"lo": -1.0, "hi": 1.0})


def test_tanh_tail_saturation(tmp_path):
    x, y = data("signed")
    g = guard(tmp_path, bounds="symmetric")
    fit(dense(activation="tanh", kernel=4.0), x, y, g, loss="mse", optimizer=keras.optimizers.SGD(0.0), epochs=1)
    assert "output_saturated" in severe(g.alerts), describe(g.alerts)


def test_nonfinite_loss_from_nan_targets(tmp_path):
    x, y = data("linear")
    y = y.copy()
    y[40] = np.nan
    g = guard(tmp_path, bounds=None)
    fit(dense(), x, y, g, shuffle=False, epochs=1)
    assert "nonfinite_loss" in severe(g.alerts), describe(g.alerts)
    (a,) = [a for a in g.alerts if a.code == "nonfinite_loss"]
    assert a.severity == "critical" and a.details["first_step"] == 2  # row 40 is in the second batch of 32


def test_a_nan_anywhere_in_a_step_shows_in_its_min_and_max(tmp_path):
    """Row 5 of the first batch holds a NaN: the first check's input min/max are NaN, the count says how many."""
    import json

    _run(tmp_path, FIRING["nonfinite_input"])
    first = next(json.loads(line) for line in (tmp_path / "stats.jsonl").read_text().splitlines()
                 if json.loads(line).get("type") == "stats")
    assert first["step"] == 1 and first["input.min"] == first["input.max"] == "nan"
    assert first["input.nonfinite"] == 1 and first["input.n"] == 32 * 4


def test_float16_head_reports_its_dtype(tmp_path):
    x, y = data("binary")
    keras.mixed_precision.set_dtype_policy("mixed_float16")
    try:
        model = dense(activation="sigmoid")
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    g = guard(tmp_path)
    fit(model, x, y, g, loss="binary_crossentropy", epochs=1)
    assert g.monitor.facts.pre_dtype == "float16"
    assert g.monitor.facts.activation == "sigmoid" and not severe(g.alerts), describe(g.alerts)


def test_nonfinite_output_also_flags_the_loss(tmp_path):
    g = _run(tmp_path, FIRING["nonfinite_output"])
    assert {"nonfinite_output", "nonfinite_loss"} <= severe(g.alerts)


# ------------------------------------------------------------------------------------- loss dynamics
def _scripted(tmp_path, script, steps=48, lr=0.01, **options):
    x, y = data("linear", n=steps * 16)
    s = Script(script)
    g = guard(tmp_path, bounds=None, **options)
    model = dense()
    model.compile(optimizer=keras.optimizers.SGD(lr), loss=s.loss(), run_eagerly=Script.EAGER)
    fit(model, x, y, [s, g], epochs=1, batch_size=16, shuffle=False, compile=False)
    return g


@pytest.mark.one_backend
def test_loss_spike_fires(tmp_path):
    g = _scripted(tmp_path, lambda step: (50.0, 0.0) if step == 30 else (1.0, 0.0), lr=0.0)
    (a,) = [a for a in g.alerts if a.code == "loss_spike"]
    assert a.details["spike_step"] == 30 and a.severity == "warning"


@pytest.mark.one_backend
def test_loss_diverging_fires(tmp_path):
    g = _scripted(tmp_path, lambda step: (1.0 if step < 12 else 1.5 ** (step - 11), 0.0), lr=0.0)
    assert "loss_diverging" in severe(g.alerts), describe(g.alerts)


@pytest.mark.one_backend
def test_loss_plateau_fires(tmp_path):
    g = _scripted(tmp_path, lambda step: (0.0, 1.0), thresholds={"loss_plateau": {"patience": 20}})
    assert "loss_plateau" in {a.code for a in g.alerts}, describe(g.alerts)
    assert not severe(g.alerts)


@pytest.mark.one_backend
def test_loss_dynamics_healthy_twin(tmp_path):
    """A run that learns steadily: no spike, no divergence, no plateau."""
    g = _scripted(tmp_path, lambda step: (1.0, 0.0), lr=0.02, thresholds={"loss_plateau": {"patience": 20}})
    assert not {a.code for a in g.alerts} & {"loss_spike", "loss_diverging", "loss_plateau"}, describe(g.alerts)
    assert not severe(g.alerts), describe(g.alerts)


# ------------------------------------------------------------------------------------- the seed
@pytest.mark.one_backend
def test_seed_example_1_sigmoid_bce_is_clean(tmp_path):
    """LSTM + Dense(1, sigmoid) + binary cross-entropy (the seed's Example 1, shortened)."""
    rng = np.random.default_rng(0)
    r = rng.standard_normal((512, 21)).astype("float32")
    x, y = r[:, :20, None], (r[:, 17:20].sum(1) > 0).astype("float32")[:, None]
    model = keras.Sequential([keras.Input((20, 1)), keras.layers.LSTM(16), keras.layers.Dense(1, activation="sigmoid")])
    model.compile(optimizer="adam", loss="binary_crossentropy", metrics=["accuracy"])
    g = guard(tmp_path, on_violation="warn", check_every_n_steps=5)
    fit(model, x, y, g, compile=False, quiet=False)
    assert not severe(g.alerts), describe(g.alerts)
    f = g.monitor.facts
    assert (f.activation, f.loss.name, f.loss.family) == ("sigmoid", "binary_crossentropy", "probability")
    assert g.monitor.bounds.inferred and (g.monitor.bounds.lo, g.monitor.bounds.hi) == (0.0, 1.0)


@pytest.mark.one_backend
def test_every_applicable_code_has_a_scenario():
    dynamics = {"loss_spike", "loss_diverging", "loss_plateau", "nonfinite_loss"}
    # a Keras callback does not see the gradients (they live inside the train step): not watched there
    gradients = {"nonfinite_gradient", "gradient_exploding", "gradient_vanishing"}
    assert set(FIRING) | dynamics | gradients == set(CATALOGUE) - {"probe_incomplete"}
    assert set(HEALTHY) == set(FIRING)
