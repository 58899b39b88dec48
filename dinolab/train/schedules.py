"""Training schedules as pure functions of the iteration (official ``dinov2/utils/utils.py`` CosineScheduler).

The official code precomputes arrays; here every value is computed from the iteration alone, so a
resumed run needs nothing but its iteration counter. Values equal the official arrays:

    freeze:  it < freeze_iters                          -> 0
    warmup:  j = it - freeze_iters < warmup_iters       -> linspace(start_warmup_value, base_value, warmup_iters)[j]
    cosine:  j = it - freeze_iters - warmup_iters, n = total_iters - warmup_iters - freeze_iters
                                                        -> final + 0.5 (base - final) (1 + cos(pi j / n))
    after:   it >= total_iters                          -> final_value

Note the official quirks kept here: the warmup reaches ``base_value`` at its last iteration (``linspace``
includes the end point) and the cosine stops one step short of ``final_value``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass


def _check_iteration(iteration: int) -> None:
    if isinstance(iteration, bool) or not isinstance(iteration, numbers.Integral) or iteration < 0:
        raise ValueError(f"iteration must be a non-negative int, got {iteration!r}")


def _check_lengths(total_iters: int, **parts: int) -> None:
    if total_iters <= 0:
        raise ValueError(f"total_iters must be positive, got {total_iters}")
    for name, value in parts.items():
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if sum(parts.values()) > total_iters:
        names = " + ".join(parts)
        raise ValueError(f"{names} = {sum(parts.values())} exceeds total_iters = {total_iters}")


def warmup_cosine(
    iteration: int,
    *,
    base_value: float,
    final_value: float,
    total_iters: int,
    warmup_iters: int = 0,
    start_warmup_value: float = 0.0,
    freeze_iters: int = 0,
) -> float:
    """Value of the official ``CosineScheduler(...)[iteration]`` (formula in the module docstring)."""
    _check_iteration(iteration)
    _check_lengths(total_iters, warmup_iters=warmup_iters, freeze_iters=freeze_iters)
    if iteration >= total_iters:
        return float(final_value)
    if iteration < freeze_iters:
        return 0.0
    step = iteration - freeze_iters
    if step < warmup_iters:
        if warmup_iters == 1:  # np.linspace(a, b, 1) == [a]
            return float(start_warmup_value)
        return start_warmup_value + (base_value - start_warmup_value) * step / (warmup_iters - 1)
    step -= warmup_iters
    n_cosine = total_iters - warmup_iters - freeze_iters
    return final_value + 0.5 * (base_value - final_value) * (1 + math.cos(math.pi * step / n_cosine))


def lr_at(iteration: int, *, base_lr: float, min_lr: float, total_iters: int, warmup_iters: int) -> float:
    """Learning rate: linear warmup from 0 to ``base_lr``, then cosine to ``min_lr``."""
    return warmup_cosine(
        iteration, base_value=base_lr, final_value=min_lr, total_iters=total_iters, warmup_iters=warmup_iters
    )


def last_layer_lr_at(
    iteration: int,
    *,
    base_lr: float,
    min_lr: float,
    total_iters: int,
    warmup_iters: int,
    freeze_last_layer_iters: int,
) -> float:
    """The lr schedule with its first ``freeze_last_layer_iters`` values set to 0 (prototype layer frozen).

    As the official ``last_layer_lr_schedule.schedule[:freeze] = 0``: the warmup is overwritten, not delayed.
    """
    if freeze_last_layer_iters < 0:
        raise ValueError(f"freeze_last_layer_iters must be >= 0, got {freeze_last_layer_iters}")
    lr = lr_at(iteration, base_lr=base_lr, min_lr=min_lr, total_iters=total_iters, warmup_iters=warmup_iters)
    return 0.0 if iteration < min(freeze_last_layer_iters, total_iters) else lr


def cosine_at(iteration: int, *, start: float, end: float, total_iters: int) -> float:
    """Cosine from ``start`` (iteration 0) towards ``end`` over ``total_iters``; ``end`` afterwards.

    Used for the weight decay (0.04 -> 0.2, or 0.4) and the teacher momentum (0.994 -> 1.0).
    """
    return warmup_cosine(iteration, base_value=start, final_value=end, total_iters=total_iters)


def teacher_temp_at(iteration: int, *, warmup_temp: float, temp: float, warmup_iters: int) -> float:
    """Teacher temperature: linear ``warmup_temp -> temp`` over ``warmup_iters`` (end point included), then ``temp``."""
    _check_iteration(iteration)
    if warmup_iters < 0:
        raise ValueError(f"warmup_iters must be >= 0, got {warmup_iters}")
    if iteration >= warmup_iters:
        return float(temp)
    return warmup_cosine(
        iteration,
        base_value=temp,
        final_value=temp,
        total_iters=warmup_iters,
        warmup_iters=warmup_iters,
        start_warmup_value=warmup_temp,
    )


def scale_lr(base_lr: float, global_batch: int) -> float:
    """``base_lr * sqrt(global_batch / 1024)``: the official square-root rule (``utils/config.py``)."""
    if global_batch <= 0:
        raise ValueError(f"global_batch must be positive, got {global_batch}")
    return base_lr * math.sqrt(global_batch / 1024)


@dataclass(frozen=True)
class ScheduleConfig:
    """Every schedule of a run, lengths in iterations. No defaults here: the values come from the run's config
    (:func:`dinolab.train.build.schedule_config`), whose defaults live in :mod:`dinolab.configs.schema` alone.

    Official lengths are in 1,250-iteration pseudo-epochs: total 625,000, warmup 100,000, teacher
    temperature warmup 37,500, last layer frozen 1,250.
    """

    total_iters: int
    warmup_iters: int
    base_lr: float
    min_lr: float
    weight_decay: float
    weight_decay_end: float
    momentum_teacher: float
    final_momentum_teacher: float
    warmup_teacher_temp: float
    teacher_temp: float
    warmup_teacher_temp_iters: int
    freeze_last_layer_iters: int

    def __post_init__(self) -> None:
        _check_lengths(self.total_iters, warmup_iters=self.warmup_iters)
        if self.warmup_teacher_temp_iters < 0 or self.freeze_last_layer_iters < 0:
            raise ValueError("warmup_teacher_temp_iters and freeze_last_layer_iters must be >= 0")
        if self.base_lr < 0 or self.min_lr < 0:
            raise ValueError(f"base_lr and min_lr must be >= 0, got {self.base_lr}, {self.min_lr}")


@dataclass(frozen=True)
class ScheduleValues:
    """The scheduled values of one iteration."""

    lr: float
    last_layer_lr: float
    weight_decay: float
    momentum: float
    teacher_temp: float


def schedule_values(cfg: ScheduleConfig, iteration: int) -> ScheduleValues:
    """All schedules of ``cfg`` at ``iteration``."""
    lr_kw = {
        "base_lr": cfg.base_lr,
        "min_lr": cfg.min_lr,
        "total_iters": cfg.total_iters,
        "warmup_iters": cfg.warmup_iters,
    }
    total = cfg.total_iters
    return ScheduleValues(
        lr=lr_at(iteration, **lr_kw),
        last_layer_lr=last_layer_lr_at(iteration, freeze_last_layer_iters=cfg.freeze_last_layer_iters, **lr_kw),
        weight_decay=cosine_at(iteration, start=cfg.weight_decay, end=cfg.weight_decay_end, total_iters=total),
        momentum=cosine_at(iteration, start=cfg.momentum_teacher, end=cfg.final_momentum_teacher, total_iters=total),
        teacher_temp=teacher_temp_at(
            iteration,
            warmup_temp=cfg.warmup_teacher_temp,
            temp=cfg.teacher_temp,
            warmup_iters=cfg.warmup_teacher_temp_iters,
        ),
    )
