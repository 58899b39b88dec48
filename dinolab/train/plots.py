"""The picture of a run: one panel per loss term (ln K drawn on DINO and iBOT), and k-NN top-1 when evaluated.

Drawn on a ``matplotlib.figure.Figure`` with the Agg canvas: no pyplot, no ``matplotlib.use()``, so
plotting from library code leaves the caller's backend alone. Short series (<= ``MARKERS_UP_TO``
points) get markers, so a run of one record still shows a point; no records at all gives a figure
that says so.
"""

from __future__ import annotations

import math
from pathlib import Path

LOSS_TERMS = ("dino", "ibot", "koleo", "total")
MARKERS_UP_TO = 20
_COLORS = {"dino": "tab:blue", "ibot": "tab:orange", "koleo": "tab:purple", "total": "tab:gray"}
_TITLES = {"dino": "DINO (class token)", "ibot": "iBOT (masked patches)", "koleo": "KoLeo", "total": "total"}


def _series(records: list[dict], key: str) -> list[tuple[float, float]]:
    return [(r["iteration"], float(r[key])) for r in records
            if isinstance(r.get(key), (int, float)) and math.isfinite(float(r[key]))]


def _draw(ax, pts, color: str, label: str | None = None) -> None:
    xs, ys = zip(*pts)
    ax.plot(xs, ys, color=color, label=label, marker="o" if len(pts) <= MARKERS_UP_TO else None, markersize=4)


def plot_run(records: list[dict], path: str | Path, cfg=None) -> None:
    """``metrics.jsonl`` records -> a PNG, one panel per logged term (+ k-NN top-1).

    ``cfg`` (the run's ``Config``), when given, adds the uniform-student level (``ln K``, see
    ``dinolab.train.health``) as a dashed line on the DINO and iBOT panels.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from dinolab.utils.io import atomic_path

    levels = {}
    if cfg is not None:
        from dinolab.train.health import uniform_levels

        levels = uniform_levels(cfg)
    panels = [(t, pts) for t in LOSS_TERMS if (pts := _series(records, t))]
    knn = _series(records, "knn_top1")
    if knn:
        panels.append(("knn_top1", knn))

    if not panels:
        fig = Figure(figsize=(6, 3))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, "no records yet", ha="center", va="center", fontsize=14, transform=ax.transAxes)
        ax.set_axis_off()
    else:
        ncols = min(len(panels), 3)
        nrows = math.ceil(len(panels) / ncols)
        fig = Figure(figsize=(4.2 * ncols, 3.3 * nrows))
        FigureCanvasAgg(fig)
        axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
        for ax, (key, pts) in zip(axes, panels):
            if key == "knn_top1":
                _draw(ax, pts, "tab:green")
                ax.set(xlabel="iteration", ylabel="k-NN top-1 (%)", title="teacher k-NN accuracy (held-out)")
            else:
                _draw(ax, pts, _COLORS[key], label=key)
                ax.set(xlabel="iteration", ylabel="loss", title=_TITLES[key])
                if key in levels:
                    lv = levels[key]
                    ax.axhline(lv["level"], color="black", linestyle="--", linewidth=1,
                               label=f"uniform student: ln {lv['K']}" + ("" if lv["level"] == lv["ln_k"] else " (scaled)")
                               + f" = {lv['level']:.3f}")
                    ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
        for ax in axes[len(panels):]:
            ax.set_axis_off()
        fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
