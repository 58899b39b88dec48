"""Student, EMA teacher, heads and the three losses of DINOv2 (paper §4, official ``SSLMetaArch``).

One training step is five calls (see ``step.py``): ``teacher_targets``, ``student_outputs``,
``compute_losses``, backward/clip/optimizer step, ``update_teacher``.

Layout of a batch (from ``dinolab.data.collate.collate_crops``): global crops [2B, 3, G, G] and
local crops [nL*B, 3, L, L], both crop-major (all first crops, then all second crops ...).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from dinolab.configs.schema import Config, HeadConfig
from dinolab.losses import EmaCenter, dino_loss, ibot_loss, koleo_loss, sinkhorn_knopp
from dinolab.models.factory import build_backbone
from dinolab.models.heads import DINOHead
from dinolab.models.vit import DinoVisionTransformer


def build_student_backbone(cfg: Config) -> DinoVisionTransformer:
    """The student backbone of ``cfg.student``; position embeddings sized for the global crops."""
    s = cfg.student
    overrides = dict(
        img_size=cfg.crops.global_crops_size,
        patch_size=s.patch_size,
        drop_path_rate=s.drop_path_rate,
        drop_path_mode=s.drop_path_mode,
        init_values=s.layerscale,
        ffn_layer=s.ffn_layer,
        num_register_tokens=s.num_register_tokens,
        interpolate_offset=0.0 if s.num_register_tokens else 0.1,
        interpolate_antialias=bool(s.num_register_tokens),
    )
    overrides.update({k: getattr(s, k) for k in ("embed_dim", "depth", "num_heads") if getattr(s, k) is not None})
    return build_backbone(s.arch, weights=s.pretrained_weights, **overrides)


def _head(in_dim: int, h: HeadConfig) -> DINOHead:
    return DINOHead(in_dim, h.n_prototypes, h.hidden_dim, h.bottleneck_dim, h.nlayers)


class SSLMetaArch(nn.Module):
    """``student`` and ``teacher``: ModuleDicts of ``backbone``, ``dino_head`` and (untied) ``ibot_head``."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        backbone = build_student_backbone(cfg)
        student = {"backbone": backbone, "dino_head": _head(backbone.embed_dim, cfg.dino.head)}
        if cfg.ibot.separate_head:
            student["ibot_head"] = _head(backbone.embed_dim, cfg.ibot.head)
        self.student = nn.ModuleDict(student)
        self.teacher = copy.deepcopy(self.student)
        for blk in self.teacher.backbone.blocks:  # the teacher never drops paths
            blk.drop_path = 0.0
        self.teacher.requires_grad_(False)
        if cfg.teacher.centering == "softmax":
            self.dino_center = EmaCenter(cfg.dino.head.n_prototypes, cfg.teacher.center_momentum)
            self.ibot_center = EmaCenter(self._ibot_prototypes, cfg.teacher.center_momentum)

    @property
    def _ibot_prototypes(self) -> int:
        return self.cfg.ibot.head.n_prototypes if self.cfg.ibot.separate_head else self.cfg.dino.head.n_prototypes

    def _ibot_head(self, side: nn.ModuleDict) -> nn.Module:
        return side["ibot_head"] if "ibot_head" in side else side["dino_head"]

    def _center(self, logits: torch.Tensor, temp: float, which: str) -> torch.Tensor:
        """Teacher logits [N, K] -> target probabilities [N, K] (fp32)."""
        if self.cfg.teacher.centering == "sinkhorn_knopp":
            return sinkhorn_knopp(logits, temp, n_iterations=3)
        center: EmaCenter = getattr(self, f"{which}_center")
        probs = center(logits, temp)
        center.update(logits)
        return probs

    @torch.no_grad()
    def teacher_targets(self, batch: dict, teacher_temp: float) -> dict[str, torch.Tensor]:
        """Teacher on the unmasked global crops -> ``dino`` [2, B, K] and ``ibot`` [M, K] targets."""
        out = self.teacher.backbone.forward_features(batch["global_crops"])
        cls = out["x_norm_clstoken"]  # [2B, D]
        patches = out["x_norm_patchtokens"].flatten(0, 1)[batch["mask_indices"]]  # [M, D]
        dino_logits = self.teacher.dino_head(cls)
        targets = {"dino": self._center(dino_logits, teacher_temp, "dino").view(2, -1, dino_logits.shape[-1])}
        if self.cfg.ibot.loss_weight > 0:  # also with 0 masked patches: ranks must join the collectives
            ibot_logits = self._ibot_head(self.teacher)(patches)
            targets["ibot"] = self._center(ibot_logits, teacher_temp, "ibot")  # SK sums the count over ranks
        return targets

    def student_outputs(self, batch: dict) -> dict[str, torch.Tensor]:
        """Student on masked global and local crops, packed in one pass per block.

        Returns ``dino_logits`` [2 + nL, B, K], ``ibot_logits`` [M, K] and ``global_cls`` [2B, D]
        (the backbone's class tokens, for KoLeo).
        """
        g, l = batch["global_crops"], batch["local_crops"]
        backbone = self.student.backbone
        if l.shape[0] and self.cfg.train.pack_crops:
            g_out, l_out = backbone.forward_features([g, l], [batch["masks"], None])
            cls = torch.cat([g_out["x_norm_clstoken"], l_out["x_norm_clstoken"]])
        elif l.shape[0]:  # separate forwards: the baseline the packed pass is measured against
            g_out, l_out = backbone.forward_features(g, batch["masks"]), backbone.forward_features(l)
            cls = torch.cat([g_out["x_norm_clstoken"], l_out["x_norm_clstoken"]])
        else:
            g_out = backbone.forward_features(g, batch["masks"])
            cls = g_out["x_norm_clstoken"]
        B = g.shape[0] // 2
        dino_logits = self.student.dino_head(cls)
        outputs = {"dino_logits": dino_logits.view(-1, B, dino_logits.shape[-1]), "global_cls": g_out["x_norm_clstoken"]}
        patches = g_out["x_norm_patchtokens"].flatten(0, 1)[batch["mask_indices"]]
        if self.cfg.ibot.loss_weight > 0:
            outputs["ibot_logits"] = self._ibot_head(self.student)(patches)
        return outputs

    def compute_losses(self, student: dict, targets: dict, batch: dict) -> dict[str, torch.Tensor]:
        """Weighted loss terms (fp32): ``dino``, ``ibot``, ``koleo``; their sum is ``total``."""
        c, temp = self.cfg, self.cfg.teacher.student_temp
        losses = {
            "dino": c.dino.loss_weight
            * dino_loss(student["dino_logits"], targets["dino"], student_temp=temp, ignore_diagonal=True)
        }
        if "ibot_logits" in student:
            n_images = batch["global_crops"].shape[0]
            losses["ibot"] = c.ibot.loss_weight * ibot_loss(
                student["ibot_logits"], targets["ibot"], batch["masks_weight"], n_images, student_temp=temp
            )
        if c.dino.koleo_loss_weight > 0:
            chunks = student["global_cls"].chunk(2)  # per global crop, as the official code
            losses["koleo"] = c.dino.koleo_loss_weight * sum(koleo_loss(x) for x in chunks)
        losses["total"] = sum(losses.values())
        return losses

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """teacher <- momentum * teacher + (1 - momentum) * student, over every shared parameter."""
        t = [p for p in self.teacher.parameters()]
        s = [p.detach() for p in self.student.parameters()]
        torch._foreach_mul_(t, momentum)
        torch._foreach_add_(t, s, alpha=1.0 - momentum)
