"""Feed-forward networks of the transformer block: plain GELU MLP and fused SwiGLU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2 (official keys ``fc1``, ``fc2``)."""

    def __init__(self, in_features: int, hidden_features: int, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias, device=device, dtype=dtype)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def swiglu_hidden_features(hidden_features: int) -> int:
    """The official SwiGLU width rule: 2/3 of the MLP width, rounded up to a multiple of 8.

    ``(int(h * 2 / 3) + 7) // 8 * 8``; 4096 for ViT-g (h = 4 * 1536).
    """
    return (int(hidden_features * 2 / 3) + 7) // 8 * 8


class SwiGLUFFN(nn.Module):
    """SwiGLU with the gate and value projections fused in one matmul (official ``SwiGLUFFNFused``).

    Keys ``w12`` [2*h, D] and ``w3`` [D, h], ``h = swiglu_hidden_features(hidden_features)``.
    """

    def __init__(self, in_features: int, hidden_features: int, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        hidden = swiglu_hidden_features(hidden_features)
        self.w12 = nn.Linear(in_features, 2 * hidden, bias=bias, device=device, dtype=dtype)
        self.w3 = nn.Linear(hidden, in_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


FFN_LAYERS = {"mlp": Mlp, "swiglu": SwiGLUFFN, "swiglufused": SwiGLUFFN}


def make_ffn(kind: str, dim: int, hidden: int, bias: bool, device=None, dtype=None) -> nn.Module:
    if kind not in FFN_LAYERS:
        raise ValueError(f"ffn_layer {kind!r} is not one of {sorted(FFN_LAYERS)}")
    return FFN_LAYERS[kind](dim, hidden, bias=bias, device=device, dtype=dtype)
