"""PCA maps of patch features (DINOv2 paper Fig. 1 and 9, §7.5).

The recipe, as the paper's Fig. 9 caption states it: a first PCA over the patch features gives a
first component whose score separates object from background ("background is removed by
removing patches with a negative score of the first PCA component"); a second PCA over the
foreground patches of *all* images together gives three components, each min-max scaled and
mapped to one of R, G, B, so that matching parts get matching colours across images.

The sign of a principal component is arbitrary (``v`` and ``-v`` are equally valid), so "negative
score" needs a convention. The default, ``sign="border"``, orients the first component so that
the patches on the image border score below average: objects of interest rarely fill the frame
edge. ``"positive"``/``"negative"`` use the component with a fixed sign instead (its
largest-magnitude loading made positive, sklearn's ``svd_flip`` rule) and keep patches above the
threshold or below minus the threshold.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dinolab.viz.figure import panel_figure, save_png, set_title
from dinolab.viz.patches import PatchFeatures, patch_features, to_uint8, upsample_grid

SIGN_RULES = ("border", "positive", "negative")
SCOPES = ("image", "joint")


@dataclass(frozen=True)
class PCAConfig:
    """Defaults of the PCA maps.

    Attributes:
        size: shorter image side in pixels before cropping to the patch grid.
        foreground: threshold the first component; ``False`` treats every patch as foreground.
        threshold: foreground if the oriented first-component score, in units of its standard
            deviation, is above this (paper: 0, i.e. drop the negative scores).
        sign: how to orient the first component, one of ``SIGN_RULES`` (see module docstring).
        scope: first PCA per ``"image"`` (each image finds its own object) or ``"joint"`` over all.
        upsample: ``"bilinear"`` or ``"nearest"`` from the patch grid to pixels.
    """

    size: int = 448
    foreground: bool = True
    threshold: float = 0.0
    sign: str = "border"
    scope: str = "image"
    upsample: str = "bilinear"

    def __post_init__(self) -> None:
        if self.sign not in SIGN_RULES:
            raise ValueError(f"PCA sign rule {self.sign!r}; expected one of {', '.join(SIGN_RULES)}")
        if self.scope not in SCOPES:
            raise ValueError(f"PCA scope {self.scope!r}; expected one of {', '.join(SCOPES)}")
        if self.size < 1:
            raise ValueError(f"PCA image size must be positive, got {self.size}")


@dataclass
class PCAMap:
    """One image and its PCA colouring.

    Attributes:
        image: the image as the model saw it, ``W x H`` pixels.
        foreground: bool [h, w], the patches kept by the first-component threshold.
        rgb: float [h, w, 3] in [0, 1]; background patches are 0 (black).
    """

    image: Image.Image
    foreground: np.ndarray
    rgb: np.ndarray

    def rgb_pixels(self, mode: str = "bilinear") -> np.ndarray:
        """The colour map upsampled to the image, uint8 [H, W, 3]."""
        return to_uint8(upsample_grid(self.rgb, self.image.width, self.image.height, mode))


def principal_components(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact PCA (SVD of the centred data, float64) with a deterministic sign.

    Args:
        x: [N, D] samples.
        k: number of components wanted; fewer come back when ``min(N, D) < k``.

    Returns:
        mean [D], components [k', D] (unit rows, largest-magnitude loading positive), and the
        variance along each component [k'] (``s**2 / (N - 1)``).
    """
    x64 = x.double()
    mean = x64.mean(0)
    _, s, vh = torch.linalg.svd(x64 - mean, full_matrices=False)
    comps = vh[:k]
    pivot = comps.abs().argmax(dim=1)
    comps = comps * torch.sign(comps[torch.arange(len(comps)), pivot]).unsqueeze(1)
    return mean, comps, s[: len(comps)] ** 2 / max(len(x) - 1, 1)


def first_component_scores(x: torch.Tensor) -> torch.Tensor:
    """Projection on the first principal component in units of its standard deviation.

    Args:
        x: [N, D] patch features.

    Returns:
        [N] float64 scores with mean 0 and (unless all samples are equal) standard deviation 1.
    """
    mean, comps, var = principal_components(x, 1)
    if len(comps) == 0 or var[0] <= 0:
        return torch.zeros(len(x), dtype=torch.float64)
    return (x.double() - mean) @ comps[0] / var[0].sqrt()


def border_mask(h: int, w: int) -> np.ndarray:
    """bool [h, w]: True on the outermost ring of the patch grid."""
    mask = np.zeros((h, w), dtype=bool)
    mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = True
    return mask


def orient_scores(scores: list[np.ndarray], sign: str) -> list[np.ndarray]:
    """Apply a sign rule to first-component scores computed together.

    Args:
        scores: per image [h, w] scores from one PCA.
        sign: one of ``SIGN_RULES``.
    """
    if sign == "negative":
        return [-s for s in scores]
    if sign == "border":
        border = np.concatenate([s[border_mask(*s.shape)] for s in scores])
        overall = np.concatenate([s.ravel() for s in scores])
        if border.mean() > overall.mean():
            return [-s for s in scores]
    return scores


def foreground_masks(grids: list[torch.Tensor], cfg: PCAConfig = PCAConfig()) -> list[np.ndarray]:
    """Foreground patches by thresholding the first PCA component.

    Args:
        grids: per image patch features [h, w, D].
        cfg: threshold, sign rule and scope (per image or joint).

    Returns:
        per image bool [h, w].
    """
    if not cfg.foreground:
        return [np.ones(g.shape[:2], dtype=bool) for g in grids]
    groups = [[i] for i in range(len(grids))] if cfg.scope == "image" else [list(range(len(grids)))]
    masks: list[np.ndarray] = [np.empty(0)] * len(grids)
    for group in groups:
        flat = torch.cat([grids[i].reshape(-1, grids[i].shape[-1]) for i in group])
        scores = first_component_scores(flat).numpy()
        sizes = [grids[i].shape[0] * grids[i].shape[1] for i in group]
        split = np.split(scores, np.cumsum(sizes)[:-1])
        per_image = [s.reshape(grids[i].shape[:2]) for s, i in zip(split, group)]
        for i, s in zip(group, orient_scores(per_image, cfg.sign)):
            masks[i] = s > cfg.threshold
    return masks


def pca_rgb(grids: list[torch.Tensor], masks: list[np.ndarray]) -> list[np.ndarray]:
    """Second PCA over the foreground patches of all images, first 3 components as RGB.

    Each component is min-max scaled over the foreground patches to [0, 1]; background is black.
    With fewer than 2 foreground patches in total, every patch is used instead (with a warning).

    Args:
        grids: per image patch features [h, w, D].
        masks: per image bool [h, w] foreground.

    Returns:
        per image float [h, w, 3].
    """
    if sum(int(m.sum()) for m in masks) < 2:
        warnings.warn("fewer than 2 foreground patches: colouring every patch; lower the threshold", stacklevel=2)
        masks = [np.ones_like(m) for m in masks]
    fg = torch.cat([g[torch.from_numpy(m)] for g, m in zip(grids, masks)]).double()
    mean, comps, _ = principal_components(fg, 3)
    proj = (fg - mean) @ comps.T  # [M, k], k <= 3
    lo, hi = proj.min(0).values, proj.max(0).values
    scaled = torch.zeros(len(fg), 3, dtype=torch.float64)
    scaled[:, : proj.shape[1]] = (proj - lo) / (hi - lo).clamp_min(1e-12)
    out, start = [], 0
    for g, m in zip(grids, masks):
        rgb = np.zeros((*g.shape[:2], 3), dtype=np.float32)
        n = int(m.sum())
        rgb[m] = scaled[start : start + n].numpy()
        out.append(rgb)
        start += n
    return out


def pca_maps_from_features(feats: list[PatchFeatures], cfg: PCAConfig = PCAConfig()) -> list[PCAMap]:
    """Foreground masks and RGB maps for images whose features are already computed."""
    grids = [f.patches for f in feats]
    masks = foreground_masks(grids, cfg)
    return [PCAMap(f.image, m, rgb) for f, m, rgb in zip(feats, masks, pca_rgb(grids, masks))]


def pca_maps(
    model: torch.nn.Module, images: list[Image.Image | str | Path], cfg: PCAConfig = PCAConfig()
) -> list[PCAMap]:
    """PCA maps of several images, coloured together (paper Fig. 1 / 9).

    Args:
        model: a DINOv2 backbone.
        images: PIL images or paths.
        cfg: see :class:`PCAConfig`.
    """
    if not images:
        raise ValueError("PCA maps need at least one image")
    return pca_maps_from_features([patch_features(model, im, cfg.size) for im in images], cfg)


def save_pca_figure(
    maps: list[PCAMap], out: str | Path, names: list[str] | None = None, upsample: str = "bilinear"
) -> Path:
    """One PNG: each image (left) beside its PCA map (right), one row per image."""
    names = names or [f"image {i}" for i in range(len(maps))]
    width = max(m.image.width for m in maps)
    height = max(m.image.height for m in maps)
    fig, axes = panel_figure(len(maps), 2, width, height)
    for row, (m, name) in enumerate(zip(maps, names)):
        axes[row, 0].imshow(m.image)
        set_title(axes[row, 0], name)
        axes[row, 1].imshow(m.rgb_pixels(upsample))
        set_title(axes[row, 1], f"PCA, foreground {100 * m.foreground.mean():.0f}% of patches")
    return save_png(fig, out)
