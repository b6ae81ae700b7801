"""The framework-free engine: snapshots in, alerts and actions out.

The :class:`~boundguard.session.Session` (what every adapter drives) owns one :class:`Monitor`: it tells
it what the probe found (:meth:`Monitor.set_facts`, :meth:`Monitor.observe_targets`), and at every check
hands it a :class:`~boundguard.stats.Snapshot`: :meth:`Monitor.judge` returns the decisions (nothing
written yet), the session carries them out and :meth:`Monitor.publish` records, writes and shows them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from boundguard.alerts import SCHEMA_VERSION, Alert, severity_rank
from boundguard.bounds import Bounds, infer_bounds
from boundguard.catalogue import BOUND_CODES, CATALOGUE, RANGE_CODES
from boundguard.config import Config
from boundguard.model_facts import ModelFacts
from boundguard.rules import Context, Finding, History, default_rules
from boundguard.sinks import JsonLinesWriter, emit_warning, log_alert, stats_path_for
from boundguard.stats import Snapshot
from boundguard.surgery import BoundRecord, apply_record

__all__ = ["Monitor", "Decision"]

#: A warning seen at this many checks is escalated to an error (once).
ESCALATE_AFTER = 5


@dataclass
class Decision:
    """What the adapter must do about ``alert``: ``log`` | ``warn`` | ``halt`` | ``raise`` | ``bound``.

    ``event`` is ``new`` for a first sighting and ``escalated`` for a warning promoted to an error."""

    alert: Alert
    action: str
    event: str = "new"


class Monitor:
    """Judges snapshots against the rules; keeps alerts, history and inferred bounds.

    Example:
        >>> from boundguard.monitor import Monitor
        >>> m = Monitor(Config(bounds=(0, 1), on_violation="log"), write=False)
        >>> m.bounds
        Bounds(lo=0.0, hi=1.0, kind='interval', inferred=False)
    """

    def __init__(self, config: Config, *, write: bool = True) -> None:
        self.config = config
        self.rules = default_rules(config.thresholds)
        self._plateau_min = next(r.p["min_improvement"] for r in self.rules if r.code == "loss_plateau")
        self.facts = ModelFacts()
        self.history = History()
        self.alerts: list[Alert] = []
        self._active: dict[tuple, Alert] = {}
        self._inferred: Optional[Bounds] = None
        self._onehot = False  # the targets seen at the probe were one-hot rows
        self.inserted: list[BoundRecord] = []  # inserted bounds (adapters replay them on resume)
        self.write = write
        self._alerts_file: Optional[JsonLinesWriter] = None
        self._stats_file: Optional[JsonLinesWriter] = None
        self.alerts_path: Optional[Path] = None
        self.notes_reported: set[str] = set()
        self._summarised: dict[tuple, int] = {}  # (code, where) -> count at its last summary record

    # ------------------------------------------------------------------ files
    def open_files(self, alerts_path: Path) -> None:
        """Alerts go to ``alerts_path``; the statistics log beside it (:func:`boundguard.sinks.stats_path_for`)."""
        self.alerts_path = Path(alerts_path)
        if self.write:
            failures: list = []  # the run's files warn once between them when they cannot be written
            self._alerts_file = JsonLinesWriter(self.alerts_path, failures=failures)
            self._stats_file = JsonLinesWriter(stats_path_for(self.alerts_path), failures=failures)

    def close(self) -> None:
        for f in (self._alerts_file, self._stats_file):
            if f is not None:
                f.close()

    @property
    def stats_path(self) -> Optional[Path]:
        return self._stats_file.path if self._stats_file else None

    # ------------------------------------------------------------------ facts and bounds
    def set_facts(self, facts: ModelFacts) -> None:
        self.facts = facts
        if self._stats_file is not None:
            self._stats_file.write({"type": "run", "facts": facts.to_dict(), "config": self.config.describe(),
                                    "bounds": self.bounds.to_dict() if self.bounds else None,
                                    "watched": facts.describe(self.bounds)})

    @property
    def bounds(self) -> Optional[Bounds]:
        """The bounds in force: declared, or inferred from the targets and loss seen so far."""
        b = self.config.bounds
        if b == "auto":
            return self._inferred
        return b  # type: ignore[return-value]

    def observe_targets(self, tmin: float, tmax: float, *, onehot: bool = False) -> None:
        """Update ``"auto"`` bounds from target statistics (cumulative; a later target outside [0, 1] revokes (0, 1))."""
        h = self.history
        if math.isfinite(tmin):
            h.target_min = min(h.target_min, tmin)
        if math.isfinite(tmax):
            h.target_max = max(h.target_max, tmax)
        if onehot:
            self._onehot = True
        self._infer()

    def _infer(self) -> None:
        if self.config.bounds != "auto":
            return
        loss = self.facts.loss
        if loss is None:  # without the loss, which batch entry is the target is only a guess
            self._inferred = None
            return
        if loss is not None and loss.consumes_logits and not loss.multiclass:
            # predictions are sigmoid(raw) by construction
            self._inferred = Bounds.probability().as_inferred() if self.history.target_min >= 0 else None
            return
        self._inferred = infer_bounds(
            self.history.target_min, self.history.target_max,
            target_integer=self.facts.target_integer, target_onehot=self._onehot,
            multiclass_loss=bool(loss and loss.multiclass),
        )

    def note(self, key: str, message: str, fix: str, step: int, epoch: Optional[int] = None) -> Optional[Alert]:
        """A one-time info alert that something could not be located, with the option that fixes it."""
        if key in self.notes_reported:
            return None
        self.notes_reported.add(key)
        alert = Alert("probe_incomplete", "info", step, epoch, key, message, fix)
        self.alerts.append(alert)
        self._write(alert, "new")
        log_alert(alert)
        return alert

    # ------------------------------------------------------------------ judging
    def judge(self, snap: Snapshot) -> list[Decision]:
        """Fold the interval into the history, run every rule, and decide what to do about each alert
        that is new or escalated at this check. Nothing is published yet: the caller carries out the
        actions (a ``bound`` may turn out impossible and become ``warn``) and then calls :meth:`publish`,
        so the alerts file and ``alerts`` agree."""
        before = self.history.copy()
        self.history.fold(snap, self._plateau_min)
        if snap.seen("target"):
            self._infer()
        ctx = Context(snap, self.facts, self.bounds, self.history, before, onehot=self._onehot)
        findings = [f for rule in self.rules for f in rule.evaluate(ctx)]
        if self._stats_file is not None:
            rec = {"type": "stats", **snap.to_record(),
                   "bounds": self.bounds.to_dict() if self.bounds else None}
            self._stats_file.write(rec)
        decisions = [d for f in findings for d in self._record(f, snap)]
        bound_taken = bool(self.inserted)
        for d in decisions:  # at most one bound per run, decided here so file and memory agree
            if d.action == "bound":
                if bound_taken:
                    d.action = d.alert.action = "warn"
                bound_taken = True
        return decisions

    def publish(self, decisions: list[Decision]) -> None:
        """Record, write and log the decided alerts; warn for the actions that warn."""
        for d in decisions:
            alert = d.alert
            alert.action = d.action
            self.alerts.append(alert)
            self._write(alert, d.event)
            if d.action in ("warn", "halt", "bound"):
                emit_warning(alert)
            else:
                log_alert(alert)

    def _record(self, f: Finding, snap: Snapshot) -> list[Decision]:
        e = CATALOGUE[f.code]
        severity = f.severity or e.severity
        key = (f.code, f.where)
        prev = self._active.get(key)
        if prev is not None:
            prev.count += 1
            prev.last_step = snap.step
            if f.value is not None and prev.value is not None and _worse(f.value, prev.value):
                prev.value = f.value
            if prev.severity == "warning" and prev.count == ESCALATE_AFTER:
                esc = Alert(f.code, "error", snap.step, snap.epoch, f.where,
                            f"{f.message} (still present after {prev.count} checks since step {prev.step}; escalated)",
                            f.fix or e.fix, f.value, f.threshold, count=prev.count,
                            bounds_inferred=bool(self.bounds and self.bounds.inferred), details=dict(f.details))
                esc.details["escalated_from"] = "warning"
                self._active[key] = esc
                return [self._decide(esc, "escalated")]
            return []
        alert = Alert(f.code, severity, snap.step, snap.epoch, f.where, f.message, f.fix or e.fix,
                      f.value, f.threshold, bounds_inferred=bool(self.bounds and self.bounds.inferred),
                      details=dict(f.details))
        self._active[key] = alert
        return [self._decide(alert, "new")]

    def _decide(self, alert: Alert, event: str) -> Decision:
        action = "log"
        if severity_rank(alert.severity) >= severity_rank("warning"):
            action = self.config.action_for(alert.code)
            if (action in ("halt", "raise") and alert.bounds_inferred and alert.code in RANGE_CODES
                    and alert.code not in (self.config.actions or {})):
                action = "warn"  # a range guessed from the targets never stops a run; bounds= enforces it
            if action == "bound" and alert.code not in BOUND_CODES:
                action = "warn"
        alert.action = action
        return Decision(alert, action, event)

    def _write(self, alert: Alert, event: str) -> None:
        if self._alerts_file is not None:
            self._alerts_file.write(alert.to_record(event))

    def record_bound(self, record: BoundRecord) -> None:
        """An adapter inserted ``record``: keep it (state, resume) and take its activation as the fact."""
        self.inserted.append(record)
        apply_record(self.facts, record)

    def finish(self) -> None:
        """Write the final counts of alerts that repeated after they were written, then close the files."""
        for key, alert in self._active.items():
            if alert.count > self._summarised.get(key, 1):
                self._summarised[key] = alert.count
                self._write(alert, "summary")
        self.close()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA_VERSION,
            "alerts": [a.to_record() for a in self.alerts],
            "active": [[a.code, a.where, self.alerts.index(a) if a in self.alerts else -1] for a in self._active.values()],
            "history": self.history.to_dict(),
            "inferred": self._inferred.to_dict() if self._inferred else None,
            "onehot": self._onehot,
            "facts": self.facts.to_dict(),
            "inserted": [r.to_dict() for r in self.inserted],
            "notes": sorted(self.notes_reported),
            "summarised": [[code, where, n] for (code, where), n in self._summarised.items()],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.alerts = [Alert.from_record(r) for r in state.get("alerts", [])]
        self._active = {}
        for code, where, idx in state.get("active", []):
            if 0 <= idx < len(self.alerts):
                self._active[(code, where)] = self.alerts[idx]
        self.history = History.from_dict(state.get("history", {}))
        inf = state.get("inferred")
        self._inferred = Bounds.from_dict(inf) if inf else None
        self._onehot = bool(state.get("onehot", False))
        if state.get("facts"):
            self.facts = ModelFacts.from_dict(state["facts"])
        self.inserted = [BoundRecord.from_dict(r) for r in state.get("inserted", [])]
        self.notes_reported = set(state.get("notes", []))
        self._summarised = {(code, where): int(n) for code, where, n in state.get("summarised", [])}

    def summary(self, width: int = 140) -> str:
        """The end-of-run table: one line per alert (severity, code, first step, checks seen, where, what),
        then where the details are.

        Example:
            >>> Monitor(Config(), write=False).summary()
            'boundguard: no alerts.'
        """
        if not self.alerts:
            return "boundguard: no alerts."
        counts = {s: sum(a.severity == s for a in self.alerts) for s in ("critical", "error", "warning", "info")}
        head = ", ".join(f"{n} {s}{'s' if n > 1 else ''}" for s, n in counts.items() if n)
        rows = [f"boundguard: {len(self.alerts)} alert{'s' if len(self.alerts) > 1 else ''} ({head})"]
        for a in sorted(self.alerts, key=lambda a: (-severity_rank(a.severity), a.step)):
            text = f"{a.where}: {a.message}"
            text = text if len(text) <= width - 60 else text[: width - 61] + "…"
            rows.append(f"  {a.severity:<8} {a.code:<33} step {a.step:<5} x{a.count:<3} {text}")
        where = f"boundguard report {self.alerts_path}" if self._alerts_file is not None else "callback.alerts"
        rows.append(f"  details and fixes: {where}  |  boundguard explain <code>")
        return "\n".join(rows)


def _worse(new: float, old: float) -> bool:
    try:
        return abs(float(new)) > abs(float(old))
    except (TypeError, ValueError):
        return False

