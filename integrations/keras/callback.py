"""``BoundGuard``: the Keras callback. It measures inside the compiled step and carries out what the core's
:class:`~boundguard.session.Session` decides (cadence, judging, actions, state are the session's)."""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import keras
import numpy as np

from boundguard.config import OPTIONS, Config
from boundguard.integrations.keras.activations import (
    BoundActivation, apply_bounds, logits_view, remove_leftovers, retrace_step, set_activation, softcap_of,
    unwatch_activation, unwrap, watch_activation,
)
from boundguard.integrations.keras.buffer import ROW_CAP, DeviceBuffer, Wants
from boundguard.integrations.keras.graph import (
    Head, attr_of, classify, drop_compute_loss_tap, find_head, flat_layers, activation_attr, layer_name,
    loss_ignore, loss_info, output_index, output_names, tap_compute_loss, units,
)
from boundguard.integrations.keras.probe import Trace, input_scaler, model_facts, notes, pick, resolve_head
from boundguard.model_facts import LossInfo, ModelFacts, classify_loss
from boundguard.monitor import Monitor
from boundguard.stats import TAIL_THRESHOLD
from boundguard.session import Session, SessionViews, guarded
from boundguard.stats import COLUMNS, KINDS, Snapshot, reduce_rows
from boundguard.surgery import BoundRecord, CannotBound

__all__ = ["BoundGuard", "EpochStats"]

#: The options the Keras callback takes (the shared ones, less the torch adapters' input and target keys).
ACCEPTED: tuple[str, ...] = tuple(o for o in OPTIONS if o not in ("input_key", "target_key"))


class BoundGuard(SessionViews, keras.callbacks.Callback):
    """Watch a Keras model's predictions, output pre-activations, targets, inputs and batch loss during ``fit``.

    One line: ``model.fit(x, y, callbacks=[BoundGuard()])``. Statistics are reduced on the device inside
    the compiled train step and judged at the first step and every ``check_every_n_steps`` (and once more
    at the end of ``fit`` for the steps since the last check); alerts carry a code, numbers and a fix.

    Args:
        bounds: ``"auto"`` (infer from targets and loss), ``None`` (no range checks), ``(lo, hi)``,
            a :class:`boundguard.Bounds`, or ``"probability"`` / ``"symmetric"`` / ``"distribution"``.
        on_violation: ``"log"`` | ``"warn"`` | ``"halt"`` | ``"raise"`` | ``"bound"``: what an alert of
            severity warning or above does.
        actions: per-code override of ``on_violation``, e.g. ``{"nonfinite_loss": "halt"}``.
        check_every_n_steps: how often statistics are read back and judged.
        alerts_path: the JSON-lines alerts file (``stats.jsonl`` goes beside it); ``None``:
            ``./boundguard/alerts.jsonl``.
        thresholds: per-code rule thresholds, e.g. ``{"loss_spike": {"factor": 6}}``.
        output_key: which output of a model with several outputs is the prediction, watched with its own
            targets and loss: an output name or an index in Keras' order of the outputs. ``None``: the first
            output. A key that names no output is an info note (and the first output is watched).
        name: names this monitor (recorded in the run record of ``stats.jsonl``).
        strict: re-raise internal errors instead of switching the callback off (for tests).

    Raises:
        TypeError: an unknown option (the message names it, the closest valid one and every valid one), or
            an option of the wrong type.
        ValueError: an option with an invalid value (the message names it, what was expected and what was
            given).

    Keys added to each epoch's ``logs`` (so ``History``, ``CSVLogger`` and ``TensorBoard`` listed after this
    callback record them), from the checks made during the epoch (NaN where a statistic was not seen):

    - ``boundguard/output_min``, ``boundguard/output_max``: the smallest / largest prediction;
    - ``boundguard/out_of_bounds_share``: the share of predictions outside the bounds;
    - ``boundguard/preact_absmax``, ``boundguard/preact_rms``: the output pre-activation's magnitude;
    - ``boundguard/logit_lse_mean``: the mean logsumexp of the logits' rows, for logits a softmax
      cross-entropy reads (``from_logits=True``; on at most 4M elements a step, the first rows);
    - ``boundguard/input_rms``: the input scale; ``boundguard/loss_mean``: the mean batch loss of the
      steps checked; ``boundguard/alerts``: the number of alerts so far.

    Threads: the callback is ``async_safe``, so it leaves Keras' asynchronous dispatch of batch-end hooks
    on (JAX and torch run them on a thread pool, possibly out of order, while the next batch trains). All
    its work (counting steps, reading the device buffer, judging, acting) runs on the training thread:
    in the batch-end hook when Keras calls it there (TensorFlow, or any fit with a callback that is not
    async-safe), else at the next ``on_train_batch_begin`` and at ``on_epoch_end`` (after Keras has waited
    for the pool). A batch-end hook on the pool only records, under a lock, whether the running loss was
    finite (the NaN tripwire's hint). So under asynchronous dispatch the check of step ``n`` runs before
    batch ``n + 1``, and a ``halt`` lets that one batch run before ``fit`` stops.

    Example:
        >>> from boundguard.integrations.keras import BoundGuard
        >>> guard = BoundGuard(bounds=(0, 1), on_violation="bound")
        >>> # model.fit(x, y, callbacks=[guard]); guard.alerts; model.save("m.keras")
        >>> BoundGuard(check_every=10)
        Traceback (most recent call last):
        ...
        TypeError: BoundGuard() got an unknown option 'check_every' (did you mean 'check_every_n_steps'?); valid options: bounds, on_violation, actions, check_every_n_steps, alerts_path, thresholds, output_key, name, strict
    """

    #: Keras keeps dispatching batch-end hooks asynchronously with this callback in the list (see above).
    async_safe = True

    def __init__(self, bounds: Any = "auto", on_violation: str = "warn", actions: Optional[dict] = None,
                 check_every_n_steps: int = 50, alerts_path: Any = None, *, thresholds: Optional[dict] = None,
                 output_key: Union[int, str, None] = None, name: Optional[str] = None,
                 strict: bool = False, **unknown: Any) -> None:
        super().__init__()
        # an unknown keyword: the error names the option, the closest valid one and every valid one
        config = Config.from_options("BoundGuard()", dict(
            bounds=bounds, on_violation=on_violation, actions=actions, check_every_n_steps=check_every_n_steps,
            alerts_path=alerts_path, thresholds=thresholds, output_key=output_key, name=name, strict=strict,
            **unknown), accepted=ACCEPTED)
        self._out: tuple[int, Optional[str]] = (0, None)  # the watched output: its index and name
        self._session = Session(config, adapter=self)
        self._buffer: Optional[DeviceBuffer] = None
        self._wmodel: Any = None
        self._head = Head(static=False)
        self._owner: Any = None  # the layer whose activation is watched (and bounded)
        self._act: tuple[str, dict] = ("unknown", {})  # its activation, as found at install
        self._loss: Optional[LossInfo] = None
        self._loss_name: Optional[str] = None
        self._ignore: Optional[float] = None  # the target value the loss ignores (ignore_class)
        self._logits = False
        self._trace = Trace()
        self._facts_ready = False
        self._installed = False
        self._in_loss = False
        self._wrapped: list[tuple[Any, Any]] = []
        self._restore_loss: Optional[Callable[[], None]] = None
        self._stash: dict[int, tuple] = {}
        self._stash_order = 0
        self._epoch: Optional[int] = None
        self._last_batch = -1
        self._epoch_stats = EpochStats()
        self._log_keys: set[str] = set()
        self._block = ROW_CAP  # device rows of an interval before a spill (set per fit)
        self._spilled = 0  # steps of this interval already moved to the host
        self._trip_armed = True
        self._logs_finite = True  # the running loss Keras reported last
        self._last_begin = -1  # the batch of this epoch whose on_train_batch_begin came last
        self._train_thread: Optional[int] = None  # the thread fit() runs on (set at on_train_begin)
        self._lock = threading.Lock()  # guards _reported, the one field Keras' callback thread writes
        self._reported = _Reported()

    # -------------------------------------------------------------- read-only views
    @property
    def monitor(self) -> Monitor:
        return self._session.monitor

    @property
    def step(self) -> int:
        """Training batches seen so far."""
        return self._session.step

    @property
    def last_snapshot(self) -> Optional[Snapshot]:
        return self._session.last_snapshot

    def state_dict(self) -> dict[str, Any]:
        return self._session.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        records = self._session.load_state_dict(state)
        self._facts_ready = False
        if self._wmodel is not None and records:
            apply_bounds(self._wmodel, records)

    def close(self) -> None:
        """Remove the wrappers and close the files now (``fit`` does this itself at its end)."""
        self._session.close()

    # -------------------------------------------------------------- hooks
    @guarded
    def on_train_begin(self, logs: Optional[dict] = None) -> None:
        s, model = self._session, self.model
        self._wmodel = model
        self._train_thread = threading.get_ident()
        with self._lock:
            self._reported = _Reported()
        s.open()
        s.begin_fit()  # a new fit: a halt of an earlier one does not carry over
        backend = keras.backend.backend()
        if not DeviceBuffer.supports(backend):
            s.refuse(f"boundguard's Keras callback supports the tensorflow, torch and jax backends, not "
                     f"{backend!r}: training goes on unmonitored.")
            return
        if s.records:
            apply_bounds(model, s.records, retrace=False)
        self._install(model)

    @guarded
    def on_epoch_begin(self, epoch: int, logs: Optional[dict] = None) -> None:
        self._epoch = int(epoch)
        self._last_batch = self._last_begin = -1
        self._epoch_stats = EpochStats()
        with self._lock:  # (Keras waited for its callback thread at the end of the last epoch)
            self._reported = _Reported()

    @guarded
    def on_train_batch_begin(self, batch: int, logs: Optional[dict] = None) -> None:
        """Training thread. When the batch-end hooks of the batches before this one ran on Keras' callback
        thread (asynchronous dispatch), their steps are counted, checked and acted on here."""
        if not self._installed:
            return
        batch = int(batch)
        if batch - 1 > self._last_batch:
            self._advance(batch - 1, self._reported_trip)
        self._last_begin = batch

    def on_train_batch_end(self, batch: int, logs: Optional[dict] = None) -> None:
        if threading.get_ident() != self._train_thread:  # Keras' callback thread: record only
            self._report(batch, logs)
            return
        self._batch_end(batch, logs)

    @guarded
    def _batch_end(self, batch: int, logs: Optional[dict]) -> None:
        """The batch-end hook on the training thread (Keras dispatches it synchronously)."""
        if not self._installed:
            return
        self._advance(self._clamp(int(batch)), lambda: self._tripped(logs))

    def _clamp(self, batch: int) -> int:
        steps = (self.params or {}).get("steps")
        if isinstance(steps, int) and steps > 0:
            batch = min(batch, steps - 1)  # Keras reports a full last execution with steps_per_execution > 1
        return batch

    def _advance(self, batch: int, tripped: Callable[[], bool]) -> None:
        """Training thread: count the steps of this epoch up to batch index ``batch``; check when a check is
        due or ``tripped()`` (the NaN tripwire) says so, else move full blocks of rows to the host."""
        done, self._last_batch = batch - self._last_batch, batch
        s = self._session
        if s.count_steps(done, self._epoch) or tripped():
            self._check()
            return
        buffered = s.step - s.interval_start + 1 - self._spilled
        if buffered >= self._block:  # the next execution could overrun the device rows
            self._buf.spill(buffered)
            self._spilled += buffered

    def _catch_up(self) -> None:
        """Training thread, once Keras has waited for its callback thread (epoch end, end of fit): count the
        batches whose batch-end hooks ran there and were not counted at a later batch's begin."""
        if self._installed and self._last_begin > self._last_batch:
            spe = getattr(self.model, "steps_per_execution", 1)
            spe = spe if isinstance(spe, int) and spe > 0 else 1
            self._advance(self._clamp(self._last_begin + spe - 1), self._reported_trip)

    def _report(self, batch: Any, logs: Optional[dict]) -> None:
        """Keras' callback thread (asynchronous dispatch): record whether the running loss Keras converted
        there is finite, and nothing else. The hooks may run out of order, so the record keeps the first
        batch with a non-finite loss and the finiteness of the latest batch. Never raises: a lost record
        only delays a NaN to the next scheduled check."""
        try:
            b = int(batch)
            loss = logs.get("loss") if isinstance(logs, dict) else None
            finite = not isinstance(loss, (int, float)) or math.isfinite(loss)
            with self._lock:
                r = self._reported
                if b >= r.batch:
                    r.batch, r.finite = b, finite
                if not finite and (r.nonfinite_at is None or b < r.nonfinite_at):
                    r.nonfinite_at = b
        except Exception:
            pass

    def _reported_trip(self) -> bool:
        """The NaN tripwire under asynchronous dispatch: a batch-end hook on Keras' callback thread saw a
        non-finite running loss. Which step that is known by depends on timing (the callback thread
        converts the logs while the next batches train), so the check comes at a batch boundary after the
        NaN step, before the next scheduled check."""
        with self._lock:
            nonfinite, self._logs_finite = self._reported.nonfinite_at is not None, self._reported.finite
        if not self._trip_armed or not nonfinite:
            return False
        self._trip_armed = False
        return True

    def _tripped(self, logs: Optional[dict]) -> bool:
        """The NaN tripwire: Keras hands every batch-end hook the epoch's running loss as a host number
        (it converts the logs itself for any callback with a batch-end hook), and once a step's loss is
        NaN/Inf that mean is too, so a non-finite loss is checked at the step it appears, not at the next
        interval. Once per run of non-finite steps: a check that finds none re-arms it, once the running
        loss is finite again (a new epoch: the mean of a NaN step stays NaN to the epoch's end)."""
        loss = (logs or {}).get("loss")
        self._logs_finite = not isinstance(loss, (int, float)) or math.isfinite(loss)
        if not self._trip_armed or self._logs_finite:
            return False
        self._trip_armed = False
        return True

    @guarded
    def on_epoch_end(self, epoch: int, logs: Optional[dict] = None) -> None:
        self._catch_up()  # (Keras waited for its callback thread before calling this)
        if logs is None or not self._installed:
            return
        metrics = self._epoch_stats.metrics()
        metrics["boundguard/alerts"] = float(len(self._session.monitor.alerts))
        self._log_keys.update(metrics)
        logs.update({k: metrics.get(k, math.nan) for k in sorted(self._log_keys)})  # same keys every epoch

    def on_train_end(self, logs: Optional[dict] = None) -> None:
        try:
            self._final_check()
        finally:
            try:
                self._session.close()
            finally:
                if self._buffer is not None:  # (switched off inside a step, it stayed attached until now)
                    self._buffer.detach()

    @guarded
    def _final_check(self) -> None:
        """The steps since the last check are judged at the end of ``fit`` (a NaN in the last batches too)."""
        self._catch_up()
        s = self._session
        if self._installed and s.step >= s.interval_start:
            self._check()

    # -------------------------------------------------------------- install / release (adapter interface)
    def _install(self, model: Any) -> None:
        remove_leftovers(model)
        drop_compute_loss_tap(model)
        key, names = self._session.config.output_key, output_names(model)
        index = output_index(model, key)
        if index is None:
            self._session.note("output", f"output_key={key!r} names none of the model's outputs {names}; the "
                               "first output is watched.", "Pass output_key= as an output's name or index.")
            index = 0
        self._out = (index, names[index] if index < len(names) else None)
        self._loss_name, from_logits = loss_info(model, index)
        self._loss = classify_loss(self._loss_name, from_logits)
        self._ignore = loss_ignore(model, index)
        self._logits = bool(self._loss and self._loss.link_applied)
        head = self._head = find_head(model, index=index)
        self._owner = head.owner if head.static else None
        self._trace, self._facts_ready = Trace(), False
        self._trace.watched_output = repr(self._out[1]) if self._out[1] is not None else f"output {index}"
        self._setup_buffer(model)
        self._buf.attach(model)  # JAX: the stateless step carries the buffer as model state
        replicas = _replicas(model)
        if replicas > 1:
            self._session.note("replicas", f"tf.distribute runs {replicas} replicas of the model in this process; "
                               "boundguard watches one replica's share of each batch (the loss Keras reports is "
                               "every replica's).", "Nothing to change. (keras.distribution.DataParallel on JAX "
                               "is watched across all its devices.)")
        layers = [head.owner] if head.owner is not None else []
        if not head.static:
            layers = [layer for layer in flat_layers(model) if activation_attr(layer) is not None]
        self._act = ("unknown", {})
        if head.static and head.owner is not None:
            try:
                self._act = classify([logits_view(unwrap(head.owner.activation))] + list(head.trailing),
                                     units(model, head.owner))
            except Exception:
                pass
        host_side = self._buf.strategy.host_side  # e.g. outside the graph under torch.compile
        seen = host_side(self._seen_activation, model)
        self._wrapped = [(layer, watch_activation(layer, seen)) for layer in layers]
        self._restore_loss = tap_compute_loss(model, host_side(self._loss_hook, model))
        self._installed = True
        self._sync_plan()
        model.make_train_function(force=True)

    @property
    def _buf(self) -> DeviceBuffer:
        if self._buffer is None:  # an internal invariant: hooks run only after _setup_buffer
            raise RuntimeError("boundguard: the device buffer is not set up")
        return self._buffer

    def _setup_buffer(self, model: Any) -> None:
        spe = getattr(model, "steps_per_execution", 1)
        self._block = min(self._session.config.check_every_n_steps, ROW_CAP)
        self._spilled = 0
        rows = self._block + (spe if isinstance(spe, int) and spe > 0 else 1)
        if self._buffer is not None and self._buffer.rows == rows:
            self._buffer.reset()
        else:
            self._buffer = DeviceBuffer(rows)

    def release(self) -> None:
        """Adapter interface: remove the wrappers, restore ``compute_loss`` and drop the traced train
        function (an inserted bound stays)."""
        if not self._installed:
            return
        self._installed = False
        for layer, w in self._wrapped:
            unwatch_activation(layer, w)
        self._wrapped = []
        if self._restore_loss is not None:
            self._restore_loss()
            self._restore_loss = None
        self._stash.clear()
        if self._wmodel is not None and not self._in_loss:
            # (inside the step an internal error switched us off: the step being traced wrote nothing, and
            # the restored attributes make every later step plain; a JAX buffer stays attached, unwritten,
            # until on_train_end: the step being traced already carries it)
            self._buf.detach()
            self._wmodel.make_train_function(force=True)

    def insert_bound(self, record: BoundRecord) -> BoundRecord:
        """Adapter interface: swap the output activation for :class:`BoundActivation` and retrace."""
        owner, head, model = self._owner, self._head, self._wmodel
        if owner is None or model is None or (head.static and not head.shape_only_after):
            raise CannotBound("on_violation='bound' could not insert a bound: the output activation was not "
                              "located (or is followed by further operations).")
        placed = record.at(layer_name(owner), (), attr=attr_of(model, owner), output=True)
        prev = set_activation(owner, BoundActivation.of(placed))
        try:
            retrace_step(model)
        except Exception as err:
            set_activation(owner, prev)  # the step as traced before: the bound is not in force
            raise CannotBound(f"on_violation='bound' could not insert a bound: retracing the train step failed "
                              f"({type(err).__name__}: {err}).") from err
        return placed

    # -------------------------------------------------------------- inside the step
    @guarded
    def _seen_activation(self, layer: Any, z: Any, p: Any) -> None:
        if self._installed:
            self._stash_order += 1
            self._stash[id(layer)] = (self._stash_order, layer, z, p)

    def _loss_hook(self, x: Any, y: Any, y_pred: Any, loss: Any, training: Any) -> None:
        self._in_loss = True
        try:
            self._after_loss(x, y, y_pred, loss, training)
        finally:
            self._in_loss = False

    @guarded
    def _after_loss(self, x: Any, y: Any, y_pred: Any, loss: Any, training: Any) -> None:
        stash, self._stash = self._stash, {}
        if self._installed and training is not False:
            self._write_row(x, y, y_pred, loss, stash)

    def _write_row(self, x: Any, y: Any, y_pred: Any, loss: Any, stash: dict) -> None:
        head, buf = self._head, self._buf
        tensors, probe = pick(head, stash, x, y, y_pred, loss, self._trace, self._logits, *self._out)
        # read through copies where reading the originals would change how the step compiles (TensorFlow)
        tensors.pred, tensors.pre, probe = buf.unshared(tensors.pred, tensors.pre, probe)
        # statistics that cannot be non-neutral for this model are not computed (decided at trace time;
        # a bound insertion retraces the step)
        act = (self._session.facts.activation if self._facts_ready else self._act[0]) if head.static else None
        wants = Wants(range=self._session.config.bounds is not None, pin=act in (None, "clamp", "unknown"),
                      tail=act is None or act in TAIL_THRESHOLD, ignore=self._ignore is not None,
                      lse=self._reads_logits(tensors.pre, act))
        buf.write(tensors, wants)
        if probe is not None and tensors.pre is not None:
            shape = buf.store_probe(tensors.pre, probe)
            if shape is not None:
                self._trace.probe_shape = shape

    def _reads_logits(self, pre: Any, act: Optional[str]) -> bool:
        """Trace time: ``pre`` is the logits a softmax cross-entropy reads (``SparseCategoricalCrossentropy`` /
        ``CategoricalCrossentropy`` with ``from_logits=True`` on an identity head, or an activation not
        identified), with the classes along its last axis, as wide as the prediction's: their logsumexp is
        read (``logits_growing``)."""
        loss, shape = self._loss, self._trace.pred_shape
        if pre is None or loss is None or not (loss.consumes_logits and loss.multiclass) \
                or act not in (None, "identity", "unknown") or not shape or len(shape) < 2:
            return False
        width = pre.shape[-1] if len(pre.shape) >= 2 else None
        return isinstance(width, int) and width > 1 and width == shape[-1]

    # -------------------------------------------------------------- checks
    def _check(self) -> None:
        s = self._session
        r = self._buf.read(s.step - s.interval_start + 1 - self._spilled)
        self._spilled = 0
        if not self._facts_ready:
            self._finalize_facts()
            for key, message, fix in notes(self._trace, self._owner, self._act[0], r.counts):
                s.note(key, message, fix)
        if r.target is not None:
            s.observe_targets(r.target[0], r.target[1], onehot=r.target[2])
        try:
            s.check(r.rows, r.counts, r.loss_seen, r.losses)
        finally:
            if s.last_snapshot is not None and not s.last_snapshot.has_nonfinite() and self._logs_finite:
                self._trip_armed = True
        self._sync_plan()
        if s.last_snapshot is not None:
            self._epoch_stats.add(s.last_snapshot)
        if s.should_stop:
            self.model.stop_training = True

    def _finalize_facts(self) -> None:
        """At the first check after a trace: the output layer, its activation, and the facts for the core."""
        head = self._head
        self._owner, self._act = resolve_head(head, self._trace, self._act, self._buf.probe_values)
        if not head.static:  # unwrap the layers that turned out not to be the output
            keep = [(layer, w) for layer, w in self._wrapped if layer is self._owner]
            for layer, w in self._wrapped:
                if layer is not self._owner:
                    unwatch_activation(layer, w)
            self._wrapped = keep
        facts = model_facts(head, self._trace, self._owner, self._act, self._loss, self._loss_name)
        facts.input_scaled_by = input_scaler(self.model)
        facts.target_ignore = self._ignore
        if self._owner is not None:  # a soft cap already on the logits (a saved model trained on)
            facts.logit_cap = softcap_of(activation_attr(self._owner))
        model = self.model
        facts.loss_plain = (not isinstance(getattr(model, "loss", None), (dict, list, tuple))
                            and len(getattr(model, "outputs", None) or [None]) == 1 and not model.losses)
        self._session.set_facts(facts)
        self._facts_ready = True

    def _sync_plan(self) -> None:
        """Count against the bounds and activation in force (they change when bounds are inferred or a bound
        is inserted); before the first check, against what install found and the bounds the loss implies."""
        if self._buffer is None or self._session.disabled:
            return
        s = self._session
        if self._facts_ready:
            plan = s.counting_plan()
        else:
            plan = s.counting_plan(provisional_loss=self._loss,
                                   facts=ModelFacts(activation=self._act[0], activation_params=dict(self._act[1]),
                                                    target_ignore=self._ignore))
        self._buffer.apply(plan)


@dataclass
class _Reported:
    """What batch-end hooks on Keras' callback thread saw in this epoch (guarded by ``BoundGuard._lock``):
    the latest batch reported and whether its running loss was finite, and the first batch whose running
    loss was not."""

    batch: int = -1
    finite: bool = True
    nonfinite_at: Optional[int] = None


class EpochStats:
    """The snapshots checked during one epoch, merged by each statistic's reduce op (for the epoch's ``logs``)."""

    def __init__(self) -> None:
        self._snaps: list[Snapshot] = []

    def add(self, snap: Snapshot) -> None:
        self._snaps.append(snap)

    def metrics(self) -> dict[str, float]:
        """``boundguard/<stat>`` over the epoch's checks (empty when nothing was checked)."""
        snaps = self._snaps
        if not snaps:
            return {}
        rows = np.array([[sn.values.get(c, math.nan) for c in COLUMNS] for sn in snaps], dtype=np.float64)
        merged = Snapshot(snaps[-1].step, snaps[0].first_step, snaps[-1].epoch, reduce_rows(rows),
                          {k: sum(sn.counts.get(k, 0) for sn in snaps) for k in KINDS},
                          np.concatenate([sn.losses for sn in snaps]), np.concatenate([sn.loss_steps for sn in snaps]))
        return merged.metrics()


def _replicas(model: Any) -> int:
    """How many replicas a ``tf.distribute`` strategy (MirroredStrategy) runs of ``model`` in this process."""
    strategy = getattr(model, "distribute_strategy", None) if keras.backend.backend() == "tensorflow" else None
    try:
        return int(getattr(strategy, "num_replicas_in_sync", 1) or 1)
    except (TypeError, ValueError):
        return 1
