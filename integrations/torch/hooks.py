"""The hooks boundguard places on a user's modules (the statistics hook among them), what counts as a
training forward, and what the reducer cannot read.

A watched model must stay an ordinary model: ``copy.deepcopy``, ``pickle``, ``torch.save(model)`` and
``torch.optim.swa_utils.AveragedModel`` copy a module's hooks with it. Every monitoring hook is a
:class:`MonitorHook`, which a copy turns into :data:`INERT`, a stateless hook that does nothing: the copy
carries no monitor state (no engine, no buffers, no files) and never feeds the original's statistics,
and it loads wherever ``boundguard`` is importable. The watched model keeps its live hooks. (An inserted
bound is part of the model's behaviour: :class:`~boundguard.integrations.torch.bounding.BoundHook`
travels with a copy as it is.)
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from boundguard.integrations.torch.paths import INPUT, get_path

__all__ = ["INERT", "InertOnCopy", "MonitorHook", "StatsHook", "training_forward", "unreadable"]


class _Inert:
    """What a monitoring hook becomes in a copy of the model: called like any hook, returns None."""

    __slots__ = ()

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        return None

    def __reduce__(self) -> tuple[Callable[[], "_Inert"], tuple]:
        return _inert, ()

    def __deepcopy__(self, memo: dict) -> "_Inert":
        return self

    def __repr__(self) -> str:
        return "<boundguard hook, inert in this copy of a watched model>"


INERT = _Inert()


def _inert() -> _Inert:
    return INERT


class InertOnCopy:
    """Base of boundguard's hooks on a user's modules: copied (``copy.deepcopy``) or pickled, one is
    :data:`INERT`."""

    __slots__ = ()

    def __reduce__(self) -> tuple[Callable[[], _Inert], tuple]:
        return _inert, ()

    def __deepcopy__(self, memo: dict) -> _Inert:
        return INERT


class MonitorHook(InertOnCopy):
    """A monitoring hook on a user's module that calls ``fn``; copied or pickled, it is :data:`INERT`."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<boundguard hook {getattr(self.fn, '__qualname__', self.fn)!r}>"


def training_forward(module: torch.nn.Module) -> bool:
    """A forward pass that belongs to a training step: gradients recorded and the module in training mode.
    A forward under ``torch.no_grad()`` / ``inference_mode`` or in eval mode (validation, sampling,
    generation, an EMA teacher) is not training and never feeds the training statistics."""
    return module.training and torch.is_grad_enabled()


_STRIDED = torch.strided
#: The dtypes the reducer reads (copied to float32); others (complex, quantised, float8, uint16..64) are not.
_READABLE_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.uint8, torch.int8,
                              torch.int16, torch.int32, torch.int64, torch.bool})
_PLAIN = frozenset({torch.Tensor, torch.nn.Parameter})
#: Tensor subclasses whose values are not in local memory (a fake or functional tensor of a trace; a
#: sharded DTensor, whose shards must be combined across ranks first).
_NOT_LOCAL = ("FakeTensor", "FunctionalTensor", "DTensor")


def unreadable(t: torch.Tensor) -> str | None:
    """Why the reducer cannot read ``t`` (a sparse, nested, quantised, meta or fake tensor, an unusual
    dtype), in words; None when it can (the common case costs a few attribute reads)."""
    if t.layout is _STRIDED and t.dtype in _READABLE_DTYPES and type(t) in _PLAIN and not (t.is_nested or t.is_meta):
        return None
    if t.layout is not _STRIDED:
        return f"a {str(t.layout).replace('torch.', '')} tensor"
    if t.is_nested:
        return "a nested tensor"
    if t.is_meta:
        return "a meta tensor (no values)"
    if t.dtype not in _READABLE_DTYPES:
        return f"a {str(t.dtype).replace('torch.', '')} tensor"
    names = {c.__name__ for c in type(t).__mro__}
    hit = next((n for n in _NOT_LOCAL if n in names), None)
    return f"a {hit} (its values are not in this process's memory)" if hit else None


class StatsHook(InertOnCopy):
    """The forward hook that reduces the watched output of a module (a copy of the model gets an inert
    hook instead: :class:`~.hooks.InertOnCopy`). ``what``: ``pre``, ``pred`` or ``pre+pred`` (an identity
    head: one tensor is both)."""

    __slots__ = ("engine", "path", "what", "where", "whole", "from_input")

    def __init__(self, engine: Any, path: tuple, what: str, where: str) -> None:
        self.engine, self.path, self.what, self.where = engine, path, what, where
        self.whole, self.from_input = not path, path[:1] == (INPUT,)


def _reduce_output(h: StatsHook, module: nn.Module, args: Any, output: Any) -> None:
    """:class:`StatsHook`'s call (run eagerly under torch.compile: see :func:`_eager`)."""
    e = h.engine
    red = e.reducer
    # (a monitor switched off has removed its hooks; an evaluation forward is not a training statistic)
    if not e.armed or red is None or not training_forward(module):
        return
    try:
        t = output if h.whole else ((args[0] if args else None) if h.from_input else get_path(output, h.path))
        if not isinstance(t, Tensor) or not e.readable(t, h.where):
            return
        if h.what == "pre+pred":  # identity head: one tensor is both
            red.pre(t, also_pred=True)
        elif h.what == "pred":
            red.pred(t)
        else:
            e.reduce_outputs(t, None)
    except Exception as err:  # never break the user's forward pass: this tensor is skipped from now on
        e.reduce_failed(h.where, err)


def _eager(fn: Callable) -> Callable:
    """Run ``fn`` eagerly under torch.compile: statistics writes into the monitor's buffer are
    side effects dynamo must not trace (they would break AOT autograd's view-mutation rules)."""
    try:
        return torch._dynamo.disable(fn, recursive=True)
    except Exception:  # pragma: no cover - torch without dynamo
        return fn


StatsHook.__call__ = _eager(_reduce_output)  # type: ignore[method-assign]  # (one frame: the hook itself)
