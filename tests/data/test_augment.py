"""Multi-crop augmentation: shapes, normalisation, crop-box ranges, solarize placement, blur semantics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from dinolab.configs.schema import CropsConfig
from dinolab.data.augment import (
    BLUR_PROBABILITIES,
    MultiCropAugmentation,
    adjust_hue,
    gaussian_blur,
    gaussian_kernel1d,
    sample_crop_box,
    solarize,
)
from dinolab.data.transforms import IMAGENET_MEAN, IMAGENET_STD

# Everything photometric off: crops of a constant image are then exactly that constant.
PLAIN = dict(color_jitter_p=0.0, grayscale_p=0.0, solarize_p=0.0)


def _aug(*, crop_ratio=(3 / 4, 4 / 3), hflip_p=0.5, blur_kernel_size=9, **crops) -> MultiCropAugmentation:
    """An augmentation of ``CropsConfig(**crops)`` (its defaults elsewhere) and the official fixed constants."""
    return MultiCropAugmentation(CropsConfig(**crops), crop_ratio=crop_ratio, hflip_p=hflip_p,
                                 blur_kernel_size=blur_kernel_size)


def _normalised(rgb: tuple[int, int, int]) -> torch.Tensor:
    """(value / 255 - mean) / std per channel, computed directly: [3]."""
    return torch.tensor([(v / 255 - m) / s for v, m, s in zip(rgb, IMAGENET_MEAN, IMAGENET_STD)])


def test_settings_come_from_the_crops_config() -> None:
    crops = CropsConfig()
    aug = MultiCropAugmentation(crops)
    assert aug.crops is crops  # no defaults of its own to drift from CropsConfig's
    assert (aug.crop_ratio, aug.hflip_p, aug.solarize_threshold, aug.blur_kernel_size) == ((3 / 4, 4 / 3), 0.5, 128, 9)


def test_output_shapes_and_dtypes() -> None:
    image = np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    out = _aug()(image, rng=0)
    assert [tuple(t.shape) for t in out["global_crops"]] == [(3, 224, 224)] * 2
    assert [tuple(t.shape) for t in out["local_crops"]] == [(3, 96, 96)] * 8
    assert all(t.dtype == torch.float32 for t in out["global_crops"] + out["local_crops"])
    no_local = _aug(global_crops_size=32, local_crops_size=16, local_crops_number=0)
    small = no_local(Image.fromarray(image))
    assert [tuple(t.shape) for t in small["global_crops"]] == [(3, 32, 32)] * 2 and small["local_crops"] == []


def test_normalisation_is_imagenet_mean_std() -> None:
    rgb = (200, 100, 30)
    image = Image.new("RGB", (50, 40), rgb)
    out = _aug(global_crops_size=16, local_crops_size=8, local_crops_number=2, **PLAIN)(image, rng=1)
    expected = _normalised(rgb).view(3, 1, 1)
    for crop in out["global_crops"] + out["local_crops"]:
        torch.testing.assert_close(crop, expected.expand_as(crop), atol=1e-5, rtol=0)


def test_greyscale_and_array_inputs_become_rgb() -> None:
    grey = np.full((20, 20), 90, dtype=np.uint8)
    out = _aug(global_crops_size=8, local_crops_size=4, local_crops_number=1, **PLAIN)(grey, rng=0)
    torch.testing.assert_close(out["global_crops"][0][:, 0, 0], _normalised((90, 90, 90)), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="uint8"):
        _aug()(grey.astype(np.float32))


@pytest.mark.parametrize("scale", [(0.32, 1.0), (0.05, 0.32)])
def test_crop_box_area_aspect_and_placement(scale: tuple[float, float]) -> None:
    width, height, ratio = 640, 480, (3 / 4, 4 / 3)
    rng = np.random.default_rng(0)
    boxes = np.array([sample_crop_box(width, height, scale, ratio, rng) for _ in range(3000)])
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
    area = w * h / (width * height)
    # Rounding w and h to integers moves the area by at most ~1 / min side (< 1% here).
    assert area.min() >= scale[0] * 0.98 and area.max() <= scale[1] * 1.02
    aspect = w / h
    assert aspect.min() >= ratio[0] * 0.98 and aspect.max() <= ratio[1] * 1.02
    if scale[1] <= 0.5:
        # Here every first draw fits (no rejection), so area ~ U(scale): mean at the midpoint
        # (3000 draws: standard error 0.0014; rounding bias far smaller).
        assert abs(area.mean() - sum(scale) / 2) < 0.006
        # Aspect log-uniform on a range symmetric in log space: mean log-aspect 0 (standard error 0.003).
        assert abs(np.log(aspect).mean()) < 0.015


def test_crop_box_falls_back_to_a_centred_clamped_box() -> None:
    # A 1000 x 10 strip cannot hold any box of >= half its area with aspect <= 4/3.
    top, left, h, w = sample_crop_box(1000, 10, (0.5, 1.0), (3 / 4, 4 / 3), np.random.default_rng(0))
    assert (h, w) == (10, round(10 * 4 / 3))
    assert (top, left) == (0, (1000 - 13) // 2)
    # A square image whose aspect is in range falls back to the whole image.
    assert sample_crop_box(10, 10, (2.0, 3.0), (3 / 4, 4 / 3), np.random.default_rng(0)) == (0, 0, 10, 10)


def test_solarize_matches_its_definition() -> None:
    x = torch.arange(256, dtype=torch.uint8)
    expected = torch.tensor([v if v < 128 else 255 - v for v in range(256)], dtype=torch.uint8)
    assert torch.equal(solarize(x, 128), expected)


@pytest.mark.parametrize("level,solarized", [(200, 55), (100, 100)])
def test_solarize_only_on_the_second_global_crop(level: int, solarized: int) -> None:
    aug = _aug(
        global_crops_size=12, local_crops_size=6, local_crops_number=3, color_jitter_p=0, grayscale_p=0, solarize_p=1.0
    )
    out = aug(Image.new("RGB", (30, 30), (level,) * 3), rng=0)
    value = lambda crop: crop[:, 0, 0]  # noqa: E731 - crops of a constant image are constant
    torch.testing.assert_close(value(out["global_crops"][0]), _normalised((level,) * 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(value(out["global_crops"][1]), _normalised((solarized,) * 3), atol=1e-5, rtol=0)
    for crop in out["local_crops"]:
        torch.testing.assert_close(value(crop), _normalised((level,) * 3), atol=1e-5, rtol=0)


def test_blur_semantics_table() -> None:
    assert BLUR_PROBABILITIES == {"paper": (1.0, 0.1, 0.5), "official_code": (0.0, 0.9, 0.5)}
    assert _aug().blur_probabilities == (0.0, 0.9, 0.5)  # CropsConfig's default: "official_code"
    assert _aug(blur_semantics="paper").blur_probabilities == (1.0, 0.1, 0.5)
    with pytest.raises(ValueError, match="official_code"):
        _aug(blur_semantics="torchvision")


@pytest.mark.parametrize("semantics", ["paper", "official_code"])
def test_blur_frequencies_follow_the_semantics(semantics: str) -> None:
    # Crops are the whole image at its own size (no resampling), so any change is the blur.
    image = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    aug = _aug(
        global_crops_size=16, global_crops_scale=(1.0, 1.0), local_crops_size=16, local_crops_scale=(1.0, 1.0),
        local_crops_number=2, crop_ratio=(1.0, 1.0), hflip_p=0.0, blur_semantics=semantics,
        blur_sigma=(1.0, 2.0), **PLAIN,
    )
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    plain = (torch.from_numpy(image).permute(2, 0, 1).float() / 255 - mean) / std
    n, blurred = 300, np.zeros(3)
    for seed in range(n):
        out = aug(image, rng=seed)
        crops = [out["global_crops"][0], out["global_crops"][1], *out["local_crops"]]
        changed = [not torch.allclose(c, plain, atol=1e-4) for c in crops]
        blurred += [changed[0], changed[1], np.mean(changed[2:])]
    p1, p2, p_local = BLUR_PROBABILITIES[semantics]
    sd = lambda p: math.sqrt(p * (1 - p) / n)  # noqa: E731 - binomial standard error of a frequency
    for freq, p in zip(blurred / n, (p1, p2, p_local)):
        assert abs(freq - p) <= 4 * sd(p) + 1e-9


def test_gaussian_blur_matches_brute_force_2d_convolution() -> None:
    image = np.random.default_rng(1).integers(0, 256, (3, 13, 11)).astype(np.uint8)
    sigma, k = 1.3, 9
    offsets = np.arange(k) - k // 2
    taps = np.exp(-(offsets**2) / (2 * sigma**2))
    kernel2d = np.outer(taps, taps) / taps.sum() ** 2
    padded = np.pad(image.astype(np.float64), ((0, 0), (4, 4), (4, 4)), mode="reflect")
    ref = np.zeros(image.shape)
    for dy in range(k):
        for dx in range(k):
            ref += kernel2d[dy, dx] * padded[:, dy : dy + 13, dx : dx + 11]
    out = gaussian_blur(torch.from_numpy(image), sigma, k).numpy().astype(int)
    assert np.abs(out - np.rint(ref)).max() <= 1  # float32 vs float64 may flip a .5 rounding
    assert np.mean(out == np.rint(ref)) > 0.99
    torch.testing.assert_close(gaussian_kernel1d(k, sigma).double(), torch.from_numpy(taps / taps.sum()))


def test_gaussian_blur_on_tiny_images_shrinks_the_kernel() -> None:
    x = torch.full((3, 3, 3), 7, dtype=torch.uint8)
    assert torch.equal(gaussian_blur(x, 1.5, 9), x)


def test_hue_rotation_direction() -> None:
    red = Image.new("RGB", (4, 4), (255, 0, 0))
    assert np.argmax(np.asarray(adjust_hue(red, 1 / 3))[0, 0]) == 1  # red + 120 degrees = green
    assert np.argmax(np.asarray(adjust_hue(red, -1 / 3))[0, 0]) == 2  # red - 120 degrees = blue


def test_same_seed_same_crops_different_seed_different_crops() -> None:
    image = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    aug = _aug(global_crops_size=16, local_crops_size=8, local_crops_number=2)
    crops = lambda out: torch.cat([c.flatten() for c in out["global_crops"] + out["local_crops"]])  # noqa: E731
    assert torch.equal(crops(aug(image, rng=3)), crops(aug(image, rng=np.random.default_rng(3))))
    assert torch.equal(crops(aug(image, rng=torch.Generator().manual_seed(1))),
                       crops(aug(image, rng=torch.Generator().manual_seed(1))))
    assert not torch.equal(crops(aug(image, rng=3)), crops(aug(image, rng=4)))


@pytest.mark.parametrize("bad", [dict(global_crops_scale=(0.5, 0.2)), dict(local_crops_number=-1),
                                 dict(blur_kernel_size=8), dict(hflip_p=1.5)])
def test_invalid_config_is_rejected(bad: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        _aug(**bad)
