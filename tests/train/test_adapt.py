"""``dinolab train --adapt WEIGHTS``: the student of each weights format, the head warm-up, the feature anchor."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from dinolab.cli import build_parser, main
from dinolab.data.datasets import open_dataset
from dinolab.models.checkpoints import save_backbone
from dinolab.models.hf import official_to_hf
from dinolab.models.vit import DinoVisionTransformer
from dinolab.train.adapt import AdaptMetaArch
from dinolab.train.cli import build_config
from dinolab.data.loader import build_loader
from dinolab.train.build import build_meta_arch, build_optimizer, schedule_config
from dinolab.train.loop import train
from dinolab.train.schedules import schedule_values
from dinolab.train.step import train_step
from tiny_run import TINY_RUN

# the tiny run without its student and crop sizes: --adapt reads those off the weights
ADAPT_TINY = [o for o in TINY_RUN if not o.startswith(
    ("student.", "crops.global_crops_size", "crops.local_crops_size", "optim.epoch_length"))]
SOURCE = dict(img_size=16, patch_size=4, embed_dim=64, depth=2, num_heads=1, init_values=1.0, num_register_tokens=1)


@pytest.fixture
def data(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (24, 20, 20, 3), dtype=np.uint8)
    y = np.arange(24) % 3
    x[y == 1, :, :, 0] = 250
    x[y == 2, :, :, 2] = 250
    path = tmp_path / "data.npz"
    np.savez(path, x_train=x[:18], y_train=y[:18], x_test=x[18:], y_test=y[18:])
    return str(path)


def source_model() -> DinoVisionTransformer:
    torch.manual_seed(1)
    model = DinoVisionTransformer(**SOURCE)
    with torch.no_grad():  # away from the initialisation, so that loading is visible
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def write_weights(kind: str, tmp_path, data) -> tuple[str, dict]:
    """Weights of ``kind`` in a file (or a run folder) and the state dict they hold (official keys)."""
    model = source_model()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    if kind == "official":
        torch.save(sd, tmp_path / "hub.pth")
        return str(tmp_path / "hub.pth"), sd
    if kind == "hf":
        torch.save(official_to_hf(sd), tmp_path / "hf.pth")
        return str(tmp_path / "hf.pth"), sd
    if kind == "export":
        save_backbone(model, tmp_path / "export.safetensors")
        return str(tmp_path / "export.safetensors"), sd
    run = tmp_path / "src_run"
    from dinolab.configs import load_config

    train(load_config("cpu", [*TINY_RUN, "optim.epochs=1"], base={"data": {"path": data}}), run, progress=False)
    from dinolab.models.factory import read_weights

    return str(run), read_weights(run / "teacher_backbone.safetensors")


def adapt_cfg(weights, data, *extra):
    args = build_parser().parse_args(["train", "--adapt", weights, "--data", data, "--preset", "adapt_cpu",
                                      *ADAPT_TINY, *extra])
    return build_config(args)


@pytest.mark.parametrize("kind", ["official", "hf", "export", "run"])
def test_student_and_teacher_are_built_from_and_start_at_each_weights_format(kind, tmp_path, data):
    weights, sd = write_weights(kind, tmp_path, data)
    cfg = adapt_cfg(weights, data)
    meta = build_meta_arch(cfg)
    assert isinstance(meta, AdaptMetaArch)
    for side in (meta.student, meta.teacher):
        own = side.backbone.state_dict()
        assert sorted(own) == sorted(sd)
        assert all(torch.equal(own[k], sd[k]) for k in sd)  # no resampling: the weights' own grid
    if kind == "run":  # the source run's architecture and crops (the tiny run: width 32, 16 / 8 px)
        assert (cfg.student.embed_dim, cfg.student.depth, cfg.student.patch_size) == (32, 2, 4)
        assert cfg.student.arch == OmegaConf.load(Path(weights) / "config.yaml").student.arch  # its name too
        assert (cfg.crops.global_crops_size, cfg.crops.local_crops_size) == (16, 8)
    else:
        s = cfg.student
        assert (s.embed_dim, s.depth, s.num_heads, s.patch_size, s.num_register_tokens) == (64, 2, 1, 4, 1)
        assert (cfg.crops.global_crops_size, cfg.crops.local_crops_size) == (16, 8)  # 4 patches, 7/16 of it local
    assert cfg.optim.epoch_length == 18 // 8  # one pass over the data


def run_steps(meta, cfg, data, n):
    loader, _ = build_loader(cfg, open_dataset(data))
    optimizer = build_optimizer(meta, cfg)
    sched_cfg = schedule_config(cfg, cfg.train.batch_size_per_gpu)
    it = iter(loader)
    return [train_step(meta, optimizer, next(it), schedule_values(sched_cfg, i), i, "fp32", cfg.optim.clip_grad)
            for i in range(n)], optimizer, sched_cfg, it


def test_warmup_freezes_the_backbone_then_it_trains_and_the_anchor_grows(tmp_path, data):
    weights, sd = write_weights("official", tmp_path, data)
    cfg = adapt_cfg(weights, data, "optim.epochs=6", "adapt.head_warmup_iters=3", "adapt.anchor_weight=0.1")
    torch.manual_seed(0)
    meta = build_meta_arch(cfg)
    heads0 = {k: v.clone() for k, v in meta.student.dino_head.state_dict().items()}
    teacher_heads0 = {k: v.clone() for k, v in meta.teacher.dino_head.state_dict().items()}
    losses, optimizer, sched_cfg, it = run_steps(meta, cfg, data, 3)
    for side in (meta.student, meta.teacher):  # bit for bit after 3 warm-up steps
        own = side.backbone.state_dict()
        assert all(torch.equal(own[k], sd[k]) for k in sd)
    assert any(not torch.equal(v, heads0[k]) for k, v in meta.student.dino_head.state_dict().items())
    assert any(not torch.equal(v, teacher_heads0[k]) for k, v in meta.teacher.dino_head.state_dict().items())
    assert all(0.0 <= step["anchor"] < 1e-5 for step in losses)  # student == source (up to packing's rounding)
    later = [train_step(meta, optimizer, next(it), schedule_values(sched_cfg, i), i, "fp32", cfg.optim.clip_grad)
             for i in range(3, 6)]
    own = meta.student.backbone.state_dict()
    assert any(not torch.equal(own[k], sd[k]) for k in sd)  # after the warm-up the backbone trains
    teacher = meta.teacher.backbone.state_dict()
    assert any(not torch.equal(teacher[k], sd[k]) for k in sd)  # and the teacher follows
    assert later[-1]["anchor"] > 1e-4
    assert later[-1]["total"] == pytest.approx(sum(later[-1][k] for k in ("dino", "ibot", "koleo", "anchor")), rel=1e-5)


def test_adapt_runs_from_the_cli_and_logs_the_anchor(tmp_path, data):
    weights, _ = write_weights("export", tmp_path, data)
    out = tmp_path / "adapted"
    code = main(["train", "--adapt", weights, "--data", data, "--output", str(out), "--no-progress",
                 *ADAPT_TINY, "optim.epochs=2", "adapt.anchor_weight=0.1"])
    assert code == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records if "anchor" in r] == [1, 2, 3, 4]
    assert (out / "teacher_backbone.safetensors").exists()


def test_weights_that_are_no_backbone_are_one_line(tmp_path, data, capsys):
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "classifier.pth")
    code = main(["train", "--adapt", str(tmp_path / "classifier.pth"), "--data", data, "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "classifier.pth" in err and "backbone" in err
    assert not (tmp_path / "o").exists()
