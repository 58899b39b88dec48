"""The input sizes and tokens of the evaluation protocols; the features themselves come from
:func:`dinolab.features.cache.extract` (the one core, with the fingerprinted disk cache).

Input sizes. The backbone needs sides that are multiples of its patch size p. Defaults, chosen so
the whole ``bench/eval_table.py`` table runs in minutes on a 2-core CPU (override with
``image_size``):

* classification and retrieval (:func:`classification_preprocess`): images whose shorter side
  is >= 224 get the official transform (resize the shorter side to 256, centre crop 224);
  smaller images are resized (shorter side, bicubic) and centre-cropped to a square of side
  ``clamp(round_up(short_side, p), 8p, 16p)``, i.e. a grid of 8 to 16 patches per side: with
  p = 14, CIFAR 32x32 -> 112 and Imagenette 96x96 -> 112 (8x8 patches). Upsampling small images
  is what the DINOv2 transfer evaluations do (they use 224); 112 keeps the cost 4-5x lower. A
  patch-4 model trained on 32x32 crops gets 32 (CIFAR) and 64 (Imagenette).
* dense tasks (:func:`dense_preprocess`): the whole image is resized (no crop, so labels stay
  aligned) so that its shorter side is ``short_side`` (default 12p = 168 for p = 14), each side
  rounded to a multiple of p: CamVid 120x160 -> 168x224 (12x16 patches), NYU 240x320 ->
  168x224, KITTI 187x621 -> 168x560.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from dinolab.features.embed import FeatureSpec
from dinolab.features.inputs import Preprocess


def round_to_patch(value: float, patch_size: int) -> int:
    """Nearest positive multiple of ``patch_size``."""
    return max(patch_size, int(round(value / patch_size)) * patch_size)


def check_input_size(size: tuple[int, int], patch_size: int) -> tuple[int, int]:
    """Raise a ValueError unless both sides are positive multiples of ``patch_size``."""
    size = (int(size[0]), int(size[1]))
    if min(size) <= 0 or size[0] % patch_size or size[1] % patch_size:
        raise ValueError(f"input size {size[0]}x{size[1]} must be multiples of the patch size {patch_size}")
    return size


def classification_preprocess(native_hw: tuple[int, int], patch_size: int, image_size: int | None = None) -> Preprocess:
    """Default square input for classification / retrieval (see module docstring)."""
    short = min(native_hw)
    if image_size is None and short >= 224:
        return Preprocess(check_input_size((224, 224), patch_size), crop_fraction=0.875)
    if image_size is None:
        image_size = min(16 * patch_size, max(8 * patch_size, math.ceil(short / patch_size) * patch_size))
    return Preprocess(check_input_size((image_size, image_size), patch_size), crop_fraction=1.0)


def dense_preprocess(
    native_hw: tuple[int, int],
    patch_size: int,
    image_size: tuple[int, int] | None = None,
    short_side: int | None = None,
    scale: float = 1.0,
) -> Preprocess:
    """Whole-image resize for dense tasks; ``scale`` multiplies the size (multi-scale testing).

    ``image_size`` (H, W) must be multiples of the patch size; without it the shorter side becomes
    ``short_side`` (default 12 patches) and the longer one keeps the aspect ratio, both rounded to
    the patch size.
    """
    if image_size is not None:
        base = check_input_size(tuple(image_size), patch_size)
    else:
        factor = (short_side or 12 * patch_size) / min(native_hw)
        base = (native_hw[0] * factor, native_hw[1] * factor)
    return Preprocess((round_to_patch(base[0] * scale, patch_size), round_to_patch(base[1] * scale, patch_size)))


def global_spec(model: nn.Module) -> FeatureSpec:
    """The tokens the classification protocols share (one cache entry serves k-NN, linear and
    logistic regression): normalised class tokens of the last 4 blocks + mean patch token of the last."""
    return FeatureSpec(layers=min(4, model.n_blocks), norm=True, patch="mean")


def keeps_global_rng(fn):
    """Run ``fn`` on a copy of the global RNG state (CPU and every CUDA device) and restore it afterwards, so
    an evaluation that seeds its head initialisation (``torch.manual_seed(cfg.seed)``) does not reseed its caller."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            return fn(*args, **kwargs)

    return wrapper
