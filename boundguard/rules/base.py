"""The rules' common ground: what a rule sees (:class:`Context`), what it reports (:class:`Finding`), its base
class (:class:`Rule`) and the kinds of its thresholds.

Each rule declares its thresholds (``params``, the defaults) and the kind of each (``kinds``: a share in
[0, 1], a whole count, a ratio >= 1, a margin >= 0; any other is a positive number), so an override is
checked against what that rule means by it, never against another rule's threshold of the same name.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Callable, Optional

from boundguard.bounds import Bounds
from boundguard.history import History
from boundguard.model_facts import ModelFacts
from boundguard.stats import TAIL_THRESHOLD, Snapshot

__all__ = ["Finding", "Context", "Rule", "Kind", "SHARE", "RATIO", "MARGIN", "POSITIVE", "count", "pct",
           "TAIL_THRESHOLD", "FP16_MAX", "DEGENERATE", "ROWSUM_TOL"]

#: The largest finite float16.
FP16_MAX = 65504.0
#: Targets this close to constant (a positive rate within it of 0 or 1, a variance below it of their
#: mean square) leave no constant-predictor loss to compare with (``loss_at_baseline`` is silent).
DEGENERATE = 1e-3
#: Distribution rows may sum to 1 only up to rounding in low precision.
ROWSUM_TOL = 1e-2


@dataclass
class Finding:
    code: str
    where: str
    message: str
    value: Optional[float] = None
    threshold: Optional[float] = None
    severity: Optional[str] = None  # None: the catalogue's default
    fix: Optional[str] = None  # None: the catalogue's fix
    details: dict = field(default_factory=dict)


@dataclass
class Context:
    """What a rule sees: the interval's snapshot, the facts, the bounds in force, the history with this
    interval folded in, and ``before``, the history as it was before the interval (for rules that
    compare each step of the interval with the past, such as ``loss_spike``)."""

    snap: Snapshot
    facts: ModelFacts
    bounds: Optional[Bounds]
    history: History
    before: Optional[History] = None
    onehot: bool = False  # the targets were one-hot rows
    @property
    def past(self) -> History:
        return self.before if self.before is not None else self.history

    @property
    def span(self) -> str:
        s = self.snap
        return f"step {s.step}" if s.first_step == s.step else f"steps {s.first_step}-{s.step}"

    def where(self, kind: str) -> str:
        f = self.facts
        return {
            "pred": f.pred_where or "prediction",
            "pre": f.pre_where or f.pred_where or "pre-activation",
            "target": f.target_where or "targets",
            "input": f.input_where or "inputs",
            "loss": f.loss_where or "loss",
            "grad": f.grad_where or f.pre_where or f.pred_where or "output layer",
        }[kind]


@dataclass(frozen=True)
class Kind:
    """What a threshold is: ``ok`` says whether a value fits, ``says`` how the error explains it."""

    name: str
    ok: Callable[[float], bool]
    says: str


SHARE = Kind("share", lambda v: 0.0 <= v <= 1.0, "is a share and must be in [0, 1]")
RATIO = Kind("ratio", lambda v: math.isfinite(v) and v >= 1, "is a ratio and must be a finite number >= 1")
MARGIN = Kind("margin", lambda v: math.isfinite(v) and v >= 0, "must be a finite number >= 0")
POSITIVE = Kind("positive", lambda v: math.isfinite(v) and v > 0, "must be a positive, finite number")


def count(minimum: int) -> Kind:
    """A whole number of steps or checks, at least ``minimum``."""
    return Kind("count", lambda v: v == int(v) and v >= minimum, f"must be a whole number >= {minimum}")


class Rule:
    """Base class: ``code`` names the alert, ``params`` its thresholds (overridable per run) and ``kinds``
    the kind of each (:data:`POSITIVE` where not named)."""

    code: str = ""
    params: dict[str, float] = {}
    kinds: dict[str, Kind] = {}

    def __init__(self, **overrides: float) -> None:
        unknown = set(overrides) - set(type(self).params)
        if unknown:
            raise ValueError(
                f"thresholds[{self.code!r}] got unknown keys {sorted(unknown)}; expected some of {sorted(type(self).params)}"
            )
        for k, v in overrides.items():
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or v != v:
                raise TypeError(f"thresholds[{self.code!r}][{k!r}] must be a number, got {v!r}")
            kind = type(self).kinds.get(k, POSITIVE)
            if not kind.ok(float(v)):
                raise ValueError(f"thresholds[{self.code!r}][{k!r}] {kind.says}, got {v!r}")
        self.p = {**type(self).params, **{k: float(v) for k, v in overrides.items()}}

    def evaluate(self, ctx: Context) -> list[Finding]:  # pragma: no cover - abstract
        raise NotImplementedError


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"

