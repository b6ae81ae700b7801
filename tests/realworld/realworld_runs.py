"""What a corpus program hands back, and how the corpus reads it (and the torch programs' guard options and
batches): the guard's alerts, the per-step
losses, and the facts boundguard inferred (the ``run`` record of ``stats.jsonl``, written beside the
alerts file at the first check). Framework-free, shared by the torch and Keras corpus files."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

SEVERE = ("warning", "error", "critical")
#: The torch programs' check cadence (the Keras file sets its own in its fit harness).
CHECK_EVERY = 5


def guard_options(tmp_path, **kw) -> dict[str, Any]:
    """The options every torch corpus program runs its guard with (``kw`` overrides them)."""
    kw.setdefault("check_every_n_steps", CHECK_EVERY)
    kw.setdefault("on_violation", "log")
    kw.setdefault("strict", True)  # an internal error of the monitor must fail the test, not go quiet
    kw.setdefault("alerts_path", tmp_path / "alerts.jsonl")
    return kw


def batches(x, y, batch_size: int, steps: int, seed: int = 0):
    """``steps`` shuffled mini-batches over the torch tensors (x, y), epoch after epoch."""
    import torch  # (here: the Keras corpus imports this module without torch)

    g = torch.Generator().manual_seed(seed)
    n, done = len(x), 0
    while True:
        perm = torch.randperm(n, generator=g)
        for i in range(0, n - batch_size + 1, batch_size):
            idx = perm[i:i + batch_size]
            yield x[idx], y[idx]
            done += 1
            if done == steps:
                return


@dataclass
class Run:
    alerts: list
    losses: list = field(default_factory=list)
    alerts_path: Optional[Path] = None
    extra: dict = field(default_factory=dict)  # program-specific evidence that it learnt (or not)

    @property
    def codes(self) -> set[str]:
        return {a.code for a in self.alerts}

    @property
    def severe(self) -> list:
        return [a for a in self.alerts if a.severity in SEVERE]

    def describe(self) -> str:
        return "; ".join(f"[{a.severity}] {a.code} @ {a.step} ({a.where}): {a.message}" for a in self.alerts) or "none"

    @property
    def run_record(self) -> Optional[dict[str, Any]]:
        """The first ``{"type": "run"}`` record of the stats file beside the alerts file."""
        if self.alerts_path is None:
            return None
        stats = Path(self.alerts_path).with_name("stats.jsonl")
        if not stats.exists():
            return None
        for line in stats.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("type") == "run":
                return rec
        return None

    def facts(self) -> dict[str, Any]:
        """Flat view of the inferred facts: pred_where, activation, loss (name), family, ..."""
        rec = self.run_record
        if rec is None:
            return {}
        f = dict(rec["facts"])
        loss = f.pop("loss", None) or {}
        f["loss"] = loss.get("name")
        f["family"] = loss.get("family")
        f["watched"] = rec.get("watched")
        return f


def check_facts(run: Run, expected: dict[str, Any]) -> None:
    facts = run.facts()
    assert facts, "no run record was written to stats.jsonl"
    wrong = {k: (facts.get(k), v) for k, v in expected.items() if facts.get(k) != v}
    assert not wrong, f"inferred facts differ (seen, expected): {wrong}; {facts.get('watched')}"


class ProgramBroken(Exception):
    """The program itself does not do what the corpus says (a healthy one does not learn, a faulty one
    does not show its fault): not a boundguard defect, and never an expected failure."""


def program_is_valid(run: Run, *, healthy: bool) -> None:
    """Every boolean in ``run.extra`` must hold; a healthy program without its own evidence must bring a
    positive loss down (see :func:`learnt`)."""
    for key, ok in run.extra.items():
        if isinstance(ok, bool) and not ok:
            raise ProgramBroken(f"{key} does not hold; losses {run.losses[:5]}...{run.losses[-5:]}")
    if healthy and not {"learnt", "crossed_zero", "near_zero"} & set(run.extra):
        if not learnt(run.losses):
            raise ProgramBroken(f"the loss did not come down: {run.losses[:5]}...{run.losses[-5:]}")


def learnt(losses: list, *, ratio: float = 0.7, window: int = 5) -> bool:
    """The mean of the last ``window`` losses is below ``ratio`` times the mean of the first ``window``."""
    head = sum(losses[:window]) / window
    tail = sum(losses[-window:]) / window
    return tail < ratio * head


# ================================================================================ slow starters (issue 24)
SLOW_AT = 100  # the step a slow starter's loss is judged at ...
SLOW_SHARE = 0.75  # ... where it is still this share of its initial level or more


def _mean(xs: list) -> float:
    return sum(xs) / len(xs)


def slow_then_learnt(run: Run, *, at: int = SLOW_AT, share: float = SLOW_SHARE, ratio: float = 0.5,
                     window: int = 10) -> Run:
    """The evidence a slow starter must show (see :func:`program_is_valid`): the mean loss of the
    ``window`` steps around step ``at`` is ``share`` or more of the mean of the first ``window`` steps,
    and the mean of the last ``window`` is below ``ratio`` times it."""
    losses = run.losses
    start, mid = _mean(losses[:window]), _mean(losses[at - window // 2: at + window // 2])
    end = _mean(losses[-window:])
    run.extra.update(loss_start=start, loss_at_100=mid, loss_end=end, steps=len(losses))
    run.extra["slow_start"] = mid >= share * start
    run.extra["learnt"] = end < ratio * start and learnt(losses, ratio=ratio, window=window)
    return run


def judge_slow_starter(run: Run, facts: dict[str, Any], label: str = "") -> None:
    """A slow starter's test: it is one (and learns), boundguard saw the expected facts, and raised
    nothing of severity warning or above."""
    e = run.extra
    print(f"{label}steps {e['steps']}: loss {e['loss_start']:.4g} at the start, {e['loss_at_100']:.4g} at step "
          f"{SLOW_AT}, {e['loss_end']:.4g} at the end")
    print(run.facts().get("watched"))
    print(run.describe())
    program_is_valid(run, healthy=True)
    check_facts(run, facts)
    assert not run.severe, run.describe()
