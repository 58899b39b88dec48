"""Distillation of a frozen, larger teacher into a smaller student (paper §5, RECIPE 2.7 and pitfall 14).

What differs from self-supervised training (:class:`~dinolab.train.meta_arch.SSLMetaArch`):

* the teacher is frozen: backbone **and heads** of a dinolab training run (its ``teacher.*`` weights,
  built from that run's ``config.yaml``); nothing updates it;
* the student is never masked and has no stochastic depth (the config refuses ``drop_path_rate > 0``);
  its ``mask_token`` is not trained;
* iBOT compares every patch token of both global crops (each image's mean over its ``N`` patches);
* a spare EMA of the student (``student_ema``, the same momentum schedule as a teacher) is kept, and is
  the final model: ``teacher_backbone.{pth,safetensors}`` of a distillation run hold the student EMA.

The DINO/iBOT losses, centering, KoLeo, schedules and optimiser are those of the student's config. Teacher
and student must share the patch size and the prototype counts (the losses compare their heads' outputs).

An official backbone-only file (``dinov2_vitg14_pretrain.pth``) has no heads. Train them first, with the
backbone frozen: ``dinolab train --preset vitg14 student.pretrained_weights=FILE student.freeze_backbone=true``
for a short run (a few thousand iterations), then distil from that run's checkpoint.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from dinolab.configs.schema import Config, load_config
from dinolab.train.checkpointer import read_model_state, run_config_path
from dinolab.models.build import build_student_backbone
from dinolab.models.vit import DinoVisionTransformer
from dinolab.train.meta_arch import SSLMetaArch, build_head, config_sections


def load_teacher_config(cfg: Config) -> Config:
    """The teacher run's config: ``distill.teacher_config`` or the ``config.yaml`` beside its checkpoint."""
    path = Path(cfg.distill.teacher_config or run_config_path(cfg.distill.teacher_checkpoint))
    if not path.is_file():
        raise FileNotFoundError(f"teacher config {path} does not exist: set distill.teacher_config=PATH/config.yaml")
    return load_config(str(path))


def teacher_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A run's final-model side, relative to it (``backbone.*``, ``dino_head.*``, ``ibot_head.*``): its
    ``teacher.*``, or for a run that was itself a distillation its ``student_ema.*``."""
    prefix = "student_ema." if any(k.startswith("student_ema.") for k in state) else "teacher."
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def build_frozen_teacher(teacher_cfg: Config, weights: dict[str, torch.Tensor]) -> nn.ModuleDict:
    """Backbone and heads of ``teacher_cfg``, loaded from ``weights``, without gradients or drop path."""
    student_cfg = dataclasses.replace(teacher_cfg.student, pretrained_weights=None)
    backbone = build_student_backbone(dataclasses.replace(teacher_cfg, student=student_cfg))
    side = {"backbone": backbone, "dino_head": build_head(backbone.embed_dim, teacher_cfg.dino.head)}
    if teacher_cfg.ibot.separate_head:
        side["ibot_head"] = build_head(backbone.embed_dim, teacher_cfg.ibot.head)
    teacher = nn.ModuleDict(side)
    teacher.load_state_dict(weights)
    for blk in backbone.blocks:
        blk.drop_path = 0.0
    return teacher.requires_grad_(False)


def _check_compatible(cfg: Config, teacher_cfg: Config) -> None:
    t_ibot = teacher_cfg.ibot.head if teacher_cfg.ibot.separate_head else teacher_cfg.dino.head
    s_ibot = cfg.ibot.head if cfg.ibot.separate_head else cfg.dino.head
    pairs = [
        ("student.patch_size", cfg.student.patch_size, teacher_cfg.student.patch_size),
        ("dino.head.n_prototypes", cfg.dino.head.n_prototypes, teacher_cfg.dino.head.n_prototypes),
        ("ibot.head.n_prototypes", s_ibot.n_prototypes, t_ibot.n_prototypes),
    ]
    for name, student_value, teacher_value in pairs:
        if student_value != teacher_value:
            raise ValueError(
                f"distillation needs the teacher's {name}={teacher_value}, the student has {student_value}"
            )


class DistillMetaArch(SSLMetaArch):
    """``student`` (trained), ``teacher`` (frozen, another architecture) and ``student_ema`` (exported).

    Args:
        teacher_run: the config of the run the teacher comes from (its architecture and heads; not kept).
        teacher_state: that run's meta-architecture state dict (:func:`teacher_weights` takes the teacher side).
        sections: :class:`SSLMetaArch`'s keyword arguments, for the student.
    """

    def __init__(self, backbone: DinoVisionTransformer, *, teacher_run: Config,
                 teacher_state: dict[str, torch.Tensor], **sections) -> None:
        super().__init__(backbone, **sections)
        self.patch_size = backbone.patch_size
        self.student_ema = self.teacher  # SSLMetaArch's EMA copy of the student
        self.teacher = build_frozen_teacher(teacher_run, teacher_weights(teacher_state))
        self.student.backbone.mask_token.requires_grad_(False)  # never masked, so never trained

    @classmethod
    def from_config(cls, cfg: Config) -> DistillMetaArch:
        """Teacher weights from ``cfg.distill.teacher_checkpoint``, its architecture from the run's config."""
        teacher_run, teacher_state = load_teacher_config(cfg), read_model_state(cfg.distill.teacher_checkpoint)
        _check_compatible(cfg, teacher_run)
        return cls(build_student_backbone(cfg), teacher_run=teacher_run, teacher_state=teacher_state,
                   **config_sections(cfg))

    @property
    def ema(self) -> nn.ModuleDict:
        return self.student_ema

    def _student_masks(self, batch: dict) -> None:
        return None

    def _ibot_tokens(self, patch_tokens: torch.Tensor, batch: dict) -> torch.Tensor:
        return patch_tokens.flatten(0, 1)  # [2B * N, D]: every patch of both global crops

    def _ibot_weights(self, batch: dict) -> torch.Tensor:
        g = batch["global_crops"]
        n_patches = (g.shape[-2] // self.patch_size) * (g.shape[-1] // self.patch_size)
        return torch.full((g.shape[0] * n_patches,), 1.0 / n_patches, device=g.device)
