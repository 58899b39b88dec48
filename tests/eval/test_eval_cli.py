from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from dinolab.eval import cli
from dinolab.eval.knn import KnnConfig
from dinolab.eval.report import write_results
from dinolab.models.checkpoints import save_backbone


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dinolab")
    cli.register(parser.add_subparsers(dest="command"))
    return parser


def _run_dir(tmp_path, model):
    run = tmp_path / "run"
    run.mkdir()
    save_backbone(model, run / "teacher_backbone.safetensors")
    (run / "config.yaml").write_text(
        "student:\n  arch: vit_tiny\n  patch_size: 8\n  embed_dim: 32\n  depth: 2\n  num_heads: 2\n  layerscale: null\n"
    )
    return run


def test_build_config_applies_typed_overrides():
    cfg = cli.build_config("knn", ["ks=[5,7]", "temperature=0.1", "features.bf16=false"])
    assert cfg == KnnConfig(ks=(5, 7), temperature=0.1, features=cfg.features) and cfg.features.bf16 is False
    with pytest.raises(ValueError, match="Key 'nope' not in"):
        cli.build_config("knn", ["nope=1"])
    with pytest.raises(ValueError, match="must be key=value"):
        cli.build_config("knn", ["ks"])


def test_load_backbone_from_run_reproduces_the_model(tmp_path, tiny_model):
    model, info = cli.load_backbone_from_run(_run_dir(tmp_path, tiny_model))
    assert info["arch"] == "vit_tiny"
    for (k, a), b in zip(tiny_model.state_dict().items(), model.state_dict().values()):
        assert np.array_equal(a.numpy(), b.numpy()), k
    with pytest.raises(FileNotFoundError, match="teacher_backbone"):
        cli.load_backbone_from_run(tmp_path)


def test_eval_command_writes_json_and_report(tmp_path, tiny_model, classification_npz, capsys):
    out = tmp_path / "out" / "results.json"
    args = _parser().parse_args([
        "eval", "knn", "--run", str(_run_dir(tmp_path, tiny_model)), "--data", str(classification_npz),
        "--out", str(out), "--image-size", "32", "--cache-dir", str(tmp_path / "cache"), "--set", "ks=[1,3]",
        "features.progress=false",
    ])
    assert args.func(args) == 0
    result = json.loads(out.read_text())
    assert result["protocol"] == "knn"
    assert set(result["metrics"]) == {"knn/k1/top1", "knn/k1/top5", "knn/k3/top1", "knn/k3/top5"}
    assert result["config"]["ks"] == [1, 3] and result["config"]["image_size"] == 32
    assert result["model"]["arch"] == "vit_tiny"
    assert (tmp_path / "out" / "results_confusion.png").stat().st_size > 0
    assert "knn/k3/top1" in (tmp_path / "out" / "results.md").read_text()
    captured = capsys.readouterr()
    assert "knn/k1/top1" in captured.out
    # the old spelling still works, with one line saying so
    assert [line for line in captured.err.splitlines() if "deprecated" in line] == [
        "note: --set is deprecated: write the overrides as plain arguments, e.g. dinolab eval knn ... ks=[10,20]"
    ]


def test_overrides_are_plain_arguments_anywhere_on_the_line():
    from dinolab.cli import build_parser, parse_args

    args = parse_args(build_parser(), ["eval", "knn", "ks=[5]", "--data", "d.npz", "temperature=0.1",
                                       "--batch-size", "8", "features.progress=false"])
    assert args.overrides == ["ks=[5]", "temperature=0.1", "features.progress=false"] and args.set_overrides == []
    cfg = cli.build_config("knn", args.overrides)
    assert cfg.ks == (5,) and cfg.temperature == 0.1 and cfg.features.progress is False
    with pytest.raises(ValueError, match=r"^invalid knn config: temperature: Value 'abc' of type 'str'"):
        cli.build_config("knn", ["temperature=abc"])


def test_report_draws_every_picture(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (12, 16, 3)).astype(np.uint8)
    mask = rng.integers(0, 3, (12, 16))
    artifacts = {
        "confusion": np.array([[3, 1], [0, 4]]), "class_names": ["a", "b", "c"], "ignore_index": 255,
        "seg_samples": [(image, mask, mask)],
        "depth_samples": [("indoor", image, rng.uniform(0, 5, (12, 16)), rng.uniform(0, 5, (12, 16)))],
        "retrieval_examples": [{"query": image, "retrieved": [image, image], "relevance": [1, -1]}],
        "notes": ["constructed set"],
    }
    metrics = {"x": 1.0, "nan": float("nan")}
    paths = write_results(tmp_path / "r.json", "demo", metrics, KnnConfig(), artifacts=artifacts)
    names = {p.name for p in paths}
    assert {"r_confusion.png", "r_segmentation.png", "r_depth.png", "r_retrieval.png", "r.md"} <= names
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["metrics"]["nan"] is None and result["notes"] == ["constructed set"]
