"""Multi-head self-attention over packed groups of equal-length sequences.

A *group* is a tensor [B_g, T_g, D] of B_g sequences of T_g tokens (e.g. all global crops, or all
local crops). Token-wise projections run once over the concatenation of every group's tokens; the
softmax attention runs per group, so attention never crosses images. With one group this is the
plain batched attention of the official ``Attention`` module (keys ``qkv`` and ``proj``).

Two attention paths: ``F.scaled_dot_product_attention`` (fused kernels) and an explicit softmax
that can return the attention maps for visualisation. ``fused_attn=None`` (the default) picks per
call: SDPA, except for bf16 on CPU with short sequences, where the explicit path measured faster
(torch 2.13, 2 cores: ViT-S/14 inference 1.10x, attention forward+backward 1.5-2x at 17-65 tokens).

``varlen=True`` attends every sequence of every group in one call instead: a nested-jagged SDPA, which
CUDA serves with a variable-length FlashAttention kernel (one launch for global and local crops). On
CPU it runs, and equals the per-group path, but measured 12x slower (ViT-S/14 heads, 2x257 + 8x50
tokens, forward+backward: 86 ms vs 7 ms), so it is off unless asked for (``train.varlen_attention``).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


# Above this many tokens the explicit path's T x T matrix costs more memory than it saves time.
EXPLICIT_MAX_TOKENS = 512


class Attention(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        fused_attn: bool | None = None,
        varlen: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.fused_attn = fused_attn
        self.varlen = varlen
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, device=device, dtype=dtype)
        self.proj = nn.Linear(dim, dim, bias=proj_bias, device=device, dtype=dtype)

    def _split_heads(self, qkv: torch.Tensor, B: int, T: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # qkv [B*T, 3D] -> q, k, v each [B, heads, T, head_dim]
        qkv = qkv.view(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def _use_sdpa(self, q: torch.Tensor) -> bool:
        if self.fused_attn is not None:
            return self.fused_attn
        return not (q.device.type == "cpu" and q.dtype == torch.bfloat16 and q.shape[-2] <= EXPLICIT_MAX_TOKENS)

    def _attend(self, q, k, v) -> torch.Tensor:
        if self._use_sdpa(q):
            return F.scaled_dot_product_attention(q, k, v)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        return attn.softmax(dim=-1) @ v

    def forward_packed(self, x_flat: torch.Tensor, shapes: list[tuple[int, int]]) -> torch.Tensor:
        """Attention over packed groups.

        Args:
            x_flat: [sum_g B_g*T_g, D] tokens of every group, group after group.
            shapes: the (B_g, T_g) of each group, in order.

        Returns:
            [sum_g B_g*T_g, D], in the same order.
        """
        qkv = self.qkv(x_flat)
        if self.varlen and len(shapes) > 1:
            return self.proj(self._attend_varlen(qkv, shapes))
        outs, start = [], 0
        for B, T in shapes:
            q, k, v = self._split_heads(qkv[start : start + B * T], B, T)
            start += B * T
            outs.append(self._attend(q, k, v).transpose(1, 2).reshape(B * T, -1))  # [B*T, D]
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return self.proj(out)

    def _attend_varlen(self, qkv: torch.Tensor, shapes: list[tuple[int, int]]) -> torch.Tensor:
        """qkv [N, 3D] of every sequence of every group -> attention output [N, D], in one call: torch's
        ``varlen_attn`` (FlashAttention's variable-length kernel) on CUDA in bf16/fp16 where torch has it
        (>= 2.10), else a nested-jagged SDPA."""
        if qkv.is_cuda and qkv.dtype in (torch.float16, torch.bfloat16) and _flash_varlen() is not None:
            return self._attend_flash_varlen(qkv, shapes)
        return self._attend_nested(qkv, shapes)

    def _attend_flash_varlen(self, qkv: torch.Tensor, shapes: list[tuple[int, int]]) -> torch.Tensor:
        """qkv [N, 3D] -> [N, D] through ``torch.nn.attention.varlen.varlen_attn`` (q, k, v as [N, heads, d],
        sequences delimited by cumulative int32 offsets)."""
        n_tokens = qkv.shape[0]
        lengths = torch.tensor([T for B, T in shapes for _ in range(B)], device=qkv.device, dtype=torch.int32)
        offsets = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))  # [sequences + 1]
        q, k, v = (x.contiguous() for x in qkv.view(n_tokens, 3, self.num_heads, self.head_dim).unbind(1))
        longest = max(T for _, T in shapes)
        out = _flash_varlen()(q, k, v, offsets, offsets, longest, longest, scale=self.scale)
        return out.reshape(n_tokens, -1)

    def _attend_nested(self, qkv: torch.Tensor, shapes: list[tuple[int, int]]) -> torch.Tensor:
        """qkv [N, 3D] -> [N, D] in one nested-jagged SDPA (any device and dtype)."""
        n_tokens = qkv.shape[0]
        lengths = torch.tensor([T for B, T in shapes for _ in range(B)], device=qkv.device)
        offsets = F.pad(lengths.cumsum(0), (1, 0))  # [sequences + 1]: where each sequence starts
        q, k, v = (
            torch.nested.nested_tensor_from_jagged(x.contiguous(), offsets).transpose(1, 2)  # [S, H, j, d]
            for x in qkv.view(n_tokens, 3, self.num_heads, self.head_dim).unbind(1)
        )
        out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2).values().reshape(n_tokens, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, D] -> [B, T, D]."""
        B, T, D = x.shape
        return self.forward_packed(x.reshape(B * T, D), [(B, T)]).view(B, T, D)

    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax attention probabilities [B, heads, T, T] for x [B, T, D] (explicit path)."""
        B, T, D = x.shape
        q, k, _ = self._split_heads(self.qkv(x.reshape(B * T, D)), B, T)
        return ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)


@functools.lru_cache(maxsize=1)
def _flash_varlen():
    """``torch.nn.attention.varlen.varlen_attn`` where this torch has it (>= 2.10), else None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn
