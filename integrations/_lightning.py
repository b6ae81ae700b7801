"""The Lightning callback, built for either namespace (``lightning.pytorch`` or ``pytorch_lightning``)."""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Optional

from boundguard.alerts import Alert, BoundGuardError
from boundguard.config import Config
from boundguard.integrations.torch import DEFAULT_ALERTS_PATH, TorchEngine

__all__ = ["make_callback"]


def _safe(fn):
    """An internal error never kills the user's training: one warning, then the monitor switches off."""

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        if self._engine.disabled:
            return None
        try:
            return fn(self, *args, **kwargs)
        except BoundGuardError:
            raise
        except Exception as err:
            if self._engine.config.strict:
                raise
            self._engine.disable(err)
            return None

    return wrapper


def make_callback(pl: Any) -> type:
    """Build ``BoundGuard`` on the ``Callback`` class of the namespace ``pl``."""

    class BoundGuard(pl.Callback):
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
            log_stats: log ``boundguard/<stat>`` metrics through the trainer's loggers at each check.
            strict: re-raise internal errors instead of switching the monitor off (for tests).

        Logged metrics (at check steps only): ``boundguard/output_min``, ``boundguard/output_max``,
        ``boundguard/out_of_bounds_share``, ``boundguard/preact_absmax``, ``boundguard/preact_rms``,
        ``boundguard/input_rms``, ``boundguard/loss_mean``, ``boundguard/alerts``.

        Example:
            >>> from boundguard.integrations.lightning import BoundGuard
            >>> guard = BoundGuard(bounds=(0, 1), on_violation="bound")
            >>> # Trainer(callbacks=[guard]).fit(model); guard.alerts
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
            log_stats: bool = True,
            strict: bool = False,
        ) -> None:
            super().__init__()
            if not isinstance(log_stats, bool):
                raise TypeError(f"log_stats must be a bool, got {log_stats!r}")
            self._config = Config(bounds, on_violation, actions, check_every_n_steps, alerts_path,
                                  thresholds, input_key, target_key, strict)
            self._engine = TorchEngine(self._config)
            self._log_stats = log_stats
            self._state_key: Optional[str] = None

        # -------------------------------------------------------------- public
        @property
        def alerts(self) -> list[Alert]:
            """Every alert so far, oldest first."""
            return self._engine.alerts

        @property
        def bounds_inserted(self) -> list[dict]:
            """Records of the bounding activations inserted (replayed on resume; see ``apply_bounds``)."""
            return self._engine.bounds_inserted

        @property
        def alerts_path(self) -> Optional[Path]:
            return self._engine.monitor.alerts_path

        @property
        def state_key(self) -> str:
            if self._state_key is None:  # Lightning asks several times per step
                d = self._config.describe()
                self._state_key = self._generate_state_key(
                    bounds=d["bounds"], on_violation=d["on_violation"], check_every_n_steps=d["check_every_n_steps"])
            return self._state_key

        # -------------------------------------------------------------- hooks
        @_safe
        def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
            if stage != "fit":
                return
            default = DEFAULT_ALERTS_PATH
            if self._config.alerts_path is None and trainer.loggers:
                log_dir = trainer.log_dir
                if log_dir:
                    default = Path(log_dir) / "alerts.jsonl"
            self._engine.attach(pl_module, default, write=trainer.is_global_zero)
            self._engine.distributed = trainer.world_size > 1

        @_safe
        def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
            from boundguard.integrations.torch import apply_bounds

            if self._engine.monitor.inserted:  # replay bounds restored from a checkpoint
                apply_bounds(pl_module, self._engine.monitor.inserted)

        @_safe
        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            self._engine._batch = batch
            self._engine.begin_step()
            self._engine.record_batch(batch)  # from step 2 on (the probe locates the tensors at step 1)

        @_safe
        def on_before_backward(self, trainer: Any, pl_module: Any, loss: Any) -> None:
            self._engine.record_loss(loss)

        @_safe
        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            e = self._engine
            if not e._loss_seen_this_step:  # manual optimisation: the loss comes back in the outputs
                loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
                e.record_loss(loss)
            e.record_batch(batch)
            checking = e.is_check_step(e.step + 1)  # decided before the step counts, on every rank
            decisions = e.end_step(epoch=trainer.current_epoch)
            if not checking:
                return
            halt = e.act(decisions)
            # a collective decision at every check, so ranks never diverge
            halt = trainer.strategy.reduce_boolean_decision(halt, all=False)
            if halt:
                trainer.should_stop = True
            if self._log_stats and e.last_snapshot is not None and trainer.loggers:
                metrics = e.last_snapshot.metrics()
                metrics["boundguard/alerts"] = float(len(e.alerts))
                for logger in trainer.loggers:
                    logger.log_metrics(metrics, step=trainer.global_step)

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            self._engine.finish()

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
                self._engine._remove_hooks()
                self._engine.finish()

        # -------------------------------------------------------------- state
        def state_dict(self) -> dict[str, Any]:
            return self._engine.state_dict()

        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            self._engine.load_state_dict(state_dict)

    return BoundGuard
