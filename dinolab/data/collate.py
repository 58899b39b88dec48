"""Batch multi-crop samples and precompute the iBOT masks, as the official ``collate_data_and_cast``.

Everything the step needs about masking (masks, flat indices of masked tokens, per-token weights, a
static ``upperbound`` buffer size) is computed here on the CPU data workers, so the training step has
no data-dependent host work (``dinov2/data/collate.py``).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from dinolab.data.masking import MaskingGenerator, RandomSource, as_random_source


def collate_crops(
    samples: Sequence[Mapping[str, Any] | tuple],
    *,
    mask_ratio_min_max: tuple[float, float] = (0.1, 0.5),
    mask_probability: float = 0.5,
    mask_generator: MaskingGenerator,
    n_tokens: int,
    dtype: torch.dtype | None = None,
    rng: random.Random | np.random.Generator | RandomSource | None = None,
) -> dict[str, Any]:
    """Stack the crops of ``B`` samples and draw masks for half of the global crops.

    Masks: ``n_masked = int(2B * mask_probability)`` of the ``2B`` global crops are masked; masked crop i
    asks the generator for ``int(N * U(probs[i], probs[i + 1]))`` patches with
    ``probs = linspace(ratio_min, ratio_max, n_masked + 1)`` (stratified ratios), the others get empty masks,
    then the list is shuffled. With ``rng=random.Random(seed)`` the draws equal the official ones after
    ``random.seed(seed)`` (see ``dinolab.data.masking`` about DataLoader workers).

    Args:
        samples: ``B`` dicts ``{"global_crops": [g1, g2], "local_crops": [l1, ..., l_nL]}`` of [3, H, W] and
            [3, h, w] tensors (a ``(dict, target)`` tuple, the official dataset item, is accepted too).
        mask_ratio_min_max: range of the per-crop masked fraction (official (0.1, 0.5)).
        mask_probability: fraction of global crops that get a mask (official 0.5).
        mask_generator: block mask generator over the patch grid of a global crop.
        n_tokens: number of patches N of a global crop (``(H / patch) * (W / patch)``).
        dtype: cast the crop tensors to this dtype (``None`` keeps theirs).
        rng: source of randomness; ``None`` uses the ``random`` module (official).

    Returns:
        dict with
          ``global_crops`` [2B, 3, H, W], crop-major: all first global crops, then all second ones;
          ``local_crops`` [nL * B, 3, h, w], crop-major ([0, 3, 0, 0] when there are none);
          ``masks`` [2B, N] bool, aligned with ``global_crops``;
          ``mask_indices`` [M] int64, flat indices into ``masks.flatten()`` of the masked tokens;
          ``masks_weight`` [M] float32, ``1 / (#masked tokens in that token's image)``;
          ``n_masked_patches`` [1] int64, ``M``;
          ``upperbound`` int, ``sum_i int(N * probs[i + 1])``: a static bound on ``M`` for fixed buffers.
    """
    if not samples:
        raise ValueError("collate_crops: got an empty list of samples")
    crops = [_crops_of(sample) for sample in samples]
    global_crops = _stack_crop_major([c["global_crops"] for c in crops], "global_crops")
    local_crops = _stack_crop_major([c["local_crops"] for c in crops], "local_crops")
    if local_crops is None:
        local_crops = global_crops.new_zeros((0, global_crops.shape[1], 0, 0))
    if dtype is not None:
        global_crops, local_crops = global_crops.to(dtype), local_crops.to(dtype)
    masks, upperbound = _draw_masks(
        len(global_crops), n_tokens, mask_ratio_min_max, mask_probability, mask_generator, as_random_source(rng)
    )
    mask_indices = masks.flatten().nonzero().flatten()
    masks_weight = (1 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks]
    return {
        "global_crops": global_crops,
        "local_crops": local_crops,
        "masks": masks,
        "mask_indices": mask_indices,
        "masks_weight": masks_weight,
        "n_masked_patches": torch.full((1,), fill_value=mask_indices.shape[0], dtype=torch.long),
        "upperbound": upperbound,
    }


def _crops_of(sample: Mapping[str, Any] | tuple) -> Mapping[str, Any]:
    if isinstance(sample, tuple):  # official dataset items are (crops dict, target)
        sample = sample[0]
    if not isinstance(sample, Mapping) or "global_crops" not in sample or "local_crops" not in sample:
        raise ValueError("collate_crops: each sample must be a dict with 'global_crops' and 'local_crops' lists")
    return sample


def _stack_crop_major(per_sample: list[Sequence[torch.Tensor]], key: str) -> torch.Tensor | None:
    """[B lists of n crops] -> [n * B, ...] with crop index outermost; ``None`` when n == 0."""
    n_crops = len(per_sample[0])
    if any(len(c) != n_crops for c in per_sample):
        raise ValueError(f"collate_crops: every sample must have the same number of {key}, got {n_crops} and others")
    if n_crops == 0:
        return None
    return torch.stack([crops[i] for i in range(n_crops) for crops in per_sample])


def _draw_masks(
    n_images: int,
    n_tokens: int,
    mask_ratio_min_max: tuple[float, float],
    mask_probability: float,
    mask_generator: MaskingGenerator,
    rng: RandomSource,
) -> tuple[torch.Tensor, int]:
    """Stratified-ratio masks for ``int(n_images * mask_probability)`` images: ([n_images, N] bool, upperbound)."""
    ratio_min, ratio_max = mask_ratio_min_max
    if not 0.0 <= ratio_min <= ratio_max <= 1.0:
        raise ValueError(
            f"collate_crops: mask_ratio_min_max must satisfy 0 <= min <= max <= 1, got {mask_ratio_min_max}"
        )
    if not 0.0 <= mask_probability <= 1.0:
        raise ValueError(f"collate_crops: mask_probability must be in [0, 1], got {mask_probability}")
    grid = mask_generator.get_shape()
    if grid[0] * grid[1] != n_tokens:
        raise ValueError(f"collate_crops: mask generator grid {grid} does not have n_tokens={n_tokens} patches")
    n_masked = int(n_images * mask_probability)
    # float32 tensors as in the official code, so int() truncations agree with it bit for bit
    probs = torch.linspace(ratio_min, ratio_max, n_masked + 1)
    masks, upperbound = [], 0
    for i in range(n_masked):
        ratio = probs[i] + (probs[i + 1] - probs[i]) * rng.random()  # = random.uniform(probs[i], probs[i+1])
        masks.append(torch.from_numpy(mask_generator(int(n_tokens * ratio), rng=rng)))
        upperbound += int(n_tokens * probs[i + 1])
    masks.extend(torch.from_numpy(mask_generator(0, rng=rng)) for _ in range(n_masked, n_images))
    rng.shuffle(masks)
    return torch.stack(masks).flatten(1), upperbound
