"""Deterministic image preprocessing (evaluation side), without torchvision.

The official evaluation transform is ``Resize(256, bicubic) -> CenterCrop(224) -> Normalize``
(dinov2 ``data/transforms.py: make_classification_eval_transform``). The resize keeps the aspect
ratio and scales the *shorter* side to 256.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(x: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """Float image tensor in [0, 1], [..., 3, H, W] -> ImageNet-normalised tensor."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x - m) / s


def to_tensor(image: Image.Image | np.ndarray) -> torch.Tensor:
    """PIL image or uint8 array [H, W, 3] -> float tensor [3, H, W] in [0, 1]."""
    arr = np.asarray(image, dtype=np.uint8)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"image must be H x W x 3 uint8, got shape {arr.shape}")
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def resize_shorter(image: Image.Image, size: int) -> Image.Image:
    """Scale so that the shorter side is ``size`` (bicubic), keeping the aspect ratio.

    Same rounding as torchvision ``Resize(int)``: the long side is ``int(size * long / short)``.
    """
    w, h = image.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    if (new_w, new_h) == (w, h):
        return image
    return image.resize((new_w, new_h), Image.BICUBIC)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """Crop the central ``size x size`` square (torchvision's rounding: ``round((H - size) / 2)``)."""
    w, h = image.size
    if w < size or h < size:
        raise ValueError(f"image {w}x{h} is smaller than the crop size {size}")
    left = int(round((w - size) / 2.0))
    top = int(round((h - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


@dataclass(frozen=True)
class EvalTransform:
    """Official evaluation preprocessing: resize shorter side, centre crop, normalise.

    ``resize_size=None`` resizes straight to ``crop_size`` (short side) before the crop,
    which is what small images (CIFAR 32x32) want.

    Call on a PIL image or a uint8 array [H, W, 3]; returns a float tensor [3, crop, crop].
    """

    crop_size: int = 224
    resize_size: int | None = 256

    def __call__(self, image: Image.Image | np.ndarray) -> torch.Tensor:
        if isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        image = image.convert("RGB")
        image = resize_shorter(image, self.resize_size or self.crop_size)
        return normalize(to_tensor(center_crop(image, self.crop_size)))

    @property
    def key(self) -> str:
        """A short string that identifies this preprocessing (used in cache keys)."""
        return f"resize{self.resize_size}-crop{self.crop_size}-bicubic-imagenet"
