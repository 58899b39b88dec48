from __future__ import annotations

import math
import random

import numpy as np
import pytest

from dinolab.data.masking import Block, MaskingGenerator


def _official_mask(height, width, num_masking_patches, max_num_patches, min_num_patches=4, min_aspect=0.3):
    """Frozen re-statement of dinov2 MaskingGenerator.__call__ drawing from the `random` module (our own code)."""
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    mask = np.zeros((height, width), dtype=bool)
    count = 0
    while count < num_masking_patches:
        budget = min(num_masking_patches - count, max_num_patches)
        delta = 0
        for _ in range(10):
            area = random.uniform(min_num_patches, budget)
            aspect = math.exp(random.uniform(*log_aspect))
            h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if w < width and h < height:
                top, left = random.randint(0, height - h), random.randint(0, width - w)
                already = mask[top : top + h, left : left + w].sum()
                if 0 < h * w - already <= budget:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if not mask[i, j]:
                                mask[i, j] = True
                                delta += 1
            if delta > 0:
                break
        if delta == 0:
            break
        count += delta
    return mask


class _RecordingGenerator(MaskingGenerator):
    """Keeps every candidate block with the budget it was drawn under."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.blocks: list[tuple[Block, float]] = []

    def sample_block(self, max_mask_patches, rng):
        block = super().sample_block(max_mask_patches, rng)
        if block is not None:
            self.blocks.append((block, max_mask_patches))
        return block


@pytest.mark.parametrize("grid", [(16, 16), (12, 20)])
def test_equals_official_generator_for_the_same_random_stream(grid):
    height, width = grid
    generator = MaskingGenerator(grid, max_num_patches=0.5 * height * width)
    for seed in range(5):
        ours_rng = random.Random(seed)
        random.seed(seed)
        for n in (0, 3, 4, 17, 60, int(0.5 * height * width)):
            expected = _official_mask(height, width, n, 0.5 * height * width)
            np.testing.assert_array_equal(generator(n, rng=ours_rng), expected)


def test_mask_counts_within_request_and_half_the_grid():
    generator = MaskingGenerator((16, 16))  # max_num_patches defaults to 0.5 * 256
    assert generator.max_num_patches == 128
    rng = random.Random(0)
    fill = []
    for n in range(26, 129):  # the stratified range 0.1 N .. 0.5 N
        for _ in range(5):
            count = int(generator(n, rng=rng).sum())
            assert 0 < count <= n <= 128
            fill.append(count / n)
    assert np.mean(fill) > 0.95  # the generator rarely falls short of the request


def test_each_block_respects_area_and_aspect_up_to_rounding():
    generator = _RecordingGenerator((16, 16))
    rng = random.Random(1)
    for n in range(4, 129, 3):
        generator(n, rng=rng)
    assert len(generator.blocks) > 100
    for block, budget in generator.blocks:
        h, w = block.height, block.width
        assert 1 <= h < 16 and 1 <= w < 16  # strictly inside the grid
        assert 0 <= block.top <= 16 - h and 0 <= block.left <= 16 - w
        # h = round(sqrt(A r)), w = round(sqrt(A / r)) with r in [0.3, 1/0.3] and A between 4 and the budget:
        # undo the rounding (+-0.5 on each side) and the ranges must still be reachable
        assert (h - 0.5) / (w + 0.5) <= 1 / 0.3 and (h + 0.5) / (w - 0.5) >= 0.3
        assert (h - 0.5) * (w - 0.5) <= max(budget, 4)
        assert (h + 0.5) * (w + 0.5) >= min(budget, 4)


def test_zero_request_is_empty_and_draws_nothing():
    generator = MaskingGenerator((8, 8))
    rng = random.Random(3)
    state = rng.getstate()
    assert not generator(0, rng=rng).any()
    assert rng.getstate() == state


def test_numpy_generator_is_reproducible():
    generator = MaskingGenerator((14, 14))
    draw = lambda seed: [generator(n, rng=np.random.default_rng(seed)) for n in (20, 50, 90)]  # noqa: E731
    for a, b in zip(draw(7), draw(7)):
        np.testing.assert_array_equal(a, b)
    assert any((a != b).any() for a, b in zip(draw(7), draw(8)))


def test_rejects_bad_sizes():
    with pytest.raises(ValueError, match="input_size"):
        MaskingGenerator((0, 4))
    with pytest.raises(ValueError, match="min_aspect"):
        MaskingGenerator(8, min_aspect=0.0)
