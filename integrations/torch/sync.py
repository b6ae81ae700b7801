"""The reducer's buffer merged across processes at a check, derived from the declaration in
:mod:`boundguard.stats`: each column by its :attr:`~boundguard.stats.Stat.sync` (min, max, sum, mean of
per-step values, or replicated: kept as it is), counts as int64 (:attr:`~boundguard.stats.Stat.dtype`).
:func:`boundguard.stats.merge_rows` is the numpy reference it is tested against.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from boundguard.stats import KINDS, STATS

if TYPE_CHECKING:
    from boundguard.integrations.torch.layout import Buffer

__all__ = ["all_reduce"]

#: The kinds whose element counts (``Buffer.counts``) are summed across processes (not replicated ones).
_SUMMED_COUNTS = tuple(k for k in KINDS if all(s.sync != "replicated" for s in STATS if s.kind == k))


def all_reduce(red: "Buffer") -> None:
    """Merge every process's buffer of ``red`` in place, so every rank judges the same snapshot: min/max
    columns by MIN/MAX, sums and the per-step losses by SUM (losses then averaged: a NaN on any rank stays
    NaN), element counts and bins as int64 (exact past 2**24), replicated columns untouched (or, for
    sharded gradients, their squared norms summed per step: exact for each step's row, an upper bound for
    the largest step of blocks folded in intervals longer than ``Reducer.ROW_CAP`` steps). Four
    collectives per check, none between checks."""
    import torch.distributed as dist

    world = dist.get_world_size()
    block = red.block
    by_op = red.sync_cols[red.grad_sharded]
    for op, reduce_op in (("min", dist.ReduceOp.MIN), ("max", dist.ReduceOp.MAX)):
        cols = by_op[op]
        if cols.numel():
            t = block.index_select(1, cols)
            dist.all_reduce(t, op=reduce_op)
            block.index_copy_(1, cols, t)
    cols = by_op["sum"]
    sums = block.index_select(1, cols)
    step_losses = block[:, red.width]
    packed = torch.cat([sums.reshape(-1), red.losses, step_losses])
    dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    k, nl = sums.numel(), red.losses.numel()
    block.index_copy_(1, cols, packed[:k].view_as(sums))
    red.losses.copy_(packed[k: k + nl] / world)
    step_losses.copy_(packed[k + nl:] / world)
    bins = red.raw[red.bins_at:].view(torch.int64)
    counts = torch.tensor([red.counts[kind] for kind in _SUMMED_COUNTS], dtype=torch.int64, device=red.device)
    ints = torch.cat([bins, counts])
    dist.all_reduce(ints, op=dist.ReduceOp.SUM)
    bins.copy_(ints[: bins.numel()])
    for kind, v in zip(_SUMMED_COUNTS, ints[bins.numel():].tolist()):
        red.counts[kind] = int(v)
