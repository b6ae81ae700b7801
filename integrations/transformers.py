"""``from boundguard.integrations.transformers import BoundGuardCallback`` — the Hugging Face ``Trainer`` callback.

How it sees the Trainer's step, with no change to the user's code (built on
:class:`~boundguard.integrations.torch.TorchEngine` and the core :class:`~boundguard.session.Session`):

- **Batch and probe.** A forward pre-hook on the model (``with_kwargs=True``) receives each training
  micro-batch as the Trainer passes it (``model(**inputs)``: ``input_ids``, ``labels``...); the first
  training forward starts the probe, which finds the prediction, its pre-activation and the loss the
  model computes (``outputs.loss``, from a forward hook) or that ``compute_loss`` computes.
- **Steps.** A step is an optimisation step, as ``state.global_step`` counts it: with gradient
  accumulation every micro-batch's targets, inputs and outputs go into the same row, and the step is
  counted once, at ``on_step_end``. The step's loss is the sum of what ``Trainer.training_step`` returns
  for its micro-batches (the loss the Trainer itself accumulates and logs).
- **Checks, logging, halt.** At the first step and every ``check_every_n_steps`` the row buffer is read
  back in one transfer and judged; the statistics go through ``Trainer.log`` (so every ``report_to``
  integration and ``trainer.state.log_history`` get them) on check steps only; ``halt`` sets
  ``control.should_training_stop``. Under DDP the statistics are all-reduced at each check and the stop
  decision is collective, so every rank stops at the same step; rank 0 writes the files.
- **State.** The callback is a ``transformers.trainer_callback.ExportableState``: its state (alerts, loss
  history, inferred and inserted bounds, the step) is saved in every checkpoint's ``trainer_state.json``
  and restored by ``trainer.train(resume_from_checkpoint=...)``; an inserted bound is replayed on the
  model before the first resumed step.

What the Trainer hands its callbacks (``args``, ``state``, ``control`` and the keywords ``model``,
``optimizer``, ``lr_scheduler``, ``train_dataloader``...) gives the model to watch and, through the
prepared optimizer's ``scaler``, whether gradients are fp16-scaled. Two things it does not hand, and only
the ``Trainer`` object has: ``Trainer.log`` (the one call that reaches ``state.log_history`` *and* every
``report_to`` integration's ``on_log``; a callback sees neither the other callbacks nor the callback
handler), and the loss of each micro-batch as ``Trainer.training_step`` returns it (after
``compute_loss``, a ``compute_loss_func``, label smoothing and the gradient-accumulation scaling; no
event carries a loss) or raises (a crash mid-step). So the callback takes the Trainer that holds it when
the Trainer's ``__init__`` calls ``on_init_end`` (the Trainer does not pass itself; the caller's frame is
read there, and again at ``on_train_begin`` if the callback moved to another Trainer), and for the run
only wraps that Trainer's ``training_step`` on the instance (removed when training ends or raises).
``callback.set_trainer(trainer)`` names the Trainer explicitly (as the Trainer does for its own
``JITCheckpointCallback``). Without a Trainer the callback still watches the model: it takes the loss
the model computes (``outputs.loss``) and logs nothing through the Trainer.
"""
from __future__ import annotations

import sys
from collections.abc import Mapping
from types import FrameType
from typing import Any, Callable, Optional

try:
    import transformers
    from transformers.trainer_callback import TrainerCallback
except ImportError as e:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "boundguard.integrations.transformers needs Hugging Face transformers: "
        "pip install 'boundguard[transformers]'"
    ) from e
try:  # callback state in checkpoints: transformers 4.41, saved up to date at each checkpoint from 4.45
    from transformers.trainer_callback import ExportableState
except ImportError as e:  # pragma: no cover - exercised only with an old transformers
    raise ImportError(
        f"boundguard.integrations.transformers needs transformers>=4.45 (found {transformers.__version__}): "
        "pip install -U 'boundguard[transformers]'"
    ) from e

from torch import Tensor, nn

from boundguard.alerts import BoundGuardError
from boundguard.bounds import Bounds
from boundguard.config import OPTIONS, Config
from boundguard.integrations.torch import TorchEngine, apply_bounds
from boundguard.integrations.torch.hooks import MonitorHook, training_forward
from boundguard.session import SessionViews, guarded

__all__ = ["BoundGuardCallback", "apply_bounds"]

_ENTRY = "BoundGuardCallback()"
#: The callback's options: the Config options every adapter takes, and its own ``log_stats``.
_ACCEPTED = OPTIONS + ("log_stats",)


class BoundGuardCallback(SessionViews, TrainerCallback, ExportableState):
    """Watch a ``transformers.Trainer`` run's predictions, pre-activations, targets, inputs and loss.

    One line: ``Trainer(..., callbacks=[BoundGuardCallback(bounds=(0, 1))])``. Same options, alert codes,
    files and actions as the other adapters.

    Args:
        bounds: ``"auto"`` (infer from targets and loss), ``None`` (no range checks), ``(lo, hi)``,
            a :class:`boundguard.Bounds`, or ``"probability"`` / ``"symmetric"`` / ``"distribution"``.
        on_violation: ``"log"`` | ``"warn"`` | ``"halt"`` | ``"raise"`` | ``"bound"``: what an alert of
            severity warning or above does (``halt`` sets ``control.should_training_stop``).
        actions: per-code override of ``on_violation``, e.g. ``{"nonfinite_loss": "halt"}``.
        check_every_n_steps: how often (in optimisation steps) statistics are read back and judged.
        alerts_path: the JSON-lines alerts file (``stats.jsonl`` goes beside it); ``None``:
            ``./boundguard/alerts.jsonl`` (the contract's default outside Lightning).
        thresholds: per-code rule thresholds, e.g. ``{"loss_spike": {"factor": 6}}``.
        input_key: where the inputs are in the batch dict when not found automatically.
        target_key: where the targets are in the batch dict (default: ``labels``, as the loss shows it).
        output_key: which element of the model's output (index or key, e.g. ``"logits"``) is the
            prediction (default: the input of the loss that weighs most).
        name: names this monitor (recorded in the run record of ``stats.jsonl`` and in ``args``).
        log_stats: log ``boundguard/<stat>`` through ``Trainer.log`` at each check.
        strict: re-raise internal errors instead of switching the monitor off (for tests).

    Raises:
        TypeError: an unknown option (naming it and the valid ones) or an option of the wrong type.
        ValueError: an option with an invalid value.

    Logged through ``Trainer.log`` at check steps only (so ``trainer.state.log_history`` and every
    ``report_to`` integration see them):

    ================================== ===========================================================
    key                                value
    ================================== ===========================================================
    ``boundguard/output_min``, ``_max`` extremes of the predictions since the previous check
    ``boundguard/out_of_bounds_share`` share of predictions outside the bounds in force
    ``boundguard/preact_absmax``       largest magnitude of the output layer's pre-activation
    ``boundguard/preact_rms``          its root mean square
    ``boundguard/logit_lse_mean``      mean log-sum-exp of the logits' rows (softmax heads only)
    ``boundguard/input_rms``           root mean square of floating-point inputs
    ``boundguard/head_grad_norm_max``  largest gradient norm of the output layer in one step
    ``boundguard/loss_mean``           mean training loss of the interval
    ``boundguard/alerts``              alerts recorded so far
    ================================== ===========================================================

    Example:
        >>> guard = BoundGuardCallback(bounds=(0, 1), on_violation="halt", check_every_n_steps=10)
        >>> # Trainer(model, args, train_dataset=ds, callbacks=[guard]).train(); guard.alerts
        >>> BoundGuardCallback(check_every=10)
        Traceback (most recent call last):
        ...
        TypeError: BoundGuardCallback() got an unknown option 'check_every' (did you mean 'check_every_n_steps'?); valid options: bounds, on_violation, actions, check_every_n_steps, alerts_path, thresholds, input_key, target_key, output_key, name, strict, log_stats
    """

    def __init__(
        self,
        bounds: Any = "auto",
        on_violation: str = "warn",
        actions: Optional[dict] = None,
        check_every_n_steps: int = 50,
        alerts_path: Any = None,
        *,
        thresholds: Optional[dict] = None,
        input_key: Any = None,
        target_key: Any = None,
        output_key: Any = None,
        name: Optional[str] = None,
        log_stats: bool = True,
        strict: bool = False,
        **unknown: Any,
    ) -> None:
        given = locals()  # the typed parameters above; the Config options among them are read by name
        # an unknown keyword: the error names the entry point, the option, the closest match, the valid ones
        self._config = Config.from_options(_ENTRY, {**{k: given[k] for k in OPTIONS if k in given}, **unknown},
                                           accepted=_ACCEPTED)
        if not isinstance(log_stats, bool):
            raise TypeError(f"log_stats must be a bool, got {log_stats!r}")
        self._engine = TorchEngine(self._config)
        self._session = self._engine.session
        self._log_stats = log_stats
        self._trainer: Any = None
        self._wrapped: Any = None  # the Trainer whose training_step reports the step's loss to us
        self._hooks: list[Any] = []
        self._training = False
        self._epoch: Optional[int] = None
        self._loss_sum: Optional[Tensor] = None
        self._loss_n = 0

    # -------------------------------------------------------------- public
    def set_trainer(self, trainer: Any) -> None:
        """Name the Trainer whose ``log`` and ``training_step`` the callback uses (found by itself otherwise)."""
        self._trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        return self._engine.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._engine.load_state_dict(state)

    # -------------------------------------------------------------- ExportableState (trainer_state.json)
    def state(self) -> dict[str, Any]:
        """What the Trainer saves in a checkpoint: the options (``args``) and the monitor's state."""
        return {"args": self._args(), "attributes": {"session_state": _jsonable(self._engine.state_dict())}}

    @property
    def session_state(self) -> dict[str, Any]:
        """The monitor's state; set by the Trainer on a copy it restores
        (``TrainingArguments(restore_callback_states_from_checkpoint=True)``)."""
        return self._engine.state_dict()

    @session_state.setter
    def session_state(self, value: dict[str, Any]) -> None:
        self._engine.load_state_dict(dict(value))

    def _args(self) -> dict[str, Any]:
        """The keyword arguments that rebuild this callback (the Trainer calls ``BoundGuardCallback(**args)``)."""
        c = self._config
        args: dict[str, Any] = {k: getattr(c, k) for k in OPTIONS}
        b = c.bounds
        if isinstance(b, Bounds):
            args["bounds"] = "distribution" if b.kind == "distribution" else [b.lo, b.hi]
        if c.alerts_path is not None:
            args["alerts_path"] = str(c.alerts_path)
        args["log_stats"] = self._log_stats
        return _jsonable(args)

    def _restore(self, state: Any) -> None:
        """Resuming (``resume_from_checkpoint``): take the monitor's state from the checkpoint's
        ``trainer_state.json``, unless the Trainer already restored it on this instance."""
        saved = (getattr(state, "stateful_callbacks", None) or {}).get(type(self).__name__)
        if isinstance(saved, list):
            saved = saved[0] if saved else None
        st = saved.get("attributes", {}).get("session_state") if isinstance(saved, Mapping) else None
        step = getattr(state, "global_step", 0)
        if isinstance(st, Mapping) and step > 0 and st.get("step") == step and self._session.step != step:
            self._engine.load_state_dict(dict(st))

    # -------------------------------------------------------------- Trainer events
    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._trainer is None:
            self._trainer = _calling_trainer(self)

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Optional[nn.Module] = None,
                       optimizer: Any = None, **kwargs: Any) -> None:
        if self._trainer is None or not _holds(self._trainer, self):
            self._trainer = _calling_trainer(self) or self._trainer
        self._begin(args, state, model, optimizer)
        self._epoch = int(state.epoch or 0)

    @guarded
    def _begin(self, args: Any, state: Any, model: Optional[nn.Module], optimizer: Any) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"{_ENTRY} needs the Trainer's torch model, got {type(model).__name__}")
        self._restore(state)
        self._session.join(self._engine.any_rank if int(getattr(args, "world_size", 1)) > 1 else None)
        self._engine.attach(model, None, write=int(getattr(args, "process_index", 0)) == 0)
        # the optimizer the Trainer prepared (accelerate's AcceleratedOptimizer) holds the fp16 GradScaler
        self._engine.grad_scaled = getattr(optimizer, "scaler", None) is not None
        self._install(model)
        self._training = True

    @guarded
    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """After the step's backward passes (gradients accumulated, clipped), before the optimiser."""
        self._engine.record_grads()

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._epoch = int(state.epoch or 0)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        s = self._session
        if not s.count_batch():
            self._loss_sum, self._loss_n = None, 0
        else:
            try:
                self._step_end()
            except BoundGuardError:  # on_violation="raise": let go of the model and the Trainer first
                self._stop()
                raise
        if s.settle_stop():  # a check: on every rank the same stop (the session decides it collectively)
            if s.halted:
                control.should_training_stop = True
            self._log(control)
        return control

    @guarded
    def _step_end(self) -> None:
        e = self._engine
        if self._loss_sum is not None:  # the Trainer's sum over micro-batches, else their mean
            e.record_step_loss(self._loss_sum if self._wrapped is not None else self._loss_sum / self._loss_n)
        self._loss_sum, self._loss_n = None, 0
        e.end_step(epoch=self._epoch)  # judges at check steps; raises for on_violation="raise"

    @guarded
    def _log(self, control: Any) -> None:
        snap, trainer = self._session.last_snapshot, self._trainer
        if not self._log_stats or snap is None or snap.step != self._engine.step or trainer is None:
            return
        metrics = snap.metrics()
        metrics["boundguard/alerts"] = float(len(self._session.monitor.alerts))
        keep = control.should_log  # Trainer.log clears it: the Trainer's own log of this step must still happen
        trainer.log(metrics)
        control.should_log = keep

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        try:
            if self._session.agreed():  # (with several ranks: every rank, the same step)
                self._final_check()
        finally:
            self._stop()

    @guarded
    def _final_check(self) -> None:
        """The steps since the last check are judged at the end of the run (every rank, same step)."""
        self._engine.final_check()

    def _stop(self) -> None:
        self._training = False
        self._uninstall()
        self._engine.release()
        self._engine.finish()

    # -------------------------------------------------------------- hooks on the model and the Trainer
    def _install(self, model: nn.Module) -> None:
        self._uninstall()
        self._hooks.append(model.register_forward_pre_hook(MonitorHook(self._before_forward), with_kwargs=True))
        self._hooks.append(model.register_forward_hook(MonitorHook(self._after_forward)))
        trainer = self._trainer
        if trainer is not None and "training_step" not in vars(trainer):
            trainer.training_step = self._wrap_training_step(trainer.training_step)
            self._wrapped = trainer

    def _uninstall(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        trainer, self._wrapped = self._wrapped, None
        if trainer is not None and "training_step" in vars(trainer):
            del trainer.training_step

    def _wrap_training_step(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def training_step(*args: Any, **kwargs: Any) -> Any:
            try:
                loss = original(*args, **kwargs)
            except BaseException as err:
                self._crashed(err)
                raise
            self._micro_loss(loss)
            return loss

        training_step.__wrapped__ = original  # type: ignore[attr-defined]
        return training_step

    @guarded
    def _before_forward(self, module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        if not (self._training and training_forward(module)):
            return None
        e = self._engine
        e.batch = kwargs if kwargs else args
        e.begin_micro_batch()  # the first micro-batch begins the step; the others add to its row
        e.record_batch(e.batch)  # from step 2 on (the probe locates the tensors at step 1)
        return None

    @guarded
    def _after_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        if not (self._training and training_forward(module)):
            return None
        loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
        if not isinstance(loss, Tensor):
            return None  # the loss is computed outside the model (compute_loss): see _micro_loss
        self._probe_loss(loss)
        if self._wrapped is None:
            self._add_loss(loss)
        return None

    @guarded
    def _micro_loss(self, loss: Any) -> None:
        if isinstance(loss, Tensor):
            self._probe_loss(loss)
            self._add_loss(loss)

    def _probe_loss(self, loss: Tensor) -> None:
        e = self._engine
        if e.probe is not None and e.probe.active:
            e.record_loss(loss)  # ends the probe with the loss it saw computed
            e.record_batch(e.batch)

    def _add_loss(self, loss: Tensor) -> None:
        v = loss.detach().float().mean()  # on the device: no host read between checks
        self._loss_sum = v if self._loss_sum is None else self._loss_sum + v
        self._loss_n += 1

    def _crashed(self, err: BaseException) -> None:
        """Training raised mid-step: judge what the step already showed (so the alerts file explains the
        crash), then let go of the model and close the files. Never masks the user's exception."""
        try:
            if not isinstance(err, BoundGuardError):
                self._engine.check_partial_step()
        except Exception:
            pass
        finally:
            self._stop()


def _holds(trainer: Any, callback: TrainerCallback) -> bool:
    handler = getattr(trainer, "callback_handler", None)
    return any(cb is callback for cb in getattr(handler, "callbacks", ()))


def _calling_trainer(callback: TrainerCallback, depth: int = 12) -> Any:
    """The ``transformers.Trainer`` calling ``callback`` right now: the nearest caller frame whose ``self`` is
    a Trainer holding this callback. The Trainer does not pass itself to callbacks (``CallbackHandler``
    hands ``model``, ``processing_class``, ``optimizer``, ``lr_scheduler`` and the data loaders, none of
    which refers back to it), and ``log`` / ``training_step`` exist only on it (see the module docstring)."""
    frame: Optional[FrameType] = sys._getframe(1)
    for _ in range(depth):
        if frame is None:
            return None
        obj = frame.f_locals.get("self")
        if isinstance(obj, transformers.Trainer) and _holds(obj, callback):
            return obj
        frame = frame.f_back
    return None


def _jsonable(obj: Any) -> Any:
    """Plain JSON types (the Trainer writes the state with ``json.dumps``): numpy scalars become numbers.

    Non-finite floats stay floats on purpose (not :func:`boundguard.fmt.jsonable`'s ``"inf"``): this state
    goes back through ``Session.load_state_dict``, whose history and bounds read floats (a fresh history's
    ``target_min`` is ``inf``), and the Trainer's ``json.dumps`` / ``json.loads`` round-trip them as
    ``Infinity`` / ``NaN``."""
    if isinstance(obj, Mapping):
        return {k if isinstance(k, str) else str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)
