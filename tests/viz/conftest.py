"""Shared fixtures for the viz tests: a tiny random backbone and generated images (no /work/shared data)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dinolab.models import DinoVisionTransformer

TINY_PATCH = 8


def make_tiny_model(num_register_tokens: int = 2) -> DinoVisionTransformer:
    """A 2-block ViT with 8-pixel patches and registers, random but seeded."""
    with torch.random.fork_rng():  # seeded without disturbing other tests' global RNG
        torch.manual_seed(0)
        model = DinoVisionTransformer(
            img_size=32, patch_size=TINY_PATCH, embed_dim=32, depth=2, num_heads=2,
            num_register_tokens=num_register_tokens,
        )
    return model.eval()


def object_image(size: int = 64, seed: int = 0) -> Image.Image:
    """A flat grey background with a coloured, textured square object off-centre."""
    rng = np.random.default_rng(seed)
    arr = np.full((size, size, 3), 128, dtype=np.uint8)
    lo, hi = size // 4, size // 4 + size // 2
    arr[lo:hi, lo + 4 : hi + 4] = rng.integers(0, 255, size=(hi - lo, hi - lo, 3), dtype=np.uint8)
    return Image.fromarray(arr)


@pytest.fixture(scope="module")
def tiny_model() -> DinoVisionTransformer:
    return make_tiny_model()


@pytest.fixture
def image_files(tmp_path: Path) -> list[Path]:
    """Two generated 64x64 PNGs in a temporary folder."""
    paths = []
    for seed in range(2):
        path = tmp_path / f"object{seed}.png"
        object_image(seed=seed).save(path)
        paths.append(path)
    return paths


@pytest.fixture
def make_object_image():
    """The :func:`object_image` generator, for tests that need their own images."""
    return object_image


@pytest.fixture
def run_viz(monkeypatch, tiny_model):
    """Run a ``dinolab viz ...`` / ``dinolab serve`` command line with the tiny model; returns its exit code."""
    import argparse

    from dinolab.viz import cli as viz_cli

    from dinolab.models.resolve import ResolvedBackbone, native_input_size

    monkeypatch.setattr(viz_cli, "resolve_backbone", lambda weights=None, run=None, arch=None: ResolvedBackbone(
        tiny_model, native_input_size(tiny_model), {}))

    def run(argv: list[str]) -> int:
        parser = argparse.ArgumentParser(prog="dinolab")
        viz_cli.register(parser.add_subparsers(dest="command"))
        args = parser.parse_args(argv)
        return args.func(args)

    return run
