"""The training loader: batch shapes from the config, batches a pure function of the seed and rank."""

from __future__ import annotations

import numpy as np
import torch

from dinolab.configs.schema import load_config
from dinolab.data.datasets import ArrayImages
from dinolab.data.loader import build_loader

IMAGES = ArrayImages(np.random.default_rng(0).integers(0, 256, (7, 30, 26, 3), dtype=np.uint8), source="test")
CROPS = ["crops.global_crops_size=28", "crops.local_crops_size=14", "crops.local_crops_number=3",
         "student.patch_size=14", "train.batch_size_per_gpu=2", "train.num_workers=0"]


def _batches(n: int, *overrides: str, rank: int = 0, world_size: int = 1) -> list[dict]:
    loader, _ = build_loader(load_config("cpu", [*CROPS, *overrides]), IMAGES, rank, world_size)
    it = iter(loader)
    return [next(it) for _ in range(n)]


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in ("global_crops", "local_crops", "masks"))


def test_batch_shapes_follow_the_config() -> None:
    (batch,) = _batches(1)
    assert tuple(batch["global_crops"].shape) == (2 * 2, 3, 28, 28)  # 2 global crops x batch 2
    assert tuple(batch["local_crops"].shape) == (3 * 2, 3, 14, 14)
    assert tuple(batch["masks"].shape) == (2 * 2, 2 * 2)  # one mask per global crop over the 2 x 2 patch grid


def test_same_seed_same_batches_other_seed_or_rank_other_batches() -> None:
    first, again = _batches(2), _batches(2)
    assert all(_same(a, b) for a, b in zip(first, again))
    assert not _same(first[0], _batches(1, "train.seed=1")[0])
    assert not _same(_batches(1, rank=0, world_size=2)[0], _batches(1, rank=1, world_size=2)[0])
