"""The one-call Python API equals the command line: ``dinolab.train(...)`` and ``dinolab train``,
``dinolab.embed(...)`` and ``dinolab extract``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

import dinolab
from dinolab.cli import main

sys.path.insert(0, str(Path(__file__).parent / "train"))
from tiny_run import TINY_RUN  # noqa: E402


@pytest.fixture
def data(tmp_path):
    x = np.random.default_rng(0).integers(0, 255, (24, 20, 20, 3), dtype=np.uint8)
    path = tmp_path / "data.npz"
    np.savez(path, x_train=x)
    return path


def losses(run: Path) -> list[dict]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in ("iteration", "dino", "ibot", "koleo", "total")} for r in records if "total" in r]


def test_train_call_equals_the_cli(data, tmp_path):
    import dinolab.train.loop  # noqa: F401 (the subpackage import must not hide the callable)

    overrides = [*TINY_RUN, "train.max_iters=2"]
    assert main(["train", "--data", str(data), "--output", str(tmp_path / "cli"), "--no-progress", *overrides]) == 0
    summary = dinolab.train(data=data, output=tmp_path / "api", progress=False, overrides=overrides[:-1],
                            train__max_iters=2)
    assert summary["iterations"] == 2
    assert losses(tmp_path / "api") == losses(tmp_path / "cli")
    assert (tmp_path / "api" / "config.yaml").read_text() == (tmp_path / "cli" / "config.yaml").read_text()


def test_train_call_refuses_bad_input_in_one_line(tmp_path):
    with pytest.raises(ValueError, match="optim.base_lr must be a finite number"):
        dinolab.train(output=tmp_path / "r", optim__base_lr=float("inf"))
    assert not (tmp_path / "r").exists()


def test_embed_equals_extract(tmp_path):
    from PIL import Image

    from dinolab.features.store import load_features
    from dinolab.models import build_backbone
    from dinolab.models.checkpoints import save_backbone

    model = build_backbone("vit_small", patch_size=14, embed_dim=32, depth=2, num_heads=2, img_size=56)
    weights = tmp_path / "w.safetensors"
    save_backbone(model, weights)
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (3, 60, 70, 3), dtype=np.uint8)
    for i, a in enumerate(pixels):
        Image.fromarray(a).save(folder / f"{i}.png")
    out = tmp_path / "f.npz"
    assert main(["extract", "--weights", str(weights), "--images", str(folder), "--out", str(out)]) == 0
    from_cli = load_features(out)["cls_tokens"]
    from_files = dinolab.embed(folder, weights, progress=False)["cls_tokens"]
    from_arrays = dinolab.embed(pixels, weights, progress=False)["cls_tokens"]  # PNG is lossless: same pixels
    assert from_cli.shape == (3, 32)
    np.testing.assert_array_equal(from_files, from_cli)
    np.testing.assert_allclose(from_arrays, from_cli, atol=1e-6)
