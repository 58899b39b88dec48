"""Images per second of the pretraining data loader alone (dataset + multi-crop + collate).

Two settings, each with 0, 1 and 2 DataLoader workers:
  official  2 x 224 + 8 x 98 crops (ViT-*/14 recipe) on ``--data``
  small     2 x 32 + 6 x 16 crops (the small CPU preset, patch 4) on ``--small-data``

Baselines, printed as ratios: reading the images alone in this run (the loader's floor on this
disk/CPU), and the training steps the loader must feed on this 2-core CPU (constants measured
elsewhere: the official ViT recipe's step at 0.90 images/s, the small preset's at 37 images/s).

    .venv/bin/python bench/loader.py --data ../shared/data/imagenette/imagenette.npz \
        --small-data ../shared/data/cifar10/cifar10.npz
"""

from __future__ import annotations

import argparse
import functools
import time
from itertools import islice

import torch
from torch.utils.data import DataLoader

from dinolab.configs.schema import CropsConfig
from dinolab.data.augment import MultiCropAugmentation
from dinolab.data.collate import collate_crops
from dinolab.data.datasets import MultiCropDataset, open_dataset
from dinolab.data.masking import MaskingGenerator
from dinolab.data.samplers import InfiniteSampler

TRAIN_STEP_IMAGES_PER_S = {"official": 0.90, "small": 37.0}
SETTINGS = {
    # name: (augmentation, patch size, batch size)
    "official": (MultiCropAugmentation(CropsConfig(local_crops_size=98)), 14, 16),
    "small": (MultiCropAugmentation(CropsConfig(global_crops_size=32, local_crops_size=16, local_crops_number=6)), 4, 64),
}


def make_loader(path: str, setting: str, workers: int) -> tuple[DataLoader, int]:
    """Infinite multi-crop loader as training builds it: (loader, batch size)."""
    augmentation, patch, batch = SETTINGS[setting]
    grid = augmentation.global_crops_size // patch
    collate = functools.partial(
        collate_crops, mask_generator=MaskingGenerator(grid), n_tokens=grid * grid
    )
    images = open_dataset(path)
    dataset = MultiCropDataset(images, augmentation, seed=0)
    sampler = InfiniteSampler(len(images), seed=0, yield_keys=True)
    loader = DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=workers, collate_fn=collate)
    return loader, batch


def loader_images_per_s(path: str, setting: str, workers: int, images: int) -> float:
    """Images/s over ``images`` images, after one warm-up batch (worker start-up excluded)."""
    loader, batch = make_loader(path, setting, workers)
    it = iter(loader)
    next(it)
    n_batches = max(1, images // batch)
    start = time.perf_counter()
    for _ in islice(it, n_batches):
        pass
    return n_batches * batch / (time.perf_counter() - start)


def read_images_per_s(path: str, images: int) -> float:
    """Images/s of reading (decoding) alone, in this process: the floor under any augmentation."""
    dataset = open_dataset(path)
    n = min(images, len(dataset))
    start = time.perf_counter()
    for i in range(n):
        dataset[i].load()
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="images for the official setting (folder, .npz, ...)")
    parser.add_argument("--small-data", help="images for the small setting (default: --data)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--images", type=int, default=128, help="images timed per measurement (official)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as in a DataLoader worker; also keeps workers=0 comparable
    paths = {"official": args.data, "small": args.small_data or args.data}
    counts = {"official": args.images, "small": args.images * 8}
    print(f"{'setting':9s} {'workers':>7s} {'images/s':>9s} {'x read-only':>11s} {'x train step':>12s}")
    for setting, path in paths.items():
        read = read_images_per_s(path, counts[setting])
        print(f"{setting:9s} {'read':>7s} {read:9.1f} {1.0:11.2f} {read / TRAIN_STEP_IMAGES_PER_S[setting]:12.1f}")
        for workers in args.workers:
            ips = loader_images_per_s(path, setting, workers, counts[setting])
            step = TRAIN_STEP_IMAGES_PER_S[setting]
            print(f"{setting:9s} {workers:7d} {ips:9.1f} {ips / read:11.3f} {ips / step:12.1f}")


if __name__ == "__main__":
    main()
