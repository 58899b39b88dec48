"""One DINOv2 training iteration, in five calls that read top to bottom."""

from __future__ import annotations

import math

import torch

from dinolab.distributed.fsdp import view_outputs_expected
from dinolab.train.meta_arch import SSLMetaArch
from dinolab.train.param_groups import apply_schedule
from dinolab.train.schedules import ScheduleValues
from dinolab.utils.runtime import autocast_context


def check_finite(losses: dict[str, torch.Tensor], iteration: int) -> None:
    """Stop on a NaN/Inf loss, naming the term and the iteration as the logs and checkpoints count it
    (``iteration`` is the 0-based step index: the message says ``iteration + 1``)."""
    for name, value in losses.items():
        v = float(value.detach())
        if not math.isfinite(v):
            raise FloatingPointError(f"loss term '{name}' is {v} at iteration {iteration + 1}")


def train_step(
    meta: SSLMetaArch,
    optimizer: torch.optim.Optimizer,
    batch: dict,
    sched: ScheduleValues,
    iteration: int,
    precision: str = "fp32",
    clip_grad: float = 3.0,
    scaler: torch.amp.GradScaler | None = None,
    keep_grads: bool = False,
) -> dict[str, float]:
    """Teacher targets, student outputs, losses, backward/clip/step, EMA teacher update.

    The gradients are freed after the optimizer step unless ``keep_grads`` (to inspect them).
    Returns the loss terms as floats (``total`` included).
    """
    meta.begin_step(iteration)
    apply_schedule(optimizer, lr=sched.lr, weight_decay=sched.weight_decay, last_layer_lr=sched.last_layer_lr)
    device = batch["global_crops"].device
    with autocast_context(device, precision), view_outputs_expected():
        targets = meta.teacher_targets(batch, sched.teacher_temp)
        outputs = meta.student_outputs(batch)
    losses = meta.compute_losses(outputs, targets, batch)  # fp32: every loss upcasts its inputs
    del outputs, targets  # the head logits and targets [tokens, K]: the losses' graph keeps what it needs
    check_finite(losses, iteration)

    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(losses["total"]).backward()
        scaler.unscale_(optimizer)
    else:
        losses["total"].backward()
    if clip_grad > 0:
        for module in meta.student.values():  # per sub-module, as the official code
            torch.nn.utils.clip_grad_norm_(module.parameters(), clip_grad)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    # free the gradients now, not at the next backward: the next forward's activations do not meet them
    # (-264 MB at the peak of a ViT-S/14 step, whose 65k-prototype heads hold 2/3 of the parameters)
    if not keep_grads:
        optimizer.zero_grad(set_to_none=True)
    meta.update_teacher(sched.momentum)
    return {k: float(v.detach()) for k, v in losses.items()}
