"""On-device statistics for torch: every watched tensor reduced into one preallocated buffer.

The layout is derived from the declaration in :mod:`boundguard.stats`: the ``row`` statistics of each
kind are row columns written with ``out=`` every step, the ``count`` statistics come from bins, the
neutral values and the cross-process reduce ops are the declared ones.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from boundguard.session import CountingPlan
from boundguard.stats import COLUMNS, KINDS, LOSS_COLUMN, neutral_row, row_stats

__all__ = ["Reducer"]


class Reducer:
    """Per-step statistics reduced on the device into one preallocated buffer.

    Layout (one device allocation, typed views into its bytes): ``rows`` (fp32) — one row per step
    with each watched tensor's min / max / sum of squares (and the row-sum error of a distribution)
    and the loss, written in place with ``out=``; ``bins`` (int64) — per watched tensor, counts of
    values between a few edges (the bounds, clamp points, 0 and 1 for targets, ±inf), accumulated
    over the interval with ``bucketize`` + ``index_add_``. Four small kernels per tensor per step and
    no host synchronisation: only shapes (host metadata) are read between checks. :meth:`read` moves
    the whole buffer to the host in one transfer and turns it into the core's rows
    (:data:`boundguard.stats.COLUMNS`).
    """

    #: Per kind, the declared ``row`` statistics (:func:`boundguard.stats.row_stats`), in column order.
    ROW = {k: tuple(s.field for s in row_stats(k)) for k in KINDS}
    #: Per kind and row field, the declared reduce op (min | max | sum): merge, neutral value, all-reduce.
    OPS = {k: {s.field: s.reduce for s in row_stats(k)} for k in KINDS}
    MAX_BINS = 16
    #: Per watched tensor, up to this many elements per interval are staged as raw values (one copy
    #: per step) and reduced in one batch at the check; larger tensors are reduced every step.
    STAGE_ELEMENTS = 1 << 18
    STAGE_ROW_CAP = 4096
    #: Tensors this large count finite values without bucketize when no bound or threshold applies.
    FAST_COUNT_MIN = 1 << 14

    def __init__(self, rows: int, device: torch.device, stage_elements: Optional[int] = None) -> None:
        self.device = device
        self.n_rows = rows
        offs, o = {}, 0
        for kind, fs in self.ROW.items():
            offs[kind] = o
            o += len(fs)
        self.loss_col = o
        self.width = o + 1
        row_bytes = -(-rows * self.width * 4 // 8) * 8  # int64 bins start 8-byte aligned
        nbins = self.MAX_BINS * len(self.ROW)
        self.raw = torch.zeros(row_bytes + nbins * 8, dtype=torch.uint8, device=device)
        self.rows = self.raw[: rows * self.width * 4].view(torch.float32).view(rows, self.width)
        bins = self.raw[row_bytes:].view(torch.int64)
        self._row_bytes = row_bytes
        self.bins = {k: bins[i * self.MAX_BINS: (i + 1) * self.MAX_BINS] for i, k in enumerate(self.ROW)}
        self.bin_cells = {k: (b[2], b[3]) for k, b in self.bins.items()}  # [-MAX, inf) and +inf/NaN
        neutral = [s.neutral for k in KINDS for s in row_stats(k)] + [row_stats("loss")[0].neutral]
        self.neutral_row = torch.tensor(neutral, dtype=torch.float32, device=device)
        # per row and kind, the 0-d views the kernels write into with out=
        self.cells = [{k: [self.rows[i, offs[k] + j] for j in range(len(fs))] for k, fs in self.ROW.items()}
                      for i in range(rows)]
        self.loss_cells = [self.rows[i, self.loss_col] for i in range(rows)]
        self.offs = offs
        self.one = torch.ones((), dtype=torch.int64, device=device)
        self._ones: dict[int, Tensor] = {}
        self.edges: dict[str, torch.Tensor] = {}
        self.edge_values: dict[str, list[float]] = {}
        self.row = 0
        self.counts = {k: 0 for k in self.ROW}
        self.loss_seen = [False] * rows
        self._written: set[str] = set()
        # what pred/pre statistics count; set before configure()
        self.lo: Optional[float] = None
        self.hi: Optional[float] = None
        self.distribution = False
        self.class_dim = 1
        self.pin: Optional[tuple[Optional[float], Optional[float]]] = None
        self.tail: Optional[float] = None
        self.shared = False  # pred is the pre-activation tensor itself (identity head)
        budget = self.STAGE_ELEMENTS if stage_elements is None else stage_elements
        self.cap = min(self.STAGE_ROW_CAP, budget // rows)
        self.stage = {k: torch.empty((rows, self.cap), dtype=torch.float32, device=device) for k in self.ROW} \
            if self.cap > 0 else {}
        self.stage_rows = {k: [b[i] for i in range(rows)] for k, b in self.stage.items()}
        self.staged = {k: [0] * rows for k in self.stage}  # elements staged per row (host ints)
        self.configure()
        self._reset()

    def apply(self, plan: CountingPlan) -> None:
        """Count what ``plan`` says (the bounds in force, clamp pins, the sigmoid/tanh tail) from now on."""
        self.lo, self.hi, self.distribution = plan.lo, plan.hi, plan.distribution
        self.class_dim, self.pin, self.tail = plan.class_dim, plan.pin, plan.tail
        self.configure()

    def configure(self) -> None:
        """(Re)build each tensor's bin edges from the bounds, clamp points and tail threshold in force."""
        points = {
            "pred": [p for p in (self.lo, self.hi) + tuple(self.pin or ()) if p is not None and math.isfinite(p)],
            "pre": [-self.tail, self.tail] if self.tail is not None else [],
            "target": [0.0, 1.0],
            "input": [],
        }
        for kind, ps in points.items():
            e = [-math.inf, -_F32_MAX]
            for p in sorted(set(ps)):
                e += [p, _next32(p)]
            e.append(math.inf)
            e = sorted(e)
            self.edge_values[kind] = e
            self.edges[kind] = torch.tensor(e, dtype=torch.float32, device=self.device)

    def discard(self) -> None:
        """Forget the rows of the current interval (no transfer): the next row is row 0."""
        self.flush()
        self._reset()
        self.row = 0
        self._written = set()
        self.counts = {k: 0 for k in self.counts}
        self.loss_seen = [False] * self.n_rows

    def _reset(self) -> None:
        self.rows.copy_(self.neutral_row.expand(self.n_rows, -1))
        self.raw[self._row_bytes:].zero_()

    def _flat(self, t: Tensor) -> Tensor:
        t = t.detach()
        if t.device != self.device:  # e.g. a head on another device than the buffer
            t = t.to(self.device, non_blocking=True)
        if t.dtype != torch.float32:
            t = t.float()
        return t.reshape(-1)

    def _cells(self, kind: str) -> tuple[list[Tensor], Optional[list[Tensor]]]:
        """Where this step's values of ``kind`` go; a second call in one step writes to scratch and merges."""
        cells = self.cells[self.row][kind]
        if kind not in self._written:
            self._written.add(kind)
            return cells, None
        return [torch.full((), _NEUTRAL[self.OPS[kind][f]], dtype=torch.float32, device=self.device)
                for f in self.ROW[kind]], cells  # neutral scratch

    def _merge(self, kind: str, new: list[Tensor], dst: Optional[list[Tensor]]) -> None:
        if dst is None:
            return
        for f, n, d in zip(self.ROW[kind], new, dst):
            op = self.OPS[kind][f]
            if op == "min":
                torch.minimum(d, n, out=d)
            elif op == "max":
                torch.maximum(d, n, out=d)
            else:
                d.add_(n)

    def _stage(self, kind: str, t: Tensor, n: int) -> bool:
        """Copy a small tensor's values into this step's staging row (one kernel); False: reduce now."""
        if n > self.cap or kind in self._written or (kind == "pred" and self.distribution):
            return False
        self._written.add(kind)
        self.stage_rows[kind][self.row][:n].copy_(t.detach().reshape(-1))
        self.staged[kind][self.row] = n
        return True

    def flush(self) -> None:
        """Reduce the staged values of the interval into the rows and bins (a few kernels per run of
        equal-sized steps); called at the check, before the buffer is merged across processes or read."""
        used = max(self.row, 1)
        for kind, lens in self.staged.items():
            if not any(lens[:used]):
                continue
            bins_kind = "pred" if kind == "pre" and self.shared else kind
            start = 0
            while start < used:
                n = lens[start]
                end = start + 1
                while end < used and lens[end] == n:
                    end += 1
                if n:
                    self._reduce_block(kind, bins_kind, self.stage[kind][start:end, :n], start, end)
                start = end
            for i in range(used):
                lens[i] = 0

    def _reduce_block(self, kind: str, bins_kind: str, block: Tensor, a: int, b: int) -> None:
        off = self.offs[kind]
        mn, mx = torch.aminmax(block, dim=1)
        cols = self.rows[a:b]
        cols[:, off].copy_(torch.minimum(cols[:, off], mn))
        cols[:, off + 1].copy_(torch.maximum(cols[:, off + 1], mx))
        if "sumsq" in self.ROW[kind]:
            j = off + self.ROW[kind].index("sumsq")
            cols[:, j].add_((block * block).sum(1))
        idx = torch.bucketize(block.contiguous(), self.edges[bins_kind], right=True).reshape(-1)
        self.bins[bins_kind].index_add_(0, idx, self.one.expand(idx.shape[0]))

    def _bin(self, kind: str, f: Tensor) -> None:
        n = f.shape[0]
        if n >= self.FAST_COUNT_MIN and len(self.edge_values[kind]) == 3:
            # no interior edges: only finite vs not counts. (f - f) is 0 where f is finite and NaN
            # elsewhere: two light passes instead of a binary search and a scatter over every element.
            finite_bin, other_bin = self.bin_cells[kind]
            bad = torch.count_nonzero(f - f)
            other_bin.add_(bad)
            finite_bin.add_(n).sub_(bad)
            return
        idx = torch.bucketize(f, self.edges[kind], right=True)
        n = idx.shape[0]
        ones = self._ones.get(n)
        if ones is None:
            if len(self._ones) > 64:
                self._ones.clear()
            ones = self._ones[n] = self.one.expand(n)  # batch sizes repeat: one view per size
        self.bins[kind].index_add_(0, idx, ones)

    def _observe(self, kind: str, t: Tensor, bins_kind: Optional[str] = None) -> None:
        """One step's statistics of a watched tensor: staged when small, else reduced now."""
        n = t.numel()
        if n == 0:
            return
        bins_kind = bins_kind or kind
        # a staged pre-activation is binned at the flush as the prediction iff the head is shared
        stageable = (bins_kind == "pred") == self.shared if kind == "pre" else True
        if not (stageable and self._stage(kind, t, n)):
            f = self._flat(t)
            c, merge = self._cells(kind)
            torch.aminmax(f, out=(c[0], c[1]))
            if "sumsq" in self.ROW[kind]:
                torch.dot(f, f, out=c[2])
            if kind == "pred" and self.distribution and t.dim() >= 1:
                dim = self.class_dim if t.dim() > self.class_dim else -1
                torch.amax((f.view(t.shape).sum(dim) - 1).abs(), out=c[2])
            self._bin(bins_kind, f)
            self._merge(kind, c, merge)
        self.counts[kind] += n
        if bins_kind != kind:
            self.counts[bins_kind] += n

    def pred(self, p: Tensor) -> None:
        self._observe("pred", p)

    def pre(self, z: Tensor, also_pred: bool = False) -> None:
        """``also_pred``: the tensor is the prediction too (identity head); its bins count for both."""
        self._observe("pre", z, "pred" if also_pred else None)

    def target(self, y: Tensor) -> None:
        self._observe("target", y)

    def input(self, x: Tensor) -> None:
        self._observe("input", x)

    def loss(self, loss: Tensor) -> None:
        l = loss.detach()
        if l.numel() != 1:
            if l.numel() == 0:
                return
            l = l.float().mean()
        self.loss_cells[self.row].copy_(l.reshape(()))
        self.loss_seen[self.row] = True

    def next_row(self) -> None:
        self.row += 1
        self._written = set()

    def all_reduce(self) -> None:
        """Merge every process's buffer in place by each column's declared op (losses averaged: a NaN on
        any rank stays NaN), so every rank judges the same snapshot. Four collectives per check, none
        between checks."""
        import torch.distributed as dist

        self.flush()
        world = dist.get_world_size()
        kinds: dict[str, list[int]] = {"min": [], "max": [], "sum": []}
        for kind, fs in self.ROW.items():
            for j, f in enumerate(fs):
                kinds[self.OPS[kind][f]].append(self.offs[kind] + j)
        rows = self.rows
        for op, cols in (("min", kinds["min"]), ("max", kinds["max"])):
            t = rows[:, cols].contiguous()
            dist.all_reduce(t, op=dist.ReduceOp.MIN if op == "min" else dist.ReduceOp.MAX)
            rows[:, cols] = t
        sums = rows[:, kinds["sum"] + [self.loss_col]].contiguous()
        counts = torch.tensor([self.counts[k] for k in self.ROW], dtype=torch.float32, device=self.device)
        packed = torch.cat([sums.reshape(-1), counts])
        dist.all_reduce(packed, op=dist.ReduceOp.SUM)
        sums = packed[: sums.numel()].view_as(sums)
        rows[:, kinds["sum"]] = sums[:, :-1]
        rows[:, self.loss_col] = sums[:, -1] / world
        bins = self.raw[self._row_bytes:].view(torch.int64)
        dist.all_reduce(bins, op=dist.ReduceOp.SUM)
        for k, v in zip(self.ROW, packed[sums.numel():].tolist()):
            self.counts[k] = int(v)

    def read(self) -> tuple[np.ndarray, dict[str, int], list[bool]]:
        """One device→host transfer; returns the interval as core rows and resets the buffer."""
        self.flush()
        n = max(self.row, 1)
        host = self.raw.to("cpu", copy=True).numpy()
        self._reset()
        dev_rows = host[: self.n_rows * self.width * 4].view(np.float32).reshape(self.n_rows, self.width)[:n]
        bins = host[self._row_bytes:].view(np.int64)
        counts, seen = dict(self.counts), self.loss_seen[:n]
        out = np.tile(neutral_row(), (n, 1))
        col = {c: i for i, c in enumerate(COLUMNS)}
        for kind, fs in self.ROW.items():
            for j, f in enumerate(fs):
                out[:, col[f"{kind}.{f}"]] = dev_rows[:, self.offs[kind] + j]
        out[:, LOSS_COLUMN] = dev_rows[:, self.loss_col]
        if self.shared:  # identity head: the prediction's min/max are the pre-activation's
            for f in ("min", "max"):
                out[:, col[f"pred.{f}"]] = out[:, col[f"pre.{f}"]]
        for i, kind in enumerate(self.ROW):
            b = bins[i * self.MAX_BINS: (i + 1) * self.MAX_BINS]
            for name, v in _bin_counts(self.edge_values[kind], b, self._points(kind)).items():
                out[0, col[f"{kind}.{name}"]] = v
        if self.shared:
            out[0, col["pre.finite"]] = out[0, col["pred.finite"]]
        self.row = 0
        self._written = set()
        self.counts = {k: 0 for k in self.counts}
        self.loss_seen = [False] * self.n_rows
        return out, counts, seen

    def _points(self, kind: str) -> dict[str, Any]:
        if kind == "pred":
            return {"below": self.lo, "above": self.hi, "pinned": self.pin}
        if kind == "pre":
            return {"tail": self.tail}
        if kind == "target":
            return {"nonbinary": True}
        return {}


_F32_MAX = float(np.finfo(np.float32).max)
_NEUTRAL = {"min": math.inf, "max": -math.inf, "sum": 0.0}


def _next32(x: float) -> float:
    return float(np.nextafter(np.float32(x), np.float32(np.inf)))


def _bin_counts(edges: list[float], bins: np.ndarray, points: dict[str, Any]) -> dict[str, float]:
    """Turn bucketize counts into the core's count columns.

    Bin ``i`` holds values in ``[edges[i-1], edges[i])``; bin 1 is -inf, the last bin +inf and NaN.
    """
    k = len(edges)
    finite_bins = [(edges[i - 1], edges[i], float(bins[i])) for i in range(2, k)]
    out = {"finite": sum(c for _, _, c in finite_bins)}

    def lt(a):
        return sum(c for _, hi, c in finite_bins if hi <= a)

    def gt(a):
        return sum(c for lo, _, c in finite_bins if lo > a)

    def eq(a):
        return sum(c for lo, hi, c in finite_bins if lo == a and hi == _next32(a))

    if "below" in points:
        lo, hi = points["below"], points["above"]
        out["below"] = lt(lo) if lo is not None else 0.0
        out["above"] = gt(hi) if hi is not None else 0.0
        pin = points.get("pinned")
        out["pinned"] = sum(eq(p) for p in pin if p is not None) if pin else 0.0
    if "tail" in points:
        t = points["tail"]
        out["tail"] = (lt(-t) + gt(t)) if t is not None else 0.0
    if "nonbinary" in points:
        out["nonbinary"] = out["finite"] - eq(0.0) - eq(1.0)
    return out


