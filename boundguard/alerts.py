"""Alert records, severities and the exception and warning types users catch."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from boundguard.fmt import json_float, number

__all__ = ["Alert", "BoundGuardError", "BoundGuardWarning", "SEVERITIES", "severity_rank", "SCHEMA_VERSION"]

#: Version of the JSON-lines records (alerts and statistics). Bumped on incompatible change.
SCHEMA_VERSION = 1

SEVERITIES = ("info", "warning", "error", "critical")


def severity_rank(severity: str) -> int:
    """Position of ``severity`` in :data:`SEVERITIES` (``info`` is 0)."""
    try:
        return SEVERITIES.index(severity)
    except ValueError:
        raise ValueError(f"severity must be one of {SEVERITIES}, got {severity!r}") from None


@dataclass
class Alert:
    """One finding of the monitor.

    ``step`` is the step at which the alert was first raised; ``count`` is the number of checks
    at which it was seen (it is reported once and counted, not repeated), ``last_step`` the latest.
    """

    code: str
    severity: str
    step: int
    epoch: Optional[int]
    where: str
    message: str
    fix: str
    value: Optional[float] = None
    threshold: Optional[float] = None
    count: int = 1
    last_step: Optional[int] = None
    bounds_inferred: bool = False
    action: Optional[str] = None
    details: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.last_step is None:
            self.last_step = self.step

    @property
    def key(self) -> tuple:
        return (self.code, self.where)

    def to_record(self, event: str = "new") -> dict[str, Any]:
        record: dict[str, Any] = {"schema": SCHEMA_VERSION, "type": "alert", "event": event}
        record.update(asdict(self))
        for name in ("value", "threshold"):
            record[name] = json_float(record[name])
        return record

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "Alert":
        names = cls.__dataclass_fields__.keys()
        fields: dict[str, Any] = {k: number(v) if k in ("value", "threshold") and isinstance(v, str) else v
                                  for k, v in record.items() if k in names}
        return cls(**fields)

    def line(self) -> str:
        """One short line for a console: severity, code, step, where, what was seen, and where the fix is."""
        return (f"[{self.severity}] {self.code} at step {self.step} ({self.where}): {self.message} "
                f"-> boundguard explain {self.code}")

    def __str__(self) -> str:
        return f"[{self.severity}] {self.code} at step {self.step} ({self.where}): {self.message} Fix: {self.fix}"


class BoundGuardError(RuntimeError):
    """Raised with ``on_violation="raise"``; the triggering alert is ``.alert``."""

    def __init__(self, alert: Alert) -> None:
        super().__init__(str(alert))
        self.alert = alert

    def __reduce__(self):  # picklable across processes (DDP, subprocesses)
        return (type(self), (self.alert,))


class BoundGuardWarning(UserWarning):
    """Category of the Python warnings boundguard emits (``on_violation="warn"``)."""
