"""The training loader: images -> multi-crop samples -> masked batches, in a resumable order.

:func:`build_loader` assembles, from a :class:`~dinolab.configs.schema.Config`, the pieces of
``data/``: the augmentation of ``cfg.crops``, an :class:`~dinolab.data.samplers.InfiniteSampler`
that is rank-aware and yields sample keys, and a collate that draws the iBOT masks. Every random draw
is a function of ``train.seed`` and the sample (or batch) key, never of the worker or of the global
RNG, so the batches are the same with any ``num_workers`` and after a resume.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from dinolab.configs.schema import Config
from dinolab.data.augment import MultiCropAugmentation
from dinolab.data.collate import collate_crops
from dinolab.data.datasets import MultiCropDataset
from dinolab.data.masking import MaskingGenerator
from dinolab.data.samplers import InfiniteSampler


class KeyedSamples(Dataset):
    """Multi-crop samples that carry their sampler key, so the collate can seed its masks by it."""

    def __init__(self, inner: MultiCropDataset) -> None:
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, key: int) -> tuple[dict, int]:
        return self.inner[key], key


def collate_keyed(items: list[tuple[dict, int]], *, seed: int, **kwargs) -> dict:
    """:func:`~dinolab.data.collate.collate_crops` with masks seeded by ``(seed, 1, first key of the batch)``."""
    samples, keys = zip(*items)
    rng = np.random.default_rng([seed, 1, int(keys[0])])  # masks: a function of the batch, not the worker
    return collate_crops(samples, rng=rng, **kwargs)


def build_loader(cfg: Config, images: Dataset, rank: int = 0,
                 world_size: int = 1) -> tuple[DataLoader, InfiniteSampler]:
    """The endless training loader of ``cfg`` over ``images`` for one rank, and its sampler (for resume).

    Each batch holds ``train.batch_size_per_gpu`` multi-crop samples collated with iBOT masks on a
    ``global_crops_size / patch_size`` grid (no masks when distilling).
    """
    aug = MultiCropAugmentation(cfg.crops)
    dataset = KeyedSamples(MultiCropDataset(images, aug, seed=cfg.train.seed))
    sampler = InfiniteSampler(len(images), seed=cfg.train.seed, rank=rank, world_size=world_size, yield_keys=True)
    grid = cfg.crops.global_crops_size // cfg.student.patch_size
    collate = functools.partial(
        collate_keyed,
        seed=cfg.train.seed,
        mask_ratio_min_max=tuple(cfg.ibot.mask_ratio_min_max),
        mask_probability=0.0 if cfg.distill.enabled else cfg.ibot.mask_sample_probability,  # distillation: no masks
        mask_generator=MaskingGenerator((grid, grid), max_num_patches=0.5 * grid * grid),
        n_tokens=grid * grid,
    )
    workers = cfg.train.num_workers
    loader = DataLoader(
        dataset,
        # its own generator: creating the iterator (and its workers' seeds) must not draw from the global
        # RNG, which drives drop path and is restored on resume (else a resumed run's drop-path stream shifts)
        generator=torch.Generator().manual_seed(cfg.train.seed),
        batch_size=cfg.train.batch_size_per_gpu,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate,
        drop_last=True,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
    )
    return loader, sampler
