"""Tensors inside nested structures (batches, model outputs): find, read, replace, name them."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields, is_dataclass
from typing import Any, Iterator, Optional

from torch import Tensor

__all__ = ["flatten", "get_path", "set_path", "describe_path", "guess", "INPUT", "INPUT_KEYS", "TARGET_KEYS"]

INPUT = "<input>"  # path marker: a module's first positional input, not its output
INPUT_KEYS = ("x", "input", "inputs", "features", "image", "images", "pixel_values", "input_ids", "data", "src")
TARGET_KEYS = ("y", "target", "targets", "label", "labels", "y_true")


def flatten(obj: Any, prefix: tuple = (), depth: int = 0) -> Iterator[tuple[tuple, Tensor]]:
    """Every tensor in a nested structure (tuple/list/dict/ModelOutput/dataclass) with its path."""
    if isinstance(obj, Tensor):
        yield prefix, obj
    elif depth > 6:
        return
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from flatten(v, prefix + (k,), depth + 1)
    elif isinstance(obj, (tuple, list)):
        for i, v in enumerate(obj):
            yield from flatten(v, prefix + (i,), depth + 1)
    elif is_dataclass(obj) and not isinstance(obj, type):
        for f in fields(obj):
            yield from flatten(getattr(obj, f.name, None), prefix + (f.name,), depth + 1)


def get_path(obj: Any, path: tuple) -> Optional[Tensor]:
    """The tensor at ``path`` in ``obj``, or None when the structure does not have it."""
    for key in path:
        try:
            if isinstance(obj, (tuple, list, dict)) or isinstance(obj, Mapping):  # (the ABC check is slow)
                obj = obj[key]
            else:
                obj = getattr(obj, key)
        except (KeyError, IndexError, TypeError, AttributeError):
            return None
    return obj if isinstance(obj, Tensor) else None


def set_path(obj: Any, path: tuple, value: Tensor) -> Any:
    """A copy of ``obj`` with the tensor at ``path`` replaced (tuples rebuilt, dicts copied)."""
    if not path:
        return value
    key, rest = path[0], path[1:]
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        nt: Any = obj
        return nt._replace(**{nt._fields[key]: set_path(obj[key], rest, value)})
    if isinstance(obj, tuple):
        return tuple(set_path(v, rest, value) if i == key else v for i, v in enumerate(obj))
    if isinstance(obj, list):
        return [set_path(v, rest, value) if i == key else v for i, v in enumerate(obj)]
    if isinstance(obj, Mapping):
        cls: Any = type(obj)
        new: Any = cls(obj) if not hasattr(obj, "to_tuple") else obj  # keep ModelOutput types
        new[key] = set_path(obj[key], rest, value)
        return new
    setattr(obj, key, set_path(getattr(obj, key), rest, value))
    return obj


def describe_path(root: str, path: tuple) -> str:
    return root + "".join(f"[{p!r}]" if isinstance(p, str) else f"[{p}]" for p in path)


def guess(tensors: list[tuple[tuple, Tensor]], keys: tuple[str, ...], position: int) -> Optional[tuple]:
    """The path of a batch entry by conventional name (``x``, ``labels``...), else by position."""
    for path, _ in tensors:
        if len(path) == 1 and isinstance(path[0], str) and path[0].lower() in keys:
            return path
    for path, _ in tensors:
        if path == (position,):
            return path
    return None
