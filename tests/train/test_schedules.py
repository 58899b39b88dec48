from __future__ import annotations

import math

import numpy as np
import pytest

from dinolab.train.schedules import (
    ScheduleConfig,
    cosine_at,
    last_layer_lr_at,
    lr_at,
    scale_lr,
    schedule_values,
    teacher_temp_at,
    warmup_cosine,
)


def _official_cosine_array(base_value, final_value, total_iters, warmup_iters=0, start_warmup_value=0, freeze_iters=0):
    """Frozen re-statement of dinov2 utils.CosineScheduler's precomputed array (our own code)."""
    freeze = np.zeros(freeze_iters)
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters)
    iters = np.arange(total_iters - warmup_iters - freeze_iters)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((freeze, warmup, cosine))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(base_value=1e-3, final_value=1e-6, total_iters=50, warmup_iters=10),
        dict(base_value=0.04, final_value=0.2, total_iters=37),
        dict(base_value=2.0, final_value=0.5, total_iters=30, warmup_iters=1, start_warmup_value=0.3, freeze_iters=4),
        dict(base_value=0.07, final_value=0.07, total_iters=12, warmup_iters=12, start_warmup_value=0.04),
    ],
)
def test_equals_official_cosine_scheduler(kwargs):
    array = _official_cosine_array(**kwargs)
    for it in range(kwargs["total_iters"]):
        assert warmup_cosine(it, **kwargs) == pytest.approx(array[it], rel=1e-12, abs=1e-15)
    for it in (kwargs["total_iters"], kwargs["total_iters"] + 7):  # official __getitem__ past the end
        assert warmup_cosine(it, **kwargs) == kwargs["final_value"]


def test_lr_values_by_hand():
    kw = dict(base_lr=1e-3, min_lr=1e-6, total_iters=100, warmup_iters=10)
    assert lr_at(0, **kw) == 0.0
    assert lr_at(5, **kw) == pytest.approx(1e-3 * 5 / 9)  # linspace(0, base, 10)[5]
    assert lr_at(9, **kw) == pytest.approx(1e-3)  # the warmup ends on base_lr
    assert lr_at(10, **kw) == pytest.approx(1e-3)  # cosine starts at cos(0)
    assert lr_at(55, **kw) == pytest.approx(1e-6 + 0.5 * (1e-3 - 1e-6))  # j = 45 of 90: cos(pi / 2) = 0
    assert lr_at(100, **kw) == 1e-6


def test_last_layer_frozen_then_equal_to_lr():
    kw = dict(base_lr=1e-3, min_lr=1e-6, total_iters=100, warmup_iters=10)
    for it in range(100):
        expected = 0.0 if it < 25 else lr_at(it, **kw)
        assert last_layer_lr_at(it, freeze_last_layer_iters=25, **kw) == expected
    assert last_layer_lr_at(24, freeze_last_layer_iters=25, **kw) == 0.0
    assert last_layer_lr_at(25, freeze_last_layer_iters=25, **kw) > 0.0


def test_weight_decay_and_momentum_by_hand():
    assert cosine_at(0, start=0.04, end=0.2, total_iters=100) == pytest.approx(0.04)
    assert cosine_at(50, start=0.04, end=0.2, total_iters=100) == pytest.approx(0.12)  # midpoint
    assert cosine_at(25, start=0.04, end=0.2, total_iters=100) == pytest.approx(0.2 - 0.08 * (1 + math.sqrt(0.5)))
    assert cosine_at(100, start=0.04, end=0.2, total_iters=100) == 0.2
    assert cosine_at(500, start=0.994, end=1.0, total_iters=1000) == pytest.approx(0.997)


def test_teacher_temperature_warmup_then_constant():
    kw = dict(warmup_temp=0.04, temp=0.07, warmup_iters=31)
    assert teacher_temp_at(0, **kw) == pytest.approx(0.04)
    assert teacher_temp_at(10, **kw) == pytest.approx(0.04 + 0.03 * 10 / 30)
    assert teacher_temp_at(30, **kw) == pytest.approx(0.07)  # end point of the linspace
    assert teacher_temp_at(31, **kw) == 0.07
    assert teacher_temp_at(10**6, **kw) == 0.07
    assert teacher_temp_at(0, warmup_temp=0.04, temp=0.07, warmup_iters=0) == 0.07


def test_scale_lr_square_root_rule():
    assert scale_lr(4e-3, 1024) == pytest.approx(4e-3)
    assert scale_lr(4e-3, 2048) == pytest.approx(4e-3 * math.sqrt(2))
    assert scale_lr(2e-4, 3072) == pytest.approx(3.464e-4, rel=1e-3)  # RECIPE 2.7: ViT-g at 3,072 -> 3.46e-4


def test_schedule_values_bundle():
    cfg = ScheduleConfig(
        total_iters=100, warmup_iters=10, base_lr=1e-3, min_lr=1e-6, weight_decay=0.04, weight_decay_end=0.2,
        momentum_teacher=0.994, final_momentum_teacher=1.0, warmup_teacher_temp=0.04, teacher_temp=0.07,
        warmup_teacher_temp_iters=31, freeze_last_layer_iters=5,
    )
    at_50 = schedule_values(cfg, 50)
    assert at_50.lr == lr_at(50, base_lr=1e-3, min_lr=1e-6, total_iters=100, warmup_iters=10)
    assert at_50.weight_decay == pytest.approx(0.12)
    assert at_50.momentum == pytest.approx(0.997)
    assert at_50.teacher_temp == 0.07
    assert schedule_values(cfg, 3).last_layer_lr == 0.0 and schedule_values(cfg, 3).lr > 0


def test_invalid_inputs_are_rejected():
    kw = dict(base_lr=1e-3, min_lr=1e-6, total_iters=100, warmup_iters=10)
    with pytest.raises(ValueError, match="iteration"):
        lr_at(-1, **kw)
    with pytest.raises(ValueError, match="iteration"):
        lr_at(1.5, **kw)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="exceeds total_iters"):
        lr_at(0, base_lr=1e-3, min_lr=0.0, total_iters=10, warmup_iters=11)
    with pytest.raises(ValueError, match="total_iters"):
        cosine_at(0, start=0.04, end=0.2, total_iters=0)
    with pytest.raises(ValueError, match="global_batch"):
        scale_lr(1e-3, 0)
    with pytest.raises(ValueError, match="exceeds total_iters"):
        ScheduleConfig(total_iters=10, warmup_iters=20, base_lr=1e-3, min_lr=0.0, weight_decay=0.04,
                       weight_decay_end=0.4, momentum_teacher=0.992, final_momentum_teacher=1.0,
                       warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_iters=0,
                       freeze_last_layer_iters=0)
    assert lr_at(np.int64(3), **kw) == lr_at(3, **kw)  # numpy integers are iterations too
