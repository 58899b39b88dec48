"""AdamW parameter groups: layer-wise lr decay, patch-embed lr factor, no weight decay where it hurts.

Official: ``dinov2/utils/param_groups.py`` (``get_params_groups_with_decay`` + ``fuse_params_groups``) and
``apply_optim_scheduler`` in ``dinov2/train/train.py``. Each group carries ``lr_multiplier``,
``wd_multiplier`` and ``is_last_layer``; every step the loop sets

    group["lr"] = (last_layer_lr if group["is_last_layer"] else lr) * group["lr_multiplier"]
    group["weight_decay"] = weight_decay * group["wd_multiplier"]

(``apply_schedule`` below).

Two deliberate differences from the official rules (the issue asks for them, RECIPE pitfall 9):
``register_tokens`` sits at layer 0 with the other tokens (official: the top layer, multiplier 1), and
the tokens ``cls_token``, ``mask_token``, ``register_tokens``, ``pos_embed`` get no weight decay
(official: they are decayed).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dinolab.configs.schema import OptimConfig

# backbone parameters (names relative to the backbone) at layer 0, i.e. below the first block
LAYER0_PREFIXES = ("patch_embed", "pos_embed", "cls_token", "mask_token", "register_tokens")
# learned tokens and embeddings that are not weight-decayed
TOKEN_NAMES = ("pos_embed", "cls_token", "mask_token", "register_tokens")


@dataclass(frozen=True)
class ParamGroupConfig:
    """Optimiser grouping rules; the defaults are ``optim.layerwise_decay`` / ``optim.patch_embed_lr_mult``'s
    (``dinolab.configs.schema.OptimConfig``, the official 0.9 and 0.2)."""

    layerwise_decay: float = OptimConfig.layerwise_decay
    patch_embed_lr_mult: float = OptimConfig.patch_embed_lr_mult
    backbone_key: str = "backbone"

    def __post_init__(self) -> None:
        if not 0.0 < self.layerwise_decay <= 1.0:
            raise ValueError(f"layerwise_decay must be in (0, 1], got {self.layerwise_decay}")
        if self.patch_embed_lr_mult < 0.0:
            raise ValueError(f"patch_embed_lr_mult must be >= 0, got {self.patch_embed_lr_mult}")


def backbone_layer_id(name: str, n_blocks: int) -> int:
    """Layer of a backbone parameter: tokens and patch embedding 0, ``blocks.i`` i + 1, the rest L + 1.

    ``name`` is relative to the backbone (``blocks.3.attn.qkv.weight``); chunked FSDP names
    (``blocks.{chunk}.{i}.…``) use the global block index ``i``.
    """
    parts = name.split(".")
    if parts[0] in LAYER0_PREFIXES:
        return 0
    if parts[0] == "blocks" and len(parts) > 1 and parts[1].isdigit():
        chunked = len(parts) > 2 and parts[2].isdigit()
        return int(parts[2] if chunked else parts[1]) + 1
    return n_blocks + 1


def weight_decay_multiplier(name: str, relative_backbone_name: str | None) -> float:
    """0 for biases, norms, LayerScale ``gamma`` and backbone tokens; 1 otherwise."""
    if name.endswith(".bias") or "norm" in name or "gamma" in name:
        return 0.0
    if relative_backbone_name is not None and relative_backbone_name.split(".")[0] in TOKEN_NAMES:
        return 0.0
    return 1.0


def _n_blocks(backbone: nn.Module) -> int:
    if hasattr(backbone, "n_blocks"):
        return int(backbone.n_blocks)
    if hasattr(backbone, "blocks"):
        return len(backbone.blocks)
    raise ValueError("build_param_groups: the backbone has neither `n_blocks` nor `blocks`")


def param_settings(student: nn.Module, cfg: ParamGroupConfig = ParamGroupConfig()) -> list[dict]:
    """One dict per trainable parameter: ``name``, ``params``, ``lr_multiplier``, ``wd_multiplier``, ``is_last_layer``.

    ``student`` holds the backbone under ``cfg.backbone_key`` (official names: ``patch_embed.*``,
    ``pos_embed``, ``cls_token``, ``mask_token``, ``register_tokens``, ``blocks.{i}.*``, ``norm.*``) and heads
    (``dino_head``, ``ibot_head``, any other sub-module), which get lr multiplier 1 (layer L + 1).
    """
    if not hasattr(student, cfg.backbone_key):
        raise ValueError(f"build_param_groups: the student has no sub-module '{cfg.backbone_key}'")
    n_blocks = _n_blocks(getattr(student, cfg.backbone_key))
    prefix = cfg.backbone_key + "."
    settings = []
    for name, param in student.named_parameters():
        if not param.requires_grad:
            continue
        relative = name[len(prefix) :] if name.startswith(prefix) else None
        layer = n_blocks + 1 if relative is None else backbone_layer_id(relative, n_blocks)
        lr_mult = cfg.layerwise_decay ** (n_blocks + 1 - layer)
        if relative is not None and relative.startswith("patch_embed"):
            lr_mult *= cfg.patch_embed_lr_mult
        settings.append(
            {
                "name": name,
                "params": param,
                "lr_multiplier": lr_mult,
                "wd_multiplier": weight_decay_multiplier(name, relative),
                "is_last_layer": "last_layer" in name,
            }
        )
    return settings


def build_param_groups(student: nn.Module, cfg: ParamGroupConfig = ParamGroupConfig()) -> list[dict]:
    """Parameter groups for ``torch.optim.AdamW``, fused by ``(lr_multiplier, wd_multiplier, is_last_layer)``.

    Returns:
        Groups in order of first appearance, each ``{"params": [...], "param_names": [...],
        "lr_multiplier": float, "wd_multiplier": float, "is_last_layer": bool}``.
    """
    fused: dict[tuple[float, float, bool], dict] = {}
    for s in param_settings(student, cfg):
        key = (s["lr_multiplier"], s["wd_multiplier"], s["is_last_layer"])
        group = fused.setdefault(
            key,
            {
                "params": [],
                "param_names": [],
                "lr_multiplier": key[0],
                "wd_multiplier": key[1],
                "is_last_layer": key[2],
            },
        )
        group["params"].append(s["params"])
        group["param_names"].append(s["name"])
    return list(fused.values())


def apply_schedule(optimizer: torch.optim.Optimizer, *, lr: float, weight_decay: float, last_layer_lr: float) -> None:
    """Set each group's lr and weight decay from the scheduled values and the group's multipliers."""
    for group in optimizer.param_groups:
        group["lr"] = (last_layer_lr if group["is_last_layer"] else lr) * group["lr_multiplier"]
        group["weight_decay"] = weight_decay * group["wd_multiplier"]
