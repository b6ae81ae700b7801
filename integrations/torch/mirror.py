"""Lazy bins and the NaN tripwire: a large tensor's bins wait for its step's min and max on the host (on
the CPU the rows are host memory; on a GPU a non-blocking copy into pinned memory, read once its CUDA event
has completed), so a tensor within one bin is counted with one scalar add. The only CUDA-specific code of
the reducer."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from boundguard.integrations.torch.kernels import Kernels
from boundguard.integrations.torch.layout import nonfinite, same_bin

__all__ = ["Mirror"]


class Mirror(Kernels):
    """The host mirror of each step's row: lazy bins and the tripwire."""

    # (declared again for type checkers: each layer is checked on its own)
    _held: list[tuple[int, str, str, Tensor, int]]
    _bins0: Optional[Tensor]

    def _bin(self, kind: str, bins_kind: str, x: Tensor) -> None:
        """Count ``x`` (any shape and float dtype; its min/max are in this step's row of ``kind`` already)
        into ``bins_kind``: a small tensor at once; a large one with one scalar add when its min and max lie
        between the same two edges, which on the CPU (the row is host memory) is decided now and on a GPU
        once the step's mirror has landed (:meth:`_resolve`: the tensor itself is held, never a copy)."""
        n = x.numel()
        if self._bins0 is None:  # the step's first count into the bins: keep what drop_step restores
            self._bins0 = self.raw[self.bins_at:].clone()
        if n < self.FAST_COUNT_MIN or (self._cuda and n > self.HOLD_MAX):
            self._count(bins_kind, x)
            return
        if not self._cuda:
            off = self.offs[kind]
            row = self._rows_np[self.row]
            b = same_bin(self.edge_f32[bins_kind], float(row[off]), float(row[off + 1]))
            if b is not None:
                self.bin_cells[bins_kind][b].add_(n)
            else:
                self._count(bins_kind, x)
            return
        self._held.append((self._slot, kind, bins_kind, x, n))

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
                    self._count(bins_kind, f)
                    continue
                if wait:
                    ev.synchronize()
                elif not ev.query():
                    if slot == self._slot:
                        keep.append((slot, kind, bins_kind, f, n))
                    else:
                        self._count(bins_kind, f)
                    continue
                row = self._mirror_np[slot]
            else:
                row = self._rows_np[self.row]
            off = self.offs[kind]
            b = same_bin(self.edge_f32[bins_kind], float(row[off]), float(row[off + 1]))
            if b is not None:
                self.bin_cells[bins_kind][b].add_(n)
            else:
                self._count(bins_kind, f)
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
        if (seen and not math.isfinite(loss)) or nonfinite(row.tolist(), self._minmax):
            self.tripped = True
