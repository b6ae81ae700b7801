"""The ``boundguard`` command: read a run's alerts (``report``), draw its statistics (``plot``), and
look up an alert code (``explain``).

Exit status: 0 on success; 1 when ``report --fail-on SEVERITY`` finds an alert at or above it;
2 on a usage or input error (a missing file, an unknown code, matplotlib missing). Problems in the
files' contents (a partial last line, malformed or newer-schema records) are skipped with a one-line
warning on stderr.

Example::

    boundguard report lightning_logs/ --fail-on error
    boundguard report runs/a/alerts.jsonl runs/b/alerts.jsonl --format markdown >> "$GITHUB_STEP_SUMMARY"
    boundguard plot lightning_logs/version_0 -o run.png
    boundguard explain missing_output_activation
"""
from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
import textwrap
from typing import Optional, Sequence, TextIO

from boundguard import fmt
from boundguard.alerts import SEVERITIES, severity_rank
from boundguard.catalogue import CATALOGUE, CODES, Entry
from boundguard.fmt import md_cell
from boundguard.report import (AlertGroup, MissingDependency, ReportError, RunReport, find_runs, load_run,
                               report_dict, runs_summary, worst_severity)

__all__ = ["main", "build_parser", "EXIT_OK", "EXIT_ALERTS", "EXIT_ERROR", "render_text", "render_markdown",
           "render_json"]

EXIT_OK = 0
EXIT_ALERTS = 1
EXIT_ERROR = 2
PROG = "boundguard"


class _Usage(Exception):
    """An error in what the user asked for: one line on stderr, exit status 2."""


def _err(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)


def _warn(message: str) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr)


# ---------------------------------------------------------------------------------------- report
def _cmd_report(args: argparse.Namespace) -> int:
    runs = [load_run(f) for f in find_runs(args.paths)]
    for run in runs:
        for w in run.warnings:
            _warn(w)
    code = EXIT_OK
    if args.fail_on is not None:
        worst = worst_severity(runs)
        if worst is not None and severity_rank(worst) >= severity_rank(args.fail_on):
            code = EXIT_ALERTS
    errors = [r.error for r in runs if r.error]
    if args.format == "html":
        from boundguard.html import render_html

        text = render_html(runs)
    elif args.format == "json":
        text = render_json(runs)
    elif args.format == "markdown":
        text = render_markdown(runs)
    elif args.output is None and _use_rich(args.color):
        _write_rich(runs)
        text = ""
    else:
        text = render_text(runs)
    if args.output is not None:
        _write_output(args.output, text)
        print(f"wrote {args.output} ({len(runs)} run{'s' if len(runs) != 1 else ''}, {args.format})")
    else:
        sys.stdout.write(text)
    sys.stdout.flush()
    for e in errors:
        _err(e)
    if errors:
        return EXIT_ERROR
    if code == EXIT_ALERTS:
        print(f"{PROG}: alerts at or above '{args.fail_on}' found (highest: {worst_severity(runs)})",
              file=sys.stderr)
    return code


def _write_output(path: str, text: str) -> None:
    try:
        with open(path, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
    except OSError as err:
        raise ReportError(f"{path}: cannot write ({err.strerror or err})") from None


def _use_rich(color: str) -> bool:
    if color == "never" or (color == "auto" and (not sys.stdout.isatty() or os.environ.get("NO_COLOR"))):
        return False
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True


_RICH_STYLES = {"info": "blue", "warning": "yellow", "error": "bold red", "critical": "bold magenta"}


def _write_rich(runs: Sequence) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console(force_terminal=True, highlight=False, soft_wrap=False)
    for run in runs:
        title = Text(run.name, style="bold")
        summary = run.stats_summary()
        if summary:
            title.append(f"  ({summary})", style="dim")
        console.print(title)
        if run.error:
            console.print(Text(f"  unreadable: {run.error}", style="red"))
        elif not run.groups:
            console.print(Text("  No alerts.", style="green"))
        else:
            table = Table(show_lines=True, expand=True)
            for name, kw in (("severity", {"no_wrap": True}), ("code", {"no_wrap": True}),
                             ("count", {"justify": "right"}), ("steps", {"no_wrap": True}),
                             ("worst", {"no_wrap": True}), ("message and fix", {"ratio": 1})):
                table.add_column(name, **kw)
            for g in run.groups:
                body = Text(g.message)
                body.append("\nfix: ", style="bold")
                body.append(g.fix)
                if g.where:
                    body.append(f"\nwhere: {', '.join(g.where)}", style="dim")
                worst = Text(fmt.g(g.value))
                if g.value is not None and g.threshold is not None:
                    worst.append(f"\nthreshold {fmt.g(g.threshold)}", style="dim")
                table.add_row(Text(g.severity, style=_RICH_STYLES.get(g.severity, "")), Text(g.code),
                              str(g.count), _steps(g), worst, body)
            console.print(table)
        console.print()
    console.print(Text(runs_summary(runs)))


# ---------------------------------------------------------------------------------------- report: text, Markdown, JSON
def _steps(g: AlertGroup) -> str:
    return str(g.first_step) if g.first_step == g.last_step else f"{g.first_step}-{g.last_step}"


def _worst(g: AlertGroup) -> str:
    if g.value is None:
        return "-"
    return fmt.g(g.value) + (f" (threshold {fmt.g(g.threshold)})" if g.threshold is not None else "")


def render_text(runs: Sequence[RunReport]) -> str:
    """Plain text, one block per run: a row per code, its message and fix beneath it."""
    out: list[str] = []
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
            out += _text_table(run.groups)
        out.append("")
    out.append(runs_summary(runs) + (" Details of a code: boundguard explain CODE" if worst_severity(runs) else ""))
    return "\n".join(out) + "\n"


def _text_table(groups: Sequence[AlertGroup]) -> list[str]:
    """The rows of one run's table (columns aligned, the count right-aligned), each code's message and
    fix beneath its row."""
    header = ("severity", "code", "count", "steps", "worst (threshold)", "where")
    rows = [header] + [(g.severity, g.code, str(g.count), _steps(g), _worst(g), ", ".join(g.where)) for g in groups]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    right = {2}
    out: list[str] = []
    for i, row in enumerate(rows):
        cells = [c.rjust(w) if j in right else c.ljust(w) for j, (c, w) in enumerate(zip(row, widths))]
        out.append(("  " + "  ".join(cells)).rstrip())
        if i:
            g = groups[i - 1]
            out.append(f"      message: {g.message}")
            out.append(f"      fix:     {g.fix}")
    return out


def render_markdown(runs: Sequence[RunReport]) -> str:
    """A Markdown section per run with a table of its codes (for CI summaries and issues)."""
    out = ["# boundguard report", "", runs_summary(runs), ""]
    for run in runs:
        out += [f"## `{run.name}`", ""]
        summary = run.stats_summary()
        if summary:
            out += [summary[0].upper() + summary[1:] + ".", ""]
        if run.error:
            out += [f"**Unreadable:** {md_cell(run.error)}", ""]
            continue
        if not run.groups:
            out += ["No alerts.", ""]
            continue
        out.append("| severity | code | count | steps | worst (threshold) | where | message | fix |")
        out.append("| --- | --- | ---: | --- | --- | --- | --- | --- |")
        for g in run.groups:
            out.append(f"| {g.severity} | `{g.code}` | {g.count} | {_steps(g)} | {md_cell(_worst(g))} | "
                       f"{md_cell(', '.join(g.where))} | {md_cell(g.message)} | {md_cell(g.fix)} |")
        out.append("")
    return "\n".join(out)


def render_json(runs: Sequence[RunReport]) -> str:
    return json.dumps(report_dict(runs), indent=2, allow_nan=False) + "\n"


# ---------------------------------------------------------------------------------------- plot
def _parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT in pixels such as 1100x900, got {text!r}") from None
    if not (100 <= w <= 10000 and 100 <= h <= 10000):
        raise argparse.ArgumentTypeError(f"width and height must be between 100 and 10000 pixels, got {text!r}")
    return w, h


def _cmd_plot(args: argparse.Namespace) -> int:
    runs = find_runs([args.path])
    if len(runs) > 1:
        names = "\n  ".join(r.name for r in runs)
        raise _Usage(f"{args.path} holds {len(runs)} runs; plot one of them:\n  {names}")
    run = load_run(runs[0])
    for w in run.warnings:
        _warn(w)
    if run.stats is not None and run.stats.runs > 1:
        _warn(f"{run.stats.path} holds {run.stats.runs} runs appended one after another; plotting the last")
    w, h = args.size
    from boundguard.plot import plot_run

    out = plot_run(run, args.output, title=args.title, size=(w / args.dpi, h / args.dpi), dpi=args.dpi)
    print(f"wrote {out} ({w}x{h} pixels)")
    return EXIT_OK


# ---------------------------------------------------------------------------------------- explain
def _normalise(code: str) -> str:
    return code.strip().lower().replace("-", "_").replace(" ", "_")


def _lookup(code: str) -> Entry:
    key = _normalise(code)
    if key in CATALOGUE:
        return CATALOGUE[key]
    close = difflib.get_close_matches(key, CODES, n=1, cutoff=0.6)
    hint = f" Did you mean {close[0]}?" if close else ""
    raise _Usage(f"unknown alert code {code!r}.{hint} Valid codes: {', '.join(CODES)}")


def _explain_text(e: Entry, width: int) -> str:
    def para(text: str) -> str:
        return textwrap.fill(text, width=width, initial_indent="  ", subsequent_indent="  ")

    return "\n".join([
        f"{e.code}: {e.title}",
        f"default severity: {e.severity}",
        "",
        "What it means",
        para(e.meaning),
        "",
        "Why it matters",
        para(e.why),
        "",
        "Fix",
        para(e.fix),
        "",
        "Lightning",
        textwrap.indent(e.lightning, "    "),
        "",
        "Keras",
        textwrap.indent(e.keras, "    "),
    ]) + "\n"


def _explain_markdown(e: Entry) -> str:
    return "\n".join([
        f"## `{e.code}`: {e.title}", "", f"Default severity: **{e.severity}**", "",
        f"**What it means.** {e.meaning}", "", f"**Why it matters.** {e.why}", "", f"**Fix.** {e.fix}", "",
        "Lightning:", "", "```python", e.lightning, "```", "", "Keras:", "", "```python", e.keras, "```",
    ]) + "\n"


def _cmd_explain(args: argparse.Namespace) -> int:
    if args.code is None:
        width = max(len(c) for c in CODES)
        lines = [f"{c:<{width}}  {CATALOGUE[c].severity:<8}  {CATALOGUE[c].title}" for c in CODES]
        sys.stdout.write("\n".join(lines) + f"\n\nDetails: {PROG} explain CODE\n")
        return EXIT_OK
    e = _lookup(args.code)
    if args.format == "markdown":
        sys.stdout.write(_explain_markdown(e))
    else:
        width = min(100, max(40, _terminal_width() - 2))
        sys.stdout.write(_explain_text(e, width))
    return EXIT_OK


def _terminal_width() -> int:
    try:
        return os.get_terminal_size(sys.stdout.fileno()).columns if sys.stdout.isatty() else 100
    except (OSError, ValueError, AttributeError):
        return 100


# ---------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from boundguard import __version__

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Read what boundguard recorded during training: a report of the alerts, a plot of the "
                    "statistics, and the catalogue entry of an alert code.",
        epilog="Exit status: 0 ok, 1 alerts at or above --fail-on, 2 usage or input error.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("report", help="a table of a run's alerts, grouped by code",
                       description="A table of each run's alerts grouped by code: severity, count, first and "
                                   "last step, worst value against its threshold, message and fix.")
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="an alerts file (alerts.jsonl) or a run directory, searched recursively; several allowed")
    p.add_argument("--format", choices=("text", "markdown", "json", "html"), default="text",
                   help="output format (text); html: one self-contained page with the facts, alerts and plots")
    p.add_argument("-o", "--output", default=None, metavar="FILE",
                   help="write the report to FILE instead of standard output")
    p.add_argument("--fail-on", choices=SEVERITIES, default=None, metavar="SEVERITY",
                   help="exit with status 1 when an alert at or above SEVERITY exists "
                        f"({' | '.join(SEVERITIES)})")
    p.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                   help="text format: a coloured table (needs rich) on a terminal (auto), always, or never")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("plot", help="a PNG of a run's statistics log with its alerts marked",
                       description="One PNG from the statistics log beside the alerts file: predictions' "
                                   "min/max against the bounds, share out of bounds, pre-activation magnitude, "
                                   "loss, and the alerts at their steps. Needs matplotlib "
                                   "(pip install 'boundguard[plot]').")
    p.add_argument("path", metavar="PATH", help="an alerts file, a statistics log, or a run directory")
    p.add_argument("-o", "--output", default="boundguard.png", help="the PNG to write (boundguard.png)")
    p.add_argument("--size", type=_parse_size, default=(1100, 900), metavar="WxH",
                   help="image size in pixels (1100x900)")
    p.add_argument("--dpi", type=int, default=100, help="resolution; text scales with it (100)")
    p.add_argument("--title", default=None, help="the figure's title (the run's path)")
    p.set_defaults(func=_cmd_plot)

    p = sub.add_parser("explain", help="what an alert code means, why it matters, and the fix",
                       description="The catalogue entry of an alert code: what it means, why it matters, the "
                                   "fix, and a Lightning and a Keras snippet. Without CODE, list the codes.")
    p.add_argument("code", nargs="?", metavar="CODE", help="an alert code such as output_out_of_range")
    p.add_argument("--format", choices=("text", "markdown"), default="text", help="output format (text)")
    p.set_defaults(func=_cmd_explain)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``boundguard`` console script and of ``python -m boundguard``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_ERROR
    if getattr(args, "dpi", 100) is not None and not 20 <= getattr(args, "dpi", 100) <= 1000:
        parser.error(f"--dpi must be between 20 and 1000, got {args.dpi}")
    try:
        return args.func(args)
    except (_Usage, MissingDependency, ReportError) as err:
        _err(str(err))
        return EXIT_ERROR
    except BrokenPipeError:  # e.g. `boundguard report ... | head`
        _silence(sys.stdout)
        return EXIT_OK
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # never a traceback for the user; BOUNDGUARD_DEBUG=1 shows it
        if os.environ.get("BOUNDGUARD_DEBUG"):
            raise
        _err(f"internal error: {type(err).__name__}: {err} (set BOUNDGUARD_DEBUG=1 for the traceback, "
             f"and please report it)")
        return EXIT_ERROR


def _silence(stream: TextIO) -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    raise SystemExit(main())
