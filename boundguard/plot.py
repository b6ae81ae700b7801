"""``boundguard plot``: one PNG of a run's statistics log, with its alerts marked at their steps.

Four panels share the step axis: the predictions' min/max band against the bounds, the share of
predictions out of bounds (and pinned at a bound), the pre-activation magnitude and the loss.
matplotlib is imported inside :func:`plot_run` only, so importing this module costs nothing and
``boundguard report`` works without it.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import numpy as np

from boundguard.alerts import SEVERITIES, severity_rank
from boundguard.fmt import number
from boundguard.report import MissingDependency, PathLike, ReportError, RunReport, StatsLog
from boundguard.sinks import stats_path_for

__all__ = ["plot_run"]

_SEVERITY_COLOURS = {"info": "#5b7fa6", "warning": "#e08e0b", "error": "#d62728", "critical": "#7b1fa2"}
_STEP_KW = dict(drawstyle="steps-pre")

#: ``(step, codes joined by newlines, severity)`` of one alert line.
_Label = tuple[int, str, str]


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

    s = run.stats
    if s is None:
        raise ReportError(f"{run.name}: no statistics log beside it (expected {stats_path_for(run.files.alerts)})")
    if not s.checks:
        raise ReportError(f"{s.path}: the statistics log holds no check to plot")

    fig, axes = plt.subplots(4, 1, figsize=size, dpi=dpi, sharex=True,
                             gridspec_kw={"height_ratios": [1.7, 0.8, 1.0, 1.0]})
    ax_pred, ax_share, ax_pre, ax_loss = axes
    _draw_predictions(ax_pred, s)
    _draw_share(ax_share, s)
    _draw_preactivation(ax_pre, s)
    _draw_loss(ax_loss, s)
    events = _alert_events(run)
    labels, handles = _draw_alert_lines(axes, events)
    _legends(axes, ax_pred, handles)
    xs = np.r_[s.steps[np.isfinite(s.steps)], np.array(list(events), dtype=float)]
    if xs.size:
        lo_x, hi_x = xs.min(), xs.max()
        ax_loss.set_xlim(max(0.0, lo_x - 1), hi_x + max(1.0, 0.02 * (hi_x - lo_x)))
    fig.suptitle(_suptitle(run, title), fontsize=11)
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


# ---------------------------------------------------------------------------------------- the four panels
def _draw_predictions(ax: Any, s: StatsLog) -> None:
    """Panel 1: the predictions' min-max band against the bounds, the region outside them shaded."""
    x = s.steps
    pmin, pmax = s.col("pred.min"), s.col("pred.max")
    if np.isfinite(pmin).any() or np.isfinite(pmax).any():
        ax.fill_between(x, pmin, pmax, step="pre", color="#1f77b4", alpha=0.25, label="predictions min-max")
        ax.plot(x, pmax, color="#1f77b4", lw=1.2, **_STEP_KW)
        ax.plot(x, pmin, color="#1f77b4", lw=1.2, **_STEP_KW)
    else:
        ax.text(0.5, 0.5, "no predictions recorded", transform=ax.transAxes, ha="center", color="grey")
    lo = np.array([_bound(b, "lo") for b in s.bounds])
    hi = np.array([_bound(b, "hi") for b in s.bounds])
    if np.isfinite(lo).any() or np.isfinite(hi).any():
        inferred = any(b and b.get("inferred") for b in s.bounds)
        label = "bounds (inferred)" if inferred else "bounds"
        ax.plot(x, lo, color="black", ls="--", lw=1.2, label=label, **_STEP_KW)
        ax.plot(x, hi, color="black", ls="--", lw=1.2, **_STEP_KW)
        y0, y1 = ax.get_ylim()
        pad = 0.05 * (y1 - y0)
        y0, y1 = y0 - pad, y1 + pad
        shade = dict(step="pre", color="#d62728", alpha=0.07, lw=0)
        ax.fill_between(x, np.where(np.isfinite(hi), hi, y1), y1, label="region outside the bounds", **shade)
        ax.fill_between(x, y0, np.where(np.isfinite(lo), lo, y0), **shade)
        ax.set_ylim(y0, y1)
    _mark_nonfinite(ax, x, s.col("pred.nonfinite"), "non-finite predictions")
    ax.set_ylabel("prediction")
    ax.set_title("Predictions against the bounds", loc="left", fontsize=10)


def _draw_share(ax: Any, s: StatsLog) -> None:
    """Panel 2: the share of predictions out of bounds (and pinned at a bound), in percent."""
    x = s.steps
    n = s.col("pred.n")
    with np.errstate(invalid="ignore", divide="ignore"):
        out_share = 100 * (np.nan_to_num(s.col("pred.below")) + np.nan_to_num(s.col("pred.above"))) / n
        pinned = 100 * s.col("pred.pinned") / n
    out_share[~(n > 0)] = np.nan
    ax.plot(x, out_share, color="#d62728", lw=1.5, marker="o", ms=3, label="share outside the bounds", **_STEP_KW)
    if np.nan_to_num(pinned).any():
        ax.plot(x, pinned, color="#8c564b", lw=1.2, ls=":", label="pinned at a bound", **_STEP_KW)
    if not np.nan_to_num(out_share).any():
        note = ("no predictions recorded" if not (n > 0).any() else
                "no bounds in force (range checks off)" if not any(s.bounds) else "no prediction outside the bounds")
        ax.text(0.5, 0.5, note, transform=ax.transAxes, ha="center", va="center", color="grey")
    ax.set_ylabel("% of predictions")
    top = np.nanmax(np.r_[out_share, pinned, 1.0]) if np.isfinite(np.r_[out_share, pinned]).any() else 1.0
    ax.set_ylim(0, max(1.0, min(100.0, top * 1.15)))
    ax.set_title("Share of predictions out of bounds", loc="left", fontsize=10)


def _draw_preactivation(ax: Any, s: StatsLog) -> None:
    """Panel 3: the pre-activation's max |z| and RMS, and the inputs' RMS (log scale)."""
    x = s.steps
    absmax = np.fmax(np.abs(s.col("pre.min")), np.abs(s.col("pre.max")))
    rms, in_rms = s.rms("pre"), s.rms("input")
    plotted = False
    for series, kw in ((absmax, dict(color="#9467bd", lw=1.5, label="pre-activation max |z|")),
                       (rms, dict(color="#9467bd", lw=1.0, ls="--", label="pre-activation RMS")),
                       (in_rms, dict(color="grey", lw=1.0, ls=":", label="input RMS"))):
        if (np.isfinite(series) & (series > 0)).any():
            ax.plot(x, np.where(series > 0, series, np.nan), **kw, **_STEP_KW)
            plotted = True
    if plotted:
        ax.set_yscale("log")
        _plain_log_ticks(ax)
    else:
        ax.text(0.5, 0.5, "no pre-activations recorded", transform=ax.transAxes, ha="center", color="grey")
    _mark_nonfinite(ax, x, s.col("pre.nonfinite"), "non-finite pre-activations")
    ax.set_ylabel("magnitude")
    ax.set_title("Pre-activation magnitude", loc="left", fontsize=10)


def _draw_loss(ax: Any, s: StatsLog) -> None:
    """Panel 4: the loss per check, its mean and min-max (log scale where it spans decades)."""
    x = s.steps
    mean, lmin, lmax = s.col("loss.mean"), s.col("loss.min"), s.col("loss.max")
    if np.isfinite(mean).any():
        ax.fill_between(x, lmin, lmax, step="pre", color="#2ca02c", alpha=0.2, label="loss min-max per check")
        ax.plot(x, mean, color="#2ca02c", lw=1.5, label="loss mean per check", **_STEP_KW)
        vals = np.r_[lmin, lmax, mean]
        vals = vals[np.isfinite(vals)]
        if vals.size and vals.min() > 0 and vals.max() / vals.min() >= 10:
            ax.set_yscale("log")
            _plain_log_ticks(ax)
    else:
        ax.text(0.5, 0.5, "no loss recorded", transform=ax.transAxes, ha="center", color="grey")
    _mark_nonfinite(ax, x, s.col("loss.nonfinite"), "non-finite loss")
    ax.set_ylabel("loss")
    ax.set_xlabel("training step")
    ax.set_title("Loss", loc="left", fontsize=10)


# ---------------------------------------------------------------------------------------- alerts and layout
def _alert_events(run: RunReport) -> dict[int, list[tuple[str, str, bool]]]:
    """``{step: [(code, severity, escalated), ...]}`` of every new or escalated alert of the run."""
    events: dict[int, list[tuple[str, str, bool]]] = {}
    for g in run.groups:
        for i, (step, sev) in enumerate(g.events):
            escalated = i > 0 and severity_rank(sev) > severity_rank(g.events[i - 1][1])
            events.setdefault(step, []).append((g.code, sev, escalated))
    return events


def _draw_alert_lines(axes: Any, events: dict[int, list[tuple[str, str, bool]]]) -> tuple[list[_Label], list]:
    """A vertical line per alert step on every panel, coloured by the step's highest severity.
    Returns the labels to write up the lines and a legend handle per severity drawn."""
    from matplotlib.lines import Line2D

    severities = set()
    labels: list[_Label] = []
    for step, items in sorted(events.items()):
        sev = max((v for _, v, _ in items), key=severity_rank)
        severities.add(sev)
        for ax in axes:
            ax.axvline(step, color=_SEVERITY_COLOURS[sev], lw=1.0, alpha=0.8, zorder=0)
        labels.append((step, "\n".join(sorted({c + (f" \u2192 {v}" if esc else "") for c, v, esc in items})), sev))
    handles = [Line2D([], [], color=_SEVERITY_COLOURS[v], lw=1.0, label=f"{v} alert")
               for v in SEVERITIES if v in severities]
    return labels, handles


def _legends(axes: Any, ax_pred: Any, handles: list) -> None:
    """A grid on every panel and its legend right of it (the alert severities on the first)."""
    for ax in axes:
        ax.grid(True, alpha=0.3)
        h, _ = ax.get_legend_handles_labels()
        extra = handles if ax is ax_pred else []
        if h or extra:
            ax.legend(handles=h + extra, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8,
                      frameon=False, borderaxespad=0.0)


def _suptitle(run: RunReport, title: Optional[str]) -> str:
    n_alerts = len(run.groups)
    head = title or f"boundguard: {run.name}"
    sub = (f"{n_alerts} alert code{'s' if n_alerts != 1 else ''}, highest severity {run.severity}"
           if n_alerts else "no alerts") + f"; {run.stats_summary()}"
    return f"{head}\n{sub}"


def _label_alerts(ax: Any, labels: list[_Label], dpi: float) -> None:
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


# ---------------------------------------------------------------------------------------- small helpers
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
    """The bound ``name`` ("lo" or "hi") of a statistics record's bounds, NaN when absent or unreadable.

    >>> _bound({"lo": 0, "hi": "inf"}, "hi"), _bound(None, "lo"), _bound({"lo": "x"}, "lo")
    (inf, nan, nan)
    """
    try:
        v = number(b.get(name)) if b else None
    except ValueError:
        v = None
    return np.nan if v is None else v


def _mark_nonfinite(ax: Any, x: np.ndarray, counts: np.ndarray, label: str) -> None:
    """A purple cross at the top of the panel at each check that saw a non-finite value."""
    bad = np.nan_to_num(counts) > 0
    if bad.any():
        ax.plot(x[bad], np.full(bad.sum(), 0.97), transform=ax.get_xaxis_transform(), ls="none", marker="x",
                color="#7b1fa2", ms=7, mew=2, label=label)
