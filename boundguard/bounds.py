"""The range predictions must stay in: presets, declared values, and inference from targets and loss."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, replace
from typing import Any, Literal, Optional, Union

from boundguard.fmt import bounds_text

__all__ = ["Bounds", "BoundsSpec", "resolve_bounds", "infer_bounds", "PRESETS"]


@dataclass(frozen=True)
class Bounds:
    """A closed interval ``[lo, hi]`` for every prediction, or ``kind="distribution"``:
    every row in [0, 1] summing to 1.

    Example:
        >>> Bounds(0, 1)
        Bounds(lo=0.0, hi=1.0, kind='interval', inferred=False)
        >>> Bounds.distribution().contains_interval
        False
    """

    lo: float = 0.0
    hi: float = 1.0
    kind: str = "interval"
    inferred: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ("interval", "distribution"):
            raise ValueError(f"Bounds.kind must be 'interval' or 'distribution', got {self.kind!r}")
        for name in ("lo", "hi"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or math.isnan(v):
                raise TypeError(f"Bounds.{name} must be a number, got {v!r}")
            object.__setattr__(self, name, float(v))
        if not self.lo < self.hi:
            raise ValueError(f"Bounds needs lo < hi, got lo={self.lo}, hi={self.hi}")
        if self.kind == "distribution" and (self.lo, self.hi) != (0.0, 1.0):
            raise ValueError("a distribution's bounds are (0, 1)")

    @classmethod
    def probability(cls) -> "Bounds":
        return cls(0.0, 1.0)

    @classmethod
    def symmetric(cls) -> "Bounds":
        return cls(-1.0, 1.0)

    @classmethod
    def distribution(cls) -> "Bounds":
        return cls(0.0, 1.0, "distribution")

    @property
    def finite(self) -> bool:
        return math.isfinite(self.lo) and math.isfinite(self.hi)

    @property
    def contains_interval(self) -> bool:
        return self.kind == "interval"

    def as_inferred(self) -> "Bounds":
        return replace(self, inferred=True)

    def describe(self) -> str:
        return bounds_text(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        return {"lo": self.lo, "hi": self.hi, "kind": self.kind, "inferred": self.inferred}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Bounds":
        return cls(float(d["lo"]), float(d["hi"]), d.get("kind", "interval"), bool(d.get("inferred", False)))


PRESETS = {"probability": Bounds.probability, "symmetric": Bounds.symmetric, "distribution": Bounds.distribution}

#: What ``bounds=`` accepts: a preset name, ``None``, ``(lo, hi)`` or a :class:`Bounds`.
BoundsSpec = Union[Literal["auto", "probability", "symmetric", "distribution"], None, tuple[float, float],
                   list, Bounds]


def resolve_bounds(spec: Any) -> Union[Bounds, str, None]:
    """Turn the ``bounds`` option into a :class:`Bounds`, ``"auto"`` or ``None``; errors name the option."""
    if spec is None or isinstance(spec, Bounds):
        return spec
    if isinstance(spec, str):
        if spec == "auto":
            return "auto"
        if spec in PRESETS:
            return PRESETS[spec]()
        raise ValueError(
            f"bounds must be 'auto', None, (lo, hi), a Bounds, or one of {sorted(PRESETS)}; got {spec!r}"
        )
    if isinstance(spec, (tuple, list)):
        if len(spec) != 2:
            raise ValueError(f"bounds must be a (lo, hi) pair, got {spec!r} ({len(spec)} items)")
        lo, hi = spec
        for v in (lo, hi):
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise TypeError(f"bounds must hold two numbers (lo, hi), got {spec!r}")
        if not float(lo) < float(hi):
            raise ValueError(f"bounds must satisfy lo < hi, got {spec!r}")
        return Bounds(float(lo), float(hi))
    raise TypeError(f"bounds must be 'auto', None, (lo, hi), a Bounds, or a preset name; got {type(spec).__name__} {spec!r}")


def infer_bounds(
    target_min: float,
    target_max: float,
    *,
    target_integer: bool,
    target_onehot: bool,
    multiclass_loss: bool,
) -> Optional[Bounds]:
    """The ``"auto"`` rule of the contract.

    class-index or one-hot targets with a multi-class loss → distribution; all targets in [0, 1]
    (binary or continuous) → (0, 1); otherwise no bound.
    """
    if multiclass_loss and (target_integer or target_onehot):
        return Bounds.distribution().as_inferred()
    if math.isfinite(target_min) and math.isfinite(target_max) and 0.0 <= target_min and target_max <= 1.0:
        return Bounds.probability().as_inferred()
    return None
