"""Where alerts go: a JSON-lines file (flushed per line), Python warnings, and ``logging``."""
from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import IO, Any, Optional

from boundguard.alerts import SCHEMA_VERSION, Alert, BoundGuardWarning

__all__ = ["JsonLinesWriter", "logger", "emit_warning", "log_alert"]

logger = logging.getLogger("boundguard")
logger.addHandler(logging.NullHandler())  # a library: the application decides where log lines go

_LEVELS = {"info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR, "critical": logging.CRITICAL}


class JsonLinesWriter:
    """Appends one JSON object per line and flushes each, so a killed run loses at most a partial last line.

    The file is opened lazily on the first record (a run with no alerts leaves no empty file behind
    unless ``touch=True``).
    """

    def __init__(self, path: Path, *, touch: bool = False) -> None:
        self.path = Path(path)
        self._fh: Optional[IO[str]] = None
        if touch:
            self._open()

    def _open(self) -> IO[str]:
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a", encoding="utf-8")
        return self._fh

    def write(self, record: dict[str, Any]) -> None:
        record.setdefault("schema", SCHEMA_VERSION)
        line = json.dumps(_sanitize(record), allow_nan=False, default=_default, separators=(",", ":"))
        fh = self._open()
        fh.write(line + "\n")
        fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __getstate__(self) -> dict:
        return {"path": self.path, "_fh": None}


def _sanitize(o: Any) -> Any:
    """Strict JSON: non-finite floats become the strings "nan", "inf", "-inf"."""
    if isinstance(o, float):
        if o != o:
            return "nan"
        if o in (float("inf"), float("-inf")):
            return "inf" if o > 0 else "-inf"
        return o
    if isinstance(o, dict):
        return {str(k): _sanitize(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_sanitize(v) for v in o]
    return o


def _default(o: Any) -> Any:
    try:
        return float(o)
    except (TypeError, ValueError):
        return str(o)


def log_alert(alert: Alert) -> None:
    logger.log(_LEVELS.get(alert.severity, logging.WARNING), "%s", alert)


def emit_warning(alert: Alert) -> None:
    warnings.warn(BoundGuardWarning(str(alert)), stacklevel=3)
