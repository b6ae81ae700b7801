"""The device buffer: one row of statistics per training step, reduced with ``keras.ops`` inside the step.

Layout. A row holds the core's :data:`boundguard.stats.COLUMNS` (declared once in :mod:`boundguard.stats`;
an empty cell holds :attr:`~boundguard.stats.Stat.neutral`) followed by :data:`EXTRA`: the elements seen per
kind (``<kind>.n``), whether the step's loss was recorded (``loss.seen``) and whether its targets were
one-hot rows (``target.onehot``). :meth:`DeviceBuffer.write` (the row writer) computes the statistics of one
step by column name and places them; :meth:`DeviceBuffer.read` is the one device→host transfer of a check.

What the device counts against (bounds, clamp pins, the sigmoid/tanh tail, distribution rows, the target
value the loss ignores) comes from the session's :class:`~boundguard.stats.CountingPlan`, written by the
host only when it changes.

Backends. Where the state lives is one :class:`Strategy` per backend behind :class:`DeviceBuffer`:
TensorFlow and torch assign to callback-owned, non-trainable ``keras.Variable`` s from inside the step
(:class:`TensorFlowStrategy`, :class:`TorchStrategy`). JAX's train step is a pure function of the model's
state and drops writes to any other variable, so :class:`JaxStrategy` gives the same variables to a
:class:`BufferMetric` that the model owns while ``fit`` runs (:meth:`DeviceBuffer.attach`): the step gets
them in ``metrics_variables`` and hands them back updated, and a check lets Keras sync that state back to
the variables before its one read.

Keras internals used here (for the JAX buffer only): ``Layer._metrics`` (the model's own metric list, which
``model.save`` skips) and the JAX trainer's ``jax_state_sync`` (which hands the state of the last step back
to the variables and marks it synced, so the next step takes the variables up again).

No change to training: on TensorFlow the step reads the pre-activation (and a linear prediction) from copies
of the ops that made it, so the statistics do not stop Grappler's fusion of the output layer
(:meth:`Strategy.unshared`; :mod:`.fusion`). torch and JAX need none.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import keras
import numpy as np
from keras import ops

from boundguard.integrations.keras import fusion
from boundguard.stats import CountingPlan
from boundguard.stats import COLUMNS, KINDS, LOSS_COLUMN, fields_of, fold_rows, neutral_row

__all__ = ["DeviceBuffer", "StepTensors", "Wants", "Readout", "Strategy", "TensorFlowStrategy",
           "TorchStrategy", "JaxStrategy", "BufferMetric", "STRATEGIES", "EXTRA", "NAMES", "PROBE_K", "ROW_CAP",
           "LSE_ELEMENTS"]

#: Columns after the core's: elements seen per kind, the step's loss recorded, one-hot targets.
EXTRA: tuple[str, ...] = tuple(f"{k}.n" for k in KINDS) + ("loss.seen", "target.onehot")
#: Every column of a device row, in order.
NAMES: tuple[str, ...] = COLUMNS + EXTRA
_INDEX = {name: i for i, name in enumerate(NAMES)}
_CORE = len(COLUMNS)
_NEUTRAL = np.concatenate([neutral_row(), np.zeros(len(EXTRA))]).astype(np.float32)
#: What the device reads every step, in order (see :func:`_settings_of`).
SETTINGS = ("lo", "hi", "pin_lo", "pin_hi", "tail", "distribution", "ignore")
_S = {name: i for i, name in enumerate(SETTINGS)}
#: At most this many rows of an interval stay on the device (plus one execution's steps); a longer interval
#: moves full blocks to the host (:meth:`DeviceBuffer.spill`).
ROW_CAP = 256
#: Of logits a softmax cross-entropy reads, the logsumexp is read on at most this many elements a step (the
#: first rows), as the torch adapter does: a language model's head costs a bounded read per step.
LSE_ELEMENTS = 1 << 22
#: Elements of z / y_pred kept from a step when the activation must be inferred from data.
PROBE_K = 512
assert all(f"{k}.{f}" in _INDEX for k in KINDS for f in fields_of(k))


@dataclass
class StepTensors:
    """The tensors of one step (any may be None): the prediction (None when the loss consumes logits),
    the output pre-activation, the targets, the (float) inputs, the batch loss."""

    pred: Any = None
    pre: Any = None
    target: Any = None
    input: Any = None
    loss: Any = None


@dataclass(frozen=True)
class Wants:
    """Which optional counts can be non-neutral for this model (decided at trace time)."""

    range: bool = True
    pin: bool = True
    tail: bool = True
    #: the loss ignores a target value (``ignore_class``): targets at the plan's ``target_ignore`` count as 0
    ignore: bool = False
    #: the pre-activation is logits a softmax cross-entropy reads, classes along the last axis: the logsumexp
    #: of its rows is read (``pre.lse``, ``pre.lse_rows``; ``logits_growing``)
    lse: bool = False


@dataclass
class Readout:
    """The rows of one check interval, on the host: the core's columns, the element counts, which steps
    recorded a loss, and the targets' (min, max, one-hot) when targets were seen."""

    rows: np.ndarray
    counts: dict[str, int]
    loss_seen: np.ndarray
    target: Optional[tuple[float, float, bool]]
    #: the per-step losses, when ``rows`` are folded blocks rather than one row per step
    losses: Optional[np.ndarray] = None


def _settings_of(plan: CountingPlan) -> np.ndarray:
    lo = -math.inf if plan.lo is None else plan.lo
    hi = math.inf if plan.hi is None else plan.hi
    pin_lo, pin_hi = plan.pin or (None, None)
    return np.array([lo, hi, math.nan if pin_lo is None else pin_lo, math.nan if pin_hi is None else pin_hi,
                     math.inf if plan.tail is None else plan.tail, 1.0 if plan.distribution else 0.0,
                     math.nan if plan.target_ignore is None else plan.target_ignore], np.float32)


# ------------------------------------------------------------------------------------------ strategies
class Strategy:
    """Where the buffer lives on one backend: rows, a row counter, the settings and the probe."""

    def __init__(self, rows: int) -> None:
        self.rows = rows

    def consts(self) -> dict[str, Any]:
        """Constants for the step (made once; no host→device copy per step)."""
        raise NotImplementedError

    def size(self, flat: Any) -> Any:
        """The number of elements of a flat tensor, as a float32 scalar."""
        raise NotImplementedError

    def store(self, row: Any) -> None:
        """Inside the step: write ``row`` at the row counter and advance it."""
        raise NotImplementedError

    def settings(self) -> Any:
        raise NotImplementedError

    def set_settings(self, values: np.ndarray) -> None:
        raise NotImplementedError

    def read(self) -> np.ndarray:
        """Host: every row (one transfer), then the rows and the counter are reset."""
        raise NotImplementedError

    def peek(self) -> np.ndarray:
        raise NotImplementedError

    def store_probe(self, values: Any) -> None:
        raise NotImplementedError

    def read_probe(self) -> np.ndarray:
        raise NotImplementedError

    def reset(self) -> None:
        """Host: neutral rows and the row counter at 0 (a new fit)."""
        raise NotImplementedError

    def host_side(self, fn: Callable, model: Any) -> Callable:
        """``fn`` as the step should call it (a backend may run it outside a compiled graph)."""
        return fn

    def unshared(self, *ts: Any) -> tuple:
        """Inside the step: ``ts`` as the statistics should read them so that reading them does not change
        how the backend compiles the training computation (the same tensors, but see TensorFlow's)."""
        return ts

    def attach(self, model: Any) -> None:
        """Before the step is traced: make the state reachable from ``model``'s train step (if it must be)."""

    def detach(self) -> None:
        """After ``fit`` (or when the callback switches off): undo :meth:`attach`."""


class VariableStrategy(Strategy):
    """State in non-trainable ``keras.Variable`` s that the step assigns to (TensorFlow, torch)."""

    def __init__(self, rows: int) -> None:
        super().__init__(rows)
        init = np.tile(_NEUTRAL, (rows, 1))

        def var(value: np.ndarray, dtype: str, name: str) -> Any:
            return keras.Variable(value, trainable=False, dtype=dtype, autocast=False, name=name)

        self.buf = var(init, "float32", "boundguard_rows")
        self.counter = var(np.zeros((), np.int32), "int32", "boundguard_row")
        self.settings_var = var(_settings_of(CountingPlan()), "float32", "boundguard_settings")
        self.probe = var(np.full((2, PROBE_K), np.nan, np.float32), "float32", "boundguard_probe")
        self._host = {"nan": np.float32(np.nan), "zero": np.float32(0.0), "one": np.float32(1.0),
                      "ninf": np.float32(-np.inf), "last": np.int32(rows - 1), "zero_i": np.int32(0),
                      "nan_k": np.full(PROBE_K, np.nan, np.float32), "arange": np.arange(rows, dtype=np.int32)}
        self._host.update({f"neutral{i}": np.float32(v) for i, v in enumerate(_NEUTRAL)})
        self._device = {k: ops.convert_to_tensor(v) for k, v in self._host.items()}
        self._neutral_rows = ops.convert_to_tensor(init)

    def consts(self) -> dict[str, Any]:
        return self._device

    def store(self, row: Any) -> None:
        c = self.consts()
        idx = ops.minimum(self.counter.value, c["last"])
        mask = ops.expand_dims(ops.equal(c["arange"], idx), 1)
        self.buf.assign(ops.where(mask, ops.expand_dims(row, 0), self.buf.value))
        self.counter.assign(self.counter.value + 1)

    def settings(self) -> Any:
        return self.settings_var.value

    def set_settings(self, values: np.ndarray) -> None:
        self.settings_var.assign(values)

    def read(self) -> np.ndarray:
        rows = self.peek()
        self.reset()
        return rows

    def peek(self) -> np.ndarray:
        return np.asarray(ops.convert_to_numpy(self.buf.value), dtype=np.float64)

    def reset(self) -> None:
        self.buf.assign(self._neutral_rows)
        self.counter.assign(self._device["zero_i"])

    def store_probe(self, values: Any) -> None:
        self.probe.assign(values)

    def read_probe(self) -> np.ndarray:
        return np.asarray(ops.convert_to_numpy(self.probe.value), dtype=np.float64)


class TensorFlowStrategy(VariableStrategy):
    """TensorFlow, graph or eager: a traced step gets the constants as graph constants."""

    def consts(self) -> dict[str, Any]:
        import tensorflow as tf

        if not tf.executing_eagerly():
            return {k: tf.constant(v) for k, v in self._host.items()}
        return self._device

    def size(self, flat: Any) -> Any:
        return ops.cast(ops.size(flat), "float32")

    def unshared(self, *ts: Any) -> tuple:
        """In a traced step, a tensor made by a contraction and the adds after it is read from copies of
        those ops, so the plain step compiles as without the statistics (:func:`.fusion.unshared`)."""
        return fusion.unshared(ts, self.counter)


class TorchStrategy(VariableStrategy):
    """torch, eager or ``jit_compile=True`` (``torch.compile``)."""

    def size(self, flat: Any) -> Any:
        return ops.sum(ops.ones_like(flat))  # no Python number → device tensor (a host round-trip)

    def host_side(self, fn: Callable, model: Any) -> Callable:
        """Under ``torch.compile`` the callback's side effects (remembering tensors, writing the row) would
        recompile the graph at every step; run eagerly they cost one graph break each instead."""
        if getattr(model, "jit_compile", False):
            import torch

            return torch.compiler.disable(fn)
        return fn


class BufferMetric(keras.metrics.Metric):
    """The JAX buffer's variables as a ``keras.metrics.Metric``, so the stateless train step carries them.

    It reports nothing (``result`` is an empty dict: no key in ``logs`` / ``History``) and ignores Keras'
    metric resets (at each epoch and ``evaluate``: rows not checked yet are kept until the next check)."""

    def __init__(self, strategy: "JaxStrategy") -> None:
        super().__init__(name="boundguard_buffer", dtype="float32")
        self.buf, self.counter = strategy.buf, strategy.counter  # tracked as the metric's variables
        self.settings_var, self.probe = strategy.settings_var, strategy.probe

    def update_state(self, *args: Any, **kwargs: Any) -> None:
        return None

    def reset_state(self) -> None:
        return None

    def result(self) -> dict:
        return {}


class JaxStrategy(VariableStrategy):
    """JAX: the variables belong to a :class:`BufferMetric` that :meth:`attach` adds to the model's own
    metrics for the duration of ``fit``. Keras' JAX trainer passes every metric variable into the stateless
    step (``metrics_variables``); inside, ``assign`` writes into the step's ``StatelessScope`` and the step
    returns the new values, which Keras threads to the next step without a host read. The latest values
    live in the trainer's ``_jax_state``; a host access (only at a check) first calls Keras' own
    ``jax_state_sync`` (device arrays handed back to the variables, no transfer), then reads or assigns,
    and the next step takes the variables up again (Keras re-reads its state after a callback synced it)."""

    def __init__(self, rows: int) -> None:
        super().__init__(rows)
        self.model: Any = None
        self.metric = BufferMetric(self)

    def size(self, flat: Any) -> Any:
        return ops.cast(ops.size(flat), "float32")

    def attach(self, model: Any) -> None:
        self.detach()
        metrics = model._metrics
        _sync(model)  # before the list of metric variables changes
        for m in [m for m in metrics if isinstance(m, BufferMetric)]:
            metrics.remove(m)  # left by a run that ended in an exception
        metrics.append(self.metric)
        self.model = model

    def detach(self) -> None:
        model, self.model = self.model, None
        if model is None:
            return
        _sync(model)  # the step's latest values back in the variables (Keras re-reads them next step)
        metrics = model._metrics
        while self.metric in metrics:
            metrics.remove(self.metric)

    def _pull(self) -> None:
        if self.model is not None:
            _sync(self.model)

    def set_settings(self, values: np.ndarray) -> None:
        self._pull()
        self.settings_var.assign(values)

    def peek(self) -> np.ndarray:
        self._pull()
        return super().peek()

    def reset(self) -> None:
        # fresh host values: the step donates its state, so a device constant assigned here would be
        # deleted by the first step after it
        self._pull()
        self.buf.assign(np.tile(_NEUTRAL, (self.rows, 1)))
        self.counter.assign(np.zeros((), np.int32))

    def read_probe(self) -> np.ndarray:
        self._pull()
        return super().read_probe()


def _sync(model: Any) -> None:
    """The JAX trainer's state of the last step back into the model's variables (a no-op outside ``fit``)."""
    sync = getattr(model, "jax_state_sync", None)
    if sync is not None:
        sync()


#: The strategy for each supported backend.
STRATEGIES: dict[str, type[Strategy]] = {"tensorflow": TensorFlowStrategy, "torch": TorchStrategy,
                                         "jax": JaxStrategy}


# ------------------------------------------------------------------------------------------ the buffer
class DeviceBuffer:
    """``rows`` rows of :data:`NAMES` columns on the device, written once per training step."""

    def __init__(self, rows: int, backend: Optional[str] = None) -> None:
        backend = backend or keras.backend.backend()
        if backend not in STRATEGIES:
            raise ValueError(f"no device buffer strategy for the {backend!r} backend; "
                             f"supported: {sorted(STRATEGIES)}")
        self.strategy: Strategy = STRATEGIES[backend](rows)
        self._plan: Optional[CountingPlan] = None
        self._carry: list[Readout] = []  # blocks of this interval already moved to the host (see spill)

    @staticmethod
    def supports(backend: str) -> bool:
        return backend in STRATEGIES

    @property
    def rows(self) -> int:
        return self.strategy.rows

    def apply(self, plan: CountingPlan) -> None:
        """Count against ``plan`` from the next step (host side; written only when it changes)."""
        if plan != self._plan:
            self.strategy.set_settings(_settings_of(plan))
            self._plan = plan

    # -------------------------------------------------------------- host side
    def read(self, steps: int) -> Readout:
        """The one device→host transfer of a check: the first ``steps`` rows (the steps since the last
        :meth:`spill`), with the spilled blocks of the interval in front; resets the buffer."""
        r = self._read(steps)
        carry, self._carry = self._carry, []
        if not carry:
            return r
        parts = carry + [r]
        losses = np.concatenate([p.losses if p.losses is not None else p.rows[:, LOSS_COLUMN] for p in parts])
        seen = np.concatenate([p.loss_seen for p in parts])
        rows = np.stack([fold_rows(p.rows) for p in parts])
        counts = {k: sum(p.counts[k] for p in parts) for k in KINDS}
        ts = [p.target for p in parts if p.target is not None]
        target = (min(t[0] for t in ts), max(t[1] for t in ts), all(t[2] for t in ts)) if ts else None
        return Readout(rows, counts, seen, target, losses)

    def spill(self, steps: int) -> None:
        """Move the first ``steps`` rows to the host (one transfer), folded into one row with their
        per-step losses kept, and reset the device rows: an interval longer than the buffer (a
        ``check_every_n_steps`` above :data:`ROW_CAP`) costs one transfer per block instead of a buffer
        and a per-step write that grow with it."""
        r = self._read(steps)
        self._carry.append(Readout(fold_rows(r.rows)[None], r.counts, r.loss_seen, r.target,
                                   r.rows[:, LOSS_COLUMN].copy()))

    def _read(self, steps: int) -> Readout:
        full = self.strategy.read()
        rows = full[: max(1, min(int(steps), full.shape[0]))]
        counts = {k: int(round(float(rows[:, _INDEX[f"{k}.n"]].sum()))) for k in KINDS}
        target = None
        if counts["target"]:
            has = rows[:, _INDEX["target.n"]] > 0
            target = (float(np.min(rows[has, _INDEX["target.min"]])), float(np.max(rows[has, _INDEX["target.max"]])),
                      bool(np.all(rows[has, _INDEX["target.onehot"]] > 0)))
        return Readout(rows[:, :_CORE].copy(), counts, rows[:, _INDEX["loss.seen"]] > 0, target)

    def peek(self) -> np.ndarray:
        """Every row as it is now (no reset; for tests and debugging)."""
        return self.strategy.peek()

    def attach(self, model: Any) -> None:
        """Before the step is traced: let ``model``'s train step reach the buffer (JAX; else nothing)."""
        self.strategy.attach(model)

    def detach(self) -> None:
        self.strategy.detach()

    def reset(self) -> None:
        self.strategy.reset()
        self._carry = []

    def unshared(self, *ts: Any) -> tuple:
        """Inside the step: ``ts`` (None allowed) as the statistics should read them (see
        :meth:`Strategy.unshared`)."""
        return self.strategy.unshared(*ts)

    def probe_values(self) -> np.ndarray:
        """``(2, PROBE_K)``: the flattened z and y_pred rows kept by :meth:`store_probe`."""
        return self.strategy.read_probe()

    # -------------------------------------------------------------- inside the step
    def write(self, t: StepTensors, wants: Wants) -> None:
        """The row writer: reduce one step's tensors and store the row (inside the step)."""
        st = self.strategy
        c = st.consts()
        s = ops.unstack(st.settings())
        vals: dict[str, Any] = {}
        if t.pred is not None and _nonempty(t.pred):
            vals.update(self._pred(t.pred, s, c, wants))
        if t.pre is not None and _nonempty(t.pre):
            f = _flat(t.pre)
            vals.update(self._basic("pre", f))
            vals["pre.sumsq"] = ops.sum(ops.multiply(f, f))
            if wants.tail:
                vals["pre.tail"] = _count(ops.greater(ops.abs(f), s[_S["tail"]]))
            if wants.lse:
                vals.update(self._lse(t.pre))
        if t.target is not None and _nonempty(t.target):
            vals.update(self._target(t.target, c, s[_S["ignore"]] if wants.ignore else None))
        if t.input is not None and _nonempty(t.input):
            f = _flat(t.input)
            vals.update(self._basic("input", f))
            vals["input.sumsq"] = ops.sum(ops.multiply(f, f))
        if t.loss is not None:
            loss = _f32(t.loss)
            vals["loss.value"] = ops.mean(loss) if len(loss.shape) > 0 else loss
            vals["loss.seen"] = c["one"]
        st.store(ops.stack([vals[name] if name in vals else c[f"neutral{i}"] for i, name in enumerate(NAMES)]))

    def _basic(self, kind: str, f: Any) -> dict[str, Any]:
        # min/max propagate NaN on both backends (tf.reduce_min/max, torch.amin/amax): a NaN anywhere in
        # the step shows as NaN, as the statistics declare (tested in test_keras_catalogue)
        return {f"{kind}.min": ops.min(f), f"{kind}.max": ops.max(f), f"{kind}.finite": _count(ops.isfinite(f)),
                f"{kind}.n": self.strategy.size(f)}

    def _lse(self, z: Any) -> dict[str, Any]:
        """The logsumexp of the rows of logits ``z`` along its last axis (the classes), summed, and how many
        rows: on the first rows only, at most :data:`LSE_ELEMENTS` elements a step, sliced before the fp32
        copy (a language model's logits: a sample of the batch, at a bounded cost and extra memory whatever
        the vocabulary and the batch). Empty when the class axis has no static width above 1."""
        width = z.shape[-1] if len(z.shape) >= 2 else None
        if not isinstance(width, int) or width < 2:
            return {}
        rows = ops.reshape(ops.stop_gradient(z), (-1, width))[: max(1, LSE_ELEMENTS // width)]
        lse = ops.logsumexp(ops.cast(rows, "float32"), axis=-1)
        return {"pre.lse": ops.sum(lse), "pre.lse_rows": self.strategy.size(lse)}

    def _pred(self, pred: Any, s: list, c: dict, wants: Wants) -> dict[str, Any]:
        p = _f32(pred)
        f = ops.reshape(p, (-1,))
        v = self._basic("pred", f)
        if wants.range:
            v["pred.below"] = _count(ops.less(f, s[_S["lo"]]))
            v["pred.above"] = _count(ops.greater(f, s[_S["hi"]]))
            if len(p.shape) >= 2 and p.shape[-1] != 1:
                err = ops.max(ops.abs(ops.subtract(ops.sum(p, axis=-1), c["one"])))
                v["pred.rowsum_err"] = ops.where(ops.greater(s[_S["distribution"]], c["zero"]), err, c["ninf"])
        if wants.pin:
            v["pred.pinned"] = _count(ops.logical_or(ops.equal(f, s[_S["pin_lo"]]), ops.equal(f, s[_S["pin_hi"]])))
        return v

    def _target(self, target: Any, c: dict, ignore: Any = None) -> dict[str, Any]:
        t = _f32(target)
        if ignore is not None:  # the loss ignores these positions (ignore_class): class 0 instead, as on torch
            t = ops.where(ops.equal(t, ignore), c["zero"], t)
        f = ops.reshape(t, (-1,))
        v = self._basic("target", f)
        v["target.nonbinary"] = _count(ops.not_equal(ops.multiply(f, ops.subtract(c["one"], f)), c["zero"]))
        v["target.sum"] = ops.sum(f)
        v["target.sumsq"] = ops.sum(ops.multiply(f, f))
        if len(t.shape) >= 2 and t.shape[-1] is not None and t.shape[-1] > 1:
            binary = ops.all(ops.logical_or(ops.equal(t, c["zero"]), ops.equal(t, c["one"])))
            rows1 = ops.all(ops.equal(ops.sum(t, axis=-1), c["one"]))
            v["target.onehot"] = ops.cast(ops.logical_and(binary, rows1), "float32")
        return v

    def store_probe(self, z: Any, p: Any) -> Optional[tuple]:
        """Keep a few rows of z and y_pred (to infer an activation applied outside any layer, read at the
        first check). Returns the shape kept, or None when z and y_pred do not line up."""
        zs, ps = tuple(z.shape[1:]), tuple(p.shape[1:])
        if zs != ps or any(d is None for d in zs):
            return None
        per = int(np.prod(zs)) if zs else 1
        if per > PROBE_K:
            return None
        m = PROBE_K // per
        k = self.strategy.consts()["nan_k"]
        out = [ops.concatenate([ops.reshape(_f32(t[:m]), (-1,)), k], axis=0)[:PROBE_K] for t in (z, p)]
        self.strategy.store_probe(ops.stack(out))
        return (m,) + zs


def _nonempty(t: Any) -> bool:
    """False only when the size is known to be zero (a dynamic size in a traced step counts as non-empty)."""
    try:
        shape = tuple(t.shape)
    except Exception:
        return True
    return not any(d == 0 for d in shape if d is not None)


def _f32(t: Any) -> Any:
    return ops.cast(ops.stop_gradient(t), "float32")


def _flat(t: Any) -> Any:
    return ops.reshape(_f32(t), (-1,))


def _count(mask: Any) -> Any:
    return ops.sum(ops.cast(mask, "float32"))
