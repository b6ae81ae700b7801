"""The on-device Reducer checked against a numpy reference: random data with NaN/Inf, empty tensors,
low-precision inputs, integer/bool targets, several steps per interval and a tensor written twice in
one step (the merge path). The Reducer's rows become a core Snapshot exactly as the engine does it."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from boundguard.integrations.torch import Reducer
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from boundguard.stats import KINDS as ALL_KINDS
from boundguard.stats import Snapshot

#: the watched tensors (the gradients' per-step norms are tested in test_grads_are_staged_per_step)
KINDS = tuple(k for k in ALL_KINDS if k != "grad")
FAST = settings(max_examples=50, deadline=None)
NAN, INF = math.nan, math.inf


def _f32(x) -> float:
    return float(np.float32(x))


SPECIAL = [NAN, INF, -INF, 0.0, 1.0, -1.0, 2.5, 6.0, -6.0, 1e-30, float(np.nextafter(np.float32(1), np.float32(2))),
           _f32(0.1), _f32(0.9), float(np.nextafter(np.float32(0.1), np.float32(0))),
           float(np.nextafter(np.float32(0.9), np.float32(1)))]
DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "fp16": torch.float16, "bf16": torch.bfloat16}

elements = st.one_of(st.floats(-20, 20, width=32), st.sampled_from(SPECIAL))
tensor_data = arrays(np.float32, st.integers(0, 9), elements=elements)
step_strategy = st.fixed_dictionaries({
    "pred": st.lists(tensor_data, max_size=2),  # two writes in one step: a module called twice
    "pre": st.lists(tensor_data, max_size=2),
    "target": st.lists(tensor_data, max_size=2),
    "input": st.lists(tensor_data, max_size=2),
    "loss": st.one_of(st.none(), st.floats(width=32), arrays(np.float32, st.integers(1, 3), elements=elements)),
})
interval_strategy = st.lists(step_strategy, min_size=1, max_size=4)


def reference(steps: list[dict], dtype: torch.dtype, *, lo=None, hi=None, pin=None, tail=None) -> dict:
    """What an interval's snapshot must hold, computed with numpy on the fp32 values the device sees."""
    data = {k: [] for k in KINDS}
    losses = []
    for s in steps:
        for kind in KINDS:
            for a in s[kind]:
                data[kind].append(torch.as_tensor(a).to(dtype).float().numpy().reshape(-1))
        loss = s["loss"]
        if loss is not None:
            l = torch.as_tensor(loss).to(dtype).float()
            losses.append(float(l.mean()) if l.numel() > 1 else float(l))
    out, counts = {}, {}
    for kind in KINDS:
        x = np.concatenate(data[kind]) if data[kind] else np.zeros(0, np.float32)
        fin = x[np.isfinite(x)]
        counts[kind] = x.size
        out[f"{kind}.min"] = float(np.min(x)) if x.size else INF  # NaN-propagating
        out[f"{kind}.max"] = float(np.max(x)) if x.size else -INF
        out[f"{kind}.finite"] = float(fin.size)
        if kind in ("pre", "input"):
            out[f"{kind}.sumsq"] = float(np.sum(x.astype(np.float64) ** 2)) if x.size else 0.0
        if kind == "pred":
            f64 = fin.astype(np.float64)  # the true comparison, also for bounds fp32 cannot represent
            out["pred.below"] = float(np.sum(f64 < lo)) if lo is not None else 0.0
            out["pred.above"] = float(np.sum(f64 > hi)) if hi is not None else 0.0
            points = {_f32(p) for p in (pin or ()) if p is not None}
            out["pred.pinned"] = float(sum(np.sum(fin == p) for p in points))
            out["pred.rowsum_err"] = -INF  # not a distribution: the column stays neutral, merges included
        if kind == "pre":
            out["pre.tail"] = float(np.sum(np.abs(fin) > tail)) if tail is not None else 0.0
        if kind == "target":
            out["target.nonbinary"] = float(np.sum((fin != 0) & (fin != 1)))
            with np.errstate(invalid="ignore"):  # inf + -inf is NaN, as on the device
                out["target.sum"] = float(np.sum(x.astype(np.float64))) if x.size else 0.0
                out["target.sumsq"] = float(np.sum(x.astype(np.float64) ** 2)) if x.size else 0.0
    counts["grad"] = 0
    return {"values": out, "counts": counts, "losses": np.array(losses, dtype=np.float64)}


def run_interval(red: Reducer, steps: list[dict], dtype: torch.dtype, first_step: int = 1) -> Snapshot:
    for s in steps:
        for kind in KINDS:
            for a in s[kind]:
                getattr(red, kind)(torch.as_tensor(a).to(dtype))
        if s["loss"] is not None:
            red.loss(torch.as_tensor(s["loss"]).to(dtype))
        red.next_row()
    rows, counts, seen, losses = red.read()
    return Snapshot.from_rows(rows, counts, step=first_step + len(steps) - 1, first_step=first_step, loss_seen=seen, losses=losses)


def assert_matches(snap: Snapshot, ref: dict) -> None:
    assert snap.counts == ref["counts"]
    for name, want in ref["values"].items():
        got = snap.values[name]
        if math.isnan(want) or math.isinf(want):
            assert (math.isnan(got) and math.isnan(want)) or got == want, (name, got, want)
        elif name.endswith((".sumsq", ".sum")):
            assert got == pytest.approx(want, rel=1e-4, abs=1e-6), name
        else:
            assert got == want, (name, got, want)
    np.testing.assert_allclose(snap.losses, ref["losses"], rtol=1e-6, equal_nan=True)


@pytest.fixture(autouse=True, params=["staged", "staged-torch-kernels", "per-step-folded", "chunked"])
def reduction_path(request, monkeypatch):
    """Every test runs four times: small tensors staged and reduced at the check, in one block, by the
    CPU's numpy kernels and by the torch kernels a GPU runs; with blocks of 2 rows folded into the carry
    row on the device, tensors of up to 4 elements staged and larger ones reduced every step with the
    large-tensor (lazy) bins; and with every tensor of more than 3 elements reduced and counted in chunks
    of 3 (a language model's logits at constant memory; sizes that do not divide the chunk)."""
    if request.param == "staged-torch-kernels":
        monkeypatch.setattr(Reducer, "HOST_KERNELS", False)
    if request.param in ("per-step-folded", "chunked"):
        monkeypatch.setattr(Reducer, "ROW_CAP", 2)
        monkeypatch.setattr(Reducer, "STAGE_ELEMENTS", 8 if request.param == "per-step-folded" else 0)
        monkeypatch.setattr(Reducer, "FAST_COUNT_MIN", 0)  # the large-tensor counting path for the rest
    if request.param == "chunked":
        monkeypatch.setattr(Reducer, "CHUNK", 3)
    return request.param


def make_reducer(rows=4, *, lo=None, hi=None, pin=None, tail=None, distribution=False) -> Reducer:
    red = Reducer(rows, torch.device("cpu"))
    red.lo, red.hi, red.pin, red.tail, red.distribution = lo, hi, pin, tail, distribution
    red.configure()
    return red


CONFIGS = {
    "probability-clamp": {"lo": 0.0, "hi": 1.0, "pin": (0.0, 1.0), "tail": None},
    "scaled-sigmoid": {"lo": -1.0, "hi": 2.5, "pin": None, "tail": 6.0},
    "relu-pin": {"lo": None, "hi": None, "pin": (0.0, None), "tail": 3.0},
    "unbounded": {"lo": None, "hi": None, "pin": None, "tail": None},
    "bounds-fp32-cannot-represent": {"lo": 0.1, "hi": 0.9, "pin": (0.1, 0.9), "tail": None},
}


@FAST
@given(st.lists(interval_strategy, min_size=1, max_size=2), st.sampled_from(sorted(DTYPES)),
       st.sampled_from(sorted(CONFIGS)))
def test_reducer_matches_numpy(intervals, dtype_name, config):
    """Two consecutive intervals through one reducer: each matches the reference (the buffer resets)."""
    cfg, dtype = CONFIGS[config], DTYPES[dtype_name]
    red = make_reducer(**cfg)
    first = 1
    for steps in intervals:
        snap = run_interval(red, steps, dtype, first)
        assert_matches(snap, reference(steps, dtype, **cfg))
        np.testing.assert_array_equal(snap.loss_steps[: len(snap.losses)],
                                      [first + i for i, s in enumerate(steps) if s["loss"] is not None])
        first += len(steps)


def _steps(**per_kind):
    base = {k: [] for k in KINDS}
    base["loss"] = None
    base.update(per_kind)
    return [base]


def test_nan_and_inf_propagate_to_min_max_and_are_not_finite():
    red = make_reducer(lo=0.0, hi=1.0)
    snap = run_interval(red, _steps(pred=[np.array([0.5, NAN, 2.0], np.float32)],
                                    pre=[np.array([-INF, 1.0, 3.0], np.float32)]), torch.float32)
    assert math.isnan(snap.values["pred.min"]) and math.isnan(snap.values["pred.max"])
    assert snap.nonfinite("pred") == 1 and snap.values["pred.above"] == 1
    assert snap.values["pre.min"] == -INF and snap.values["pre.max"] == 3.0 and snap.nonfinite("pre") == 1
    assert snap.values["pre.sumsq"] == INF


def test_empty_tensors_leave_no_trace():
    red = make_reducer(lo=0.0, hi=1.0)
    empty = np.zeros(0, np.float32)
    snap = run_interval(red, _steps(pred=[empty], pre=[empty], target=[empty], input=[empty],
                                    loss=np.zeros(0, np.float32)), torch.float32)
    assert not any(snap.seen(k) for k in KINDS)
    assert snap.values["pred.min"] == INF and snap.values["pred.max"] == -INF
    assert snap.losses.size == 0


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_integer_and_bool_targets(dtype):
    y = torch.tensor([0, 1, 1, 0, 1, 0]).to(dtype) if dtype == torch.bool else torch.tensor([0, 1, 3, 2, 1, 0], dtype=dtype)
    red = make_reducer()
    red.target(y)
    red.next_row()
    rows, counts, seen, losses = red.read()
    snap = Snapshot.from_rows(rows, counts, step=1, first_step=1, loss_seen=seen, losses=losses)
    ref = y.float().numpy()
    assert snap.counts["target"] == y.numel()
    assert (snap.values["target.min"], snap.values["target.max"]) == (ref.min(), ref.max())
    assert snap.values["target.finite"] == y.numel()
    assert snap.values["target.nonbinary"] == float(np.sum((ref != 0) & (ref != 1)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_extremes(dtype):
    """fp16 overflow (65504 is the largest finite) and bf16's coarse grid are judged on the values the model produced."""
    big = torch.tensor([65504.0, -65504.0, 1.0], dtype=dtype)
    red = make_reducer(lo=-1.0, hi=1.0)
    red.pred(big)
    red.pred(big * 2)  # overflows to +-inf in fp16, stays finite in bf16; and exercises the merge path
    red.next_row()
    rows, counts, seen, losses = red.read()
    snap = Snapshot.from_rows(rows, counts, step=1, first_step=1, loss_seen=seen, losses=losses)
    ref = torch.cat([big, big * 2]).float().numpy()
    assert snap.values["pred.max"] == ref.max() and snap.values["pred.min"] == ref.min()
    assert snap.values["pred.finite"] == np.isfinite(ref).sum()
    fin = ref[np.isfinite(ref)]
    assert snap.values["pred.above"] == np.sum(fin > 1) and snap.values["pred.below"] == np.sum(fin < -1)


def test_distribution_rowsum_error_along_the_class_dim():
    p = torch.softmax(torch.randn(6, 4, generator=torch.Generator().manual_seed(0)), dim=1)
    bad = p.clone()
    bad[2] *= 1.3
    red = make_reducer(lo=0.0, hi=1.0, distribution=True)
    red.class_dim = 1
    red.pred(p)
    red.next_row()
    red.pred(bad)
    red.pred(p)  # merge path: the row keeps the worse of the two
    red.next_row()
    rows, counts, seen, losses = red.read()
    snap = Snapshot.from_rows(rows, counts, step=2, first_step=1, loss_seen=seen, losses=losses)
    want = float(np.max(np.abs(bad.numpy().sum(1) - 1)))
    assert snap.values["pred.rowsum_err"] == pytest.approx(want, rel=1e-5)
    assert snap.values["pred.rowsum_err"] > 0.2


def test_merge_path_does_not_invent_a_rowsum_error():
    """A module called twice in one step merges its statistics; columns the call does not write stay neutral."""
    red = make_reducer(lo=0.0, hi=1.0)
    red.pred(torch.tensor([0.2, 0.4]))
    red.pred(torch.tensor([0.6, 0.8]))
    red.next_row()
    rows, counts, seen, losses = red.read()
    snap = Snapshot.from_rows(rows, counts, step=1, first_step=1, loss_seen=seen, losses=losses)
    assert snap.values["pred.rowsum_err"] == -INF
    assert (snap.values["pred.min"], snap.values["pred.max"]) == (_f32(0.2), _f32(0.8))


def test_shared_identity_head():
    """With ``shared`` (identity head) one tensor is counted as both the pre-activation and the prediction."""
    z = torch.tensor([-2.0, 0.5, 3.0, NAN])
    red = make_reducer(lo=0.0, hi=1.0)
    red.shared = True
    red.pre(z, also_pred=True)
    red.next_row()
    rows, counts, seen, losses = red.read()
    snap = Snapshot.from_rows(rows, counts, step=1, first_step=1, loss_seen=seen, losses=losses)
    assert snap.counts["pred"] == snap.counts["pre"] == 4
    for f in ("min", "max", "finite"):
        v_pred, v_pre = snap.values[f"pred.{f}"], snap.values[f"pre.{f}"]
        assert (math.isnan(v_pred) and math.isnan(v_pre)) or v_pred == v_pre
    assert snap.values["pred.finite"] == 3
    assert (snap.values["pred.below"], snap.values["pred.above"]) == (1, 1)


def test_loss_per_step():
    red = make_reducer()
    red.loss(torch.tensor(0.5))
    red.next_row()
    red.next_row()  # a step without a loss
    red.loss(torch.tensor([1.0, 3.0]))  # a per-sample loss: its mean
    red.next_row()
    red.loss(torch.tensor(NAN))
    red.next_row()
    rows, counts, seen, losses = red.read()
    snap = Snapshot.from_rows(rows, counts, step=14, first_step=11, loss_seen=seen, losses=losses)
    np.testing.assert_array_equal(snap.losses, [0.5, 2.0, NAN])
    np.testing.assert_array_equal(snap.loss_steps, [11, 13, 14])


def test_bounds_that_fp32_cannot_represent():
    """bounds=(0.1, 0.9): a value is below/above by the true comparison; a clamp's output counts as pinned."""
    below = float(np.nextafter(np.float32(0.1), np.float32(0)))
    above = float(np.nextafter(np.float32(0.9), np.float32(1)))
    p = torch.tensor([below, _f32(0.1), 0.5, _f32(0.9), above], dtype=torch.float32)
    red = make_reducer(lo=0.1, hi=0.9, pin=(0.1, 0.9))
    red.pred(p)
    red.pred(torch.clamp(torch.tensor([-3.0, 3.0]), 0.1, 0.9))
    red.next_row()
    rows, counts, seen, losses = red.read()
    snap = Snapshot.from_rows(rows, counts, step=1, first_step=1, loss_seen=seen, losses=losses)
    assert (snap.values["pred.below"], snap.values["pred.above"]) == (1, 1)
    assert snap.values["pred.pinned"] == 4  # f32(0.1) and f32(0.9), once each from p and from the clamp


def test_a_step_all_at_a_bound_fp32_cannot_represent_counts_as_pinned():
    """A step whose every value is f32(0.9) (a clamp's output) lies in one bin: which bin is read from the
    edges as fp32 compares with them (0.9 is 0.89999998 there), not from the bounds as written, else the
    lazy count puts the step below the pin. (Hypothesis found it: an empty step, then [0.9].)"""
    red = make_reducer(lo=0.1, hi=0.9, pin=(0.1, 0.9))
    red.next_row()
    red.pred(torch.tensor([_f32(0.9)], dtype=torch.float32))
    red.next_row()
    rows, counts, seen, losses = red.read()
    snap = Snapshot.from_rows(rows, counts, step=2, first_step=1, loss_seen=seen, losses=losses)
    assert (snap.values["pred.pinned"], snap.values["pred.above"], snap.values["pred.below"]) == (1, 0, 0)


def test_grads_are_staged_per_step_and_reduced_at_the_check():
    """Per step the squared norm of the head's gradients (several parameters; a NaN in one step; a
    second record in one step ignored): the interval's sum, largest and smallest step and finite steps."""
    red = make_reducer(rows=4)
    steps = [[torch.tensor([3.0, 4.0]), torch.tensor([12.0])],  # |g|^2 = 25 + 144
             [torch.tensor([1.0, 0.0]), torch.tensor([0.0])],
             [torch.tensor([math.nan, 1.0]), torch.tensor([1.0])]]
    for gs in steps:
        red.grads(gs)
        red.grads([torch.tensor([100.0])])  # a second optimizer's step: the head was recorded already
        red.next_row()
    rows, counts, seen, losses = red.read()
    snap = Snapshot.from_rows(rows, counts, step=3, first_step=1, loss_seen=seen, losses=losses)
    assert snap.counts["grad"] == 3 and snap.nonfinite("grad") == 1
    assert math.isnan(snap.values["grad.sumsq"]) and math.isnan(snap.values["grad.normsq_max"])
    red.grads(steps[0])
    red.grads([torch.tensor([2.0], dtype=torch.float64)])  # ignored: once per step
    red.next_row()
    red.grads([torch.tensor([2.0], dtype=torch.float64)])  # not fp32: reduced at once
    red.next_row()
    rows, counts, seen, losses = red.read()
    snap = Snapshot.from_rows(rows, counts, step=5, first_step=4, loss_seen=seen, losses=losses)
    assert snap.values["grad.sumsq"] == pytest.approx(169.0 + 4.0)
    assert snap.values["grad.normsq_max"] == pytest.approx(169.0)
    assert snap.values["grad.normsq_min"] == pytest.approx(4.0) and snap.nonfinite("grad") == 0


def test_a_large_strided_low_precision_tensor_in_chunks(monkeypatch):
    """A transposed bf16 tensor (not contiguous) larger than a chunk, straddling the bounds, with NaN and
    Inf: counted by comparisons chunk by chunk, min/max/sumsq as numpy computes them on its fp32 values."""
    monkeypatch.setattr(Reducer, "CHUNK", 64)
    monkeypatch.setattr(Reducer, "STAGE_ELEMENTS", 0)
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(37, 23, generator=g) * 2).to(torch.bfloat16).t()  # 851 elements, strided
    x[3, 5], x[7, 1], x[0, 0] = math.nan, math.inf, -math.inf
    red = make_reducer(lo=0.0, hi=1.0, tail=2.0)
    red.pre(x)
    red.pred(x)
    red.next_row()
    rows, counts, seen, losses = red.read()
    snap = Snapshot.from_rows(rows, counts, step=1, first_step=1, loss_seen=seen, losses=losses)
    ref = x.float().numpy().reshape(-1)
    fin = ref[np.isfinite(ref)]
    assert snap.counts["pred"] == snap.counts["pre"] == ref.size
    assert snap.values["pred.finite"] == snap.values["pre.finite"] == fin.size
    assert snap.values["pred.below"] == np.sum(fin < 0) and snap.values["pred.above"] == np.sum(fin > 1)
    assert snap.values["pre.tail"] == np.sum(np.abs(fin) > 2.0)
    assert math.isnan(snap.values["pre.min"]) and math.isnan(snap.values["pre.max"])
    assert math.isnan(snap.values["pre.sumsq"])  # (NaN squared)
    finite = x.float().nan_to_num(0.0, 0.0, 0.0)  # the same tensor without its NaN/Inf: sums of squares agree
    red.pre(finite)
    red.next_row()
    rows, counts, seen, losses = red.read()
    snap = Snapshot.from_rows(rows, counts, step=2, first_step=2, loss_seen=seen, losses=losses)
    ref = finite.numpy().astype(np.float64)
    assert snap.values["pre.sumsq"] == pytest.approx(float(np.sum(ref ** 2)), rel=1e-5)
    assert (snap.values["pre.min"], snap.values["pre.max"]) == (ref.min(), ref.max())


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("layout", ["tokens-last", "classes-second", "strided-last"])
def test_logsumexp_of_logits_in_bounded_chunks(monkeypatch, dtype, layout):
    """The mean logsumexp of logits' rows (what z-loss penalises) against numpy: the class dimension last
    (a language model's (batch, tokens, vocabulary)) or second ((batch, classes, H, W)), a transposed
    non-contiguous tensor, low precision, a chunk that does not divide the rows, a row budget that reads
    only the first rows, and a NaN row that makes the sum NaN (as the loss would be)."""
    monkeypatch.setattr(Reducer, "CHUNK", 50)  # 50 // 7 = 7 rows of 7 classes a piece: 3 pieces and a rest
    monkeypatch.setattr(Reducer, "LSE_ELEMENTS", 7 * 19)  # 19 rows read of the 24 (or 4 examples of 6)
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(4, 6, 7, generator=g) * 3).to(DTYPES[dtype])
    if layout == "classes-second":
        x, dim = x.permute(0, 2, 1).contiguous(), 1  # (4, 7, 6)
    elif layout == "strided-last":
        x, dim = x.transpose(0, 1), -1  # (6, 4, 7), not contiguous
    else:
        dim = -1
    red = make_reducer()
    red.logits(x, dim)
    red.next_row()
    rows, counts, seen, losses = red.read()
    snap = Snapshot.from_rows(rows, counts, step=1, first_step=1, loss_seen=seen, losses=losses)
    ref = x.float().numpy().astype(np.float64)
    per_row = np.log(np.exp(ref).sum(axis=dim))
    if layout == "tokens-last":
        read = per_row.reshape(-1)[:19]
    else:  # whole examples along the first dimension, as many as the budget holds
        read = per_row[: 7 * 19 // x[0].numel()].reshape(-1)
    assert snap.values["pre.lse_rows"] == read.size
    assert snap.mean_lse() == pytest.approx(float(read.mean()), rel=1e-5)
    nan = x.clone()
    nan[0, 0, 0] = math.nan
    red.logits(nan, dim)
    red.next_row()
    rows, counts, seen, losses = red.read()
    snap = Snapshot.from_rows(rows, counts, step=2, first_step=2, loss_seen=seen, losses=losses)
    assert math.isnan(snap.mean_lse())
