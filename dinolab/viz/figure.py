"""Matplotlib figures without pyplot: no global state, safe in a server thread, written atomically."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dinolab.utils.io import atomic_path

if TYPE_CHECKING:  # matplotlib is imported when a figure is drawn, so that `dinolab --help` stays fast
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

DPI = 100
TITLE_INCHES = 0.3  # room above each panel for a one-line title
LINE_INCHES = 0.14  # each further title line


def panel_figure(
    rows: int, cols: int, panel_w: int, panel_h: int, title_lines: int = 1
) -> tuple[Figure, np.ndarray]:
    """A figure of ``rows x cols`` image panels, each ``panel_w x panel_h`` pixels below its title.

    Returns:
        the figure and an object array of axes [rows, cols], ticks and frames off.
    """
    from matplotlib.figure import Figure

    w_in, h_in = panel_w / DPI, panel_h / DPI + TITLE_INCHES + LINE_INCHES * (title_lines - 1)
    fig = Figure(figsize=(cols * w_in, rows * h_in), dpi=DPI)
    axes = np.empty((rows, cols), dtype=object)
    for r in range(rows):
        for c in range(cols):
            # Placed by hand (figure fractions) so panels keep the image's pixel size: no tight_layout guesswork.
            left, bottom = c / cols, 1.0 - (r + 1) / rows
            ax = fig.add_axes((left, bottom, 1.0 / cols, (panel_h / DPI) / (rows * h_in)))
            ax.set_axis_off()
            axes[r, c] = ax
    return fig, axes


def set_title(ax: Axes, text: str) -> None:
    """A small one-line title above a panel."""
    ax.set_title(text, fontsize=8, pad=3)


def save_png(fig: Figure, out: str | Path) -> Path:
    """Write the figure as a PNG atomically; returns the path written."""
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return out
