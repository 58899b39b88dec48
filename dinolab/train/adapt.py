"""Continued pretraining of a released backbone on one's own images (``dinolab train --adapt WEIGHTS``).

WEIGHTS is an official hub ``.pth``, a Hugging Face ``Dinov2Model`` state dict, a dinolab export
(``.pth`` / ``.safetensors``) or a dinolab run folder (its ``teacher_backbone.*`` and ``config.yaml``).

* :func:`adapt_base`: the config deltas the weights imply: the student's architecture (size, patch,
  registers, position grid, FFN, LayerScale), ``student.pretrained_weights`` (student and teacher start
  from the same weights) and crop sizes that suit it (the source run's, else ``patch * 16`` global and
  ``patch * 7`` local for a 16-patch grid: 224 / 98 px at patch 14).
* :class:`AdaptMetaArch`: the recipe. For ``adapt.head_warmup_iters`` iterations the backbone is frozen
  (``requires_grad`` off: no gradient, no optimizer update, no EMA) and only the random heads train, the
  teacher's heads following by EMA; then the whole model trains (the presets: a reduced lr with
  layer-wise decay). ``adapt.anchor_weight > 0`` adds ``anchor = w * mean(1 - cos)`` between the student's
  class tokens (and/or mean patch tokens) on the global crops and those of a frozen copy of the source
  backbone on the same (masked) crops: 0 while the backbone has not moved, it holds the features near the
  source against forgetting.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F

from dinolab.configs.schema import AdaptConfig, Config
from dinolab.models.build import build_student_backbone
from dinolab.models.vit import DinoVisionTransformer
from dinolab.train.meta_arch import SSLMetaArch, config_sections

ARCH_BY_WIDTH = {192: "vit_tiny", 384: "vit_small", 768: "vit_base", 1024: "vit_large", 1536: "vit_giant2"}
PRESET_BY_WIDTH = {384: "adapt_vits14", 768: "adapt_vitb14", 1024: "adapt_vitl14"}
SMALL_PRESET = "adapt_cpu"  # anything that is no official size (e.g. the cpu preset's patch-4 ViT)
GRID_PATCHES = 16  # global crops of 16 patches (224 px at patch 14), local crops of 7 (98 px)
LOCAL_PATCHES = 7


def source_files(weights: str | Path) -> tuple[Path, Path | None]:
    """(weights file, run folder or None) for ``--adapt WEIGHTS``.

    Raises:
        FileNotFoundError: no such file or folder, or a run folder without its exported backbone.
    """
    from dinolab.models.resolve import run_weights

    path = Path(weights)
    if path.is_dir():
        return run_weights(path), path
    if not path.is_file():
        raise FileNotFoundError(f"--adapt {weights}: no such weights file or run folder")
    return path, None


def read_source(weights: str | Path):
    """The source backbone of ``--adapt`` (built and loaded, which checks the weights) and its run folder.

    Raises:
        ValueError: weights that are not a backbone (one line).
    """
    from dinolab.models.factory import build_backbone
    from dinolab.models.resolve import load_backbone_from_run

    file, run = source_files(weights)
    try:
        model = load_backbone_from_run(run)[0] if run is not None else build_backbone("auto", weights=file)
    except KeyError as err:  # a state dict of some other model (no cls_token / patch_embed ...)
        raise ValueError(f"--adapt {weights}: not a ViT backbone (no {err.args[0]!r} tensor)") from None
    except ValueError as err:
        raise ValueError(f"--adapt {weights}: {err}") from None
    return model, run


def adapt_base(weights: str | Path) -> tuple[dict, str]:
    """Config deltas for ``--adapt WEIGHTS`` and the default preset for the weights' size.

    Returns:
        ``({"student": ..., "crops": ..., "adapt": {"weights": ...}}, preset name)``.
    """
    from omegaconf import OmegaConf

    from dinolab.models.resolve import run_input_size

    model, run = read_source(weights)
    kw = model.arch_kwargs
    if kw.get("ffn_layer", "mlp") == "mlp" and kw.get("mlp_ratio", 4.0) != 4.0:
        raise ValueError(f"--adapt {weights}: an MLP ratio of {kw['mlp_ratio']} (the training schema builds 4)")
    dim, patch = kw["embed_dim"], kw["patch_size"]
    source_cfg = None
    if run is not None:
        from dinolab.configs.schema import load_yaml

        source_cfg = load_yaml(run / "config.yaml")
    # the name only labels the run (every size is given): the source run's, else the official one of this width
    arch = (OmegaConf.select(source_cfg, "student.arch") if source_cfg is not None else None) \
        or ARCH_BY_WIDTH.get(dim, "vit_small")
    student = {
        "arch": arch, "embed_dim": dim, "depth": kw["depth"],
        "num_heads": kw["num_heads"], "patch_size": patch, "ffn_layer": kw.get("ffn_layer", "mlp"),
        "num_register_tokens": kw.get("num_register_tokens", 0), "img_size": kw["img_size"],
        "pretrained_weights": str(source_files(weights)[0]),
    }
    if kw.get("init_values") is not None:
        student["layerscale"] = float(kw["init_values"])
    grid = kw["img_size"] // patch
    global_size = (run_input_size(run) if run is not None else None) or patch * min(grid, GRID_PATCHES)
    local_size = patch * max(1, round(global_size / patch * LOCAL_PATCHES / GRID_PATCHES))
    if source_cfg is not None:
        local_size = OmegaConf.select(source_cfg, "crops.local_crops_size") or local_size
    crops = {"global_crops_size": int(global_size), "local_crops_size": int(local_size)}
    preset = PRESET_BY_WIDTH.get(dim, SMALL_PRESET) if patch >= 14 else SMALL_PRESET
    return {"student": student, "crops": crops, "adapt": {"weights": str(weights)}}, preset


def head_warmup_iters(cfg: Config) -> int:
    """Iterations of the head warm-up: ``adapt.head_warmup_iters``, else its fraction of the run."""
    a = cfg.adapt
    if a.head_warmup_iters is not None:
        return a.head_warmup_iters
    return round(a.head_warmup_fraction * cfg.optim.total_iters)


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean ``1 - cos`` between the rows of ``a`` and ``b`` [n, D] (fp32) -> scalar."""
    return (1.0 - F.cosine_similarity(a.float(), b.float(), dim=-1)).mean()


class AdaptMetaArch(SSLMetaArch):
    """:class:`SSLMetaArch` with the head warm-up on a frozen backbone and the feature anchor.

    ``source`` is a frozen copy of the backbone as loaded (no drop path): neither trained nor EMA'd.

    Args:
        adapt: the anchor's weight and tokens.
        warmup_iters: iterations of the head warm-up (:func:`head_warmup_iters`).
        sections: :class:`SSLMetaArch`'s keyword arguments.
    """

    def __init__(self, backbone: DinoVisionTransformer, *, adapt: AdaptConfig, warmup_iters: int, **sections) -> None:
        super().__init__(backbone, **sections)
        self.adapt_cfg = adapt
        self.warmup_iters = warmup_iters
        if adapt.anchor_weight > 0:
            self.source = copy.deepcopy(self.student.backbone)
            for blk in self.source.blocks:
                blk.drop_path = 0.0
            self.source.requires_grad_(False)

    @classmethod
    def from_config(cls, cfg: Config) -> AdaptMetaArch:
        """The student built from (and loaded with) ``student.pretrained_weights``, the recipe of ``cfg.adapt``."""
        return cls(build_student_backbone(cfg), adapt=cfg.adapt, warmup_iters=head_warmup_iters(cfg),
                   **config_sections(cfg))

    def begin_step(self, iteration: int) -> None:
        """Freeze the student's backbone during the head warm-up, unfreeze it after."""
        if self.freeze_backbone:
            return
        train_backbone = iteration >= self.warmup_iters
        backbone = self.student.backbone
        if next(backbone.parameters()).requires_grad != train_backbone:
            backbone.requires_grad_(train_backbone)

    @torch.no_grad()
    def teacher_targets(self, batch: dict, teacher_temp: float) -> dict[str, torch.Tensor]:
        """The teacher's targets and, with the anchor, the source's tokens on the student's (masked) global crops."""
        targets = super().teacher_targets(batch, teacher_temp)
        if self.adapt_cfg.anchor_weight > 0:
            out = self.source(batch["global_crops"], self._student_masks(batch), is_training=True)
            targets["anchor_cls"] = out["x_norm_clstoken"]
            targets["anchor_patch"] = out["x_norm_patchtokens"].mean(1)
        return targets

    def compute_losses(self, student: dict, targets: dict, batch: dict) -> dict[str, torch.Tensor]:
        """The DINOv2 terms plus ``anchor`` (when ``adapt.anchor_weight > 0``), included in ``total``."""
        losses = super().compute_losses(student, targets, batch)
        a = self.adapt_cfg
        if a.anchor_weight <= 0:
            return losses
        terms = []
        if a.anchor_tokens in ("cls", "cls+patch"):
            terms.append(cosine_distance(student["global_cls"], targets["anchor_cls"]))
        if a.anchor_tokens in ("patch", "cls+patch"):
            terms.append(cosine_distance(student["global_patches"].mean(1), targets["anchor_patch"]))
        losses["anchor"] = a.anchor_weight * sum(terms) / len(terms)
        losses["total"] = losses["total"] + losses["anchor"]
        return losses
