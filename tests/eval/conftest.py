"""Tiny models and synthetic datasets for the evaluation tests (no file under /work/shared is read)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dinolab.features.cache import FeatureConfig
from dinolab.models import DinoVisionTransformer


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """The tensors here are tiny: one thread avoids OpenMP waits when other jobs share the CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make_tiny_model(seed: int = 0) -> DinoVisionTransformer:
    torch.manual_seed(seed)
    return DinoVisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2).eval()


@pytest.fixture
def tiny_model() -> DinoVisionTransformer:
    return make_tiny_model()


@pytest.fixture
def feature_cfg(tmp_path: Path) -> FeatureConfig:
    return FeatureConfig(batch_size=16, cache_dir=str(tmp_path / "cache"), progress=False)


def write_classification_npz(path: Path, n_train: int = 30, n_test: int = 15, classes: int = 3, seed: int = 0) -> Path:
    """Images whose brightness encodes the class (so even random features separate them a bit)."""
    rng = np.random.default_rng(seed)

    def split(n: int):
        y = np.arange(n) % classes
        x = rng.integers(0, 50, (n, 16, 16, 3)) + (y * 90)[:, None, None, None]
        return x.astype(np.uint8), y.astype(np.int64)

    x_train, y_train = split(n_train)
    x_test, y_test = split(n_test)
    names = np.array([f"class{i}" for i in range(classes)])
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, class_names=names)
    return path


def write_segmentation_npz(path: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", 6), ("val", 2), ("test", 2)):
        mask = rng.integers(0, 3, (n, 16, 24)).astype(np.uint8)
        mask[:, :2] = 255
        arrays[f"x_{split}"] = (mask[..., None] % 255 * 70 + rng.integers(0, 30, (n, 16, 24, 3))).astype(np.uint8)
        arrays[f"mask_{split}"] = mask
    np.savez(path, **arrays, class_names=np.array(["a", "b", "c"]), ignore_index=np.array(255))
    return path


def write_depth_npz(path: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    np.savez(
        path,
        x_indoor=rng.integers(0, 255, (3, 16, 24, 3)).astype(np.uint8),
        depth_indoor_m=rng.uniform(0.5, 5, (3, 16, 24)).astype(np.float32),
        x_kitti=rng.integers(0, 255, (2, 16, 40, 3)).astype(np.uint8),
        depth_kitti_m=rng.uniform(0, 50, (2, 16, 40)).astype(np.float32),
    )
    return path


@pytest.fixture
def classification_npz(tmp_path: Path) -> Path:
    return write_classification_npz(tmp_path / "cls.npz")


@pytest.fixture
def segmentation_npz(tmp_path: Path) -> Path:
    return write_segmentation_npz(tmp_path / "seg.npz")


@pytest.fixture
def depth_npz(tmp_path: Path) -> Path:
    return write_depth_npz(tmp_path / "depth.npz")
