"""Distillation: a frozen teacher run distilled into a smaller student, never masked, whose EMA is exported."""

import numpy as np
import pytest
import torch

from dinolab.cli import main
from dinolab.configs import load_config
from dinolab.models import build_backbone
from dinolab.models.checkpoints import read_state_dict
from dinolab.models.vit import DinoVisionTransformer
from dinolab.train.distill import DistillMetaArch
from dinolab.train.loop import train
from tiny_run import TINY_RUN

TINY = [*TINY_RUN, "optim.epochs=1"]
STUDENT = ["student.embed_dim=16", "student.depth=1", "dino.head.hidden_dim=16"]  # smaller than the teacher


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    rng = np.random.default_rng(0)
    data = root / "data.npz"
    np.savez(data, x_train=rng.integers(0, 255, (16, 20, 20, 3), dtype=np.uint8), y_train=np.arange(16) % 2)
    train(load_config("cpu", TINY, base={"data": {"path": str(data)}}), root / "teacher", progress=False)
    return str(data), root / "teacher" / "checkpoints" / "ckpt_0000003.pth"


def student_cfg(data, ckpt, *extra):
    return load_config("cpu", [*TINY, *STUDENT, *extra],
                       base={"data": {"path": data}, "distill": {"teacher_checkpoint": str(ckpt)}})


def test_student_is_never_masked_and_its_ema_is_exported(teacher_run, tmp_path, monkeypatch, capsys):
    data, ckpt = teacher_run
    seen = []  # (width, masks) of every backbone forward
    real = DinoVisionTransformer.forward_features

    def spy(self, x, masks=None):
        seen.append((self.embed_dim, masks))
        return real(self, x, masks)

    monkeypatch.setattr(DinoVisionTransformer, "forward_features", spy)
    run = tmp_path / "student"
    code = main(["train", "--data", data, "--output", str(run), "--distill-from", str(ckpt), "--no-progress",
                 *TINY, *STUDENT])
    assert code == 0, capsys.readouterr().err
    student_masks = [m for width, m in seen if width == 16]
    assert len(student_masks) == 3 and all(m in (None, [None, None]) for m in student_masks)
    assert any(width == 32 for width, _ in seen)  # the teacher ran too

    model = torch.load(run / "checkpoints" / "ckpt_0000003.pth", weights_only=True)["model"]
    exported = read_state_dict(run / "teacher_backbone.safetensors")
    assert exported["cls_token"].shape[-1] == 16  # the student's width, not the teacher's
    for key, value in exported.items():
        torch.testing.assert_close(value, model[f"student_ema.backbone.{key}"], rtol=0, atol=0)
    moved = [k for k in exported if not torch.equal(model[f"student.backbone.{k}"], exported[k])]
    assert moved  # an EMA (momentum < 1) lags the trained student
    source = torch.load(ckpt, weights_only=True)["model"]
    for key in (k for k in source if k.startswith("teacher.")):  # the teacher stays frozen
        torch.testing.assert_close(model[key], source[key], rtol=0, atol=0)
    assert build_backbone("auto", weights=run / "teacher_backbone.safetensors").embed_dim == 16


def test_ibot_covers_every_patch_of_both_global_crops(teacher_run):
    data, ckpt = teacher_run
    torch.manual_seed(0)
    meta = DistillMetaArch.from_config(student_cfg(data, ckpt))
    B, n_patches = 3, (16 // 4) ** 2
    batch = {"global_crops": torch.randn(2 * B, 3, 16, 16), "local_crops": torch.randn(2 * B, 3, 8, 8),
             "masks": torch.ones(2 * B, n_patches, dtype=torch.bool)}  # masks a plain run would apply: ignored
    targets = meta.teacher_targets(batch, teacher_temp=0.07)
    outputs = meta.student_outputs(batch)
    assert outputs["ibot_logits"].shape == targets["ibot"].shape == (2 * B * n_patches, 64)
    losses = meta.compute_losses(outputs, targets, batch)
    # iBOT = mean over the 2B images of each image's mean cross-entropy over its patches
    log_p = torch.log_softmax(outputs["ibot_logits"] / 0.1, dim=-1)
    per_image = -(targets["ibot"] * log_p).sum(-1).view(2 * B, n_patches).mean(-1)
    assert losses["ibot"].item() == pytest.approx(per_image.mean().item(), rel=1e-5)


def test_ema_follows_the_student_and_the_teacher_never_moves(teacher_run):
    data, ckpt = teacher_run
    meta = DistillMetaArch.from_config(student_cfg(data, ckpt))
    teacher_before = [p.clone() for p in meta.teacher.parameters()]
    with torch.no_grad():
        for p in meta.student.parameters():
            p.add_(1.0)
    ema_before = [p.clone() for p in meta.student_ema.parameters()]
    meta.update_teacher(0.9)
    for e0, s, e1 in zip(ema_before, meta.student.parameters(), meta.student_ema.parameters()):
        torch.testing.assert_close(e1, 0.9 * e0 + 0.1 * s if s.requires_grad else e0)  # frozen: skipped
    for t0, t1 in zip(teacher_before, meta.teacher.parameters()):
        assert torch.equal(t0, t1)
    assert not meta.student.backbone.mask_token.requires_grad  # never masked, never trained


def test_stochastic_depth_and_mismatched_heads_are_refused(teacher_run):
    data, ckpt = teacher_run
    with pytest.raises(ValueError, match="without stochastic depth"):
        student_cfg(data, ckpt, "student.drop_path_rate=0.1")
    with pytest.raises(ValueError, match="teacher's dino.head.n_prototypes=64"):
        DistillMetaArch.from_config(student_cfg(data, ckpt, "dino.head.n_prototypes=32"))


def test_backbone_only_file_is_refused_with_the_way_to_get_heads(teacher_run, tmp_path):
    data, ckpt = teacher_run
    backbone_only = tmp_path / "backbone.pth"
    torch.save({k.removeprefix("teacher.backbone."): v for k, v in torch.load(ckpt, weights_only=True)["model"].items()
                if k.startswith("teacher.backbone.")}, backbone_only)
    (tmp_path / "config.yaml").write_text((ckpt.parent.parent / "config.yaml").read_text())
    with pytest.raises(ValueError, match="student.freeze_backbone=true"):
        DistillMetaArch.from_config(student_cfg(data, backbone_only, f"distill.teacher_config={tmp_path}/config.yaml"))


def test_heads_for_a_backbone_only_file_then_distillation(teacher_run, tmp_path):
    """The documented route from an official backbone-only file: train heads on the frozen backbone first."""
    data, ckpt = teacher_run
    weights = ckpt.parent.parent / "teacher_backbone.safetensors"  # stands in for an official backbone file
    heads_run = tmp_path / "heads"
    train(load_config("cpu", [*TINY, f"student.pretrained_weights={weights}", "student.freeze_backbone=true"],
                      base={"data": {"path": data}}), heads_run, progress=False)
    model = torch.load(heads_run / "checkpoints" / "ckpt_0000003.pth", weights_only=True)["model"]
    for key, value in read_state_dict(weights).items():  # the backbone did not move, on either side
        assert torch.equal(model[f"student.backbone.{key}"], value)
        assert torch.equal(model[f"teacher.backbone.{key}"], value)
    meta = DistillMetaArch.from_config(student_cfg(data, heads_run / "checkpoints" / "ckpt_0000003.pth"))
    torch.testing.assert_close(meta.teacher.dino_head.mlp[0].weight, model["teacher.dino_head.mlp.0.weight"])
