"""Keras' asynchronous dispatch of batch-end hooks stays on with BoundGuard in the callbacks.

On torch and JAX (``backend.IS_THREAD_SAFE``) Keras runs ``on_train_batch_end`` on a thread pool when every
callback is async-safe, so the training thread never waits for a batch's ``logs`` to come to the host. The
callback declares ``async_safe = True``: it only records the running loss's finiteness there and does its
work on the training thread (the next batch's begin, the epoch's end). These tests run on the process's
backend; on TensorFlow Keras dispatches synchronously with or without the callback.
"""
from __future__ import annotations

import json
import random
import threading
import time

import numpy as np
import pytest

from boundguard import BoundGuardError
from boundguard.integrations.keras import BoundGuard

from conftest import ASYNC, LAG, BACKEND, data, dense, describe, fit, guard, keras, severe

pytestmark = pytest.mark.filterwarnings("ignore::boundguard.alerts.BoundGuardWarning")

RANGE = {"output_out_of_range", "missing_output_activation"}


class Neighbour(keras.callbacks.Callback):
    """An async-safe callback with a batch-end hook: records the thread it runs on; with ``jitter`` it
    sleeps a random while first, so hooks of consecutive batches finish out of order on Keras' pool."""

    async_safe = True

    def __init__(self, jitter: float = 0.0):
        super().__init__()
        self.jitter = jitter
        self.threads: set[int] = set()
        self._rng = random.Random(0)

    def on_train_batch_end(self, batch, logs=None):
        self.threads.add(threading.get_ident())
        if self.jitter:
            time.sleep(self._rng.random() * self.jitter)


@pytest.fixture
def async_flags(monkeypatch):
    """``_async_train`` of every CallbackList that ``fit`` builds, in order."""
    from keras.src.callbacks.callback_list import CallbackList

    flags: list[bool] = []
    configure = CallbackList._configure_async_dispatch

    def recording(self, callbacks):
        configure(self, callbacks)
        flags.append(self._async_train)

    monkeypatch.setattr(CallbackList, "_configure_async_dispatch", recording)
    return flags


def test_the_callback_leaves_async_dispatch_as_keras_sets_it(tmp_path, async_flags):
    x, y = data("binary")
    plain = Neighbour()
    fit(dense(activation="sigmoid"), x, y, [plain], epochs=1)
    without = async_flags[-1]
    watched = Neighbour()
    g = guard(tmp_path, bounds=(0, 1), check_every_n_steps=3)
    fit(dense(), x, y, [g, watched], epochs=1)
    assert BoundGuard.async_safe is True
    assert async_flags[-1] == without == ASYNC, (BACKEND, async_flags)
    main = threading.get_ident()
    # under async dispatch the batch-end hooks ran on Keras' pool, not on the training thread
    assert (main not in watched.threads) == ASYNC and (main not in plain.threads) == ASYNC
    assert RANGE <= severe(g.alerts) and g.step == 8, describe(g.alerts)
    assert min(a.step for a in g.alerts if a.code in RANGE) == 1


def test_a_callback_that_is_not_async_safe_makes_the_halt_exact(tmp_path, async_flags):
    """TerminateOnNaN has a batch-end hook and is not async-safe: Keras dispatches synchronously and the
    halt acts at the check's own step on every backend."""
    x, y = data("binary")
    g = guard(tmp_path, bounds=(0, 1), on_violation="halt", check_every_n_steps=10)
    model = dense()
    history = fit(model, x, y, [g, keras.callbacks.TerminateOnNaN()], epochs=5)
    assert async_flags[-1] is False
    assert len(history.history["loss"]) == 1 and int(model.optimizer.iterations.numpy()) == 1
    assert RANGE <= severe(g.alerts) and g.step == 1


def test_halt_on_an_out_of_range_fault(tmp_path):
    x, y = data("binary")
    g = guard(tmp_path, bounds=(0, 1), on_violation="halt", check_every_n_steps=10)
    model = dense()
    history = fit(model, x, y, [g, Neighbour()], epochs=5)
    assert RANGE <= severe(g.alerts), describe(g.alerts)
    assert {a.step for a in g.alerts if a.code in RANGE} == {1}
    assert {a.action for a in g.alerts if a.severity != "info"} == {"halt"}
    # the check of step 1 runs before batch 2 under async dispatch: that batch runs, and is judged at the end
    assert len(history.history["loss"]) == 1 and int(model.optimizer.iterations.numpy()) == 1 + LAG
    assert g.step == 1 + LAG and g.last_snapshot.step == 1 + LAG


def test_raise_on_an_out_of_range_fault_comes_before_the_next_batch(tmp_path):
    x, y = data("binary")
    g = guard(tmp_path, bounds=(0, 1), on_violation="raise", check_every_n_steps=10)
    model = dense()
    with pytest.raises(BoundGuardError) as err:
        fit(model, x, y, [g, Neighbour()], epochs=5)
    assert err.value.alert.code in RANGE and err.value.alert.step == 1
    assert int(model.optimizer.iterations.numpy()) == 1  # raised on the training thread, before batch 2


def test_a_nan_halts_the_run(tmp_path):
    """A NaN input in batch 3 of 8-step epochs, checks every 5 steps: judged at step 3 (the tripwire, where
    Keras dispatches synchronously), else by the check of step 5 at the latest; the run stops there."""
    x, y = data("binary", n=256)
    x = x.copy()
    x[2 * 32 + 5, 1] = np.nan  # batch 3 (no shuffle)
    g = guard(tmp_path, bounds=(0, 1), on_violation="halt", check_every_n_steps=5)
    model = dense(activation="sigmoid")
    history = fit(model, x, y, [g, Neighbour()], epochs=6, shuffle=False)
    steps = {a.code: a.step for a in g.alerts}
    assert {"nonfinite_input", "nonfinite_loss"} <= severe(g.alerts), describe(g.alerts)
    judged = steps["nonfinite_input"]
    assert steps["nonfinite_loss"] == judged and (judged == 3 if not ASYNC else 3 <= judged <= 5), steps
    assert len(history.history["loss"]) == 1
    assert int(model.optimizer.iterations.numpy()) == judged + LAG


def test_out_of_order_hooks_give_the_same_checks_as_synchronous_dispatch(tmp_path, async_flags):
    """Hooks of consecutive batches finishing out of order on Keras' pool change nothing: the checks
    (their steps and statistics) are those of a run whose hooks Keras calls synchronously."""

    def run(sub, neighbour):
        keras.utils.set_random_seed(0)
        x, y = data("binary")
        g = guard(tmp_path / sub, bounds=(0, 1), check_every_n_steps=5)
        fit(dense(activation="sigmoid"), x, y, [g, neighbour], epochs=2)
        rows = [json.loads(line) for line in (tmp_path / sub / "stats.jsonl").read_text().splitlines()]
        return g, [r for r in rows if r.get("type") == "stats"]

    g_async, jittered = run("async", Neighbour(jitter=0.02))
    assert async_flags[-1] == ASYNC
    g_sync, plain = run("sync", keras.callbacks.TerminateOnNaN())
    assert async_flags[-1] is False
    assert [(r["first_step"], r["step"]) for r in jittered] == [(1, 1), (2, 5), (6, 10), (11, 15), (16, 16)]
    assert jittered == plain
    assert g_async.step == g_sync.step == 16 and describe(g_async.alerts) == describe(g_sync.alerts)
