"""On-device statistics for torch: every watched tensor reduced into one preallocated buffer.

The layout is derived from the declaration in :mod:`boundguard.stats`: the ``row`` statistics of each
kind are row columns written with ``out=`` every step, the ``count`` statistics come from bins, the
neutral values and the cross-process reduce ops are the declared ones.
"""
from __future__ import annotations

import bisect
import functools
import math
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from boundguard.integrations.torch import sync
from boundguard.session import CountingPlan
from boundguard.stats import COLUMNS, KINDS, count_stats, neutral_row, row_stats

__all__ = ["Reducer"]


class Reducer:
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
    #: Rows of one block; a longer interval folds full blocks into the carry row on the device.
    ROW_CAP = 256
    #: Per-parameter gradient norms staged per step (a head with more parameters is reduced at once).
    GRAD_SLOTS = 8
    #: On the CPU, the check's batched reductions (the staged block, the gradients, the reset) run as
    #: numpy kernels on the same memory: a numpy call costs a fraction of a torch call's dispatch, and
    #: the values are the same float32 ones. (False: torch kernels, as on a GPU; the tests run both.)
    HOST_KERNELS = True

    def __init__(self, rows: int, device: torch.device, stage_elements: Optional[int] = None) -> None:
        self.device = device
        self.n_steps = max(1, int(rows))  # the longest interval: one loss cell per step
        block = min(self.n_steps, self.ROW_CAP)
        self.n_rows = block
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
        self.sync_cols = {sharded: {op: torch.tensor(sync.columns(self, op, sharded), dtype=torch.long, device=device)
                                    for op in ("min", "max", "sum")} for sharded in (False, True)}
        self.grad_sharded = False  #: the head's gradients are this process's shards (set by the adapter)
        self.one = torch.ones((), dtype=torch.int64, device=device)
        self._ones: dict[int, Tensor] = {}
        self.edges: dict[str, torch.Tensor] = {}
        self.edge_values: dict[str, list[float]] = {}
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
        self._held: list[tuple[int, str, str, Tensor, int]] = []  # (slot, kind, bins kind, tensor, n)
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
        #: this step's deferred copies (see _commit): their kinds (None: the loss), destinations, sources
        self._pending: list[Optional[str]] = []
        self._pdst: list[Tensor] = []
        self._psrc: list[Tensor] = []
        #: what the step in progress started from (see drop_step): the counts, and the bins once it binned
        self._counts0: dict[str, int] = {}
        self._bins0: Optional[Tensor] = None
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
        # each count column: its place in the core's row, and its runs among all kinds' bins (one list)
        m = self.MAX_BINS
        self._count_plan = [(cols[name], [(i * m + a, i * m + z, sign) for a, z, sign in runs])
                            for i, kind, cols in _COUNTED_COLS
                            for name, runs in _count_ranges(self.edge_values[kind], self._points(kind)).items()]

    def discard(self) -> None:
        """Forget the rows of the current interval (no transfer): the next row is row 0."""
        self._held.clear()
        for lens in list(self.staged.values()) + [self._glen]:
            for i in range(len(lens)):
                lens[i] = 0
        self._graw_used = [False] * self.n_rows
        self._reset()

    def _reset(self) -> None:
        r = self.row  # a step in progress (a read in the middle of it) leaves nothing staged behind
        if r < self.n_rows:
            for lens in self.staged.values():
                lens[r] = 0
            self._glen[r], self._graw_used[r] = 0, False
        self._pending, self._pdst, self._psrc = [], [], []
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
        self._counts0, self._bins0 = dict(self.counts), None
        self.loss_seen = [False] * (self.n_steps + 1)
        self.tripped = False
        self._events = [None, None]

    def drop_step(self) -> None:
        """Forget what the step in progress recorded (a forward pass that no step ended): its staged and
        pending values, its row, its counts and its bins; the interval stays as the last step left it."""
        r = self.row
        self._pending, self._pdst, self._psrc = [], [], []
        self.loss_seen[self.i] = False
        if r < self.n_rows:
            for lens in self.staged.values():
                lens[r] = 0
            self._glen[r], self._graw_used[r] = 0, False
            self.rows[r].copy_(self.neutral_row)
        self._held = [h for h in self._held if h[0] != self._slot]
        if self._bins0 is not None:
            self.raw[self.bins_at:].copy_(self._bins0)
        self.counts, self._bins0 = dict(self._counts0), None
        self._written.clear()
        self._reduced = False

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

    def _commit(self, dsts: list[Tensor], srcs: list[Tensor]) -> None:
        """Carry out the step's deferred copies, with ``dsts``/``srcs`` (the step's gradients), in one
        ``_foreach_copy_``. A batch tensor resized in place since it was recorded is dropped from the
        step (its statistics would be of other values), never a failed step."""
        pending, pdst, psrc = self._pending, self._pdst, self._psrc
        self._pending, self._pdst, self._psrc = [], [], []
        try:
            torch._foreach_copy_(dsts + pdst, srcs + psrc)
        except RuntimeError:
            for d, s, kind in zip(pdst, psrc, pending):
                try:
                    d.copy_(s)
                except RuntimeError:
                    self._unstage(kind, d.numel())
            for d, s in zip(dsts, srcs):
                d.copy_(s)

    def _unstage(self, kind: Optional[str], n: int) -> None:
        if kind is None:  # the loss
            self.loss_seen[self.i] = False
            return
        self.staged[kind][self.row] = 0
        self.counts[kind] -= n

    def flush(self) -> None:
        """Reduce what is still pending into the rows and bins: the staged values of the block (a few
        kernels per run of equal-sized steps) and the large tensors whose lazy bins are undecided. Called
        at a fold and at the check, before the buffer is merged across processes or read."""
        self._resolve(wait=True)
        used = max(self.row, 1)
        if self._host:  # numpy warns of what torch computes silently (inf - inf, an fp32 square overflowing)
            with np.errstate(all="ignore"):
                self._flush(used)
        else:
            self._flush(used)

    def _flush(self, used: int) -> None:
        self._flush_grads(used)
        zeros = [0] * used
        for kind, lens in self.staged.items():
            if not any(lens[:used]):
                continue
            bins_kind = "pred" if kind == "pre" and self.shared else kind
            start = 0
            while start < used:
                n = lens[start]
                if lens[start:used].count(n) == used - start:  # (the usual case: one batch size to the end)
                    end = used
                else:
                    end = start + 1
                    while end < used and lens[end] == n:
                        end += 1
                if n:
                    if self._host:
                        self._reduce_block_np(kind, bins_kind, self._stage_np[kind][start:end, :n], start)
                    else:
                        self._reduce_block(kind, bins_kind, self.stage[kind][start:end, :n], start, end)
                start = end
            lens[:used] = zeros

    def _reduce_block(self, kind: str, bins_kind: str, block: Tensor, a: int, b: int) -> None:
        """The staged values of steps ``a``..``b`` reduced at once into row ``a`` (the core only ever
        combines an interval's rows, so which of its rows holds them does not matter): one pass over the
        whole block per statistic instead of one per step."""
        c = self.cells[a][kind]
        col = self._col[kind]
        mn, mx = torch.aminmax(block)
        torch.minimum(c[0], mn, out=c[0])
        torch.maximum(c[1], mx, out=c[1])
        if "sum" in col:
            c[col["sum"]].add_(block.sum())
        if "sumsq" in col:
            c[col["sumsq"]].add_((block * block).sum())
        if not self._cuda:  # the rows are host memory: when the block's range lies between two edges
            off = self.offs[kind]  # (row ``a`` holds a superset of the staged values), all are in that bin
            k = _same_bin(self.edge_values[bins_kind], float(self._rows_np[a, off]), float(self._rows_np[a, off + 1]))
            if k is not None:
                self.bin_cells[bins_kind][k].add_(block.numel())
                return
        self._bucketize(bins_kind, block.reshape(-1))

    def _reduce_block_np(self, kind: str, bins_kind: str, block: np.ndarray, a: int) -> None:
        """:meth:`_reduce_block` on the CPU, in numpy kernels on the same memory (see :attr:`HOST_KERNELS`)."""
        row, off, col = self._rows_np[a], self.offs[kind], self._col[kind]
        mn, mx, lo, hi = block.min(), block.max(), row[off], row[off + 1]
        row[off] = lo if lo != lo or lo <= mn else mn  # NaN-propagating, as torch.minimum/maximum
        row[off + 1] = hi if hi != hi or hi >= mx else mx
        if "sum" in col:
            row[off + col["sum"]] += block.sum()
        if "sumsq" in col:
            row[off + col["sumsq"]] += np.vecdot(block, block).sum()
        bins = self._bins_np[bins_kind]
        k = _same_bin(self.edge_values[bins_kind], float(row[off]), float(row[off + 1]))
        if k is not None:
            bins[k] += block.size
            return
        # torch.bucketize(right=True) puts a value in bin #{edges <= value} (NaN: the last). With the
        # values sorted (NaN last, as numpy sorts and searches), the values at or above each edge are
        # n - searchsorted(left), and each bin's count is the difference of two neighbours: one sort of
        # the block and one search per edge instead of one search per value.
        n = block.size
        at_or_above = n - np.searchsorted(np.sort(block, axis=None), self._edges_np[bins_kind], side="left")
        e = at_or_above.size
        bins[0] += n - at_or_above[0]
        bins[1:e] += at_or_above[:-1] - at_or_above[1:]
        bins[e] += at_or_above[-1]

    def _bucketize(self, kind: str, f: Tensor) -> None:
        idx = torch.bucketize(f.contiguous(), self.edges[kind], right=True)  # (a column slice: strided)
        n = idx.shape[0]
        ones = self._ones.get(n)
        if ones is None:
            if len(self._ones) > 64:
                self._ones.clear()
            ones = self._ones[n] = self.one.expand(n)  # batch sizes repeat: one view per size
        self.bins[kind].index_add_(0, idx, ones)

    def _bin(self, kind: str, bins_kind: str, f: Tensor) -> None:
        """Count ``f`` (whose min/max this step's row of ``kind`` already holds) into ``bins_kind``: small
        tensors at once, large ones lazily (:meth:`_resolve`)."""
        n = f.shape[0]
        if n < self.FAST_COUNT_MIN or (self._cuda and n > self.HOLD_MAX):
            if self._bins0 is None:  # the step's first count into the bins: keep what drop_step restores
                self._bins0 = self.raw[self.bins_at:].clone()
            self._bucketize(bins_kind, f)
            return
        self._held.append((self._slot, kind, bins_kind, f, n))

    def _resolve(self, wait: bool = False) -> None:
        """Decide the lazy bins whose step's min/max are on the host: one scalar add when the whole
        tensor lies between two edges, else bucketize it. On a GPU the step's mirror may not have landed
        yet: a hold of this step waits for the next one; an older one is bucketized (never a host
        synchronisation between checks), and ``wait`` (at a check, which transfers the buffer anyway)
        waits for the copy."""
        if not self._held:
            return
        keep = []
        for slot, kind, bins_kind, f, n in self._held:
            if self._cuda:
                ev = self._events[slot]
                if ev is None:
                    self._bucketize(bins_kind, f)
                    continue
                if wait:
                    ev.synchronize()
                elif not ev.query():
                    if slot == self._slot:
                        keep.append((slot, kind, bins_kind, f, n))
                    else:
                        self._bucketize(bins_kind, f)
                    continue
                row = self._mirror_np[slot]
            else:
                row = self._rows_np[self.row]
            off = self.offs[kind]
            b = _same_bin(self.edge_values[bins_kind], float(row[off]), float(row[off + 1]))
            if b is not None:
                self.bin_cells[bins_kind][b].add_(n)
            else:
                self._bucketize(bins_kind, f)
        self._held = keep

    def _copy_mirror(self) -> None:
        """On a GPU: this step's row (and loss) into pinned host memory, non-blocking, with an event
        recorded after it (on the CPU the rows are host memory already)."""
        src = self._mirror_src
        assert src is not None
        src.copy_(self.rows[self.row])  # the statistics and the loss
        self._mirror[self._slot].copy_(src, non_blocking=True)
        ev = self._events[self._slot] = torch.cuda.Event()
        ev.record()
        self._mirror_seen[self._slot] = self.loss_seen[self.i]

    def _trip(self, slot: int) -> None:
        """On a GPU: look at one mirrored step for a NaN/Inf (the loss, or a min/max reduced that step),
        once its copy has landed (on the CPU :meth:`next_row` looks at the row itself)."""
        ev = self._events[slot]
        if ev is None or not ev.query():
            return
        self._events[slot] = None
        row = self._mirror_np[slot]
        loss, seen = float(row[self.width]), self._mirror_seen[slot]
        if (seen and not math.isfinite(loss)) or _nonfinite(row.tolist(), self._minmax):
            self.tripped = True

    def _observe(self, kind: str, t: Tensor, bins_kind: Optional[str] = None, stage: bool = True,
                 defer: bool = False) -> None:
        """One step's statistics of a watched tensor (its bins counted as ``bins_kind``): a small one is
        staged, its values copied into this step's staging row (``defer``: with the step's other copies,
        :meth:`_commit`) and reduced in a few batched kernels at the flush; a large one, or a second one
        of the same kind in one step, is reduced now."""
        n = t.numel()
        if not n:
            return
        if stage and n <= self.cap and kind not in self._written:
            self._written.add(kind)
            key = (kind, self.row, t.shape)
            dst = self._views.get(key)
            if dst is None:  # batch shapes repeat: one view of the staging row per shape
                if len(self._views) > 4096:
                    self._views.clear()
                dst = self._views[key] = self.stage_rows[kind][self.row][:n].view(t.shape)
            src = t.data if t.requires_grad else t  # .data: the values, without an autograd record
            if defer:
                self._pending.append(kind)
                self._pdst.append(dst)
                self._psrc.append(src)
            else:
                dst.copy_(src)
            self.staged[kind][self.row] = n
        else:
            self._reduce_now(kind, t, bins_kind or kind)
        self.counts[kind] += n
        if bins_kind is not None and bins_kind != kind:
            self.counts[bins_kind] += n

    def _reduce_now(self, kind: str, t: Tensor, bins_kind: str) -> None:
        f = self._flat(t)
        self._reduced = True
        c, merge = self._cells(kind)
        col = self._col[kind]
        torch.aminmax(f, out=(c[0], c[1]))
        if "sum" in col:
            torch.sum(f, dim=0, out=c[col["sum"]])
        if "sumsq" in col:
            torch.dot(f, f, out=c[col["sumsq"]])
        if kind == "pred" and self.distribution and t.dim() >= 1:
            dim = self.class_dim if t.dim() > self.class_dim else -1
            torch.amax((f.view(t.shape).sum(dim) - 1).abs(), out=c[col["rowsum_err"]])
        self._merge(kind, c, merge)
        self._bin(kind, bins_kind, f)

    def pred(self, p: Tensor) -> None:
        self._observe("pred", p, None, not self.distribution)

    def pre(self, z: Tensor, also_pred: bool = False) -> None:
        """``also_pred``: the tensor is the prediction too (identity head); its bins count for both (a
        staged pre-activation is binned at the flush as the prediction iff the head is shared)."""
        self._observe("pre", z, "pred" if also_pred else None, also_pred == self.shared)

    def target(self, y: Tensor) -> None:
        """(Copied with the step's other copies: what the loss consumed, also when the step changed it
        in place.)"""
        self._observe("target", y, None, True, True)

    def input(self, x: Tensor) -> None:
        self._observe("input", x, None, True, True)

    def grads(self, grads: list[Tensor], complete: bool = True) -> None:
        """The step's gradients of the watched parameters (once per step: a second optimizer's step sees
        the same head; the same parameters in the same order every step). A small head's gradients are
        copied as they are into this step's staging row (one ``_foreach_copy_``); a larger head's become
        one fused norm per parameter, stacked into the row (two kernels). Either way no host read; their
        squared sum becomes the step's ``grad`` cells at the flush. ``complete``: every watched parameter
        has a gradient this step (else some are missing, and the norms are taken)."""
        if not grads or "grad" in self._written:
            return
        self._written.add("grad")
        self.counts["grad"] += 1
        if self._graw_k < 0 and complete:
            self._setup_raw_grads(grads)
        if complete and len(grads) == self._graw_k:
            self._commit(self._graw_views[self.row], grads)
            self._graw_used[self.row] = True
            return
        norms = torch._foreach_norm(grads)
        k = len(norms)
        if k <= self.GRAD_SLOTS and norms[0].dtype == torch.float32 and norms[0].device == self.device:
            dst = self._gstage_views.get((self.row, k))
            if dst is None:
                dst = self._gstage_views[(self.row, k)] = self._gstage[self.row, :k]
            try:
                torch.stack(norms, out=dst)
                self._glen[self.row] = k
                return
            except (RuntimeError, TypeError):  # parameters of mixed dtypes or devices: reduce at once
                pass
        self._reduced = True
        sq = torch.stack([n.float().to(self.device) for n in norms]).square().sum()
        c = self.cells[self.row]["grad"]  # this step's cells: sumsq, normsq_max, normsq_min, finite
        for cell in c[:3]:
            cell.copy_(sq)
        c[3].copy_(torch.isfinite(sq))

    def _setup_raw_grads(self, grads: list[Tensor]) -> None:
        """At the first step: stage the raw gradients when the head is small (all its gradient elements
        of a block within the staging budget), else their norms (``_graw_k`` = 0)."""
        n = sum(g.numel() for g in grads)
        self._graw_k = 0
        if not (0 < n * self.n_rows <= self.STAGE_ELEMENTS and len(grads) <= self.GRAD_SLOTS) or \
                any(g.device != self.device or not g.is_floating_point() for g in grads):
            return
        self._graw = torch.empty((self.n_rows, n), dtype=torch.float32, device=self.device)
        self._graw_np = self._graw.numpy() if self._host else None
        sizes = [g.numel() for g in grads]
        self._graw_views = [[v.view(g.shape) for v, g in zip(torch.split(self._graw[i], sizes), grads)]
                            for i in range(self.n_rows)]
        self._graw_k = len(grads)

    def _flush_grads(self, used: int) -> None:
        """The staged gradients (or per-parameter norms) of the block's steps into their ``grad`` cells: a
        few kernels per run of steps staged alike."""
        lens, raw = self._glen, self._graw_used
        if not (any(lens[:used]) or any(raw[:used])):
            return
        off, col = self.offs["grad"], self._col["grad"]
        start = 0
        while start < used:
            k, r = lens[start], raw[start]
            if lens[start:used].count(k) == raw[start:used].count(r) == used - start:  # (the usual case)
                end = used
            else:
                end = start + 1
                while end < used and lens[end] == k and raw[end] == r:
                    end += 1
            if self._host:
                g_np = self._graw_np[start:end] if r and self._graw_np is not None else \
                    (self._gstage_np[start:end, :k] if k else None)
                if g_np is not None:
                    sq_np = np.vecdot(g_np, g_np)
                    rows_np = self._rows_np[start:end]
                    rows_np[:, _GRAD_SQ_COLS] = sq_np[:, None]  # sumsq, normsq_max, normsq_min
                    rows_np[:, off + col["finite"]] = np.isfinite(sq_np)
                start = end
                continue
            g = self._graw[start:end] if r and self._graw is not None else (self._gstage[start:end, :k] if k else None)
            if g is not None:
                sq = (g * g).sum(1)
                rows = self.rows[start:end]
                for f in ("sumsq", "normsq_max", "normsq_min"):
                    rows[:, off + col[f]].copy_(sq)
                rows[:, off + col["finite"]].copy_(torch.isfinite(sq))
            start = end
        lens[:used] = [0] * used
        raw[:used] = [False] * used

    def loss(self, loss: Tensor) -> None:
        l = loss.data
        if l.numel() != 1:
            if l.numel() == 0:
                return
            l = l.float().mean()
        self._pending.append(None)
        self._pdst.append(self.loss_cells[self.row])
        self._psrc.append(l if l.dim() == 0 else l.reshape(()))
        self.loss_seen[self.i] = True

    def next_row(self, checking: bool = False) -> None:
        """End of a step: mirror its row (lazy bins, the tripwire), then move to the next row; a full
        block is folded into the carry row, unless the step is ``checking`` (the check reads the block as
        it is: nothing to fold)."""
        if self._pending:
            self._commit([], [])
        if self._cuda:
            prev = self._slot ^ 1
            self._copy_mirror()
            self._resolve()
            if self.trip_armed:
                self._trip(self._slot)
                self._trip(prev)  # the previous step, once its copy has landed
            self._slot = prev
        else:  # the rows are host memory
            if self._held:
                self._resolve()
            if self.trip_armed and ((self.loss_seen[self.i] and not math.isfinite(self._rows_np[self.row, self.width]))
                                    or (self._reduced and _nonfinite(self._rows_np[self.row].tolist(), self._minmax))):
                self.tripped = True
        self.row += 1
        if self.i < self.n_steps:
            self.i += 1
        self._written.clear()
        self._reduced = False
        if self.row == self.n_rows and not checking:
            self._fold()
        self._counts0, self._bins0 = dict(self.counts), None

    def _fold(self) -> None:
        """Fold the full block into the carry row (min/max/sum by each column's op; a few kernels every
        :attr:`ROW_CAP` steps) and start the block again."""
        self.flush()
        block = self.block
        n = max(0, min(self.n_rows, self.losses.numel() - self.base))  # (an interval longer than declared: capped)
        if n:
            self.losses[self.base: self.base + n].copy_(block[:n, self.width])
        self.base += self.n_rows
        for op, cols in self._ops_cols.items():
            if cols.numel() == 0:
                continue
            both = block.index_select(1, cols)
            if op == "min":
                v = both.amin(0)
            elif op == "max":
                v = both.amax(0)
            else:
                v = both.sum(0)
            block[self.n_rows].index_copy_(0, cols, v)
        self.rows.copy_(self.neutral_row.expand(self.n_rows, -1))
        self.folded = True
        self.row = 0

    def all_reduce(self) -> None:
        """Merge every process's buffer in place (see :func:`boundguard.integrations.torch.sync.all_reduce`)."""
        sync.all_reduce(self)

    def read(self) -> tuple[np.ndarray, dict[str, int], list[bool], np.ndarray]:
        """One device→host transfer; returns the interval as core rows (one per step of the last block,
        plus the folded carry row), the element counts, which steps recorded a loss and the per-step
        losses; resets the buffer."""
        self.flush()
        n_rows, steps = self.row, max(self.i, 1)
        host = self.raw.to("cpu", copy=True).numpy()  # (on the CPU too: the one transfer the sync tests count)
        block = host[: self.bins_at].view(np.float32)
        size = (self.n_rows + 1) * (self.width + 1)
        dev = block[:size].reshape(self.n_rows + 1, self.width + 1)
        if self.folded:
            dev_rows = dev[[self.n_rows] + list(range(n_rows))]
        else:
            dev_rows = dev[: max(n_rows, 1)]  # (no step: one neutral row)
        folded = min(self.base, self.losses.numel())
        losses = np.concatenate([block[size: size + folded], dev[:n_rows, self.width]])[:steps].astype(np.float64)
        if losses.size < steps:
            losses = np.concatenate([losses, np.full(steps - losses.size, np.nan)])
        bins = host[self.bins_at:].view(np.int64)
        steps = min(steps, self.n_steps)
        counts, seen = dict(self.counts), self.loss_seen[:steps]
        out = np.empty((dev_rows.shape[0], _NEUTRAL_ROW.size))
        out[:] = _NEUTRAL_ROW
        out[:, _ROW_DST] = dev_rows[:, : self.width]
        col = _COL
        if self.shared:  # identity head: the prediction's min/max are the pre-activation's
            out[:, _PRED_MINMAX] = out[:, _PRE_MINMAX]
        first = out[0]
        b = bins.tolist()
        for at, runs in self._count_plan:  # (a kind whose bins are all 0 keeps its neutral 0 counts)
            first[at] = sum(sign * sum(b[a:z]) for a, z, sign in runs)
        if self.shared:
            first[col["pre.finite"]] = first[col["pred.finite"]]
        self._reset()
        return out, counts, seen, losses

    def _points(self, kind: str) -> dict[str, Any]:
        if kind == "pred":
            return {"below": self.lo, "above": self.hi, "pinned": self.pin}
        if kind == "pre":
            return {"tail": self.tail}
        if kind == "target":
            return {"nonbinary": True}
        return {}


_F32_MAX = float(np.finfo(np.float32).max)
_BATCH_KINDS = frozenset({"target", "input"})
_COUNTED = frozenset(k for k in KINDS if count_stats(k))
_NEUTRAL = {"min": math.inf, "max": -math.inf, "sum": 0.0}
_NEUTRAL_ROW = neutral_row()
_COL = {c: i for i, c in enumerate(COLUMNS)}
#: where each device row column goes among the core's columns (the row layout is Reducer.ROW, in order)
_ROW_DST = np.array([_COL[f"{k}.{f}"] for k, fs in Reducer.ROW.items() for f in fs])
_PRED_MINMAX, _PRE_MINMAX = [_COL["pred.min"], _COL["pred.max"]], [_COL["pre.min"], _COL["pre.max"]]
#: per counted kind: its index among the row kinds, and where each of its count columns goes
_COUNTED_COLS = [(i, k, {s.field: _COL[f"{k}.{s.field}"] for s in count_stats(k)})
                 for i, k in enumerate(Reducer.ROW) if k in _COUNTED]
_GRAD_OFF = sum(len(fs) for k, fs in Reducer.ROW.items() if list(Reducer.ROW).index(k) < list(Reducer.ROW).index("grad"))
_GRAD_SQ_COLS: Any = [_GRAD_OFF + Reducer._col["grad"][f] for f in ("sumsq", "normsq_max", "normsq_min")]
if _GRAD_SQ_COLS == list(range(_GRAD_SQ_COLS[0], _GRAD_SQ_COLS[0] + 3)):  # (the declared layout: a slice)
    _GRAD_SQ_COLS = slice(_GRAD_SQ_COLS[0], _GRAD_SQ_COLS[0] + 3)


@functools.lru_cache(maxsize=256)
def _next32(x: float) -> float:
    return float(np.nextafter(np.float32(x), np.float32(np.inf)))


def _nonfinite(row: list, minmax: list[tuple[int, int]]) -> bool:
    """A NaN/Inf in a mirrored row: in each kind's first two columns (min and max; for the gradients
    their sum and largest squared norm) a NaN, a -inf first or a +inf second (a kind not written this
    step holds +inf/-inf or 0/-inf: the other way round)."""
    for a, b in minmax:
        lo, hi = row[a], row[b]
        if lo != lo or hi != hi or lo == -math.inf or hi == math.inf:
            return True
    return False


def _same_bin(edges: list[float], lo: float, hi: float) -> Optional[int]:
    """The bucketize bin (``right=True``) that holds every value in ``[lo, hi]``, or None when the
    range straddles an edge or is NaN (then the values must be counted one by one)."""
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

