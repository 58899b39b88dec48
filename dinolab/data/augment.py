"""DINOv2 multi-crop augmentation, without torchvision.

One image becomes 2 global crops and N local crops (dinov2 ``data/augmentations.py:
DataAugmentationDINO``). Every operation reproduces the torchvision operation the official code
calls, on the same kind of data (PIL images, uint8 rounding between steps):

==================  ===========================================================================
geometry            ``RandomResizedCrop(size, scale, ratio=(3/4, 4/3), bicubic)`` then
                    ``RandomHorizontalFlip(0.5)``; crop and resize are one PIL ``resize(box=...)``
colour              ``RandomApply([ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8)`` (the four
                    adjustments in a random order, PIL ``ImageEnhance`` + HSV hue shift) then
                    ``RandomGrayscale(0.2)``; independently for every crop
blur                ``GaussianBlur(kernel_size=9, sigma=U(0.1, 2.0))``: a truncated 9-tap Gaussian
                    with reflect padding, rounded back to uint8 (torchvision's tensor kernel, not
                    PIL's ``ImageFilter.GaussianBlur``, which DINO v1 used and is not truncated)
solarize            ``RandomSolarize(threshold=128, p=0.2)`` on the second global crop only
normalise           ImageNet mean / std
==================  ===========================================================================

Randomness comes from a ``numpy.random.Generator`` passed to each call (or an int seed), so a
sample's crops are a pure function of its seed: reproducible with any number of DataLoader
workers and across a resume (see :class:`dinolab.data.datasets.MultiCropDataset`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance

from dinolab.configs.schema import CropsConfig
from dinolab.data.transforms import IMAGENET_MEAN, IMAGENET_STD

# Blur probability of (global crop 1, global crop 2, local crops).
# "paper": the probabilities written in dinov2 augmentations.py:73-82 (and in the DINO/BYOL papers).
# "official_code": what that code executes. dinov2 transforms.py:19-21 passes ``keep_p = 1 - p`` to
# torchvision's RandomApply, which applies with probability ``keep_p``, so the written values are
# inverted (dinov3 issue #286, confirmed by an author; dinov2 PR #411 and dinov3 PR #342 still open).
BLUR_PROBABILITIES: dict[str, tuple[float, float, float]] = {
    "paper": (1.0, 0.1, 0.5),
    "official_code": (0.0, 0.9, 0.5),
}

Box = tuple[int, int, int, int]  # (top, left, height, width), torchvision's order
Seed = np.random.Generator | int | torch.Generator | None


def sample_crop_box(
    width: int,
    height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    rng: np.random.Generator,
    attempts: int = 10,
) -> Box:
    """torchvision ``RandomResizedCrop.get_params``: a random box of given relative area and aspect.

    Up to ``attempts`` tries draw an area fraction ``U(scale)`` and an aspect ratio (w / h)
    log-uniform in ``ratio``; the first box that fits is placed uniformly. If none fits, the
    fallback is the largest centred box whose aspect is clamped to ``ratio``.

    Returns:
        ``(top, left, h, w)`` in pixels. Because ``w`` and ``h`` are rounded to integers, area and
        aspect match the drawn values to within that rounding.
    """
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(attempts):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def adjust_hue(image: Image.Image, hue_factor: float) -> Image.Image:
    """torchvision ``adjust_hue`` for PIL: rotate the 8-bit HSV hue channel by ``hue_factor`` turns.

    ``hue_factor`` in [-0.5, 0.5]; the shift ``int(hue_factor * 255)`` wraps modulo 256 as the
    uint8 addition in torchvision does.
    """
    h, s, v = image.convert("HSV").split()
    shift = int(hue_factor * 255) % 256
    lut = [(i + shift) % 256 for i in range(256)]
    return Image.merge("HSV", (h.point(lut), s, v)).convert("RGB")


def color_jitter(
    image: Image.Image,
    rng: np.random.Generator,
    brightness: float,
    contrast: float,
    saturation: float,
    hue: float,
) -> Image.Image:
    """torchvision ``ColorJitter(brightness, contrast, saturation, hue)`` on a PIL RGB image.

    Factors are drawn as torchvision does (``U(max(0, 1 - b), 1 + b)`` for the first three,
    ``U(-hue, hue)`` for hue) and applied in a random order; an adjustment whose strength is 0 is
    skipped.
    """
    factors = [
        rng.uniform(max(0.0, 1 - brightness), 1 + brightness) if brightness > 0 else None,
        rng.uniform(max(0.0, 1 - contrast), 1 + contrast) if contrast > 0 else None,
        rng.uniform(max(0.0, 1 - saturation), 1 + saturation) if saturation > 0 else None,
        rng.uniform(-hue, hue) if hue > 0 else None,
    ]
    for op in rng.permutation(4):
        factor = factors[op]
        if factor is None:
            continue
        if op == 0:
            image = ImageEnhance.Brightness(image).enhance(factor)
        elif op == 1:
            image = ImageEnhance.Contrast(image).enhance(factor)
        elif op == 2:
            image = ImageEnhance.Color(image).enhance(factor)
        else:
            image = adjust_hue(image, factor)
    return image


def gaussian_kernel1d(kernel_size: int, sigma: float) -> torch.Tensor:
    """Normalised Gaussian taps at integer offsets ``-(k-1)/2 .. (k-1)/2``: [kernel_size]."""
    x = torch.arange(kernel_size, dtype=torch.float32) - (kernel_size - 1) / 2
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(image_u8: torch.Tensor, sigma: float, kernel_size: int = 9) -> torch.Tensor:
    """torchvision ``gaussian_blur`` on a uint8 image: separable conv, reflect padding, rounding.

    Args:
        image_u8: [3, H, W] uint8.
        sigma: standard deviation in pixels.
        kernel_size: odd tap count; shrunk for images too small to reflect-pad.

    Returns:
        [3, H, W] uint8.
    """
    _, height, width = image_u8.shape
    kernel_size = min(kernel_size, 2 * (min(height, width) - 1) + 1)  # reflect pad needs pad < size
    if kernel_size < 3:
        return image_u8
    k = gaussian_kernel1d(kernel_size, sigma)
    pad = kernel_size // 2
    x = image_u8.float().unsqueeze(1)  # [3, 1, H, W]: channels as a batch, one kernel for all
    x = F.conv2d(F.pad(x, (pad, pad, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, pad, pad), mode="reflect"), k.view(1, 1, -1, 1))
    return x.squeeze(1).round_().clamp_(0, 255).to(torch.uint8)


def solarize(image_u8: torch.Tensor, threshold: int = 128) -> torch.Tensor:
    """PIL ``ImageOps.solarize``: invert every value ``>= threshold``. [..] uint8 -> same shape."""
    return torch.where(image_u8 >= threshold, 255 - image_u8, image_u8)


def make_rng(seed: Seed) -> np.random.Generator:
    """A numpy Generator from a Generator (used as is), an int, a torch Generator, or None (OS entropy)."""
    if isinstance(seed, np.random.Generator):
        return seed
    if isinstance(seed, torch.Generator):
        return np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=seed)))
    return np.random.default_rng(seed)


@dataclass(frozen=True)
class MultiCropAugmentation:
    """DINOv2 multi-crop augmentation: a :class:`~dinolab.configs.schema.CropsConfig` and, when called, the transform.

    Every setting a recipe chooses (crop sizes, scales, counts, colour, blur, solarize) is read from
    ``crops``, whose dataclass holds the only defaults. The remaining fields are the official code's fixed
    constants, which no recipe changes (tests set them to isolate one operation).

    ``crops.blur_semantics`` picks a row of :data:`BLUR_PROBABILITIES`: ``"official_code"`` made every released
    DINOv2 checkpoint and published number; ``"paper"`` is there for ablations (RECIPE §2.1, §6.1).

    Call with a PIL image (any mode) or a uint8 array [H, W, 3] / [H, W] and a seed source:

        aug = MultiCropAugmentation(CropsConfig(local_crops_number=6, local_crops_size=16, global_crops_size=32))
        out = aug(image, rng=np.random.default_rng(0))
        out["global_crops"]   # list of 2 float32 tensors [3, global_crops_size, global_crops_size]
        out["local_crops"]    # list of local_crops_number tensors [3, local_crops_size, local_crops_size]
    """

    crops: CropsConfig
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # RandomResizedCrop's aspect range
    hflip_p: float = 0.5
    blur_kernel_size: int = 9
    solarize_threshold: int = 128
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # (x / 255 - mean) / std as one multiply-subtract on the uint8 values: [3, 1, 1] each.
    _scale: torch.Tensor = field(init=False, repr=False, compare=False)
    _shift: torch.Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._validate()
        std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        object.__setattr__(self, "_scale", 1.0 / (255.0 * std))
        object.__setattr__(self, "_shift", mean / std)

    def _validate(self) -> None:
        """The fixed constants; ``crops`` validates itself (``CropsConfig.__post_init__``)."""
        if not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ValueError(f"crop_ratio must satisfy 0 < min <= max, got {self.crop_ratio}")
        if self.blur_kernel_size < 1 or self.blur_kernel_size % 2 == 0:
            raise ValueError(f"blur_kernel_size must be odd and positive, got {self.blur_kernel_size}")
        if not 0 <= self.hflip_p <= 1:
            raise ValueError(f"hflip_p is a probability in [0, 1], got {self.hflip_p}")

    @property
    def blur_probabilities(self) -> tuple[float, float, float]:
        """Blur probability of (global crop 1, global crop 2, each local crop) under ``blur_semantics``."""
        return BLUR_PROBABILITIES[self.crops.blur_semantics]

    def __call__(self, image: Image.Image | np.ndarray, rng: Seed = None) -> dict[str, list[torch.Tensor]]:
        """Multi-crop one image.

        Args:
            image: PIL image or uint8 array [H, W, 3] or [H, W].
            rng: numpy Generator (consumed), int seed, torch Generator, or None (fresh OS entropy).

        Returns:
            ``global_crops``: 2 x [3, G, G] float32; ``local_crops``: local_crops_number x [3, L, L]
            float32; all ImageNet-normalised. The teacher uses the same global crop tensors.
        """
        image = _as_rgb_pil(image)
        rng = make_rng(rng)
        c = self.crops
        p_blur_g1, p_blur_g2, p_blur_local = self.blur_probabilities
        g_args = (c.global_crops_size, tuple(c.global_crops_scale))
        global_1 = self._crop_to_tensor(image, *g_args, p_blur_g1, 0.0, rng)
        global_2 = self._crop_to_tensor(image, *g_args, p_blur_g2, c.solarize_p, rng)
        l_args = (c.local_crops_size, tuple(c.local_crops_scale))
        local = [self._crop_to_tensor(image, *l_args, p_blur_local, 0.0, rng) for _ in range(c.local_crops_number)]
        return {"global_crops": [global_1, global_2], "local_crops": local}

    def _crop_to_tensor(
        self,
        image: Image.Image,
        size: int,
        scale: tuple[float, float],
        blur_p: float,
        solarize_p: float,
        rng: np.random.Generator,
    ) -> torch.Tensor:
        """One crop: geometry and colour on PIL, blur and solarize on uint8, then normalise. -> [3, size, size]."""
        crop = self.random_resized_crop(image, size, scale, rng)
        crop = self._color(crop, rng)
        x = torch.from_numpy(np.array(crop)).permute(2, 0, 1).contiguous()  # [3, size, size] uint8
        if rng.random() < blur_p:
            x = gaussian_blur(x, float(rng.uniform(*self.crops.blur_sigma)), self.blur_kernel_size)
        if rng.random() < solarize_p:
            x = solarize(x, self.solarize_threshold)
        return x.float().mul_(self._scale).sub_(self._shift)

    def random_resized_crop(
        self, image: Image.Image, size: int, scale: tuple[float, float], rng: np.random.Generator
    ) -> Image.Image:
        """RandomResizedCrop (bicubic) + horizontal flip; crop and resize in one PIL call. -> size x size."""
        top, left, h, w = sample_crop_box(image.width, image.height, scale, self.crop_ratio, rng)
        crop = image.resize((size, size), Image.BICUBIC, box=(left, top, left + w, top + h))
        if rng.random() < self.hflip_p:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        return crop

    def _color(self, crop: Image.Image, rng: np.random.Generator) -> Image.Image:
        """RandomApply(ColorJitter, p) then RandomGrayscale(p), as the official ``color_jittering``."""
        c = self.crops
        if rng.random() < c.color_jitter_p:
            crop = color_jitter(crop, rng, c.brightness, c.contrast, c.saturation, c.hue)
        if rng.random() < c.grayscale_p:
            crop = crop.convert("L").convert("RGB")
        return crop


def _as_rgb_pil(image: Image.Image | np.ndarray) -> Image.Image:
    """PIL image of any mode or uint8 array [H, W(, 3)] -> PIL RGB image."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"image arrays must be uint8 [H, W, 3] or [H, W], got dtype {image.dtype}")
        image = Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image)
    return image if image.mode == "RGB" else image.convert("RGB")
