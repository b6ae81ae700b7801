"""Conformance over the whole catalogue: every rule fires on a hand-made scenario and stays quiet on its
healthy twin. Rules are pure functions of (snapshot, facts, bounds, history), so each case runs in
microseconds without any framework.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable

import numpy as np
import pytest

from boundguard.alerts import SEVERITIES
from boundguard.bounds import Bounds
from boundguard.catalogue import CATALOGUE, CODES
from boundguard.model_facts import ModelFacts, classify_loss
from boundguard.rules import RULES, Context, History, default_rules
from boundguard.stats import KINDS, LOSS_COLUMN, Snapshot, neutral_row

RULE_BY_CODE = {r.code: r for r in RULES}


# ----------------------------------------------------------------------------------------- builders
def make_snap(
    seen: dict[str, int] | None = None,
    values: dict[str, float] | None = None,
    losses: tuple = (),
    *,
    first_step: int = 1,
    step: int | None = None,
) -> Snapshot:
    """A snapshot in which each kind in ``seen`` was seen that many times, all values finite and in
    [-1, 1] unless ``values`` overrides them; ``losses`` are the per-step losses of the interval."""
    n = max(len(losses), 1)
    rows = np.tile(neutral_row(), (n, 1))
    for i, loss in enumerate(losses):
        rows[i, LOSS_COLUMN] = loss
    counts = dict(seen or {})
    snap = Snapshot.from_rows(
        rows, counts, step=first_step + n - 1 if step is None else step, first_step=first_step,
        loss_seen=[True] * len(losses) + [False] * (n - len(losses)),
    )
    for kind, c in counts.items():
        snap.values.update({f"{kind}.min": -1.0 if kind != "target" else 0.0, f"{kind}.max": 1.0,
                            f"{kind}.finite": float(c)})
        if kind in ("pre", "input"):
            snap.values[f"{kind}.sumsq"] = 0.5 * c  # rms ~0.7
    snap.values.update(values or {})
    return snap


def facts(activation: str = "identity", loss: str | None = "mse_loss", **kw) -> ModelFacts:
    return ModelFacts(pred_where="head", pre_where="head.fc", activation=activation,
                      loss=classify_loss(loss), loss_where=loss, **kw)


def history(**kw) -> History:
    h = History()
    for k, v in kw.items():
        if k in ("window", "pre_absmax", "logit_recent"):
            getattr(h, k).extend(v)
        else:
            setattr(h, k, v)
    return h


def at(step: int) -> Snapshot:
    """An empty interval ending at ``step``."""
    return make_snap(step=step, first_step=step)


def ctx(snap=None, f=None, bounds=None, h=None) -> Context:
    """The context the monitor builds: ``h`` is the history before the interval, folded with it."""
    snap, h = snap or make_snap(), h or History()
    before = h.copy()
    h.fold(snap, min_improvement=0.01)
    return Context(snap, f or facts(), bounds, h, before)


def _stuck(level: float, var: float, *, mean: float = 0.0, binary: bool = False, steps: int = 300,
           then: float | None = None, start: float = 1.5, best_step: int = 0) -> History:
    """A run whose loss sits at ``level`` (its best too) after ``steps`` steps, on 1000 targets of the
    given mean and variance; its level half the run ago was ``then`` (default: ``level``), its first
    losses and initial level ``start`` times ``level``."""
    n = 1000
    levels = [[1, level * start], [steps // 4, then if then is not None else level], [steps, level]]
    return history(window=[level] * 20, initial_level=level * start, first_losses=[level * start] * 5,
                   best_level=level, best_step=best_step, steps_seen=steps, levels=levels,
                   target_sum=mean * n, target_sumsq=(var + mean * mean) * n, target_moments_n=n, target_seen=n,
                   target_min=0.0 if binary else -3.0, target_max=1.0 if binary else 3.0)


P = Bounds.probability()
DIST = Bounds.distribution()
NOISY = [1.0 + 0.01 * math.sin(i) for i in range(30)]

# code -> list of (id, firing context builder); and code -> list of (id, healthy twin builder)
FIRING: dict[str, list[tuple[str, Callable[[], Context]]]] = {
    "nonfinite_input": [
        ("nan-inputs", lambda: ctx(make_snap({"input": 10}, {"input.finite": 7.0, "input.min": math.nan}))),
    ],
    "nonfinite_output": [
        ("nan-pred", lambda: ctx(make_snap({"pred": 10, "pre": 10}, {"pred.finite": 9.0, "pred.max": math.nan}))),
        ("inf-pre", lambda: ctx(make_snap({"pre": 10}, {"pre.finite": 8.0, "pre.max": math.inf}))),
    ],
    "nonfinite_loss": [
        ("nan-step", lambda: ctx(make_snap(losses=(0.5, math.nan, 0.4)))),
        ("inf-step", lambda: ctx(make_snap(losses=(math.inf,)))),
    ],
    "output_out_of_range": [
        ("declared-interval", lambda: ctx(make_snap({"pred": 10}, {"pred.min": -0.5, "pred.max": 1.2,
                                                                    "pred.below": 2.0, "pred.above": 1.0}),
                                          facts("sigmoid"), P)),
        ("distribution-rowsum", lambda: ctx(make_snap({"pred": 30}, {"pred.min": 0.0, "pred.max": 1.0,
                                                                      "pred.rowsum_err": 0.5}),
                                            facts("softmax", "cross_entropy"), DIST)),
    ],
    "missing_output_activation": [
        ("identity-probability", lambda: ctx(f=facts("identity"), bounds=P)),
        ("relu-symmetric", lambda: ctx(f=facts("relu"), bounds=Bounds.symmetric())),
        ("identity-distribution", lambda: ctx(f=facts("identity", "mse_loss"), bounds=DIST)),
        ("identity-scaled", lambda: ctx(f=facts("identity"), bounds=Bounds(2.0, 5.0))),
    ],
    "activation_loss_mismatch": [
        ("sigmoid-bce-with-logits", lambda: ctx(f=facts("sigmoid", "binary_cross_entropy_with_logits"))),
        ("softmax-cross-entropy", lambda: ctx(f=facts("softmax", "cross_entropy"))),
        ("softmax-nll", lambda: ctx(f=facts("softmax", "nll_loss"))),
        ("identity-bce", lambda: ctx(f=facts("identity", "binary_cross_entropy"))),
        ("sigmoid-bce-on-one-hot-classes", lambda: Context(make_snap(), facts("sigmoid", "binary_cross_entropy",
                                                                            classes=10), None, History(),
                                                           onehot=True)),
        ("unknown-bce-out-of-range", lambda: ctx(make_snap({"pred": 10}, {"pred.min": -2.0, "pred.max": 3.0}),
                                                 facts("unknown", "binary_cross_entropy"))),
    ],
    "target_out_of_range": [
        ("sigmoid-head-targets-to-10", lambda: ctx(make_snap({"target": 10}, {"target.max": 10.0}),
                                                   facts("sigmoid"))),
        ("logits-loss-negative-targets", lambda: ctx(make_snap({"target": 10}, {"target.min": -1.0}),
                                                     facts("identity", "binary_cross_entropy_with_logits"))),
        ("declared-bounds", lambda: ctx(make_snap({"target": 10}, {"target.max": 7.0}), facts("identity"),
                                        Bounds(0.0, 5.0))),
        ("labels-1-to-k", lambda: ctx(make_snap({"target": 10}, {"target.min": 1.0, "target.max": 4.0}),
                                      facts("identity", "cross_entropy", target_integer=True, classes=4))),
    ],
    "output_saturated": [
        ("clamp-pinned", lambda: ctx(make_snap({"pred": 100}, {"pred.pinned": 50.0}), facts("clamp"))),
        ("sigmoid-tail", lambda: ctx(make_snap({"pre": 100}, {"pre.tail": 80.0}), facts("sigmoid"))),
    ],
    "preactivation_exploding": [
        ("absmax", lambda: ctx(make_snap({"pre": 10}, {"pre.min": -5e3, "pre.max": 2e3}), facts("sigmoid"))),
        ("growing", lambda: ctx(make_snap({"pre": 10}, {"pre.min": -10.0, "pre.max": 900.0}), facts("sigmoid"),
                                h=history(pre_absmax=[5.0, 50.0, 200.0]))),
    ],
    "regression_loss_on_probabilities": [
        ("mse-on-sigmoid-binary", lambda: ctx(f=facts("sigmoid", "mse_loss"),
                                              h=history(target_seen=10, target_min=0.0, target_max=1.0))),
    ],
    "inputs_not_scaled": [
        ("rms-high", lambda: ctx(make_snap({"input": 10}, {"input.sumsq": 10 * 100.0 ** 2}))),
        ("rms-low", lambda: ctx(make_snap({"input": 10}, {"input.sumsq": 10 * 1e-5 ** 2}))),
    ],
    "loss_spike": [
        ("x20", lambda: ctx(make_snap(losses=(1.0, 20.0, 1.0)), h=history(window=NOISY, initial_level=1.0))),
        ("negative-loss-plus-5", lambda: ctx(make_snap(losses=(-3.0, 2.0, -3.0)),
                                             h=history(window=[-3.0 + 0.05 * (i % 3) for i in range(30)],
                                                       initial_level=1.0))),
        ("far-beyond-the-runs-tail", lambda: ctx(make_snap(losses=(1.0, 20.0, 1.0)),
                                                 h=history(window=NOISY, initial_level=1.0, top_rises=[2.0] * 5))),
    ],
    "loss_diverging": [
        ("x50", lambda: ctx(h=history(window=[5.0] * 20, initial_level=1.0, best_level=0.1, best_step=100))),
        ("nll-back-above-zero", lambda: ctx(h=history(window=[3.0] * 20, initial_level=0.9, best_level=-2.5,
                                                      best_step=100, noise=0.2))),
    ],
    "loss_plateau": [
        ("stalled", lambda: ctx(make_snap(step=2000, first_step=1951),
                                h=history(window=[1.0] * 20, best_level=1.0, best_step=10, steps_seen=2000))),
    ],
    "loss_at_baseline": [
        ("mse-at-target-variance", lambda: ctx(at(300), facts("identity", "mse_loss", loss_plain=True),
                                               h=_stuck(1.0, 1.0))),
        ("bce-at-label-entropy", lambda: ctx(at(300), facts("sigmoid", "binary_cross_entropy", loss_plain=True),
                                             h=_stuck(0.69, 0.25, mean=0.5, binary=True))),
        ("ce-at-log-k", lambda: ctx(at(300), facts("identity", "cross_entropy", loss_plain=True, target_integer=True,
                                                   classes=4), h=_stuck(1.38, 1.0))),
        # a learning rate so large that the output settles at the mean: back up to the baseline
        # a run that started at the baseline and is still there after start_steps
        ("started-at-the-baseline-and-stayed", lambda: ctx(at(1200), facts("sigmoid", "binary_cross_entropy",
                                                                         loss_plain=True),
                                                           h=_stuck(0.69, 0.25, mean=0.5, binary=True, steps=1200,
                                                                    start=1.0))),
        ("settled-back-at-the-mean", lambda: ctx(at(300), facts("sigmoid", "binary_cross_entropy", loss_plain=True),
                                                 h=_stuck(0.69, 0.25, mean=0.5, binary=True, then=0.62))),
    ],
    "logits_growing": [
        ("runaway", lambda: ctx(at(80), facts(loss="cross_entropy"),
                                h=history(logit_early=[[2.0, 5.5]] * 3,
                                          logit_recent=[[10.0, 8.0], [20.0, 12.0], [40.0, 20.0], [80.0, 40.0]]))),
    ],
    "nonfinite_gradient": [
        ("nan-grads-finite-loss", lambda: ctx(make_snap({"grad": 10}, {"grad.finite": 7.0, "grad.normsq_max": math.nan},
                                                        losses=(0.5, 0.4)))),
        ("scaler-skipped-every-step", lambda: ctx(make_snap({"grad": 10}, {"grad.finite": 0.0}),
                                                  facts(grad_scaled=True))),
    ],
    "gradient_exploding": [
        ("x1000-own-scale", lambda: ctx(make_snap({"grad": 10}, {"grad.normsq_max": 1e6}),
                                        h=history(grad_norms=[1.0, 2.0, 1.0]))),
    ],
    "gradient_vanishing": [
        ("zero-while-loss-high", lambda: ctx(make_snap({"grad": 10}, {"grad.normsq_max": 0.0}),
                                             h=history(window=[0.9] * 20, initial_level=1.0))),
        ("tiny-vs-own-scale", lambda: ctx(make_snap({"grad": 10}, {"grad.normsq_max": 1e-12}),
                                          h=history(window=[0.9] * 20, initial_level=1.0, grad_norms=[1.0] * 3))),
    ],
}

HEALTHY: dict[str, list[tuple[str, Callable[[], Context]]]] = {
    "nonfinite_input": [("finite", lambda: ctx(make_snap({"input": 10})))],
    "nonfinite_output": [("finite", lambda: ctx(make_snap({"pred": 10, "pre": 10})))],
    "nonfinite_loss": [("finite", lambda: ctx(make_snap(losses=(0.5, 0.45, 0.4))))],
    "output_out_of_range": [
        ("in-range", lambda: ctx(make_snap({"pred": 10}, {"pred.min": 0.1, "pred.max": 0.9}), facts("sigmoid"), P)),
        ("distribution-ok", lambda: ctx(make_snap({"pred": 30}, {"pred.min": 0.0, "pred.max": 1.0,
                                                                  "pred.rowsum_err": 1e-6}),
                                        facts("softmax", "nll_loss"), DIST)),
        ("no-bounds", lambda: ctx(make_snap({"pred": 10}, {"pred.below": 3.0}), facts("identity"), None)),
    ],
    "missing_output_activation": [
        ("sigmoid-head", lambda: ctx(f=facts("sigmoid"), bounds=P)),
        ("logits-loss", lambda: ctx(f=facts("identity", "binary_cross_entropy_with_logits"), bounds=P)),
        ("unbounded", lambda: ctx(f=facts("identity"), bounds=None)),
    ],
    "activation_loss_mismatch": [
        ("identity-bce-with-logits", lambda: ctx(f=facts("identity", "binary_cross_entropy_with_logits"))),
        ("identity-cross-entropy", lambda: ctx(f=facts("identity", "cross_entropy"))),
        ("log-softmax-nll", lambda: ctx(f=facts("log_softmax", "nll_loss"))),
        # multi-label targets (several 1s a row): a sigmoid per class is right
        ("sigmoid-bce-multi-label", lambda: ctx(f=facts("sigmoid", "binary_cross_entropy", classes=10))),
        ("sigmoid-bce", lambda: ctx(f=facts("sigmoid", "binary_cross_entropy"))),
        ("unknown-bce-in-range", lambda: ctx(make_snap({"pred": 10}, {"pred.min": 0.0}),
                                             facts("unknown", "binary_cross_entropy"))),
    ],
    "target_out_of_range": [
        ("sigmoid-head-unit-targets", lambda: ctx(make_snap({"target": 10}), facts("sigmoid"))),
        ("class-indices", lambda: ctx(make_snap({"target": 10}, {"target.max": 9.0}),
                                      facts("identity", "cross_entropy", target_integer=True))),
        ("class-indices-in-range", lambda: ctx(make_snap({"target": 10}, {"target.min": 0.0, "target.max": 9.0}),
                                               facts("identity", "cross_entropy", target_integer=True, classes=10))),
        ("ignore-index", lambda: ctx(make_snap({"target": 10}, {"target.min": -100.0, "target.max": 3.0}),
                                     facts("identity", "cross_entropy", target_integer=True, classes=4))),
        ("unbounded-head", lambda: ctx(make_snap({"target": 10}, {"target.max": 10.0}), facts("identity"))),
    ],
    "output_saturated": [
        ("clamp-few-pinned", lambda: ctx(make_snap({"pred": 100}, {"pred.pinned": 5.0}), facts("clamp"))),
        ("sigmoid-tail-with-log-loss", lambda: ctx(make_snap({"pre": 100}, {"pre.tail": 80.0}),
                                                   facts("sigmoid", "binary_cross_entropy"))),
    ],
    "preactivation_exploding": [
        ("moderate", lambda: ctx(make_snap({"pre": 10}, {"pre.min": -5.0, "pre.max": 5.0}), facts("sigmoid"))),
        ("regression-head-at-target-scale", lambda: ctx(make_snap({"pre": 10}, {"pre.max": 5e3}), facts("identity"),
                                                        h=history(target_min=0.0, target_max=1e4))),
    ],
    "regression_loss_on_probabilities": [
        ("continuous-targets", lambda: ctx(f=facts("sigmoid", "mse_loss"),
                                           h=history(target_seen=10, target_min=0.0, target_max=1.0,
                                                     target_nonbinary=6.0))),
        ("bce", lambda: ctx(f=facts("sigmoid", "binary_cross_entropy"),
                            h=history(target_seen=10, target_min=0.0, target_max=1.0))),
    ],
    "inputs_not_scaled": [
        ("unit-rms", lambda: ctx(make_snap({"input": 10}, {"input.sumsq": 10.0}))),
        ("integer-inputs", lambda: ctx(make_snap({"input": 10}, {"input.sumsq": 10 * 100.0 ** 2}),
                                       facts(input_integer=True))),
    ],
    "loss_spike": [
        ("steady", lambda: ctx(make_snap(losses=(1.0, 1.02, 0.99)), h=history(window=NOISY, initial_level=1.0))),
        ("too-little-history", lambda: ctx(make_snap(losses=(1.0, 20.0)), h=history(window=[1.0] * 3))),
        # 10x a converged 1e-4 is a large ratio but nothing on the scale of a loss that started at 0.7
        ("blip-at-a-tiny-level", lambda: ctx(make_snap(losses=(1e-4, 1e-3, 1e-4)),
                                             h=history(window=[1e-4 * (1 + 0.01 * math.sin(i)) for i in range(30)],
                                                       initial_level=0.7, best_level=1e-4))),
        # a run whose single steps often jump by ~3 (one example per batch) is judged against its jumps
        ("within-the-runs-tail", lambda: ctx(make_snap(losses=(1.0, 9.0, 1.0)),
                                             h=history(window=NOISY, initial_level=1.0, top_rises=[3.0] * 5))),
        # log-normal mini-batch noise (sigma 0.5) of a positive loss: one step at 5x its median is within it
        ("relative-noise", lambda: ctx(make_snap(losses=(1.0, 5.0, 1.0)),
                                       h=history(window=list(np.exp(0.5 * np.random.default_rng(0).standard_normal(50))),
                                                 initial_level=1.0))),
    ],
    "loss_diverging": [
        ("at-best", lambda: ctx(h=history(window=[0.1] * 20, initial_level=1.0, best_level=0.1, best_step=100))),
        # a loss whose steps swing by +-3 wanders by more than its improvement: not divergence
        ("level-within-the-noise", lambda: ctx(h=history(window=[0.5] * 20, initial_level=1.0, best_level=-1.0,
                                                         best_step=100, noise=3.0))),
    ],
    "logits_growing": [
        # a healthy language model's logits grow slowly as it learns
        ("slow-growth", lambda: ctx(at(80), facts(loss="cross_entropy"),
                                    h=history(logit_early=[[2.0, 5.5]] * 3,
                                              logit_recent=[[3.0, 6.0], [4.0, 6.5], [5.0, 7.0], [6.0, 7.5]]))),
        # large, but no longer growing
        ("large-and-steady", lambda: ctx(at(80), facts(loss="cross_entropy"),
                                         h=history(logit_early=[[2.0, 5.5]] * 3,
                                                   logit_recent=[[80.0, 40.0], [79.0, 40.0], [81.0, 39.0], [80.0, 40.0]]))),
        # a soft cap is in: the loss reads logits within (-cap, cap)
        ("soft-capped", lambda: ctx(at(80), facts(loss="cross_entropy", logit_cap=30.0),
                                    h=history(logit_early=[[2.0, 5.5]] * 3,
                                              logit_recent=[[10.0, 8.0], [20.0, 12.0], [40.0, 20.0], [80.0, 40.0]]))),
    ],
    "loss_at_baseline": [
        # a slow start: near the baseline, but still falling over the last half of the run
        ("slow-start-still-falling", lambda: ctx(at(300), facts("sigmoid", "binary_cross_entropy", loss_plain=True),
                                                 h=_stuck(0.66, 0.25, mean=0.5, binary=True, then=0.69))),
        # started at the baseline (near-uniform outputs at initialisation): a plateau of a few hundred steps
        # before it learns is a slow start (XOR, deep tanh nets)
        ("flat-at-the-start", lambda: ctx(at(300), facts("sigmoid", "binary_cross_entropy", loss_plain=True),
                                          h=_stuck(0.69, 0.25, mean=0.5, binary=True, start=1.0))),
        # constant targets (a GAN generator's all-ones labels): no baseline to compare with
        ("constant-targets", lambda: ctx(at(300), facts("sigmoid", "binary_cross_entropy", loss_plain=True),
                                         h=_stuck(0.69, 0.0, mean=1.0, binary=True))),
        ("learnt", lambda: ctx(f=facts("identity", "mse_loss", loss_plain=True), h=_stuck(0.1, 1.0))),
        ("still-warming-up", lambda: ctx(f=facts("identity", "mse_loss", loss_plain=True),
                                         h=_stuck(1.0, 1.0, steps=50))),
        # a loss with auxiliary terms or a sum reduction cannot be compared with the baseline
        ("not-a-plain-loss", lambda: ctx(f=facts("identity", "mse_loss"), h=_stuck(1.0, 1.0))),
        ("bce-below-label-entropy", lambda: ctx(f=facts("sigmoid", "binary_cross_entropy", loss_plain=True),
                                                h=_stuck(0.3, 0.25, mean=0.5, binary=True))),
    ],
    "nonfinite_gradient": [
        ("finite", lambda: ctx(make_snap({"grad": 10}, {"grad.normsq_max": 1.0}))),
        # a GradScaler skipped a few overflowing steps: its job, not a fault
        ("scaler-skipped-some-steps", lambda: ctx(make_snap({"grad": 10}, {"grad.finite": 7.0}),
                                                  facts(grad_scaled=True))),
        # a NaN loss explains its NaN gradients (nonfinite_loss says so)
        ("nan-loss", lambda: ctx(make_snap({"grad": 10}, {"grad.finite": 7.0}, losses=(math.nan,)))),
    ],
    "gradient_exploding": [
        ("within-own-scale", lambda: ctx(make_snap({"grad": 10}, {"grad.normsq_max": 100.0}),
                                         h=history(grad_norms=[1.0, 2.0, 1.0]))),
        ("no-scale-yet", lambda: ctx(make_snap({"grad": 10}, {"grad.normsq_max": 1e6}))),
    ],
    "gradient_vanishing": [
        # a converged loss has tiny gradients too
        ("converged", lambda: ctx(make_snap({"grad": 10}, {"grad.normsq_max": 0.0}),
                                  h=history(window=[0.01] * 20, initial_level=1.0, grad_norms=[1.0] * 3))),
        ("healthy", lambda: ctx(make_snap({"grad": 10}, {"grad.normsq_max": 0.25}),
                                h=history(window=[0.9] * 20, initial_level=1.0, grad_norms=[1.0] * 3))),
    ],
    "loss_plateau": [
        ("improving-recently", lambda: ctx(make_snap(step=2000, first_step=1951),
                                           h=history(window=[1.0] * 20, best_level=1.0, best_step=1500,
                                                     steps_seen=2000))),
    ],
}


def _cases(table):
    return [pytest.param(code, build, id=f"{code}-{name}") for code, items in table.items() for name, build in items]


# ----------------------------------------------------------------------------------------- conformance
def test_every_catalogue_code_has_exactly_one_rule():
    rule_codes = [r.code for r in RULES]
    assert len(rule_codes) == len(set(rule_codes))
    assert set(rule_codes) == set(CODES) - {"probe_incomplete"}
    assert set(rule_codes) <= set(CATALOGUE)


def test_every_rule_has_a_firing_scenario_and_a_healthy_twin():
    assert set(FIRING) == set(RULE_BY_CODE)
    assert set(HEALTHY) == set(RULE_BY_CODE)


def test_catalogue_entries_are_complete():
    for code, e in CATALOGUE.items():
        assert e.code == code
        assert e.severity in SEVERITIES
        for text in (e.title, e.meaning, e.fix, e.why):
            assert text.strip()


@pytest.mark.parametrize("code,build", _cases(FIRING))
def test_rule_fires(code, build):
    findings = RULE_BY_CODE[code]().evaluate(build())
    assert findings, f"{code} did not fire"
    for f in findings:
        assert f.code == code
        assert f.message and f.where
        assert f.severity is None or f.severity in SEVERITIES
        for number in (f.value, f.threshold):
            assert number is None or (isinstance(number, numbers.Real) and not isinstance(number, bool)), number


@pytest.mark.parametrize("code,build", _cases(HEALTHY))
def test_rule_quiet_on_healthy_twin(code, build):
    assert RULE_BY_CODE[code]().evaluate(build()) == []


def test_healthy_snapshot_raises_nothing_anywhere():
    """A sigmoid head on probability targets with a BCE loss, everything finite and in range."""
    c = ctx(
        make_snap({"pred": 10, "pre": 10, "target": 10, "input": 10},
                  {"pred.min": 0.1, "pred.max": 0.9, "pre.min": -2.0, "pre.max": 2.0, "target.nonbinary": 0.0},
                  losses=(0.7, 0.69, 0.68)),
        facts("sigmoid", "binary_cross_entropy"), P,
        history(window=NOISY, initial_level=1.0, best_level=1.0, best_step=1, steps_seen=30,
                target_seen=10, target_min=0.0, target_max=1.0),
    )
    assert [f for r in default_rules() for f in r.evaluate(c)] == []


# ----------------------------------------------------------------------------------------- specifics
def test_nonfinite_counts_and_first_step():
    (f,) = RULE_BY_CODE["nonfinite_loss"]().evaluate(ctx(make_snap(losses=(0.5, math.nan, math.inf), first_step=11)))
    assert f.value == 2.0
    assert f.details["first_step"] == 12
    (f,) = RULE_BY_CODE["nonfinite_input"]().evaluate(ctx(make_snap({"input": 10}, {"input.finite": 7.0})))
    assert f.value == 3


def test_out_of_range_severity_depends_on_inferred():
    snap = make_snap({"pred": 10}, {"pred.min": -0.5, "pred.below": 4.0})
    (declared,) = RULE_BY_CODE["output_out_of_range"]().evaluate(ctx(snap, facts("unknown"), P))
    (inferred,) = RULE_BY_CODE["output_out_of_range"]().evaluate(ctx(snap, facts("unknown"), P.as_inferred()))
    assert declared.severity == "error" and inferred.severity == "warning"
    assert declared.value == pytest.approx(0.4)
    assert "inferred" in inferred.message


def test_target_out_of_range_reports_the_worse_side():
    snap = make_snap({"target": 10}, {"target.min": -0.5, "target.max": 10.0})
    (f,) = RULE_BY_CODE["target_out_of_range"]().evaluate(ctx(snap, facts("sigmoid")))
    assert (f.value, f.threshold) == (10.0, 1.0)


@pytest.mark.parametrize("overrides,fires", [({}, True), ({"rms_high": 1000.0}, False)])
def test_threshold_overrides(overrides, fires):
    c = ctx(make_snap({"input": 10}, {"input.sumsq": 10 * 100.0 ** 2}))
    assert bool(RULE_BY_CODE["inputs_not_scaled"](**overrides).evaluate(c)) is fires


def test_unknown_threshold_key_names_the_rule():
    with pytest.raises(ValueError, match="loss_spike.*bogus"):
        RULE_BY_CODE["loss_spike"](bogus=1)
    with pytest.raises(ValueError, match="nope"):
        default_rules({"nope": {}})


def test_history_round_trip():
    h = history(window=[1.0, 2.0], pre_absmax=[3.0], initial_level=1.0, best_level=0.5, best_step=7,
                target_min=0.0, target_max=1.0, target_nonbinary=2.0, target_seen=4, steps_seen=9)
    assert History.from_dict(h.to_dict()).to_dict() == h.to_dict()


def test_rules_do_not_depend_on_unseen_kinds():
    """A snapshot where nothing but the loss was seen raises nothing (no division by zero either)."""
    c = ctx(make_snap(losses=(1.0,)), facts("unknown", None), P)
    assert [f for r in default_rules() for f in r.evaluate(c)] == []
    for kind in KINDS:
        assert c.snap.share(kind, "finite") == 0.0


def test_each_rule_declares_the_kind_of_its_own_thresholds():
    """A threshold's kind belongs to its rule: a new rule's ``ratio`` >= 1 is accepted although
    gradient_vanishing's ``ratio`` is a share, and each rule's overrides are checked against its own kinds."""
    from boundguard.rules import RATIO, GradientVanishing, Rule

    class Stretch(Rule):
        code = "stretch"
        params = {"ratio": 3.0, "limit": 2.0}
        kinds = {"ratio": RATIO}

    assert Stretch(ratio=5.0).p == {"ratio": 5.0, "limit": 2.0}
    with pytest.raises(ValueError, match=r"thresholds\['stretch'\]\['ratio'\] is a ratio and must be a finite number >= 1"):
        Stretch(ratio=0.5)
    with pytest.raises(ValueError, match=r"\['limit'\] must be a positive, finite number"):
        Stretch(limit=0.0)  # (not named in kinds: a positive number)
    with pytest.raises(ValueError, match=r"thresholds\['gradient_vanishing'\]\['ratio'\] is a share"):
        GradientVanishing(ratio=5.0)
    for rule in RULES:  # every declared kind names one of the rule's own thresholds
        assert set(rule.kinds) <= set(rule.params), rule.code
