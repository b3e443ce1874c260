"""PNG figures: panels of labelled lines (optionally with their Pareto front) and panels of bars.

Figures are built with matplotlib's object API (``Figure``, rendered by Agg), so nothing here
touches pyplot's global state or needs a display. A series is ``label -> (xs, ys)``; a label
keeps its colour across all panels of a figure.
"""
from __future__ import annotations

import math
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatter, MaxNLocator

from switchsae.analysis.geometry import pareto_front

Series = dict[str, tuple[list[float], list[float]]]
PANEL_SIZE = (4.8, 3.6)


def _figure(n_panels: int) -> tuple[Figure, list]:
    """A figure with ``n_panels`` axes on a grid of at most three columns (unused cells hidden)."""
    cols = min(3, n_panels)
    rows = math.ceil(n_panels / cols)
    fig = Figure(figsize=(PANEL_SIZE[0] * cols, PANEL_SIZE[1] * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _draw_front(ax, series: Series) -> None:
    """The lower-left Pareto front of all points in the panel, as a dashed black step line."""
    points = [(x, y) for xs, ys in series.values() for x, y in zip(xs, ys)]
    front = [points[i] for i in pareto_front(points)]
    ax.plot([p[0] for p in front], [p[1] for p in front], "k--", drawstyle="steps-post", lw=1, zorder=0,
            label="Pareto front")
    ax.scatter([p[0] for p in front], [p[1] for p in front], s=90, facecolors="none", edgecolors="k", zorder=3)


def _plain_log_axis(ax, which: str) -> None:
    """Log scale on axis ``which`` ("x" or "y"), ticks written as plain numbers (``20``, not ``2 x 10^1``)."""
    getattr(ax, f"set_{which}scale")("log")
    axis = getattr(ax, f"{which}axis")
    axis.set_major_formatter(LogFormatter())
    axis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))


def line_panels(panels: dict[str, Series], path: str | Path, *, xlabel: str, ylabel: str = "",
                logx: bool = False, logy: bool = False, mark_front: bool = False) -> Path:
    """One panel per entry of ``panels`` (title -> series), lines sorted by ``x``; saved as PNG."""
    labels = list(dict.fromkeys(label for series in panels.values() for label in series))
    colours = {label: f"C{i % 10}" for i, label in enumerate(labels)}
    fig, axes = _figure(len(panels))
    for ax, (title, series) in zip(axes, panels.items()):
        for label, (xs, ys) in series.items():
            pairs = sorted(zip(xs, ys))
            marker = "o" if len(pairs) < 30 else None
            ax.plot([p[0] for p in pairs], [p[1] for p in pairs], marker=marker, ms=4, color=colours[label],
                    label=label)
        if mark_front:
            _draw_front(ax, series)
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
        for which, log in (("x", logx), ("y", logy)):
            if log:
                _plain_log_axis(ax, which)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def bar_panels(bars: dict[str, list[float]], path: str | Path, *, xlabel: str, ylabel: str,
               mean_line: bool = False) -> Path:
    """One bar chart per entry (title -> heights at 0, 1, ...); ``mean_line`` marks the mean height
    (for load fractions, the perfectly balanced 1/N)."""
    fig, axes = _figure(len(bars))
    for ax, (title, heights) in zip(axes, bars.items()):
        ax.bar(range(len(heights)), heights, color="C0")
        if mean_line:
            ax.axhline(sum(heights) / len(heights), color="k", ls="--", lw=1)
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return _save(fig, path)
