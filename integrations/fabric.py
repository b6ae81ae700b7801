"""``from boundguard.integrations.fabric import watch`` — boundguard for a Lightning Fabric training loop.

``guard = watch(fabric, model, **options)`` is the plain-loop guard (:class:`boundguard.integrations.torch.Guard`:
call ``guard.step(loss=..., inputs=..., targets=...)`` once per batch) plus Fabric's processes:

- **Collectives.** With ``fabric.world_size > 1`` the statistics are all-reduced across ranks at each check
  (none between checks), so every rank judges the same snapshot; ``guard.should_stop`` is then decided
  collectively (``fabric.strategy.reduce_boolean_decision``) at every check, so it has the same value on
  every rank at every step, and ``if guard.should_stop: break`` stops all ranks together. Before a check's
  collectives the ranks agree that the monitor is still on everywhere (if it switched itself off on one
  rank, it switches off on all of them instead of leaving the others waiting).
- **Files.** Rank 0 writes the alerts and statistics files; other ranks keep their alerts in memory.
  With ``alerts_path=None`` they go to ``alerts.jsonl`` in the log dir of Fabric's first logger, else to
  ``./boundguard/alerts.jsonl``. At check steps the statistics go to ``fabric.log_dict`` when Fabric has
  loggers.
- **The wrapped module.** ``model`` may be the module or what ``fabric.setup`` returned (``_FabricModule``):
  the guard watches the inner module, so the module names in alerts and bound records are the user's
  (``fc``, not ``_forward_module.fc``), and :func:`apply_bounds` here accepts either too.
- **State.** ``guard.state_dict()`` / ``guard.load_state_dict()`` (Fabric's ``fabric.save(path, {"boundguard":
  guard, ...})`` and ``fabric.load`` call them).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

try:
    from lightning.fabric.wrappers import _FabricModule
except ImportError:  # pragma: no cover - the standalone lightning_fabric package
    try:
        from lightning_fabric.wrappers import _FabricModule  # type: ignore[no-redef, assignment]
    except ImportError as e:
        raise ImportError(
            "boundguard.integrations.fabric needs Lightning Fabric: pip install 'boundguard[lightning]'"
        ) from e

from torch import nn

from boundguard.integrations.torch import Guard
from boundguard.integrations.torch import apply_bounds as _apply_bounds
from boundguard.session import guarded

__all__ = ["FabricGuard", "watch", "apply_bounds"]

_ENTRY = "watch(fabric, model)"


class FabricGuard(Guard):
    """``watch(fabric, model, ...)``: the plain-loop :class:`~boundguard.integrations.torch.Guard` on Fabric's ranks.

    Example:
        >>> import torch
        >>> from lightning.fabric import Fabric
        >>> fabric = Fabric(accelerator="cpu", devices=1)
        >>> model, opt = fabric.setup(torch.nn.Linear(4, 1), torch.optim.SGD(torch.nn.Linear(4, 1).parameters()))
        >>> guard = watch(fabric, model, bounds=(0, 1), on_violation="log", check_every_n_steps=1)
        >>> x, y = torch.randn(8, 4), torch.rand(8, 1)
        >>> loss = torch.nn.functional.mse_loss(model(x), y)
        >>> fabric.backward(loss)
        >>> sorted({a.code for a in guard.step(loss=loss, inputs=x, targets=y)})[:1]
        ['missing_output_activation']
        >>> guard.close()
    """

    def __init__(self, fabric: Any, model: nn.Module, **options: Any) -> None:
        missing = [a for a in ("strategy", "world_size", "is_global_zero") if not hasattr(fabric, a)]
        if missing:
            raise TypeError(f"{_ENTRY} needs a lightning Fabric as its first argument, got {type(fabric).__name__} "
                            f"(no {', '.join(missing)}); for a loop without Fabric use "
                            f"boundguard.integrations.torch.watch(model)")
        self._fabric = fabric
        super().__init__(_inner(model), _ENTRY, **options)

    def _attach(self, model: nn.Module) -> None:
        fabric = self._fabric
        self._session.join(self._any_rank if int(fabric.world_size) > 1 else None)
        default: Optional[Path] = None
        for logger in getattr(fabric, "loggers", None) or []:
            log_dir = getattr(logger, "log_dir", None)
            if log_dir:
                default = Path(log_dir) / "alerts.jsonl"
                break
        self.engine.attach(model, default, write=bool(fabric.is_global_zero))

    def _any_rank(self, flag: bool) -> bool:
        return bool(self._fabric.strategy.reduce_boolean_decision(bool(flag), all=False))

    @guarded
    def _checked(self) -> None:
        snap = self._session.last_snapshot
        if snap is None or snap.step != self.engine.step or not getattr(self._fabric, "loggers", None):
            return
        metrics = snap.metrics()
        metrics["boundguard/alerts"] = float(len(self._session.monitor.alerts))
        self._fabric.log_dict(metrics, step=snap.step)


def _inner(model: Any) -> Any:
    """The user's module inside what ``fabric.setup`` returned (names without ``_forward_module.``)."""
    return model.module if isinstance(model, _FabricModule) else model


def watch(fabric: Any, model: nn.Module, **options: Any) -> FabricGuard:
    """Monitor a Lightning Fabric loop; same options as the callbacks. See :class:`FabricGuard`."""
    return FabricGuard(fabric, model, **options)


def apply_bounds(model: nn.Module, source: Any) -> list[dict]:
    """:func:`boundguard.integrations.torch.apply_bounds` for a module or a ``_FabricModule`` (the recorded
    bounds name the inner module's layers)."""
    return _apply_bounds(_inner(model), source)
