"""Teacher centering: turn teacher logits into targets that cannot collapse onto one prototype.

Two methods, as in DINOv2:
  * ``sinkhorn_knopp``: a few Sinkhorn-Knopp iterations make every prototype receive the same share of the
    (global) batch (SwAV; official ``sinkhorn_knopp_teacher`` in ``dinov2/loss/dino_clstoken_loss.py`` and
    ``ibot_patch_loss.py``). Used by the paper's ViT-L/g recipes.
  * ``softmax_center`` + ``EmaCenter``: subtract an EMA of the mean teacher logit, then a sharp softmax
    (DINO; official ``softmax_center_teacher`` / ``update_center``). The official default config.

Every collective is guarded: without an initialised process group everything is local.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dinolab.utils.cpu_tuning import block_rows


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_reduce(tensor: torch.Tensor, group: dist.ProcessGroup | None, op: dist.ReduceOp = dist.ReduceOp.SUM) -> None:
    if _distributed():
        dist.all_reduce(tensor, op=op, group=group)


@torch.no_grad()
def sinkhorn_knopp(
    teacher_logits: torch.Tensor,
    teacher_temp: float,
    n_iterations: int = 3,
    n_samples: int | torch.Tensor | None = None,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Balanced soft assignment of samples to prototypes (official ``sinkhorn_knopp_teacher``).

    Pseudocode (``Q`` is K x B_total, spread over the ranks by columns)::

        Q = exp(teacher_logits / teacher_temp).T;  Q /= sum(Q)          # sums all-reduced
        repeat n_iterations:
            Q /= row_sums(Q) (all-reduced); Q /= K                        # each prototype: mass 1/K
            Q /= col_sums(Q);               Q /= B_total                  # each sample:    mass 1/B_total
        return (Q * B_total).T

    So every output row (sample) sums to exactly 1, and every output column (prototype) sums to about
    ``B_total / K`` over all ranks (exactly in the limit of many iterations; the last step balances samples).

    Two guards the official code lacks, neither of which changes a finite official result: the logits are
    shifted by a global constant before ``exp`` (removed by the first normalisation): the midpoint of their
    range, so every exponent is within ``+-60`` whenever the range is below ``120 x teacher_temp`` (the
    official code needs every ``|logit| < 88 x teacher_temp`` instead); and the row/column sums are clamped
    to the smallest normal float, so a sample or prototype whose entries all underflow (ranges beyond that)
    gets zeros instead of NaN.

    Args:
        teacher_logits: [B, K] teacher head outputs on this rank (any float dtype; computed in fp32).
        teacher_temp: teacher temperature (0.04 -> 0.07 in the official schedule).
        n_iterations: Sinkhorn-Knopp iterations (official 3).
        n_samples: global number of samples ``B_total`` over all ranks of ``group``. ``None`` sums the local
            row counts over the ranks, which is right both for equal per-rank batches (DINO: ``B x world``)
            and for unequal ones (iBOT: the global number of masked patches, official pitfall).
        group: process group for the all-reduces (default: the world group when initialised).

    Returns:
        [B, K] fp32 targets; rows sum to 1.
    """
    if teacher_logits.ndim != 2:
        raise ValueError(f"sinkhorn_knopp expects teacher_logits [B,K], got {tuple(teacher_logits.shape)}")
    n_rows, n_protos = teacher_logits.shape
    tiny = torch.finfo(torch.float32).tiny
    device = teacher_logits.device
    if n_samples is None:
        n_total = torch.tensor(float(n_rows), device=device)
        _all_reduce(n_total, group)
    else:
        n_total = torch.as_tensor(n_samples, dtype=torch.float32, device=device).reshape(())
    shift = _exp_safe_shift(teacher_logits, teacher_temp, group)
    # Stored sample-major ([B, K], the transpose of the pseudocode's Q) so that a sample's row is contiguous.
    # Every element-wise pass runs over a few rows at a time (they stay in cache); the prototype sums are one
    # streaming column reduction per iteration.
    q = torch.empty(n_rows, n_protos, dtype=torch.float32, device=device)
    rows = block_rows(n_protos)
    for start in range(0, n_rows, rows):
        q[start : start + rows].copy_(teacher_logits[start : start + rows]).sub_(shift).div_(teacher_temp).exp_()
    total = q.sum()
    _all_reduce(total, group)
    total = total.clamp_min(tiny)
    for it in range(n_iterations):
        proto_mass = q.sum(dim=0)  # [K]: mass per prototype, over all ranks
        _all_reduce(proto_mass, group)
        # Q /= row sums; Q /= K. q is not yet divided by the pseudocode's first "Q /= sum(Q)": on the first pass
        # that division is folded into this one (the mass is taken of Q / total, the scale applied to q / total)
        unapplied = total if it == 0 else 1.0
        proto_scale = proto_mass.div_(unapplied).clamp_min_(tiny).mul_(n_protos * unapplied).reciprocal_()
        last = it == n_iterations - 1
        for start in range(0, n_rows, rows):
            block = q[start : start + rows].mul_(proto_scale)
            sample_mass = block.sum(dim=1, keepdim=True).clamp_min_(tiny)  # a sample lives on one rank
            # divide by the sample mass and by B; the final "* B" cancels the last division
            block.div_(sample_mass if last else sample_mass * n_total)
    if n_iterations == 0:
        q /= total
        q *= n_total
    return q


# largest exponent after the shift: e^60 ~ 1e26 leaves room for summing ~1e12 entries below fp32's 3.4e38
_MAX_EXPONENT = 60.0


def _exp_safe_shift(logits: torch.Tensor, teacher_temp: float, group: dist.ProcessGroup | None) -> torch.Tensor:
    """A global constant to subtract before ``exp``: the midpoint of the global range, raised if needed so
    that the largest exponent is at most ``_MAX_EXPONENT`` (one collective; 0 when there are no logits)."""
    if logits.numel():
        low, high = torch.aminmax(logits)
        extremes = torch.stack([high, -low]).float()
    else:
        extremes = torch.full((2,), float("-inf"), device=logits.device)
    _all_reduce(extremes, group, op=dist.ReduceOp.MAX)
    if not torch.isfinite(extremes).all():
        return torch.zeros((), device=logits.device)
    global_max, global_min = extremes[0], -extremes[1]
    return torch.maximum((global_max + global_min) / 2, global_max - _MAX_EXPONENT * teacher_temp)


@torch.no_grad()
def softmax_center(teacher_logits: torch.Tensor, center: torch.Tensor, teacher_temp: float) -> torch.Tensor:
    """``softmax((teacher_logits - center) / teacher_temp)`` in fp32 (official ``softmax_center_teacher``).

    Args:
        teacher_logits: [..., K] teacher head outputs.
        center: [K] or [1, K] running centre (``EmaCenter.center``).
        teacher_temp: teacher temperature.

    Returns:
        [..., K] fp32 probabilities.
    """
    return F.softmax((teacher_logits.float() - center.float()) / teacher_temp, dim=-1)


class EmaCenter(nn.Module):
    """Running centre of the teacher logits: ``center <- m * center + (1 - m) * batch_mean``.

    The update is a call of its own, made apart from the loss value (lightly ``Center``): use
    ``probs = center(logits, temp)`` then ``center.update(logits)``. That is the official order: dinov2
    applies the previous step's (asynchronously all-reduced) mean before the softmax and starts the reduce
    of the current mean after it, so the targets of step t use the centre of steps < t.

    ``batch_mean`` is the mean over every row of every rank (sum and count all-reduced). For DINO, with
    equal per-rank batches, that equals the official ``sum / (len * world_size)``; for iBOT patches it is
    the exact mean over all masked tokens, where the official divides each rank's sum of per-rank means.

    Args:
        dim: number of prototypes K.
        momentum: EMA momentum m (official 0.9).
    """

    center: torch.Tensor

    def __init__(self, dim: int, momentum: float = 0.9, device: torch.device | str | None = None) -> None:
        super().__init__()
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"EmaCenter: momentum must be in [0, 1], got {momentum}")
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(1, dim, device=device))

    def forward(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """Centred, sharpened teacher probabilities: [..., K] -> [..., K] fp32."""
        return softmax_center(teacher_logits, self.center, teacher_temp)

    @torch.no_grad()
    def update(self, teacher_logits: torch.Tensor, group: dist.ProcessGroup | None = None) -> None:
        """Fold the mean of ``teacher_logits`` [..., K] (all ranks) into the centre; no-op on 0 rows."""
        rows = teacher_logits.detach().float().reshape(-1, self.center.shape[-1])
        total = rows.sum(dim=0, keepdim=True)  # [1, K]
        count = torch.tensor(float(rows.shape[0]), device=rows.device)
        _all_reduce(total, group)
        _all_reduce(count, group)
        batch_mean = total / count.clamp_min(1.0)
        updated = self.center * self.momentum + batch_mean * (1.0 - self.momentum)
        # torch.where instead of an `if`: no device-to-host sync on the count
        self.center.copy_(torch.where(count > 0, updated, self.center))
