"""What every PyTorch adapter shares: the probe at the first step, the statistics hooks, the reducer,
and the bound surgery. The run lifecycle itself (steps, checks, actions, state) is the core's
:class:`boundguard.session.Session`; the engine measures and acts.

The adapter interface an integration drives (Lightning callback, ``watch()``, Fabric, Trainer):

- :meth:`TorchEngine.attach` once per fit, :meth:`TorchEngine.begin_step` before the forward pass
  (``batch`` set to the step's batch), :meth:`TorchEngine.record_loss`,
  :meth:`TorchEngine.record_batch` and :meth:`TorchEngine.record_grads` during the step; at the batch's
  end ``session.count_batch()``, then (if it returns True) :meth:`TorchEngine.end_step` (it judges at
  check steps), then ``session.settle_stop()``; :meth:`TorchEngine.finish` at the end;
- ``engine.session.halted`` after a check for ``halt`` (the same on every rank); ``engine.loss_seen``
  says whether the step's loss was recorded. With several ranks the adapter calls
  ``engine.session.join(any_rank)`` once, before :meth:`TorchEngine.attach`;
- :meth:`TorchEngine.finish_probe` (``None``) judges the first step when no loss was recorded; the
  statistics hook (:class:`~.hooks.StatsHook`) reduces through :meth:`TorchEngine.readable`,
  :meth:`TorchEngine.reduce_outputs` and :meth:`TorchEngine.reduce_failed`.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from boundguard.alerts import Alert
from boundguard.config import Config
from boundguard.integrations.torch.bounding import BoundHook, activation_fn, apply_bounds
from boundguard.integrations.torch.facts import (
    class_dim, device_of, explicit_batch, grad_params, locate_batch, probe_facts, site_name,
)
from boundguard.integrations.torch.hooks import StatsHook, unreadable
from boundguard.integrations.torch.paths import describe_path, flatten, get_path
from boundguard.integrations.torch.probe import Probe, ProbeResult
from boundguard.integrations.torch.reducer import Reducer
from boundguard.model_facts import ModelFacts, classify_loss
from boundguard.monitor import Decision, Monitor
from boundguard.session import Session
from boundguard.stats import CountingPlan
from boundguard.stats import COLUMNS, Snapshot, neutral_row
from boundguard.surgery import BoundRecord, CannotBound

__all__ = ["TorchEngine"]


class TorchEngine:
    """Probe, hooks, reducer and surgery for one torch model, driven by an integration."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.session = Session(config, adapter=self)
        self.model: Optional[nn.Module] = None
        self.reducer: Optional[Reducer] = None
        self.probe: Optional[Probe] = None
        self.probed = False
        self.armed = False
        self.explicit_batch = False  # watch(): inputs/targets are passed to step(), or deliberately not
        self.batch: Any = None  #: the current step's batch, set by the integration before begin_step
        self.loss_seen = False  #: the current step's loss was recorded
        self._batch_recorded = False
        self._hooks: list = []
        self._hooked_bounds = 0
        self._result: Optional[ProbeResult] = None
        self._paused_probe: Optional[Probe] = None  # judged from an autograd hook; its mode is left later
        self._target_path: Optional[tuple] = None
        self._input_path: Optional[tuple] = None
        self._pred_from_pre: Optional[Callable[[Tensor], Tensor]] = None
        self._logits = False
        self._lse_dim: Optional[int] = None  # the class dimension of logits a softmax cross-entropy reads
        self._plan: Optional[CountingPlan] = None
        self._grad_params: list[nn.Parameter] = []  # the output layer's (see record_grads)
        self._unread: set[str] = set()  # the watched tensors that could not be reduced (see _skip)
        self._grads_seen = self._grads_missed = False  # record_grads found the head's gradients / none
        #: a loss scaler (fp16 GradScaler) may overflow a step's gradients on purpose (set by the adapter)
        self.grad_scaled = False

    # ------------------------------------------------------------------ views
    @property
    def monitor(self) -> Monitor:
        return self.session.monitor

    @property
    def step(self) -> int:
        return self.session.step

    @property
    def distributed(self) -> bool:
        """Several ranks train together (the adapter joined the session to them): statistics are merged
        across ranks at each check."""
        return self.session.distributed

    @property
    def disabled(self) -> bool:
        return self.session.disabled

    @property
    def alerts(self) -> list[Alert]:
        return self.session.alerts

    @property
    def bounds_inserted(self) -> list[dict]:
        return self.session.bounds_inserted

    @property
    def last_snapshot(self) -> Optional[Snapshot]:
        return self.session.last_snapshot

    # ------------------------------------------------------------------ lifecycle
    def attach(self, model: nn.Module, alerts_path: Optional[Path] = None, write: bool = True) -> None:
        """Watch ``model`` (once per fit: a second fit with the same callback re-arms the hooks): open the
        files (``alerts_path`` is the adapter's default), replay bounds, start a fresh interval."""
        if self.model is not None and model is not self.model:  # another model: probe it anew
            self.release()
            self.probed, self._result, self.reducer, self._plan = False, None, None, None
        self.model = model
        self.session.open(alerts_path, write=write)
        if self.session.records:
            apply_bounds(model, self.session.records)
        self.restart_interval()
        if self._result is not None:
            self._install_hooks()

    def restart_interval(self) -> None:
        """Drop rows not yet judged (the step counter was restored, or a new fit starts)."""
        self.session.restart_interval()
        self.armed = False
        if self.reducer is not None:
            self.reducer.discard()

    def begin_step(self, forward_args: Any = None) -> None:
        """Before the forward pass of a training step (``forward_args``: the model's inputs, when it is
        called from the model's own forward pre-hook, which the probe's hook cannot see any more)."""
        if self.session.disabled or self.model is None:
            return
        self.armed = True
        self.loss_seen = False
        self._batch_recorded = False
        if not self.probed and self.probe is None:
            self.probe = Probe(self.model)
            self.probe.recorder.on_backward = self._probe_at_backward
            self.probe.start(forward_args)

    def begin_micro_batch(self) -> None:
        """Before each forward pass of a step made of several micro-batches (gradient accumulation): the
        first begins the step (:meth:`begin_step`); the others only let :meth:`record_batch` record their
        targets and inputs too. The step is still counted once, at :meth:`end_step`."""
        if not self.armed:
            self.begin_step()
        elif not self.disabled:
            self._batch_recorded = False

    def record_step_loss(self, loss: Any) -> None:
        """Record the step's loss, replacing one recorded earlier in the same step (an integration that
        combines the micro-batch losses of a step into the loss its trainer reports)."""
        if isinstance(loss, Tensor) and not self.disabled:
            self.loss_seen = False
        self.record_loss(loss)

    def any_rank(self, flag: bool) -> bool:
        """A ``torch.distributed`` collective: True when ``flag`` is True on any rank (one all-reduce of one
        element on the monitor's device); ``flag`` itself when no process group is initialised."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return bool(flag)
        if self.reducer is not None:
            device = self.reducer.device
        else:
            device = next((p.device for p in self.model.parameters()), torch.device("cpu")) \
                if self.model is not None else torch.device("cpu")
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def record_loss(self, loss: Any) -> None:
        if self.loss_seen or self.session.disabled or not isinstance(loss, Tensor):
            return
        if self.probe is not None and self.probe.active:
            self.finish_probe(loss)
        if self.reducer is not None:  # (a loss that cannot be copied is dropped from the step at the commit)
            self.reducer.loss(loss)
            self.loss_seen = True

    def record_batch(self, batch: Any = None, inputs: Any = None, targets: Any = None) -> None:
        """Targets and inputs of the step: given explicitly, or located in the batch (once per step)."""
        red = self.reducer
        if self._batch_recorded or red is None or self.session.disabled:
            return
        self._batch_recorded = True
        tp, ip = self._target_path, self._input_path
        y = targets if targets is not None else (get_path(batch, tp) if tp is not None else None)
        x = inputs if inputs is not None else (get_path(batch, ip) if ip is not None else None)
        where = "targets"
        try:
            if isinstance(y, Tensor) and self.readable(y, where):
                red.target(y)
            if isinstance(x, Tensor):
                where = "inputs"
                if x.is_floating_point() and self.readable(x, where):
                    red.input(x)
            elif x is not None:  # a list/tuple/dict of input tensors
                for path, t in flatten(x):
                    where = describe_path("inputs", path)
                    if t.is_floating_point() and self.readable(t, where):
                        red.input(t)
        except Exception as err:  # this tensor is skipped from now on; the rest stays watched
            self.reduce_failed(where, err)

    def record_grads(self) -> None:
        """The gradients of the output layer's parameters, reduced on the device (after ``backward``,
        before the optimiser step: Lightning's ``on_before_optimizer_step``; in a plain loop at
        ``guard.step``, before ``zero_grad``). Parameters without a gradient are skipped."""
        params = self._grad_params
        if not (params and self.armed) or self.reducer is None or self.session.disabled:
            return
        grads = []
        for p in params:
            g = p.grad
            if g is None:
                continue
            if type(g) is not Tensor:  # a DTensor (FSDP2, tensor parallel), or another subclass
                g = self._local_grad(g)
                if g is None:
                    continue
            grads.append(g)
        if grads:
            self.reducer.grads(grads, complete=len(grads) == len(params))
            self._grads_seen = True
        else:
            self._grads_missed = True

    def _local_grad(self, g: Tensor) -> Optional[Tensor]:
        """A gradient that is a ``DTensor``: this process's shard (FSDP2 shards parameters: the shards'
        squared norms are summed across ranks at the check, :attr:`Stat.sync_sharded`) or, replicated,
        the whole; ``None`` (skipped with a note) when it cannot be read."""
        placements = getattr(g, "placements", None)
        if placements is not None and hasattr(g, "to_local"):
            kinds = {type(p).__name__ for p in placements}
            if kinds <= {"Shard", "Replicate"}:  # (a Partial gradient is not reduced yet: its norm is unknown)
                if "Shard" in kinds and self.reducer is not None:
                    self.reducer.grad_sharded = True
                local = g.to_local()
                return local if self.readable(local, "gradients") else None
        return g if self.readable(g, "gradients") else None

    def readable(self, t: Tensor, where: str) -> bool:
        """Whether the reducer can read ``t``; a tensor it cannot is skipped with one info note."""
        why = unreadable(t)
        if why is None:
            return where not in self._unread
        self._skip(where, f"{where} is {why}")
        return False

    def _reduce(self, fn: Callable[..., None], t: Optional[Tensor], where: str, **kwargs: Any) -> None:
        """``fn(t)``: one watched tensor into the reducer; an error reading it skips it
        (:meth:`reduce_failed`)."""
        try:
            fn(t, **kwargs)
        except Exception as err:
            self.reduce_failed(where, err)

    def reduce_failed(self, where: str, err: Exception) -> None:
        """Reducing the tensor ``where`` raised: it is skipped from now on (one info note); the rest stays
        watched (``strict=True`` re-raises)."""
        if self.config.strict:
            raise err
        self._skip(where, f"{where} could not be reduced ({type(err).__name__}: {err})")

    def _skip(self, where: str, why: str) -> None:
        if where in self._unread:
            return
        self._unread.add(where)
        self.session.note(f"unread {where}", f"{why}, so boundguard does not watch it; everything else stays "
                          f"watched.", "Nothing to change for training. To watch it, pass a dense float or "
                          "integer tensor (x.to_dense(), x.float()).", step=self.step + 1)

    def is_check_step(self, step: int) -> bool:
        return self.session.is_check_step(step)

    def end_step(self, epoch: Optional[int] = None) -> list[Decision]:
        """After the optimiser step. Returns the decisions of a check (empty between checks)."""
        if self._paused_probe is not None:  # judged at the backward pass: leave its mode (this thread)
            self._paused_probe.stop()
            self._paused_probe = None
        if self.session.disabled:
            return []
        if self.probe is not None and self.probe.active:
            self.finish_probe(None)
        self.armed = False
        due = self.session.count_steps(epoch=epoch)
        red = self.reducer
        if red is None:
            return []
        red.next_row(checking=due)
        if due or (red.tripped and self._tripped()):
            return self._check()
        return []

    def _tripped(self) -> bool:
        """The NaN tripwire: this step (or on a GPU the one before, once its mirror has landed) showed a
        NaN/Inf, so check now rather than at the next interval. Once per run of non-finite steps: a check
        that finds none re-arms it. Off under DDP, where the ranks' checks must stay matched."""
        red = self.reducer
        if red is None or not red.tripped or self.distributed:
            return False
        red.trip_armed = False
        return True

    def _check(self) -> list[Decision]:
        red = self.reducer
        assert red is not None
        if self.distributed:
            red.all_reduce()
        rows, counts, seen, losses = red.read()
        try:
            decisions = self.session.check(rows, counts, seen, losses)  # raises for on_violation="raise"
        finally:
            snap = self.session.last_snapshot
            if snap is not None and not red.trip_armed and not snap.has_nonfinite():
                red.trip_armed = True
        if self._grads_missed and not self._grads_seen:
            where = self.session.facts.grad_where or "the output layer"
            self.session.note("gradients", f"the gradients of {where} were empty whenever boundguard read them "
                              "(param.grad is None), so gradient checks are off.",
                              "In a plain loop call guard.step() before optimizer.zero_grad(). (DeepSpeed ZeRO keeps "
                              "gradients in its own partitions: they are not watched there.)")
        if len(self.session.records) != self._hooked_bounds:
            self._install_hooks()  # a bound was inserted: watch the bounded output
        self._sync_plan()
        return decisions

    def final_check(self) -> list[Decision]:
        """At the end of training: judge the steps since the last check, so a NaN in the last batches of
        a run is reported too. Under DDP every rank calls it at the same step (the collectives match)."""
        if self.disabled or self.reducer is None:
            return []
        if self.armed:  # a forward that no step ended (an evaluation after the last step): not training
            self.armed = False
            self.reducer.drop_step()
        if self.step < self.session.interval_start:
            return []
        self._stop_probe()
        return self._check()

    def check_partial_step(self) -> list[Decision]:
        """After the training loop raised mid-step: judge what the unfinished step already showed
        (a NaN input before the loss crashed, say), so the alerts file explains the crash. Records
        alerts only; takes no action."""
        if self.disabled or not self.armed:
            return []
        if self.reducer is None:  # the first step (the probe's) raised
            return self._explain_probe_crash()
        self.armed = False
        self._stop_probe()
        self.session.count_steps()
        red = self.reducer
        red.next_row(checking=True)
        rows, counts, seen, losses = red.read()
        return self.session.check(rows, counts, seen, losses, act=False)

    def _explain_probe_crash(self) -> list[Decision]:
        """The first step raised inside a loss call (``CrossEntropyLoss`` refusing a label 4 of 4 classes,
        say): judge that call's input and targets, so the alerts file says why. Records alerts only."""
        probe, self.armed = self.probe, False
        failed = probe.recorder.failed if probe is not None else None
        self._stop_probe()
        if failed is None or failed.name not in _CLASS_INDEX_LOSSES:
            return []
        x, y = failed.tensor_arg(0, "input"), failed.tensor_arg(1, "target")
        if x is None or y is None or y.is_floating_point() or x.dim() < 1 or y.numel() == 0:
            return []
        self.session.count_steps()
        facts = ModelFacts(loss=classify_loss(failed.name), loss_where=failed.name, target_integer=True,
                           classes=int(x.shape[1] if x.dim() > 1 else x.shape[0]), target_where="targets")
        self.session.set_facts(facts)
        rows = neutral_row()[None].copy()
        col = {c: i for i, c in enumerate(COLUMNS)}
        yf = y.detach().float()
        rows[0, col["target.min"]], rows[0, col["target.max"]] = float(yf.min()), float(yf.max())
        rows[0, col["target.finite"]] = float(y.numel())
        return self.session.check(rows, {"target": y.numel()}, [False], act=False)

    def finish(self) -> None:
        self._stop_probe()
        self.session.finish()

    def release(self) -> None:
        """Adapter interface: remove the probe and every statistics hook (bounds stay)."""
        self._stop_probe()
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def _stop_probe(self) -> None:
        if self.probe is not None:
            self.probe.stop()
            self.probe = None
        if self._paused_probe is not None:
            self._paused_probe.stop()
            self._paused_probe = None

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return self.session.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        records = self.session.load_state_dict(state)
        if self.model is not None and records:
            apply_bounds(self.model, records)
            if self._result is not None:
                self._install_hooks()
        self.restart_interval()

    # ------------------------------------------------------------------ probe → hooks
    def _probe_at_backward(self) -> None:
        """The first backward pass of the probe step has reached the loss (an autograd hook): judge the
        step now, while its forward tensors are alive anyway, rather than at the step's end, so the probe
        keeps nothing alive through the backward pass (a language model's logits, their softmax, the fp32
        copies). Never raises into the user's backward."""
        probe = self.probe
        if probe is None or not probe.active or self.session.disabled:
            return
        try:
            self.finish_probe(probe.recorder.last_loss(), leave=False)
            self._paused_probe = probe  # its function mode is left on the main thread (_stop_probe)
        except Exception as err:
            if self.config.strict:
                raise
            self.session.disable(err)

    def finish_probe(self, loss: Optional[Tensor], leave: bool = True) -> None:
        """Judge the probe step (``loss``: its loss, None when none was recorded): the facts, the reducer,
        the statistics hooks, and this step's statistics from the tensors the probe saw. ``leave``: leave the
        probe's function mode now (else it is paused, and left on the main thread at the step's end)."""
        probe = self.probe
        assert probe is not None
        if leave:
            probe.stop()
        else:
            probe.pause()
        self.probe = None
        self.probed = True
        try:
            r = probe.analyse(loss, self.config.output_key)
        finally:
            probe.forget()
        self._result = r
        facts = probe_facts(r)
        self._logits = bool(facts.loss and facts.loss.link_applied)
        self.reducer = Reducer(self.config.check_every_n_steps, device_of(self.model, r))
        for key, msg, fix in r.notes:
            self.session.note(key, msg, fix, step=self.step + 1)
        self._lse_dim = class_dim(r.pre, facts)
        self._locate_batch_tensors(r, facts)
        facts.grad_where, self._grad_params = grad_params(self.model, r)
        facts.grad_scaled = self.grad_scaled
        self.session.set_facts(facts)
        target = r.target if r.target is not None and self.readable(r.target, "targets") else None
        if target is not None or self.distributed:  # (with several ranks a collective: every rank calls it)
            self._observe_probe_targets(target.detach() if target is not None else None)
        self._sync_plan()
        self._install_hooks()
        # statistics of this (probe) step come from the tensors the probe saw
        pre = r.pre if r.pre is not None and self.readable(r.pre, facts.pre_where or "pre-activation") else None
        pred = r.pred if r.pred is not None and self.readable(r.pred, facts.pred_where or "prediction") else None
        self._reduce(self.reduce_outputs, pre, facts.pre_where or "pre-activation", pred=pred)
        if target is not None and self._target_path is None:
            self._reduce(self.reducer.target, target, "targets")
        r.forget_tensors()

    def _observe_probe_targets(self, t: Optional[Tensor]) -> None:
        """The first step's targets decide ``"auto"`` bounds (and so the bins every rank counts with): under
        DDP their range is reduced over all ranks first, so every rank infers the same bounds."""
        lo, hi, onehot = math.inf, -math.inf, 1.0
        if t is not None:
            tf = t.float()
            fin = tf[torch.isfinite(tf)]
            if fin.numel():
                lo, hi = float(fin.min()), float(fin.max())
                onehot = float(t.dim() >= 2 and t.shape[-1] > 1 and bool(((tf == 0) | (tf == 1)).all())
                               and bool((tf.sum(-1) == 1).all()))
        if self.distributed:
            import torch.distributed as dist

            device = self.reducer.device if self.reducer is not None else torch.device("cpu")
            v = torch.tensor([lo, -hi, onehot], dtype=torch.float64, device=device)
            dist.all_reduce(v, op=dist.ReduceOp.MIN)
            lo, hi, onehot = float(v[0]), -float(v[1]), float(v[2])
        if math.isfinite(lo):
            self.session.observe_targets(lo, hi, onehot=onehot > 0)

    def _locate_batch_tensors(self, r: ProbeResult, facts: ModelFacts) -> None:
        if self.explicit_batch:  # guard.step(inputs=, targets=) hands them over: no batch to search
            self._target_path = self._input_path = None
            explicit_batch(r, facts)
            return
        self._target_path, self._input_path, notes = locate_batch(self.batch, r, self.config, facts,
                                                                  self.explicit_batch)
        for key, message, fix in notes:
            self.session.note(key, message, fix, step=self.step + 1)

    def _sync_plan(self) -> None:
        """Count against the bounds and activation in force (they change when bounds are inferred or a
        bound is inserted)."""
        plan = self.session.counting_plan()
        if self.reducer is not None and plan != self._plan:
            self.reducer.apply(plan)
            self._plan = plan

    def _install_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        r = self._result
        if r is None or self.model is None:
            return
        modules = dict(self.model.named_modules())
        records = self.session.records
        self._hooked_bounds = len(records)
        pre_site, pred_site = r.pre_site, r.pred_site
        if self._logits:
            pred_site = None  # predictions are link(raw): in range by construction
        replay = activation_fn(r.activation, r.activation_params) if r.pred_from_pre and not self._logits else None
        if records and r.pred_from_pre:
            hook = BoundHook(records[-1].to_dict())
            act = replay or (lambda z: z)
            replay = lambda z: act(hook.bound(z))  # noqa: E731
        self._pred_from_pre = replay
        same = (pre_site is not None and pred_site is not None and pre_site == pred_site and not records
                and not self._logits)
        if self.reducer is not None:
            self.reducer.shared = same
        if pre_site is not None and pre_site[0] in modules:
            self._hooks.append(modules[pre_site[0]].register_forward_hook(
                StatsHook(self, pre_site[1], "pre+pred" if same else "pre", site_name(pre_site)), prepend=True))
        if pred_site is not None and not same and pred_site[0] in modules:
            self._hooks.append(modules[pred_site[0]].register_forward_hook(
                StatsHook(self, pred_site[1], "pred", site_name(pred_site))))

    def reduce_outputs(self, pre: Optional[Tensor], pred: Optional[Tensor]) -> None:
        """The watched output of a step into the reducer: the pre-activation (and its logsumexp, for logits a
        softmax cross-entropy reads) and the prediction, given or replayed from the pre-activation."""
        red = self.reducer
        assert red is not None
        if red.shared and pre is not None:  # identity head: one tensor is both
            red.pre(pre, also_pred=True)
            return
        if pre is not None:
            red.pre(pre)
            if self._lse_dim is not None:
                red.logits(pre, self._lse_dim)
        if self._logits:
            return
        if pred is not None and self._result is not None and self._result.pred_site is not None:
            red.pred(pred)
        elif self._pred_from_pre is not None and pre is not None:
            red.pred(self._pred_from_pre(pre.detach()))

    # ------------------------------------------------------------------ surgery (adapter interface)
    def insert_bound(self, record: BoundRecord) -> BoundRecord:
        """Place the planned bound on the raw output that feeds the prediction and insert it."""
        r, b = self._result, self.session.bounds
        site = (r.pre_site or r.pred_site) if r is not None else None
        if r is None or site is None or self.model is None:
            raise CannotBound("on_violation='bound' could not insert a bound: the output layer was not located.")
        facts = self.session.facts
        dim = 1 if ((r.pred_dim or 0) >= 2 and b is not None and b.kind == "distribution"
                    and facts.loss is not None and facts.loss.multiclass) else -1
        placed = record.at(site[0], tuple(site[1]), dim=dim)
        apply_bounds(self.model, [placed])
        return placed


#: Losses that take class indices as targets (the first step's crash in one of them is explained).
_CLASS_INDEX_LOSSES = frozenset({"cross_entropy", "nll_loss"})

