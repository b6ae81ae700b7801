"""Reading a run's files back: alerts grouped per code, the statistics log, one report per run.

The files are untrusted data (a run killed mid-write leaves a partial last line; files get
concatenated, edited, or come from a newer boundguard), so every reader here skips what it cannot
use and says how much it skipped instead of raising. Only numpy is needed. The text, Markdown and
JSON renderings of a report are in :mod:`boundguard.cli`, the HTML page in :mod:`boundguard.html`, the
plot in :mod:`boundguard.plot`. (``python -m boundguard.report --catalogue`` still prints the README's
catalogue table for this release: it moved to ``python -m boundguard.catalogue``.)
The statistics log of a run is found beside its alerts file by the name
:func:`boundguard.sinks.stats_path_for` gives it.
"""
from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np

from boundguard.alerts import SCHEMA_VERSION, SEVERITIES, severity_rank
from boundguard.catalogue import CATALOGUE
from boundguard.fmt import bounds_text, json_float, number
from boundguard.sinks import alerts_path_for, is_stats_log, stats_path_for
from boundguard.stats import rms_of

__all__ = [
    "ReportError", "MissingDependency", "LineProblem", "JsonLines", "read_jsonl", "RunFiles", "find_runs",
    "AlertGroup", "RunReport", "load_run", "group_alerts", "StatsLog", "read_stats",
    "report_dict", "worst_severity", "runs_summary", "MAX_LINE_BYTES", "LINE_KEY",
]

#: Lines longer than this are skipped unread (an alert record is a few kilobytes).
MAX_LINE_BYTES = 1 << 20
#: Key :func:`read_jsonl` adds to each record: the line it was read from.
LINE_KEY = "__line__"

PathLike = Union[str, "os.PathLike[str]"]


class ReportError(Exception):
    """A problem with the user's input (missing file, nothing readable): shown as one line, exit status 2."""


class MissingDependency(ReportError):
    """An optional dependency is not installed; the message names the extra to install."""


# ---------------------------------------------------------------------------------------- reading lines
@dataclass
class LineProblem:
    line: int
    reason: str


@dataclass
class JsonLines:
    """The usable records of one JSON-lines file and what was skipped (line number and reason)."""

    path: Path
    records: list[dict] = field(default_factory=list)
    problems: list[LineProblem] = field(default_factory=list)
    lines: int = 0

    def warning(self) -> Optional[str]:
        """One line saying how many lines were skipped and why (``None`` when none were)."""
        if not self.problems:
            return None
        n = len(self.problems)
        shown = "; ".join((f"line {p.line}: " if p.line else "") + p.reason for p in self.problems[:3])
        more = f"; and {n - 3} more" if n > 3 else ""
        return f"{self.path}: skipped {n} unreadable line{'s' if n != 1 else ''} of {self.lines} ({shown}{more})"


def _raw_lines(fh: Any, max_bytes: int) -> Iterator[tuple[Optional[bytes], bool]]:
    """Yield ``(line, ended)`` from a binary file; ``line`` is ``None`` for a line over ``max_bytes``
    (read past in chunks, never held in memory); ``ended`` says the line had its newline."""
    while True:
        chunk = fh.readline(max_bytes + 1)
        if not chunk:
            return
        if chunk.endswith(b"\n") or len(chunk) <= max_bytes:
            yield chunk, chunk.endswith(b"\n")
            continue
        while chunk and not chunk.endswith(b"\n"):  # too long: skip to the end of the line
            chunk = fh.readline(1 << 16)
        yield None, bool(chunk)


def read_jsonl(path: PathLike, *, max_line_bytes: int = MAX_LINE_BYTES) -> JsonLines:
    """Read a boundguard JSON-lines file, keeping each line that is a JSON object with a readable
    ``schema`` and recording why any other line was skipped.

    Raises:
        ReportError: the file is missing or cannot be opened.
    """
    p = Path(path)
    out = JsonLines(p)
    try:
        fh = open(p, "rb")
    except FileNotFoundError:
        raise ReportError(f"{p}: no such file") from None
    except IsADirectoryError:
        raise ReportError(f"{p}: is a directory, not a file") from None
    except OSError as err:
        raise ReportError(f"{p}: cannot read ({err.strerror or err})") from None
    with fh:
        try:
            for raw, ended in _raw_lines(fh, max_line_bytes):
                out.lines += 1
                if raw is None:
                    out.problems.append(LineProblem(out.lines, f"longer than {max_line_bytes} bytes"))
                    continue
                if not raw.strip():
                    continue
                reason = _parse_line(raw, ended, out.records, out.lines)
                if reason:
                    out.problems.append(LineProblem(out.lines, reason))
        except OSError as err:
            raise ReportError(f"{p}: read failed ({err.strerror or err})") from None
    return out


def _parse_line(raw: bytes, ended: bool, records: list[dict], lineno: int) -> Optional[str]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "not UTF-8 text"
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        return "truncated (the run stopped mid-write)" if not ended else "not valid JSON"
    if not isinstance(obj, dict):
        return "not a JSON object"
    schema = obj.get("schema")
    if isinstance(schema, bool) or not isinstance(schema, int) or schema < 1:
        return "no boundguard schema version"
    if schema > SCHEMA_VERSION:
        return f"schema {schema} is newer than this boundguard reads ({SCHEMA_VERSION}); upgrade boundguard"
    obj[LINE_KEY] = lineno
    records.append(obj)
    return None


# ---------------------------------------------------------------------------------------- finding runs
@dataclass(frozen=True)
class RunFiles:
    """One run's files: the alerts file (it may not exist: a run without alerts writes none) and its
    statistics log (``None`` when absent)."""

    alerts: Path
    stats: Optional[Path]

    @property
    def name(self) -> str:
        return str(self.alerts if self.alerts.exists() or self.stats is None else self.stats)


def _run_of(alerts: Path) -> RunFiles:
    s = stats_path_for(alerts)
    return RunFiles(alerts, s if s.is_file() else None)


def find_runs(paths: Sequence[PathLike]) -> list[RunFiles]:
    """The runs named by ``paths``: alerts files, statistics logs, or directories searched recursively
    for ``alerts*.jsonl`` and statistics logs (a healthy run leaves only its statistics log).

    Raises:
        ReportError: a path does not exist, or a directory holds no boundguard file.
    """
    runs: list[RunFiles] = []
    missing: list[str] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = _scan_dir(p)
            if not found:
                raise ReportError(f"{p}: no boundguard files found (looked for alerts*.jsonl and "
                                  f"stats.jsonl / *.stats.jsonl, recursively)")
            runs += found
        elif p.is_file():
            runs.append(_run_of(alerts_path_for(p)) if is_stats_log(p.name) else _run_of(p))
        else:
            s = stats_path_for(p)
            if p.name.endswith(".jsonl") and s.is_file():  # a run without alerts writes no alerts file
                runs.append(RunFiles(p, s))
            else:
                missing.append(str(p))
    if missing:
        raise ReportError(f"no such file or directory: {', '.join(missing)}")
    seen: set[Path] = set()
    unique = []
    for r in runs:
        key = r.alerts.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(r)
    return unique


def _scan_dir(d: Path) -> list[RunFiles]:
    alerts: set[Path] = set()
    try:
        for f in d.rglob("*.jsonl"):
            if not f.is_file():
                continue
            if is_stats_log(f.name):
                alerts.add(alerts_path_for(f))
            elif f.name.startswith("alerts"):
                alerts.add(f)
    except OSError as err:
        raise ReportError(f"{d}: cannot list ({err.strerror or err})") from None
    return [_run_of(a) for a in sorted(alerts)]


# ---------------------------------------------------------------------------------------- alerts
def _int(x: Any, name: str, *, optional: bool = False) -> Optional[int]:
    if x is None and optional:
        return None
    if isinstance(x, bool) or not isinstance(x, (int, float)) or (isinstance(x, float) and not x.is_integer()):
        raise ValueError(f"{name} is not an integer")
    return int(x)


@dataclass
class _AlertRecord:
    code: str
    severity: str
    event: str
    step: int
    last_step: int
    count: int
    where: str
    message: str
    fix: str
    value: Optional[float]
    threshold: Optional[float]


def _alert_record(rec: dict) -> _AlertRecord:
    """Validate one alert record; ``ValueError`` names what is wrong."""
    def text(name: str, default: Optional[str] = None) -> str:
        v = rec.get(name, default)
        if not isinstance(v, str):
            raise ValueError(f"{name} is not text")
        return v

    code = text("code")
    severity = text("severity")
    if severity not in SEVERITIES:
        raise ValueError(f"unknown severity {severity!r}")
    step = _int(rec.get("step"), "step") or 0
    last = _int(rec.get("last_step"), "last_step", optional=True)
    count = _int(rec.get("count", 1), "count") or 1
    event = rec.get("event", "new")
    return _AlertRecord(
        code=code, severity=severity, event=event if event in ("new", "escalated", "summary") else "new",
        step=step, last_step=max(step, last if last is not None else step), count=max(1, count),
        where=text("where", ""), message=text("message", ""),
        fix=text("fix", CATALOGUE[code].fix if code in CATALOGUE else ""),
        value=number(rec.get("value")), threshold=number(rec.get("threshold")),
    )


def _badness(value: Optional[float], threshold: Optional[float]) -> float:
    """How far ``value`` lies past ``threshold`` (either side): the ratio when both are positive,
    else the distance; non-finite values are the worst."""
    if value is None:
        return -math.inf
    if not math.isfinite(value):
        return math.inf
    if threshold is not None and math.isfinite(threshold) and threshold > 0 and value > 0:
        return max(value / threshold, threshold / value)
    return abs(value - (threshold if threshold is not None and math.isfinite(threshold) else 0.0))


@dataclass
class AlertGroup:
    """Every record of one code in one run, summarised.

    ``count`` is the number of checks the alert was seen at (the largest ``count`` written for each
    place, summed over places), ``first_step``/``last_step`` the span, ``value``/``threshold`` the worst
    value written and its threshold, ``message`` the message at the highest severity.
    """

    code: str
    severity: str
    count: int
    first_step: int
    last_step: int
    where: list[str]
    value: Optional[float]
    threshold: Optional[float]
    message: str
    fix: str
    events: list[tuple[int, str]]  # (step, severity) of each new or escalated alert

    @property
    def title(self) -> str:
        e = CATALOGUE.get(self.code)
        return e.title if e else self.code

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "title": self.title, "severity": self.severity, "count": self.count,
                "first_step": self.first_step, "last_step": self.last_step, "where": list(self.where),
                "value": json_float(self.value), "threshold": json_float(self.threshold),
                "message": self.message, "fix": self.fix,
                "events": [{"step": s, "severity": v} for s, v in self.events]}


def group_alerts(records: Sequence[dict]) -> tuple[list[AlertGroup], list[LineProblem]]:
    """Group alert records by code. Returns the groups (highest severity first, then earliest) and
    the records skipped (line, reason)."""
    skipped: list[LineProblem] = []
    by_code: dict[str, list[_AlertRecord]] = {}
    for rec in records:
        if rec.get("type", "alert") != "alert":
            continue
        try:
            a = _alert_record(rec)
        except (ValueError, KeyError, TypeError) as err:
            line = rec.get(LINE_KEY)
            skipped.append(LineProblem(line if isinstance(line, int) else 0, f"invalid alert record ({err})"))
            continue
        by_code.setdefault(a.code, []).append(a)
    groups = []
    for code, recs in by_code.items():
        top = max(severity_rank(r.severity) for r in recs)
        at_top = [r for r in recs if severity_rank(r.severity) == top]
        lead = min(at_top, key=lambda r: (r.event == "summary", r.step))
        counts: dict[str, int] = {}
        for r in recs:
            counts[r.where] = max(counts.get(r.where, 0), r.count)
        worst = max(recs, key=lambda r: _badness(r.value, r.threshold))
        events = sorted({(r.step, r.severity) for r in recs if r.event != "summary"})
        if not events:
            events = [(min(r.step for r in recs), SEVERITIES[top])]
        groups.append(AlertGroup(
            code=code, severity=SEVERITIES[top], count=sum(counts.values()),
            first_step=min(r.step for r in recs), last_step=max(r.last_step for r in recs),
            where=sorted(counts), value=worst.value, threshold=worst.threshold,
            message=lead.message, fix=lead.fix, events=events,
        ))
    groups.sort(key=lambda g: (-severity_rank(g.severity), g.first_step, g.code))
    return groups, skipped


# ---------------------------------------------------------------------------------------- statistics
@dataclass
class StatsLog:
    """The statistics log as columns: ``columns[name]`` is a float array with one entry per check
    (NaN where a record lacks the value); ``bounds`` the bounds in force at each check (or ``None``).
    When the file holds several runs (appended), only the last is kept and ``runs`` says how many."""

    path: Path
    columns: dict[str, np.ndarray]
    bounds: list[Optional[dict]]
    runs: int = 1
    read: Optional[JsonLines] = None

    @property
    def checks(self) -> int:
        return len(self.bounds)

    @property
    def steps(self) -> np.ndarray:
        return self.columns.get("step", np.zeros(0))

    def col(self, name: str) -> np.ndarray:
        return self.columns.get(name, np.full(self.checks, np.nan))

    def rms(self, kind: str) -> np.ndarray:
        """The root mean square of ``kind``'s finite values at each check, as
        :meth:`boundguard.stats.Snapshot.rms` computes it (:func:`boundguard.stats.rms_of`)."""
        absmax = np.fmax(np.abs(self.col(f"{kind}.min")), np.abs(self.col(f"{kind}.max")))
        return rms_of(self.col(f"{kind}.sumsq"), self.col(f"{kind}.finite"), absmax, self.col(f"{kind}.nonfinite"))


def read_stats(path: PathLike) -> StatsLog:
    """Read a statistics log (one ``{"type": "stats", ...}`` record per check)."""
    jl = read_jsonl(path)
    segments: list[list[dict]] = [[]]
    for rec in jl.records:
        kind = rec.get("type")
        if kind == "run" and segments[-1]:
            segments.append([])
        elif kind == "stats":
            segments[-1].append(rec)
    recs = []
    for r in segments[-1]:
        try:
            _int(r.get("step"), "step")
        except ValueError:
            line = r.get(LINE_KEY)
            jl.problems.append(LineProblem(line if isinstance(line, int) else 0, "stats record without a step"))
            continue
        recs.append(r)
    names = sorted({k for r in recs for k, v in r.items() if k not in ("type", "schema", "bounds", LINE_KEY)})
    columns: dict[str, np.ndarray] = {}
    for name in names:
        col = np.full(len(recs), np.nan)
        for i, r in enumerate(recs):
            try:
                v = number(r.get(name))
            except ValueError:
                v = None
            if v is not None:
                col[i] = v
        columns[name] = col
    bounds = [r.get("bounds") if isinstance(r.get("bounds"), dict) else None for r in recs]
    return StatsLog(Path(path), columns, bounds, runs=len([s for s in segments if s]) or 1, read=jl)


def _bounds_words(b: Optional[dict]) -> str:
    """The bounds of a statistics record in words (:func:`boundguard.fmt.bounds_text`), ``none`` or
    ``unreadable``."""
    if not b:
        return "none"
    try:
        return bounds_text(b)
    except ValueError:
        return "unreadable"


# ---------------------------------------------------------------------------------------- runs
@dataclass
class RunReport:
    """What ``boundguard report`` says about one run."""

    files: RunFiles
    groups: list[AlertGroup]
    warnings: list[str]
    alerts_written: bool
    stats: Optional[StatsLog] = None
    error: Optional[str] = None  # set when the alerts file has no readable record at all

    @property
    def name(self) -> str:
        return self.files.name

    @property
    def severity(self) -> Optional[str]:
        return self.groups[0].severity if self.groups else None

    def stats_summary(self) -> Optional[str]:
        s = self.stats
        if s is None or not s.checks:
            return None
        steps = s.steps[np.isfinite(s.steps)]
        span = f"steps {int(steps.min())}-{int(steps.max())}" if steps.size else "no steps"
        text = f"{s.checks} check{'s' if s.checks != 1 else ''}, {span}, bounds {_bounds_words(s.bounds[-1])}"
        if s.runs > 1:
            text += f" (last of {s.runs} runs appended to the log)"
        return text

    def to_dict(self) -> dict[str, Any]:
        s = self.stats
        steps = s.steps[np.isfinite(s.steps)] if s is not None else np.zeros(0)
        return {
            "run": self.name,
            "alerts_path": str(self.files.alerts) if self.alerts_written else None,
            "stats_path": str(self.files.stats) if self.files.stats else None,
            "checks": s.checks if s is not None else None,
            "last_step": int(steps.max()) if steps.size else None,
            "bounds": s.bounds[-1] if s is not None and s.bounds else None,
            "severity": self.severity,
            "error": self.error,
            "warnings": list(self.warnings),
            "alerts": [g.to_dict() for g in self.groups],
        }


def load_run(files: RunFiles) -> RunReport:
    """Read one run's alerts (and statistics log, for its span); never raises on bad content."""
    warnings: list[str] = []
    groups: list[AlertGroup] = []
    error = None
    written = files.alerts.is_file()
    if written:
        jl = read_jsonl(files.alerts)
        groups, skipped = group_alerts(jl.records)
        jl.problems = sorted(jl.problems + skipped, key=lambda p: p.line)
        if jl.warning():
            warnings.append(jl.warning())  # type: ignore[arg-type]
        if jl.problems and not groups:
            error = (f"{files.alerts}: no readable alert record in {jl.lines} line{'s' if jl.lines != 1 else ''} "
                     f"(is this a boundguard alerts file?)")
    stats = None
    if files.stats is not None:
        try:
            stats = read_stats(files.stats)
            if stats.read is not None and stats.read.warning():
                warnings.append(stats.read.warning())  # type: ignore[arg-type]
        except ReportError as err:
            warnings.append(str(err))
    return RunReport(files, groups, warnings, written, stats, error)


def worst_severity(runs: Sequence[RunReport]) -> Optional[str]:
    sev = [r.severity for r in runs if r.severity]
    return max(sev, key=severity_rank) if sev else None


def runs_summary(runs: Sequence[RunReport]) -> str:
    """The report's closing line: how many runs, how many with alerts, the highest severity."""
    worst = worst_severity(runs)
    text = f"{len(runs)} run{'s' if len(runs) != 1 else ''}, {sum(1 for r in runs if r.groups)} with alerts"
    return text + (f"; highest severity: {worst}." if worst else ".")


# ---------------------------------------------------------------------------------------- JSON
def report_dict(runs: Sequence[RunReport]) -> dict[str, Any]:
    """What ``boundguard report --format json`` prints: the worst severity and each run's report."""
    return {"schema": SCHEMA_VERSION, "severity": worst_severity(runs), "runs": [r.to_dict() for r in runs]}


if __name__ == "__main__":  # the README table's old command, kept for this release (see CHANGELOG.md)
    from boundguard.catalogue import main

    print("python -m boundguard.report is now python -m boundguard.catalogue", file=sys.stderr)
    raise SystemExit(main(prog="python -m boundguard.report"))
