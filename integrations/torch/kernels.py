"""The reductions of the torch reducer, torch kernels (any device) and numpy kernels (the CPU, on the same
memory: see ``Buffer.HOST_KERNELS``) side by side: a staged block of steps, a tensor reduced at once, the
bins, the head's gradients."""
from __future__ import annotations

from typing import Iterator, Optional

import numpy as np
import torch
from torch import Tensor

from boundguard.integrations.torch.layout import GRAD_SQ_COLS, NEUTRAL, Buffer, same_bin

__all__ = ["Kernels", "chunks"]


def chunks(x: Tensor, n: int) -> Iterator[Tensor]:
    """``x`` in pieces of about ``n`` elements each: views of a contiguous tensor; of another, slices
    along its first dimension (a slice longer than ``n`` elements is one piece)."""
    if x.is_contiguous() or x.dim() == 0:
        yield from x.reshape(-1).split(n)
        return
    rows = max(1, n // max(1, x[0].numel()))
    yield from x.split(rows)


class Kernels(Buffer):
    """Batched reductions into the buffer's rows and bins."""

    def _cells(self, kind: str) -> tuple[list[Tensor], Optional[list[Tensor]]]:
        """Where this step's values of ``kind`` go; a second call in one step writes to scratch and merges."""
        cells = self.cells[self.row][kind]
        if kind not in self._written:
            self._written.add(kind)
            return cells, None
        return [torch.full((), NEUTRAL[self.OPS[kind][f]], dtype=torch.float32, device=self.device)
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

    def _reduce_block(self, kind: str, bins_kind: str, block: Tensor, a: int, b: int) -> None:
        """The staged values of steps ``a``..``b`` reduced at once into row ``a`` (the core only ever
        combines an interval's rows, so which of its rows holds them does not matter): one pass over the
        whole block per statistic instead of one per step."""
        c = self.cells[a][kind]
        col = self._col[kind]
        if kind == "target" and self.target_ignore is not None:  # the loss ignores them: class 0 instead
            block = torch.where(block == self.target_ignore, 0.0, block)
        mn, mx = torch.aminmax(block)
        torch.minimum(c[0], mn, out=c[0])
        torch.maximum(c[1], mx, out=c[1])
        if "sum" in col:
            c[col["sum"]].add_(block.sum())
        if "sumsq" in col:
            c[col["sumsq"]].add_((block * block).sum())
        if not self._cuda:  # the rows are host memory: when the block's range lies between two edges
            off = self.offs[kind]  # (row ``a`` holds a superset of the staged values), all are in that bin
            k = same_bin(self.edge_f32[bins_kind], float(self._rows_np[a, off]), float(self._rows_np[a, off + 1]))
            if k is not None:
                self.bin_cells[bins_kind][k].add_(block.numel())
                return
        self._bucketize(bins_kind, block.reshape(-1))

    def _reduce_block_np(self, kind: str, bins_kind: str, block: np.ndarray, a: int) -> None:
        """:meth:`_reduce_block` on the CPU, in numpy kernels on the same memory (see :attr:`HOST_KERNELS`)."""
        row, off, col = self._rows_np[a], self.offs[kind], self._col[kind]
        if kind == "target" and self.target_ignore is not None:  # the loss ignores them: class 0 instead
            block = np.where(block == self.target_ignore, np.float32(0), block)
        mn, mx, lo, hi = block.min(), block.max(), row[off], row[off + 1]
        row[off] = lo if lo != lo or lo <= mn else mn  # NaN-propagating, as torch.minimum/maximum
        row[off + 1] = hi if hi != hi or hi >= mx else mx
        if "sum" in col:
            row[off + col["sum"]] += block.sum()
        if "sumsq" in col:
            row[off + col["sumsq"]] += np.vecdot(block, block).sum()
        bins = self._bins_np[bins_kind]
        k = same_bin(self.edge_f32[bins_kind], float(row[off]), float(row[off + 1]))
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

    def _count(self, kind: str, x: Tensor) -> None:
        """Count the values of ``x`` (any shape, any float dtype) into ``kind``'s bins as ``bucketize``
        (``right=True``) would: a small tensor with ``bucketize``; a large one by comparing fp32 chunks of
        :attr:`CHUNK` elements with each edge (the values at or above each edge; NaN in the last bin), so
        the extra memory is one chunk, never an index per element or a full-size copy."""
        n = x.numel()
        if n <= self.CHUNK:
            f = x.reshape(-1)
            self._bucketize(kind, f if f.dtype == torch.float32 else f.float())
            return
        edges = self.edge_values[kind]
        k = len(edges)
        ge = torch.zeros(k + 1, dtype=torch.int64, device=self.device)  # ge[j]: values >= edges[j]; ge[k]: NaN
        for chunk in chunks(x, self.CHUNK):
            f = chunk.float()
            for j, e in enumerate(edges):
                ge[j] += (f >= e).sum()
            ge[k] += torch.isnan(f).sum()
        b = self.bins[kind]
        b[0] += n - ge[k] - ge[0]
        b[1:k] += ge[: k - 1] - ge[1:k]
        b[k] += ge[k - 1] + ge[k]

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
                    rows_np[:, GRAD_SQ_COLS] = sq_np[:, None]  # sumsq, normsq_max, normsq_min
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
