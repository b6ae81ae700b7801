"""The hooks boundguard places on a user's modules, and what counts as a training forward.

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

__all__ = ["INERT", "InertOnCopy", "MonitorHook", "READABLE_DTYPES", "training_forward", "unreadable"]


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
READABLE_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.uint8, torch.int8,
                              torch.int16, torch.int32, torch.int64, torch.bool})
_PLAIN = frozenset({torch.Tensor, torch.nn.Parameter})
#: Tensor subclasses whose values are not in local memory (a fake or functional tensor of a trace; a
#: sharded DTensor, whose shards must be combined across ranks first).
_NOT_LOCAL = ("FakeTensor", "FunctionalTensor", "DTensor")


def unreadable(t: torch.Tensor) -> str | None:
    """Why the reducer cannot read ``t`` (a sparse, nested, quantised, meta or fake tensor, an unusual
    dtype), in words; None when it can (the common case costs a few attribute reads)."""
    if t.layout is _STRIDED and t.dtype in READABLE_DTYPES and type(t) in _PLAIN and not (t.is_nested or t.is_meta):
        return None
    if t.layout is not _STRIDED:
        return f"a {str(t.layout).replace('torch.', '')} tensor"
    if t.is_nested:
        return "a nested tensor"
    if t.is_meta:
        return "a meta tensor (no values)"
    if t.dtype not in READABLE_DTYPES:
        return f"a {str(t.dtype).replace('torch.', '')} tensor"
    names = {c.__name__ for c in type(t).__mro__}
    hit = next((n for n in _NOT_LOCAL if n in names), None)
    return f"a {hit} (its values are not in this process's memory)" if hit else None
