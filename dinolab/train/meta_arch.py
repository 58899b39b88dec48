"""Student, EMA teacher, heads and the three losses of DINOv2 (paper §4, official ``SSLMetaArch``).

One training step is five calls (see ``step.py``): ``teacher_targets``, ``student_outputs``,
``compute_losses``, backward/clip/optimizer step, ``update_teacher``.

Sub-modules are always called (``backbone(x, masks, is_training=True)``), never through another method,
so the hooks of FSDP2 and DDP wrappers run (``dinolab.distributed.fsdp``). Under ``torch.distributed``
each rank computes its losses on its own part of the batch (KoLeo per rank, as the official code);
the centering all-reduces, so the targets are those of the global batch.

Layout of a batch (from ``dinolab.data.collate.collate_crops``): global crops [2B, 3, G, G] and
local crops [nL*B, 3, L, L], both crop-major (all first crops, then all second crops ...).
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn

from dinolab.configs.schema import Config, DinoConfig, HeadConfig, IbotConfig, TeacherConfig
from dinolab.distributed.env import is_initialized
from dinolab.distributed.fsdp import local_tensors
from dinolab.losses import EmaCenter, dino_loss, ibot_loss, koleo_loss, sinkhorn_knopp
from dinolab.models.build import build_student_backbone
from dinolab.models.heads import DINOHead
from dinolab.models.vit import DinoVisionTransformer


def build_head(in_dim: int, h: HeadConfig) -> DINOHead:
    return DINOHead(in_dim, h.n_prototypes, h.hidden_dim, h.bottleneck_dim, h.nlayers)


def config_sections(cfg: Config) -> dict:
    """The parts of ``cfg`` a meta-architecture reads, as :class:`SSLMetaArch`'s keyword arguments."""
    return dict(dino=cfg.dino, ibot=cfg.ibot, teacher=cfg.teacher, pack_crops=cfg.train.pack_crops,
                freeze_backbone=cfg.student.freeze_backbone)


class SSLMetaArch(nn.Module):
    """``student`` and ``teacher``: ModuleDicts of ``backbone``, ``dino_head`` and (untied) ``ibot_head``.

    Args:
        backbone: the student backbone (the teacher starts as its copy), e.g.
            :func:`~dinolab.models.build.build_student_backbone`.
        dino, ibot, teacher: the heads, loss weights, temperatures and centering of the run.
        pack_crops: global and local crops in one student pass per block (else two passes).
        freeze_backbone: train the heads only (e.g. heads for an official backbone).
    """

    def __init__(self, backbone: DinoVisionTransformer, *, dino: DinoConfig, ibot: IbotConfig, teacher: TeacherConfig,
                 pack_crops: bool, freeze_backbone: bool) -> None:
        super().__init__()
        self.dino_cfg, self.ibot_cfg, self.teacher_cfg = dino, ibot, teacher
        self.pack_crops, self.freeze_backbone = pack_crops, freeze_backbone
        student = {"backbone": backbone, "dino_head": build_head(backbone.embed_dim, dino.head)}
        if ibot.separate_head:
            student["ibot_head"] = build_head(backbone.embed_dim, ibot.head)
        if freeze_backbone:
            backbone.requires_grad_(False)
        if ibot.loss_weight <= 0 and "ibot_head" in student:  # never called: nothing for DDP to wait for
            student["ibot_head"].requires_grad_(False)
        self.student = nn.ModuleDict(student)
        self.teacher = copy.deepcopy(self.student)
        for blk in self.teacher.backbone.blocks:  # the teacher never drops paths
            blk.drop_path = 0.0
        self.teacher.requires_grad_(False)
        if teacher.centering == "softmax":
            self.dino_center = EmaCenter(dino.head.n_prototypes, teacher.center_momentum)
            self.ibot_center = EmaCenter(self._ibot_prototypes, teacher.center_momentum)

    @classmethod
    def from_config(cls, cfg: Config) -> SSLMetaArch:
        """The meta-architecture of a training config (the student built from ``cfg.student``)."""
        return cls(build_student_backbone(cfg), **config_sections(cfg))

    def begin_step(self, iteration: int) -> None:
        """Called before each training step (0-based ``iteration``); adaptation freezes its backbone here."""

    @property
    def ema(self) -> nn.ModuleDict:
        """The side that follows the student by EMA (here the teacher); its backbone is the deliverable."""
        return self.teacher

    @property
    def export_backbone(self) -> nn.Module:
        return self.ema.backbone

    @property
    def _ibot_prototypes(self) -> int:
        return self.ibot_cfg.head.n_prototypes if self.ibot_cfg.separate_head else self.dino_cfg.head.n_prototypes

    def _head_logits(
        self, side: nn.ModuleDict, cls: torch.Tensor, patches: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """cls [n, D], patches [M, D] -> DINO logits [n, K] and iBOT logits [M, K'] (None when iBOT is off).

        A shared head gets one call on the concatenation (as the official code), so that every
        sub-module runs once per step (what DDP expects).
        """
        if self.ibot_cfg.loss_weight <= 0:
            return side["dino_head"](cls), None
        if "ibot_head" in side:
            return side["dino_head"](cls), side["ibot_head"](patches)
        logits = side["dino_head"](torch.cat([cls, patches]))
        return logits[: cls.shape[0]], logits[cls.shape[0] :]

    # What the student sees and where iBOT applies: overridden by distillation (no masks, all patches).
    def _student_masks(self, batch: dict) -> torch.Tensor | None:
        """[2B, N] bool masks of the student's global crops."""
        return batch["masks"]

    def _ibot_tokens(self, patch_tokens: torch.Tensor, batch: dict) -> torch.Tensor:
        """Patch tokens [2B, N, D] -> the tokens iBOT compares [M, D] (the masked ones)."""
        return patch_tokens.flatten(0, 1).index_select(0, batch["mask_indices"])  # backward: index_add

    def _ibot_weights(self, batch: dict) -> torch.Tensor:
        """[M] weight of each iBOT token: 1 / (#compared tokens of its image)."""
        return batch["masks_weight"]

    def _center(self, logits: torch.Tensor, temp: float, which: str) -> torch.Tensor:
        """Teacher logits [N, K] -> target probabilities [N, K] (fp32)."""
        if self.teacher_cfg.centering == "sinkhorn_knopp":
            return sinkhorn_knopp(logits, temp, n_iterations=3)
        center: EmaCenter = getattr(self, f"{which}_center")
        probs = center(logits, temp)
        center.update(logits)
        return probs

    @torch.no_grad()
    def teacher_targets(self, batch: dict, teacher_temp: float) -> dict[str, torch.Tensor]:
        """Teacher on the unmasked global crops -> ``dino`` [2, B, K] and ``ibot`` [M, K] targets."""
        out = self.teacher.backbone(batch["global_crops"], is_training=True)
        cls = out["x_norm_clstoken"]  # [2B, D]
        patches = self._ibot_tokens(out["x_norm_patchtokens"], batch)  # [M, D]
        dino_logits, ibot_logits = self._head_logits(self.teacher, cls, patches)
        targets = {"dino": self._center(dino_logits, teacher_temp, "dino").view(2, -1, dino_logits.shape[-1])}
        if ibot_logits is not None:  # also with 0 masked patches: ranks must join the collectives
            targets["ibot"] = self._center(ibot_logits, teacher_temp, "ibot")  # SK sums the count over ranks
        return targets

    def student_outputs(self, batch: dict) -> dict[str, torch.Tensor]:
        """Student on masked global and local crops, packed in one pass per block.

        Returns ``dino_logits`` [2 + nL, B, K], ``ibot_logits`` [M, K], ``global_cls`` [2B, D]
        (the backbone's class tokens, for KoLeo) and ``global_patches`` [2B, N, D] (for adaptation's anchor).
        """
        g, l = batch["global_crops"], batch["local_crops"]
        masks = self._student_masks(batch)
        backbone = self.student.backbone
        if l.shape[0] and self.pack_crops:
            g_out, l_out = backbone([g, l], [masks, None], is_training=True)
            cls = torch.cat([g_out["x_norm_clstoken"], l_out["x_norm_clstoken"]])
        elif l.shape[0]:  # separate forwards: the baseline the packed pass is measured against
            g_out, l_out = backbone(g, masks, is_training=True), backbone(l, is_training=True)
            cls = torch.cat([g_out["x_norm_clstoken"], l_out["x_norm_clstoken"]])
        else:
            g_out = backbone(g, masks, is_training=True)
            cls = g_out["x_norm_clstoken"]
        B = g.shape[0] // 2
        patches = self._ibot_tokens(g_out["x_norm_patchtokens"], batch)
        dino_logits, ibot_logits = self._head_logits(self.student, cls, patches)
        outputs = {"dino_logits": dino_logits.view(-1, B, dino_logits.shape[-1]), "global_cls": g_out["x_norm_clstoken"],
                   "global_patches": g_out["x_norm_patchtokens"]}
        if ibot_logits is not None:
            outputs["ibot_logits"] = ibot_logits
        return outputs

    def compute_losses(self, student: dict, targets: dict, batch: dict) -> dict[str, torch.Tensor]:
        """Weighted loss terms (fp32): ``dino``, ``ibot``, ``koleo``; their sum is ``total``."""
        dino, ibot, temp = self.dino_cfg, self.ibot_cfg, self.teacher_cfg.student_temp
        losses = {
            "dino": dino.loss_weight
            * dino_loss(student["dino_logits"], targets["dino"], student_temp=temp, ignore_diagonal=True)
        }
        if "ibot_logits" in student:
            n_images = batch["global_crops"].shape[0]
            losses["ibot"] = ibot.loss_weight * ibot_loss(
                student["ibot_logits"], targets["ibot"], self._ibot_weights(batch), n_images, student_temp=temp
            )
        if dino.koleo_loss_weight > 0:
            chunks = student["global_cls"].chunk(2)  # per global crop, as the official code
            losses["koleo"] = dino.koleo_loss_weight * sum(koleo_loss(x) for x in chunks)
        losses["total"] = sum(losses.values())
        return _nonfinite_everywhere(losses)

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """ema <- momentum * ema + (1 - momentum) * student, over every parameter.

        Under FSDP both sides are sharded alike, so this runs on the local shards, without communication.
        Parameters the student does not train (a frozen backbone) are equal on both sides and skipped.
        """
        pairs = [(t, s) for t, s in zip(self.ema.parameters(), self.student.parameters()) if s.requires_grad]
        t = local_tensors(t for t, _ in pairs)
        s = local_tensors(s.detach() for _, s in pairs)
        torch._foreach_lerp_(t, s, 1.0 - momentum)  # t + (1 - m)(s - t): one pass over the teacher, not two


def _nonfinite_everywhere(losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Make a NaN/Inf term of any rank appear on every rank (values and gradients otherwise unchanged).

    Each rank then stops at the same iteration with the same message; a rank stopping alone would leave
    the others blocked in the next collective.
    """
    if not is_initialized():
        return losses
    sums = torch.stack([v.detach().float() for v in losses.values()])
    dist.all_reduce(sums)
    return {k: v + 0.0 * s.to(v.dtype) for (k, v), s in zip(losses.items(), sums)}
