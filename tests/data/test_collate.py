from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from dinolab.data.collate import collate_crops
from dinolab.data.masking import MaskingGenerator

GRID = 16
N_TOKENS = GRID * GRID


def _samples(batch: int, n_local: int = 3) -> list[dict]:
    """Crops filled with 100 * crop_id + sample so their position after collation can be read back."""
    return [
        {
            "global_crops": [torch.full((3, 8, 8), 100.0 * g + b) for g in range(2)],
            "local_crops": [torch.full((3, 4, 4), 100.0 * (10 + l) + b) for l in range(n_local)],
        }
        for b in range(batch)
    ]


def _official_collate_masks(n_images, mask_generator_official, ratio=(0.1, 0.5), probability=0.5):
    """Frozen re-statement of the masking half of dinov2 collate_data_and_cast (our own code)."""
    n_masked = int(n_images * probability)
    probs = torch.linspace(*ratio, n_masked + 1)
    upperbound, masks = 0, []
    for i in range(n_masked):
        n_patches = int(N_TOKENS * random.uniform(probs[i], probs[i + 1]))
        masks.append(torch.BoolTensor(mask_generator_official(n_patches)))
        upperbound += int(N_TOKENS * probs[i + 1])
    masks += [torch.BoolTensor(mask_generator_official(0)) for _ in range(n_masked, n_images)]
    random.shuffle(masks)
    collated = torch.stack(masks).flatten(1)
    weights = (1 / collated.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(collated)[collated]
    return collated, collated.flatten().nonzero().flatten(), weights, upperbound


class _RequestRecorder(MaskingGenerator):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.requests: list[int] = []

    def __call__(self, num_masking_patches=0, rng=None):
        self.requests.append(num_masking_patches)
        return super().__call__(num_masking_patches, rng=rng)


def test_crop_major_stacking_shapes_and_dtype():
    batch = 4
    out = collate_crops(
        _samples(batch),
        mask_generator=MaskingGenerator(GRID),
        n_tokens=N_TOKENS,
        dtype=torch.float16,
        rng=random.Random(0),
    )
    assert out["global_crops"].shape == (2 * batch, 3, 8, 8) and out["global_crops"].dtype == torch.float16
    assert out["local_crops"].shape == (3 * batch, 3, 4, 4)
    for g in range(2):
        for b in range(batch):
            assert out["global_crops"][g * batch + b, 0, 0, 0].item() == 100 * g + b
    for l in range(3):
        for b in range(batch):
            assert out["local_crops"][l * batch + b, 0, 0, 0].item() == 100 * (10 + l) + b
    assert out["masks"].shape == (2 * batch, N_TOKENS) and out["masks"].dtype == torch.bool


def test_masks_indices_weights_are_consistent():
    batch = 8
    out = collate_crops(_samples(batch), mask_generator=MaskingGenerator(GRID), n_tokens=N_TOKENS, rng=random.Random(1))
    masks = out["masks"]
    per_image = masks.sum(dim=1)
    assert int((per_image > 0).sum()) == int(2 * batch * 0.5)  # half of the global crops are masked
    torch.testing.assert_close(out["mask_indices"], torch.nonzero(masks.flatten()).flatten())
    assert out["n_masked_patches"].tolist() == [int(masks.sum())]
    assert int(masks.sum()) <= out["upperbound"]
    # every masked image's weights sum to 1, so the weights sum to the number of masked images
    image_of_token = out["mask_indices"] // N_TOKENS
    torch.testing.assert_close(out["masks_weight"], 1.0 / per_image[image_of_token].float())
    assert out["masks_weight"].sum().item() == pytest.approx(int((per_image > 0).sum()))


def test_stratified_ratio_ranges():
    batch = 10  # 20 global crops, 10 masked, probs = linspace(0.1, 0.5, 11)
    generator = _RequestRecorder(GRID)
    out = collate_crops(_samples(batch), mask_generator=generator, n_tokens=N_TOKENS, rng=random.Random(2))
    probs = torch.linspace(0.1, 0.5, 11)
    for i, request in enumerate(generator.requests[:10]):  # the i-th request is drawn in the i-th stratum
        assert int(N_TOKENS * probs[i]) <= request <= int(N_TOKENS * probs[i + 1])
    assert generator.requests[10:] == [0] * 10
    assert out["upperbound"] == sum(int(N_TOKENS * probs[i + 1]) for i in range(10))
    # the shuffle spreads the masked images over both global crops
    masked_rows = torch.nonzero(out["masks"].any(dim=1)).flatten()
    assert masked_rows.min() < batch <= masked_rows.max()


def test_equals_official_collate_for_the_same_random_stream():
    batch = 6
    generator = MaskingGenerator(GRID)
    for seed in range(3):
        random.seed(seed)
        expected = _official_collate_masks(2 * batch, lambda n: generator(n))  # rng=None: the random module
        out = collate_crops(_samples(batch), mask_generator=generator, n_tokens=N_TOKENS, rng=random.Random(seed))
        torch.testing.assert_close(out["masks"], expected[0])
        torch.testing.assert_close(out["mask_indices"], expected[1])
        torch.testing.assert_close(out["masks_weight"], expected[2])
        assert out["upperbound"] == expected[3]


def test_numpy_rng_reproducible_and_official_tuple_items():
    generator = MaskingGenerator(GRID)
    samples = [(s, ()) for s in _samples(4)]  # official dataset items are (crops, target)
    a = collate_crops(samples, mask_generator=generator, n_tokens=N_TOKENS, rng=np.random.default_rng(5))
    b = collate_crops(samples, mask_generator=generator, n_tokens=N_TOKENS, rng=np.random.default_rng(5))
    torch.testing.assert_close(a["masks"], b["masks"])


def test_no_local_crops_and_bad_inputs():
    generator = MaskingGenerator(GRID)
    out = collate_crops(_samples(2, n_local=0), mask_generator=generator, n_tokens=N_TOKENS, rng=random.Random(0))
    assert out["local_crops"].shape[0] == 0
    with pytest.raises(ValueError, match="n_tokens"):
        collate_crops(_samples(2), mask_generator=generator, n_tokens=100, rng=random.Random(0))
    with pytest.raises(ValueError, match="empty"):
        collate_crops([], mask_generator=generator, n_tokens=N_TOKENS)
    with pytest.raises(ValueError, match="mask_ratio_min_max"):
        collate_crops(_samples(2), mask_ratio_min_max=(0.5, 0.1), mask_generator=generator, n_tokens=N_TOKENS)
