"""Image to patch tokens: a strided convolution, as in the official ``PatchEmbed``."""

from __future__ import annotations

import torch
from torch import nn


class PatchEmbed(nn.Module):
    """[B, 3, H, W] -> [B, (H/p)*(W/p), D]. H and W must be multiples of the patch size."""

    def __init__(self, patch_size: int = 14, in_chans: int = 3, embed_dim: int = 384, device=None, dtype=None) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, H, W = x.shape
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(
                f"input size {H}x{W} is not a multiple of the patch size {p}: resize or crop to e.g. "
                f"{max(p, H // p * p)}x{max(p, W // p * p)}"
            )
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, D, h, w] -> [B, h*w, D]
