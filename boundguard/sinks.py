"""Where alerts go: a JSON-lines file (flushed per line), Python warnings, and ``logging``; and what the
statistics log beside an alerts file is called.

Example:
    >>> stats_path_for("runs/a/alerts.jsonl").name, stats_path_for("runs/a/lstm.jsonl").name
    ('stats.jsonl', 'lstm.stats.jsonl')
    >>> alerts_path_for("runs/a/lstm.stats.jsonl").name, is_stats_log("stats.jsonl")
    ('lstm.jsonl', True)
"""
from __future__ import annotations

import json
import logging
import os
import sys
import sysconfig
import warnings
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import IO, Any, Iterator, Optional, Union

from boundguard.alerts import SCHEMA_VERSION, Alert, BoundGuardWarning
from boundguard.fmt import json_default, jsonable

__all__ = ["JsonLinesWriter", "logger", "emit_warning", "warn_user", "log_alert", "set_alert_channel",
           "STATS_FILENAME", "stats_path_for", "alerts_path_for", "is_stats_log"]

#: The statistics log beside ``alerts.jsonl``; beside any other ``<stem>.jsonl`` it is ``<stem>.stats.jsonl``.
STATS_FILENAME = "stats.jsonl"
_STATS_SUFFIX = ".stats.jsonl"

logger = logging.getLogger("boundguard")
logger.addHandler(logging.NullHandler())  # a library: the application decides where log lines go

_LEVELS = {"info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR, "critical": logging.CRITICAL}


class JsonLinesWriter:
    """Appends one JSON object per line and flushes each, so a killed run loses at most a partial last line.

    The file is opened lazily on the first record (a run with no alerts leaves no empty file behind
    unless ``touch=True``). Appending after a torn last line (a run killed mid-write) starts on a new
    line. A file that cannot be written (read-only directory, full disk) never fails training: one
    :class:`~boundguard.BoundGuardWarning`, then the writer drops records (alerts stay in memory).
    """

    def __init__(self, path: Path, *, touch: bool = False, failures: Optional[list] = None) -> None:
        self.path = Path(path)
        self._fh: Optional[IO[str]] = None
        self.failed: Optional[str] = None  #: why the file could not be written, once it could not
        self._failures = failures if failures is not None else []  # shared by a run's files: one warning
        if touch:
            self._guard(self._open)

    def _open(self) -> IO[str]:
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fh = open(self.path, "a+", encoding="utf-8")
            if fh.tell() > 0:
                fh.seek(fh.tell() - 1)
                torn = fh.read(1) != "\n"
                fh.seek(0, os.SEEK_END)
                if torn:
                    fh.write("\n")
            self._fh = fh
        return self._fh

    def _guard(self, fn: Any, *args: Any) -> None:
        if self.failed is not None:
            return
        try:
            fn(*args)
        except (OSError, ValueError) as err:  # ValueError: NUL in the path, or a closed file
            self.failed = f"{type(err).__name__}: {err}"
            self._drop()
            self._failures.append(self.path)
            if len(self._failures) == 1:
                warn_user(f"boundguard cannot write {self.path} ({self.failed}); alerts are kept in memory "
                          f"only (callback.alerts), training goes on.")

    def _drop(self) -> None:
        fh, self._fh = self._fh, None
        if fh is not None:
            try:
                fh.close()
            except (OSError, ValueError):
                pass

    def write(self, record: dict[str, Any]) -> None:
        record.setdefault("schema", SCHEMA_VERSION)
        try:
            line = json.dumps(record, allow_nan=False, default=json_default, separators=(",", ":"))
        except ValueError:  # a non-finite float somewhere: spelled as a string (strict JSON, boundguard.fmt)
            line = json.dumps(jsonable(record), allow_nan=False, default=json_default, separators=(",", ":"))
        self._guard(self._write_line, line)

    def _write_line(self, line: str) -> None:
        fh = self._open()
        fh.write(line + "\n")
        fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._guard(self._close)

    def _close(self) -> None:
        fh, self._fh = self._fh, None
        if fh is not None:
            fh.close()

    def __getstate__(self) -> dict:
        return {"path": self.path, "_fh": None, "failed": self.failed, "_failures": []}


def stats_path_for(alerts_path: Union[str, "os.PathLike[str]"]) -> Path:
    """The statistics log written beside ``alerts_path``: ``stats.jsonl`` for ``alerts.jsonl``,
    ``<stem>.stats.jsonl`` for any other ``<stem>.jsonl``. A device such as ``/dev/null`` (not a regular
    file, not a folder) gets the statistics too, never a new ``/dev/null.stats.jsonl``."""
    p = Path(alerts_path)
    try:
        if p.exists() and not p.is_file() and not p.is_dir():
            return p
    except OSError:
        pass
    stem = p.name.removesuffix(".jsonl")
    return p.with_name(STATS_FILENAME if stem == "alerts" else stem + _STATS_SUFFIX)


def is_stats_log(name: str) -> bool:
    """``name`` is a statistics log's file name (:func:`stats_path_for`)."""
    return name == STATS_FILENAME or name.endswith(_STATS_SUFFIX)


def alerts_path_for(stats_path: Union[str, "os.PathLike[str]"]) -> Path:
    """The alerts file a statistics log belongs to (the inverse of :func:`stats_path_for`)."""
    p = Path(stats_path)
    return p.with_name("alerts.jsonl" if p.name == STATS_FILENAME else p.name[: -len(_STATS_SUFFIX)] + ".jsonl")


_CHANNELS = ("warnings", "logging")
_channel = ["warnings"]


def set_alert_channel(channel: str) -> None:
    """Where alerts that warn are shown: ``"warnings"`` (default: one :class:`~boundguard.BoundGuardWarning`
    per alert, attributed to your code; its log record goes to the ``boundguard`` logger at DEBUG so a
    ``logging.basicConfig(level=INFO)`` does not print it twice) or ``"logging"`` (the ``boundguard``
    logger at the alert's level, no warning). Either way the ``boundguard`` logger's level filters them:
    ``logging.getLogger("boundguard").setLevel(logging.CRITICAL)`` silences all but critical alerts."""
    if channel not in _CHANNELS:
        raise ValueError(f"channel must be one of {list(_CHANNELS)}, got {channel!r}")
    _channel[0] = channel


def log_alert(alert: Alert) -> None:
    """An alert that only records (``on_violation="log"``, info alerts): one log record at its level."""
    logger.log(_LEVELS.get(alert.severity, logging.WARNING), "%s", alert.line())


def emit_warning(alert: Alert) -> None:
    """An alert that warns: one line, on the chosen channel, unless the ``boundguard`` logger's level
    filters its severity out."""
    level = _LEVELS.get(alert.severity, logging.WARNING)
    if _channel[0] == "logging":
        logger.log(level, "%s", alert.line())
        return
    logger.debug("%s", alert.line())
    if logger.isEnabledFor(level):
        with above_progress_bars():
            warn_user(alert.line())


@contextmanager
def above_progress_bars() -> Iterator[None]:
    """Clear the live ``tqdm`` bars (Lightning's, the Hugging Face Trainer's, a plain loop's) while a
    line goes to stderr and redraw them after, so an alert never lands glued to a bar's line. A no-op
    when ``tqdm`` was never imported."""
    tqdm = sys.modules.get("tqdm")
    mode = getattr(getattr(tqdm, "tqdm", None), "external_write_mode", None)
    if mode is None:
        yield
        return
    try:
        cm = mode(file=sys.stderr)
        cm.__enter__()
    except Exception:  # an unusual tqdm: write as is
        yield
        return
    try:
        yield
    finally:
        cm.__exit__(None, None, None)


def _library_dirs() -> tuple[str, ...]:
    """Where code that is not the user's lives: boundguard itself, the standard library, site-packages."""
    here = Path(__file__).resolve().parent
    dirs = {str(here), str(here.parent / "integrations")}
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        p = sysconfig.get_paths().get(key)
        if p:
            dirs.add(str(Path(p).resolve()))
    return tuple(d + os.sep for d in dirs)


_LIBRARY_DIRS = _library_dirs()


def warn_user(message: str, category: type[Warning] = BoundGuardWarning) -> None:
    """``warnings.warn`` attributed to the first frame of the user's code (outside boundguard, the
    standard library and installed packages), so ``warnings.filterwarnings(module=...)`` on the user's
    own module works and the warning line points at their training script."""
    frame: Optional[FrameType] = sys._getframe(1)
    while frame is not None:
        name = frame.f_code.co_filename
        if not name.startswith("<") and not os.path.realpath(name).startswith(_LIBRARY_DIRS):
            break
        frame = frame.f_back
    if frame is None:  # only library frames (e.g. a test runner at the bottom): the plain call site
        warnings.warn(category(message), stacklevel=3)
        return
    g = frame.f_globals
    warnings.warn_explicit(category(message), category, frame.f_code.co_filename, frame.f_lineno,
                           module=g.get("__name__", "__main__"), registry=g.setdefault("__warningregistry__", {}))
