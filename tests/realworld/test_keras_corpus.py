"""The Keras part of the real-world corpus (see test_torch_corpus.py for the rules of the corpus).

Keras fixes its backend once per process: run this file once per backend with KERAS_BACKEND set
(tensorflow, torch, jax); it defaults to tensorflow. Every program here is meant to behave the same on
all three.
"""
from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import warnings  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

keras = pytest.importorskip("keras")

from realworld_runs import Run, check_facts, program_is_valid  # noqa: E402

from boundguard import BoundGuardWarning  # noqa: E402
from boundguard.integrations.keras import BoundGuard  # noqa: E402

BACKEND = keras.backend.backend()

pytestmark = [pytest.mark.filterwarnings("ignore::boundguard.alerts.BoundGuardWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.usefixtures("keras_seeded")]  # every program starts from the same seed


def fit(tmp_path, model, x, y, *, loss, epochs: int = 4, batch_size: int = 32, lr: float = 1e-2,
        guard_kw: dict | None = None, **compile_kw) -> Run:
    """``compile`` + ``fit`` as the Keras guides write them, with a History of per-batch losses."""
    kw = dict(check_every_n_steps=5, on_violation="log", strict=True, alerts_path=tmp_path / "alerts.jsonl")
    kw.update(guard_kw or {})
    guard = BoundGuard(**kw)
    losses: list[float] = []
    per_batch = keras.callbacks.LambdaCallback(on_train_batch_end=lambda b, logs: losses.append(float(logs["loss"])))
    model.compile(optimizer=keras.optimizers.Adam(lr), loss=loss, **compile_kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BoundGuardWarning)
        model.fit(x, y, epochs=epochs, batch_size=batch_size, verbose=0, callbacks=[guard, per_batch], shuffle=True)
    # Keras logs the running mean of the epoch's batch losses so far (the first batch of an epoch: its own)
    return Run(guard.alerts, losses, tmp_path / "alerts.jsonl")


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def images(n: int = 192, seed: int = 0):
    """8x8 grey images as read from PNG files: uint8 values 0..255 (as float32), three bar patterns."""
    g = rng(seed)
    y = g.integers(0, 3, n)
    img = 25 * g.random((n, 8, 8, 1))
    pos = g.integers(1, 7, n)
    for i in range(n):
        if y[i] == 0:
            img[i, pos[i], :, 0] = 230
        elif y[i] == 1:
            img[i, :, pos[i], 0] = 230
        else:
            img[i, :, :, 0] += 205 * np.eye(8)
    return np.round(np.clip(img, 0, 255)).astype("float32"), y.astype("int64")


def small_cnn(head_activation=None, rescale: bool = False):
    layers = [keras.Input((8, 8, 1))]
    if rescale:
        layers.append(keras.layers.Rescaling(1.0 / 255))
    # one convolution: on JAX every new kernel shape costs seconds of XLA compilation at build time
    layers += [keras.layers.Conv2D(8, 3, padding="same", activation="relu"), keras.layers.MaxPooling2D(),
               keras.layers.Flatten(), keras.layers.Dense(3, activation=head_activation, name="out")]
    return keras.Sequential(layers)


def came_down(run: Run) -> None:
    """The last epoch's mean loss (what Keras logs at its last batch) is below 0.7 times the first batch's."""
    run.extra["learnt"] = run.losses[-1] < 0.7 * run.losses[0]


# ============================================================================================ healthy
def h_functional_two_heads(tmp_path):
    """A functional model with two heads and a loss dict: a sigmoid 'churn' head and a linear 'spend' head."""
    g = rng(1)
    x = g.standard_normal((256, 6)).astype("float32")
    churn = (x[:, 0] + x[:, 1] > 0).astype("float32")[:, None]
    spend = (2.0 * x[:, 2] - x[:, 3] + 1.0).astype("float32")[:, None]
    inp = keras.Input((6,), name="features")
    h = keras.layers.Dense(16, activation="relu")(inp)
    out_c = keras.layers.Dense(1, activation="sigmoid", name="churn")(h)
    out_s = keras.layers.Dense(1, name="spend")(h)
    model = keras.Model(inp, {"churn": out_c, "spend": out_s})
    run = fit(tmp_path, model, x, {"churn": churn, "spend": spend},
              loss={"churn": "binary_crossentropy", "spend": "mse"})
    came_down(run)
    return run, {"activation": "sigmoid", "loss": "binary_crossentropy"}


def h_normalization_layer_raw_inputs(tmp_path):
    """House prices from raw features (square feet ~1500, rooms ~3, year built ~1990), standardised by an
    adapted Normalization layer as the model's first layer (the Keras regression tutorial)."""
    g = rng(2)
    sqft = g.normal(1500, 400, 256)
    rooms = g.integers(1, 6, 256).astype(float)
    year = g.normal(1990, 15, 256)
    x = np.stack([sqft, rooms, year], 1).astype("float32")
    price = (0.002 * (sqft - 1500) + 0.3 * (rooms - 3) + 0.02 * (year - 1990) + 3.0).astype("float32")[:, None]
    norm = keras.layers.Normalization()
    norm.adapt(x)
    model = keras.Sequential([keras.Input((3,)), norm, keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dense(1, name="price")])
    run = fit(tmp_path, model, x, price, loss="mse")
    came_down(run)
    return run, {"activation": "identity", "loss": "mean_squared_error"}


def h_cnn_with_rescaling(tmp_path):
    """The Keras image tutorial: Rescaling(1/255) as the first layer on 0..255 pixels, softmax head."""
    x, y = images(seed=3)
    run = fit(tmp_path, small_cnn("softmax", rescale=True), x, y, loss="sparse_categorical_crossentropy", epochs=5)
    came_down(run)
    return run, {"activation": "softmax", "loss": "sparse_categorical_crossentropy"}


def h_binary_from_logits(tmp_path):
    g = rng(4)
    x = g.standard_normal((256, 4)).astype("float32")
    y = (x[:, 0] - x[:, 1] > 0).astype("float32")[:, None]
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dense(1, name="logit")])
    run = fit(tmp_path, model, x, y, loss=keras.losses.BinaryCrossentropy(from_logits=True))
    came_down(run)
    return run, {"activation": "identity", "loss": "binary_crossentropy", "family": "logits"}


def h_mixed_bfloat16_classifier(tmp_path):
    """The Keras mixed-precision guide's policy, mixed_bfloat16, on a softmax classifier whose head runs in
    bf16 too: the loss carries bf16 rounding noise every step, and converges to small values."""
    g = rng(5)
    x = g.standard_normal((1024, 16)).astype("float32")
    y = np.digitize(x[:, :2].sum(1), [-1.0, 0.0, 1.0]).astype("int64")
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(64, activation="relu"),
                                  keras.layers.Dense(4, activation="softmax")])
        run = fit(tmp_path, model, x, y, loss="sparse_categorical_crossentropy", epochs=8, lr=3e-3)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    came_down(run)
    return run, {"activation": "softmax", "loss": "sparse_categorical_crossentropy"}


# ============================================================================================ faulty
def f_from_logits_after_sigmoid(tmp_path):
    """SO classic: a sigmoid output layer and BinaryCrossentropy(from_logits=True)."""
    g = rng(6)
    x = g.standard_normal((256, 4)).astype("float32")
    y = (x[:, 0] > 0).astype("float32")[:, None]
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dense(1, activation="sigmoid")])
    return fit(tmp_path, model, x, y, loss=keras.losses.BinaryCrossentropy(from_logits=True), epochs=2)


def f_linear_head_probability_loss(tmp_path):
    """The other from_logits mistake: a linear output and loss='binary_crossentropy' (from_logits=False),
    so Keras clips the raw values into [eps, 1 - eps] and the gradient vanishes outside."""
    g = rng(7)
    x = g.standard_normal((256, 4)).astype("float32")
    y = (x[:, 0] > 0).astype("float32")[:, None]
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(1)])
    return fit(tmp_path, model, x, y, loss="binary_crossentropy", epochs=2)


def f_cnn_unscaled_images(tmp_path):
    """The same CNN without Rescaling: pixels 0..255 go straight into Conv2D."""
    x, y = images(seed=8)
    return fit(tmp_path, small_cnn("softmax"), x, y, loss="sparse_categorical_crossentropy", epochs=2, lr=1e-3)


def f_softmax_on_single_unit(tmp_path):
    """SO classic: Dense(1, activation='softmax') for a binary label: the output is 1.0 for every input."""
    g = rng(9)
    x = g.standard_normal((256, 4)).astype("float32")
    y = (x[:, 0] > 0).astype("float32")[:, None]
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dense(1, activation="softmax")])
    run = fit(tmp_path, model, x, y, loss="binary_crossentropy", epochs=2)
    # whatever the loss does (on TensorFlow Keras computes it from the softmax's logit), every prediction is 1
    run.extra["stuck"] = bool(np.all(keras.ops.convert_to_numpy(model(x)) > 1 - 1e-6))
    return run


# ============================================================================================ registry
def xfail(reason: str):
    return pytest.mark.xfail(strict=True, raises=AssertionError, reason=reason)


HEALTHY = [
    pytest.param(h_functional_two_heads, id="keras-functional-two-heads-loss-dict"),
    pytest.param(h_normalization_layer_raw_inputs, id="keras-normalization-layer-raw-inputs"),
    pytest.param(h_cnn_with_rescaling, id="keras-cnn-rescaling-0-255"),
    pytest.param(h_binary_from_logits, id="keras-binary-from-logits"),
    pytest.param(h_mixed_bfloat16_classifier, id="keras-mixed-bfloat16-classifier"),
]

FAULTY = [
    pytest.param(f_from_logits_after_sigmoid, "activation_loss_mismatch", id="keras-from-logits-after-sigmoid"),
    pytest.param(f_linear_head_probability_loss, "activation_loss_mismatch", id="keras-linear-head-binary-crossentropy"),
    pytest.param(f_cnn_unscaled_images, "inputs_not_scaled", id="keras-cnn-unscaled-images-0-255"),
    pytest.param(f_softmax_on_single_unit, "output_saturated", id="keras-softmax-on-single-unit"),
]


@pytest.mark.parametrize("program", HEALTHY)
def test_healthy_program(tmp_path, program):
    run, facts = program(tmp_path)
    print(BACKEND, run.facts().get("watched"))
    print(run.describe())
    program_is_valid(run, healthy=True)
    if facts:
        check_facts(run, facts)
    assert not run.severe, run.describe()


@pytest.mark.parametrize("program,code", FAULTY)
def test_faulty_program(tmp_path, program, code):
    run = program(tmp_path)
    print(BACKEND, run.facts().get("watched"))
    print(run.describe())
    program_is_valid(run, healthy=False)
    assert code in run.codes, run.describe()
