"""What a curation run did: counts per stage, a similarity histogram, and picture grids.

Files written to ``<out>/report/``:

* ``report.json`` -- images in and out of every stage;
* ``nn_similarity.png`` -- histogram of each pool image's similarity to its nearest other pool
  image, with the deduplication thresholds marked (where the cut falls relative to the bulk);
* ``duplicates.png`` -- the largest duplicate components, one per row (when the pool has paths);
* ``clusters.png`` -- members of some clusters, closest to the centroid first (when paths exist).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from dinolab.data.images import try_load_rgb
from dinolab.utils.io import atomic_path, atomic_write_json


@dataclass
class ReportConfig:
    """Report settings.

    Attributes:
        bins: histogram bins.
        grid_rows: components / clusters shown.
        grid_cols: images per row.
        thumb: thumbnail size in pixels.
        seed: which clusters are shown (random choice).
    """

    bins: int = 100
    grid_rows: int = 8
    grid_cols: int = 8
    thumb: int = 96
    seed: int = 0


def save_histogram(
    path: Path, nn_sim: np.ndarray, thresholds: dict[str, float], bins: int = 100
) -> None:
    """Histogram PNG of nearest-neighbour similarities [N], with vertical lines at ``thresholds``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # not pyplot: no global backend switch, no figure registry

    values = nn_sim[np.isfinite(nn_sim)]
    fig = Figure(figsize=(6, 3.5))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.hist(values, bins=bins, range=(min(-0.1, float(values.min(initial=0))), 1.0), color="0.4")
    for i, (name, value) in enumerate(thresholds.items()):
        ax.axvline(value, color=f"C{i}", linestyle="--", label=f"{name} {value:g}")
    ax.set_xlabel("cosine similarity to the nearest other pool image")
    ax.set_ylabel("images")
    ax.set_yscale("log")
    if thresholds:
        ax.legend(loc="upper left")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def save_grid(path: Path, rows_of_paths: list[list[str]], thumb: int = 96) -> bool:
    """A PNG grid: one row per list of image paths (unreadable images left grey). False if empty."""
    rows_of_paths = [r for r in rows_of_paths if r]
    if not rows_of_paths:
        return False
    cols = max(len(r) for r in rows_of_paths)
    canvas = Image.new("RGB", (cols * thumb, len(rows_of_paths) * thumb), (128, 128, 128))
    for i, paths in enumerate(rows_of_paths):
        for j, p in enumerate(paths):
            image = try_load_rgb(p)
            if image is not None:
                canvas.paste(ImageOps.contain(image, (thumb, thumb)), (j * thumb, i * thumb))
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
    return True


def largest_components(rows: np.ndarray, labels: np.ndarray, how_many: int, per_row: int) -> list[np.ndarray]:
    """Rows of the ``how_many`` largest components with more than one member (at most ``per_row`` each).

    Args:
        rows: [M] sorted pool rows in components (others are singletons and never shown).
        labels: [M] component label of each (lowest row); ties in size: lowest label first.
    """
    names, sizes = np.unique(labels, return_counts=True)
    biggest = [names[i] for i in np.argsort(-sizes, kind="stable")[:how_many] if sizes[i] > 1]
    return [rows[labels == c][:per_row] for c in biggest]


def write_report(
    folder: str | Path,
    counts: dict[str, Any],
    nn_sim: np.ndarray | None,
    thresholds: dict[str, float],
    paths_of: Any | None = None,
    components: tuple[np.ndarray, np.ndarray] | None = None,
    cluster_groups: list[np.ndarray] | None = None,
    cfg: ReportConfig | None = None,
) -> dict[str, str]:
    """Write the report files.

    Args:
        folder: report folder.
        counts: JSON-serialisable counts per stage.
        nn_sim: [N] nearest-neighbour similarity per pool row (None: no histogram).
        thresholds: named thresholds drawn on the histogram.
        paths_of: callable rows -> list of paths or None (no picture grids without paths).
        components: (rows [M], labels [M]) self-dedup components of the rows that have duplicates
            (for the duplicate grid).
        cluster_groups: pool rows of some clusters, closest to the centroid first, one list per grid row
            (:func:`dinolab.curate.cluster.example_rows`).

    Returns:
        Names of the files written, by kind.
    """
    cfg = cfg or ReportConfig()
    folder = Path(folder)
    written = {"counts": "report.json"}
    atomic_write_json(folder / "report.json", counts)
    if nn_sim is not None and len(nn_sim):
        save_histogram(folder / "nn_similarity.png", nn_sim, thresholds, cfg.bins)
        written["histogram"] = "nn_similarity.png"
    if paths_of is None:
        return written
    if components is not None:
        groups = largest_components(*components, cfg.grid_rows, cfg.grid_cols)
        if groups and paths_of(groups[0]) is not None:
            if save_grid(folder / "duplicates.png", [paths_of(g) for g in groups], cfg.thumb):
                written["duplicates"] = "duplicates.png"
    if cluster_groups:
        grid = [paths_of(g) for g in cluster_groups]
        if grid[0] is not None and save_grid(folder / "clusters.png", grid, cfg.thumb):
            written["clusters"] = "clusters.png"
    return written
