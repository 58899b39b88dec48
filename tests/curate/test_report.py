from __future__ import annotations

import json

import numpy as np
from PIL import Image

from dinolab.curate.report import ReportConfig, largest_components, write_report


def test_largest_components_by_hand():
    rows, labels = np.array([0, 1, 2, 4, 5]), np.array([0, 1, 0, 1, 0])  # {0, 2, 5}, {1, 4}; 3 and 6 alone
    groups = largest_components(rows, labels, how_many=3, per_row=2)
    assert [g.tolist() for g in groups] == [[0, 2], [1, 4]]  # singletons are not duplicates


def test_report_files_and_grid_sizes(tmp_path):
    paths = []
    for i in range(6):
        p = tmp_path / f"{i}.png"
        Image.new("RGB", (20, 20), (40 * i, 0, 0)).save(p)
        paths.append(str(p))
    components = (np.arange(5), np.array([0, 0, 0, 3, 3]))  # row 5 is alone
    cluster_groups = [np.array([1, 0]), np.array([5, 4, 3, 2])]  # closest first
    cfg = ReportConfig(grid_rows=4, grid_cols=5, thumb=16)
    written = write_report(
        tmp_path / "report", {"pool": 6}, np.array([0.9, 0.9, 0.8, 0.7, 0.7, -np.inf]), {"dedup": 0.6},
        paths_of=lambda r: [paths[i] for i in r], components=components, cluster_groups=cluster_groups, cfg=cfg,
    )
    assert set(written) == {"counts", "histogram", "duplicates", "clusters"}
    assert json.loads((tmp_path / "report" / "report.json").read_text()) == {"pool": 6}
    # Duplicates: components {0,1,2} and {3,4} -> 2 rows, 3 columns of 16 px thumbnails.
    assert Image.open(tmp_path / "report" / "duplicates.png").size == (3 * 16, 2 * 16)
    # Clusters: 2 clusters (of sizes 2 and 4) -> 2 rows, 4 columns.
    assert Image.open(tmp_path / "report" / "clusters.png").size == (4 * 16, 2 * 16)
    # Without paths only the numbers and the histogram are written.
    assert set(write_report(tmp_path / "r2", {}, np.array([0.5]), {}, paths_of=None)) == {"counts", "histogram"}
