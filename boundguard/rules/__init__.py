"""One class per alert code: a pure function of (snapshot, facts, bounds, history) → findings.

A rule never touches a framework or a file. Each can be called with a hand-made
:class:`~boundguard.stats.Snapshot`, which is how the core tests exercise them.

- :mod:`.base`: :class:`Context` (what a rule sees), :class:`Finding` (what it reports), :class:`Rule` and
  the kinds of thresholds each rule declares for its ``params``;
- :mod:`.output`: the output's rules (non-finite values, range, activation, targets, saturation,
  pre-activation and logit magnitude, input scale);
- :mod:`.loss`: the loss dynamics and the head's gradients.

A new rule: a class in the module of what it watches, with ``code`` (a catalogue entry in
:mod:`boundguard.catalogue`), ``params`` and ``kinds``, added to :data:`RULES` below.
"""
from __future__ import annotations

from typing import Optional

from boundguard.history import History
from boundguard.rules.base import (
    DEGENERATE, FP16_MAX, MARGIN, POSITIVE, RATIO, ROWSUM_TOL, SHARE, TAIL_THRESHOLD, Context, Finding, Kind, Rule, count,
)
from boundguard.rules.loss import (
    GradientExploding, GradientVanishing, LossAtBaseline, LossDiverging, LossPlateau, LossSpike, NonfiniteGradient,
)
from boundguard.rules.output import (
    ActivationLossMismatch, InputsNotScaled, LogitsGrowing, MissingOutputActivation, NonfiniteInput, NonfiniteLoss,
    NonfiniteOutput, OutputOutOfRange, OutputSaturated, PreactivationExploding, RegressionLossOnProbabilities,
    TargetOutOfRange,
)

__all__ = ["Finding", "History", "Context", "Rule", "Kind", "SHARE", "RATIO", "MARGIN", "POSITIVE", "count", "RULES",
           "default_rules", "TAIL_THRESHOLD", "FP16_MAX", "DEGENERATE", "ROWSUM_TOL",
           "NonfiniteInput", "NonfiniteOutput", "NonfiniteLoss", "OutputOutOfRange", "MissingOutputActivation",
           "ActivationLossMismatch", "TargetOutOfRange", "OutputSaturated", "PreactivationExploding", "LogitsGrowing",
           "RegressionLossOnProbabilities", "InputsNotScaled", "LossSpike", "LossDiverging", "LossPlateau",
           "LossAtBaseline", "NonfiniteGradient", "GradientExploding", "GradientVanishing"]

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
