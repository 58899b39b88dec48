"""Every preset of ``dinolab/configs/presets/`` loads as ``dinolab train --preset NAME`` and trains one step.

Each preset is shrunk by overrides that leave its structure alone (its arch name, patch size, FFN, registers,
head tying, centering, packing, local-crop count and masking are kept; the widths, depth, head sizes, crop
sizes (in patches), batch and length are not). The distillation presets distil the tiny ``vitg14`` run.
The ``highres`` deltas are no preset: ``--preset highres`` is refused in one line, ``--high-res CKPT``
applies them over the run that wrote CKPT.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from dinolab.cli import main
from dinolab.configs import load_config, preset_names
from dinolab.configs.schema import PRESET_DIR

PRESETS = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
DISTILL_TEACHER = "vitg14"  # what the distillation presets are written for
# what makes a preset what it is: kept by the shrinking overrides (checked on the run's saved config)
STRUCTURE = ["student.arch", "student.patch_size", "student.ffn_layer", "student.num_register_tokens",
             "student.drop_path_rate", "teacher.centering", "ibot.separate_head", "ibot.mask_sample_probability",
             "ibot.loss_weight", "dino.koleo_loss_weight", "crops.local_crops_number", "train.pack_crops",
             "train.distributed"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny tensors, one thread


def shrink(patch_size: int) -> list[str]:
    """Overrides for a tiny model and a one-iteration run; crops of 4x4 (global) and 2x2 (local) patches."""
    return [
        "student.embed_dim=32", "student.num_heads=2", "student.depth=2",
        *(f"{h}.head.{k}={v}" for h in ("dino", "ibot")
          for k, v in (("n_prototypes", 64), ("hidden_dim", 32), ("bottleneck_dim", 16))),
        f"crops.global_crops_size={4 * patch_size}", f"crops.local_crops_size={2 * patch_size}",
        "train.batch_size_per_gpu=2", "train.max_iters=1", "train.num_workers=0", "train.knn_every=0",
        "train.compile=false", "train.precision=fp32", "train.checkpoint_every=0", "train.log_every=1",
    ]


def _get(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``run(name)``: train preset ``name`` for one iteration (once per module) -> (run dir, its metrics)."""
    root = tmp_path_factory.mktemp("presets")
    rng = np.random.default_rng(0)
    data = root / "data.npz"  # a data path without eval data: no k-NN
    np.savez(data, x_train=rng.integers(0, 255, (8, 20, 20, 3), dtype=np.uint8))
    done: dict[str, tuple] = {}

    def run(name: str):
        if name not in done:
            extra = []
            if name.startswith("distill"):  # needs --distill-from (the presets say: a vitg14 run)
                teacher_dir, _ = run(DISTILL_TEACHER)
                extra = ["--distill-from", str(teacher_dir / "checkpoints" / "ckpt_0000001.pth")]
            out = root / name
            code = main(["train", "--preset", name, "--data", str(data), "--output", str(out), "--no-progress",
                         *extra, *shrink(load_config(name).student.patch_size)])
            assert code == 0, f"dinolab train --preset {name} exited {code}"
            records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            done[name] = (out, records)
        return done[name]

    run.data = data
    return run


@pytest.mark.parametrize("name", PRESETS)
def test_preset_trains_one_step_with_finite_losses(name, runs):
    out, records = runs(name)
    steps = [r for r in records if "total" in r]
    assert [r["iteration"] for r in steps] == [1]
    losses = {k: v for k, v in steps[0].items() if k in ("dino", "ibot", "koleo", "total")}
    preset = load_config(name)
    assert "dino" in losses and ("ibot" in losses) == (preset.ibot.loss_weight > 0)
    assert all(math.isfinite(v) for v in losses.values()), losses
    ran = load_config(str(out / "config.yaml"))  # what the run used: the preset's structure, tiny
    for key in STRUCTURE:
        assert _get(ran, key) == _get(preset, key), key
    assert ran.student.embed_dim == 32 and ran.train.batch_size_per_gpu == 2
    assert (ran.distill.teacher_checkpoint is not None) == name.startswith("distill")
    assert (out / "teacher_backbone.safetensors").is_file()


def test_every_preset_is_offered_and_highres_is_not():
    assert preset_names() == PRESETS and "highres" not in PRESETS
    assert {"cpu", "demo", "vitl16_short", "vitl14", "vitg14", DISTILL_TEACHER} <= set(PRESETS)


def test_preset_highres_is_refused_in_one_line(runs, tmp_path, capsys):
    code = main(["train", "--preset", "highres", "--data", str(runs.data), "--output", str(tmp_path / "hr"),
                 "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "'highres' is not a preset" in err and "--high-res" in err
    assert not (tmp_path / "hr").exists()  # refused before any work


def test_high_res_applies_the_deltas_over_a_run(runs, tmp_path):
    source, _ = runs(DISTILL_TEACHER)
    out = tmp_path / "hr"
    code = main(["train", "--high-res", str(source / "checkpoints" / "ckpt_0000001.pth"), "--output", str(out),
                 "--no-progress"])
    assert code == 0
    cfg = load_config(str(out / "config.yaml"))
    assert cfg.crops.global_crops_size == 518 and cfg.optim.compress_to_iters == 10000  # the deltas
    assert cfg.student.arch == "vit_giant2" and cfg.student.embed_dim == 32  # over the source run's config
    record = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert record["iteration"] == 1 and math.isfinite(record["total"])
