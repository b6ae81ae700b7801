"""Reading a run's files back: alerts grouped per code, the statistics log, a plot, the catalogue table.

The files are untrusted data (a run killed mid-write leaves a partial last line; files get
concatenated, edited, or come from a newer boundguard), so every reader here skips what it cannot
use and says how much it skipped instead of raising. Only numpy is needed; matplotlib is imported
inside :func:`plot_run`.

Example:
    >>> from boundguard.report import catalogue_markdown
    >>> catalogue_markdown().splitlines()[0]
    '| code | default severity | fires when | fix |'

Command line: ``python -m boundguard.report --catalogue`` prints the README's catalogue table;
``--write-readme README.md`` replaces it between the ``<!-- catalogue:start -->`` and
``<!-- catalogue:end -->`` markers.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np

from boundguard.alerts import SCHEMA_VERSION, SEVERITIES, severity_rank
from boundguard.catalogue import CATALOGUE, CODES

__all__ = [
    "ReportError", "MissingDependency", "LineProblem", "JsonLines", "read_jsonl", "RunFiles", "find_runs",
    "stats_path_for", "AlertGroup", "RunReport", "load_run", "group_alerts", "StatsLog", "read_stats",
    "render_text", "render_markdown", "render_json", "report_dict", "worst_severity", "plot_run",
    "catalogue_markdown", "CATALOGUE_START", "CATALOGUE_END", "replace_catalogue", "MAX_LINE_BYTES", "LINE_KEY",
]

#: Lines longer than this are skipped unread (an alert record is a few kilobytes).
MAX_LINE_BYTES = 1 << 20
#: Key :func:`read_jsonl` adds to each record: the line it was read from.
LINE_KEY = "__line__"
STATS_FILENAME = "stats.jsonl"
CATALOGUE_START = "<!-- catalogue:start -->"
CATALOGUE_END = "<!-- catalogue:end -->"

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
def stats_path_for(alerts_path: PathLike) -> Path:
    """The statistics log written beside ``alerts_path``: ``stats.jsonl`` for ``alerts.jsonl``,
    ``<stem>.stats.jsonl`` for any other ``<stem>.jsonl``."""
    p = Path(alerts_path)
    stem = p.name.removesuffix(".jsonl")
    return p.with_name(STATS_FILENAME if stem == "alerts" else f"{stem}.stats.jsonl")


def _is_stats_name(name: str) -> bool:
    return name == STATS_FILENAME or name.endswith(".stats.jsonl")


def _alerts_path_for_stats(stats: Path) -> Path:
    if stats.name == STATS_FILENAME:
        return stats.with_name("alerts.jsonl")
    return stats.with_name(stats.name[: -len(".stats.jsonl")] + ".jsonl")


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
            runs.append(_run_of(_alerts_path_for_stats(p)) if _is_stats_name(p.name) else _run_of(p))
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
            if _is_stats_name(f.name):
                alerts.add(_alerts_path_for_stats(f))
            elif f.name.startswith("alerts"):
                alerts.add(f)
    except OSError as err:
        raise ReportError(f"{d}: cannot list ({err.strerror or err})") from None
    return [_run_of(a) for a in sorted(alerts)]


# ---------------------------------------------------------------------------------------- alerts
def _num(x: Any) -> Optional[float]:
    """A JSON number, or the strings "nan"/"inf"/"-inf" the writers use for non-finite values."""
    if x is None or isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return float(x)
    if isinstance(x, str) and x.strip().lower() in ("nan", "inf", "-inf", "+inf", "infinity", "-infinity"):
        return float(x.strip().lower().replace("infinity", "inf"))
    raise ValueError(f"not a number: {x!r}")


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
    step = _int(rec.get("step"), "step")
    last = _int(rec.get("last_step"), "last_step", optional=True)
    count = _int(rec.get("count", 1), "count")
    event = rec.get("event", "new")
    return _AlertRecord(
        code=code, severity=severity, event=event if event in ("new", "escalated", "summary") else "new",
        step=step, last_step=max(step, last if last is not None else step), count=max(1, count),
        where=text("where", ""), message=text("message", ""),
        fix=text("fix", CATALOGUE[code].fix if code in CATALOGUE else ""),
        value=_num(rec.get("value")), threshold=_num(rec.get("threshold")),
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
                "value": _json_num(self.value), "threshold": _json_num(self.threshold),
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
                v = _num(r.get(name))
            except ValueError:
                v = None
            if v is not None:
                col[i] = v
        columns[name] = col
    bounds = [r.get("bounds") if isinstance(r.get("bounds"), dict) else None for r in recs]
    return StatsLog(Path(path), columns, bounds, runs=len([s for s in segments if s]) or 1, read=jl)


def _describe_bounds(b: Optional[dict]) -> str:
    if not b:
        return "none"
    try:
        if b.get("kind") == "distribution":
            text = "distribution (rows in [0, 1] summing to 1)"
        else:
            text = f"[{_g(_num(b.get('lo')))}, {_g(_num(b.get('hi')))}]"
    except ValueError:
        return "unreadable"
    return text + (" (inferred)" if b.get("inferred") else "")


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
        text = f"{s.checks} check{'s' if s.checks != 1 else ''}, {span}, bounds {_describe_bounds(s.bounds[-1])}"
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


# ---------------------------------------------------------------------------------------- rendering
def _g(x: Optional[float], digits: int = 4) -> str:
    if x is None:
        return "-"
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.{digits}g}"


def _json_num(x: Optional[float]) -> Any:
    if x is None or math.isfinite(x):
        return x
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")


def _steps(g: AlertGroup) -> str:
    return str(g.first_step) if g.first_step == g.last_step else f"{g.first_step}-{g.last_step}"


def _worst(g: AlertGroup) -> str:
    if g.value is None:
        return "-"
    return _g(g.value) + (f" (threshold {_g(g.threshold)})" if g.threshold is not None else "")


def _totals(runs: Sequence[RunReport]) -> str:
    n_alerting = sum(1 for r in runs if r.groups)
    worst = worst_severity(runs)
    text = f"{len(runs)} run{'s' if len(runs) != 1 else ''}, {n_alerting} with alerts"
    return text + (f"; highest severity: {worst}." if worst else ".")


def render_text(runs: Sequence[RunReport]) -> str:
    """Plain text, one block per run: a row per code, its message and fix beneath it."""
    out: list[str] = []
    header = ("severity", "code", "count", "steps", "worst (threshold)", "where")
    for run in runs:
        out.append(run.name)
        summary = run.stats_summary()
        if summary:
            out.append(f"  {summary}")
        if run.error:
            out.append(f"  unreadable: {run.error}")
        elif not run.groups:
            out.append("  No alerts: no check found a problem." if run.stats is not None and run.stats.checks
                       else "  No alerts.")
        else:
            rows = [header] + [(g.severity, g.code, str(g.count), _steps(g), _worst(g), ", ".join(g.where))
                               for g in run.groups]
            widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
            right = {2}
            for i, row in enumerate(rows):
                cells = [c.rjust(w) if j in right else c.ljust(w) for j, (c, w) in enumerate(zip(row, widths))]
                out.append(("  " + "  ".join(cells)).rstrip())
                if i:
                    g = run.groups[i - 1]
                    out.append(f"      message: {g.message}")
                    out.append(f"      fix:     {g.fix}")
        out.append("")
    out.append(_totals(runs) + (" Details of a code: boundguard explain CODE" if worst_severity(runs) else ""))
    return "\n".join(out) + "\n"


def _md_cell(text: str) -> str:
    return " ".join(str(text).split()).replace("\\", "\\\\").replace("|", "\\|")


def render_markdown(runs: Sequence[RunReport]) -> str:
    """A Markdown section per run with a table of its codes (for CI summaries and issues)."""
    out = ["# boundguard report", "", _totals(runs), ""]
    for run in runs:
        out += [f"## `{run.name}`", ""]
        summary = run.stats_summary()
        if summary:
            out += [summary[0].upper() + summary[1:] + ".", ""]
        if run.error:
            out += [f"**Unreadable:** {_md_cell(run.error)}", ""]
            continue
        if not run.groups:
            out += ["No alerts.", ""]
            continue
        out.append("| severity | code | count | steps | worst (threshold) | where | message | fix |")
        out.append("| --- | --- | ---: | --- | --- | --- | --- | --- |")
        for g in run.groups:
            out.append(f"| {g.severity} | `{g.code}` | {g.count} | {_steps(g)} | {_md_cell(_worst(g))} | "
                       f"{_md_cell(', '.join(g.where))} | {_md_cell(g.message)} | {_md_cell(g.fix)} |")
        out.append("")
    return "\n".join(out)


def report_dict(runs: Sequence[RunReport]) -> dict[str, Any]:
    return {"schema": SCHEMA_VERSION, "severity": worst_severity(runs), "runs": [r.to_dict() for r in runs]}


def render_json(runs: Sequence[RunReport]) -> str:
    return json.dumps(report_dict(runs), indent=2, allow_nan=False) + "\n"


# ---------------------------------------------------------------------------------------- plot
_SEVERITY_COLOURS = {"info": "#5b7fa6", "warning": "#e08e0b", "error": "#d62728", "critical": "#7b1fa2"}


def plot_run(run: RunReport, out: PathLike, *, title: Optional[str] = None, size: tuple[float, float] = (11.0, 9.0),
             dpi: int = 100) -> Path:
    """Write one PNG of the run's statistics log (``size`` in inches at ``dpi``: 1100x900 pixels by
    default): the predictions' min/max band against the bounds, the share out of bounds, the
    pre-activation magnitude and the loss, with the alerts marked at their steps.

    Raises:
        MissingDependency: matplotlib is not installed.
        ReportError: the run has no statistics log, or it holds no check.
    """
    try:
        import matplotlib
    except ImportError:
        raise MissingDependency("boundguard plot needs matplotlib: pip install 'boundguard[plot]'") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    s = run.stats
    if s is None:
        raise ReportError(f"{run.name}: no statistics log beside it (expected {stats_path_for(run.files.alerts)})")
    if not s.checks:
        raise ReportError(f"{s.path}: the statistics log holds no check to plot")
    x = s.steps

    fig, axes = plt.subplots(4, 1, figsize=size, dpi=dpi, sharex=True,
                             gridspec_kw={"height_ratios": [1.7, 0.8, 1.0, 1.0]})
    ax_pred, ax_share, ax_pre, ax_loss = axes
    step_kw = dict(drawstyle="steps-pre")

    # 1. predictions against the bounds
    pmin, pmax = s.col("pred.min"), s.col("pred.max")
    if np.isfinite(pmin).any() or np.isfinite(pmax).any():
        ax_pred.fill_between(x, pmin, pmax, step="pre", color="#1f77b4", alpha=0.25, label="predictions min-max")
        ax_pred.plot(x, pmax, color="#1f77b4", lw=1.2, **step_kw)
        ax_pred.plot(x, pmin, color="#1f77b4", lw=1.2, **step_kw)
    else:
        ax_pred.text(0.5, 0.5, "no predictions recorded", transform=ax_pred.transAxes, ha="center", color="grey")
    lo = np.array([_bound(b, "lo") for b in s.bounds])
    hi = np.array([_bound(b, "hi") for b in s.bounds])
    if np.isfinite(lo).any() or np.isfinite(hi).any():
        inferred = any(b and b.get("inferred") for b in s.bounds)
        label = "bounds (inferred)" if inferred else "bounds"
        ax_pred.plot(x, lo, color="black", ls="--", lw=1.2, label=label, **step_kw)
        ax_pred.plot(x, hi, color="black", ls="--", lw=1.2, **step_kw)
        y0, y1 = ax_pred.get_ylim()
        pad = 0.05 * (y1 - y0)
        y0, y1 = y0 - pad, y1 + pad
        shade = dict(step="pre", color="#d62728", alpha=0.07, lw=0)
        ax_pred.fill_between(x, np.where(np.isfinite(hi), hi, y1), y1, label="region outside the bounds", **shade)
        ax_pred.fill_between(x, y0, np.where(np.isfinite(lo), lo, y0), **shade)
        ax_pred.set_ylim(y0, y1)
    _mark_nonfinite(ax_pred, x, s.col("pred.nonfinite"), "non-finite predictions")
    ax_pred.set_ylabel("prediction")
    ax_pred.set_title("Predictions against the bounds", loc="left", fontsize=10)

    # 2. share out of bounds (and pinned at a bound)
    n = s.col("pred.n")
    with np.errstate(invalid="ignore", divide="ignore"):
        out_share = 100 * (np.nan_to_num(s.col("pred.below")) + np.nan_to_num(s.col("pred.above"))) / n
        pinned = 100 * s.col("pred.pinned") / n
    out_share[~(n > 0)] = np.nan
    ax_share.plot(x, out_share, color="#d62728", lw=1.5, marker="o", ms=3, label="share outside the bounds", **step_kw)
    if np.nan_to_num(pinned).any():
        ax_share.plot(x, pinned, color="#8c564b", lw=1.2, ls=":", label="pinned at a bound", **step_kw)
    if not np.nan_to_num(out_share).any():
        note = ("no predictions recorded" if not (n > 0).any() else
                "no bounds in force (range checks off)" if not any(s.bounds) else "no prediction outside the bounds")
        ax_share.text(0.5, 0.5, note, transform=ax_share.transAxes, ha="center", va="center", color="grey")
    ax_share.set_ylabel("% of predictions")
    top = np.nanmax(np.r_[out_share, pinned, 1.0]) if np.isfinite(np.r_[out_share, pinned]).any() else 1.0
    ax_share.set_ylim(0, max(1.0, min(100.0, top * 1.15)))
    ax_share.set_title("Share of predictions out of bounds", loc="left", fontsize=10)

    # 3. pre-activation magnitude (log scale)
    with np.errstate(invalid="ignore", divide="ignore"):
        absmax = np.fmax(np.abs(s.col("pre.min")), np.abs(s.col("pre.max")))
        rms = np.sqrt(s.col("pre.sumsq") / s.col("pre.finite"))
        in_rms = np.sqrt(s.col("input.sumsq") / s.col("input.finite"))
    plotted = False
    for series, kw in ((absmax, dict(color="#9467bd", lw=1.5, label="pre-activation max |z|")),
                       (rms, dict(color="#9467bd", lw=1.0, ls="--", label="pre-activation RMS")),
                       (in_rms, dict(color="grey", lw=1.0, ls=":", label="input RMS"))):
        if (np.isfinite(series) & (series > 0)).any():
            ax_pre.plot(x, np.where(series > 0, series, np.nan), **kw, **step_kw)
            plotted = True
    if plotted:
        ax_pre.set_yscale("log")
        _plain_log_ticks(ax_pre)
    else:
        ax_pre.text(0.5, 0.5, "no pre-activations recorded", transform=ax_pre.transAxes, ha="center", color="grey")
    _mark_nonfinite(ax_pre, x, s.col("pre.nonfinite"), "non-finite pre-activations")
    ax_pre.set_ylabel("magnitude")
    ax_pre.set_title("Pre-activation magnitude", loc="left", fontsize=10)

    # 4. loss (log scale where it spans decades)
    mean, lmin, lmax = s.col("loss.mean"), s.col("loss.min"), s.col("loss.max")
    if np.isfinite(mean).any():
        ax_loss.fill_between(x, lmin, lmax, step="pre", color="#2ca02c", alpha=0.2, label="loss min-max per check")
        ax_loss.plot(x, mean, color="#2ca02c", lw=1.5, label="loss mean per check", **step_kw)
        vals = np.r_[lmin, lmax, mean]
        vals = vals[np.isfinite(vals)]
        if vals.size and vals.min() > 0 and vals.max() / vals.min() >= 10:
            ax_loss.set_yscale("log")
            _plain_log_ticks(ax_loss)
    else:
        ax_loss.text(0.5, 0.5, "no loss recorded", transform=ax_loss.transAxes, ha="center", color="grey")
    _mark_nonfinite(ax_loss, x, s.col("loss.nonfinite"), "non-finite loss")
    ax_loss.set_ylabel("loss")
    ax_loss.set_xlabel("training step")
    ax_loss.set_title("Loss", loc="left", fontsize=10)

    # alerts on the time axis
    events: dict[int, list[tuple[str, str, bool]]] = {}
    for g in run.groups:
        for i, (step, sev) in enumerate(g.events):
            escalated = i > 0 and severity_rank(sev) > severity_rank(g.events[i - 1][1])
            events.setdefault(step, []).append((g.code, sev, escalated))
    severities = set()
    labels: list[tuple[int, str, str]] = []
    for step, items in sorted(events.items()):
        sev = max((v for _, v, _ in items), key=severity_rank)
        severities.add(sev)
        for ax in axes:
            ax.axvline(step, color=_SEVERITY_COLOURS[sev], lw=1.0, alpha=0.8, zorder=0)
        labels.append((step, "\n".join(sorted({c + (f" \u2192 {v}" if esc else "") for c, v, esc in items})), sev))
    handles = [Line2D([], [], color=_SEVERITY_COLOURS[v], lw=1.0, label=f"{v} alert")
               for v in SEVERITIES if v in severities]

    for ax in axes:
        ax.grid(True, alpha=0.3)
        h, _ = ax.get_legend_handles_labels()
        extra = handles if ax is ax_pred else []
        if h or extra:
            ax.legend(handles=h + extra, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8,
                      frameon=False, borderaxespad=0.0)
    xs = np.r_[x[np.isfinite(x)], np.array(list(events), dtype=float)]
    if xs.size:
        lo_x, hi_x = xs.min(), xs.max()
        ax_loss.set_xlim(max(0.0, lo_x - 1), hi_x + max(1.0, 0.02 * (hi_x - lo_x)))
    n_alerts = len(run.groups)
    head = title or f"boundguard: {run.name}"
    sub = (f"{n_alerts} alert code{'s' if n_alerts != 1 else ''}, highest severity {run.severity}"
           if n_alerts else "no alerts") + f"; {run.stats_summary()}"
    fig.suptitle(f"{head}\n{sub}", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    _label_alerts(ax_pred, labels, fig.dpi)
    out = Path(out)
    try:
        fig.savefig(out, dpi=dpi, format="png")
    except OSError as err:
        raise ReportError(f"{out}: cannot write ({err.strerror or err})") from None
    finally:
        plt.close(fig)
    return out


def _label_alerts(ax: Any, labels: list[tuple[int, str, str]], dpi: float) -> None:
    """Write each alert's codes up its line, vertically; where lines crowd, a label moves right of
    the one before (tied to its line by a thin stroke); labels that no longer fit are counted."""
    fontsize = 7.0
    px_per_pt = dpi / 72.0
    right = ax.transAxes.transform((1.0, 0.0))[0]
    free = -math.inf
    unlabelled = 0
    for step, text, sev in labels:
        x_px = ax.transData.transform((step, 0.0))[0]
        width = (text.count("\n") + 1) * fontsize * 1.3 * px_per_pt + 2 * px_per_pt
        left = max(x_px + 2 * px_per_pt, free)
        if left + width > right:
            unlabelled += text.count("\n") + 1
            continue
        colour = _SEVERITY_COLOURS[sev]
        moved = left - x_px > 4 * px_per_pt
        ax.annotate(text, xy=(step, 1.0), xycoords=("data", "axes fraction"),
                    xytext=((left - x_px) / px_per_pt, -12 if moved else -4), textcoords="offset points",
                    rotation=90, va="top", ha="left", fontsize=fontsize, color=colour,
                    bbox=dict(boxstyle="square,pad=0.15", fc="white", ec="none", alpha=0.75),
                    arrowprops=dict(arrowstyle="-", color=colour, lw=0.6, shrinkA=0, shrinkB=0) if moved else None)
        free = left + width + 1 * px_per_pt
    if unlabelled:
        ax.text(0.995, 0.03, f"+{unlabelled} alert{'s' if unlabelled != 1 else ''} not labelled",
                transform=ax.transAxes, ha="right", va="bottom", fontsize=fontsize, color="dimgrey")


def _plain_log_ticks(ax: Any) -> None:
    """Log-scale tick labels as plain numbers (0.3, 2, 1e+05) rather than 3x10^-1."""
    from matplotlib import ticker

    def minor(v: float, _pos: Any) -> str:
        lo, hi = ax.get_ylim()
        few = lo > 0 and hi / lo < 40  # label minor ticks only when the axis spans under ~1.5 decades
        return f"{v:g}" if few and str(f"{v:.0e}")[0] in "25" else ""

    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _pos: f"{v:g}"))
    ax.yaxis.set_minor_formatter(ticker.FuncFormatter(minor))


def _bound(b: Optional[dict], name: str) -> float:
    try:
        v = _num(b.get(name)) if b else None
    except ValueError:
        v = None
    return np.nan if v is None else v


def _mark_nonfinite(ax: Any, x: np.ndarray, counts: np.ndarray, label: str) -> None:
    bad = np.nan_to_num(counts) > 0
    if bad.any():
        ax.plot(x[bad], np.full(bad.sum(), 0.97), transform=ax.get_xaxis_transform(), ls="none", marker="x",
                color="#7b1fa2", ms=7, mew=2, label=label)


# ---------------------------------------------------------------------------------------- catalogue
def catalogue_markdown() -> str:
    """The README's alert catalogue table, generated from :data:`boundguard.catalogue.CATALOGUE`."""
    rows = ["| code | default severity | fires when | fix |", "| --- | --- | --- | --- |"]
    for code in CODES:
        e = CATALOGUE[code]
        rows.append(f"| `{e.code}` | {e.severity} | {_md_cell(e.meaning)} | {_md_cell(e.fix)} |")
    return "\n".join(rows) + "\n"


def replace_catalogue(text: str) -> str:
    """``text`` with the table between the catalogue markers replaced by :func:`catalogue_markdown`.

    Raises:
        ReportError: the markers are missing or out of order.
    """
    start, end = text.find(CATALOGUE_START), text.find(CATALOGUE_END)
    if start < 0 or end < start:
        raise ReportError(f"the markers {CATALOGUE_START} and {CATALOGUE_END} were not found (in that order)")
    return text[: start + len(CATALOGUE_START)] + "\n" + catalogue_markdown() + text[end:]


def _main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m boundguard.report",
                                     description="Print or update the README's alert catalogue table.")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--catalogue", action="store_true", help="print the catalogue table (Markdown)")
    group.add_argument("--write-readme", metavar="README", help="replace the table between the catalogue markers")
    args = parser.parse_args(argv)
    if args.catalogue:
        sys.stdout.write(catalogue_markdown())
        return 0
    path = Path(args.write_readme)
    try:
        text = path.read_text(encoding="utf-8")
        new = replace_catalogue(text)
    except (OSError, ReportError) as err:
        print(f"error: {path}: {getattr(err, 'strerror', None) or err}", file=sys.stderr)
        return 2
    if new != text:
        path.write_text(new, encoding="utf-8")
    print(f"{path}: catalogue table {'updated' if new != text else 'already up to date'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
