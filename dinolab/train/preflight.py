"""What a run reads, checked before any work and before the run folder is made: the one home of each check,
called by ``dinolab train`` (:func:`dinolab.train.cli.validate_run`, which counts the images without decoding
them) and by :func:`dinolab.train.loop.train` (a notebook's call, or a worker under ``torchrun``).

Each check raises one line naming the input (``FileNotFoundError`` or ``ValueError``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from dinolab.configs.schema import Config
from dinolab.data.datasets import BUILTIN_PREFIX
from dinolab.utils.runtime import check_compiler, resolve_device, resolve_precision


def check_sources(cfg: Config) -> None:
    """The checkpoints, weights and configs the run starts from, and the k-NN set, exist."""
    sources = {"distill.teacher_checkpoint": cfg.distill.teacher_checkpoint, "train.init_from": cfg.train.init_from,
               "student.pretrained_weights": cfg.student.pretrained_weights,
               "distill.teacher_config": cfg.distill.teacher_config}
    for key, path in sources.items():
        if path is not None and not Path(path).exists():
            raise FileNotFoundError(f"{key}: {path} does not exist")
    eval_path = cfg.data.eval_path
    if eval_path is not None and not str(eval_path).startswith(BUILTIN_PREFIX) and not Path(eval_path).exists():
        raise FileNotFoundError(f"--eval-data (data.eval_path) {eval_path} does not exist")


def check_batch(cfg: Config, n_images: int, world_size: int) -> None:
    """One global batch (``train.batch_size_per_gpu`` x ``world_size``) fits in the ``n_images`` of the data."""
    per_rank = cfg.train.batch_size_per_gpu
    if per_rank * world_size > n_images:
        what = f"train.batch_size_per_gpu={per_rank}" + (f" x {world_size} processes" if world_size > 1 else "")
        raise ValueError(f"{what} is larger than the {n_images} images of {cfg.data.path or 'the embedded digits set'}: "
                         f"set train.batch_size_per_gpu to at most {max(n_images // world_size, 1)}")


def resolve_runtime(cfg: Config, local_rank: int | None = None) -> tuple[torch.device, str]:
    """``(device, precision)`` of the run on this process; refuses fp16 on CPU and ``train.compile`` without the
    C++ compiler it needs."""
    device = resolve_device(cfg.train.device, local_rank)
    precision = resolve_precision(cfg.train.precision, device)
    if cfg.train.compile:
        check_compiler(device)
    return device, precision
