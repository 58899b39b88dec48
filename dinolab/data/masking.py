"""iBOT block masking: random rectangles of patches, as the official ``dinov2/data/masking.py``.

Given the official random stream, the masks are identical: with ``rng=random.Random(seed)`` this generator
draws the same numbers, in the same order, as the official one does from the ``random`` module after
``random.seed(seed)``.

Randomness and DataLoader workers: with ``rng=None`` the module-level ``random`` is used (official
behaviour), which PyTorch re-seeds in every worker. A ``random.Random`` bound once (e.g. through
``functools.partial``) is copied into every worker with the same state, so all workers would draw the
same masks: give each worker its own generator (``worker_init_fn``) or keep ``rng=None`` there.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Protocol

import numpy as np


class RandomSource(Protocol):
    """The part of ``random.Random`` the masking and collate code draws from."""

    def random(self) -> float: ...

    def uniform(self, a: float, b: float) -> float: ...

    def randint(self, a: int, b: int) -> int: ...

    def shuffle(self, x: list) -> None: ...


class NumpyRandomSource:
    """Adapts ``numpy.random.Generator`` to ``RandomSource`` (a different stream from ``random.Random``)."""

    def __init__(self, generator: np.random.Generator) -> None:
        self.generator = generator

    def random(self) -> float:
        return float(self.generator.random())

    def uniform(self, a: float, b: float) -> float:
        return a + (b - a) * self.random()

    def randint(self, a: int, b: int) -> int:
        return int(self.generator.integers(a, b + 1))

    def shuffle(self, x: list) -> None:
        order = self.generator.permutation(len(x))
        x[:] = [x[i] for i in order]


def as_random_source(rng: random.Random | np.random.Generator | RandomSource | None) -> RandomSource:
    """``None`` -> the ``random`` module; a numpy Generator -> ``NumpyRandomSource``; else as is."""
    if rng is None:
        return random  # type: ignore[return-value]
    if isinstance(rng, np.random.Generator):
        return NumpyRandomSource(rng)
    return rng


@dataclass(frozen=True)
class Block:
    """A candidate rectangle of patches: rows ``top:top+height``, columns ``left:left+width``."""

    top: int
    left: int
    height: int
    width: int


class MaskingGenerator:
    """Blockwise mask of a ``height x width`` patch grid with a requested number of masked patches.

    Blocks are added until the requested count is reached or a block cannot be placed: each block has a
    target area uniform in ``[min_num_patches, min(remaining, max_num_patches)]`` and a log-uniform aspect
    ratio (height / width) in ``[min_aspect, max_aspect]``, before rounding its sides to integers; it must
    be strictly smaller than the grid on both sides, is placed uniformly, and is kept when it adds between
    1 and ``remaining`` new patches; up to 10 attempts per block. The result never exceeds the request
    (it may fall short).

    Args:
        input_size: patch grid ``(height, width)``, or one int for a square grid.
        max_num_patches: largest block area; ``None`` -> ``0.5 * height * width`` (what the official
            ``train.py`` passes).
        min_num_patches: smallest block area (official 4).
        min_aspect: smallest height/width ratio (official 0.3).
        max_aspect: largest ratio; ``None`` -> ``1 / min_aspect``.
    """

    max_attempts = 10

    def __init__(
        self,
        input_size: int | tuple[int, int],
        max_num_patches: float | None = None,
        min_num_patches: int = 4,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
    ) -> None:
        if isinstance(input_size, int):
            input_size = (input_size, input_size)
        self.height, self.width = (int(s) for s in input_size)
        if self.height <= 0 or self.width <= 0:
            raise ValueError(f"MaskingGenerator: input_size must be positive, got {input_size}")
        if min_aspect <= 0:
            raise ValueError(f"MaskingGenerator: min_aspect must be positive, got {min_aspect}")
        self.num_patches = self.height * self.width
        self.max_num_patches = 0.5 * self.num_patches if max_num_patches is None else max_num_patches
        self.min_num_patches = min_num_patches
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

    def __repr__(self) -> str:
        return (
            f"MaskingGenerator(grid={self.height}x{self.width}, block area {self.min_num_patches}"
            f"..{self.max_num_patches}, log aspect {self.log_aspect_ratio[0]:.3f}..{self.log_aspect_ratio[1]:.3f})"
        )

    def get_shape(self) -> tuple[int, int]:
        return self.height, self.width

    def sample_block(self, max_mask_patches: float, rng: RandomSource) -> Block | None:
        """Draw one candidate block; ``None`` when it does not fit strictly inside the grid."""
        target_area = rng.uniform(self.min_num_patches, max_mask_patches)
        aspect_ratio = math.exp(rng.uniform(*self.log_aspect_ratio))
        height = int(round(math.sqrt(target_area * aspect_ratio)))
        width = int(round(math.sqrt(target_area / aspect_ratio)))
        if not (width < self.width and height < self.height):
            return None
        top = rng.randint(0, self.height - height)
        left = rng.randint(0, self.width - width)
        return Block(top, left, height, width)

    def _add_block(self, mask: np.ndarray, max_mask_patches: float, rng: RandomSource) -> int:
        """Mask one block in place (up to ``max_attempts`` tries); returns the number of new patches."""
        for _ in range(self.max_attempts):
            block = self.sample_block(max_mask_patches, rng)
            if block is None:
                continue
            region = mask[block.top : block.top + block.height, block.left : block.left + block.width]
            n_new = block.height * block.width - int(region.sum())
            if 0 < n_new <= max_mask_patches:  # adds something, and not more than is still wanted
                region[...] = True
                return n_new
        return 0

    def __call__(
        self, num_masking_patches: int = 0, rng: random.Random | np.random.Generator | RandomSource | None = None
    ) -> np.ndarray:
        """Mask of about ``num_masking_patches`` patches: [height, width] bool (all False for 0)."""
        source = as_random_source(rng)
        mask = np.zeros(self.get_shape(), dtype=bool)
        mask_count = 0
        while mask_count < num_masking_patches:
            max_mask_patches = min(num_masking_patches - mask_count, self.max_num_patches)
            delta = self._add_block(mask, max_mask_patches, source)
            if delta == 0:
                break
            mask_count += delta
        return mask
