"""Scripted per-step loss sequences, each with its expected outcome, fed through a real Session.

The healthy sequences are what real runs look like (a loss converging towards zero with realistic
noise, batch-size-1 and noisy regression mini-batches, NLL losses that cross zero, a plateau at a tiny
level): none may raise ``loss_spike`` or ``loss_diverging``. The faulty ones (a learning-rate blow-up,
one bad batch) must raise the code that names the fault. Every sequence runs at two check cadences
(10 and 50 steps), the way an adapter checks: at step 1, every ``check_every`` steps, and once at
the end for the last partial interval.
"""
from __future__ import annotations

import copy
import json
import logging
from typing import Callable, Optional

import numpy as np
import pytest

from boundguard.config import Config
from boundguard.model_facts import ModelFacts
from boundguard.session import Session
from boundguard.history import TOP_RISES, WINDOW
from boundguard.rules import Context, History, LossDiverging, LossSpike
from boundguard.stats import LOSS_COLUMN, Snapshot, neutral_row

LOSS_CODES = {"loss_spike", "loss_diverging"}
CADENCES = (10, 50)
SEEDS = (0, 1, 2)


@pytest.fixture(autouse=True)
def _quiet_logs(caplog):
    caplog.set_level(logging.CRITICAL + 1, logger="boundguard")


# ----------------------------------------------------------------------------------------- the driver
def monitor(check_every: int = 50, thresholds: Optional[dict] = None) -> Session:
    m = Session(Config(on_violation="log", check_every_n_steps=check_every, thresholds=thresholds), write=False)
    m.set_facts(ModelFacts())
    return m


def feed(m: Session, losses) -> None:
    """Feed ``losses`` (one per step, after the session's last step) to ``m``, checking as an adapter does:
    when :meth:`Session.count_steps` says a check is due (step 1, every ``check_every_n_steps`` steps) and at
    the last step (the final check)."""
    losses = np.asarray(losses, dtype=np.float64)
    start = 0
    for i in range(len(losses)):
        if m.count_steps() or i == len(losses) - 1:
            rows = np.tile(neutral_row(), (i + 1 - start, 1))
            rows[:, LOSS_COLUMN] = losses[start: i + 1]
            m.check(rows, {}, None)
            start = i + 1


def run_losses(losses, check_every: int = 50, thresholds: Optional[dict] = None) -> list[tuple[str, int]]:
    """The ``(code, step)`` of every alert a fresh Session raises on ``losses``."""
    m = monitor(check_every, thresholds)
    feed(m, losses)
    return [(a.code, a.step) for a in m.alerts]


# ----------------------------------------------------------------------------------------- sequences
def _decay(n: int, start: float, end: float) -> np.ndarray:
    """An exponential fall from ``start`` to ``end`` over ``n`` steps."""
    return start * (end / start) ** (np.arange(n) / max(n - 1, 1))


def converge_lognormal(rng, sigma: float, n: int = 2000) -> np.ndarray:
    """0.7 → 1e-4, each step's loss the level times log-normal noise (mini-batch noise is relative)."""
    return _decay(n, 0.7, 1e-4) * np.exp(sigma * rng.standard_normal(n))


def converge_additive(rng, n: int = 2000) -> np.ndarray:
    """0.7 → 1e-4 with Gaussian noise of sd 30 % of the level plus a floor of 3e-5, folded at zero."""
    level = _decay(n, 0.7, 1e-4)
    return np.abs(level + (0.3 * level + 3e-5) * rng.standard_normal(n))


def batch_size_1_bce(rng, n: int = 3000) -> np.ndarray:
    """BCE of one example per step: the mean margin grows from 0 to 7 while examples scatter around
    it with heavy (Student-t, 3 dof, clipped at 4: the data are bounded) tails; most losses end near
    1e-3, a hard example now and then costs 1-4 while the mean falls, and the run ends at 100 %
    accuracy (every margin above 1)."""
    mu = 7.0 * (1 - np.exp(-np.arange(n) / (n / 5)))
    margin = mu + 1.5 * np.clip(rng.standard_t(3, n), -4, 4)
    return np.logaddexp(0.0, -margin)  # softplus(-margin) = BCE of the example


def noisy_regression(rng, n: int = 2000, batch: int = 8, corrupt_at: Optional[int] = None) -> np.ndarray:
    """MSE of batches of 8 on unit-variance targets: the fit error falls from 2 to 0.05 and the targets
    carry heavy-tailed (Student-t, 4 dof) noise of scale 0.3, so one outlier in a batch multiplies its
    loss (late in the run single steps reach 10-30x their running median). ``corrupt_at``: that
    step's batch has its targets multiplied by 30 (bad labels)."""
    signal = rng.standard_normal((n, batch))
    y = signal + 0.3 * rng.standard_t(4, (n, batch))
    pred = signal + _decay(n, 2.0, 0.05)[:, None] * rng.standard_normal((n, batch))
    if corrupt_at is not None:
        y[corrupt_at] *= 30.0
    return ((y - pred) ** 2).mean(1)


def gaussian_nll(rng, n: int = 2000, batch: int = 32, end_sigma: float = 0.05) -> np.ndarray:
    """torch's GaussianNLLLoss (0.5 (log var + r²/var)) of a calibrated model whose error scale falls
    from 1.5 to 0.05: the loss starts near 0.9, crosses zero and ends near -2.5."""
    s = _decay(n, 1.5, end_sigma)[:, None]
    var = (s * np.exp(0.1 * rng.standard_normal((n, 1)))) ** 2  # the predicted variance wobbles
    r = s * rng.standard_t(8, (n, batch)) * np.sqrt(6 / 8)
    return (0.5 * (np.log(var) + r ** 2 / var)).mean(1)


def poisson_nll(rng, n: int = 2000, batch: int = 32) -> np.ndarray:
    """PoissonNLLLoss(log_input=True) (exp(x) - y x) of counts with rates in [0.5, 10]: the log-rate
    learned moves from 0 to log(rate), so the loss falls from about 1 through zero to about -4."""
    rate = rng.uniform(0.5, 10.0, (n, batch))
    y = rng.poisson(rate)
    a = (1 - np.exp(-np.arange(n) / (n / 6)))[:, None]
    x = a * np.log(rate) + 0.05 * rng.standard_normal((n, batch))
    return (np.exp(x) - y * x).mean(1)


def poisson_nll_overdispersed(rng, n: int = 2000, batch: int = 16) -> np.ndarray:
    """PoissonNLLLoss(log_input=True) on over-dispersed counts (negative binomial, dispersion 1, rates
    log-normal around e): the per-step loss swings by several units while its level falls from about 1
    to about -1, so the noise is larger than the whole improvement."""
    rate = rng.lognormal(1.0, 0.8, (n, batch))
    y = rng.negative_binomial(1.0, 1.0 / (1.0 + rate))
    a = (1 - np.exp(-np.arange(n) / (n / 6)))[:, None]
    x = a * np.log(rate) + 0.1 * rng.standard_normal((n, batch))
    return (np.exp(x) - y * x).mean(1)


def hinge_exact_zeros(rng, n: int = 2000, batch: int = 16) -> np.ndarray:
    """Hinge loss of batches of 16: margins grow until most batches cost exactly 0, and now and then a
    batch holds an example inside the margin (a loss of a few hundredths to a few tenths)."""
    mu = 3.0 * (1 - np.exp(-np.arange(n) / (n / 5)))[:, None]
    margin = mu + 0.8 * rng.standard_t(6, (n, batch))
    return np.maximum(0.0, 1.0 - margin).mean(1)


def fast_drop_batch_size_1(rng, n: int = 2000) -> np.ndarray:
    """BCE of one example per step on easy data: the median loss falls 100-fold within 30 steps, so the
    first level boundguard sees (at a 50-step cadence) is already small, then the run keeps its
    heavy-tailed per-example losses."""
    mu = 1.0 + 6.0 * (1 - np.exp(-np.arange(n) / 10.0))
    margin = mu + 1.2 * np.clip(rng.standard_t(3, n), -8, 8)
    return np.logaddexp(0.0, -margin)


def tiny_plateau(rng, n: int = 2000) -> np.ndarray:
    """0.7 → 1e-3 in 500 steps, then 1500 steps at 1e-3 with log-normal wobble (sigma 0.3)."""
    level = np.concatenate([_decay(500, 0.7, 1e-3), np.full(n - 500, 1e-3)])
    return level * np.exp(0.3 * rng.standard_normal(n))


def tiny_blip(rng, ratio: float, n: int = 2000) -> np.ndarray:
    """Converged to 1e-4 (log-normal noise 0.1), then one step (1601) at ``ratio`` x 1e-4: at that level,
    on the scale of a loss that started at 0.7, that is noise."""
    level = np.concatenate([_decay(1200, 0.7, 1e-4), np.full(n - 1200, 1e-4)])
    loss = level * np.exp(0.1 * rng.standard_normal(n))
    loss[1600] = ratio * 1e-4
    return loss


def lr_blowup(rng, n: int = 1300) -> np.ndarray:
    """0.7 → 0.05 in 600 steps, stable (noise 0.2) to step 1000, then the learning rate blows up: the
    level climbs to 1.5 within 40 steps and stays there."""
    level = np.concatenate([_decay(600, 0.7, 0.05), np.full(400, 0.05), _decay(40, 0.05, 1.5), np.full(n - 1040, 1.5)])
    return level * np.exp(0.2 * rng.standard_normal(n))


def nll_blowup(rng, n: int = 1600) -> np.ndarray:
    """A Gaussian NLL that reached -2.5, then diverges: its level rises to +3 (a variance collapse)."""
    loss = gaussian_nll(rng, 1200)
    rise = np.concatenate([np.linspace(0.0, 5.5, 40), np.full(n - 1240, 5.5)])
    tail = loss[-1] + rise + 0.1 * rng.standard_normal(n - 1200)
    return np.concatenate([loss, tail])


def spike_once(rng, n: int = 1000) -> np.ndarray:
    """0.7 → 0.05 in 600 steps, stable (noise 0.1), one step at 20x the level (a bad batch): step 801."""
    level = np.concatenate([_decay(600, 0.7, 0.05), np.full(n - 600, 0.05)])
    loss = level * np.exp(0.1 * rng.standard_normal(n))
    loss[800] = 20 * 0.05
    return loss


def spike_negative(rng, n: int = 1500) -> np.ndarray:
    """A Gaussian NLL near -2.5, then one batch of bad labels (step 1401) costs +5 on that step."""
    loss = gaussian_nll(rng, n)
    loss[1400] += 5.0
    return loss


def spike_noisy_regression(rng, n: int = 2000) -> np.ndarray:
    """The noisy regression run with one batch of targets x30 at step 1501 (its MSE some 1000x)."""
    return noisy_regression(rng, n, corrupt_at=1500)


# name -> (generator(rng), codes that must fire, codes that must not fire)
Gen = Callable[[np.random.Generator], np.ndarray]
SEQUENCES: dict[str, tuple[Gen, set[str], set[str]]] = {
    # healthy: neither loss_spike nor loss_diverging
    "converge-lognormal-0.3": (lambda r: converge_lognormal(r, 0.3), set(), LOSS_CODES),
    "converge-lognormal-0.5": (lambda r: converge_lognormal(r, 0.5), set(), LOSS_CODES),
    "converge-additive": (converge_additive, set(), LOSS_CODES),
    "batch-size-1-bce": (batch_size_1_bce, set(), LOSS_CODES),
    "noisy-regression": (noisy_regression, set(), LOSS_CODES),
    "gaussian-nll-crosses-zero": (gaussian_nll, set(), LOSS_CODES),
    "poisson-nll-log-input": (poisson_nll, set(), LOSS_CODES),
    "poisson-nll-overdispersed": (poisson_nll_overdispersed, set(), LOSS_CODES),
    "hinge-exact-zeros": (hinge_exact_zeros, set(), LOSS_CODES),
    "fast-drop-batch-size-1": (fast_drop_batch_size_1, set(), LOSS_CODES),
    "tiny-plateau": (tiny_plateau, set(), LOSS_CODES),
    "tiny-blip-3x": (lambda r: tiny_blip(r, 3.0), set(), LOSS_CODES),
    "tiny-blip-10x": (lambda r: tiny_blip(r, 10.0), set(), LOSS_CODES),
    # faulty: the code that names the fault fires
    "lr-blowup-diverges": (lr_blowup, {"loss_diverging"}, set()),
    "nll-blowup-diverges": (nll_blowup, {"loss_diverging"}, set()),
    "spike-once": (spike_once, {"loss_spike"}, {"loss_diverging"}),
    "spike-negative-loss": (spike_negative, {"loss_spike"}, {"loss_diverging"}),
    "spike-noisy-regression": (spike_noisy_regression, {"loss_spike"}, {"loss_diverging"}),
}


def _params():
    return [pytest.param(name, every, seed, id=f"{name}-every{every}-seed{seed}")
            for name in SEQUENCES for every in CADENCES for seed in SEEDS]


@pytest.mark.parametrize("name,every,seed", _params())
def test_scripted_sequence(name, every, seed):
    gen, must, must_not = SEQUENCES[name]
    losses = gen(np.random.default_rng(seed))
    assert np.isfinite(losses).all()
    fired = run_losses(losses, every)
    got = {c for c, _ in fired}
    assert must <= got, f"{name}: expected {sorted(must)}, got {fired}"
    assert not got & must_not, f"{name}: must not fire {sorted(must_not)}, got {fired}"


# ----------------------------------------------------------------------------------------- timing
def test_divergence_is_caught_soon_after_it_starts():
    """The lr blow-up starts at step 1001 and is at 10x its level by step ~1030: caught by step 1100."""
    for every in CADENCES:
        steps = [s for c, s in run_losses(lr_blowup(np.random.default_rng(0)), every) if c == "loss_diverging"]
        assert steps and 1000 < steps[0] <= 1100, (every, steps)


def test_spike_names_its_step():
    for every in CADENCES:
        m_steps = [s for c, s in run_losses(spike_once(np.random.default_rng(0)), every) if c == "loss_spike"]
        assert m_steps and m_steps[0] == -(-801 // every) * every, (every, m_steps)  # the check after step 801


def test_the_sequences_are_what_they_claim():
    """Guard the generators: the convergence reaches ~1e-4, the NLLs cross zero, batch size 1 has its
    tail while it learns and ends at 100 % accuracy, the regression swings far from its median."""
    r = np.random.default_rng(0)
    assert np.median(converge_lognormal(r, 0.5)[-50:]) < 2e-4
    nll = gaussian_nll(r)
    assert np.median(nll[:20]) > 0.5 and np.median(nll[-50:]) < -2
    for pois in (poisson_nll(r), poisson_nll_overdispersed(r)):
        assert np.median(pois[:20]) > 0.5 and np.median(pois[-200:]) < -1
    b1 = batch_size_1_bce(r)
    mid = b1[300:1500]
    assert np.median(mid) < 1e-2 and (mid > 1.0).sum() >= 5 and mid.max() > 2.0
    assert b1[-300:].max() < np.log1p(np.exp(-0.5))  # every margin above 0.5 at the end
    fast = fast_drop_batch_size_1(r)
    assert np.median(fast[30:80]) < 0.01 and (fast[100:] > 1.0).sum() >= 3
    reg = noisy_regression(r)
    late_ratio = reg[1000:] / np.array([np.median(reg[i - 50: i]) for i in range(1000, len(reg))])
    assert late_ratio.max() > 10
    assert (hinge_exact_zeros(r)[-500:] == 0).mean() > 0.5


# ----------------------------------------------------------------------------------------- the memory
def test_history_round_trip_keeps_the_loss_memory():
    m = monitor(10)
    feed(m, batch_size_1_bce(np.random.default_rng(0))[:1234])
    d = m.monitor.history.to_dict()
    assert d["noise"] > 0 and len(d["top_rises"]) == TOP_RISES and 0 < d["noise_pending"] < 50
    assert History.from_dict(json.loads(json.dumps(d))).to_dict() == d


def test_history_stays_bounded():
    m = monitor(10)
    feed(m, converge_lognormal(np.random.default_rng(0), 0.3, n=5000))
    h = m.monitor.history
    assert len(h.window) == WINDOW and len(h.top_rises) == TOP_RISES
    assert len(json.dumps(h.to_dict())) < 4000


def test_old_history_dicts_still_load():
    """A state saved before the noise and the tail were remembered loads, and judging goes on."""
    old = {"window": [0.5] * 20, "initial_level": 1.0, "best_level": 0.5, "best_step": 7, "pre_absmax": [],
           "target_min": 0.0, "target_max": 1.0, "target_nonbinary": 0.0, "target_seen": 4, "steps_seen": 20}
    h = History.from_dict(old)
    assert (h.noise, h.noise_pending, h.top_rises, h.tail) == (0.0, 0, [], 0.0)
    m = monitor(10)
    m.load_state_dict({"monitor": {"history": old}, "step": 20})
    feed(m, [0.5] * 100 + [10.0] + [0.5] * 9)
    assert [a.code for a in m.alerts] == ["loss_spike"]


@pytest.mark.parametrize("every", CADENCES)
def test_resume_judges_like_the_uninterrupted_run(every):
    losses = batch_size_1_bce(np.random.default_rng(3))[:1500].copy()
    losses[1200] = 50.0  # one absurd step after the resume, so both runs have something to find
    whole = monitor(every)
    feed(whole, losses)
    first = monitor(every)
    feed(first, losses[:1000])
    state = json.loads(json.dumps(first.state_dict()))
    second = monitor(every)
    second.load_state_dict(state)
    feed(second, losses[1000:])
    assert [(a.code, a.step) for a in second.alerts] == [(a.code, a.step) for a in whole.alerts]
    assert second.monitor.history.to_dict() == whole.monitor.history.to_dict()


def test_loss_rules_do_not_change_the_history():
    m = monitor(10)
    feed(m, spike_once(np.random.default_rng(0))[:790])
    before = copy.deepcopy(m.monitor.history.to_dict())
    snap_rows = np.tile(neutral_row(), (10, 1))
    snap_rows[:, LOSS_COLUMN] = [0.05] * 5 + [1.0] + [0.05] * 4
    snap = Snapshot.from_rows(snap_rows, {}, step=800, first_step=791)
    folded = History.from_dict(before)
    folded.fold(snap, 0.01)
    after_fold = copy.deepcopy(folded.to_dict())
    ctx = Context(snap, ModelFacts(), None, folded, History.from_dict(before))
    assert LossSpike().evaluate(ctx) and not LossDiverging().evaluate(ctx)
    assert folded.to_dict() == after_fold and ctx.before.to_dict() == before


def test_new_thresholds_are_overridable_and_validated():
    quiet = {"loss_spike": {"tail_factor": 0.0, "min_rise": 0.0}, "loss_diverging": {"noise_sigmas": 0.0}}
    fired = run_losses(poisson_nll_overdispersed(np.random.default_rng(0)), 50, thresholds=quiet)
    assert "loss_diverging" in {c for c, _ in fired}  # the noise guard off: the old false alarm is back
    for code, key in (("loss_spike", "tail_factor"), ("loss_diverging", "noise_sigmas")):
        with pytest.raises(ValueError, match=f"{code}.*{key}"):
            Config(thresholds={code: {key: -1.0}})
