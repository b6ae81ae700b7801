"""What one training step records: small tensors copied into the step's staging row (deferred and
committed with the step's other copies in one ``_foreach_copy_``), large ones or a second one of a kind
reduced at once, the head's gradients, the loss."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from boundguard.integrations.torch.kernels import chunks
from boundguard.integrations.torch.mirror import Mirror

__all__ = ["Staging"]


class Staging(Mirror):
    """The per-step entry points: :meth:`pred`, :meth:`pre`, :meth:`target`, :meth:`input`, :meth:`grads`,
    :meth:`loss`."""

    # (declared again for type checkers: each layer is checked on its own)
    _pending: list[Optional[str]]
    _pdst: list[Tensor]
    _psrc: list[Tensor]

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
        if kind == "target" and self.target_ignore is not None:  # the loss ignores them: class 0 instead
            t = torch.where(t == self.target_ignore, torch.zeros((), dtype=t.dtype, device=t.device), t)
        if t.numel() > self.CHUNK and t.is_floating_point() and not (kind == "pred" and self.distribution):
            self._reduce_large(kind, t.detach(), bins_kind)
            return
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

    def _reduce_large(self, kind: str, x: Tensor, bins_kind: str) -> None:
        """:meth:`_reduce_now` for a tensor of more than :attr:`CHUNK` elements (a language model's logits),
        at constant extra memory: min and max in its own dtype in one pass (widening a bf16/fp16 extreme
        to fp32 is exact), sums in fp32 over chunks, the bins from the tensor itself (:meth:`_bin`)."""
        if x.device != self.device:  # (a head on another device than the buffer)
            x = x.to(self.device, non_blocking=True)
        self._reduced = True
        c, merge = self._cells(kind)
        col = self._col[kind]
        mn, mx = torch.aminmax(x)
        c[0].copy_(mn)
        c[1].copy_(mx)
        sums = [c[col[f]] for f in ("sum", "sumsq") if f in col]
        for cell in sums:
            cell.zero_()
        if sums:
            for chunk in chunks(x, self.CHUNK):
                f = chunk.float().reshape(-1)
                if "sum" in col:
                    c[col["sum"]].add_(f.sum())
                if "sumsq" in col:
                    c[col["sumsq"]].add_(torch.dot(f, f))
        self._merge(kind, c, merge)
        self._bin(kind, bins_kind, x)

    def logits(self, z: Tensor, dim: int) -> None:
        """The logsumexp of the rows of ``z`` along its class dimension ``dim`` (logits a softmax
        cross-entropy consumes), added to this step's ``pre.lse`` and ``pre.lse_rows``: at most
        :attr:`LSE_ELEMENTS` elements a step (a language model's logits: the first rows of the batch, a
        sample), read in fp32 chunks of :attr:`CHUNK` elements, so the cost and the extra memory are
        bounded whatever the vocabulary and the batch."""
        z = z.detach()
        if z.dim() == 0 or not z.is_floating_point() or z.numel() == 0:
            return
        dim = dim % z.dim()
        if dim == z.dim() - 1 and z.is_contiguous():
            width = z.shape[-1]
            rows = z.view(-1, width)[: max(1, self.LSE_ELEMENTS // max(width, 1))]
            pieces, dim = rows.split(max(1, self.CHUNK // max(width, 1))), 1
        elif dim > 0:  # (batch, classes, ...): whole examples
            per = max(1, z[0].numel())
            pieces = z[: max(1, self.LSE_ELEMENTS // per)].split(max(1, self.CHUNK // per))
        else:
            return  # classes along the batch dimension: not logits of examples
        if z.device != self.device:
            pieces = [p.to(self.device, non_blocking=True) for p in pieces]
        c = self.cells[self.row]["pre"]
        col = self._col["pre"]
        total, rows_read = None, 0
        for piece in pieces:
            lse = torch.logsumexp(piece.float(), dim=dim)
            total = lse.sum() if total is None else total + lse.sum()
            rows_read += lse.numel()
        if total is None:
            return
        self._reduced = True
        c[col["lse"]].add_(total)
        c[col["lse_rows"]].add_(float(rows_read))

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

    def _commit(self, dsts: list[Tensor], srcs: list[Tensor]) -> None:
        """Carry out the step's deferred copies, with ``dsts``/``srcs`` (the step's gradients), in one
        ``_foreach_copy_``. A batch tensor resized in place since it was recorded is dropped from the
        step (its statistics would be of other values), never a failed step."""
        pending, pdst, psrc = self._pending, self._pdst, self._psrc
        self._pending = []
        self._pdst = []
        self._psrc = []
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
