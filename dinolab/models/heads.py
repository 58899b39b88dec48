"""DINO / iBOT projection head: MLP -> L2-normalised bottleneck -> weight-normalised prototypes.

Official: ``dinov2/layers/dino_head.py``. The prototype layer uses
``torch.nn.utils.parametrizations.weight_norm`` (the old ``torch.nn.utils.weight_norm`` is deprecated,
RECIPE pitfall 15); checkpoints written by the official code (``last_layer.weight_g`` /
``last_layer.weight_v``) still load, through ``convert_official_head_state_dict``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from dinolab.utils.cpu_tuning import block_rows as cache_block_rows
from dinolab.layers.precision import compute_dtype

# official key suffix -> parametrized key suffix (g: magnitude [K, 1], v: direction [K, bottleneck])
_OFFICIAL_TO_PARAMETRIZED = {
    "last_layer.weight_g": "last_layer.parametrizations.weight.original0",
    "last_layer.weight_v": "last_layer.parametrizations.weight.original1",
}


class DINOHead(nn.Module):
    """``x -> MLP -> normalize -> last_layer``: [..., in_dim] -> [..., out_dim] prototype logits.

    MLP: ``nlayers`` Linear layers with GELU between them (in -> hidden -> ... -> bottleneck; one Linear
    in -> bottleneck when ``nlayers == 1``), trunc-normal(std 0.02) weights and zero biases. The bottleneck
    is L2-normalised (eps 1e-6 in fp16, else 1e-12, as official). ``last_layer`` is a bias-free Linear
    bottleneck -> out_dim with weight normalisation; its magnitude ``g`` starts at 1 and is trainable, its
    direction ``v`` keeps ``nn.Linear``'s default init (the official code applies trunc-normal before
    creating the last layer).

    Args:
        in_dim: backbone feature size.
        out_dim: number of prototypes K (official 65,536; 131,072 for ViT-L/g).
        hidden_dim: MLP hidden width (2,048).
        bottleneck_dim: bottleneck width (256; 384 for the ViT-g DINO head).
        nlayers: number of MLP Linear layers (3).
        mlp_bias: biases in the MLP layers.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        mlp_bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.mlp = _build_mlp(max(nlayers, 1), in_dim, bottleneck_dim, hidden_dim, mlp_bias, **kw)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False, **kw))
        self.init_weights()

    def init_weights(self) -> None:
        for module in self.mlp.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        direction = self.last_layer.parametrizations.weight.original1
        nn.init.kaiming_uniform_(direction, a=5**0.5)  # nn.Linear.reset_parameters
        with torch.no_grad():
            self.last_layer.parametrizations.weight.original0.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12
        x = nn.functional.normalize(x, dim=-1, p=2, eps=eps)
        weight = self.last_layer.parametrizations.weight
        return weight_normalized_linear(x, weight.original1, weight.original0)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        # state_dict is load_state_dict's private copy: renaming official keys in place is safe, and the
        # children (visited after this call) then find them under their parametrized names
        for official, ours in _OFFICIAL_TO_PARAMETRIZED.items():
            if prefix + official in state_dict:
                state_dict[prefix + ours] = state_dict.pop(prefix + official)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


class _WeightNormalizedLinear(torch.autograd.Function):
    """``x @ (g * v / ||v||).T`` with the normalised weight built once, in row blocks, in the compute dtype,
    and the weight-norm backward written out (``torch._weight_norm_interface_backward`` took 84 ms per call on
    the [65,536, 256] prototype matrix of a 2-core CPU, plus two full-size dtype copies)."""

    @staticmethod
    def forward(ctx, x, direction, magnitude, dtype, block_rows):
        n_protos, dim = direction.shape
        acc = torch.promote_types(direction.dtype, torch.float32)  # fp32, or fp64 for fp64 weights
        norm = torch.linalg.vector_norm(direction, dim=1, keepdim=True, dtype=acc)  # [K, 1]
        scale = magnitude.to(acc) / norm  # [K, 1]: g / ||v||
        weight = torch.empty(n_protos, dim, dtype=dtype, device=direction.device)
        for start in range(0, n_protos, block_rows):
            rows = slice(start, start + block_rows)
            weight[rows] = direction[rows] * scale[rows]  # product in the accumulation dtype, cast on assignment
        x_c = x.to(dtype)
        ctx.save_for_backward(x_c, direction, weight, norm, scale)
        ctx.x_dtype, ctx.magnitude_dtype, ctx.block_rows = x.dtype, magnitude.dtype, block_rows
        return x_c @ weight.t()

    @staticmethod
    def backward(ctx, grad_logits):
        x_c, direction, weight, norm, scale = ctx.saved_tensors
        grad_logits = grad_logits.to(weight.dtype)
        grad_x = (grad_logits @ weight).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        if not (ctx.needs_input_grad[1] or ctx.needs_input_grad[2]):
            return grad_x, None, None, None, None
        grad_weight = grad_logits.t() @ x_c  # [K, D] in the compute dtype, as autocast's mm backward
        grad_direction = torch.empty_like(direction)
        grad_magnitude = torch.empty_like(norm)
        # W = g v / n, n = ||v||: dL/dg = <dL/dW, v> / n;  dL/dv = (g / n) (dL/dW - v <dL/dW, v> / n^2)
        for start in range(0, direction.shape[0], ctx.block_rows):
            rows = slice(start, start + ctx.block_rows)
            gw, v = grad_weight[rows].to(norm.dtype), direction[rows]
            dot = (gw * v).sum(1, keepdim=True)
            grad_magnitude[rows] = dot / norm[rows]
            grad_direction[rows] = (gw - v * (dot / norm[rows].square())).mul_(scale[rows])
        return grad_x, grad_direction, grad_magnitude.to(ctx.magnitude_dtype), None, None


def weight_normalized_linear(
    x: torch.Tensor, direction: torch.Tensor, magnitude: torch.Tensor, block_rows: int | None = None
) -> torch.Tensor:
    """``x @ (magnitude * direction / ||direction||).T``: the prototype layer of ``DINOHead``.

    Equal to ``weight_norm(nn.Linear(D, K, bias=False))(x)`` with ``original0 = magnitude`` and
    ``original1 = direction``; under autocast the matmul runs in the autocast dtype (the weight is
    normalised in fp32 and cast once), as the parametrized layer does.

    Args:
        x: [..., D] inputs.
        direction: [K, D] weight directions ``v``.
        magnitude: [K, 1] weight norms ``g``.
        block_rows: rows of ``direction`` per element-wise block (default: ``dinolab.utils.cpu_tuning.block_rows``).

    Returns:
        [..., K] logits in the compute dtype (the autocast dtype under autocast, else the promoted input dtype).
    """
    if x.shape[-1] != direction.shape[1] or magnitude.shape != (direction.shape[0], 1):
        raise ValueError(
            f"weight_normalized_linear: x [..., {direction.shape[1]}], direction [K, D] and magnitude [K, 1] "
            f"expected, got {tuple(x.shape)}, {tuple(direction.shape)}, {tuple(magnitude.shape)}"
        )
    dtype = compute_dtype(x, direction)
    if block_rows is None:
        block_rows = cache_block_rows(direction.shape[1])
    lead = x.shape[:-1]
    with torch.autocast(x.device.type, enabled=False):
        out = _WeightNormalizedLinear.apply(x.reshape(-1, x.shape[-1]), direction, magnitude, dtype, block_rows)
    return out.reshape(*lead, direction.shape[0])


def convert_official_head_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename official ``*last_layer.weight_g/weight_v`` keys to the parametrized ones; others unchanged.

    ``DINOHead.load_state_dict`` does this by itself; use this function for checkpoints of a larger module
    loaded by other means.
    """
    converted = {}
    for key, value in state_dict.items():
        for official, ours in _OFFICIAL_TO_PARAMETRIZED.items():
            if key == official or key.endswith("." + official):
                key = key[: len(key) - len(official)] + ours
                break
        converted[key] = value
    return converted


def to_official_head_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of ``convert_official_head_state_dict``: parametrized keys -> ``weight_g`` / ``weight_v``."""
    converted = {}
    for key, value in state_dict.items():
        for official, ours in _OFFICIAL_TO_PARAMETRIZED.items():
            if key == ours or key.endswith("." + ours):
                key = key[: len(key) - len(ours)] + official
                break
        converted[key] = value
    return converted


def _build_mlp(
    nlayers: int, in_dim: int, bottleneck_dim: int, hidden_dim: int, bias: bool, **kw
) -> nn.Module:
    if nlayers == 1:
        return nn.Linear(in_dim, bottleneck_dim, bias=bias, **kw)
    layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim, bias=bias, **kw), nn.GELU()]
    for _ in range(nlayers - 2):
        layers += [nn.Linear(hidden_dim, hidden_dim, bias=bias, **kw), nn.GELU()]
    layers.append(nn.Linear(hidden_dim, bottleneck_dim, bias=bias, **kw))
    return nn.Sequential(*layers)
