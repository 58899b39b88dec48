"""High-resolution adaptation: a run continued at a larger crop size, with every schedule compressed."""

import json
import math

import numpy as np
import pytest
import torch

from dinolab.cli import main
from dinolab.configs import load_config
from dinolab.models.checkpoints import read_state_dict, resample_pos_embed
from dinolab.train.checkpointer import load_meta_weights, read_model_state
from dinolab.train.loop import train
from dinolab.train.meta_arch import SSLMetaArch
from tiny_run import TINY_RUN

# source run: 6 iterations of which 3 of lr warmup and 3 of teacher-temperature warmup, global crops 16 (4x4 patches)
TINY = [*TINY_RUN, "optim.epochs=2", "train.max_iters=2", "optim.base_lr=1e-3", "optim.min_lr=1e-5"]


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("highres")
    rng = np.random.default_rng(0)
    data = root / "data.npz"
    np.savez(data, x_train=rng.integers(0, 255, (16, 20, 20, 3), dtype=np.uint8), y_train=np.arange(16) % 2)
    train(load_config("cpu", TINY, base={"data": {"path": str(data)}}), root / "source", progress=False)
    return str(data), root / "source" / "checkpoints" / "ckpt_0000002.pth"


def test_high_res_run_trains_at_the_new_size_with_compressed_schedules(source_run, tmp_path, capsys):
    data, ckpt = source_run
    run = tmp_path / "hr"
    # 4 iterations instead of the source's 6: warmups of 3 -> round(3 * 4 / 6) = 2 iterations
    code = main(["train", "--data", data, "--high-res", str(ckpt), "--output", str(run), "--no-progress",
                 "crops.global_crops_size=24", "optim.compress_to_iters=4", "train.max_iters=null",
                 "train.checkpoint_every=1", "train.keep_last=4"])
    assert code == 0, capsys.readouterr().err
    cfg = load_config(str(run / "config.yaml"))
    assert cfg.train.init_from == str(ckpt) and cfg.crops.global_crops_size == 24 and cfg.student.embed_dim == 32
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    lr = [r["lr"] for r in records]
    base, floor = 1e-3 * 0.25, 1e-5  # the source run's base and min lr; the highres preset's lr scale
    # warmup linspace(0, base, 2), then cosine over the last 2 iterations
    assert lr == pytest.approx([0.0, base, base, floor + 0.5 * (base - floor) * (1 + math.cos(math.pi / 2))])
    assert [r["teacher_temp"] for r in records] == pytest.approx([0.04, 0.07, 0.07, 0.07])
    exported = read_state_dict(run / "teacher_backbone.safetensors")
    assert exported["pos_embed"].shape == (1, 1 + 6 * 6, 32)  # a 6x6 grid of 4-pixel patches at 24 px
    # the first step has lr 0, so after it the student is still the checkpoint's, pos-embed resampled
    after_one = torch.load(run / "checkpoints" / "ckpt_0000001.pth", weights_only=True)["model"]
    source = torch.load(ckpt, weights_only=True)["model"]
    torch.testing.assert_close(after_one["student.backbone.pos_embed"],
                               resample_pos_embed(source["student.backbone.pos_embed"], 36))
    for key in ("student.backbone.blocks.1.mlp.fc2.weight", "student.dino_head.mlp.0.weight"):
        assert torch.equal(after_one[key], source[key]), key


def test_init_resamples_position_embeddings_and_keeps_every_other_weight(source_run):
    data, ckpt = source_run
    cfg = load_config("cpu", [*TINY, "crops.global_crops_size=24"], base={"data": {"path": data}})
    meta = SSLMetaArch.from_config(cfg)
    source = read_model_state(ckpt)
    load_meta_weights(meta, source)
    for key, value in meta.state_dict().items():
        if key.endswith("pos_embed"):
            assert source[key].shape == (1, 17, 32) and value.shape == (1, 37, 32)
            torch.testing.assert_close(value, resample_pos_embed(source[key], 36))
        else:
            assert torch.equal(value, source[key]), key


def test_weights_of_another_architecture_are_refused_in_one_line(source_run):
    data, ckpt = source_run
    cfg = load_config("cpu", [*TINY, "student.depth=3"], base={"data": {"path": data}})
    with pytest.raises(ValueError, match=r"does not fit this model: missing \['student.backbone.blocks.2"):
        load_meta_weights(SSLMetaArch.from_config(cfg), read_model_state(ckpt))
