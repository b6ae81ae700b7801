"""The cross-process merge of the reducer's buffer (integrations/torch/sync.py) against the core's numpy
reference (:func:`boundguard.stats.merge_rows`), with a fake two-rank ``all_reduce`` in one process: counts
past 2**24 stay exact (float32 cannot count them), the head's gradients, the same on every DDP rank, are
not summed, min/max/sums/losses combine by their declared op."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
from boundguard.integrations.torch import Reducer

from boundguard.stats import CountingPlan
from boundguard.stats import COLUMNS, STATS, Snapshot, merge_rows

PLAN = CountingPlan(0.0, 1.0, False, None, None, 1)


class TwoRanks:
    """``dist.all_reduce`` for rank 0 of two, in one process: rank 1's tensors of each collective were
    recorded first, in the same order (every rank makes the same calls)."""

    def __init__(self) -> None:
        self.peer: list[torch.Tensor] = []
        self.recording = True

    def all_reduce(self, t: torch.Tensor, op=dist.ReduceOp.SUM, **_) -> None:
        if self.recording:
            self.peer.append(t.clone())
            return
        other = self.peer.pop(0)
        if op == dist.ReduceOp.MIN:
            torch.minimum(t, other, out=t)
        elif op == dist.ReduceOp.MAX:
            torch.maximum(t, other, out=t)
        else:
            t.add_(other)


def _feed(red: Reducer, steps: list[dict]) -> None:
    for s in steps:
        red.pred(s["pred"])
        red.pre(s["pred"] * 4 - 2)
        red.target(s["target"])
        red.input(s["input"])
        red.grads([s["grad"]])
        red.loss(s["loss"])
        red.next_row()


def _rank_steps(rank: int, n_pred: int, nan_step: int | None) -> list[dict]:
    g = torch.Generator().manual_seed(rank)
    steps = []
    for i in range(2):
        pred = torch.rand(n_pred + i, generator=g) * 0.98 + 0.01  # 2 n + 1 a rank: odd
        if rank == 1:
            pred[:7] += 1.0  # 7 out of range on rank 1 only
        loss = torch.tensor(0.5 + rank + i)
        if nan_step == i:
            loss = torch.tensor(math.nan)
        steps.append({"pred": pred, "target": torch.rand(16, generator=g), "input": torch.randn(16, 4, generator=g),
                      "grad": torch.full((3, 5), float(i + 1)),  # the same on both ranks (DDP all-reduced them)
                      "loss": loss})
    return steps


def _reducer(steps: list[dict]) -> Reducer:
    red = Reducer(2, torch.device("cpu"))
    red.apply(PLAN)
    _feed(red, steps)
    return red


@pytest.mark.parametrize("n_pred", [1000, (1 << 23) + 3])  # the larger: 2**24 + 7 a rank
def test_all_reduce_matches_the_numpy_merge(monkeypatch, n_pred):
    ranks = [_rank_steps(0, n_pred, None), _rank_steps(1, n_pred, nan_step=1)]
    local = [_reducer(s).read() for s in ranks]  # each rank's own rows and counts, unmerged
    fake = TwoRanks()
    monkeypatch.setattr(dist, "all_reduce", fake.all_reduce)
    monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: 2)
    _reducer(ranks[1]).all_reduce()  # rank 1's side of each collective, recorded
    fake.recording = False
    red = _reducer(ranks[0])
    red.all_reduce()
    rows, counts, seen, losses = red.read()
    assert not fake.peer, "rank 0 made other collectives than rank 1"

    (r0, c0, _, l0), (r1, c1, _, l1) = local
    ref = merge_rows(r0, r1)
    i = {c: j for j, c in enumerate(COLUMNS)}
    for st in STATS:
        if st.sync == "mean":  # the per-step loss: see losses
            continue
        got, want = rows[:, i[st.name]], ref[:, i[st.name]]
        if st.sync == "sum" and st.dtype == "value":  # a float32 sum on the device, float64 in numpy
            np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=st.name)
        else:  # min, max, replicated, and counts: exact
            np.testing.assert_array_equal(got, want, err_msg=st.name)
    np.testing.assert_array_equal(losses, (l0 + l1) / 2)  # rank 1's NaN loss stays NaN
    assert counts["pred"] == 4 * n_pred + 2 and counts["grad"] == 2  # exact; gradient steps not doubled
    snap = Snapshot.from_rows(rows, counts, step=2, first_step=1, loss_seen=seen, losses=losses)
    assert snap.nonfinite("pred") == 0 and snap.values["pred.above"] == 14
    assert snap.values["grad.finite"] == 2  # two steps with finite gradients, not four
