"""On-device statistics for torch: every watched tensor reduced into one preallocated buffer.

:class:`Reducer` is the step protocol (:meth:`Reducer.next_row` at the end of each step, a fold of full
blocks, :meth:`Reducer.flush` and :meth:`~.layout.Buffer.read` at a check, :meth:`Reducer.all_reduce`
across processes) on top of its layers, each in its own module: :mod:`.layout` (the buffer and its views,
derived from :mod:`boundguard.stats`; the read), :mod:`.kernels` (torch and numpy reductions),
:mod:`.mirror` (lazy bins, the NaN tripwire, the GPU's pinned mirror), :mod:`.staging` (what a step
records) and :mod:`.sync` (the cross-process merge).
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
from torch import Tensor

from boundguard.integrations.torch import sync
from boundguard.integrations.torch.layout import COL, NEUTRAL_ROW, PRE_MINMAX, PRED_MINMAX, ROW_DST, nonfinite
from boundguard.integrations.torch.staging import Staging
from boundguard.stats import CountingPlan

__all__ = ["Reducer"]


class Reducer(Staging):
    """Per-step statistics reduced on the device into one preallocated buffer (see :class:`~.layout.Buffer`
    for the layout and the costs)."""

    # (declared again for type checkers: each layer is checked on its own)
    _pending: list[Optional[str]]
    _counts0: dict[str, int]
    _bins0: Optional[Tensor]
    _held: list[tuple[int, str, str, Tensor, int]]
    _slot: int

    def apply(self, plan: CountingPlan) -> None:
        """Count what ``plan`` says (the bounds in force, clamp pins, the sigmoid/tanh tail) from now on."""
        self.lo, self.hi, self.distribution = plan.lo, plan.hi, plan.distribution
        self.class_dim, self.pin, self.tail = plan.class_dim, plan.pin, plan.tail
        self.target_ignore = plan.target_ignore
        self.configure()

    def discard(self) -> None:
        """Forget the rows of the current interval (no transfer): the next row is row 0."""
        self._held.clear()
        for lens in list(self.staged.values()) + [self._glen]:
            for i in range(len(lens)):
                lens[i] = 0
        self._graw_used = [False] * self.n_rows
        self._reset()

    def drop_step(self) -> None:
        """Forget what the step in progress recorded (a forward pass that no step ended): its staged and
        pending values, its row, its counts and its bins; the interval stays as the last step left it."""
        self._forget_step_copies()
        self.loss_seen[self.i] = False
        if self.row < self.n_rows:
            self.rows[self.row].copy_(self.neutral_row)
        self._held = [h for h in self._held if h[0] != self._slot]
        if self._bins0 is not None:
            self.raw[self.bins_at:].copy_(self._bins0)
        self.counts = dict(self._counts0)
        self._bins0 = None
        self._written.clear()
        self._reduced = False

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
                                    or (self._reduced and nonfinite(self._rows_np[self.row].tolist(), self._minmax))):
                self.tripped = True
        self.row += 1
        if self.i < self.n_steps:
            self.i += 1
        self._written.clear()
        self._reduced = False
        if self.row == self.n_rows and not checking:
            self._fold()
        self._counts0 = dict(self.counts)
        self._bins0 = None

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
        self.flush()
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
        out = np.empty((dev_rows.shape[0], NEUTRAL_ROW.size))
        out[:] = NEUTRAL_ROW
        out[:, ROW_DST] = dev_rows[:, : self.width]
        col = COL
        if self.shared:  # identity head: the prediction's min/max are the pre-activation's
            out[:, PRED_MINMAX] = out[:, PRE_MINMAX]
        first = out[0]
        b = bins.tolist()
        for at, runs in self._count_plan:  # (a kind whose bins are all 0 keeps its neutral 0 counts)
            first[at] = sum(sign * sum(b[a:z]) for a, z, sign in runs)
        if self.shared:
            first[col["pre.finite"]] = first[col["pred.finite"]]
        self._reset()
        return out, counts, seen, losses
