"""Bound surgery records: what ``on_violation="bound"`` inserted, where, when, with which parameters.

The core plans a bound from the :class:`~boundguard.bounds.Bounds` in force (:func:`plan_bound`); an
adapter carries it out on its model (it fills in *where*), and the session keeps the record, writes it
to the alerts file, saves it in the callback's state and hands it back to the adapter on resume.

Records travel as plain dicts (checkpoints, ``state_dict``, JSON); :meth:`BoundRecord.from_dict` also
reads the dicts older versions wrote.

Example:
    >>> from boundguard import Bounds
    >>> rec = plan_bound(Bounds(0.0, 1.0), step=7)
    >>> rec.kind, rec.step
    ('sigmoid', 7)
    >>> plan_bound(Bounds(-1.0, 1.0), step=1).kind
    'tanh'
    >>> rec.activation()
    ('sigmoid', {})
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Optional

from boundguard.bounds import Bounds

__all__ = ["BoundRecord", "CannotBound", "apply_record", "plan_bound", "plan_softcap", "BOUND_KINDS"]

#: The bounding activations boundguard inserts (``softcap``: ``hi * tanh(z / hi)`` on logits a loss reads).
BOUND_KINDS = ("sigmoid", "tanh", "scaled_sigmoid", "softmax", "softcap")


class CannotBound(Exception):
    """Raised by an adapter's surgery when the bound cannot be inserted; the message says why and
    ``fix`` what the user can do instead."""

    def __init__(self, message: str, fix: str = "Add the output activation to the model yourself.") -> None:
        super().__init__(message)
        self.fix = fix


@dataclass(frozen=True)
class BoundRecord:
    """One inserted bounding activation.

    ``kind``: ``sigmoid`` (0, 1), ``tanh`` (-1, 1), ``scaled_sigmoid`` (``lo + (hi - lo) * sigmoid(z)``)
    or ``softmax`` (a distribution over ``dim``), or ``softcap`` (``hi * tanh(z / hi)``, ``lo = -hi``: logits
    kept within ``(-hi, hi)``, for a loss that applies its own softmax). ``module`` and ``path`` say where (the adapter's
    names: a module name and the path of the tensor in its output; Keras adds the model attribute
    ``attr`` and ``output=True`` for the model's output layer). ``step`` is when it was inserted.
    """

    kind: str
    lo: float = 0.0
    hi: float = 1.0
    dim: int = -1
    step: int = 0
    module: str = ""
    path: tuple = ()
    attr: Optional[str] = None
    output: bool = False
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in BOUND_KINDS:
            raise ValueError(f"BoundRecord.kind must be one of {list(BOUND_KINDS)}, got {self.kind!r}")

    def at(self, module: str, path: tuple = (), **where: Any) -> "BoundRecord":
        """The same bound, placed: ``module``/``path`` (and ``attr``, ``output``, ``dim``) filled in."""
        return replace(self, module=module, path=tuple(path), **where)

    def activation(self) -> Optional[tuple[str, dict]]:
        """The output activation (core name and parameters) the model has once this bound is in; None for a
        soft cap, which leaves logits logits (:attr:`ModelFacts.logit_cap` records it)."""
        if self.kind == "softcap":
            return None
        if self.kind == "scaled_sigmoid":
            return "scaled_sigmoid", {"lo": self.lo, "hi": self.hi}
        if self.kind == "softmax":
            return "softmax", {"dim": self.dim}
        return self.kind, {}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = list(self.path)
        extra = d.pop("extra")
        return {**extra, **d}

    @classmethod
    def from_dict(cls, d: Any) -> "BoundRecord":
        if isinstance(d, BoundRecord):
            return d
        if not isinstance(d, dict) or "kind" not in d:
            raise TypeError(f"a bound record is a dict with at least 'kind', got {d!r}")
        names = set(cls.__dataclass_fields__) - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        known["path"] = tuple(known.get("path") or ())
        for k in ("lo", "hi"):
            if k in known and known[k] is not None:
                known[k] = float(known[k])
        return cls(**known, extra={k: v for k, v in d.items() if k not in names})


def apply_record(facts: Any, record: BoundRecord) -> None:
    """What the model is once ``record`` is in: its activation becomes the facts' output activation, or
    a soft cap their :attr:`~boundguard.model_facts.ModelFacts.logit_cap`."""
    act = record.activation()
    if act is None:
        facts.logit_cap = record.hi
    else:
        facts.activation, facts.activation_params = act


def plan_softcap(cap: float, step: int) -> BoundRecord:
    """A soft cap ``cap * tanh(z / cap)`` on logits (what ``bound`` inserts for ``logits_growing``).

    Example:
        >>> plan_softcap(30.0, step=40).activation() is None
        True
    """
    if not (math.isfinite(cap) and cap > 0):
        raise ValueError(f"a soft cap must be a positive, finite number, got {cap!r}")
    return BoundRecord("softcap", -float(cap), float(cap), -1, step)


def plan_bound(bounds: Optional[Bounds], step: int, dim: int = -1) -> Optional[BoundRecord]:
    """The bounding activation for ``bounds``: sigmoid for (0, 1), tanh for (-1, 1), a scaled sigmoid
    for another finite interval, softmax for a distribution; None when no finite bound applies."""
    if bounds is None:
        return None
    if bounds.kind == "distribution":
        return BoundRecord("softmax", 0.0, 1.0, dim, step)
    if not bounds.finite:
        return None
    if (bounds.lo, bounds.hi) == (0.0, 1.0):
        kind = "sigmoid"
    elif (bounds.lo, bounds.hi) == (-1.0, 1.0):
        kind = "tanh"
    else:
        kind = "scaled_sigmoid"
    return BoundRecord(kind, float(bounds.lo), float(bounds.hi), dim, step)
