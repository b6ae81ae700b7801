"""What the loss rules remember between checks, folded once per check before the rules run.

The loss window, its first losses, its initial and best level and its level at checks (thinned as the
run grows), the run's own step-to-step noise and largest rises, the pre-activation magnitudes and the
logits' scale of the last checks, and the range of the targets seen. Bounded: constant
memory over any run; :meth:`History.to_dict` / :meth:`History.from_dict` round-trip it (dicts from
older versions, without the newer keys, still load).
"""
from __future__ import annotations

import copy
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
from numpy.lib.stride_tricks import as_strided

from boundguard.stats import Snapshot

__all__ = ["History", "update_loss_history", "loss_scale", "one_centre_spread", "noise_of", "centre_spread",
           "LEVEL_STEPS", "LEVEL_MIN", "WINDOW", "NOISE_BLOCK",
           "MIN_REFERENCE", "TOP_RISES", "GRAD_WARMUP", "LOGIT_EARLY"]

# The loss rules' memory (see History and update_loss_history).
#: A level is the median of the last LEVEL_STEPS losses (at least LEVEL_MIN of them).
LEVEL_STEPS, LEVEL_MIN = 20, 5
#: The losses kept (``History.window``); the noise is measured on blocks of NOISE_BLOCK losses.
WINDOW = NOISE_BLOCK = 50
#: A step's rise counts towards the run's tail once MIN_REFERENCE losses precede it; TOP_RISES kept.
MIN_REFERENCE, TOP_RISES = 10, 5
#: The first GRAD_WARMUP checks with gradients set the head's own gradient scale.
GRAD_WARMUP = 3
#: At most LEVELS_KEPT (step, level) pairs are kept, thinned to every other one when full: their spacing
#: grows with the run, so the level of any earlier point of the run (half the run ago) is at hand.
LEVELS_KEPT = 64
#: The first LOGIT_EARLY checks that saw logits set their own early scale (``logits_growing``).
LOGIT_EARLY = 3
#: q90 of |x_t - x_(t-1)| of Gaussian noise of sd 1 (1.645 sqrt 2).
_DIFF_Q90 = 2.3262


@dataclass
class History:
    """What the loss rules remember between checks (bounded: constant memory over any run)."""

    window: deque = field(default_factory=lambda: deque(maxlen=WINDOW))
    initial_level: Optional[float] = None
    #: The run's first LEVEL_MIN finite losses (where the loss started, before any check's level).
    first_losses: list = field(default_factory=list)
    #: The loss level at checks, [step, level] (see LEVELS_KEPT): how it moved over any horizon.
    levels: list = field(default_factory=list)
    best_level: Optional[float] = None
    best_step: int = 0
    pre_absmax: deque = field(default_factory=lambda: deque(maxlen=8))
    #: Of logits a softmax cross-entropy reads, per check that read their logsumexp: [largest magnitude,
    #: mean logsumexp], the first LOGIT_EARLY such checks (their early scale) and the last 8.
    logit_early: list = field(default_factory=list)
    logit_recent: deque = field(default_factory=lambda: deque(maxlen=8))
    target_min: float = math.inf
    target_max: float = -math.inf
    target_nonbinary: float = 0.0
    target_seen: int = 0
    #: The finite targets' sum, sum of squares and count over the run (a constant predictor's loss).
    target_sum: float = 0.0
    target_sumsq: float = 0.0
    target_moments_n: int = 0
    steps_seen: int = 0
    #: The loss's step-to-step noise: the largest seen in any block of NOISE_BLOCK consecutive losses,
    #: as a standard deviation (0 until the first block is complete); ``loss_diverging`` judges the
    #: level's rise against it. ``noise_pending`` counts the losses since the last complete block.
    noise: float = 0.0
    noise_pending: int = 0
    #: The TOP_RISES largest rises of a single step above the median of the WINDOW losses before it
    #: (largest first); ``loss_spike`` judges a rise against the last of them (:attr:`tail`).
    top_rises: list = field(default_factory=list)
    #: The largest per-step norm of the head's gradients in each of the first GRAD_WARMUP checks that
    #: saw finite, non-zero gradients: their median is the run's own gradient scale (:attr:`grad_ref`).
    grad_norms: list = field(default_factory=list)
    #: The last fold's windows, for ``loss_spike``, which judges the same steps against the same
    #: windows: (the snapshot folded, the position of its first step judged in the sequence "window
    #: before the fold, then the snapshot's finite losses", the medians, the spreads). Not state:
    #: never saved, copied or compared.
    windows: Optional[tuple] = field(default=None, compare=False, repr=False)

    @property
    def grad_ref(self) -> Optional[float]:
        """The head's own gradient scale (None until GRAD_WARMUP checks saw gradients)."""
        return _median(self.grad_norms) if len(self.grad_norms) >= GRAD_WARMUP else None

    @property
    def level(self) -> Optional[float]:
        """The loss level now: the median of the last LEVEL_STEPS losses."""
        return _level(self)

    def level_at(self, step: float) -> Optional[tuple[int, float]]:
        """The last (step, level) recorded at or before ``step``; None before the first."""
        found = None
        for s, v in self.levels:
            if s > step:
                break
            found = (s, v)
        return found

    @property
    def start_level(self) -> Optional[float]:
        """Where the loss started: the median of the run's first LEVEL_MIN finite losses (None before)."""
        return _median(self.first_losses) if len(self.first_losses) >= LEVEL_MIN else None

    @property
    def tail(self) -> float:
        """The run's own tail: the TOP_RISES-th largest rise of a step above its running median seen so
        far (0 until there were that many)."""
        return self.top_rises[TOP_RISES - 1] if len(self.top_rises) >= TOP_RISES else 0.0

    def update_targets(self, snap: Snapshot) -> None:
        if snap.seen("target"):
            self.target_min = min(self.target_min, snap.values["target.min"])
            self.target_max = max(self.target_max, snap.values["target.max"])
            self.target_nonbinary += snap.values["target.nonbinary"]
            self.target_seen += snap.counts["target"]
            if not snap.nonfinite("target") and math.isfinite(snap.values["target.sumsq"]):
                self.target_sum += snap.values["target.sum"]
                self.target_sumsq += snap.values["target.sumsq"]
                self.target_moments_n += snap.counts["target"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "window": list(self.window), "initial_level": self.initial_level, "best_level": self.best_level,
            "best_step": self.best_step, "pre_absmax": list(self.pre_absmax), "target_min": self.target_min,
            "target_max": self.target_max, "target_nonbinary": self.target_nonbinary,
            "target_seen": self.target_seen, "steps_seen": self.steps_seen, "noise": self.noise,
            "target_sum": self.target_sum, "target_sumsq": self.target_sumsq,
            "target_moments_n": self.target_moments_n,
            "noise_pending": self.noise_pending, "top_rises": list(self.top_rises),
            "grad_norms": list(self.grad_norms),
            "levels": [list(x) for x in self.levels], "first_losses": list(self.first_losses),
            "logit_early": [list(x) for x in self.logit_early], "logit_recent": [list(x) for x in self.logit_recent],
        }

    def copy(self) -> "History":
        """An independent copy (what :meth:`to_dict` / :meth:`from_dict` round-trip, without the trip)."""
        h = copy.copy(self)
        h.window, h.pre_absmax = deque(self.window, maxlen=WINDOW), deque(self.pre_absmax, maxlen=8)
        h.top_rises, h.grad_norms, h.windows = list(self.top_rises), list(self.grad_norms), None
        h.logit_early, h.logit_recent = list(self.logit_early), deque(self.logit_recent, maxlen=8)
        h.levels, h.first_losses = list(self.levels), list(self.first_losses)
        return h

    def fold(self, snap: Snapshot, min_improvement: float) -> None:
        """Fold one interval into the history: its targets and its losses (see :func:`update_loss_history`)."""
        self.update_targets(snap)
        if snap.seen("pre") and not snap.nonfinite("pre"):
            self.pre_absmax.append(snap.absmax("pre"))
            lse = snap.mean_lse()
            if lse is not None and math.isfinite(lse):
                entry = [snap.absmax("pre"), lse]
                self.logit_recent.append(entry)
                if len(self.logit_early) < LOGIT_EARLY:
                    self.logit_early.append(entry)
        if len(self.grad_norms) < GRAD_WARMUP and snap.seen("grad") and not snap.nonfinite("grad"):
            peak = math.sqrt(max(snap.values["grad.normsq_max"], 0.0))
            if peak > 0:
                self.grad_norms.append(peak)
        update_loss_history(self, snap, min_improvement)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "History":
        h = cls()
        h.window.extend(d.get("window", []))
        h.pre_absmax.extend(d.get("pre_absmax", []))
        for k in ("initial_level", "best_level", "best_step", "target_min", "target_max", "target_nonbinary",
                  "target_seen", "steps_seen", "noise", "noise_pending", "target_sum", "target_sumsq",
                  "target_moments_n"):
            if k in d:
                setattr(h, k, d[k])
        h.top_rises = sorted((float(x) for x in d.get("top_rises", [])), reverse=True)[:TOP_RISES]
        h.grad_norms = [float(x) for x in d.get("grad_norms", [])][:GRAD_WARMUP]
        h.levels = [[int(a), float(b)] for a, b in d.get("levels", [])][-LEVELS_KEPT:]
        h.first_losses = [float(x) for x in d.get("first_losses", [])][:LEVEL_MIN]
        h.logit_early = [[float(a), float(b)] for a, b in d.get("logit_early", [])][:LOGIT_EARLY]
        h.logit_recent.extend([float(a), float(b)] for a, b in d.get("logit_recent", []))
        return h


def _level(h: History) -> Optional[float]:
    w = list(h.window)[-LEVEL_STEPS:]
    return _median(w) if len(w) >= LEVEL_MIN else None


def _median(xs: list[float]) -> float:
    """``np.median`` of a short list of floats, in Python (a numpy call costs more than the sort)."""
    srt, n = sorted(xs), len(xs)
    return srt[n // 2] if n % 2 else (srt[n // 2 - 1] + srt[n // 2]) / 2


def loss_scale(h: History) -> float:
    """The loss's own scale: its initial level, or how far it has come down (a loss that crossed zero)."""
    if h.initial_level is None:
        return 0.0
    came_down = h.initial_level - h.best_level if h.best_level is not None else 0.0
    return max(abs(h.initial_level), came_down)


#: Up to this many positions are reduced one by one in Python, more at once with numpy: the same
#: numbers (the same sorts and interpolations in float64), at the lower cost for each size.
_FEW = 8


def centre_spread(seq: list[float], pos: list[int], size: int, *,
                  spread: bool = True) -> tuple[list[float], list[float]]:
    """For each index ``p`` of ``pos``: the median of the up to ``size`` values of ``seq`` before it, and
    their step-to-step spread as a standard deviation: the q90 of |x_t - x_(t-1)| over 1.645 sqrt 2
    (0 with ``spread=False`` or fewer than two values). Differences make the spread blind to a trend (a
    loss falling fast is not noisy), and the q90 counts a skewed, heavy upper tail (a hard example now
    and then, a hinge loss that is mostly 0) as noise. Every ``p`` must have at least one value before
    it."""
    if len(pos) <= _FEW:
        meds, sds = [], []
        for p in pos:
            m, d = one_centre_spread(seq[max(0, p - size): p], spread)
            meds.append(m)
            sds.append(d)
        return meds, sds
    if pos[0] >= size and pos[-1] - pos[0] == len(pos) - 1 and all(a < b for a, b in zip(pos, pos[1:])):
        return _full_windows(seq, pos[0], pos[-1] + 1, size, spread)  # the usual case: an interval's steps
    med, sd = _centre_spread(_windows(np.asarray(seq, dtype=np.float64), np.asarray(pos), size), spread=spread)
    return med.tolist(), sd.tolist()


def _full_windows(seq: list[float], start: int, stop: int, size: int, spread: bool) -> tuple[list[float], list[float]]:
    """:func:`centre_spread` at the consecutive positions ``start``..``stop - 1``, each with ``size``
    values before it: the windows are strided views of one array (no copy, no padding)."""
    a = np.array(seq[start - size: stop], dtype=np.float64)
    n, step = stop - start, a.strides[0]
    med = _q(np.sort(as_strided(a, (n, size), (step, step)), axis=1), 0.5)
    if not spread or size < 2:
        return med.tolist(), [0.0] * n
    d = np.abs(np.diff(a))
    sd = _q(np.sort(as_strided(d, (n, size - 1), (step, step)), axis=1), 0.9) / _DIFF_Q90
    return med.tolist(), sd.tolist()


def one_centre_spread(w: list[float], spread: bool = True) -> tuple[float, float]:
    m = _qs(sorted(w), 0.5)
    if not spread or len(w) < 2:
        return m, 0.0
    return m, _qs(sorted(abs(b - a) for a, b in zip(w, w[1:])), 0.9) / _DIFF_Q90


def _qs(srt: list[float], q: float) -> float:
    """:func:`_q` of one sorted list."""
    at = q * (len(srt) - 1)
    lo = int(math.floor(at))
    hi = min(lo + 1, len(srt) - 1)
    return srt[lo] + (at - lo) * (srt[hi] - srt[lo])


def _windows(seq: np.ndarray, pos: np.ndarray, size: int) -> np.ndarray:
    """The up to ``size`` values of ``seq`` before each index of ``pos``, as rows (short ones padded
    with NaN: the statistics below ignore NaN)."""
    padded = np.concatenate([np.full(size, np.nan), seq])
    return padded[pos[:, None] + np.arange(size)]


def _q(srt: np.ndarray, q: float) -> np.ndarray:
    """The ``q`` quantile of each row of row-sorted ``srt`` (linear interpolation, as numpy's default)."""
    at = q * (srt.shape[-1] - 1)
    lo = int(math.floor(at))
    hi = min(lo + 1, srt.shape[-1] - 1)
    return srt[..., lo] + (at - lo) * (srt[..., hi] - srt[..., lo])


def _centre_spread(rows: np.ndarray, *, spread: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """:func:`centre_spread` of rows of consecutive values (NaN cells ignored): full rows at once, the
    few short ones (the start of a run) one by one."""
    med, sd = np.empty(len(rows)), np.zeros(len(rows))
    short = np.isnan(rows).any(axis=1)

    def reduce(block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        m = _q(np.sort(block, axis=-1), 0.5)
        if not spread or block.shape[-1] < 2:
            return m, np.zeros_like(m)
        return m, _q(np.sort(np.abs(np.diff(block, axis=-1)), axis=-1), 0.9) / _DIFF_Q90

    if not short.all():
        med[~short], sd[~short] = reduce(rows[~short])
    for i in np.flatnonzero(short):
        med[i], sd[i] = one_centre_spread(rows[i][~np.isnan(rows[i])].tolist(), spread)
    return med, sd


def noise_of(block: list[float]) -> float:
    """The step-to-step noise of consecutive losses, as a standard deviation (see :func:`centre_spread`)."""
    return one_centre_spread(block)[1]


def update_loss_history(h: History, snap: Snapshot, min_improvement: float) -> None:
    """Fold one interval's losses into the history: the window, the initial and the best level, the
    noise (per complete block of NOISE_BLOCK losses, so the same whatever the check cadence) and the
    TOP_RISES largest rises of a step above the median of the WINDOW losses before it."""
    fin = [x for x in snap.losses.tolist() if math.isfinite(x)]
    h.steps_seen += snap.steps
    if fin:
        seq = list(h.window) + fin
        n_old = len(seq) - len(fin)
        pos = list(range(max(n_old, MIN_REFERENCE), len(seq)))
        if pos:
            med, sd = centre_spread(seq, pos, WINDOW)  # (the spreads for loss_spike: see History.windows)
            h.windows = (snap, pos[0], med, sd)
            rises = [r for p, m in zip(pos, med) if (r := seq[p] - m) > 0]
            h.top_rises = sorted(h.top_rises + rises, reverse=True)[:TOP_RISES]
        for end in range(n_old + NOISE_BLOCK - h.noise_pending, len(seq) + 1, NOISE_BLOCK):
            h.noise = max(h.noise, noise_of(seq[end - NOISE_BLOCK: end]))
        h.noise_pending = (h.noise_pending + len(fin)) % NOISE_BLOCK
        h.window.extend(fin)
        if len(h.first_losses) < LEVEL_MIN:
            h.first_losses.extend(fin[: LEVEL_MIN - len(h.first_losses)])
    level = _level(h)
    if level is None:
        return
    if h.initial_level is None:
        h.initial_level = level
    if fin:
        h.levels.append([snap.step, level])
        if len(h.levels) > LEVELS_KEPT:  # (LEVELS_KEPT + 1, odd: every other keeps the first and the last)
            h.levels = h.levels[::2]
    if h.best_level is None or level < h.best_level - min_improvement * abs(h.best_level):
        h.best_level, h.best_step = level, snap.step
