"""No host round-trips on the hot path (torch backend, counted at the dispatcher): between checks the steps of a
run with the callback make exactly the device→host reads and transfers that Keras itself makes; at a check the
callback adds its one read of the statistics buffer.

The dispatch mode is entered before each batch and left after every batch-end hook, so it counts the train step
and all callback code of that step. Both runs carry the same two counting callbacks, so Keras dispatches its
batch-end hooks the same way in both (a batch-end hook turns off Keras' asynchronous callback dispatch)."""
from __future__ import annotations

import collections

import pytest

from conftest import BACKEND, data, dense, fit, guard, keras

pytestmark = [
    pytest.mark.skipif(BACKEND != "torch", reason="dispatcher-level counting needs the torch backend"),
    pytest.mark.filterwarnings("ignore::boundguard.alerts.BoundGuardWarning"),
]

if BACKEND == "torch":
    from torch.utils._python_dispatch import TorchDispatchMode

    #: ops that block on the device (a value or a data-dependent shape comes back to the host)
    SYNC_OPS = {"_local_scalar_dense", "item", "is_nonzero", "equal", "nonzero", "masked_select", "unique",
                "_unique2", "tolist"}

    class Count(TorchDispatchMode):
        """Counts sync ops, ``_to_copy`` calls that name a device (transfers), and tensors made from host data."""

        def __init__(self):
            super().__init__()
            self.ops = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = func.overloadpacket.__name__
            if name in SYNC_OPS:
                self.ops[name] += 1
            if name == "_to_copy" and kwargs.get("device") is not None:
                self.ops["_to_copy(device)"] += 1
            if name == "lift_fresh":  # a tensor built from host data (a host→device copy on an accelerator)
                self.ops["lift_fresh"] += 1
            return func(*args, **kwargs)


class Enter(keras.callbacks.Callback):
    def __init__(self, box):
        super().__init__()
        self.box = box

    def on_train_batch_begin(self, batch, logs=None):
        self.box["mode"] = Count()
        self.box["mode"].__enter__()


class Leave(keras.callbacks.Callback):
    def __init__(self, box):
        super().__init__()
        self.box = box
        self.steps: list[collections.Counter] = []

    def on_train_batch_end(self, batch, logs=None):
        self.box["mode"].__exit__(None, None, None)
        self.steps.append(self.box["mode"].ops)


def per_step(tmp_path, make, loss, kind, with_guard, n=5, **options):
    keras.utils.set_random_seed(0)
    x, y = data(kind, n=16 * 32)
    box: dict = {}
    leave = Leave(box)
    cbs = [Enter(box)]
    g = None
    if with_guard:
        g = guard(tmp_path, check_every_n_steps=n, **options)
        cbs.append(g)
    cbs.append(leave)
    fit(make(), x, y, cbs, loss=loss, epochs=1)
    if g is not None:
        assert not g._session.disabled
    return leave.steps, g


@pytest.mark.parametrize("name,make,loss,kind,options", [
    ("sigmoid-bce", lambda: dense(activation="sigmoid"), "binary_crossentropy", "binary", {}),
    ("softmax-sparse", lambda: dense(3, "softmax"), "sparse_categorical_crossentropy", "classes", {}),
    ("raw-head-alerting", lambda: dense(), "mse", "binary", dict(bounds=(0, 1))),
    ("logits", lambda: dense(), keras.losses.BinaryCrossentropy(from_logits=True), "binary", {}),
])
def test_no_round_trips_between_checks(tmp_path, name, make, loss, kind, options):
    base, _ = per_step(tmp_path, make, loss, kind, with_guard=False)
    ours, g = per_step(tmp_path, make, loss, kind, with_guard=True, **options)
    assert len(base) == len(ours) == 16
    checks = {1, 5, 10, 15}
    for step, (b, o) in enumerate(zip(base, ours), start=1):
        if step in checks:
            continue
        assert o == b, f"step {step}: {dict(o)} with the callback vs {dict(b)} without"
    if options.get("bounds"):
        assert g.alerts, "the alerting twin must really alert at its checks"


def test_the_counter_sees_a_read_in_the_step(tmp_path, monkeypatch):
    """The comparison above is meaningful: one ``float(tensor)`` per step in the callback shows up."""
    from boundguard.integrations.keras import BoundGuard

    real = BoundGuard._write_row

    def reading(self, *a, **k):
        real(self, *a, **k)
        float(self._buffer.strategy.counter.value)

    monkeypatch.setattr(BoundGuard, "_write_row", reading)
    ours, _ = per_step(tmp_path, lambda: dense(activation="sigmoid"), "binary_crossentropy", "binary", True)
    assert all(c["_local_scalar_dense"] == 1 for c in ours)
