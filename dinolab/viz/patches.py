"""Shared plumbing for the viz tools: an image on the patch grid, its patch features, maps back to pixels.

Every viz tool (PCA, matching, attention, the local explorer) sees an image the same way: the
shorter side resized to ``size`` (bicubic), then both sides centre-cropped down to multiples of
the patch size, so that the ``[h, w]`` patch grid covers the displayed picture exactly and a map
upsampled from the grid lines up with it pixel for pixel.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dinolab.data.images import load_rgb
from dinolab.data.transforms import resize_shorter
from dinolab.features.embed import FeatureSpec, embed_batch, model_device
from dinolab.features.inputs import to_model_input

# Long side cap, as a multiple of ``size``: a panorama would otherwise cost quadratically more tokens.
MAX_ASPECT = 2.0


@dataclass
class PatchFeatures:
    """What a backbone sees of one image.

    Attributes:
        image: the image as the model saw it (resized and cropped), ``W x H`` pixels.
        patches: normalised patch tokens ``x_norm_patchtokens`` on the grid, [h, w, D].
        cls: normalised class token ``x_norm_clstoken``, [D].
    """

    image: Image.Image
    patches: torch.Tensor
    cls: torch.Tensor

    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid size (h, w)."""
        return self.patches.shape[0], self.patches.shape[1]


def fit_to_patch_grid(image: Image.Image, size: int, patch_size: int) -> Image.Image:
    """Resize the shorter side to ``size``, then centre-crop each side to a multiple of ``patch_size``.

    The long side is also capped at ``MAX_ASPECT * size``.

    Raises:
        ValueError: ``size`` is smaller than one patch.
    """
    if size < patch_size:
        raise ValueError(f"image size {size} is smaller than the patch size {patch_size}")
    image = resize_shorter(image.convert("RGB"), size)
    cap = int(MAX_ASPECT * size)
    w, h = image.size
    new_w = min(w, cap) // patch_size * patch_size
    new_h = min(h, cap) // patch_size * patch_size
    left, top = (w - new_w) // 2, (h - new_h) // 2
    return image.crop((left, top, left + new_w, top + new_h))


def image_to_input(image: Image.Image, model: torch.nn.Module) -> torch.Tensor:
    """RGB image already on the patch grid -> normalised model input [1, 3, H, W] on the model's device."""
    return to_model_input(image).unsqueeze(0).to(model_device(model))


def patch_features(model: torch.nn.Module, image: Image.Image | str | Path, size: int) -> PatchFeatures:
    """Run the backbone on one image and return its patch grid features and class token.

    Args:
        model: a DINOv2 backbone (the last block's normalised tokens, through :mod:`dinolab.features.embed`).
        image: a PIL image or a path to one.
        size: shorter side, in pixels, before cropping to the patch grid.
    """
    if not isinstance(image, Image.Image):
        image = load_rgb(image)
    fitted = fit_to_patch_grid(image, size, model.patch_size)
    tokens = embed_batch(model, image_to_input(fitted, model), FeatureSpec(patch="all"))
    return PatchFeatures(image=fitted, patches=tokens["patch"][0, 0], cls=tokens["cls"][0, 0])


def upsample_grid(grid: np.ndarray, width: int, height: int, mode: str = "bilinear") -> np.ndarray:
    """Scale a patch-grid map to pixels.

    Args:
        grid: [h, w] or [h, w, C] float map.
        width, height: output size in pixels.
        mode: ``"nearest"`` (patch blocks) or ``"bilinear"`` (smooth).

    Returns:
        float32 array [height, width] or [height, width, C].
    """
    if mode not in ("nearest", "bilinear"):
        raise ValueError(f"upsample mode {mode!r}; expected 'nearest' or 'bilinear'")
    t = torch.as_tensor(np.asarray(grid, dtype=np.float32))
    chw = t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)
    kwargs = {"align_corners": False} if mode == "bilinear" else {}
    up = F.interpolate(chw.unsqueeze(0), size=(height, width), mode=mode, **kwargs)[0]
    return (up[0] if t.ndim == 2 else up.permute(1, 2, 0)).numpy()


def to_uint8(rgb: np.ndarray) -> np.ndarray:
    """Float image in [0, 1] -> uint8 (values outside are clipped)."""
    return (np.clip(rgb, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def load_model(arch: str, weights: str | Path | None, device: str = "cpu") -> torch.nn.Module:
    """Build a backbone by name, load its weights (or keep a random init), switch to eval mode."""
    from dinolab.models import build_backbone  # imported here so that `dinolab --help` stays fast

    model = build_backbone(arch, weights=str(weights) if weights else None)
    return model.to(device).eval()
