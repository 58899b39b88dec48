"""Patch matching between two images (DINOv2 paper Fig. 10, §7.5).

Foreground patches of both images (first-PCA-component threshold, :mod:`dinolab.viz.pca`) are
compared by Euclidean distance; a one-to-one assignment minimising the total distance
(Hungarian algorithm, ``scipy.optimize.linear_sum_assignment``) pairs them; a greedy
non-maximum suppression then keeps the most salient pairs (smallest distance first), dropping a
pair when either end lies within ``nms_radius`` patches of an end of a pair already kept, so the
drawn lines spread over the object instead of piling up on one part.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dinolab.viz.figure import panel_figure, save_png, set_title
from dinolab.viz.patches import PatchFeatures, patch_features
from dinolab.viz.pca import PCAConfig, foreground_masks

GAP_PIXELS = 16  # white strip between the two images


@dataclass(frozen=True)
class MatchConfig:
    """Defaults of the matching figure.

    Attributes:
        size: shorter image side in pixels before cropping to the patch grid.
        max_matches: at most this many pairs survive the suppression.
        nms_radius: suppression radius in patches (Chebyshev distance on the grid); 0 disables it.
        foreground: the first-component rule choosing the patches to match (per image).
    """

    size: int = 448
    max_matches: int = 40
    nms_radius: int = 2
    foreground: PCAConfig = field(default_factory=PCAConfig)

    def __post_init__(self) -> None:
        if self.max_matches < 1:
            raise ValueError(f"max_matches must be at least 1, got {self.max_matches}")
        if self.nms_radius < 0:
            raise ValueError(f"nms_radius must be >= 0, got {self.nms_radius}")


@dataclass
class Matches:
    """Patch pairs, sorted by increasing feature distance.

    Attributes:
        src: int [M, 2] (row, col) on image A's patch grid.
        dst: int [M, 2] (row, col) on image B's patch grid.
        distance: float [M] Euclidean feature distance of each pair.
    """

    src: np.ndarray
    dst: np.ndarray
    distance: np.ndarray

    def __len__(self) -> int:
        return len(self.distance)

    def take(self, index: np.ndarray | list[int]) -> Matches:
        index = np.asarray(index, dtype=np.int64)
        return Matches(self.src[index], self.dst[index], self.distance[index])


def match_patches(
    grid_a: torch.Tensor, grid_b: torch.Tensor, mask_a: np.ndarray | None = None, mask_b: np.ndarray | None = None
) -> Matches:
    """One-to-one assignment of the foreground patches of A to those of B, minimising total distance.

    Args:
        grid_a: [ha, wa, D] patch features of image A.
        grid_b: [hb, wb, D] patch features of image B.
        mask_a, mask_b: bool [h, w] patches to match (all when None).

    Returns:
        ``min(|A|, |B|)`` pairs sorted by distance.
    """
    from scipy.optimize import linear_sum_assignment  # here, not at import: keeps `dinolab --help` fast

    mask_a = np.ones(grid_a.shape[:2], bool) if mask_a is None else mask_a
    mask_b = np.ones(grid_b.shape[:2], bool) if mask_b is None else mask_b
    pos_a, pos_b = np.argwhere(mask_a), np.argwhere(mask_b)  # [Na, 2], [Nb, 2] row-major
    feats_a = grid_a[torch.from_numpy(mask_a)].double()
    feats_b = grid_b[torch.from_numpy(mask_b)].double()
    dist = torch.cdist(feats_a, feats_b).numpy()  # [Na, Nb]
    rows, cols = linear_sum_assignment(dist)
    order = np.argsort(dist[rows, cols], kind="stable")
    rows, cols = rows[order], cols[order]
    return Matches(pos_a[rows], pos_b[cols], dist[rows, cols])


def suppress_non_maxima(matches: Matches, radius: int, max_matches: int) -> Matches:
    """Greedy NMS over pairs sorted by distance: keep a pair only if both of its ends are farther than
    ``radius`` patches (Chebyshev) from the corresponding ends of every pair kept before it.
    """
    kept: list[int] = []
    for i in range(len(matches)):
        if len(kept) == max_matches:
            break
        if kept and radius > 0:
            near_src = np.abs(matches.src[kept] - matches.src[i]).max(1) <= radius
            near_dst = np.abs(matches.dst[kept] - matches.dst[i]).max(1) <= radius
            if (near_src | near_dst).any():
                continue
        kept.append(i)
    return matches.take(kept)


def match_features(a: PatchFeatures, b: PatchFeatures, cfg: MatchConfig = MatchConfig()) -> Matches:
    """Foreground masks (each image on its own), Hungarian matching, then NMS."""
    mask_a, mask_b = foreground_masks([a.patches, b.patches], cfg.foreground)
    if not mask_a.any() or not mask_b.any():
        raise ValueError("an image has no foreground patch to match; lower the threshold or use --no-foreground")
    return suppress_non_maxima(match_patches(a.patches, b.patches, mask_a, mask_b), cfg.nms_radius, cfg.max_matches)


def match_images(
    model: torch.nn.Module, image_a: Image.Image | str | Path, image_b: Image.Image | str | Path,
    cfg: MatchConfig = MatchConfig(),
) -> tuple[PatchFeatures, PatchFeatures, Matches]:
    """Features of both images and their salient matches."""
    a, b = patch_features(model, image_a, cfg.size), patch_features(model, image_b, cfg.size)
    return a, b, match_features(a, b, cfg)


def side_by_side(image_a: Image.Image, image_b: Image.Image, gap: int = GAP_PIXELS) -> Image.Image:
    """Both images on one white canvas, A on the left, tops aligned."""
    canvas = Image.new("RGB", (image_a.width + gap + image_b.width, max(image_a.height, image_b.height)), "white")
    canvas.paste(image_a, (0, 0))
    canvas.paste(image_b, (image_a.width + gap, 0))
    return canvas


def save_match_figure(
    image_a: Image.Image, image_b: Image.Image, matches: Matches, patch_size: int, out: str | Path,
    names: tuple[str, str] = ("A", "B"),
) -> Path:
    """PNG of both images side by side with a line between the centres of each matched patch pair."""
    from matplotlib import colormaps

    canvas = side_by_side(image_a, image_b)
    fig, axes = panel_figure(1, 1, canvas.width, canvas.height)
    ax = axes[0, 0]
    ax.imshow(canvas)
    centre = (np.asarray([0.5, 0.5]) * patch_size).astype(np.float64)
    xy_a = matches.src[:, ::-1] * patch_size + centre  # (row, col) -> (x, y)
    xy_b = matches.dst[:, ::-1] * patch_size + centre + [image_a.width + GAP_PIXELS, 0]
    cmap = colormaps["hsv"]
    for i, (pa, pb) in enumerate(zip(xy_a, xy_b)):
        colour = cmap(i / max(len(matches), 1))
        ax.plot([pa[0], pb[0]], [pa[1], pb[1]], "-", color=colour, linewidth=1.0)
        ax.plot([pa[0], pb[0]], [pa[1], pb[1]], "o", color=colour, markersize=3)
    ax.set_xlim(0, canvas.width)
    ax.set_ylim(canvas.height, 0)
    set_title(ax, f"{names[0]}  <->  {names[1]}: {len(matches)} matches")
    return save_png(fig, out)
