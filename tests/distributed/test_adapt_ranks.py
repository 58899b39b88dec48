"""``dinolab train --adapt`` on two CPU ranks (gloo, FSDP2): the head warm-up leaves the sharded backbone
bit for bit at the source weights, and afterwards the backbone trains and the feature anchor grows."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from dist_harness import run_ranks

sys.path.insert(0, str(Path(__file__).parents[1] / "train"))

from dinolab.models.checkpoints import save_backbone  # noqa: E402
from dinolab.models.factory import read_weights  # noqa: E402


def adapt_worker(rank: int, weights: str, data: str, out: str, extra: list[str]) -> None:
    from test_adapt import adapt_cfg

    from dinolab.train.loop import train

    train(adapt_cfg(weights, data, *extra), out, progress=False)


def test_adapt_on_two_ranks_freezes_then_trains_the_backbone(tmp_path):
    from test_adapt import source_model

    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (24, 20, 20, 3), dtype=np.uint8)
    y = np.arange(24) % 3
    data = tmp_path / "d.npz"
    np.savez(data, x_train=x[:18], y_train=y[:18], x_test=x[18:], y_test=y[18:])
    weights = tmp_path / "src.safetensors"
    save_backbone(source_model(), weights)
    source = read_weights(weights)
    # 18 images, global batch 2 x 8: one iteration per epoch
    warm = ["optim.epochs=3", "adapt.head_warmup_iters=6", "adapt.anchor_weight=0.1"]
    run_ranks(adapt_worker, 2, str(weights), str(data), str(tmp_path / "warm"), warm)
    exported = read_weights(tmp_path / "warm" / "teacher_backbone.safetensors")
    assert sorted(exported) == sorted(source) and all(torch.equal(exported[k], source[k]) for k in source)

    short = ["optim.epochs=4", "adapt.head_warmup_iters=1", "adapt.anchor_weight=0.1"]
    run_ranks(adapt_worker, 2, str(weights), str(data), str(tmp_path / "short"), short)
    exported = read_weights(tmp_path / "short" / "teacher_backbone.safetensors")
    assert any(not torch.equal(exported[k], source[k]) for k in source)
    records = [json.loads(line) for line in (tmp_path / "short" / "metrics.jsonl").read_text().splitlines()]
    anchors = [r["anchor"] for r in records if "anchor" in r]
    assert len(anchors) == 4 and anchors[0] < 1e-6 < 1e-4 < anchors[-1]
