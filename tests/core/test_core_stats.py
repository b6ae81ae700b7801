"""The statistics declaration: reduce and merge checked against numpy references (hypothesis)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from boundguard.stats import (
    COLUMNS,
    KINDS,
    LOSS_COLUMN,
    STATS,
    Snapshot,
    fields_of,
    merge_rows,
    neutral_row,
    reduce_rows,
)

W = len(COLUMNS)
OPS = np.array([s.reduce for s in STATS])
SYNC = np.array([s.sync for s in STATS])
FAST = settings(max_examples=40, deadline=None)
# inf + -inf in the reference arithmetic (and in merge_rows' a + b) is expected here
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

values = st.one_of(
    st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False, width=32),
    st.sampled_from([math.nan, math.inf, -math.inf, 0.0]),
)


def rows_strategy(min_rows=0, max_rows=6, n=None):
    shape = (n, W) if n is not None else st.tuples(st.integers(min_rows, max_rows), st.just(W))
    return arrays(np.float64, shape, elements=values)


def _same(a, b):
    return (math.isnan(a) and math.isnan(b)) or a == b


def test_declaration_is_consistent():
    assert len(set(COLUMNS)) == len(COLUMNS)
    assert COLUMNS[LOSS_COLUMN] == "loss.value"
    for kind in KINDS:
        # element statistics of each watched tensor; the gradients' are per step (a norm per step)
        want = {"sumsq", "normsq_max", "normsq_min", "finite"} if kind == "grad" else {"min", "max", "finite"}
        assert want <= set(fields_of(kind)) and all(f"{kind}.{f}" in COLUMNS for f in fields_of(kind))
    row = neutral_row()
    assert np.all(row[OPS == "min"] == np.inf) and np.all(row[OPS == "max"] == -np.inf)
    assert np.all(row[OPS == "sum"] == 0) and np.all(np.isnan(row[OPS == "step"]))


@FAST
@given(rows_strategy())
def test_reduce_rows_matches_numpy(rows):
    out = reduce_rows(rows)
    ref_rows = rows if rows.shape[0] else neutral_row()[None]
    assert "loss.value" not in out
    for i, s in enumerate(STATS):
        col = ref_rows[:, i]
        if s.reduce == "min":
            ref = np.min(col)  # NaN-propagating, like the device kernels
        elif s.reduce == "max":
            ref = np.max(col)
        elif s.reduce == "sum":
            ref = np.sum(col)
        else:
            continue
        assert _same(out[s.name], float(ref)), (s.name, out[s.name], ref)


def test_reduce_rows_propagates_nan_in_min_max():
    rows = np.tile(neutral_row(), (3, 1))
    i = COLUMNS.index("pred.min")
    rows[:, i] = [0.5, np.nan, -1.0]
    rows[:, COLUMNS.index("pred.max")] = [0.5, 2.0, -1.0]
    out = reduce_rows(rows)
    assert math.isnan(out["pred.min"]) and out["pred.max"] == 2.0


@FAST
@given(st.integers(1, 4).flatmap(lambda n: st.tuples(rows_strategy(n=n), rows_strategy(n=n))))
def test_merge_rows_matches_numpy(ab):
    a, b = ab
    out = merge_rows(a, b)
    assert out.shape == a.shape
    for i, op in enumerate(SYNC):
        x, y, m = a[:, i], b[:, i], out[:, i]
        if op == "replicated":  # the same on every process (the head's gradients under DDP): not summed
            ref = x
        elif op == "min":
            ref = np.minimum(x, y)
        elif op == "max":
            ref = np.maximum(x, y)
        elif op == "sum":
            ref = x + y
        else:  # per-step loss: the mean over processes, as the all-reduce computes it: a NaN on any stays NaN
            ref = (x + y) / 2
        np.testing.assert_array_equal(m, ref, err_msg=COLUMNS[i])


@FAST
@given(st.integers(1, 4).flatmap(lambda n: st.tuples(rows_strategy(n=n), rows_strategy(n=n))))
def test_merge_commutes_with_reduce(ab):
    """Merging two processes' buffers then reducing equals reducing each and combining by the op."""
    a, b = ab
    merged, ra, rb = reduce_rows(merge_rows(a, b)), reduce_rows(a), reduce_rows(b)
    for s in STATS:
        if s.sync == "replicated":
            ref = ra[s.name]
        elif s.reduce == "min":
            ref = float(np.minimum(ra[s.name], rb[s.name]))
        elif s.reduce == "max":
            ref = float(np.maximum(ra[s.name], rb[s.name]))
        elif s.reduce == "sum":
            ref = ra[s.name] + rb[s.name]
        else:
            continue
        if s.sync == "sum" and math.isfinite(ref):
            assert merged[s.name] == pytest.approx(ref, rel=1e-9, abs=1e-3)
        else:  # a non-finite sum is the same either way: NaN when a NaN or both infinities are in, else that inf
            assert _same(merged[s.name], ref), (s.name, merged[s.name], ref)


@FAST
@given(rows_strategy(min_rows=1))
def test_merge_with_neutral_is_identity(rows):
    neutral = np.tile(neutral_row(), (rows.shape[0], 1))
    # per-step values are averaged over processes, which all see every step; replicated ones are kept
    reduced = (SYNC != "mean") & (SYNC != "replicated")
    for out in (merge_rows(rows, neutral), merge_rows(neutral, rows)):
        np.testing.assert_array_equal(out[:, reduced], rows[:, reduced])
    np.testing.assert_array_equal(merge_rows(rows, rows)[:, SYNC != "sum"], rows[:, SYNC != "sum"])


def test_snapshot_from_rows_losses_and_derived_numbers():
    rows = np.tile(neutral_row(), (4, 1))
    rows[:, LOSS_COLUMN] = [0.5, np.nan, 0.3, 9.0]
    c = {name: COLUMNS.index(name) for name in COLUMNS}
    rows[0, c["pred.finite"]], rows[2, c["pred.finite"]] = 5, 3
    rows[0, c["pred.below"]], rows[1, c["pred.above"]] = 1, 2
    rows[:, c["pred.min"]] = [-0.1, 0.0, 0.2, 0.1]
    rows[:, c["pred.max"]] = [0.9, 1.5, 0.8, 0.7]
    rows[0, c["input.sumsq"]], rows[0, c["input.finite"]] = 40.0, 10
    snap = Snapshot.from_rows(rows, {"pred": 10, "input": 10}, step=13, first_step=10, epoch=2,
                              loss_seen=[True, True, True, False])
    np.testing.assert_array_equal(snap.losses, [0.5, np.nan, 0.3])
    np.testing.assert_array_equal(snap.loss_steps, [10, 11, 12])
    assert snap.steps == 4
    assert snap.counts == {"pred": 10, "pre": 0, "target": 0, "input": 10, "grad": 0}
    assert (snap.values["pred.min"], snap.values["pred.max"]) == (-0.1, 1.5)
    assert snap.nonfinite("pred") == 2
    assert snap.out_of_bounds() == 3
    assert snap.share("pred", "below") == pytest.approx(0.1)
    assert snap.rms("input") == pytest.approx(2.0)
    assert snap.absmax("pred") == 1.5
    assert snap.seen("pred") and not snap.seen("pre")
    summary = snap.loss_summary()
    assert summary == {"mean": pytest.approx(0.4), "min": 0.3, "max": 0.5, "last": 0.3, "nonfinite": 1, "count": 3}
    m = snap.metrics()
    assert m["boundguard/output_max"] == 1.5 and m["boundguard/out_of_bounds_share"] == pytest.approx(0.3)
    rec = snap.to_record()
    json.dumps(rec, allow_nan=False)  # strict JSON
    assert rec["pred.nonfinite"] == 2 and rec["loss.nonfinite"] == 1 and "pre.min" not in rec


def test_snapshot_from_no_rows():
    snap = Snapshot.from_rows(np.zeros((0, W)), {}, step=1, first_step=1)
    assert snap.losses.size == 0 and not any(snap.seen(k) for k in KINDS)
    assert snap.loss_summary()["mean"] is None
    json.dumps(snap.to_record(), allow_nan=False)
