"""The rules of the output: non-finite values, the range and the activation, the targets, saturation, the
pre-activation's and the logits' magnitude, and the inputs' scale."""
from __future__ import annotations

import math

import numpy as np

from boundguard.fmt import g
from boundguard.history import LOGIT_EARLY
from boundguard.rules.base import FP16_MAX, MARGIN, RATIO, ROWSUM_TOL, SHARE, TAIL_THRESHOLD, Finding, Rule, count, pct

__all__ = ["NonfiniteInput", "NonfiniteOutput", "NonfiniteLoss", "OutputOutOfRange", "MissingOutputActivation",
           "ActivationLossMismatch", "TargetOutOfRange", "OutputSaturated", "PreactivationExploding", "LogitsGrowing",
           "RegressionLossOnProbabilities", "InputsNotScaled"]


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
            msg = (f"predictions are not a distribution in {ctx.span}: values span [{g(lo)}, {g(hi)}] "
                   f"({out} of {n} outside [0, 1]), rows sum to 1 only within {g(err)}; bounds {b.describe()}.")
            return [Finding(self.code, ctx.where("pred"), msg, max(err, out / n), self.p["rowsum_tol"], sev)]
        if out == 0:
            return []
        share = out / n
        msg = (f"{pct(share)} of predictions ({out} of {n}) fell outside {b.describe()} in {ctx.span}; "
               f"min {g(lo)}, max {g(hi)}.")
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
            fix = f"Bound the output with {g(b.lo)} + {g(b.hi - b.lo)} * sigmoid(z)."
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
                       f"{pct(1 - 1 / f.classes)} per unit.")
                fix = ("For mutually exclusive classes use softmax + cross-entropy: nn.CrossEntropyLoss on the "
                       "raw outputs with class indices (targets.argmax(1)), or keras' categorical_crossentropy.")
                return [Finding(self.code, where, msg, severity="warning", fix=fix,
                                details={"activation": act, "loss": loss.name, "classes": f.classes})]
            if act == "unknown" and s.seen("pred") and (s.values["pred.min"] < 0 or s.values["pred.max"] > 1):
                msg = (f"{loss.name} expects probabilities in [0, 1], but received values in "
                       f"[{g(s.values['pred.min'])}, {g(s.values['pred.max'])}] in {ctx.span}.")
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
        msg = (f"targets span [{g(tmin)}, {g(tmax)}] in {ctx.span}, but {what} can only produce "
               f"[{g(lo)}, {g(hi)}].")
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
        msg = (f"class-index targets span [{g(tmin)}, {g(tmax)}] in {ctx.span}, but the output has {k} classes "
               f"(indices 0..{k - 1}).")
        fix = ("Make the labels 0-based (labels - 1 for labels 1..K), or give the output layer one unit per "
               "class (max label + 1).")
        return [Finding(self.code, ctx.where("target"), msg, value, thr, fix=fix,
                        details={"target_min": tmin, "target_max": tmax, "classes": k})]


class OutputSaturated(Rule):
    code = "output_saturated"
    params = {"pinned_share": 0.25, "tail_share": 0.5}
    kinds = {"pinned_share": SHARE, "tail_share": SHARE}

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
                                   f"{pct(share)} of predictions sat exactly at a bound in {ctx.span} "
                                   f"(clipped: no gradient flows through them).", share, self.p["pinned_share"]))
                return out
        log_loss = f.loss is not None and f.loss.family in ("probability", "logits", "log_probs")
        if f.activation in TAIL_THRESHOLD and not log_loss and s.seen("pre"):
            share = s.share("pre", "tail")
            if share >= self.p["tail_share"]:
                t = TAIL_THRESHOLD[f.activation]
                out.append(Finding(self.code, ctx.where("pre"),
                                   f"{pct(share)} of pre-activations had |z| > {t:g} in {ctx.span}: the "
                                   f"{f.activation} is in its flat tail and its gradient is nearly zero.",
                                   share, self.p["tail_share"]))
        return out


class PreactivationExploding(Rule):
    code = "preactivation_exploding"
    params = {"absmax": 1e3, "growth": 10.0, "growth_floor": 100.0, "growth_checks": 4, "fp16_share": 0.25}
    kinds = {"growth": RATIO, "growth_floor": MARGIN, "growth_checks": count(2), "fp16_share": SHARE}

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
                            f"pre-activations reached |z| = {g(absmax)} in float16 in {ctx.span}: float16 overflows "
                            f"to Inf above {FP16_MAX:g}.", absmax, self.p["fp16_share"] * FP16_MAX,
                            fix="Train in bf16 (precision='bf16-mixed') or keep the head in float32, and lower the "
                                "learning rate or clip gradients.")]
        if absmax >= limit:
            return [Finding(self.code, ctx.where("pre"),
                            f"pre-activations reached |z| = {g(absmax)} in {ctx.span} (limit {g(limit)}).",
                            absmax, limit)]
        k = int(self.p["growth_checks"])
        recent = list(h.pre_absmax)[-k:]
        if (len(recent) == k and not h.logit_recent  # (logits a softmax reads: logits_growing judges growth) and all(b > a for a, b in zip(recent, recent[1:]))
                and recent[-1] >= self.p["growth"] * recent[0] and recent[-1] >= self.p["growth_floor"] * scale):
            return [Finding(self.code, ctx.where("pre"),
                            f"pre-activation magnitude grew {g(recent[-1] / recent[0])}x over the last {k} checks "
                            f"({g(recent[0])} → {g(recent[-1])}).", recent[-1] / recent[0], self.p["growth"])]
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
    kinds = {"growth": RATIO, "growth_checks": count(2)}

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
        growth = absmax / max(early_max, 1e-6)
        if not (rising and absmax >= self.p["absmax_floor"] and growth >= self.p["growth"]
                and lse >= early_lse + self.p["lse_rise"]):
            return []
        cap = float(max(self.p["cap_floor"], 2 * early_max))
        return [Finding(self.code, ctx.where("pre"),
                        f"the logits grew over the last {k} checks: largest magnitude {g(absmax)} "
                        f"({g(growth)}x its early {g(early_max)}), mean logsumexp "
                        f"{g(lse)} (early {g(early_lse)}) in {ctx.span}.", growth,
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
                        f"input features have root mean square {g(rms)} ({how} unit scale; values span "
                        f"[{g(s.values['input.min'])}, {g(s.values['input.max'])}]) in {ctx.span}.", rms, thr)]
