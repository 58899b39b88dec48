"""The linear depth head of the lin.1 / lin.4 probes (dinov2 ``hub/depth/decode_heads.py``, ``BNHead`` with
``classify=True``): tokens -> 256 bin logits -> bin probabilities -> expected depth, and its loss.

* head: a 1x1 convolution to 256 logits (no BatchNorm: it is commented out in the official head)
  and x4 bilinear upsampling. The official code upsamples the features and then applies the 1x1
  conv; both steps are linear and bilinear weights sum to 1, so upsampling the 256 logits instead
  gives the same numbers at a fraction of the cost (done as two matrix products, channels last).
* bins: 256 centres uniformly spaced over [min_depth, max_depth] (``bins_strategy="UD"``,
  ``torch.linspace`` including both ends); the depth is the expectation of the centres under
  the bin probabilities.
* "linear normalisation" of the bin probabilities (AdaBins, Bhat et al. 2021, §3.2: "we use a
  linear normalisation instead of softmax"; dinov2 ``norm_strategy="linear"``): ``p_k = (relu(z_k)
  + 0.1) / sum_j (relu(z_j) + 0.1)``. This is what we use (``softmax`` is an option).
* loss: the official depth heads are trained on the expected depth with the scale-invariant log
  loss ``sqrt(var(g) + 0.15 mean(g)^2)``, g = log(pred) - log(gt) on valid pixels (``SigLoss``; the
  official configs add a gradient loss with weight 0.5, left out here).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


# ---------------------------------------------------------------------------------------------- bins
def bin_centers(min_depth: float, max_depth: float, n_bins: int = 256) -> torch.Tensor:
    """[K] uniformly spaced centres including both ends (official ``torch.linspace``)."""
    return torch.linspace(min_depth, max_depth, n_bins)


def normalise_bins(logits: torch.Tensor, how: str = "linear", dim: int = 1, eps: float = 0.1) -> torch.Tensor:
    """Bin probabilities along ``dim`` of the logits: ``(relu(z) + eps) / sum`` or softmax."""
    if how == "softmax":
        return logits.softmax(dim=dim)
    z = F.relu(logits) + eps
    return z / z.sum(dim=dim, keepdim=True)


def depth_from_probs(probs: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """Expected depth [...] from bin probabilities [..., K] (channels last) over centres [K]."""
    return probs @ centers.to(probs)


def depth_to_bin(depth: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centre for every depth (uniform centres: one rounding). Same shape, int64."""
    lo, hi, k = centers[0].item(), centers[-1].item(), len(centers)
    return ((depth - lo) / (hi - lo) * (k - 1)).round().clamp(0, k - 1).long()


# ---------------------------------------------------------------------------------------------- loss
def silog_loss(pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """Scale-invariant log loss ``sqrt(var(g) + 0.15 mean(g)^2)`` over valid pixels (dinov2 ``SigLoss``).

    g = log(pred + eps) - log(gt + eps); var is the unbiased variance, as ``torch.var``. Computed
    with mask weights rather than boolean indexing (no gather of the valid pixels: faster on CPU).
    """
    weight = valid.to(pred.dtype)
    n = weight.sum()
    if n < 2:
        return pred.sum() * 0.0
    g = (torch.log(pred + eps) - torch.log(gt + eps)) * weight
    mean = g.sum() / n
    var = ((g - mean * weight) ** 2).sum() / (n - 1)
    return torch.sqrt(var + 0.15 * mean**2)


# ---------------------------------------------------------------------------------------------- head
def bilinear_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """[n_out, n_in] weights of 1-D linear resampling (``align_corners=False``).

    ``F.interpolate(mode="bilinear")`` is separable, so ``U_h @ x @ U_w.T`` equals it exactly; as
    matrix products it runs channels-last, which keeps the 256 bins contiguous (several times
    faster forward and backward on CPU than upsampling [B, 256, h, w] planes).
    """
    eye = torch.eye(n_in)[None]  # n_in signals of length n_in
    return F.interpolate(eye, size=n_out, mode="linear", align_corners=False)[0].T.contiguous()


class LinearDepthHead(nn.Module):
    """tokens [B, h, w, Din] -> depth [B, H, W] at ``out_size`` via 256-bin classification."""

    def __init__(self, in_dim: int, centers: torch.Tensor, upsample: int = 4, normalisation: str = "linear") -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, len(centers))  # the official 1x1 convolution, channels last
        self.register_buffer("centers", centers)
        self.upsample, self.normalisation = upsample, normalisation

    def logits(self, feats: torch.Tensor) -> torch.Tensor:
        """[B, h, w, Din] -> bin logits [B, h * up, w * up, K] (bilinear, channels last)."""
        _, h, w, _ = feats.shape
        u_h, u_w = bilinear_matrix(h, h * self.upsample), bilinear_matrix(w, w * self.upsample)
        return torch.einsum("Hh,bhwk,Ww->bHWk", u_h.to(feats), self.linear(feats), u_w.to(feats))

    def forward(self, feats: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        probs = normalise_bins(self.logits(feats), self.normalisation, dim=-1)
        depth = depth_from_probs(probs, self.centers)  # [B, h * up, w * up]
        return F.interpolate(depth[:, None], size=out_size, mode="bilinear", align_corners=False)[:, 0]
