"""The exported graph: :class:`ExportModule` (x [B, 3, H, W] -> the ``forward_features`` outputs) with the position
embeddings interpolated inside the graph (:func:`interpolated_pos_embed`), so H and W can stay symbolic.

The resampling follows the official rules (bicubic; ``scale_factor=(n + 0.1)/M`` for the plain released models, an
exact size with antialias for the register ones; the stored grid used as is) but is written as two small weight
matrices (:func:`bicubic_matrix`) rather than ``F.interpolate``, so both exporters trace it with symbolic sizes; it
matches ``F.interpolate`` to float rounding (~1e-6).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _cubic(x: torch.Tensor, a: float) -> torch.Tensor:
    """Keys' cubic convolution kernel (``a`` = -0.75 as ``F.interpolate``, -0.5 with antialias)."""
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def bicubic_matrix(n_out: int, n_in: int, in_per_out: torch.Tensor, antialias: bool) -> torch.Tensor:
    """Weights [n_out, n_in] of 1-d bicubic resampling as ``F.interpolate(mode="bicubic")`` computes it.

    ``in_per_out`` (0-d float tensor) is the source step per output pixel (``1/scale_factor``, or
    ``n_in/n_out``). Without antialias: source ``in_per_out * (i + 0.5) - 0.5``, taps clamped to the
    border (ATen ``upsample_bicubic2d``); with antialias: a kernel widened by the downscale factor and
    normalised per row (ATen ``_upsample_bicubic2d_aa``). ``n_out`` may be symbolic.
    """
    i = torch.arange(n_out, dtype=torch.float32)
    j = torch.arange(n_in, dtype=torch.float32)
    if antialias:
        center = in_per_out * (i + 0.5)
        w = _cubic((j[None, :] - center[:, None] + 0.5) / torch.clamp(in_per_out, min=1.0), -0.5)
        return w / w.sum(1, keepdim=True)
    src = in_per_out * (i + 0.5) - 0.5
    base = torch.floor(src)
    t = src - base
    taps = torch.stack([_cubic(t + 1, -0.75), _cubic(t, -0.75), _cubic(1 - t, -0.75), _cubic(2 - t, -0.75)], 1)
    index = (base[:, None] + torch.arange(-1, 3, dtype=torch.float32)[None]).clamp(0, n_in - 1)  # [n_out, 4]
    return (taps[:, :, None] * (index[:, :, None] == j[None, None, :]).to(torch.float32)).sum(1)


def interpolated_pos_embed(model: nn.Module, h0: int, w0: int) -> torch.Tensor:
    """Position embeddings [1, 1 + h0*w0, D] (fp32) for a grid of h0 x w0 patches, as the model's own
    ``interpolate_pos_encoding`` gives them, in tensor ops only (h0, w0 may be symbolic).

    The stored M x M grid is returned as is at h0 = w0 = M (the official shortcut): there the
    step is set to 1, where the bicubic weights are exactly the identity.
    """
    pos = model.pos_embed.float()
    M = math.isqrt(pos.shape[1] - 1)
    offset = float(model.interpolate_offset)
    one = torch.ones((), dtype=torch.float32)
    hw = torch.stack([h0 * one, w0 * one])  # [2] = (h0, w0) as a tensor: the comparisons below stay in the graph
    step = M / (hw + offset)  # offset > 0: 1/scale_factor; offset 0: M/n
    stored = (hw == M).all()
    step = torch.where(stored, torch.ones_like(step), step)
    wh = bicubic_matrix(h0, M, step[0], model.interpolate_antialias)  # [h0, M]
    ww = bicubic_matrix(w0, M, step[1], model.interpolate_antialias)  # [w0, M]
    grid = pos[0, 1:].reshape(M, M, -1)  # [M, M, D]
    grid = torch.einsum("hm,mnd,wn->hwd", wh, grid, ww).reshape(1, -1, grid.shape[-1])  # [1, h0*w0, D]
    return torch.cat((pos[:, :1], grid), dim=1)


class ExportModule(nn.Module):
    """The graph that is exported: x [B, 3, H, W] -> a tuple of the tensors named in :attr:`output_names`.

    Same computation as ``forward_features`` (no masks), with :func:`interpolated_pos_embed` so that
    H and W can stay symbolic.
    """

    def __init__(self, backbone: nn.Module, patch_tokens: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.patch_tokens = patch_tokens
        names = ["x_norm_clstoken"]
        if patch_tokens:
            names.append("x_norm_patchtokens")
            if backbone.num_register_tokens:
                names.append("x_norm_regtokens")
        self.output_names = names

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        m, p = self.backbone, self.backbone.patch_size
        t = m.patch_embed(x)  # [B, N, D]
        t = torch.cat((m.cls_token.expand(t.shape[0], -1, -1).to(t.dtype), t), dim=1)
        t = t + interpolated_pos_embed(m, x.shape[2] // p, x.shape[3] // p).to(m.pos_embed.dtype).to(t.dtype)
        r = m.num_register_tokens
        if r:
            t = torch.cat((t[:, :1], m.register_tokens.expand(t.shape[0], -1, -1).to(t.dtype), t[:, 1:]), dim=1)
        for blk in m.blocks:
            t = blk(t)
        t = m.norm(t)
        outs = {"x_norm_clstoken": t[:, 0], "x_norm_regtokens": t[:, 1 : r + 1], "x_norm_patchtokens": t[:, r + 1 :]}
        return tuple(outs[k] for k in self.output_names)


def reference_outputs(backbone: nn.Module, x: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """Eager ``forward_features`` of ``backbone`` on x [B, 3, H, W]: the named outputs."""
    with torch.inference_mode():
        out = backbone.forward_features(x)
    return {k: out[k] for k in names}
