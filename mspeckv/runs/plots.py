"""What every plot of a bench or an eval shares: matplotlib imported lazily (the optional extra ``plot``; pyplot is
never used, so no display is needed) and a figure written atomically."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

INSTALL_HINT = "pip install 'mspeckv[plot]'  (or: pip install 'matplotlib>=3.7')"


class PlotDependencyError(ImportError):
    """matplotlib is not installed."""


def figure_cls() -> Any:
    """matplotlib's ``Figure`` class, or one PlotDependencyError that says how to install it."""
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise PlotDependencyError(f"plots need matplotlib, which is not installed: {INSTALL_HINT}") from e
    return Figure


def label(ax: Any, xlabel: str, ylabel: str, title: str | None = None, legend: int | None = None) -> None:
    """Axis labels, the title if any, and a legend (of ``legend`` points; None: the default size) when something is
    labelled."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=legend)


def save(fig: Any, path: str | os.PathLike) -> Path:
    """Lay out and write a figure atomically (temp file + rename), readable by all like any tool's output."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
    return path
