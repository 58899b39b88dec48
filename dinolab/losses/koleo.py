"""KoLeo regulariser: spreads features by pushing each one away from its nearest neighbour.

References: Sablayrolles et al. 2019, "Spreading vectors for similarity search" (Kozachenko-Leonenko
differential entropy estimator); official ``dinov2/loss/koleo_loss.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``-mean_i log(||x_i - x_nn(i)|| + eps)`` over L2-normalised rows, nearest neighbour excluding self.

    As the official loss: rows are L2-normalised (``F.normalize(eps=eps)``), the neighbour is the other row
    with the largest inner product, and the distance is ``torch.pairwise_distance(x_i, x_nn, eps=eps)``,
    i.e. ``||x_i - x_nn + eps||``. Computed in at least fp32 with autocast disabled.

    Differences that make it safe (dinov2 issues #314, #492):
      * self is excluded with ``-inf`` on the diagonal, not ``-1`` (with ``-1`` an antipodal neighbour
        ties with self and may be picked as "self", distance ~0);
      * half-precision input is upcast, so ``eps`` does not underflow to 0;
      * duplicate rows give distance ``eps * sqrt(D)`` (the ``+eps`` inside the norm): a finite loss and
        finite gradients, never ``log 0``;
      * a batch of one has no neighbour: the loss is defined as 0 (a tensor without gradient).

    Worked value: two antipodal unit vectors ``e, -e`` in ``D`` dims. Row ``e`` sees
    ``e - (-e) + eps = (2 + eps, eps, ...)``, row ``-e`` sees ``(-2 + eps, eps, ...)``, so the loss is
    ``-(log(sqrt((2 + eps)^2 + (D-1) eps^2) + eps) + log(sqrt((2 - eps)^2 + (D-1) eps^2) + eps)) / 2
    = -log 2 - eps / 2 + O(eps^2)``, i.e. ``-log 2`` in fp32.

    Args:
        x: [B, D] features (official use: the backbone's pre-head class token of one global-crop chunk).
        eps: normalisation and distance epsilon (official 1e-8).

    Returns:
        Scalar loss in fp32 (fp64 for fp64 input).
    """
    if x.ndim != 2:
        raise ValueError(f"koleo_loss expects x [B,D], got {tuple(x.shape)}")
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    if x.shape[0] < 2:
        return torch.zeros((), dtype=compute_dtype, device=x.device)
    with torch.autocast(device_type=x.device.type, enabled=False):
        x = F.normalize(x.to(compute_dtype), p=2, dim=-1, eps=eps)
        neighbour = _nearest_neighbour_inner(x)
        distances = F.pairwise_distance(x, x[neighbour], p=2, eps=eps)  # [B]
        return -torch.log(distances + eps).mean()


@torch.no_grad()
def _nearest_neighbour_inner(x: torch.Tensor) -> torch.Tensor:
    """Index of each row's most similar other row by inner product: x [B, D] -> [B] int64."""
    dots = x @ x.t()
    dots.fill_diagonal_(float("-inf"))
    return dots.argmax(dim=1)
