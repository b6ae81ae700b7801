"""Model shapes: Sequential, functional (trailing parameter-free layers, Operations, nested models, several
outputs), subclassed (activation inside a layer or applied outside any layer), a compute_loss override, a
custom train_step, and a convolutional head."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import BACKEND, assert_clean, data, dense, describe, fit, guard, keras, ops, predict, severe

pytestmark = [pytest.mark.filterwarnings("ignore::boundguard.alerts.BoundGuardWarning"),
              pytest.mark.filterwarnings("ignore:.*from_logits=True.*:UserWarning")]


def facts(g):
    f = g.monitor.facts
    return f.activation, f.pred_where, f.pre_where


def _functional(head):
    inp = keras.Input((4,))
    h = keras.layers.Dense(8, activation="tanh")(inp)
    return keras.Model(inp, head(h))


class Sub(keras.Model):
    """Subclassed: body → head Dense, with an optional function applied outside any layer."""

    def __init__(self, act=None, outside=None, out=1):
        super().__init__()
        self.body = keras.layers.Dense(8, activation="tanh")
        self.head = keras.layers.Dense(out, activation=act)
        self.outside = outside

    def call(self, x):
        z = self.head(self.body(x))
        return self.outside(z) if self.outside is not None else z


def test_sequential(tmp_path):
    x, y = data("binary")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"),
                              keras.layers.Dense(1, activation="sigmoid", name="out")])
    g = guard(tmp_path)
    fit(model, x, y, g, loss="binary_crossentropy")
    assert facts(g) == ("sigmoid", "out output", "out pre-activation")
    assert not severe(g.alerts), describe(g.alerts)
    assert_clean(model)


def test_functional_with_trailing_softmax_layer(tmp_path):
    x, y = data("classes")
    model = _functional(lambda h: keras.layers.Softmax(name="probs")(keras.layers.Dense(3, name="logits")(h)))
    g = guard(tmp_path)
    fit(model, x, y, g, loss="sparse_categorical_crossentropy")
    assert facts(g) == ("softmax", "probs output", "logits pre-activation")
    assert g.monitor.facts.classes == 3 and g.monitor.facts.target_integer
    assert not severe(g.alerts), describe(g.alerts)


def test_functional_with_trailing_activation_layer(tmp_path):
    x, y = data("binary")
    model = _functional(lambda h: keras.layers.Activation("sigmoid", name="act")(keras.layers.Dense(1)(h)))
    g = guard(tmp_path)
    fit(model, x, y, g, loss="binary_crossentropy")
    assert facts(g) == ("sigmoid", "act output", "act pre-activation")
    assert g.last_snapshot.counts["pre"] == g.last_snapshot.counts["pred"] > 0
    assert not severe(g.alerts), describe(g.alerts)


def test_functional_with_an_operation_at_the_output(tmp_path):
    x, y = data("binary")
    model = _functional(lambda h: ops.sigmoid(keras.layers.Dense(1, name="fc")(h)))
    g = guard(tmp_path)
    fit(model, x, y, g, loss="binary_crossentropy")
    assert facts(g)[0] == "sigmoid" and facts(g)[2] == "fc pre-activation"
    assert not severe(g.alerts), describe(g.alerts)


def test_functional_missing_activation_is_flagged(tmp_path):
    x, y = data("binary")
    model = _functional(lambda h: keras.layers.Dense(1, name="fc")(h))
    g = guard(tmp_path, bounds="probability")
    fit(model, x, y, g)
    assert "missing_output_activation" in severe(g.alerts)


def test_nested_model_at_the_output(tmp_path):
    x, y = data("binary")
    inner = keras.Sequential([keras.Input((8,)), keras.layers.Dense(1, activation="sigmoid", name="inner_out")])
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="tanh"), inner])
    g = guard(tmp_path)
    fit(model, x, y, g, loss="binary_crossentropy")
    assert facts(g)[0] == "sigmoid" and facts(g)[2] == "inner_out pre-activation"
    assert not severe(g.alerts), describe(g.alerts)
    assert_clean(model)


def test_subclassed_activation_in_the_layer(tmp_path):
    x, y = data("binary")
    model = Sub("sigmoid")
    g = guard(tmp_path)
    fit(model, x, y, g, loss="binary_crossentropy")
    assert facts(g)[0] == "sigmoid" and g.monitor.facts.pre_where.endswith("pre-activation")
    assert g.last_snapshot.counts["pre"] > 0
    assert not severe(g.alerts), describe(g.alerts)
    assert_clean(model)


def test_subclassed_activation_outside_any_layer_is_inferred(tmp_path):
    x, y = data("binary")
    model = Sub(outside=ops.sigmoid)
    g = guard(tmp_path)
    fit(model, x, y, g, loss="binary_crossentropy")
    assert facts(g)[0] == "sigmoid", g.monitor.facts
    assert not severe(g.alerts), describe(g.alerts)


def test_subclassed_softmax_outside_any_layer_is_inferred(tmp_path):
    x, y = data("classes")
    model = Sub(outside=ops.softmax, out=3)
    g = guard(tmp_path)
    fit(model, x, y, g, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    assert facts(g)[0] == "softmax"
    assert "activation_loss_mismatch" in severe(g.alerts), describe(g.alerts)


def test_subclassed_linear_with_from_logits_is_healthy(tmp_path):
    x, y = data("binary")
    g = guard(tmp_path, bounds=(0, 1))
    fit(Sub(), x, y, g, loss=keras.losses.BinaryCrossentropy(from_logits=True))
    assert facts(g)[0] == "identity"
    assert not severe(g.alerts), describe(g.alerts)


def test_subclassed_bound(tmp_path):
    x, y = data("binary")
    model = Sub()
    g = guard(tmp_path, bounds=(0, 1), on_violation="bound")
    fit(model, x, y, g)
    assert g.bounds_inserted and g.bounds_inserted[0]["attr"] == "head"
    p = predict(model, x * 100)
    assert p.min() >= 0 and p.max() <= 1
    assert_clean(model)


def test_compute_loss_override_still_runs(tmp_path):
    class Custom(keras.Sequential):
        calls = 0

        def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
            type(self).calls += 1
            return ops.mean(ops.square(y - y_pred)) * 2.0

    x, y = data("binary")
    model = Custom([keras.Input((4,)), keras.layers.Dense(1, activation="sigmoid")])
    g = guard(tmp_path)
    history = fit(model, x, y, g, epochs=1)
    assert Custom.calls > 0
    assert g.last_snapshot.losses.size and history.history["loss"][0] == pytest.approx(
        history.history["boundguard/loss_mean"][0], rel=1e-4)
    assert_clean(model)


def test_custom_train_step_without_compute_loss_is_a_note(tmp_path):
    class Manual(keras.Sequential):
        def train_step(self, *args):  # (data), or on JAX (state, data) → (logs, state)
            logs = {"loss": ops.convert_to_tensor(0.0)}  # trains nothing, calls no compute_loss
            return (logs, args[0]) if BACKEND == "jax" else logs

    x, y = data("binary")
    model = Manual([keras.Input((4,)), keras.layers.Dense(1, activation="sigmoid")])
    g = guard(tmp_path)
    fit(model, x, y, g, epochs=1)
    notes = [a for a in g.alerts if a.code == "probe_incomplete"]
    assert [a.where for a in notes] == ["loss"] and "compute_loss" in notes[0].fix
    assert_clean(model)


def test_several_outputs_watch_the_first(tmp_path):
    x, y = data("binary")
    inp = keras.Input((4,))
    h = keras.layers.Dense(8, activation="tanh")(inp)
    model = keras.Model(inp, [keras.layers.Dense(1, activation="sigmoid", name="a")(h),
                              keras.layers.Dense(1, name="b")(h)])
    g = guard(tmp_path)
    fit(model, x, [y, y], g, loss=["binary_crossentropy", "mse"], epochs=1)
    assert facts(g)[0] == "sigmoid" and g.monitor.facts.loss.name == "binary_crossentropy"
    assert any(a.code == "probe_incomplete" and a.where == "outputs" for a in g.alerts)


@pytest.mark.parametrize("form", ["dict", "list"])
def test_output_key_watches_the_named_output_with_its_own_targets(tmp_path, form):
    """Outputs reg (linear, targets in [2, 8]) and cls (sigmoid, binary targets), with a loss dict
    (output_key="cls") or a loss list (output_key=1): the classifier is watched against its own binary
    targets, never the regression's."""
    x, y = data("binary")
    y_reg = (5 + 3 * np.tanh(x[:, :1])).astype("float32")
    inp = keras.Input((4,))
    h = keras.layers.Dense(8, activation="tanh")(inp)
    reg = keras.layers.Dense(1, name="reg")(h)
    cls = keras.layers.Dense(1, activation="sigmoid", name="cls")(h)
    if form == "dict":
        model, key = keras.Model(inp, {"reg": reg, "cls": cls}), "cls"
        ys, loss = {"reg": y_reg, "cls": y}, {"reg": "mse", "cls": "binary_crossentropy"}
    else:
        model, key, ys, loss = keras.Model(inp, [reg, cls]), 1, [y_reg, y], ["mse", "binary_crossentropy"]
    g = guard(tmp_path, output_key=key)
    fit(model, x, ys, g, loss=loss, epochs=1)
    assert facts(g)[0] == "sigmoid" and g.monitor.facts.loss.name == "binary_crossentropy"
    assert g.monitor.bounds is not None and (g.monitor.bounds.lo, g.monitor.bounds.hi) == (0.0, 1.0)
    assert not [a for a in g.alerts if a.severity != "info"], [(a.code, a.message) for a in g.alerts]
    (note,) = [a for a in g.alerts if a.code == "probe_incomplete" and a.where == "outputs"]
    assert "'cls'" in note.message


def test_an_output_key_that_names_no_output_is_a_note(tmp_path):
    x, y = data("binary")
    g = guard(tmp_path, output_key="nope")
    fit(dense(activation="sigmoid"), x, y, g, loss="binary_crossentropy", epochs=1)
    assert any(a.code == "probe_incomplete" and "output_key='nope'" in a.message for a in g.alerts)


def test_convolutional_head(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 6, 6, 2)).astype("float32")
    y = (x[..., :1] > 0).astype("float32")
    model = keras.Sequential([keras.Input((6, 6, 2)), keras.layers.Conv2D(4, 3, padding="same", activation="relu"),
                              keras.layers.Conv2D(1, 1, activation="sigmoid", name="mask")])
    g = guard(tmp_path)
    fit(model, x, y, g, loss="binary_crossentropy", batch_size=16)
    assert facts(g) == ("sigmoid", "mask output", "mask pre-activation")
    assert g.last_snapshot.counts["pred"] == g.last_snapshot.counts["target"]
    assert not severe(g.alerts), describe(g.alerts)


@pytest.mark.skipif(BACKEND != "torch", reason="jit_compile=True on the torch backend means torch.compile")
def test_torch_compile(tmp_path):
    x, y = data("binary", n=128)
    model = dense(activation="sigmoid")
    model.compile(optimizer="adam", loss="binary_crossentropy", jit_compile=True)
    g = guard(tmp_path, bounds=(0, 1))
    fit(model, x, y, g, compile=False, epochs=1)
    assert not g._session.disabled and g.monitor.facts.activation == "sigmoid"
    assert g.last_snapshot.counts["pred"] == 3 * 32  # steps 2-4
    assert not severe(g.alerts), describe(g.alerts)
    assert_clean(model)
