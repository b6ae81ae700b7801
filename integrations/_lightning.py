"""The Lightning callback's behaviour, shared by both namespaces.

``boundguard.integrations.lightning.BoundGuard`` is ``class BoundGuard(LightningGuard, lightning.pytorch.Callback)``
and ``boundguard.integrations.pytorch_lightning.BoundGuard`` the same on ``pytorch_lightning.Callback``: two
real classes (for type checkers and LightningCLI), one implementation.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Union

from boundguard.alerts import BoundGuardError
from boundguard.bounds import BoundsSpec
from boundguard.config import OPTIONS, Action, Config
from boundguard.integrations.torch import DEFAULT_ALERTS_PATH, TorchEngine
from boundguard.session import SessionViews, guarded

__all__ = ["LightningGuard"]

#: The callback's options: the Config options every adapter takes, and its own ``log_stats``.
_ACCEPTED = OPTIONS + ("log_stats",)


class LightningGuard(SessionViews):
    """Watch a LightningModule's predictions, pre-activations, targets, inputs and loss.

    One line: ``Trainer(callbacks=[BoundGuard(bounds=(0, 1))])``. Statistics are reduced on the
    device every step and read back once per check (every ``check_every_n_steps``, and at the first
    step); alerts carry a code, numbers and a fix (see the README's catalogue).

    Args:
        bounds: ``"auto"`` (infer from targets and loss), ``None`` (no range checks), ``(lo, hi)``,
            a :class:`boundguard.Bounds`, or ``"probability"`` / ``"symmetric"`` / ``"distribution"``.
        on_violation: ``"log"`` | ``"warn"`` | ``"halt"`` | ``"raise"`` | ``"bound"``: what an alert of
            severity warning or above does.
        actions: per-code override of ``on_violation``, e.g. ``{"nonfinite_loss": "halt"}``.
        check_every_n_steps: how often statistics are read back and judged.
        alerts_path: the JSON-lines alerts file (``stats.jsonl`` goes beside it); ``None``:
            ``alerts.jsonl`` in the trainer's log dir, or ``./boundguard/alerts.jsonl`` without a logger.
        thresholds: per-code rule thresholds, e.g. ``{"loss_spike": {"factor": 6}}``.
        input_key: where the inputs are in the batch (index or dict key) when not found automatically.
        target_key: where the targets are in the batch, likewise.
        output_key: which element of what ``forward`` returns (tuple index or dict key) is the prediction,
            for a model with several heads (default: the input of the loss that weighs most).
        name: names this monitor when a Trainer has several (one per head, say): its checkpoint state key
            is ``BoundGuard[name]``. Without it the key comes from ``output_key``, else it is ``BoundGuard``.
        log_stats: log ``boundguard/<stat>`` metrics through the trainer's loggers at each check.
        strict: re-raise internal errors instead of switching the monitor off (for tests).

    Raises:
        TypeError: an unknown option (naming it, the closest valid one and every valid one) or an option
            of the wrong type.
        ValueError: an option with an invalid value.

    Logged metrics (at check steps only): ``boundguard/output_min``, ``boundguard/output_max``,
    ``boundguard/out_of_bounds_share``, ``boundguard/preact_absmax``, ``boundguard/preact_rms``,
    ``boundguard/logit_lse_mean`` (softmax heads), ``boundguard/input_rms``,
    ``boundguard/head_grad_norm_max`` (the output layer's largest gradient norm in one step),
    ``boundguard/loss_mean``, ``boundguard/alerts``.

    Example:
        >>> from boundguard.integrations.lightning import BoundGuard
        >>> guard = BoundGuard(bounds=(0, 1), on_violation="bound")
        >>> # Trainer(callbacks=[guard]).fit(model); guard.alerts
        >>> BoundGuard(check_every=10)
        Traceback (most recent call last):
        ...
        TypeError: BoundGuard() got an unknown option 'check_every' (did you mean 'check_every_n_steps'?); valid options: bounds, on_violation, actions, check_every_n_steps, alerts_path, thresholds, input_key, target_key, output_key, name, strict, log_stats
    """

    def __init__(
        self,
        bounds: BoundsSpec = "auto",
        on_violation: Action = "warn",
        actions: Optional[dict[str, Action]] = None,
        check_every_n_steps: int = 50,
        alerts_path: Union[str, os.PathLike, None] = None,
        *,
        thresholds: Optional[dict[str, dict[str, float]]] = None,
        input_key: Union[int, str, None] = None,
        target_key: Union[int, str, None] = None,
        output_key: Union[int, str, None] = None,
        name: Optional[str] = None,
        log_stats: bool = True,
        strict: bool = False,
        **unknown: Any,
    ) -> None:
        given = locals()  # the typed parameters above; the Config options among them are read by name
        super().__init__()
        # an unknown keyword: the error names the class, the option, the closest match and the valid ones
        self._config = Config.from_options(f"{type(self).__name__}()",
                                           {**{k: given[k] for k in OPTIONS if k in given}, **unknown},
                                           accepted=_ACCEPTED)
        if not isinstance(log_stats, bool):
            raise TypeError(f"log_stats must be a bool, got {log_stats!r}")
        self._engine = TorchEngine(self._config)
        self._session = self._engine.session
        self._log_stats = log_stats

    # -------------------------------------------------------------- public
    @property
    def state_key(self) -> str:
        """What identifies this monitor in a checkpoint, stable across option changes (resuming with another
        ``on_violation`` or interval keeps the alerts and the inserted bound): ``BoundGuard[<name>]``, else
        ``BoundGuard[output_key=<key>]``, else ``"BoundGuard"``. Several monitors in one Trainer need a
        ``name`` or ``output_key`` each."""
        c = self._config
        if c.name is not None:
            return f"BoundGuard[{c.name}]"
        if c.output_key is not None:
            return f"BoundGuard[output_key={c.output_key!r}]"
        return "BoundGuard"

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        """Checkpoints of earlier versions keyed the state by the options (``BoundGuard{'bounds': ...}``):
        take that state under the stable key."""
        states = checkpoint.get("callbacks")
        if isinstance(states, dict) and self.state_key not in states:
            old = [k for k in states if isinstance(k, str) and k.startswith("BoundGuard{")]
            if old:
                states[self.state_key] = states[old[0]]

    # -------------------------------------------------------------- hooks
    @guarded
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        default = DEFAULT_ALERTS_PATH
        if self._config.alerts_path is None and trainer.loggers and trainer.is_global_zero:
            run_dir = _run_dir(trainer)
            if run_dir is not None:
                default = run_dir / "alerts.jsonl"
        self._session.join((lambda flag: trainer.strategy.reduce_boolean_decision(flag, all=False))
                           if trainer.world_size > 1 else None)
        self._engine.attach(pl_module, default, write=trainer.is_global_zero)
        self._engine.grad_scaled = getattr(trainer.precision_plugin, "scaler", None) is not None

    @guarded
    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        e = self._engine
        e.batch = batch
        e.begin_step()
        e.record_batch(batch)  # from step 2 on (the probe locates the tensors at step 1)

    @guarded
    def on_before_backward(self, trainer: Any, pl_module: Any, loss: Any) -> None:
        self._engine.record_loss(loss)

    @guarded
    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self._engine.record_grads()  # unscaled by now under AMP; once per optimizer step

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._session.set_epoch(trainer.current_epoch)  # once per epoch, not per step

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        s = self._session
        if s.count_batch():
            self._batch_end(outputs, batch)
        if s.settle_stop():  # a check: on every rank the same stop (the session decides it collectively)
            if s.halted:
                trainer.should_stop = True
            snap = s.last_snapshot
            if self._log_stats and snap is not None and snap.step == s.step:
                self._publish_metrics(trainer, snap.metrics())

    @guarded
    def _batch_end(self, outputs: Any, batch: Any) -> None:
        e = self._engine
        if not e.loss_seen:  # manual optimisation: the loss comes back in the outputs
            loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
            e.record_loss(loss)
        e.record_batch(batch)  # the first step: the probe has just located the batch's tensors
        e.end_step()  # (the epoch is set at on_train_epoch_start)

    def _publish_metrics(self, trainer: Any, metrics: dict[str, float]) -> None:
        """At a check (never between): to the loggers, on Lightning's own step numbering (the batch's
        ``global_step`` before its optimiser step, as ``self.log`` in ``training_step`` logs it), and to
        ``trainer.callback_metrics`` so EarlyStopping and ModelCheckpoint can monitor them."""
        import torch

        metrics["boundguard/alerts"] = float(len(self._session.monitor.alerts))
        trainer.callback_metrics.update(zip(metrics, torch.tensor(list(metrics.values())).unbind()))
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=max(trainer.global_step - 1, 0))

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        try:
            if self._session.agreed():  # (with several ranks: every rank, the same step)
                self._final_check()
        finally:
            self._engine.finish()

    @guarded
    def _final_check(self) -> None:
        """The steps since the last check are judged at the end of the run (every rank, same step)."""
        self._engine.final_check()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        try:
            if not isinstance(exception, BoundGuardError):
                self._engine.check_partial_step()
        except Exception:  # never mask the user's exception
            pass
        finally:
            self._engine.finish()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            self._engine.release()
            self._engine.finish()

    # -------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return self._engine.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._engine.load_state_dict(state_dict)


def _run_dir(trainer: Any) -> Optional[Path]:
    """The directory of *this run* of the first logger, so the alerts file is attached to the run:
    TensorBoard/CSV: the version directory; MLflow: the run's artifact directory (file store); W&B: the
    run's files directory; otherwise the trainer's log dir."""
    for logger in trainer.loggers:
        kind = type(logger).__name__
        try:
            if kind == "MLFlowLogger":
                uri = logger.experiment.get_run(logger.run_id).info.artifact_uri
                if uri.startswith("file:"):
                    from urllib.parse import unquote, urlparse

                    return Path(unquote(urlparse(uri).path))
            elif kind == "WandbLogger":
                return Path(logger.experiment.dir)
            elif getattr(logger, "log_dir", None):
                return Path(logger.log_dir)
        except Exception:  # a logger that cannot say where its run lives: fall back to the trainer's
            continue
    log_dir = trainer.log_dir
    return Path(log_dir) if log_dir else None
