"""Slow starters (issue 24), Keras part: correct Keras programs whose loss sits near the constant
predictor's level for the first hundred or few hundred steps and only then falls (see
test_torch_slow_starters.py for what each must show, and test_torch_corpus.py for the rules of the corpus).

Run on TensorFlow (``make test`` does, with the Keras corpus); KERAS_BACKEND defaults to tensorflow.
"""
from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import warnings  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

keras = pytest.importorskip("keras")

from realworld_runs import Run, judge_slow_starter, slow_then_learnt  # noqa: E402

from boundguard import BoundGuardWarning  # noqa: E402
from boundguard.integrations.keras import BoundGuard  # noqa: E402

BACKEND = keras.backend.backend()

pytestmark = [pytest.mark.filterwarnings("ignore::boundguard.alerts.BoundGuardWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.usefixtures("keras_seeded")]  # every program starts from the same seed


def fit(tmp_path, model, x, y, *, loss, optimizer, steps: int, batch_size: int = 32,
        guard_kw: dict | None = None, **compile_kw) -> Run:
    """``compile`` + ``fit`` for ``steps`` steps (whole epochs: ``len(x)`` must be a multiple of
    ``batch_size``), with the loss of every batch. Keras logs the running mean of the epoch's batch
    losses (weighted by batch size); with equal batches the loss of batch ``b`` is
    ``(b + 1) * mean_b - b * mean_(b-1)``."""
    per_epoch = len(x) // batch_size
    assert per_epoch * batch_size == len(x) and steps % per_epoch == 0, (len(x), batch_size, steps)
    kw = dict(check_every_n_steps=5, on_violation="log", strict=True, alerts_path=tmp_path / "alerts.jsonl")
    kw.update(guard_kw or {})
    guard = BoundGuard(**kw)
    means: list[tuple[int, float]] = []
    per_batch = keras.callbacks.LambdaCallback(on_train_batch_end=lambda b, logs: means.append((b, float(logs["loss"]))))
    model.compile(optimizer=optimizer, loss=loss, **compile_kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BoundGuardWarning)
        model.fit(x, y, epochs=steps // per_epoch, batch_size=batch_size, verbose=0, callbacks=[guard, per_batch],
                  shuffle=True)
    losses, prev = [], 0.0
    for b, m in means:
        losses.append(m if b == 0 else (b + 1) * m - b * prev)
        prev = m
    return Run(guard.alerts, losses, tmp_path / "alerts.jsonl")


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def dense(*layers, inputs: int):
    return keras.Sequential([keras.Input((inputs,)), *layers])


# ============================================================================================ programs
def s_binary_sgd_small_lr(tmp_path):
    """A binary classifier (a linear label on 8 features), sigmoid output, binary_crossentropy and
    plain SGD at lr 1e-2."""
    g = rng(200)
    x = g.standard_normal((2048, 8)).astype("float32")
    y = (x @ g.standard_normal(8) > 0).astype("float32")[:, None]
    model = dense(keras.layers.Dense(16, activation="relu"), keras.layers.Dense(1, activation="sigmoid"), inputs=8)
    run = fit(tmp_path, model, x, y, loss="binary_crossentropy", optimizer=keras.optimizers.SGD(1e-2), steps=1280)
    return slow_then_learnt(run), {"activation": "sigmoid", "loss": "binary_crossentropy"}


def s_xor_sgd(tmp_path):
    """The XOR tutorial: the four points (tiled), a 2-4-1 net with sigmoid units, SGD."""
    x = np.tile(np.array([[0, 0], [0, 1], [1, 0], [1, 1]], "float32"), (512, 1))
    y = np.tile(np.array([[0], [1], [1], [0]], "float32"), (512, 1))
    model = dense(keras.layers.Dense(4, activation="sigmoid"), keras.layers.Dense(1, activation="sigmoid"), inputs=2)
    run = fit(tmp_path, model, x, y, loss="binary_crossentropy", optimizer=keras.optimizers.SGD(0.5), steps=1536,
              batch_size=16)
    return slow_then_learnt(run), {"activation": "sigmoid", "loss": "binary_crossentropy"}


def s_text_embedding_pooling(tmp_path):
    """The Keras text classification tutorial, tiny: Embedding, GlobalAveragePooling1D, a sigmoid unit.
    Documents of 24 words out of 200; a few cue words per document, diluted by the average."""
    g = rng(202)
    n, length = 2048, 24
    y = g.integers(0, 2, n)
    docs = g.integers(20, 200, (n, length))
    docs[:, :3] = g.integers(0, 10, (n, 3)) + 10 * (1 - y)[:, None]  # 0..9 positive, 10..19 negative
    model = keras.Sequential([keras.Input((length,), dtype="int32"), keras.layers.Embedding(200, 16),
                              keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(1, activation="sigmoid")])
    run = fit(tmp_path, model, docs.astype("int32"), y.astype("float32")[:, None], loss="binary_crossentropy",
              optimizer=keras.optimizers.Adam(1e-3), steps=1280)
    return slow_then_learnt(run), {"activation": "sigmoid", "loss": "binary_crossentropy"}


def s_regression_sgd_small_lr(tmp_path):
    """House prices in units of 100k (mean 3, spread 1), a small MLP, MSE and plain SGD at lr 2e-4."""
    g = rng(203)
    x = g.standard_normal((2048, 8)).astype("float32")
    y = (3.0 + x @ (g.standard_normal(8) / np.sqrt(8)) + 0.1 * g.standard_normal(2048)).astype("float32")[:, None]
    model = dense(keras.layers.Dense(16, activation="relu"), keras.layers.Dense(1), inputs=8)
    run = fit(tmp_path, model, x, y, loss="mse", optimizer=keras.optimizers.SGD(2e-4), steps=1024)
    return slow_then_learnt(run), {"activation": "identity", "loss": "mean_squared_error"}


# ============================================================================================ registry
SLOW_STARTERS = [
    pytest.param(s_binary_sgd_small_lr, id="keras-binary-sgd-lr1e-2"),
    pytest.param(s_xor_sgd, id="keras-xor-sigmoid-sgd"),
    pytest.param(s_text_embedding_pooling, id="keras-text-embedding-average-pooling"),
    pytest.param(s_regression_sgd_small_lr, id="keras-regression-sgd-lr2e-4-unscaled-targets"),
]


@pytest.mark.parametrize("program", SLOW_STARTERS)
def test_slow_starter(tmp_path, program):
    run, facts = program(tmp_path)
    judge_slow_starter(run, facts, f"{BACKEND} ")
