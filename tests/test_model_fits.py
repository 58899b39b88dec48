"""Every command fits the model it is given: ``--run DIR`` gives extract, eval, viz and curate the run's
architecture and its global crop size; weights alone give their own architecture and grid; ``train
--print-config`` prints the resolved config."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from dinolab.cli import main

sys.path.insert(0, str(Path(__file__).parent / "train"))
from tiny_run import TINY_RUN  # noqa: E402

CROP = 16  # TINY_RUN's crops.global_crops_size; the cpu preset's patch is 4: a 4 x 4 grid


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from dinolab.configs import load_config
    from dinolab.train.loop import train

    root = tmp_path_factory.mktemp("fits")
    x = np.random.default_rng(0).integers(0, 255, (24, 20, 20, 3), dtype=np.uint8)
    data = root / "data.npz"
    np.savez(data, x_train=x[:18], y_train=np.arange(18) % 3, x_test=x[18:], y_test=np.arange(6) % 3)
    train(load_config("cpu", [*TINY_RUN, "train.max_iters=1"], base={"data": {"path": str(data)}}), root / "run",
          progress=False)
    images = root / "images"
    images.mkdir()
    from PIL import Image

    for i in range(3):
        Image.fromarray(x[i]).save(images / f"{i}.png")
    return root / "run", images, data


def test_run_and_weights_resolve_to_the_runs_arch_and_size(run):
    from dinolab.models.resolve import resolve_backbone

    run_dir, _, _ = run
    by_run = resolve_backbone(run=run_dir)
    assert by_run.input_size == CROP and by_run.model.patch_size == 4 and by_run.model.embed_dim == 32
    by_weights = resolve_backbone(weights=run_dir / "teacher_backbone.safetensors")
    assert by_weights.model.patch_size == 4 and by_weights.input_size == 4 * 4  # its 4 x 4 position grid
    official = resolve_backbone(arch="vits14")  # 37 x 37 grid: capped at 16 patches, the official 224
    assert official.input_size == 224
    with pytest.raises(ValueError, match="--run already names"):
        resolve_backbone(run=run_dir, arch="vits14")


def test_extract_with_run_uses_its_crop_size(run, tmp_path):
    from dinolab.features.store import load_features

    run_dir, images, _ = run
    out = tmp_path / "f.npz"
    assert main(["extract", "--run", str(run_dir), "--images", str(images), "--out", str(out), "--patch-tokens"]) == 0
    feats = load_features(out)
    assert feats["cls_tokens"].shape == (3, 32)
    assert feats["patch_tokens"].shape == (3, (CROP // 4) ** 2, 32)  # 16 px at patch 4


def test_eval_with_run_uses_its_crop_size(run, tmp_path):
    run_dir, _, data = run
    out = tmp_path / "r.json"
    assert main(["eval", "knn", "--run", str(run_dir), "--data", str(data), "--out", str(out), "--no-cache",
                 "--set", "ks=[1]"]) == 0
    assert json.loads(out.read_text())["config"]["image_size"] == CROP


def test_viz_with_run_scales_its_default_size(run, tmp_path):
    from PIL import Image

    run_dir, images, _ = run
    out = tmp_path / "att.png"
    assert main(["viz", "attention", str(images / "0.png"), "--run", str(run_dir), "--out", str(out)]) == 0
    assert Image.open(out).size[0] > 0


def test_curate_with_run_embeds_at_its_crop_size(run):
    import argparse

    from dinolab.curate.cli import build_config, register

    run_dir, images, _ = run
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["curate", "--pool", str(images), "--out", "x", "--run", str(run_dir)])
    cfg = build_config(args)
    assert cfg.arch == "auto" and cfg.weights.endswith("teacher_backbone.safetensors")
    assert cfg.embed.crop_size == CROP and cfg.embed.resize_size == round(CROP * 256 / 224)


def test_print_config_prints_the_resolved_config(capsys, tmp_path):
    assert main(["train", "--print-config", "--output", str(tmp_path / "r"), "optim.base_lr=2e-3"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["optim"]["base_lr"] == 2e-3 and cfg["train"]["batch_size_per_gpu"] == 64  # the demo preset's
    assert not (tmp_path / "r").exists()
