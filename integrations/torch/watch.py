"""``watch(model)``: boundguard for a plain PyTorch training loop, one process or several.

Under ``torchrun`` (an initialised ``torch.distributed`` process group with more than one rank) the guard
joins the ranks: statistics are merged across ranks at each check (none between checks), so every rank
judges the same snapshot; ``guard.should_stop`` is decided by all ranks together at every check, so
``if guard.should_stop: break`` stops every rank at the same step and no rank waits in a collective;
rank 0 alone writes the files. A ``DistributedDataParallel`` model is watched through its ``module``, so
module names are the user's (``fc``, not ``module.fc``).
"""
from __future__ import annotations

from typing import Any

from torch import nn

from boundguard.alerts import Alert, BoundGuardError
from boundguard.config import Config
from boundguard.integrations.torch.engine import TorchEngine
from boundguard.integrations.torch.hooks import MonitorHook, training_forward
from boundguard.session import SessionViews, guarded

__all__ = ["Guard", "watch"]


class Guard(SessionViews):
    """``watch(model, ...)`` for a plain PyTorch loop. Call :meth:`step` once per batch.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 1))
        >>> with watch(model, bounds=(0, 1), on_violation="log", alerts_path=None) as guard:
        ...     for _ in range(3):
        ...         x, y = torch.randn(8, 4), torch.rand(8, 1)
        ...         loss = torch.nn.functional.mse_loss(model(x), y)
        ...         loss.backward()
        ...         guard.step(loss=loss, inputs=x, targets=y)
        >>> "missing_output_activation" in {a.code for a in guard.alerts}
        True
    """

    def __init__(self, model: nn.Module, _entry: str = "watch()", **options: Any) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"{_entry} needs a torch.nn.Module, got {type(model).__name__}")
        self.engine = TorchEngine(Config.from_options(_entry, options))
        self._session = self.engine.session
        self.engine.explicit_batch = True
        model = _unwrap(model)
        self._attach(model)
        self._pre = model.register_forward_pre_hook(MonitorHook(self._before_forward))
        self._closed = False

    def _attach(self, model: nn.Module) -> None:
        """Start watching ``model``: join the ranks of an initialised process group, where the files go and
        who writes them (a subclass for a launcher, such as Fabric's, brings its own collective and path)."""
        rank, world = _process_group()
        self._session.join(self.engine.any_rank if world > 1 else None)
        self.engine.attach(model, write=rank == 0)

    @property
    def should_stop(self) -> bool:
        """True once an alert decided ``halt``: the loop should stop (``on_violation="halt"``). With several
        ranks it is decided by all of them together at each check: the same on every rank at every step."""
        return self._session.halted

    @guarded
    def _before_forward(self, module: nn.Module, args: Any) -> None:
        e = self.engine
        if not e.armed and training_forward(module):  # an evaluation forward does not begin a step
            e.batch = args
            e.begin_step(forward_args=args)

    def step(self, loss: Any = None, inputs: Any = None, targets: Any = None) -> list[Alert]:
        """Record one training batch; at a check, judge and act. Returns the alerts raised at this call."""
        if self._closed:
            return []
        s = self._session
        alerts = (self._step(loss, inputs, targets) or []) if s.count_batch() else []
        if s.settle_stop():
            self._checked()
        return alerts

    def _checked(self) -> None:
        """After a check, on every rank (a subclass logs the statistics)."""

    @guarded
    def _step(self, loss: Any, inputs: Any, targets: Any) -> list[Alert]:
        e = self.engine
        if not e.armed:
            e.begin_step()  # no forward seen (e.g. model in eval mode): still count the step
        e.batch = (inputs, targets)
        if loss is not None:
            e.record_loss(loss)
        elif e.probe is not None and e.probe.active:
            e.finish_probe(None)
        e.record_batch(None, inputs=inputs, targets=targets)
        e.record_grads()
        return [d.alert for d in e.end_step()]

    def state_dict(self) -> dict[str, Any]:
        return self.engine.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.engine.load_state_dict(state)

    def close(self) -> None:
        """Judge the steps since the last check, remove the hooks and close the files (an inserted bound
        stays on the model). With ``on_violation="raise"`` the final check may raise."""
        self._close(final=True)

    def _close(self, final: bool) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if final:
                self._final_check()
        finally:
            self._pre.remove()
            self.engine.release()
            self.engine.finish()

    def _final_check(self) -> None:
        if self._session.agreed():  # (with several ranks: every rank, the same step)
            self._final_judge()

    @guarded
    def _final_judge(self) -> None:
        self.engine.final_check()

    def __enter__(self) -> "Guard":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is None:
            self.close()
            return
        # the loop raised: judge what it saw, but never replace the user's exception; with several ranks
        # the others may not reach a collective, so judge locally only
        final = not self._session.distributed
        try:
            self._partial_step()
            self._close(final=final)
        except BoundGuardError:
            pass

    @guarded
    def _partial_step(self) -> None:
        self.engine.check_partial_step()


def watch(model: nn.Module, **options: Any) -> Guard:
    """Monitor a plain PyTorch training loop; same options as the callbacks. See :class:`Guard`."""
    return Guard(model, **options)


def _process_group() -> tuple[int, int]:
    """This process's rank and the world size of an initialised ``torch.distributed`` group ((0, 1) if none)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside a ``DistributedDataParallel`` wrapper (its forward calls the module's)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model
