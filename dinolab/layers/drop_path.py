"""Stochastic depth (drop path) for residual branches, in two flavours.

``mask``: every sample computes the branch; dropped samples' outputs are zeroed and kept ones
scaled by 1/(1-d) (the classic DropPath).

``efficient`` (DINOv2 paper §5, official ``drop_add_residual_stochastic_depth``): only a random
subset of ceil((1-d)*B) samples computes the branch at all, and its output is added back scaled
by B / subset_size, so the expected update equals the plain residual and compute falls with d.
"""

from __future__ import annotations

import math

import torch

DROP_PATH_MODES = ("efficient", "mask")


def drop_path_mask(residual: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """residual [B, ...]: zero whole samples with probability ``rate``, rescale the rest."""
    if rate == 0.0 or not training:
        return residual
    keep = 1.0 - rate
    shape = (residual.shape[0],) + (1,) * (residual.ndim - 1)
    mask = residual.new_empty(shape).bernoulli_(keep)
    return residual * mask / keep


def subset_indices(batch: int, rate: float, device: torch.device) -> torch.Tensor:
    """A random subset of ceil((1 - rate) * batch) sample indices (at least one), sorted."""
    size = max(1, math.ceil((1.0 - rate) * batch))
    return torch.randperm(batch, device=device)[:size].sort().values
