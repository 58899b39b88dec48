"""How an image becomes a model input: one :class:`Preprocess`, and :class:`ModelInputs` to feed a sequence of them.

Three geometries, all bicubic and ImageNet mean/std normalised:

* ``Preprocess(size, resize=R)``: the official evaluation transform, ``Resize(R) -> CenterCrop(size)``
  (dinov2 ``make_classification_eval_transform``; torchvision's rounding: the long side is truncated).
  What ``dinolab extract``, ``dinolab.embed`` and curation use (R = size x 256/224 by default).
* ``Preprocess(size, crop_fraction=f)``: the evaluation protocols' variant: both sides scaled by one
  factor, so that the shorter one is ``min(size) / f``, rounded to nearest, then the centre crop; ``size``
  may be non-square (see :mod:`dinolab.eval.features` for the sizes each protocol picks).
* ``Preprocess(size)``: the whole image resized to ``size`` (dense tasks: labels stay aligned).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from dinolab.data.augment import sample_crop_box
from dinolab.data.images import try_load_rgb
from dinolab.data.transforms import center_crop, normalize, resize_shorter, to_tensor


def to_model_input(image: Image.Image | np.ndarray) -> torch.Tensor:
    """RGB image (PIL or uint8 [H, W, 3]) at its final size -> normalised float input [3, H, W]."""
    return normalize(to_tensor(image))


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes a model input [3, H, W] (see the module docstring for the geometries).

    Attributes:
        size: (H, W) of the model input; multiples of the patch size.
        resize: the shorter side before a square centre crop (official evaluation transform).
        crop_fraction: the protocols' resize + centre crop: the shorter side becomes ``min(size) / crop_fraction``
            (224 / 256 = 0.875 is the official margin; 1.0 = no margin).
        hflip: mirror the input (multi-scale / flip test-time augmentation).
        augment: random resized crop (scale 0.08-1, ratio 3/4-4/3, bicubic) + horizontal flip with
            probability 0.5, the official linear-probe training transform; drawn from a generator
            seeded by ``(seed, image index)``, so a view is reproducible and cacheable.
        seed: see ``augment``.
    """

    size: tuple[int, int]
    crop_fraction: float | None = None
    hflip: bool = False
    augment: bool = False
    seed: int = 0
    resize: int | None = None

    def __post_init__(self) -> None:
        if self.resize is not None and (self.crop_fraction is not None or self.size[0] != self.size[1]):
            raise ValueError(f"Preprocess: resize={self.resize} takes a square size and no crop_fraction, "
                             f"got size {self.size}, crop_fraction {self.crop_fraction}")

    @classmethod
    def official(cls, crop: int, resize: int | None) -> Preprocess:
        """``Resize(resize) -> CenterCrop(crop)``; ``resize=None`` resizes the shorter side straight to ``crop``."""
        return cls((crop, crop), resize=resize or crop)

    @property
    def key(self) -> str:
        """Identifies this preprocessing in cache keys (``resize`` only when set: older keys stay valid)."""
        fields = {k: v for k, v in asdict(self).items() if k != "resize" or v is not None}
        return json.dumps(fields, sort_keys=True)

    def __call__(self, image: Image.Image | np.ndarray, index: int = 0) -> torch.Tensor:
        """PIL image or uint8 [h, w, 3] -> float [3, H, W]; ``index`` seeds ``augment``."""
        pil = Image.fromarray(image) if isinstance(image, np.ndarray) else image
        pil = pil if pil.mode == "RGB" else pil.convert("RGB")
        height, width = self.size
        if self.augment:
            rng = np.random.default_rng([self.seed, index])
            top, left, h, w = sample_crop_box(pil.width, pil.height, (0.08, 1.0), (3 / 4, 4 / 3), rng)
            pil = pil.resize((width, height), Image.BICUBIC, box=(left, top, left + w, top + h))
            if rng.random() < 0.5:
                pil = pil.transpose(Image.FLIP_LEFT_RIGHT)
        elif self.resize is not None:
            pil = center_crop(resize_shorter(pil, self.resize), width)
        elif self.crop_fraction is None:
            pil = pil.resize((width, height), Image.BICUBIC) if pil.size != (width, height) else pil
        else:
            pil = _resize_centre_crop(pil, height, width, self.crop_fraction)
        if self.hflip:
            pil = pil.transpose(Image.FLIP_LEFT_RIGHT)
        return to_model_input(pil)


def _resize_centre_crop(pil: Image.Image, height: int, width: int, crop_fraction: float) -> Image.Image:
    scale = max(height / pil.height, width / pil.width) / crop_fraction
    new_w, new_h = max(width, round(pil.width * scale)), max(height, round(pil.height * scale))
    if (new_w, new_h) != pil.size:
        pil = pil.resize((new_w, new_h), Image.BICUBIC)
    left, top = round((new_w - width) / 2), round((new_h - height) / 2)
    return pil.crop((left, top, left + width, top + height))


class ModelInputs(Dataset):
    """``(input [3, H, W], index, readable)`` per image of ``images``.

    ``images`` holds file paths, PIL images or uint8 arrays [h, w, 3] (any ``Sequence``, e.g. an
    :class:`~dinolab.data.labelled.ImageSet`). A path that cannot be read as an image (missing, truncated,
    not an image; a FIFO, socket or device is never opened) gives a zero input and ``readable=False``, so
    the caller skips it and names it. Other sources raise as they do.

    Why not :class:`dinolab.data.datasets.ImageFiles`: it answers an unreadable file with the next
    readable one (right for training), while features must leave the file out and say so.
    """

    def __init__(self, images: Sequence, pre: Preprocess) -> None:
        self.images, self.pre = images, pre

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, bool]:
        image = self.images[i]
        if isinstance(image, (str, Path)):
            image = try_load_rgb(image)
            if image is None:
                return torch.zeros(3, *self.pre.size), i, False
        return self.pre(image, i), i, True
