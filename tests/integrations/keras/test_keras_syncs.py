"""No host round-trips on the hot path: between checks the steps of a run with the callback make exactly the
device↔host reads and transfers that Keras itself makes; at a check the callback adds its one read of the
statistics buffer.

torch: counted at the dispatcher. JAX: counted at every Python entry point that turns a ``jax.Array`` into a
host value (``np.array``/``np.asarray``, ``float``/``int``/``bool``/``item``/``tolist``, ``jax.device_get``),
plus ``jax.device_put`` and host-side ``Variable.assign`` (host→device); on the CPU, JAX's own transfer guard
does not see device→host reads. (TensorFlow runs the step as one graph call; the graph's ops show no reads.)

The count starts before each batch and stops after every batch-end hook, so it covers the train step and all
callback code of that step. Both runs carry the same two counting callbacks, so Keras dispatches its
batch-end hooks the same way in both (synchronously: a batch-end hook of a callback that is not async-safe
turns off Keras' asynchronous callback dispatch)."""
from __future__ import annotations

import collections

import numpy as np
import pytest

from conftest import BACKEND, data, dense, fit, guard, keras

pytestmark = [
    pytest.mark.skipif(BACKEND not in ("torch", "jax"), reason="reads are counted on the torch and JAX backends"),
    pytest.mark.filterwarnings("ignore::boundguard.alerts.BoundGuardWarning"),
]
torch_only = pytest.mark.skipif(BACKEND != "torch", reason="dispatcher-level counting needs the torch backend")

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

if BACKEND == "jax":
    import jax
    from jax._src.array import ArrayImpl
    from keras.src.backend.common.stateless_scope import in_stateless_scope

    class Count:
        """While entered: counts each host read of a ``jax.Array`` (``d2h:<how>``), each ``jax.device_put``
        and each assign of host data to a Keras variable (``h2d:<how>``); an assign of a device array from
        the host (Keras' ``jax_state_sync``) is counted apart (``sync:assign``): it moves no data."""

        active = None  # the Count entered now
        _patched = False

        def __init__(self):
            self.ops = collections.Counter()

        def __enter__(self):
            Count.active = self
            return self

        def __exit__(self, *exc):
            Count.active = None

        @staticmethod
        def _tick(key):
            if Count.active is not None:
                Count.active.ops[key] += 1

        @classmethod
        def install(cls, monkeypatch):
            def counting(name, real, test):
                def f(*a, **k):
                    if test(*a, **k):
                        cls._tick(name)
                    return real(*a, **k)
                return f

            first_is_array = lambda *a, **k: bool(a) and isinstance(a[0], jax.Array)  # noqa: E731
            for name in ("array", "asarray"):
                monkeypatch.setattr(np, name, counting(f"d2h:np.{name}", getattr(np, name), first_is_array))
            for name in ("__float__", "__int__", "__bool__", "__index__", "item", "tolist", "__array__"):
                monkeypatch.setattr(ArrayImpl, name, counting(f"d2h:{name}", getattr(ArrayImpl, name),
                                                              lambda *a, **k: True))
            monkeypatch.setattr(jax, "device_get", counting("d2h:device_get", jax.device_get, lambda *a, **k: True))
            monkeypatch.setattr(jax, "device_put", counting("h2d:device_put", jax.device_put, lambda *a, **k: True))
            var = keras.Variable
            real_assign = var.assign

            def assign(self, value):
                if not in_stateless_scope():  # (inside the step an assign is part of the traced function)
                    # a device array handed back (Keras' state sync) moves no data; host data is a copy
                    cls._tick("sync:assign" if isinstance(value, jax.Array) else "h2d:assign")
                return real_assign(self, value)

            monkeypatch.setattr(var, "assign", assign)


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


@pytest.fixture(autouse=True)
def _counting(monkeypatch):
    if BACKEND == "jax":
        Count.install(monkeypatch)
    yield


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


@torch_only
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


@pytest.mark.skipif(BACKEND != "jax", reason="the JAX counter")
def test_the_jax_counter_sees_a_read_and_a_write_between_checks(tmp_path, monkeypatch):
    """The comparison above is meaningful on JAX: a read of the step's state and a host assign, per step,
    show up (on JAX the callback's step code runs only while tracing, so only host code can read)."""
    from boundguard.integrations.keras import BoundGuard

    real = BoundGuard.on_train_batch_end

    def reading(self, batch, logs=None):
        np.asarray(self.model._jax_state["metrics_variables"][-1])
        keras.Variable(0.0).assign(1.0)
        return real(self, batch, logs)

    monkeypatch.setattr(BoundGuard, "on_train_batch_end", reading)
    base, _ = per_step(tmp_path, lambda: dense(activation="sigmoid"), "binary_crossentropy", "binary", False)
    ours, _ = per_step(tmp_path, lambda: dense(activation="sigmoid"), "binary_crossentropy", "binary", True)
    for b, o in zip(base, ours):
        assert o["d2h:np.asarray"] >= b["d2h:np.asarray"] + 1 and o["h2d:assign"] >= b["h2d:assign"] + 1


@pytest.mark.skipif(BACKEND != "jax", reason="the JAX counter")
def test_one_read_per_check_on_jax(tmp_path):
    """At a check the callback reads the buffer once and writes the reset buffer, its row counter and (when
    they change) the counting settings; between checks nothing."""
    base, _ = per_step(tmp_path, lambda: dense(activation="sigmoid"), "binary_crossentropy", "binary", False)
    ours, _ = per_step(tmp_path, lambda: dense(activation="sigmoid"), "binary_crossentropy", "binary", True)
    extra = {step: o - b for step, (b, o) in enumerate(zip(base, ours), start=1) if o != b}
    assert set(extra) == {1, 5, 10, 15}, extra
    for step, diff in extra.items():
        reads = sum(v for k, v in diff.items() if k.startswith("d2h"))
        writes = sum(v for k, v in diff.items() if k.startswith("h2d"))
        assert reads == 1 and writes <= 3, (step, dict(diff))
