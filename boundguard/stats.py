"""Statistics declared once (name, reduce op, neutral value); everything else derives from the declaration.

Each statistic is one :class:`Stat`: the tensor it watches (``kind``), its name, how steps and
processes combine it (``reduce``), and how a device computes it (``source``): ``"row"`` statistics are
reduced from the tensor every step into a row column (min, max, sum of squares, row-sum error), and
``"count"`` statistics are counts of elements (finite, below/above the bounds, pinned, in the tail)
that an adapter may accumulate over the whole interval. Adapters derive their device layout from
:func:`row_stats` / :func:`count_stats`, the neutral value a buffer is reset to from
:attr:`Stat.neutral`, and the cross-process combination and its dtype from :attr:`Stat.sync` and
:attr:`Stat.dtype`; so a new
statistic is one line here (plus the kernel that computes it and the rule that reads it).

At a check the rows come to the host in one transfer and :meth:`Snapshot.from_rows` reduces them
here, with numpy; :func:`merge_rows` is the same merge a cross-process all-reduce performs.

Example:
    >>> [s.field for s in row_stats("pre")]
    ['min', 'max', 'sumsq', 'lse', 'lse_rows']
    >>> Stat("loss", "value", "step").sync
    'mean'
    >>> Stat("grad", "sumsq", "sum").sync, Stat("pred", "finite", "sum", "count").dtype
    ('replicated', 'count')
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import numpy as np

from boundguard.bounds import Bounds
from boundguard.fmt import json_float
from boundguard.model_facts import ModelFacts

__all__ = ["Stat", "STATS", "CountingPlan", "TAIL_THRESHOLD", "COLUMNS", "KINDS", "LOSS_COLUMN", "fields_of", "row_stats",
           "count_stats", "neutral_row", "reduce_rows", "fold_rows", "merge_rows", "rms_of", "Snapshot"]


@dataclass(frozen=True)
class Stat:
    kind: str  # pred | pre | target | input | loss
    field: str
    reduce: str  # min | max | sum | step (per step, kept as a series)
    source: str = "row"  # row: reduced per step into a row column | count: an element count

    @property
    def name(self) -> str:
        return f"{self.kind}.{self.field}"

    @property
    def neutral(self) -> float:
        """The identity of the reduce op: what an empty buffer cell holds."""
        return {"min": math.inf, "max": -math.inf, "sum": 0.0, "step": math.nan}[self.reduce]

    @property
    def sync(self) -> str:
        """How processes combine this statistic: ``min`` | ``max`` | ``sum`` | ``mean`` (per-step values) |
        ``replicated``: the same on every process, kept as it is (the head's gradients, all-reduced by
        data-parallel training before the optimiser step; summing them would count one step once per rank)."""
        if self.kind in _REPLICATED_KINDS:
            return "replicated"
        return "mean" if self.reduce == "step" else self.reduce

    @property
    def sync_sharded(self) -> str:
        """How processes combine this statistic when each holds a shard of the tensor (FSDP's sharded
        gradients): a replicated statistic's parts add up (the squared norms of the shards sum to the
        squared norm of the whole) and its finite flag holds only where every shard's does (``min``); the
        others combine as :attr:`sync` says."""
        if self.sync == "replicated":
            return "min" if self.field == "finite" else "sum"
        return self.sync

    @property
    def dtype(self) -> str:
        """``count`` (an element count: exact integers, int64 across processes, never float32, which stops
        counting exactly at 2**24) or ``value`` (a float statistic)."""
        return "count" if self.source == "count" else "value"


#: Kinds whose statistics are the same on every process of data-parallel training (see :attr:`Stat.sync`).
_REPLICATED_KINDS = frozenset({"grad"})


#: The element counts (reduce ``sum``, accumulated over an interval); every other statistic is a row value.
_COUNT_FIELDS = ("finite", "below", "above", "pinned", "tail", "nonbinary")


def _declare(kind: str, *fields: tuple[str, str]) -> list[Stat]:
    """Statistics of one kind; element counts (:data:`_COUNT_FIELDS`) are ``count``, the rest ``row``."""
    return [Stat(kind, f, r, "count" if f in _COUNT_FIELDS else "row") for f, r in fields]


#: Per watched tensor: min/max over all elements (NaN if any element was NaN), count of finite
#: elements, and kind-specific counts. ``n`` (elements seen) is counted on the host from shapes; for
#: ``grad`` it is the number of steps whose gradients were recorded.
STATS: tuple[Stat, ...] = tuple(
    _declare("pred", ("min", "min"), ("max", "max"), ("finite", "sum"), ("below", "sum"), ("above", "sum"),
             ("pinned", "sum"), ("rowsum_err", "max"))
    + _declare("pre", ("min", "min"), ("max", "max"), ("finite", "sum"), ("sumsq", "sum"), ("tail", "sum"),
               # logits over classes (a softmax head fed to a cross-entropy on logits): the sum of
               # logsumexp over the rows read and how many rows (an adapter may read a sample of them)
               ("lse", "sum"), ("lse_rows", "sum"))
    + _declare("target", ("min", "min"), ("max", "max"), ("finite", "sum"), ("nonbinary", "sum"), ("sum", "sum"),
               ("sumsq", "sum"))
    + _declare("input", ("min", "min"), ("max", "max"), ("finite", "sum"), ("sumsq", "sum"))
    # the head's gradients, one value per step (not per element): the squared norm of the output layer's
    # parameter gradients (summed over the interval, its largest and smallest step) and whether it was finite
    + [Stat("grad", "sumsq", "sum"), Stat("grad", "normsq_max", "max"), Stat("grad", "normsq_min", "min"),
       Stat("grad", "finite", "sum")]
    + _declare("loss", ("value", "step"))
)
COLUMNS: tuple[str, ...] = tuple(s.name for s in STATS)
KINDS = ("pred", "pre", "target", "input", "grad")
LOSS_COLUMN = COLUMNS.index("loss.value")
_OPS = np.array([s.reduce for s in STATS])
_SYNC = np.array([s.sync for s in STATS])
_BY_OP = {op: np.flatnonzero(_OPS == op) for op in ("min", "max", "sum")}
#: the reduced columns (all but the per-step ones), in :data:`COLUMNS` order, and their names
_REDUCED = np.flatnonzero(_OPS != "step")
_REDUCED_NAMES = tuple(COLUMNS[i] for i in _REDUCED)
_FIELDS = {k: tuple(s.field for s in STATS if s.kind == k) for k in KINDS + ("loss",)}
#: the statistics log's keys, spelled once: per kind its count, non-finite count, finite column, columns
_RECORD_KEYS = {k: (f"{k}.n", f"{k}.nonfinite", f"{k}.finite", tuple(f"{k}.{f}" for f in _FIELDS[k])) for k in KINDS}
_LOSS_KEYS = {k: f"loss.{k}" for k in ("mean", "min", "max", "last", "nonfinite", "count")}


def fields_of(kind: str) -> tuple[str, ...]:
    """The names of the statistics of ``kind``, in column order."""
    return _FIELDS.get(kind) or tuple(s.field for s in STATS if s.kind == kind)


def row_stats(kind: str) -> tuple[Stat, ...]:
    """The statistics of ``kind`` a device reduces per step into row columns, in column order."""
    return tuple(s for s in STATS if s.kind == kind and s.source == "row")


def count_stats(kind: str) -> tuple[Stat, ...]:
    """The element counts of ``kind`` (accumulated over an interval), in column order."""
    return tuple(s for s in STATS if s.kind == kind and s.source == "count")


def neutral_row() -> np.ndarray:
    """The row a buffer is reset to: the identity of each column's reduce op."""
    return np.array([s.neutral for s in STATS], dtype=np.float64)


def reduce_rows(rows: np.ndarray) -> dict[str, float]:
    """Reduce ``(steps, len(COLUMNS))`` rows column by column with the declared op.

    ``min``/``max`` propagate NaN (a NaN anywhere in the interval is not hidden); the per-step
    ``loss`` column is not reduced here (see :meth:`Snapshot.from_rows`).
    """
    rows = np.asarray(rows, dtype=np.float64).reshape(-1, len(COLUMNS))
    if rows.shape[0] == 0:
        rows = neutral_row()[None]
    with np.errstate(invalid="ignore", over="ignore"):  # inf + -inf is NaN, as on the device: no warning
        return _reduce_columns(rows)


def _reduce_columns(rows: np.ndarray) -> dict[str, float]:
    reduced = np.empty(len(STATS))
    reduced[_BY_OP["min"]] = rows[:, _BY_OP["min"]].min(axis=0)
    reduced[_BY_OP["max"]] = rows[:, _BY_OP["max"]].max(axis=0)
    reduced[_BY_OP["sum"]] = rows[:, _BY_OP["sum"]].sum(axis=0)
    return dict(zip(_REDUCED_NAMES, reduced[_REDUCED].tolist()))


def fold_rows(rows: np.ndarray) -> np.ndarray:
    """``(steps, len(COLUMNS))`` rows folded into one row by each column's reduce op (an adapter that moves
    a block of an interval to the host before the check keeps this row and the block's per-step losses;
    the folded row's loss column is NaN)."""
    rows = np.asarray(rows, dtype=np.float64).reshape(-1, len(COLUMNS))
    if rows.shape[0] == 0:
        return neutral_row()
    values = reduce_rows(rows)
    return np.array([values.get(s.name, math.nan) for s in STATS], dtype=np.float64)


def merge_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Element-wise merge of two processes' buffers of rows, by each column's :attr:`Stat.sync`: what the
    adapters' all-reduce computes (the reference it is tested against). ``min``/``max`` propagate NaN;
    per-step values (the loss) are the mean of the processes' values, so a NaN loss on any process stays
    NaN; replicated columns keep ``a``'s value (this process's, the same on every process)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    out = a + b
    out[..., _SYNC == "min"] = np.minimum(a[..., _SYNC == "min"], b[..., _SYNC == "min"])
    out[..., _SYNC == "max"] = np.maximum(a[..., _SYNC == "max"], b[..., _SYNC == "max"])
    out[..., _SYNC == "mean"] = (a[..., _SYNC == "mean"] + b[..., _SYNC == "mean"]) / 2
    out[..., _SYNC == "replicated"] = a[..., _SYNC == "replicated"]
    return out


def rms_of(sumsq: Any, finite: Any, absmax: Any, nonfinite: Any) -> Any:
    """Root mean square of a kind's finite values from its statistics, for numbers or arrays of them (one
    per check): ``sqrt(sumsq / finite)``, NaN without finite values. When the fp32 sum of squares
    overflowed (values near 1e19 and above, e.g. raw timestamps) it is the lower bound
    ``absmax / sqrt(finite)``.

    >>> float(rms_of(8.0, 2, 2.0, 0)), float(rms_of(float("inf"), 4, 1e20, 0)), float(rms_of(0.0, 0, 0.0, 0))
    (2.0, 5e+19, nan)
    """
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        sumsq, finite = np.asarray(sumsq, dtype=np.float64), np.asarray(finite, dtype=np.float64)
        overflowed = np.isinf(sumsq) & (np.asarray(nonfinite) == 0)
        value = np.where(overflowed, np.asarray(absmax, dtype=np.float64) / np.sqrt(finite), np.sqrt(sumsq / finite))
        return np.where(finite > 0, value, np.nan)


@dataclass
class Snapshot:
    """The statistics of one check interval (steps ``first_step``..``step``), as plain numbers.

    ``values`` maps ``"<kind>.<field>"`` to a float; ``counts`` maps a kind to the number of
    elements seen; ``losses`` holds the per-step loss (NaN where the step's loss was non-finite).
    """

    step: int
    first_step: int
    epoch: Optional[int]
    values: dict[str, float]
    counts: dict[str, int]
    losses: np.ndarray
    loss_steps: np.ndarray  # the step number of each entry of ``losses``

    @classmethod
    def from_rows(
        cls,
        rows: np.ndarray,
        counts: dict[str, int],
        *,
        step: int,
        first_step: int,
        epoch: Optional[int] = None,
        loss_seen: Optional[Iterable[bool]] = None,
        losses: Optional[np.ndarray] = None,
    ) -> "Snapshot":
        """``rows``: one per step, the loss in its column; or, with ``losses`` (one per step), any number
        of rows (an adapter that folded blocks of steps into one row) whose loss column is ignored."""
        rows = np.asarray(rows, dtype=np.float64).reshape(-1, len(COLUMNS))
        values = reduce_rows(rows)
        series = rows[:, LOSS_COLUMN] if losses is None else np.asarray(losses, dtype=np.float64).reshape(-1)
        seen = np.ones(series.shape[0], bool) if loss_seen is None else np.asarray(list(loss_seen), bool)
        seen = seen[: series.shape[0]]
        losses = series[: len(seen)][seen]
        loss_steps = np.arange(first_step, first_step + len(seen))[seen]
        return cls(step, first_step, epoch, values, {k: int(counts.get(k, 0)) for k in KINDS}, losses, loss_steps)

    # ------------------------------------------------------------------ derived numbers
    def seen(self, kind: str) -> bool:
        return self.counts.get(kind, 0) > 0

    def get(self, name: str) -> float:
        return self.values[name]

    def nonfinite(self, kind: str) -> int:
        return max(0, int(round(self.counts.get(kind, 0) - self.values[f"{kind}.finite"])))

    def has_nonfinite(self) -> bool:
        """A NaN/Inf anywhere in the interval: a watched tensor or a step's loss."""
        return any(self.nonfinite(k) for k in KINDS) or not bool(np.isfinite(self.losses).all())

    def share(self, kind: str, field: str) -> float:
        n = self.counts.get(kind, 0)
        return self.values[f"{kind}.{field}"] / n if n else 0.0

    def out_of_bounds(self) -> int:
        return int(round(self.values["pred.below"] + self.values["pred.above"]))

    def absmax(self, kind: str) -> float:
        return max(abs(self.values[f"{kind}.min"]), abs(self.values[f"{kind}.max"]))

    def mean_lse(self) -> Optional[float]:
        """The mean logsumexp of the logits' rows over the interval (what z-loss penalises); None when no
        rows were read (a head that is not softmax logits, or an adapter that does not read them)."""
        rows = self.values.get("pre.lse_rows", 0.0)
        return self.values["pre.lse"] / rows if rows > 0 else None

    def rms(self, kind: str) -> float:
        """Root mean square of the finite values (:func:`rms_of`: the lower bound ``absmax / sqrt(n)`` when
        the fp32 sum of squares overflowed)."""
        v = self.values
        return float(rms_of(v[f"{kind}.sumsq"], v[f"{kind}.finite"], self.absmax(kind), self.nonfinite(kind)))

    @property
    def steps(self) -> int:
        return self.step - self.first_step + 1

    def loss_summary(self) -> dict[str, Any]:
        xs = self.losses.tolist()  # (an interval's few losses: Python's builtins beat numpy's calls)
        fin = [x for x in xs if x - x == 0.0]  # finite (inf - inf and NaN - NaN are NaN)
        n = len(fin)
        return {
            "mean": math.fsum(fin) / n if n else None,
            "min": min(fin) if n else None,
            "max": max(fin) if n else None,
            "last": xs[-1] if xs and xs[-1] - xs[-1] == 0.0 else None,
            "nonfinite": len(xs) - n,
            "count": len(xs),
        }

    def metrics(self) -> dict[str, float]:
        """The numbers adapters log through the framework's loggers (keys ``boundguard/<stat>``)."""
        m: dict[str, float] = {}
        if self.seen("pred"):
            m["boundguard/output_min"] = self.values["pred.min"]
            m["boundguard/output_max"] = self.values["pred.max"]
            m["boundguard/out_of_bounds_share"] = self.out_of_bounds() / self.counts["pred"]
        if self.seen("pre"):
            m["boundguard/preact_absmax"] = self.absmax("pre")
            m["boundguard/preact_rms"] = self.rms("pre")
            lse = self.mean_lse()
            if lse is not None:
                m["boundguard/logit_lse_mean"] = lse
        if self.seen("input"):
            m["boundguard/input_rms"] = self.rms("input")
        if self.seen("grad") and not self.nonfinite("grad"):
            m["boundguard/head_grad_norm_max"] = math.sqrt(max(self.values["grad.normsq_max"], 0.0))
        loss = self.loss_summary()
        if loss["mean"] is not None:
            m["boundguard/loss_mean"] = loss["mean"]
        return {k: float(v) for k, v in m.items()}

    def to_record(self) -> dict[str, Any]:
        """The flat, JSON-safe record of the statistics log."""
        rec: dict[str, Any] = {"step": self.step, "first_step": self.first_step, "epoch": self.epoch}
        values, counts = self.values, self.counts
        for kind in KINDS:
            key_n, key_nonfinite, key_finite, keys = _RECORD_KEYS[kind]
            n = counts.get(kind, 0)
            rec[key_n] = n
            if not n:
                continue
            for key in keys:
                v = values[key]  # finite as it is, non-finite spelled (strict JSON: boundguard.fmt)
                rec[key] = v if v - v == 0.0 else json_float(v)
            rec[key_nonfinite] = max(0, int(round(n - values[key_finite])))  # (as nonfinite())
        for k, v in self.loss_summary().items():
            rec[_LOSS_KEYS[k]] = v
        return rec


#: |pre-activation| beyond which sigmoid / tanh are in their flat tail (derivative < ~1e-2): the ``tail``
#: count of :class:`CountingPlan`, judged by ``output_saturated``.
TAIL_THRESHOLD = {"sigmoid": 6.0, "scaled_sigmoid": 6.0, "tanh": 3.0, "scaled_tanh": 3.0}


@dataclass(frozen=True)
class CountingPlan:
    """What the device counts for the prediction and pre-activation: values below ``lo`` / above ``hi``
    (the bounds in force), rows that should sum to 1 (``distribution``, along ``class_dim``), values
    pinned at clamp points (``pin``), pre-activations in the flat tail of sigmoid/tanh (``tail``), and which
    target value the loss ignores (``target_ignore``: left out of the target statistics)."""

    lo: Optional[float] = None
    hi: Optional[float] = None
    distribution: bool = False
    pin: Optional[tuple[Optional[float], Optional[float]]] = None
    tail: Optional[float] = None
    class_dim: int = -1
    target_ignore: Optional[float] = None

    @classmethod
    def of(cls, bounds: Optional[Bounds], facts: ModelFacts) -> "CountingPlan":
        lo = hi = None
        if bounds is not None:
            lo, hi = bounds.lo, bounds.hi
        class_dim = 1 if facts.loss is not None and facts.loss.multiclass else -1
        if facts.activation == "softmax":
            class_dim = int(facts.activation_params.get("dim", -1))
        pin = None
        if facts.activation == "clamp":
            pin = (facts.activation_params.get("lo"), facts.activation_params.get("hi"))
        return cls(lo, hi, bool(bounds is not None and bounds.kind == "distribution"), pin,
                   TAIL_THRESHOLD.get(facts.activation), class_dim, facts.target_ignore)
