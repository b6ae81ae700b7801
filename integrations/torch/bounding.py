"""Bound surgery on a torch model: a forward hook that applies the planned bounding activation.

Parameter names are unchanged (a hook, not a new module); the records come from the core
(:class:`boundguard.surgery.BoundRecord`) and are replayed on resume and by :func:`apply_bounds`.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from boundguard.integrations.torch.paths import INPUT, get_path, set_path
from boundguard.surgery import BoundRecord

__all__ = ["activation_fn", "BoundHook", "bound_records", "apply_bounds"]


def activation_fn(name: str, params: dict) -> Optional[Callable[[Tensor], Tensor]]:
    """A torch function for an activation the core names (used to replay functional activations)."""
    lo, hi = params.get("lo"), params.get("hi")
    dim = params.get("dim", -1)
    if name == "identity":
        return lambda z: z
    if name == "sigmoid":
        return torch.sigmoid
    if name == "tanh":
        return torch.tanh
    if name == "softmax":
        return lambda z: torch.softmax(z, dim=dim)
    if name == "log_softmax":
        return lambda z: torch.log_softmax(z, dim=dim)
    if name == "relu":
        return torch.relu
    if name == "clamp":
        return lambda z: torch.clamp(z, min=lo, max=hi)
    if name in ("scaled_sigmoid", "scaled_tanh") and lo is not None and hi is not None:
        a, b = float(lo), float(hi)
        if name == "scaled_sigmoid":
            return lambda z: a + (b - a) * torch.sigmoid(z)
        return lambda z: (a + b) / 2 + (b - a) / 2 * torch.tanh(z)
    return None


class BoundHook:
    """A picklable forward hook that bounds one tensor of a module's output.

    ``kind``: ``sigmoid`` | ``tanh`` | ``scaled_sigmoid`` (``lo + (hi - lo) * sigmoid(z)``) | ``softmax`` |
    ``softcap`` (``hi * tanh(z / hi)``).
    """

    def __init__(self, record: dict) -> None:
        self.record = dict(record)

    def bound(self, z: Tensor) -> Tensor:
        r = self.record
        kind = r["kind"]
        if kind == "sigmoid":
            return torch.sigmoid(z)
        if kind == "tanh":
            return torch.tanh(z)
        if kind == "softmax":
            return torch.softmax(z, dim=r.get("dim", -1))
        if kind == "softcap":  # logits kept within (-cap, cap); the loss applies its own softmax
            cap = float(r["hi"])
            return cap * torch.tanh(z / cap)
        lo, hi = float(r["lo"]), float(r["hi"])
        return lo + (hi - lo) * torch.sigmoid(z)

    def __call__(self, module: nn.Module, args: Any, *output: Any) -> Any:
        path = tuple(self.record.get("path", ()))
        if path[:1] == (INPUT,):  # registered as a forward pre-hook: bound the module's input
            if not args or not isinstance(args[0], Tensor):
                return None
            return (self.bound(args[0]),) + tuple(args[1:])
        output = output[0]
        t = get_path(output, path)
        if t is None:
            return None
        return set_path(output, path, self.bound(t))


def _is_state(obj: Any) -> bool:
    """A boundguard state: ``{"monitor": {..., "inserted": [...]}, "step": ...}`` (other callbacks' states,
    such as ModelCheckpoint's ``{"monitor": None, ...}``, are not)."""
    return isinstance(obj, Mapping) and isinstance(obj.get("monitor"), Mapping) and "inserted" in obj["monitor"]


def _checkpoint_states(ckpt: Mapping) -> list[Mapping]:
    """The boundguard states in a checkpoint: Lightning's ``callbacks`` (keyed by state key), Fabric's
    or a plain loop's own dict (``{"boundguard": guard.state_dict(), ...}``)."""
    out = []
    callbacks = ckpt.get("callbacks")
    if isinstance(callbacks, Mapping):
        out += [s for k, s in callbacks.items() if str(k).startswith("BoundGuard") and _is_state(s)]
    out += [v for v in ckpt.values() if _is_state(v)]
    return out


def bound_records(source: Any) -> list[BoundRecord]:
    """The inserted-bound records held by a guard/callback, its ``state_dict()``, a checkpoint (dict or
    path: Lightning, Fabric or a plain ``torch.save`` of a dict holding the guard's state), or a list."""
    if source is None:
        return []
    if isinstance(source, (str, Path)):
        source = torch.load(source, map_location="cpu", weights_only=False)
    if hasattr(source, "bounds_inserted"):
        return [BoundRecord.from_dict(r) for r in source.bounds_inserted]
    if isinstance(source, (list, tuple)):
        return [BoundRecord.from_dict(r) for r in source]
    if _is_state(source):
        return [BoundRecord.from_dict(r) for r in source["monitor"]["inserted"]]
    if isinstance(source, Mapping):
        if "inserted" in source and isinstance(source["inserted"], (list, tuple)):  # a monitor's state
            return [BoundRecord.from_dict(r) for r in source["inserted"]]
        return [r for state in _checkpoint_states(source) for r in bound_records(state)]
    raise TypeError(f"apply_bounds: cannot read bound records from {type(source).__name__} (expected a "
                    f"guard or callback, its state_dict(), a checkpoint dict or path, or a list of records)")


def _registered(module: nn.Module, key: tuple) -> bool:
    """A BoundHook for ``key`` (module, path) is already on ``module``: never stack a second bound."""
    hooks = list(module._forward_hooks.values()) + list(module._forward_pre_hooks.values())
    return any(isinstance(h, BoundHook) and _key(h.record) == key for h in hooks)


def _key(rec: Any) -> tuple:
    return (rec["module"], tuple(rec.get("path", ()))) if isinstance(rec, Mapping) else (rec.module, tuple(rec.path))


def apply_bounds(model: nn.Module, source: Any) -> list[dict]:
    """Insert the bounding activations boundguard recorded into ``model`` (for inference or export).

    ``source`` is a guard or callback, its ``state_dict()``, a checkpoint (dict or path), or a list of
    records. Idempotent: a bound already on the model is not applied twice. Parameter names are
    unchanged. Returns the records applied (as dicts).

    Example:
        >>> # model = LitModel.load_from_checkpoint("last.ckpt"); apply_bounds(model, "last.ckpt")
    """
    records = bound_records(source)
    modules = dict(model.named_modules())
    for rec in records:
        m = modules.get(rec.module)
        if m is None:
            raise ValueError(f"apply_bounds: the model has no module named {rec.module!r} "
                             f"(modules: {', '.join(repr(n) for n in list(modules)[:8])}...)")
        if _registered(m, _key(rec)):
            continue
        hook = BoundHook(rec.to_dict())
        if rec.path[:1] == (INPUT,):
            m.register_forward_pre_hook(hook)
        else:
            m.register_forward_hook(hook)
    return [r.to_dict() for r in records]
