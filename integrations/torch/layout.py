"""The torch reducer's memory: one device buffer and its typed views, derived from the declaration in
:mod:`boundguard.stats` (a row column per ``row`` statistic of each kind, bins for the ``count`` ones, the
neutral values), the staging rows, the host mirror, and :meth:`Buffer.read`, which turns the buffer into
the core's rows with one transfer. The layers above it: :mod:`.kernels` (the batched reductions, torch
and numpy side by side), :mod:`.mirror` (lazy bins and the NaN tripwire, the GPU's pinned mirror),
:mod:`.staging` (what one step records), :mod:`.sync` (the cross-process merge) and
:mod:`.reducer` (the step protocol: next row, fold, flush, read).
"""
from __future__ import annotations

import bisect
import functools
import math
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from boundguard.stats import COLUMNS, KINDS, STATS, count_stats, neutral_row, row_stats

__all__ = ["Buffer", "COL", "NEUTRAL", "NEUTRAL_ROW", "ROW_DST", "PRED_MINMAX", "PRE_MINMAX", "GRAD_SQ_COLS",
           "nonfinite", "same_bin"]


class Buffer:
    """Per-step statistics reduced on the device into one preallocated buffer.

    Layout (one device allocation, typed views into its bytes): ``rows`` (fp32) — a block of at most
    :attr:`ROW_CAP` rows, one per step, with each watched tensor's min / max / sum of squares (and the
    row-sum error of a distribution), written in place with ``out=``, and the step's loss in the last
    column, plus one ``carry`` row that a full block is folded into on the device (so the buffer's size
    and the per-step cost do not grow with ``check_every_n_steps``); ``losses`` (fp32) — the losses of
    the folded blocks, one cell per step of the interval (4 bytes a step); ``bins`` (int64) — per
    watched tensor, counts of values between a few edges (the bounds, clamp points, 0 and 1 for
    targets, ±inf), accumulated over the interval. Small tensors (the usual batch) cost one copy per
    step into a staging row, reduced in a few batched kernels at the check; the head's gradients one
    ``_foreach_copy_`` (or, for a large head, one fused norm); the loss one copy. No host
    synchronisation: only shapes (host metadata) are read between checks.
    :meth:`read` moves the whole buffer to the host in one transfer and turns it into the core's rows
    (:data:`boundguard.stats.COLUMNS`).

    Large tensors (:attr:`FAST_COUNT_MIN` elements and more) are binned lazily: the step's min and max
    are mirrored to host memory without blocking (:meth:`next_row`; on a GPU a non-blocking copy into
    pinned memory, read once its event has completed), and when they fall between the same two edges
    every element is in that bin, so the count is one scalar add instead of a pass over the tensor;
    only a tensor that straddles an edge (a value out of bounds, a NaN, a clamp point reached) is binned
    element by element. The same mirror is the NaN tripwire (:attr:`tripped`).
    """

    #: Per kind, the declared ``row`` statistics (:func:`boundguard.stats.row_stats`), in column order.
    ROW = {k: tuple(s.field for s in row_stats(k)) for k in KINDS}
    #: Per kind and row field, the declared reduce op (min | max | sum): merge, neutral value, all-reduce.
    OPS = {k: {s.field: s.reduce for s in row_stats(k)} for k in KINDS}
    #: Per kind, each row field's position among the kind's columns.
    _col = {k: {f: j for j, f in enumerate(fs)} for k, fs in ROW.items()}
    MAX_BINS = 16
    #: Per watched tensor, up to this many elements per interval are staged as raw values (one copy
    #: per step) and reduced in one batch at the check; larger tensors are reduced every step.
    STAGE_ELEMENTS = 1 << 18
    STAGE_ROW_CAP = 4096
    #: Tensors this large are binned lazily (see above); smaller ones are staged or binned at once.
    FAST_COUNT_MIN = 1 << 12
    #: A large tensor whose bins wait for its mirrored min/max is held at most this large (elements);
    #: a larger one is binned at once. (On the CPU nothing is held: the mirror is plain memory.)
    HOLD_MAX = 1 << 24
    #: A tensor larger than this (elements) is reduced and counted in chunks of this size, at constant
    #: extra memory (no full-size fp32 copy, no per-element bin index). 1 MB of fp32 on the CPU: glibc serves
    #: larger temporaries from the heap once one was freed, and a pass over a language model's logits in
    #: 4 MB chunks left 22 MB of peak resident memory behind (8 MB in 1 MB chunks; measured 2026-12-07).
    #: On a GPU (a caching allocator, and a kernel launch per chunk) :attr:`CUDA_CHUNK`.
    CHUNK = 1 << 18
    CUDA_CHUNK = 1 << 22
    #: Of a language model's logits, the logsumexp is read on at most this many elements a step.
    LSE_ELEMENTS = 1 << 22
    #: Rows of one block; a longer interval folds full blocks into the carry row on the device.
    ROW_CAP = 256
    #: Per-parameter gradient norms staged per step (a head with more parameters is reduced at once).
    GRAD_SLOTS = 8
    #: On the CPU, the check's batched reductions (the staged block, the gradients, the reset) run as
    #: numpy kernels on the same memory: a numpy call costs a fraction of a torch call's dispatch, and
    #: the values are the same float32 ones. (False: torch kernels, as on a GPU; the tests run both.)
    HOST_KERNELS = True

    # state the layers above share, written by more than one of them (the rest is set in __init__)
    _pending: list[Optional[str]]  # this step's deferred copies (see Staging._commit): kinds (None: loss),
    _pdst: list[Tensor]  # destinations
    _psrc: list[Tensor]  # and sources
    _counts0: dict[str, int]  # what the step in progress started from (see drop_step): the counts,
    _bins0: Optional[Tensor]  # and the bins once it binned
    _held: list[tuple[int, str, str, Tensor, int]]  # lazy bins: (slot, kind, bins kind, tensor, n)
    _slot: int  # the mirror slot of this step

    def __init__(self, rows: int, device: torch.device, stage_elements: Optional[int] = None) -> None:
        self.device = device
        self.n_steps = max(1, int(rows))  # the longest interval: one loss cell per step
        block = self.n_rows = min(self.n_steps, self.ROW_CAP)
        self._allocate(block)
        self._init_state()
        self._init_staging(block, stage_elements)
        self.configure()
        self._reset()

    def _allocate(self, block: int) -> None:
        """The one device buffer (rows, losses, bins) and its typed views."""
        device = self.device
        offs, o = {}, 0
        for kind, fs in self.ROW.items():
            offs[kind] = o
            o += len(fs)
        self.width = o  # statistics columns; column ``width`` is the step's loss
        row_bytes = (block + 1) * (self.width + 1) * 4
        loss_bytes = -(-(row_bytes + (self.n_steps + 1) * 4) // 8) * 8 - row_bytes  # bins 8-byte aligned
        nbins = self.MAX_BINS * len(self.ROW)
        self.raw = torch.zeros(row_bytes + loss_bytes + nbins * 8, dtype=torch.uint8, device=device)
        self.block = self.raw[:row_bytes].view(torch.float32).view(block + 1, self.width + 1)
        self.rows = self.block[:block]
        self.losses = self.raw[row_bytes: row_bytes + (self.n_steps + 1) * 4].view(torch.float32)
        self.bins_at = row_bytes + loss_bytes
        bins = self.raw[self.bins_at:].view(torch.int64)
        self.bins = {k: bins[i * self.MAX_BINS: (i + 1) * self.MAX_BINS] for i, k in enumerate(self.ROW)}
        self.bin_cells = {k: [b[i] for i in range(self.MAX_BINS)] for k, b in self.bins.items()}
        self.neutral_row = torch.tensor([s.neutral for k in KINDS for s in row_stats(k)] + [math.nan],
                                        dtype=torch.float32, device=device)
        self._ops_cols = {op: torch.tensor([offs[k] + j for k, fs in self.ROW.items()
                                            for j, f in enumerate(fs) if self.OPS[k][f] == op],
                                           dtype=torch.long, device=device) for op in ("min", "max", "sum")}
        # per row and kind, the 0-d views the kernels write into with out=
        self.cells = [{k: [self.rows[i, offs[k] + j] for j in range(len(fs))] for k, fs in self.ROW.items()}
                      for i in range(block)]
        self.loss_cells = [self.rows[i, self.width] for i in range(block)]
        self.offs = offs
        #: per cross-process op (min | max | sum), the columns it merges, derived from Stat.sync (see .sync);
        #: keyed by whether the head's gradients are shards (FSDP) rather than replicated (DDP)
        self.sync_cols = {sharded: {op: torch.tensor(self._sync_columns(op, sharded), dtype=torch.long, device=device)
                                    for op in ("min", "max", "sum")} for sharded in (False, True)}
        self.grad_sharded = False  #: the head's gradients are this process's shards (set by the adapter)

    def _sync_columns(self, op: str, sharded: bool) -> list[int]:
        """The block's columns whose statistic combines across processes by ``op`` (:attr:`Stat.sync`;
        ``sharded``: the head's gradients are shards of one gradient, as under FSDP: :attr:`Stat.sync_sharded`)."""
        sync = _SYNC_SHARDED if sharded else _SYNC
        return [self.offs[k] + j for k, fs in self.ROW.items() for j, f in enumerate(fs) if sync[k][f] == op]

    def _init_state(self) -> None:
        """The host-side state of an interval, the mirror and what is counted."""
        device, offs = self.device, self.offs
        self.one = torch.ones((), dtype=torch.int64, device=device)
        self._ones: dict[int, Tensor] = {}
        self.edges: dict[str, torch.Tensor] = {}
        self.edge_values: dict[str, list[float]] = {}  # the points as given (what the counts mean)
        self.edge_f32: dict[str, list[float]] = {}  # the same edges in fp32, as the device compares with them
        self._edges_np: dict[str, np.ndarray] = {}
        self.row = 0  # the row of the block this step writes
        self.i = 0  # the step of the interval this step is
        self.base = 0  # the step of the interval that row 0 of the block holds (``losses`` holds the ones before)
        self.folded = False  # the carry row holds folded blocks
        self.counts = {k: 0 for k in self.ROW}
        self.loss_seen = [False] * (self.n_steps + 1)
        self._written: set[str] = set()
        # the host mirror of the latest rows (lazy bins, the tripwire); on a GPU pinned memory + events
        self._cuda = device.type == "cuda"
        if self._cuda:
            self.CHUNK = self.CUDA_CHUNK
        self._mirror = torch.empty((2, self.width + 1), dtype=torch.float32, pin_memory=self._cuda)  # a row
        self._mirror_np = self._mirror.numpy()
        self._mirror_src = torch.empty(self.width + 1, dtype=torch.float32, device=device) if self._cuda else None
        self._mirror_seen = [False, False]
        self._events: list[Any] = [None, None]
        self._slot = 0
        self._rows_np = self.rows.numpy() if not self._cuda else self._mirror_np
        self._host = self.HOST_KERNELS and not self._cuda
        self._raw_np: Any = self.raw.numpy() if not self._cuda else None
        self._minmax = [(offs[k], offs[k] + 1) for k in self.ROW]  # each kind's first two row columns
        self._held = []
        #: a mirrored step showed a NaN/Inf (the loss, a large tensor): the adapter checks at once
        self.tripped = False
        self.trip_armed = True
        # what pred/pre statistics count; set before configure()
        self.lo: Optional[float] = None
        self.hi: Optional[float] = None
        self.distribution = False
        self.class_dim = 1
        self.pin: Optional[tuple[Optional[float], Optional[float]]] = None
        self.tail: Optional[float] = None
        self.shared = False  # pred is the pre-activation tensor itself (identity head)
        self.target_ignore: Optional[float] = None  # targets at this value are counted as 0 (see Kernels)

    def _init_staging(self, block: int, stage_elements: Optional[int]) -> None:
        """The staging rows (a block of raw values per kind) and the gradients' staging."""
        device = self.device
        budget = self.STAGE_ELEMENTS if stage_elements is None else stage_elements
        self.cap = min(self.STAGE_ROW_CAP, budget // block)
        self.stage = {k: torch.empty((block, self.cap), dtype=torch.float32, device=device) for k in self.ROW} \
            if self.cap > 0 else {}
        self.stage_rows = {k: [b[i] for i in range(block)] for k, b in self.stage.items()}
        self.staged = {k: [0] * block for k in self.stage}  # elements staged per row (host ints)
        if self._host:  # numpy views of the same memory (see HOST_KERNELS)
            self._block_np = self.block.numpy()
            self._stage_np = {k: v.numpy() for k, v in self.stage.items()}
            self._bins_np = {k: v.numpy() for k, v in self.bins.items()}
            self._neutral_np = self.neutral_row.numpy()
            self._losses_np = self.losses.numpy()
        self._gstage = torch.empty((block, self.GRAD_SLOTS), dtype=torch.float32, device=device)
        self._gstage_np: Any = self._gstage.numpy() if self._host else None
        self._graw_np: Optional[np.ndarray] = None
        self._gstage_views: dict[tuple[int, int], Tensor] = {}  # (row, k) -> where k norms go
        self._glen = [0] * block  # gradient norms staged per row
        # a small head's raw gradients, one row per step (set up at the first step; None: too large)
        self._graw: Optional[Tensor] = None
        self._graw_views: list[list[Tensor]] = []  # per row, one view per parameter
        self._graw_k = -1  # parameters per step of the raw staging (-1: not set up yet, 0: off)
        self._graw_used = [False] * block
        self._views: dict[tuple, Tensor] = {}  # (kind, row, shape) -> the staging destination
        self._reduced = False  # a tensor was reduced into this step's row (else the row holds no values)
        self._pending = []
        self._pdst = []
        self._psrc = []
        self._counts0 = {}
        self._bins0 = None

    def configure(self) -> None:
        """(Re)build each tensor's bin edges from the bounds, clamp points and tail threshold in force."""
        points = {
            "pred": [p for p in (self.lo, self.hi) + tuple(self.pin or ()) if p is not None and math.isfinite(p)],
            "pre": [-self.tail, self.tail] if self.tail is not None else [],
            "target": [0.0, 1.0],
            "input": [],
            "grad": [],
        }
        for kind, ps in points.items():
            e = [-math.inf, -_F32_MAX]
            for p in sorted(set(ps)):
                e += [p, _next32(p)]
            e.append(math.inf)
            e = sorted(e)
            self.edge_values[kind] = e
            self.edges[kind] = torch.tensor(e, dtype=torch.float32, device=self.device)
            self._edges_np[kind] = np.array(e, dtype=np.float32)
            self.edge_f32[kind] = self._edges_np[kind].tolist()
        # each count column: its place in the core's row, and its runs among all kinds' bins (one list)
        m = self.MAX_BINS
        self._count_plan = [(cols[name], [(i * m + a, i * m + z, sign) for a, z, sign in runs])
                            for i, kind, cols in _COUNTED_COLS
                            for name, runs in _count_ranges(self.edge_values[kind], self._points(kind)).items()]

    def _forget_step_copies(self) -> None:
        """The step in progress leaves nothing staged or pending behind (a read in the middle of it, or a
        step dropped)."""
        r = self.row
        if r < self.n_rows:
            for lens in self.staged.values():
                lens[r] = 0
            self._glen[r], self._graw_used[r] = 0, False
        self._pending = []
        self._pdst = []
        self._psrc = []

    def _reset(self) -> None:
        self._forget_step_copies()
        if self._host:
            self._block_np[:] = self._neutral_np
            self._raw_np[self.bins_at:] = 0
            self._losses_np.fill(math.nan)
        else:
            self.block.copy_(self.neutral_row.expand(self.n_rows + 1, -1))
            self.losses.fill_(math.nan)
            self.raw[self.bins_at:].zero_()
        self.row = 0
        self.i = 0
        self.base = 0
        self.folded = False
        self._written = set()
        self.counts = {k: 0 for k in self.counts}
        self._counts0 = dict(self.counts)
        self._bins0 = None
        self.loss_seen = [False] * (self.n_steps + 1)
        self.tripped = False
        self._events = [None, None]

    def _flat(self, t: Tensor) -> Tensor:
        t = t.detach()
        if t.device != self.device:  # e.g. a head on another device than the buffer
            t = t.to(self.device, non_blocking=True)
        if t.dtype != torch.float32:
            t = t.float()
        return t.reshape(-1)

    def _points(self, kind: str) -> dict[str, Any]:
        if kind == "pred":
            return {"below": self.lo, "above": self.hi, "pinned": self.pin}
        if kind == "pre":
            return {"tail": self.tail}
        if kind == "target":
            return {"nonbinary": True}
        return {}


_F32_MAX = float(np.finfo(np.float32).max)
#: Per kind and row field, how processes combine it, replicated or sharded (see :mod:`.sync`).
_SYNC = {k: {s.field: s.sync for s in STATS if s.kind == k} for k in KINDS}
_SYNC_SHARDED = {k: {s.field: s.sync_sharded for s in STATS if s.kind == k} for k in KINDS}
_COUNTED = frozenset(k for k in KINDS if count_stats(k))
#: Per reduce op, its neutral value (what a cell holds before anything is reduced into it).
NEUTRAL = {"min": math.inf, "max": -math.inf, "sum": 0.0}
#: The core's row of neutral values, and each core column's index in it.
NEUTRAL_ROW = neutral_row()
COL = {c: i for i, c in enumerate(COLUMNS)}
#: where each device row column goes among the core's columns (the row layout is Buffer.ROW, in order)
ROW_DST = np.array([COL[f"{k}.{f}"] for k, fs in Buffer.ROW.items() for f in fs])
#: the core's min/max columns of the prediction and of the pre-activation (an identity head: one is the other)
PRED_MINMAX, PRE_MINMAX = [COL["pred.min"], COL["pred.max"]], [COL["pre.min"], COL["pre.max"]]
#: per counted kind: its index among the row kinds, and where each of its count columns goes
_COUNTED_COLS = [(i, k, {s.field: COL[f"{k}.{s.field}"] for s in count_stats(k)})
                 for i, k in enumerate(Buffer.ROW) if k in _COUNTED]
_GRAD_OFF = sum(len(fs) for k, fs in Buffer.ROW.items() if list(Buffer.ROW).index(k) < list(Buffer.ROW).index("grad"))
#: the device row's columns of the gradients' sum of squares and largest / smallest squared norm
GRAD_SQ_COLS: Any = [_GRAD_OFF + Buffer._col["grad"][f] for f in ("sumsq", "normsq_max", "normsq_min")]
if GRAD_SQ_COLS == list(range(GRAD_SQ_COLS[0], GRAD_SQ_COLS[0] + 3)):  # (the declared layout: a slice)
    GRAD_SQ_COLS = slice(GRAD_SQ_COLS[0], GRAD_SQ_COLS[0] + 3)


@functools.lru_cache(maxsize=256)
def _next32(x: float) -> float:
    return float(np.nextafter(np.float32(x), np.float32(np.inf)))


def nonfinite(row: list, minmax: list[tuple[int, int]]) -> bool:
    """A NaN/Inf in a mirrored row: in each kind's first two columns (min and max; for the gradients
    their sum and largest squared norm) a NaN, a -inf first or a +inf second (a kind not written this
    step holds +inf/-inf or 0/-inf: the other way round)."""
    for a, b in minmax:
        lo, hi = row[a], row[b]
        if lo != lo or hi != hi or lo == -math.inf or hi == math.inf:
            return True
    return False


def same_bin(edges: list[float], lo: float, hi: float) -> Optional[int]:
    """The bucketize bin (``right=True``) that holds every value in ``[lo, hi]``, or None when the
    range straddles an edge or is NaN (then the values must be counted one by one). ``edges``: in fp32,
    as bucketize compares with them (a bound fp32 cannot represent, 0.9, is 0.89999998 there)."""
    if not (lo <= hi):  # NaN, or nothing written (+inf, -inf)
        return None
    a, b = bisect.bisect_right(edges, lo), bisect.bisect_right(edges, hi)
    return a if a == b else None


def _count_ranges(edges: list[float], points: dict[str, Any]) -> dict[str, list[tuple[int, int, int]]]:
    """Which bucketize bins make each of the core's count columns, as ``(first, stop, sign)`` runs of
    bins (a count is the signed sum of its runs), decided once per set of edges.

    Bin ``i`` holds values in ``[edges[i-1], edges[i])``; bin 1 is -inf, the last bin +inf and NaN, the
    finite values are in bins 2 .. len(edges) - 1 (edges sorted, so the values below or above a point
    are a run of neighbouring bins).
    """
    k = len(edges)

    def lt(a: float) -> tuple[int, int, int]:  # the finite bins whose upper edge is <= a
        return 2, max(2, min(k, bisect.bisect_right(edges, a))), 1

    def gt(a: float) -> tuple[int, int, int]:  # the finite bins whose lower edge is > a
        return min(k, max(2, bisect.bisect_right(edges, a) + 1)), k, 1

    def eq(a: float, sign: int = 1) -> list[tuple[int, int, int]]:  # the bin [a, next float32 after a)
        i = bisect.bisect_left(edges, a) + 1
        return [(i, i + 1, sign)] if 2 <= i < k and edges[i - 1] == a and edges[i] == _next32(a) else []

    out: dict[str, list[tuple[int, int, int]]] = {"finite": [(2, k, 1)]}
    if "below" in points:
        lo, hi = points["below"], points["above"]
        out["below"] = [lt(lo)] if lo is not None else []
        out["above"] = [gt(hi)] if hi is not None else []
        out["pinned"] = [r for p in points.get("pinned") or () if p is not None for r in eq(p)]
    if "tail" in points:
        t = points["tail"]
        out["tail"] = [lt(-t), gt(t)] if t is not None else []
    if "nonbinary" in points:
        out["nonbinary"] = [(2, k, 1)] + eq(0.0, -1) + eq(1.0, -1)
    return out
