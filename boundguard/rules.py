"""One class per alert code: a pure function of (snapshot, facts, bounds, history) → findings.

A rule never touches a framework or a file. Each can be called with a hand-made
:class:`~boundguard.stats.Snapshot`, which is how the core tests exercise them.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from boundguard.bounds import Bounds
from boundguard.history import (  # noqa: F401  (History is part of this module's interface)
    _DIFF_Q90, LEVEL_MIN, LOGIT_EARLY, LEVEL_STEPS, MIN_REFERENCE, NOISE_BLOCK, TOP_RISES, WINDOW, History, _level,
    _loss_scale, _noise, _one_centre_spread, _q, centre_spread, update_loss_history,
)
from boundguard.model_facts import ModelFacts
from boundguard.stats import Snapshot

__all__ = ["Finding", "History", "Context", "Rule", "RULES", "default_rules", "TAIL_THRESHOLD"]

#: |pre-activation| beyond which sigmoid / tanh are in their flat tail (derivative < ~1e-2).
TAIL_THRESHOLD = {"sigmoid": 6.0, "scaled_sigmoid": 6.0, "tanh": 3.0, "scaled_tanh": 3.0}
#: The largest finite float16.
FP16_MAX = 65504.0
#: Targets this close to constant (a positive rate within it of 0 or 1, a variance below it of their
#: mean square) leave no constant-predictor loss to compare with (``loss_at_baseline`` is silent).
DEGENERATE = 1e-3
#: Distribution rows may sum to 1 only up to rounding in low precision.
ROWSUM_TOL = 1e-2


@dataclass
class Finding:
    code: str
    where: str
    message: str
    value: Optional[float] = None
    threshold: Optional[float] = None
    severity: Optional[str] = None  # None: the catalogue's default
    fix: Optional[str] = None  # None: the catalogue's fix
    details: dict = field(default_factory=dict)


@dataclass
class Context:
    """What a rule sees: the interval's snapshot, the facts, the bounds in force, the history with this
    interval folded in, and ``before``, the history as it was before the interval (for rules that
    compare each step of the interval with the past, such as ``loss_spike``)."""

    snap: Snapshot
    facts: ModelFacts
    bounds: Optional[Bounds]
    history: History
    before: Optional[History] = None
    onehot: bool = False  # the targets were one-hot rows
    @property
    def past(self) -> History:
        return self.before if self.before is not None else self.history

    @property
    def span(self) -> str:
        s = self.snap
        return f"step {s.step}" if s.first_step == s.step else f"steps {s.first_step}-{s.step}"

    def where(self, kind: str) -> str:
        f = self.facts
        return {
            "pred": f.pred_where or "prediction",
            "pre": f.pre_where or f.pred_where or "pre-activation",
            "target": f.target_where or "targets",
            "input": f.input_where or "inputs",
            "loss": f.loss_where or "loss",
            "grad": f.grad_where or f.pre_where or f.pred_where or "output layer",
        }[kind]


class Rule:
    """Base class: ``code`` names the alert, ``params`` its thresholds (overridable per run)."""

    code: str = ""
    params: dict[str, float] = {}

    def __init__(self, **overrides: float) -> None:
        unknown = set(overrides) - set(type(self).params)
        if unknown:
            raise ValueError(
                f"thresholds[{self.code!r}] got unknown keys {sorted(unknown)}; expected some of {sorted(type(self).params)}"
            )
        for k, v in overrides.items():
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or v != v:
                raise TypeError(f"thresholds[{self.code!r}][{k!r}] must be a number, got {v!r}")
            _check_range(self.code, k, float(v))
        self.p = {**type(self).params, **{k: float(v) for k, v in overrides.items()}}

    def evaluate(self, ctx: Context) -> list[Finding]:  # pragma: no cover - abstract
        raise NotImplementedError


#: Threshold names that are shares (in [0, 1]), counts (whole numbers >= the minimum), ratios (>= 1)
#: and margins (>= 0, where 0 switches that test off); all others are positive finite numbers.
_SHARES = ("pinned_share", "tail_share", "fp16_share", "min_improvement", "loss_share", "ratio", "share", "min_fall",
           "best_share")
_COUNTS = {"growth_checks": 2, "min_history": 1, "patience": 1, "warmup_steps": 1, "start_steps": 1}
_RATIOS = ("factor", "growth")  # (growth of logits_growing too)
_MARGINS = ("mad_sigmas", "min_rise", "growth_floor", "noise_sigmas", "tail_factor", "start_margin")


def _check_range(code: str, key: str, v: float) -> None:
    name = f"thresholds[{code!r}][{key!r}]"
    if key in _SHARES:
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name} is a share and must be in [0, 1], got {v!r}")
    elif key in _COUNTS:
        if v != int(v) or v < _COUNTS[key]:
            raise ValueError(f"{name} must be a whole number >= {_COUNTS[key]}, got {v!r}")
    elif key in _RATIOS:
        if not (math.isfinite(v) and v >= 1):
            raise ValueError(f"{name} is a ratio and must be a finite number >= 1, got {v!r}")
    elif key in _MARGINS:
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
    elif not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be a positive, finite number, got {v!r}")


def _g(x: float) -> str:
    return f"{x:.4g}"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


# ------------------------------------------------------------------------------------- non-finite
class NonfiniteInput(Rule):
    """NaN/Inf in what the batch feeds the model and the loss: the inputs, and the targets too."""

    code = "nonfinite_input"

    def evaluate(self, ctx):
        s = ctx.snap
        out = []
        for kind, label in (("input", "input"), ("target", "target")):
            bad = s.nonfinite(kind) if s.seen(kind) else 0
            if bad:
                out.append(Finding(self.code, ctx.where(kind),
                                   f"{bad} of {s.counts[kind]} {label} values were NaN/Inf in {ctx.span}.", bad, 0))
        return out


class NonfiniteOutput(Rule):
    code = "nonfinite_output"

    def evaluate(self, ctx):
        s = ctx.snap
        for kind, label in (("pred", "predictions"), ("pre", "pre-activations")):
            bad = s.nonfinite(kind) if s.seen(kind) else 0
            if bad:
                return [Finding(self.code, ctx.where(kind),
                                f"{bad} of {s.counts[kind]} {label} were NaN/Inf in {ctx.span}.", bad, 0)]
        return []


class NonfiniteLoss(Rule):
    code = "nonfinite_loss"

    def evaluate(self, ctx):
        s = ctx.snap
        bad = ~np.isfinite(s.losses)
        if not bad.any():
            return []
        first = int(s.loss_steps[bad][0])
        return [Finding(self.code, ctx.where("loss"),
                        f"the loss was NaN/Inf at {int(bad.sum())} of {bad.size} steps in {ctx.span} "
                        f"(first at step {first}).", float(bad.sum()), 0, details={"first_step": first})]


# ------------------------------------------------------------------------------------- range
class OutputOutOfRange(Rule):
    code = "output_out_of_range"
    params = {"rowsum_tol": ROWSUM_TOL}

    def evaluate(self, ctx):
        s, b = ctx.snap, ctx.bounds
        if b is None or not s.seen("pred"):
            return []
        n = s.counts["pred"]
        lo, hi = s.values["pred.min"], s.values["pred.max"]
        out = s.out_of_bounds()
        sev = "warning" if b.inferred else "error"
        if b.kind == "distribution":
            err = s.values["pred.rowsum_err"]
            if out == 0 and not (err > self.p["rowsum_tol"]):
                return []
            msg = (f"predictions are not a distribution in {ctx.span}: values span [{_g(lo)}, {_g(hi)}] "
                   f"({out} of {n} outside [0, 1]), rows sum to 1 only within {_g(err)}; bounds {b.describe()}.")
            return [Finding(self.code, ctx.where("pred"), msg, max(err, out / n), self.p["rowsum_tol"], sev)]
        if out == 0:
            return []
        share = out / n
        msg = (f"{_pct(share)} of predictions ({out} of {n}) fell outside {b.describe()} in {ctx.span}; "
               f"min {_g(lo)}, max {_g(hi)}.")
        return [Finding(self.code, ctx.where("pred"), msg, share, 0.0, sev,
                        details={"min": lo, "max": hi, "inferred": b.inferred})]


class MissingOutputActivation(Rule):
    code = "missing_output_activation"

    def evaluate(self, ctx):
        f, b = ctx.facts, ctx.bounds
        if b is None or not (b.kind == "distribution" or b.finite):
            return []
        if f.activation not in ("identity", "relu") or (f.loss is not None and f.loss.link_applied):
            return []
        what = "a raw linear output" if f.activation == "identity" else "a ReLU output (unbounded above)"
        msg = (f"the prediction of {ctx.where('pred')} is {what}, but the predictions must stay in "
               f"{b.describe()}; nothing keeps them there.")
        fix = None
        if b.kind == "distribution":
            fix = ("Add nn.Softmax / activation='softmax' on the output, or keep the logits and use "
                   "CrossEntropyLoss / from_logits=True.")
        elif (b.lo, b.hi) == (0.0, 1.0):
            fix = ("Add a sigmoid on the output (nn.Sigmoid / activation='sigmoid'), or keep the raw output and "
                   "use BCEWithLogitsLoss / from_logits=True, applying sigmoid at inference.")
        elif (b.lo, b.hi) == (-1.0, 1.0):
            fix = "Add a tanh on the output (nn.Tanh / activation='tanh')."
        else:
            fix = f"Bound the output with {_g(b.lo)} + {_g(b.hi - b.lo)} * sigmoid(z)."
        return [Finding(self.code, ctx.where("pred"), msg, fix=fix, details={"activation": f.activation})]


class ActivationLossMismatch(Rule):
    code = "activation_loss_mismatch"

    def evaluate(self, ctx):
        f, s = ctx.facts, ctx.snap
        loss = f.loss
        if loss is None:
            return []
        act = f.activation
        where = f"{ctx.where('pred')} → {ctx.where('loss')}"
        if loss.family == "logits" and act in ("sigmoid", "softmax", "scaled_sigmoid"):
            msg = (f"{act} is applied to the output, and then {loss.name} applies its own {loss.link}: "
                   f"the model is trained through the activation twice.")
            fix = (f"Remove the {act} from the model and keep {loss.name} on the raw output (apply {act} only "
                   f"at inference), or keep the {act} and use the probability loss "
                   f"({'NLLLoss on torch.log of it' if loss.multiclass else 'BCELoss'} / from_logits=False).")
            return [Finding(self.code, where, msg, fix=fix, details={"activation": act, "loss": loss.name})]
        if loss.family == "logits" and act == "relu":
            low = "0.5 (sigmoid(0))" if not loss.multiclass else "uniform (softmax of zeros)"
            msg = (f"a ReLU is applied to the logits before {loss.name}: every negative logit becomes 0, so "
                   f"the {loss.link} can never go below {low} and the loss stalls.")
            fix = (f"Remove the ReLU after the output layer: {loss.name} takes the raw logits of the last "
                   f"Linear/Dense layer.")
            return [Finding(self.code, where, msg, fix=fix, details={"activation": act, "loss": loss.name})]
        if loss.family == "log_probs" and act in ("softmax", "sigmoid", "identity", "relu"):
            msg = (f"{loss.name} expects log-probabilities, but it receives the {act} output "
                   f"({'probabilities, not their log' if act in ('softmax', 'sigmoid') else 'raw values'}).")
            fix = "Use log_softmax (nn.LogSoftmax) before NLLLoss, or feed the raw logits to CrossEntropyLoss."
            return [Finding(self.code, where, msg, fix=fix, details={"activation": act, "loss": loss.name})]
        if loss.family == "probability":
            if act in ("identity", "relu"):
                msg = (f"{loss.name} expects probabilities in [0, 1], but it receives a raw "
                       f"{'linear' if act == 'identity' else 'ReLU'} output.")
                fix = (f"Add {'softmax' if loss.multiclass else 'sigmoid'} on the output, or keep the raw output "
                       f"and use the logits form of the loss (BCEWithLogitsLoss, CrossEntropyLoss, from_logits=True).")
                return [Finding(self.code, where, msg, fix=fix, details={"activation": act, "loss": loss.name})]
            if act == "sigmoid" and not loss.multiclass and ctx.onehot and (f.classes or 0) > 2:
                msg = (f"the targets are one-hot rows over {f.classes} classes (one class per example), but "
                       f"each class gets its own sigmoid and {loss.name}: the classes do not compete, the "
                       f"rows of predictions are no distribution, and predicting all zeros already scores "
                       f"{_pct(1 - 1 / f.classes)} per unit.")
                fix = ("For mutually exclusive classes use softmax + cross-entropy: nn.CrossEntropyLoss on the "
                       "raw outputs with class indices (targets.argmax(1)), or keras' categorical_crossentropy.")
                return [Finding(self.code, where, msg, severity="warning", fix=fix,
                                details={"activation": act, "loss": loss.name, "classes": f.classes})]
            if act == "unknown" and s.seen("pred") and (s.values["pred.min"] < 0 or s.values["pred.max"] > 1):
                msg = (f"{loss.name} expects probabilities in [0, 1], but received values in "
                       f"[{_g(s.values['pred.min'])}, {_g(s.values['pred.max'])}] in {ctx.span}.")
                return [Finding(self.code, where, msg, s.absmax("pred"), 1.0)]
        return []


class TargetOutOfRange(Rule):
    code = "target_out_of_range"

    def evaluate(self, ctx):
        s, f, b = ctx.snap, ctx.facts, ctx.bounds
        if not s.seen("target"):
            return []
        if f.target_integer and f.loss is not None and f.loss.multiclass:
            return self._class_indices(ctx)
        if f.loss is not None and f.loss.link_applied:  # (a log-rate's exp reaches any count)
            rng = (0.0, math.inf) if f.loss.family == "log_rate" else (0.0, 1.0)
            what = f"the {f.loss.link} of {f.loss.name}"
        elif f.output_range is not None:
            rng, what = f.output_range, f"the {f.activation} output"
        elif b is not None and not b.inferred:
            rng, what = (b.lo, b.hi), "the declared bounds"
        else:
            return []
        lo, hi = rng
        tmin, tmax = s.values["target.min"], s.values["target.max"]
        if not (math.isfinite(tmin) and math.isfinite(tmax)):
            return []
        tol = 1e-6 * max(1.0, abs(lo) if math.isfinite(lo) else 1.0, abs(hi) if math.isfinite(hi) else 1.0)
        below, above = tmin < lo - tol, tmax > hi + tol
        if not (below or above):
            return []
        value, thr = (tmax, hi) if above and (not below or tmax - hi >= lo - tmin) else (tmin, lo)
        msg = (f"targets span [{_g(tmin)}, {_g(tmax)}] in {ctx.span}, but {what} can only produce "
               f"[{_g(lo)}, {_g(hi)}].")
        return [Finding(self.code, ctx.where("target"), msg, value, thr,
                        details={"target_min": tmin, "target_max": tmax, "range": [lo, hi]})]


    def _class_indices(self, ctx):
        """Class-index targets must lie in 0..K-1 for K output classes (labels 1..K from a file, say)."""
        s, k = ctx.snap, ctx.facts.classes
        tmin, tmax = s.values["target.min"], s.values["target.max"]
        if not k or k < 2 or not (math.isfinite(tmin) and math.isfinite(tmax)):
            return []
        if tmax <= k - 1 and (tmin >= 0 or tmin == -100):  # -100: the losses' default ignore_index
            return []
        value, thr = (tmax, k - 1) if tmax > k - 1 else (tmin, 0)
        msg = (f"class-index targets span [{_g(tmin)}, {_g(tmax)}] in {ctx.span}, but the output has {k} classes "
               f"(indices 0..{k - 1}).")
        fix = ("Make the labels 0-based (labels - 1 for labels 1..K), or give the output layer one unit per "
               "class (max label + 1).")
        return [Finding(self.code, ctx.where("target"), msg, value, thr, fix=fix,
                        details={"target_min": tmin, "target_max": tmax, "classes": k})]


class OutputSaturated(Rule):
    code = "output_saturated"
    params = {"pinned_share": 0.25, "tail_share": 0.5}

    def evaluate(self, ctx):
        s, f = ctx.snap, ctx.facts
        out = []
        if f.activation == "softmax" and f.classes == 1:
            return [Finding(self.code, ctx.where("pred"),
                            "softmax over a single output unit always outputs exactly 1: the prediction "
                            "cannot change and nothing is learnt.",
                            fix="For one output unit use a sigmoid (nn.Sigmoid / activation='sigmoid') with "
                                "binary cross-entropy, or give the layer one unit per class and keep softmax.",
                            details={"activation": "softmax", "classes": 1})]
        if s.seen("pred"):
            share = s.share("pred", "pinned")
            if share >= self.p["pinned_share"]:
                out.append(Finding(self.code, ctx.where("pred"),
                                   f"{_pct(share)} of predictions sat exactly at a bound in {ctx.span} "
                                   f"(clipped: no gradient flows through them).", share, self.p["pinned_share"]))
                return out
        log_loss = f.loss is not None and f.loss.family in ("probability", "logits", "log_probs")
        if f.activation in TAIL_THRESHOLD and not log_loss and s.seen("pre"):
            share = s.share("pre", "tail")
            if share >= self.p["tail_share"]:
                t = TAIL_THRESHOLD[f.activation]
                out.append(Finding(self.code, ctx.where("pre"),
                                   f"{_pct(share)} of pre-activations had |z| > {t:g} in {ctx.span}: the "
                                   f"{f.activation} is in its flat tail and its gradient is nearly zero.",
                                   share, self.p["tail_share"]))
        return out


class PreactivationExploding(Rule):
    code = "preactivation_exploding"
    params = {"absmax": 1e3, "growth": 10.0, "growth_floor": 100.0, "growth_checks": 4, "fp16_share": 0.25}

    def evaluate(self, ctx):
        s, f, h = ctx.snap, ctx.facts, ctx.history
        if not s.seen("pre") or s.nonfinite("pre"):
            return []
        absmax = s.absmax("pre")
        # A linear regression head legitimately reaches the targets' scale.
        scale = 1.0
        if f.activation in ("identity", "relu", "unknown") and math.isfinite(h.target_max):
            scale = max(1.0, abs(h.target_min), abs(h.target_max))
        limit = self.p["absmax"] * scale
        if f.pre_dtype == "float16" and absmax >= self.p["fp16_share"] * FP16_MAX:
            return [Finding(self.code, ctx.where("pre"),
                            f"pre-activations reached |z| = {_g(absmax)} in float16 in {ctx.span}: float16 overflows "
                            f"to Inf above {FP16_MAX:g}.", absmax, self.p["fp16_share"] * FP16_MAX,
                            fix="Train in bf16 (precision='bf16-mixed') or keep the head in float32, and lower the "
                                "learning rate or clip gradients.")]
        if absmax >= limit:
            return [Finding(self.code, ctx.where("pre"),
                            f"pre-activations reached |z| = {_g(absmax)} in {ctx.span} (limit {_g(limit)}).",
                            absmax, limit)]
        k = int(self.p["growth_checks"])
        recent = list(h.pre_absmax)[-k:]
        if (len(recent) == k and not h.logit_recent  # (logits a softmax reads: logits_growing judges growth) and all(b > a for a, b in zip(recent, recent[1:]))
                and recent[-1] >= self.p["growth"] * recent[0] and recent[-1] >= self.p["growth_floor"] * scale):
            return [Finding(self.code, ctx.where("pre"),
                            f"pre-activation magnitude grew {_g(recent[-1] / recent[0])}x over the last {k} checks "
                            f"({_g(recent[0])} → {_g(recent[-1])}).", recent[-1] / recent[0], self.p["growth"])]
        return []


class LogitsGrowing(Rule):
    """The logits a softmax cross-entropy reads run away: their mean logsumexp (what z-loss penalises) rose
    at all but at most one of the last ``growth_checks`` checks, and their largest magnitude reached
    ``growth`` times its early level (the least of the first :data:`LOGIT_EARLY` checks) and past
    ``absmax_floor`` (where the softmax is one-hot: a Gemma-2 soft cap is 30), the mean logsumexp
    ``lse_rise`` nats above its early level. A healthy language model's logits grow too, slowly, as it
    learns: to a few times their start and a handful of nats. The fix may be a soft cap,
    ``cap * tanh(z / cap)`` (``on_violation="bound"``), with ``cap`` from the run's early scale."""

    code = "logits_growing"
    params = {"growth": 5.0, "absmax_floor": 50.0, "lse_rise": 20.0, "growth_checks": 3, "cap_floor": 30.0}

    def evaluate(self, ctx):
        f, h = ctx.facts, ctx.history
        k = int(self.p["growth_checks"])
        if f.logit_cap is not None or len(h.logit_early) < LOGIT_EARLY or len(h.logit_recent) < k + 1:
            return []
        early_max = min(a for a, _ in h.logit_early)  # (the first check is the initialisation's scale)
        early_lse = min(b for _, b in h.logit_early)
        recent = list(h.logit_recent)[-(k + 1):]
        rises = sum(b[1] > a[1] for a, b in zip(recent, recent[1:]))  # (the mean logsumexp: a smooth signal)
        rising = rises >= k - 1 and recent[-1][1] > recent[0][1]
        absmax, lse = recent[-1]
        if not (rising and absmax >= self.p["absmax_floor"] and absmax >= self.p["growth"] * max(early_max, 1e-6)
                and lse >= early_lse + self.p["lse_rise"]):
            return []
        cap = float(max(self.p["cap_floor"], 2 * early_max))
        return [Finding(self.code, ctx.where("pre"),
                        f"the logits grew over the last {k} checks: largest magnitude {_g(absmax)} "
                        f"({_g(absmax / max(early_max, 1e-6))}x its early {_g(early_max)}), mean logsumexp "
                        f"{_g(lse)} (early {_g(early_lse)}) in {ctx.span}.", absmax / max(early_max, 1e-6),
                        self.p["growth"], details={"cap": cap, "absmax": absmax, "lse": lse,
                                                   "early_absmax": early_max, "early_lse": early_lse})]


class RegressionLossOnProbabilities(Rule):
    code = "regression_loss_on_probabilities"

    def evaluate(self, ctx):
        f, h = ctx.facts, ctx.history
        if f.loss is None or f.loss.family != "regression" or f.activation not in ("sigmoid", "softmax"):
            return []
        if h.target_seen == 0 or h.target_nonbinary > 0 or h.target_min < 0 or h.target_max > 1:
            return []
        return [Finding(self.code, f"{ctx.where('pred')} → {ctx.where('loss')}",
                        f"{f.loss.name} is used on {f.activation} probabilities with binary/class targets.")]


class InputsNotScaled(Rule):
    code = "inputs_not_scaled"
    # rms_high: images in 0..255 (RMS ~100) and raw physical units are far above it; count features (word
    # counts, RMS ~20) that a linear model fits well are not
    params = {"rms_high": 50.0, "rms_low": 1e-3}

    def evaluate(self, ctx):
        s, f = ctx.snap, ctx.facts
        if f.input_integer or f.input_scaled_by or not s.seen("input") or s.nonfinite("input"):
            return []
        rms = s.rms("input")
        if not math.isfinite(rms) or rms == 0.0:
            return []
        if rms > self.p["rms_high"]:
            thr, how = self.p["rms_high"], "far above"
        elif rms < self.p["rms_low"]:
            thr, how = self.p["rms_low"], "far below"
        else:
            return []
        return [Finding(self.code, ctx.where("input"),
                        f"input features have root mean square {_g(rms)} ({how} unit scale; values span "
                        f"[{_g(s.values['input.min'])}, {_g(s.values['input.max'])}]) in {ctx.span}.", rms, thr)]


# ------------------------------------------------------------------------------------- loss dynamics
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
        own_scale = _loss_scale(h)
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
                lmed, lspread = _one_centre_spread([math.log(v) for v in ref])
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
        how = (f"{_g(ratio)}x its running median {_g(m)}" if ratio is not None
               else f"{_g(loss - m)} above its running median {_g(m)}")
        return [Finding(self.code, ctx.where("loss"),
                        f"loss jumped to {_g(loss)} at step {step}, {how} (step-to-step noise {_g(spread[j])}).",
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

    def evaluate(self, ctx):
        h = ctx.history
        level, best, start = _level(h), h.best_level, h.initial_level
        if level is None or best is None or start is None:
            return []
        rise = level - best
        scale = max(abs(start), start - best)
        ratio_ok = level > self.p["factor"] * best if best > 0 else True
        if (ratio_ok and rise > 0 and rise > self.p["min_rise"] * scale
                and rise > self.p["noise_sigmas"] * ctx.past.noise):
            how = f"{_g(level / best)}x its best" if best > 0 else f"{_g(rise)} above its best"
            return [Finding(self.code, ctx.where("loss"),
                            f"the loss level {_g(level)} is {how} {_g(best)} (reached at step {h.best_step}).",
                            level / best if best > 0 else rise, self.p["factor"] if best > 0 else None)]
        return []


class LossPlateau(Rule):
    code = "loss_plateau"
    params = {"patience": 1000, "min_improvement": 0.01}

    def evaluate(self, ctx):
        h, s = ctx.history, ctx.snap
        if h.best_level is None or h.steps_seen < self.p["patience"]:
            return []
        stalled = s.step - h.best_step
        if stalled >= self.p["patience"]:
            return [Finding(self.code, ctx.where("loss"),
                            f"the loss has not improved by {_pct(self.p['min_improvement'])} for {stalled} steps "
                            f"(best {_g(h.best_level)} at step {h.best_step}).", float(stalled), self.p["patience"])]
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
    params = {"share": 0.8, "best_share": 0.6, "warmup_steps": 100, "min_fall": 0.005, "start_steps": 1000,
              "start_margin": 0.25}

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
        how = f"down {_g(fall)} from" if fall > 0 else ("up from" if fall < 0 else "level with")
        return [Finding(self.code, ctx.where("loss"),
                        f"after {h.steps_seen} steps the loss level {_g(level)} is {_pct(level / base)} of what a "
                        f"constant prediction scores ({what} {_g(base)}; best {_g(best)}) and no longer falls: "
                        f"{how} {_g(then[1])} at step {then[0]}. The model predicts the targets' average and "
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
    return then[1] - level, math.sqrt(2) * 1.25 * _noise(list(h.window)) / math.sqrt(LEVEL_STEPS)


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
        return -(p * math.log(p) + (1 - p) * math.log(1 - p)), f"the entropy of the positive rate {_g(p)}"
    if loss.multiclass and f.target_integer and f.classes and f.classes > 1:
        return math.log(f.classes), f"log of the {f.classes} classes"
    return None, ""


# ------------------------------------------------------------------------------------------ gradients
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

    def evaluate(self, ctx):
        s, ref = ctx.snap, ctx.past.grad_ref
        if not s.seen("grad") or s.nonfinite("grad") or ref is None:
            return []
        peak = math.sqrt(max(s.values["grad.normsq_max"], 0.0))
        if peak <= self.p["growth"] * ref:
            return []
        return [Finding(self.code, ctx.where("grad"),
                        f"the gradient norm of {ctx.where('grad')} reached {_g(peak)} in {ctx.span}, {_g(peak / ref)}x "
                        f"its own scale at the start of the run ({_g(ref)}).", peak, self.p["growth"] * ref)]


class GradientVanishing(Rule):
    """No gradient (or ``ratio`` of the run's own scale) reaches the output layer while the loss is still
    at ``loss_share`` of its initial level or more: the head is saturated, clipped or cut off, not
    converged (a converging loss shrinks its gradients too, so it is not judged)."""

    code = "gradient_vanishing"
    params = {"ratio": 1e-4, "loss_share": 0.5}

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
        what = "exactly zero" if peak == 0.0 else f"{_g(peak)}, {_g(peak / ref)}x its own scale ({_g(ref)})"
        return [Finding(self.code, ctx.where("grad"),
                        f"the gradient norm of {ctx.where('grad')} was {what} in {ctx.span}, while the loss is "
                        f"still {_g(level)} ({_pct(level / start)} of its initial level).", peak,
                        self.p["ratio"] * (ref or 0.0))]


RULES: tuple[type[Rule], ...] = (
    NonfiniteInput, NonfiniteOutput, NonfiniteLoss, OutputOutOfRange, MissingOutputActivation,
    ActivationLossMismatch, TargetOutOfRange, OutputSaturated, PreactivationExploding, LogitsGrowing,
    RegressionLossOnProbabilities, InputsNotScaled, LossSpike, LossDiverging, LossPlateau,
    LossAtBaseline, NonfiniteGradient, GradientExploding, GradientVanishing,
)


def default_rules(thresholds: Optional[dict[str, dict[str, float]]] = None) -> list[Rule]:
    thresholds = dict(thresholds or {})
    rules = []
    for cls in RULES:
        overrides = thresholds.pop(cls.code, {})
        if not isinstance(overrides, dict):
            raise TypeError(f"thresholds[{cls.code!r}] must be a dict of threshold names to numbers, got {overrides!r}")
        rules.append(cls(**overrides))
    if thresholds:
        raise ValueError(f"thresholds names unknown alert codes {sorted(thresholds)}; expected some of {[r.code for r in RULES]}")
    return rules
