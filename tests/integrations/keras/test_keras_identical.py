"""A monitor that takes no action leaves training bit-identical: the weights after ``fit`` with
``BoundGuard(on_violation="log")`` equal, bit for bit, those of the same seeded run without it.

Issue 21: on TensorFlow (CPU, oneDNN) the weights drifted whenever the output activation is one Grappler
fuses with the head's contraction and bias add (tanh, sigmoid, elu, ...; also one a loss applies to a linear
output) and nothing else read the pre-activation: the statistics' read of it stopped the fusion. Before the
fix these cases differed by 6e-8 to 2e-7 after 2 epochs (4e-4 under mixed_bfloat16; 8.9e-8 for the LSTM after
3 epochs, as reported). The step now reads copies (``TensorFlowStrategy.unshared``); torch and JAX were
bit-identical before and are checked too.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import pytest

from conftest import BACKEND, data, fit, guard, keras, ops, severe

pytestmark = pytest.mark.filterwarnings("ignore::boundguard.alerts.BoundGuardWarning")
L = keras.layers


class Outside(keras.Model):
    """Subclassed: the sigmoid applied outside any layer, after the head Dense."""

    def __init__(self) -> None:
        super().__init__()
        self.body = L.Dense(8, activation="tanh")
        self.head = L.Dense(1)

    def call(self, x: Any) -> Any:
        return ops.sigmoid(self.head(self.body(x)))


def _sigmoid_mse(y_true: Any, y_pred: Any) -> Any:
    return ops.mean(ops.square(y_true - ops.sigmoid(y_pred)), axis=-1)


def _images() -> tuple[np.ndarray, np.ndarray]:
    x = np.random.default_rng(0).standard_normal((128, 8, 8, 1)).astype("float32")
    return x, (x.mean(axis=(1, 2, 3)) > 0).astype("float32")[:, None]


def _sequences() -> tuple[np.ndarray, np.ndarray]:
    x = np.random.default_rng(0).standard_normal((128, 6, 3)).astype("float32")
    return x, np.tanh(x[:, :, 0].sum(axis=1))[:, None].astype("float32")


#: name → (model, data, loss, compile/fit options): the healthy models whose weights drifted on TensorFlow
CASES: dict[str, tuple[Callable[[], Any], Callable[[], tuple], Any, dict]] = {
    "dense_tanh_mse": (lambda: keras.Sequential([keras.Input((4,)), L.Dense(8, activation="tanh"),
                                                 L.Dense(1, activation="tanh")]), lambda: data("signed"), "mse", {}),
    "dense_tanh_mixed_bfloat16": (lambda: keras.Sequential([keras.Input((4,)),
                                                            L.Dense(8, activation="tanh", dtype="mixed_bfloat16"),
                                                            L.Dense(1, activation="tanh", dtype="mixed_bfloat16")]),
                                  lambda: data("signed"), "mse", {}),
    "lstm_tanh_head": (lambda: keras.Sequential([keras.Input((6, 3)), L.LSTM(8), L.Dense(1, activation="tanh")]),
                       _sequences, "mse", {}),
    "conv_sigmoid_head": (lambda: keras.Sequential([keras.Input((8, 8, 1)), L.Conv2D(4, 3, activation="relu"),
                                                    L.Flatten(), L.Dense(1, activation="sigmoid")]),
                          _images, "mse", {}),
    "activation_layer_elu": (lambda: keras.Sequential([keras.Input((4,)), L.Dense(8, activation="tanh"), L.Dense(1),
                                                       L.Activation("elu")]), lambda: data("linear"), "mse", {}),
    "subclassed_outside": (Outside, lambda: data("prob"), "mse", {}),
    # (the monitor cannot see the loss's sigmoid: bounds=None, so it does not flag the linear output)
    "linear_head_loss_applies_sigmoid": (lambda: keras.Sequential([keras.Input((4,)), L.Dense(8, activation="tanh"),
                                                                   L.Dense(1)]), lambda: data("prob"), _sigmoid_mse,
                                         {"bounds": None}),
    # multi-class logits (a language-model head's shape): read without a copy (the remapper does not fuse
    # Softmax), so no second head matmul per step, and still bit-identical
    "softmax_head_sparse_ce": (lambda: keras.Sequential([keras.Input((4,)), L.Dense(8, activation="tanh"),
                                                         L.Dense(3, activation="softmax")]),
                               lambda: data("classes"), "sparse_categorical_crossentropy", {}),
    "logits_head_from_logits": (lambda: keras.Sequential([keras.Input((4,)), L.Dense(8, activation="tanh"), L.Dense(3)]),
                                lambda: data("classes"),
                                keras.losses.SparseCategoricalCrossentropy(from_logits=True), {}),
    "tanh_partial_batch_validation_spe": (
        lambda: keras.Sequential([keras.Input((4,)), L.Dense(8, activation="tanh"), L.Dense(1, activation="tanh")]),
        lambda: data("signed"), "mse", {"batch_size": 24, "validation": True, "steps_per_execution": 2}),
}


def _weights_after(tmp_path, case: str, with_guard: bool) -> tuple[list[np.ndarray], Any]:
    build, make_data, loss, opts = CASES[case]
    opts = dict(opts)
    keras.utils.set_random_seed(7)
    x, y = make_data()
    model = build()
    spe = opts.pop("steps_per_execution", 1)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=loss,
                  steps_per_execution=spe if BACKEND != "torch" else 1)  # (torch: 1 only)
    if opts.pop("validation", False):
        opts["validation_data"] = (x[:48], y[:48])
    g = guard(tmp_path, on_violation="log", check_every_n_steps=3, bounds=opts.pop("bounds", "auto"))
    fit(model, x, y, [g] if with_guard else [], compile=False, epochs=2, **opts)
    return model.get_weights(), g


@pytest.mark.parametrize("case", list(CASES))
def test_weights_bit_identical_with_and_without_the_monitor(tmp_path, case):
    plain, _ = _weights_after(tmp_path, case, False)
    watched, g = _weights_after(tmp_path, case, True)
    assert g.step > 0 and g.last_snapshot is not None, "the monitor did not watch the run"
    assert not severe(g.alerts), "a healthy model must not raise alerts here"
    diff = max(float(np.max(np.abs(a.astype(np.float64) - b))) for a, b in zip(plain, watched) if a.size)
    assert all(np.array_equal(a, b) for a, b in zip(plain, watched)), \
        f"{case}: weights differ with the callback (max abs diff {diff:.3g})"
    assert g.last_snapshot.counts["pre"] > 0, "the pre-activation is still measured"


@pytest.mark.skipif(BACKEND != "tensorflow", reason="the copies exist on TensorFlow only")
def test_copies_measure_what_the_originals_do(tmp_path, monkeypatch):
    """The statistics read from the copies are those of the original tensors (up to rounding and the drift
    the originals cause): the fix changes what the step compiles, not what the monitor sees."""
    from boundguard.integrations.keras import buffer

    for case in ("dense_tanh_mse", "subclassed_outside"):
        with_copies = _weights_after(tmp_path, case, True)[1].last_snapshot
        with monkeypatch.context() as m:
            m.setattr(buffer.TensorFlowStrategy, "unshared", buffer.Strategy.unshared)
            originals = _weights_after(tmp_path, case, True)[1].last_snapshot
        assert with_copies.counts == originals.counts
        for col, v in originals.values.items():
            assert np.isclose(with_copies.values[col], v, rtol=1e-5, atol=1e-6, equal_nan=True), (case, col)
