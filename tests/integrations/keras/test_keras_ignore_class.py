"""``ignore_class`` of Keras' sparse categorical cross-entropy: target positions at that value (a void label
255 in segmentation data) are left out of the target statistics and rules, as ``ignore_index`` is on torch.

The model labels each of 64 pixels with one of 4 classes (a per-pixel ``Dense`` head: Keras' torch backend
fails on ``ignore_class`` with a 4-D ``Conv2D`` softmax output, whatever the callback)."""
from __future__ import annotations

import functools
import json

import numpy as np
import pytest

from conftest import codes, describe, guard, keras, ops, severe

pytestmark = pytest.mark.filterwarnings("ignore::boundguard.alerts.BoundGuardWarning")

VOID = 255


def segmentation(n: int = 64, void: float = 0.1, seed: int = 0):
    """Images (n, 8, 8, 3) and per-pixel labels (n, 64) in 0..3, a ``void`` share of them 255."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 8, 8, 3)).astype("float32")
    y = (np.argmax(x, axis=-1) + (x[..., 0] > 1.5)).astype("int32").reshape(n, 64)
    y[rng.uniform(size=y.shape) < void] = VOID
    return x, y


def segmenter() -> "keras.Model":
    return keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(8, 3, padding="same", activation="relu"),
                             keras.layers.Reshape((64, 8)), keras.layers.Dense(4, activation="softmax")])


def run(tmp_path, loss, **kw):
    x, y = segmentation()
    model = segmenter()
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=loss)
    g = guard(tmp_path, check_every_n_steps=3, **kw)
    model.fit(x, y, epochs=2, batch_size=16, verbose=0, callbacks=[g])
    rows = [json.loads(line) for line in (tmp_path / "stats.jsonl").read_text().splitlines()]
    return g, rows


def sparse_categorical_crossentropy(y_true, y_pred):
    """Keras' loss with the void pixels masked by hand: it ignores 255 too, but does not say so."""
    labels = ops.cast(y_true, "int32")
    keep = ops.not_equal(labels, VOID)
    loss = keras.losses.sparse_categorical_crossentropy(ops.where(keep, labels, 0), y_pred)
    return loss * ops.cast(keep, loss.dtype)


def test_ignore_class_leaves_the_void_label_out(tmp_path):
    g, rows = run(tmp_path, keras.losses.SparseCategoricalCrossentropy(ignore_class=VOID))
    assert "target_out_of_range" not in codes(g.alerts) and not severe(g.alerts), describe(g.alerts)
    run_record = next(r for r in rows if r.get("type") == "run")
    assert run_record["facts"]["target_ignore"] == VOID
    stats = [r for r in rows if r.get("type") == "stats"]
    assert stats and all(0 <= r["target.min"] and r["target.max"] <= 3 for r in stats), stats[0]


def test_the_same_labels_without_ignore_class_are_out_of_range(tmp_path):
    """The healthy twin: the same void labels, with a loss that does not declare them ignored."""
    g, rows = run(tmp_path, sparse_categorical_crossentropy)
    (alert,) = [a for a in g.alerts if a.code == "target_out_of_range"]
    assert alert.severity == "error" and alert.step == 1 and alert.value == VOID, describe(g.alerts)
    assert next(r for r in rows if r.get("type") == "run")["facts"]["target_ignore"] is None


@pytest.mark.one_backend
@pytest.mark.parametrize("form", ["partial", "wrapper"])
def test_ignore_class_of_the_functional_loss(tmp_path, form):
    """``functools.partial(sparse_categorical_crossentropy, ignore_class=...)`` and a ``LossFunctionWrapper``
    with ``ignore_class`` are read too (reading the compiled loss is Keras-level: one backend)."""
    from keras.src.losses.losses import LossFunctionWrapper

    fn = keras.losses.sparse_categorical_crossentropy
    loss = functools.partial(fn, ignore_class=VOID) if form == "partial" else \
        LossFunctionWrapper(fn, ignore_class=VOID)
    g, rows = run(tmp_path, loss)
    assert "target_out_of_range" not in codes(g.alerts) and not severe(g.alerts), describe(g.alerts)
    assert next(r for r in rows if r.get("type") == "run")["facts"]["target_ignore"] == VOID
