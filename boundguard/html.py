"""``boundguard report --format html``: one self-contained HTML page per report.

The page holds, per run, a header (name, highest severity, steps covered), the facts the probe
inferred (from the statistics log's run record), the alerts grouped by code and the run's plot,
embedded as a ``data:`` PNG. Only inline CSS: no script, no font, no stylesheet or image from
anywhere else, so the file reads the same offline, attached to a CI job or printed. Everything
read from the files is HTML-escaped (they are untrusted data) and the page is pure ASCII
(other characters as numeric references), so it survives any terminal or pipe encoding.

matplotlib is imported only when a plot is drawn (through :func:`boundguard.plot.plot_run`); without
it the page says how to install it instead of a plot.

Example:
    >>> from boundguard.report import RunFiles, RunReport
    >>> from pathlib import Path
    >>> run = RunReport(RunFiles(Path("a/alerts.jsonl"), None), [], [], False)
    >>> page = render_html([run], plots=False)
    >>> page.startswith("<!DOCTYPE html>") and "No alerts." in page
    True
"""
from __future__ import annotations

import base64
import html
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

from boundguard import fmt
from boundguard.alerts import severity_rank
from boundguard.report import AlertGroup, MissingDependency, ReportError, RunReport, runs_summary, worst_severity

__all__ = ["render_html", "run_record"]

_INSTALL = "pip install 'boundguard[plot]'"

_CSS = """
:root { --info: #3b6ea5; --warning: #a86400; --error: #c62828; --critical: #6a1b9a; --ok: #2e7d32;
  --line: #d8dde3; --muted: #5f6b77; --bg-soft: #f5f7f9; }
* { box-sizing: border-box; }
body { margin: 0; background: #fff; color: #1d232a; line-height: 1.45;
  font: 15px/1.45 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, "DejaVu Sans", sans-serif; }
main { max-width: 1120px; margin: 0 auto; padding: 24px 28px 48px; }
h1 { font-size: 1.6em; margin: 0 0 4px; }
h2 { font-size: 1.3em; margin: 0; overflow-wrap: anywhere; }
h3 { font-size: 1.05em; margin: 22px 0 8px; color: #33404d; }
code, .mono { font-family: "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: 0.9em; }
.lead { color: var(--muted); margin: 0 0 18px; }
.run { border-top: 3px solid var(--line); margin-top: 30px; padding-top: 18px; }
.run.sev-info { border-top-color: var(--info); } .run.sev-warning { border-top-color: var(--warning); }
.run.sev-error { border-top-color: var(--error); } .run.sev-critical { border-top-color: var(--critical); }
.run.sev-none { border-top-color: var(--ok); }
.run-head { display: flex; flex-wrap: wrap; align-items: baseline; gap: 6px 14px; }
.meta { color: var(--muted); margin: 6px 0 0; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; color: #fff; font-size: 0.8em;
  font-weight: 600; letter-spacing: 0.02em; white-space: nowrap; background: var(--muted); }
.badge.info { background: var(--info); } .badge.warning { background: var(--warning); }
.badge.error { background: var(--error); } .badge.critical { background: var(--critical); }
.badge.ok { background: var(--ok); }
table { border-collapse: collapse; width: 100%; margin: 4px 0 8px; font-size: 0.92em; }
th, td { border: 1px solid var(--line); padding: 6px 8px; text-align: left; vertical-align: top;
  overflow-wrap: anywhere; }
th { background: var(--bg-soft); font-weight: 600; }
td.num { text-align: right; white-space: nowrap; }
td.nowrap { white-space: nowrap; }
table.facts { width: auto; min-width: 60%; }
table.facts th { width: 11em; }
table.alerts { table-layout: fixed; }
table.alerts col.c-sev { width: 9%; } table.alerts col.c-code { width: 21%; }
table.alerts col.c-steps { width: 8%; } table.alerts col.c-count { width: 7%; }
table.alerts col.c-where { width: 9%; }
@media (max-width: 760px) {
  main { padding: 14px 12px 32px; } table { font-size: 0.82em; } th, td { padding: 4px 5px; }
  table.alerts col.c-sev { width: 12%; } table.alerts col.c-code { width: 20%; }
  table.alerts col.c-steps { width: 9%; } table.alerts col.c-count { width: 8%; }
  .badge { padding: 1px 5px; }
}
tr.sev-critical td:first-child { border-left: 4px solid var(--critical); }
tr.sev-error td:first-child { border-left: 4px solid var(--error); }
tr.sev-warning td:first-child { border-left: 4px solid var(--warning); }
tr.sev-info td:first-child { border-left: 4px solid var(--info); }
.title { color: var(--muted); font-size: 0.88em; display: block; margin-top: 2px; }
.fix { margin-top: 6px; } .fix b { color: #33404d; }
.small { color: var(--muted); font-size: 0.86em; margin-top: 4px; }
.escalated { color: #33404d; font-weight: 600; font-size: 0.86em; display: block; margin-top: 6px; }
.missing { color: var(--muted); font-style: italic; }
.note { background: var(--bg-soft); border-left: 4px solid var(--line); padding: 8px 12px; margin: 8px 0; }
.note.bad { border-left-color: var(--error); }
figure { margin: 8px 0 0; } figure img { display: block; width: 100%; height: auto;
  border: 1px solid var(--line); }
figcaption { color: var(--muted); font-size: 0.86em; margin-top: 4px; }
footer { margin-top: 36px; color: var(--muted); font-size: 0.85em; }
@media print {
  @page { margin: 14mm 12mm; }
  body { font-size: 10pt; } main { max-width: none; padding: 0; } table { font-size: 8.5pt; }
  .badge, tr td:first-child, .run { -webkit-print-color-adjust: exact; print-color-adjust: exact; }
  h2, h3 { break-after: avoid; page-break-after: avoid; }
  tr, figure, .note, .keep { break-inside: avoid; page-break-inside: avoid; }
  .run + .run { break-before: page; } thead { display: table-header-group; }
  table.alerts col.c-sev { width: 10%; } table.alerts col.c-steps { width: 8%; } th, td { padding: 4px 6px; }
  a { color: inherit; text-decoration: none; }
}
"""


def _e(value: Any) -> str:
    """``value`` as escaped HTML text (quotes too: safe inside attributes)."""
    return html.escape(str(value), quote=True)


def _missing(text: str = "not found") -> str:
    return f'<span class="missing">{_e(text)}</span>'


def _badge(severity: Optional[str]) -> str:
    if severity is None:
        return '<span class="badge ok">no alerts</span>'
    return f'<span class="badge {_e(severity)}">{_e(severity)}</span>'


# ---------------------------------------------------------------------------------------- the run record
def run_record(run: RunReport) -> Optional[dict]:
    """The ``{"type": "run", ...}`` record of the run the statistics log describes (the last one when
    several runs were appended to the file), ``None`` without a log or such a record."""
    s = run.stats
    if s is None or s.read is None:
        return None
    found = [r for r in s.read.records if r.get("type") == "run"]
    return found[-1] if found else None


def _as_dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _where(facts: dict, key: str, extra: str = "") -> str:
    v = facts.get(key)
    if v is None or v == "":
        return _missing()
    return f"<code>{_e(v)}</code>" + (f" {_e(extra)}" if extra else "")


def _integer(facts: dict, key: str) -> str:
    return "(integer)" if facts.get(key) is True else ""


def _activation(facts: dict) -> str:
    act = facts.get("activation")
    if act is None or act == "":
        return _missing()
    params = facts.get("activation_params")
    text = f"<code>{_e(act)}</code>"
    if isinstance(params, dict) and params:
        text += " " + _e(", ".join(f"{k}={v}" for k, v in params.items()))
    return text + (" " + _missing("(not recognised)") if act == "unknown" else "")


def _loss(facts: dict) -> str:
    loss = facts.get("loss")
    where = facts.get("loss_where")
    if not isinstance(loss, dict):
        return _where(facts, "loss_where") if where else _missing()
    name = where or loss.get("name")
    bits = [f"family {loss.get('family')}"] if loss.get("family") else []
    if loss.get("link"):
        bits.append(f"link {loss.get('link')}")
    if loss.get("multiclass"):
        bits.append("multiclass")
    head = f"<code>{_e(name)}</code>" if name else _missing()
    return head + (f" ({_e(', '.join(bits))})" if bits else "")


def _bounds_text(b: Any) -> str:
    """Bounds as written in a record: ``[lo, hi]``, a distribution, a preset name, or none."""
    if b is None:
        return _missing("none")
    if isinstance(b, str):
        return f"<code>{_e(b)}</code>"
    try:
        return _e(fmt.bounds_text(b))
    except ValueError:
        return _missing("unreadable")


def _bounds_in_force(run: RunReport, rec: dict) -> str:
    """The bounds at the last check (they may be inferred after the run record was written)."""
    s = run.stats
    last = next((b for b in reversed(s.bounds) if b), None) if s is not None else None
    text = _bounds_text(last if last is not None else rec.get("bounds"))
    config = rec.get("config")
    if isinstance(config, dict) and "bounds" in config:
        text += f'<div class="small">configured: {_bounds_text(config.get("bounds"))}</div>'
    return text


def _facts_section(run: RunReport) -> str:
    rec = run_record(run)
    if rec is None:
        why = ("no statistics log beside the alerts file" if run.stats is None
               else "the statistics log holds no run record")
        return f'<h3>What the probe found</h3><p class="note">Not known: {_e(why)}.</p>'
    facts = _as_dict(rec.get("facts"))
    dtype = facts.get("pre_dtype")
    rows = [
        ("prediction", _where(facts, "pred_where")),
        ("pre-activation", _where(facts, "pre_where", f"({dtype})" if dtype else "")),
        ("activation", _activation(facts)),
        ("loss", _loss(facts)),
        ("targets", _where(facts, "target_where", _integer(facts, "target_integer"))),
        ("inputs", _where(facts, "input_where", _integer(facts, "input_integer"))),
        ("gradients", _where(facts, "grad_where", "(output layer's parameters)" if facts.get("grad_where") else "")),
        ("bounds in force", _bounds_in_force(run, rec)),
    ]
    classes = facts.get("classes")
    if isinstance(classes, int) and not isinstance(classes, bool) and classes > 1:
        rows.insert(3, ("classes", _e(classes)))
    config = _as_dict(rec.get("config"))
    if config:
        rows.append(("checks", _e(f"every {config.get('check_every_n_steps', '?')} steps, "
                                  f"on_violation={config.get('on_violation', '?')}")))
    notes = facts.get("notes")
    if isinstance(notes, list) and notes:
        items = "".join(f"<li>{_e(' - '.join(map(str, n)) if isinstance(n, (list, tuple)) else n)}</li>"
                        for n in notes)
        rows.append(("notes", f"<ul>{items}</ul>"))
    body = "".join(f"<tr><th>{_e(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return f'<h3>What the probe found</h3><table class="facts"><tbody>{body}</tbody></table>'


# ---------------------------------------------------------------------------------------- the alerts
def _escalation(g: AlertGroup) -> str:
    """``escalated: warning (step 1) -> error (step 40)`` when the code rose in severity, else ``""``."""
    path: list[tuple[int, str]] = []
    for step, sev in g.events:
        if not path or severity_rank(sev) > severity_rank(path[-1][1]):
            path.append((step, sev))
    if len(path) < 2:
        return ""
    text = " &rarr; ".join(f"{_e(sev)} (step {step})" for step, sev in path)
    return f'<span class="escalated">&#8599; escalated: {text}</span>'


def _alert_row(g: AlertGroup) -> str:
    steps = str(g.first_step) if g.first_step == g.last_step else f"{g.first_step}&ndash;{g.last_step}"
    where = "<br>".join(f"<code>{_e(w)}</code>" for w in g.where if w) or _missing("-")
    worst = ""
    if g.value is not None:
        worst = f"worst {_e(fmt.g(g.value))}" + (f" (threshold {_e(fmt.g(g.threshold))})" if g.threshold is not None else "")
        worst = f'<div class="small">{worst}</div>'
    title = f'<span class="title">{_e(g.title)}</span>' if g.title != g.code else ""
    return (f'<tr class="sev-{_e(g.severity)}"><td>{_badge(g.severity)}</td>'
            f"<td><code>{_e(g.code).replace('_', '_<wbr>')}</code>{title}{_escalation(g)}</td><td class=\"nowrap\">{steps}</td>"
            f'<td class="num">{g.count}</td><td>{where}</td>'
            f'<td>{_e(g.message)}{worst}<div class="fix"><b>Fix:</b> {_e(g.fix)}</div></td></tr>')


def _alerts_section(run: RunReport) -> str:
    head = "<h3>Alerts</h3>"
    if run.error:
        return head + f'<p class="note bad">Unreadable: {_e(run.error)}</p>'
    if not run.groups:
        checked = run.stats is not None and run.stats.checks
        return head + f'<p class="note">{"No alerts: no check found a problem." if checked else "No alerts."}</p>'
    cols = "".join(f'<col class="c-{c}">' for c in ("sev", "code", "steps", "count", "where", "msg"))
    header = "".join(f"<th>{h}</th>" for h in ("severity", "code", "steps", "count", "where", "message and fix"))
    rows = "".join(_alert_row(g) for g in run.groups)
    return (head + f'<table class="alerts"><colgroup>{cols}</colgroup><thead><tr>{header}</tr></thead>'
            f"<tbody>{rows}</tbody></table>"
            '<p class="small">Details of a code: <code>boundguard explain CODE</code></p>')


# ---------------------------------------------------------------------------------------- the plot
def _plot_png(run: RunReport, dpi: int) -> bytes:
    """The run's plot (:func:`boundguard.plot.plot_run`) as PNG bytes, drawn through a temporary file."""
    from boundguard.plot import plot_run

    with tempfile.TemporaryDirectory(prefix="boundguard-") as tmp:
        out = plot_run(run, Path(tmp) / "run.png", size=(11.0, 9.0), dpi=dpi)
        return out.read_bytes()


def _plot_section(run: RunReport, dpi: int) -> str:
    head = '<div class="keep"><h3>Statistics</h3>'
    if run.stats is None or not run.stats.checks:
        why = "no statistics log beside the alerts file" if run.stats is None else "the statistics log holds no check"
        return head + f'<p class="note">No plot: {_e(why)}.</p></div>'
    try:
        png = _plot_png(run, dpi)
    except MissingDependency:
        return head + (f'<p class="note">Plots need matplotlib: <code>{_e(_INSTALL)}</code>, '
                       "then run the report again.</p></div>")
    except (ReportError, ValueError, OverflowError, RuntimeError) as err:
        return head + f'<p class="note bad">No plot: {_e(err)}</p></div>'
    data = base64.b64encode(png).decode("ascii")
    alt = f"Statistics of {run.name}: predictions against the bounds, share out of bounds, pre-activation, loss"
    return (head + f'<figure><img src="data:image/png;base64,{data}" alt="{_e(alt)}">'
            "<figcaption>From top: the predictions' min&ndash;max against the bounds (outside shaded red), "
            "the share of predictions out of bounds, the pre-activation magnitude and the loss; "
            "vertical lines mark the alerts, coloured by severity.</figcaption></figure></div>")


# ---------------------------------------------------------------------------------------- the page
def _steps_covered(run: RunReport) -> str:
    summary = run.stats_summary()
    if summary:
        return summary
    if run.groups:
        lo, hi = min(g.first_step for g in run.groups), max(g.last_step for g in run.groups)
        return f"alerts at steps {lo}-{hi} (no statistics log)" if lo != hi else f"alerts at step {lo} (no statistics log)"
    return "no steps recorded"


def _run_section(run: RunReport, index: int, plots: bool, dpi: int) -> str:
    sev = run.severity
    n = len(run.groups)
    codes = f"{n} alert code{'s' if n != 1 else ''}" if n else ("unreadable" if run.error else "no alerts")
    warnings = "".join(f'<p class="note bad">Skipped: {_e(w)}</p>' for w in run.warnings)
    parts = [
        f'<section class="run sev-{_e(sev or "none")}" id="run-{index}">',
        f'<div class="run-head"><h2 class="mono">{_e(run.name)}</h2>{_badge(sev)}</div>',
        f'<p class="meta">{_e(codes)} &middot; {_e(_steps_covered(run))}</p>',
        warnings, _facts_section(run), _alerts_section(run),
    ]
    if plots:
        parts.append(_plot_section(run, dpi))
    parts.append("</section>")
    return "\n".join(p for p in parts if p)


def _overview(runs: Sequence[RunReport]) -> str:
    """A table of the runs, each linked to its section (only for several runs)."""
    rows = "".join(
        f'<tr><td><a href="#run-{i}" class="mono">{_e(r.name)}</a></td><td>{_badge(r.severity)}</td>'
        f'<td class="num">{len(r.groups)}</td><td>{_e(_steps_covered(r))}</td></tr>'
        for i, r in enumerate(runs, 1))
    return ('<table class="overview"><thead><tr><th>run</th><th>highest severity</th><th>codes</th>'
            f"<th>steps covered</th></tr></thead><tbody>{rows}</tbody></table>")


def render_html(runs: Sequence[RunReport], *, plots: bool = True, dpi: int = 100,
                title: str = "boundguard report") -> str:
    """One self-contained HTML document for ``runs``: per run its header, the facts the probe
    inferred, the alerts grouped by code and its plot (a ``data:`` PNG; a note when matplotlib is
    missing). Inline CSS only, no script and no external reference; ASCII only."""
    from boundguard import __version__

    body = [
        f"<header><h1>{_e(title)}</h1>",
        f'<p class="lead">{_badge(worst_severity(runs))} {_e(runs_summary(runs))}</p></header>',
        _overview(runs) if len(runs) > 1 else "",
        *(_run_section(r, i, plots, dpi) for i, r in enumerate(runs, 1)),
        f"<footer>Written by boundguard {_e(__version__)}. The alert codes are explained by "
        "<code>boundguard explain CODE</code>.</footer>",
    ]
    page = ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{_e(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n<main>\n"
            + "\n".join(b for b in body if b) + "\n</main>\n</body>\n</html>\n")
    return page.encode("ascii", "xmlcharrefreplace").decode("ascii")
