"""The rules of the loss and the gradients: spikes, divergence, plateaus, a loss at the constant predictor's
level, and the head's gradients (non-finite, exploding, vanishing)."""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from boundguard.fmt import g
from boundguard.history import LEVEL_STEPS, WINDOW, History, centre_spread, loss_scale, noise_of, one_centre_spread
from boundguard.model_facts import ModelFacts
from boundguard.rules.base import DEGENERATE, MARGIN, RATIO, SHARE, Finding, Rule, count, pct

__all__ = ["LossSpike", "LossDiverging", "LossPlateau", "LossAtBaseline", "NonfiniteGradient", "GradientExploding",
           "GradientVanishing"]


class LossSpike(Rule):
    """One step's loss far above its running level, judged on the loss's own scale and noise.

    Each step of the interval is compared with the WINDOW losses before it (at least
    ``min_history``). A spike must pass every test:

    - its rise above their median is more than ``mad_sigmas`` times their step-to-step spread (the
      q90 of |x_t - x_(t-1)| as a standard deviation: blind to a falling trend, and a skewed upper
      tail such as a hard example now and then or a hinge loss that is mostly 0 counts as noise);
    - for a positive median, the step is ``factor`` times the median; for a positive window, it is
      also ``mad_sigmas`` spreads above it in log space (mini-batch noise of a positive loss is
      relative: the wobble of a loss near zero is a large ratio but a small step in log terms);
    - the rise is more than ``min_rise`` of the loss's scale (its initial level, its median, or how far
      it has come down: a blip at 1e-4 of a loss that started at 0.7 is not a spike);
    - the rise is more than ``tail_factor`` times the run's own tail (:attr:`History.tail`, the
      TOP_RISES-th largest rise seen before): a run whose single steps often jump, such as one example
      per batch, is judged against its jumps, while a few true spikes never raise the bar.

    Losses of either sign work: the ratio and log tests apply only to positive values."""

    code = "loss_spike"
    params = {"factor": 4.0, "mad_sigmas": 8.0, "min_history": 10, "min_rise": 0.1, "tail_factor": 4.0}
    kinds = {"factor": RATIO, "mad_sigmas": MARGIN, "min_history": count(1), "min_rise": MARGIN,
             "tail_factor": MARGIN}

    def evaluate(self, ctx):
        h, s = ctx.past, ctx.snap
        past = list(h.window)
        new = [(x, st) for x, st in zip(s.losses.tolist(), s.loss_steps.tolist()) if math.isfinite(x)]
        seq = past + [x for x, _ in new]
        first = max(len(past), math.ceil(self.p["min_history"]))  # (thresholds are floats)
        pos = list(range(first, len(seq)))  # the index in ``seq`` of each step judged
        if not pos:
            return []
        w = ctx.history.windows  # the fold of this snapshot computed these windows already
        if w is not None and w[0] is s and w[1] == first and len(w[2]) == len(pos):
            med, spread = w[2], w[3]
        else:
            med, spread = centre_spread(seq, pos, WINDOW)
        k, factor, tail = self.p["mad_sigmas"], self.p["factor"], self.p["tail_factor"] * h.tail
        own_scale = loss_scale(h)
        best = None  # (excess, j)
        for j, p in enumerate(pos):  # every test must pass; the cheap ones first, so most steps stop at once
            x, m, sd = seq[p], med[j], spread[j]
            rise = x - m
            if not (rise > 0 and rise > k * sd) or (m > 0 and not x > factor * m):
                continue
            scale = max(own_scale, abs(m))
            if not (rise > self.p["min_rise"] * scale and rise > tail):
                continue
            ref = seq[max(0, p - WINDOW): p]
            if x > 0 and min(ref) > 0:  # a positive loss: also a spike in log terms
                lmed, lspread = one_centre_spread([math.log(v) for v in ref])
                if not math.log(x) - lmed > k * lspread:
                    continue
            excess = rise / max(sd, 1e-12 * max(1.0, scale))
            if best is None or excess > best[0]:
                best = (excess, j)
        if best is None:
            return []
        j = best[1]
        step, loss, m = int(new[pos[j] - len(past)][1]), seq[pos[j]], med[j]
        ratio = loss / m if m > 0 else None
        how = (f"{g(ratio)}x its running median {g(m)}" if ratio is not None
               else f"{g(loss - m)} above its running median {g(m)}")
        return [Finding(self.code, ctx.where("loss"),
                        f"loss jumped to {g(loss)} at step {step}, {how} (step-to-step noise {g(spread[j])}).",
                        ratio if ratio is not None else loss - m, self.p["factor"] if ratio is not None else None,
                        details={"spike_step": step})]


class LossDiverging(Rule):
    """The loss level (the median of the last LEVEL_STEPS steps) rose far above its best level, which
    a level (a median over steps, not a single step) must do in every way:

    - by more than ``min_rise`` of the loss's scale (its initial level, or how far it had come down);
    - by more than ``noise_sigmas`` times the step-to-step noise the run had shown before the interval
      (:attr:`History.noise`): the level of a noisy loss wanders by a few times its noise, and a loss
      that crosses zero (a Poisson or Gaussian NLL) has no ratio to judge it by;
    - for a positive best, to ``factor`` times the best.

    Losses of either sign work."""

    code = "loss_diverging"
    params = {"factor": 10.0, "min_rise": 0.5, "noise_sigmas": 3.0}
    kinds = {"factor": RATIO, "min_rise": MARGIN, "noise_sigmas": MARGIN}

    def evaluate(self, ctx):
        h = ctx.history
        level, best, start = h.level, h.best_level, h.initial_level
        if level is None or best is None or start is None:
            return []
        rise = level - best
        scale = max(abs(start), start - best)
        ratio_ok = level > self.p["factor"] * best if best > 0 else True
        if (ratio_ok and rise > 0 and rise > self.p["min_rise"] * scale
                and rise > self.p["noise_sigmas"] * ctx.past.noise):
            how = f"{g(level / best)}x its best" if best > 0 else f"{g(rise)} above its best"
            return [Finding(self.code, ctx.where("loss"),
                            f"the loss level {g(level)} is {how} {g(best)} (reached at step {h.best_step}).",
                            level / best if best > 0 else rise, self.p["factor"] if best > 0 else None)]
        return []


class LossPlateau(Rule):
    code = "loss_plateau"
    params = {"patience": 1000, "min_improvement": 0.01}
    kinds = {"patience": count(1), "min_improvement": SHARE}

    def evaluate(self, ctx):
        h, s = ctx.history, ctx.snap
        if h.best_level is None or h.steps_seen < self.p["patience"]:
            return []
        stalled = s.step - h.best_step
        if stalled >= self.p["patience"]:
            return [Finding(self.code, ctx.where("loss"),
                            f"the loss has not improved by {pct(self.p['min_improvement'])} for {stalled} steps "
                            f"(best {g(h.best_level)} at step {h.best_step}).", float(stalled), self.p["patience"])]
        return []


class LossAtBaseline(Rule):
    """After ``warmup_steps`` steps the loss level is still ``share`` or more of what a constant predictor
    scores on a batch of the run's targets, its best level ``best_share`` or more, and it has stopped
    falling: over the last half of the run (a horizon that grows with the run, :meth:`History.level_at`)
    it fell (:func:`_fall`: the line through the levels of that half) by no more than ``min_fall`` of that
    baseline and twice the noise of that fall. The model
    predicts the targets' average and learns nothing beyond it (a learning rate so large that the output
    settles at the mean); a slow start, still falling, is not that. Only a loss that came down onto the
    baseline (it started, :attr:`History.start_level`, more than ``start_margin`` above it and has come at
    least half the way down: a large learning rate collapsing the output to the mean, a broadcast MSE) is
    judged after ``warmup_steps``; any other has shown no pace yet (a classifier initialised to
    near-uniform outputs sits at the baseline for hundreds of steps before it learns: XOR, deep tanh nets,
    Adadelta RNNs) and is judged after ``start_steps``.

    The baseline: for MSE the targets' variance (the loss of predicting their mean), for a binary cross-entropy the entropy of the positive rate, for a multi-class
    cross-entropy on class indices log(K). Judged only when the training loss is that loss alone,
    unweighted and averaged over the batch (:attr:`ModelFacts.loss_plain`), and silent where the baseline
    is degenerate (constant targets: a GAN generator's all-ones labels)."""

    code = "loss_at_baseline"
    params = {"share": 0.8, "best_share": 0.6, "warmup_steps": 300, "min_fall": 0.005, "start_steps": 1000,
              "start_margin": 0.25}
    kinds = {"share": SHARE, "best_share": SHARE, "warmup_steps": count(1), "min_fall": SHARE,
             "start_steps": count(1), "start_margin": MARGIN}

    def evaluate(self, ctx):
        f, h, s = ctx.facts, ctx.history, ctx.snap
        if f.loss is None or not f.loss_plain or h.steps_seen < self.p["warmup_steps"] or h.best_level is None:
            return []
        base, what = _constant_loss(f, h)
        level, best = h.level, h.best_level
        if base is None or not base > 0 or level is None:
            return []
        if best < self.p["best_share"] * base or level < self.p["share"] * base:
            return []
        start = h.start_level if h.start_level is not None else level
        came_down = start > (1 + self.p["start_margin"]) * base and start - level >= 0.5 * (start - base)
        if not came_down and h.steps_seen < self.p["start_steps"]:
            return []  # (no pace to judge by yet: still at its start, or still on its way down)
        then = h.level_at(s.step - h.steps_seen / 2)
        if then is None:
            return []
        fall, noise = _fall(h, then, level)
        if fall > max(self.p["min_fall"] * base, 2 * noise):
            return []  # still falling: a slow start
        how = f"down {g(fall)} from" if fall > 0 else ("up from" if fall < 0 else "level with")
        return [Finding(self.code, ctx.where("loss"),
                        f"after {h.steps_seen} steps the loss level {g(level)} is {pct(level / base)} of what a "
                        f"constant prediction scores ({what} {g(base)}; best {g(best)}) and no longer falls: "
                        f"{how} {g(then[1])} at step {then[0]}. The model predicts the targets' average and "
                        f"learns nothing beyond it.", level / base, self.p["share"],
                        details={"baseline": base, "level": level, "best": best, "then_step": then[0],
                                 "then_level": then[1]})]


def _fall(h: History, then: tuple[int, float], level: float) -> tuple[float, float]:
    """How far the loss level fell over the last half of the run, and the noise of that figure. With four
    levels or more recorded in that half: the fall of their least-squares line over it and its standard
    error (from the levels' scatter around the line: a steady slow fall is seen through noisy levels);
    with fewer, the difference of the first and the last level, and its noise from the step-to-step noise
    of the last losses (two medians of LEVEL_STEPS losses, 1.25 sd / sqrt(n) each)."""
    pts = [(s, v) for s, v in h.levels if s >= then[0]]
    if len(pts) >= 4:
        xs, ys = np.array([p[0] for p in pts], float), np.array([p[1] for p in pts], float)
        span = xs[-1] - xs[0]
        xc = xs - xs.mean()
        sxx = float(xc @ xc)
        if span > 0 and sxx > 0:
            slope = float(xc @ (ys - ys.mean())) / sxx
            resid = ys - ys.mean() - slope * xc
            se = math.sqrt(float(resid @ resid) / (len(pts) - 2) / sxx)
            return -slope * span, se * span
    return then[1] - level, math.sqrt(2) * 1.25 * noise_of(list(h.window)) / math.sqrt(LEVEL_STEPS)


def _constant_loss(f: ModelFacts, h: History) -> tuple[Optional[float], str]:
    """The loss of the best constant prediction on the run's targets, and what it is, for the losses
    where it is known; (None, "") otherwise."""
    loss, n = f.loss, h.target_moments_n
    assert loss is not None
    name = loss.name.lower()
    if n and loss.family == "regression" and name in ("mse_loss", "mean_squared_error", "mse"):
        mean = h.target_sum / n
        if h.target_sumsq / n - mean * mean <= DEGENERATE * h.target_sumsq / n:
            return None, ""  # (nearly) constant targets
        # (a constant is the same for every batch: its expected loss on a batch is the targets' variance,
        # not a batch's own, smaller, variance)
        return h.target_sumsq / n - mean * mean, "the variance of the targets"
    binary = loss.family in ("probability", "logits") and not loss.multiclass
    if n and binary and h.target_min >= 0 and h.target_max <= 1:
        p = h.target_sum / n
        if not DEGENERATE < p < 1 - DEGENERATE:
            return None, ""  # (nearly) constant targets: any loss is "at" a baseline near 0
        return -(p * math.log(p) + (1 - p) * math.log(1 - p)), f"the entropy of the positive rate {g(p)}"
    if loss.multiclass and f.target_integer and f.classes and f.classes > 1:
        return math.log(f.classes), f"log of the {f.classes} classes"
    return None, ""


class NonfiniteGradient(Rule):
    """NaN/Inf gradients of the output layer while the forward pass and the loss were finite (a NaN loss
    or output explains its own NaN gradients, under its own code). With a loss scaler (fp16
    ``GradScaler``) overflowing steps are skipped on purpose: only an interval with no finite step fires."""

    code = "nonfinite_gradient"

    def evaluate(self, ctx):
        s, f = ctx.snap, ctx.facts
        bad = s.nonfinite("grad") if s.seen("grad") else 0
        if not bad or any(s.nonfinite(k) for k in ("pred", "pre", "input", "target")) \
                or not np.isfinite(s.losses).all():
            return []
        n = s.counts["grad"]
        if f.grad_scaled and bad < n:
            return []
        return [Finding(self.code, ctx.where("grad"),
                        f"the gradients of {ctx.where('grad')} were NaN/Inf at {bad} of {n} steps in {ctx.span}, "
                        f"while the loss was finite.", bad, 0)]


class GradientExploding(Rule):
    """The output layer's largest per-step gradient norm in the interval is ``growth`` times the run's own
    scale (the median of the first checks' largest norms)."""

    code = "gradient_exploding"
    params = {"growth": 100.0}
    kinds = {"growth": RATIO}

    def evaluate(self, ctx):
        s, ref = ctx.snap, ctx.past.grad_ref
        if not s.seen("grad") or s.nonfinite("grad") or ref is None:
            return []
        peak = math.sqrt(max(s.values["grad.normsq_max"], 0.0))
        if peak <= self.p["growth"] * ref:
            return []
        return [Finding(self.code, ctx.where("grad"),
                        f"the gradient norm of {ctx.where('grad')} reached {g(peak)} in {ctx.span}, {g(peak / ref)}x "
                        f"its own scale at the start of the run ({g(ref)}).", peak, self.p["growth"] * ref)]


class GradientVanishing(Rule):
    """No gradient (or ``ratio`` of the run's own scale) reaches the output layer while the loss is still
    at ``loss_share`` of its initial level or more: the head is saturated, clipped or cut off, not
    converged (a converging loss shrinks its gradients too, so it is not judged)."""

    code = "gradient_vanishing"
    params = {"ratio": 1e-4, "loss_share": 0.5}
    kinds = {"ratio": SHARE, "loss_share": SHARE}

    def evaluate(self, ctx):
        s, h = ctx.snap, ctx.history
        if not s.seen("grad") or s.nonfinite("grad"):
            return []
        peak = math.sqrt(max(s.values["grad.normsq_max"], 0.0))
        ref = ctx.past.grad_ref
        if not (peak == 0.0 or (ref is not None and peak < self.p["ratio"] * ref)):
            return []
        level, start = h.level, h.initial_level
        if level is None or start is None or not (start > 0 and level >= self.p["loss_share"] * start):
            return []
        what = "exactly zero" if peak == 0.0 else f"{g(peak)}, {g(peak / ref)}x its own scale ({g(ref)})"
        return [Finding(self.code, ctx.where("grad"),
                        f"the gradient norm of {ctx.where('grad')} was {what} in {ctx.span}, while the loss is "
                        f"still {g(level)} ({pct(level / start)} of its initial level).", peak,
                        self.p["ratio"] * (ref or 0.0))]
