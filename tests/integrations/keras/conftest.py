"""Tiny real ``model.fit`` runs shared by the Keras tests.

The backend is fixed per process: ``make test`` runs this folder once each with ``KERAS_BACKEND=tensorflow``,
``KERAS_BACKEND=torch`` and ``KERAS_BACKEND=jax``. Every test here must pass on all three (a test that
needs one backend says why in its skip); tests marked ``one_backend`` (Keras-level logic that no backend
changes) run on TensorFlow only in ``make test``.
"""
from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import warnings  # noqa: E402
from typing import Any, Callable, Optional  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

keras = pytest.importorskip("keras")
from keras import ops  # noqa: E402

from boundguard import BoundGuardWarning  # noqa: E402
from boundguard.integrations.keras import BoundGuard  # noqa: E402

BACKEND = keras.backend.backend()
SEVERE = {"warning", "error", "critical"}
#: Keras dispatches batch-end hooks asynchronously on this backend (torch and JAX: ``IS_THREAD_SAFE``) when
#: every callback is async-safe, as BoundGuard is. Its check of step n then runs on the training thread
#: before batch n + 1, so a halt lets that one batch run: ``LAG`` batches more than on TensorFlow.
ASYNC = bool(keras.src.backend.IS_THREAD_SAFE)
LAG = 1 if ASYNC else 0


def severe(alerts) -> set[str]:
    return {a.code for a in alerts if a.severity in SEVERE}


def codes(alerts) -> set[str]:
    return {a.code for a in alerts}


def describe(alerts) -> list:
    return [(a.code, a.severity, a.step, a.message) for a in alerts]


@pytest.fixture(autouse=True)
def _seed(keras_seeded):
    """Every test here starts from the same seed."""


def data(kind: str = "binary", n: int = 256, d: int = 4, seed: int = 0, scale: float = 1.0):
    """Standardised features and targets of one kind.

    binary {0, 1} · prob [0, 1] continuous · classes 0..2 (int) · onehot (3 columns) · wide [-3, 3] ·
    big [0, 10] · signed [-0.9, 0.9] · linear (unbounded regression) · separable: the class is the largest
    feature (0..d-1, int; a linear head separates them).
    """
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype("float32")
    s = x[:, 0] + 0.5 * x[:, 1]
    if kind == "binary":
        y = (s > 0).astype("float32")[:, None]
    elif kind == "prob":
        y = (1 / (1 + np.exp(-s))).astype("float32")[:, None]
    elif kind == "classes":
        y = np.digitize(s, [-0.5, 0.5]).astype("int64")
    elif kind == "onehot":
        y = np.eye(3, dtype="float32")[np.digitize(s, [-0.5, 0.5])]
    elif kind == "wide":
        y = (3.0 * np.tanh(s)).astype("float32")[:, None]
    elif kind == "big":
        y = (10.0 / (1 + np.exp(-s))).astype("float32")[:, None]
    elif kind == "signed":
        y = (0.9 * np.tanh(s)).astype("float32")[:, None]
    elif kind == "linear":
        y = (2.0 * s + 0.5).astype("float32")[:, None]
    elif kind == "separable":
        y = np.argmax(x, axis=1).astype("int64")
    else:
        raise ValueError(kind)
    return x * scale, y


def dense(out: int = 1, activation: Any = None, *, hidden: int = 8, din: int = 4, kernel: Any = None,
          bias: Any = None) -> "keras.Model":
    """Input → Dense(hidden, tanh) → Dense(out, activation): a Sequential model."""
    head_kw = {}
    if kernel is not None:
        head_kw["kernel_initializer"] = keras.initializers.Constant(kernel)
    if bias is not None:
        head_kw["bias_initializer"] = keras.initializers.Constant(bias)
    return keras.Sequential([keras.Input((din,)), keras.layers.Dense(hidden, activation="tanh"),
                             keras.layers.Dense(out, activation=activation, **head_kw)])


def guard(tmp_path, **kw) -> BoundGuard:
    kw.setdefault("check_every_n_steps", 4)
    kw.setdefault("on_violation", "log")
    kw.setdefault("strict", True)
    return BoundGuard(alerts_path=tmp_path / "alerts.jsonl", **kw)


def fit(model, x, y, callbacks, *, loss: Any = "mse", optimizer: Any = None, epochs: int = 2, batch_size: int = 32,
        compile: bool = True, quiet: bool = True, **kw):
    if compile:
        model.compile(optimizer=optimizer if optimizer is not None else keras.optimizers.Adam(1e-2), loss=loss)
    callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
    with warnings.catch_warnings():
        if quiet:
            warnings.simplefilter("ignore", BoundGuardWarning)
        return model.fit(x, y, epochs=epochs, batch_size=batch_size, verbose=0, callbacks=callbacks, **kw)


class Script(keras.callbacks.Callback):
    """Scripts the loss: before each batch, ``script(step)`` gives ``(scale, offset)`` for :func:`scripted_loss`.

    Keras compiles the loss, so the script reaches it through two variables set on the host. On JAX a
    jitted step would take their values as constants (only the model's own state travels through the
    stateless step), so a scripted model is compiled with ``run_eagerly=Script.EAGER``.
    """

    EAGER = BACKEND == "jax"

    def __init__(self, script: Callable[[int], tuple[float, float]]):
        super().__init__()
        self.script = script
        self.scale = keras.Variable(1.0, trainable=False, dtype="float32")
        self.offset = keras.Variable(0.0, trainable=False, dtype="float32")
        self.step = 0

    def on_train_batch_begin(self, batch, logs=None):
        self.step += 1
        scale, offset = self.script(self.step)
        self.scale.assign(np.float32(scale))
        self.offset.assign(np.float32(offset))

    def loss(self):
        def scripted_mse(y_true, y_pred):
            return ops.mean(ops.square(y_true - y_pred), axis=-1) * self.scale + self.offset

        return scripted_mse


def clip_activation(lo: float = -1.0, hi: float = 1.0) -> Callable:
    """The seed's Example 3: a hard clip as the output activation (backend-agnostic)."""

    def custom_activation(v):
        return ops.clip(v, lo, hi)

    return custom_activation


def watched_activation(layer) -> Any:
    return vars(layer).get("activation")


def quiet_warnings(fn: Callable) -> Callable:
    def run(*a, **k):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", BoundGuardWarning)
            return fn(*a, **k)
    return run


def assert_clean(model) -> None:
    """No boundguard wrapper is left on the model after fit."""
    from boundguard.integrations.keras.activations import WatchedActivation
    from boundguard.integrations.keras.buffer import BufferMetric

    assert "compute_loss" not in vars(model)
    for layer in model._flatten_layers(include_self=False):
        assert not isinstance(vars(layer).get("activation"), WatchedActivation), layer.name
    assert not [m for m in model.metrics if isinstance(m, BufferMetric)], "the JAX buffer is still on the model"


def predict(model, x) -> np.ndarray:
    return np.asarray(model.predict(x, verbose=0))


__all__ = ["BACKEND", "ASYNC", "LAG", "SEVERE", "severe", "codes", "describe", "data", "dense", "guard", "fit", "Script",
           "clip_activation", "watched_activation", "quiet_warnings", "assert_clean", "predict", "Optional"]
