"""The parts of a training run built from its config: meta-architecture, optimizer, schedules, loss scaler,
compiled blocks and the k-NN monitor (:mod:`dinolab.train.loop` assembles them; benches and tests build them alone)."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from dinolab.configs.schema import Config
from dinolab.data.datasets import open_labelled
from dinolab.distributed.env import DistEnv
from dinolab.distributed.fsdp import unwrapped_side
from dinolab.models.vit import DinoVisionTransformer
from dinolab.train.meta_arch import SSLMetaArch
from dinolab.train.monitor import KnnMonitor
from dinolab.train.param_groups import ParamGroupConfig, build_param_groups
from dinolab.train.schedules import ScheduleConfig, scale_lr
from dinolab.utils.runtime import compile_blocks


def build_meta_arch(cfg: Config) -> SSLMetaArch:
    """The self-supervised meta-architecture, the distillation one when ``distill.teacher_checkpoint`` is set,
    or the adaptation one (head warm-up, feature anchor) when ``adapt.weights`` is."""
    if cfg.distill.enabled:
        from dinolab.train.distill import DistillMetaArch

        return DistillMetaArch.from_config(cfg)
    if cfg.adapt.enabled:
        from dinolab.train.adapt import AdaptMetaArch

        return AdaptMetaArch.from_config(cfg)
    return SSLMetaArch.from_config(cfg)


def schedule_config(cfg: Config, global_batch: int) -> ScheduleConfig:
    """Every schedule of ``cfg`` in iterations; the lr scaled by the global batch."""
    o, t = cfg.optim, cfg.teacher
    to_iters = o.to_iters  # epochs -> iterations (compressed for high-resolution adaptation)
    base_lr = o.base_lr * o.base_lr_scale
    base_lr = scale_lr(base_lr, global_batch) if o.scaling_rule == "sqrt_wrt_1024" else base_lr
    return ScheduleConfig(
        total_iters=o.total_iters,
        warmup_iters=to_iters(o.warmup_epochs),
        base_lr=base_lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        weight_decay_end=o.weight_decay_end,
        momentum_teacher=t.momentum_teacher,
        final_momentum_teacher=t.final_momentum_teacher,
        warmup_teacher_temp=t.warmup_teacher_temp,
        teacher_temp=t.teacher_temp,
        warmup_teacher_temp_iters=min(to_iters(t.warmup_teacher_temp_epochs), o.total_iters),
        freeze_last_layer_iters=to_iters(o.freeze_last_layer_epochs),
    )


def build_optimizer(meta: SSLMetaArch, cfg: Config) -> torch.optim.AdamW:
    """AdamW over the student's parameter groups (after sharding: FSDP replaces the parameters)."""
    groups = build_param_groups(
        unwrapped_side(meta.student),
        ParamGroupConfig(layerwise_decay=cfg.optim.layerwise_decay, patch_embed_lr_mult=cfg.optim.patch_embed_lr_mult),
    )
    # fused where parameters are plain tensors (one kernel per group; measured no change in peak memory
    # on the ViT-S/14 bench); sharded DTensor parameters take foreach
    fused = not any(isinstance(p, DTensor) for g in groups for p in g["params"])
    return torch.optim.AdamW(
        groups, betas=(cfg.optim.adamw_beta1, cfg.optim.adamw_beta2), fused=fused, foreach=not fused
    )


def grad_scaler(device: torch.device, precision: str, env: DistEnv, mode: str) -> torch.amp.GradScaler | None:
    """A loss scaler for fp16 (GPU only); the sharded one all-reduces its inf checks over the ranks."""
    if precision != "fp16":
        return None
    if env.distributed and mode == "fsdp":
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(device.type)
    return torch.amp.GradScaler(device.type)


def compile_backbones(meta: SSLMetaArch) -> None:
    """``torch.compile`` every transformer block of every backbone in place (``train.compile``; on CPU check
    the compiler first: :func:`dinolab.utils.runtime.check_compiler`)."""
    compile_blocks(m for m in meta.modules() if isinstance(m, DinoVisionTransformer))


def knn_wanted(cfg: Config) -> bool:
    """k-NN during training: with a labelled set (``data.eval_path``), or on the embedded digits by default."""
    return not (cfg.data.eval_path is None and cfg.data.path is not None)


def build_knn_monitor(cfg: Config, precision: str) -> KnnMonitor | None:
    """The k-NN monitor at the run's own input size (``train.knn_image_size`` or the global crops), or None."""
    if not knn_wanted(cfg):
        return None
    data = open_labelled(cfg.data.eval_path, image_size=cfg.data.builtin_image_size)  # None: the embedded digits
    size = cfg.train.knn_image_size or cfg.crops.global_crops_size
    return KnnMonitor(data, image_size=size, k=cfg.train.knn_k, bf16=precision == "bf16")
