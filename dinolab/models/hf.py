"""Conversion between official (dinolab) backbone keys and Hugging Face ``transformers`` ones.

Covers ``Dinov2Model`` and ``Dinov2WithRegistersModel``. Two HF namings exist and both are read:
transformers 5 (``attention.q_proj``, ``attention.o_proj``, ``mlp.gate_proj/up_proj/down_proj``) and
transformers 4 / the hub files (``attention.attention.query``, ``attention.output.dense``,
``mlp.weights_in/weights_out``). Writing uses the installed naming by default.

The official fused ``qkv`` [3D, D] is ``cat(q, k, v)``; the fused SwiGLU ``w12`` [2h, D] is
``cat(gate, up)`` (``silu`` is applied to the first half).

Interpolation differs between the two for the plain (no-register) models: HF resamples position
embeddings to an exact size without the official 0.1 offset, so outputs agree at 518x518 (no
resampling) and wherever the model uses ``interpolate_offset=0``; register models agree everywhere.
"""

from __future__ import annotations

import torch

_GLOBAL = {
    "cls_token": "embeddings.cls_token",
    "mask_token": "embeddings.mask_token",
    "pos_embed": "embeddings.position_embeddings",
    "register_tokens": "embeddings.register_tokens",
    "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
    "norm.weight": "layernorm.weight",
    "norm.bias": "layernorm.bias",
}
# Per block: official suffix -> (v5 suffix, v4 suffix).
_BLOCK = {
    "norm1.weight": ("norm1.weight", "norm1.weight"),
    "norm1.bias": ("norm1.bias", "norm1.bias"),
    "attn.proj.weight": ("attention.o_proj.weight", "attention.output.dense.weight"),
    "attn.proj.bias": ("attention.o_proj.bias", "attention.output.dense.bias"),
    "ls1.gamma": ("layer_scale1.lambda1", "layer_scale1.lambda1"),
    "norm2.weight": ("norm2.weight", "norm2.weight"),
    "norm2.bias": ("norm2.bias", "norm2.bias"),
    "mlp.fc1.weight": ("mlp.fc1.weight", "mlp.fc1.weight"),
    "mlp.fc1.bias": ("mlp.fc1.bias", "mlp.fc1.bias"),
    "mlp.fc2.weight": ("mlp.fc2.weight", "mlp.fc2.weight"),
    "mlp.fc2.bias": ("mlp.fc2.bias", "mlp.fc2.bias"),
    "mlp.w3.weight": ("mlp.down_proj.weight", "mlp.weights_out.weight"),
    "mlp.w3.bias": ("mlp.down_proj.bias", "mlp.weights_out.bias"),
    "ls2.gamma": ("layer_scale2.lambda1", "layer_scale2.lambda1"),
}
_QKV_V5 = ("attention.q_proj", "attention.k_proj", "attention.v_proj")
_QKV_V4 = ("attention.attention.query", "attention.attention.key", "attention.attention.value")


def is_hf_state_dict(sd: dict) -> bool:
    return "embeddings.cls_token" in sd


def _installed_naming_is_v5() -> bool:
    try:
        from transformers.models.dinov2 import modeling_dinov2
    except ImportError:
        return True
    return hasattr(modeling_dinov2, "Dinov2SwiGLUFFN") and not hasattr(modeling_dinov2, "Dinov2SelfAttention")


def _n_blocks(sd: dict, prefix: str) -> int:
    return len({k[len(prefix) :].split(".")[0] for k in sd if k.startswith(prefix)})


def hf_to_official(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF ``Dinov2Model`` keys (v4 or v5 naming, with or without registers) -> official keys."""
    sd = {k.removeprefix("dinov2."): v for k, v in sd.items()}
    out = {ours: sd[theirs] for ours, theirs in _GLOBAL.items() if theirs in sd}
    for i in range(_n_blocks(sd, "encoder.layer.")):
        src = f"encoder.layer.{i}."
        for ours, names in _BLOCK.items():
            for name in names:
                if src + name in sd:
                    out[f"blocks.{i}.{ours}"] = sd[src + name]
                    break
        for qkv in (_QKV_V5, _QKV_V4):
            if src + qkv[0] + ".weight" in sd:
                for p in ("weight", "bias"):
                    if src + qkv[0] + "." + p in sd:
                        out[f"blocks.{i}.attn.qkv.{p}"] = torch.cat([sd[f"{src}{n}.{p}"] for n in qkv])
        for p in ("weight", "bias"):
            if f"{src}mlp.gate_proj.{p}" in sd:
                out[f"blocks.{i}.mlp.w12.{p}"] = torch.cat([sd[f"{src}mlp.gate_proj.{p}"], sd[f"{src}mlp.up_proj.{p}"]])
            elif f"{src}mlp.weights_in.{p}" in sd:
                out[f"blocks.{i}.mlp.w12.{p}"] = sd[f"{src}mlp.weights_in.{p}"]
    return out


def official_to_hf(sd: dict[str, torch.Tensor], naming: str | None = None) -> dict[str, torch.Tensor]:
    """Official keys -> HF ``Dinov2Model`` / ``Dinov2WithRegistersModel`` keys.

    Args:
        naming: ``"v5"`` (transformers >= 5), ``"v4"`` (transformers 4 and the hub files) or None
            for the installed transformers' naming.
    """
    v5 = _installed_naming_is_v5() if naming is None else naming == "v5"
    if naming not in (None, "v4", "v5"):
        raise ValueError(f"naming must be 'v4', 'v5' or None, got {naming!r}")
    out = {theirs: sd[ours] for ours, theirs in _GLOBAL.items() if ours in sd}
    for i in range(_n_blocks(sd, "blocks.")):
        dst = f"encoder.layer.{i}."
        for ours, names in _BLOCK.items():
            if f"blocks.{i}.{ours}" in sd:
                out[dst + names[0 if v5 else 1]] = sd[f"blocks.{i}.{ours}"]
        qkv_names = _QKV_V5 if v5 else _QKV_V4
        for p in ("weight", "bias"):
            if f"blocks.{i}.attn.qkv.{p}" in sd:
                for name, t in zip(qkv_names, sd[f"blocks.{i}.attn.qkv.{p}"].chunk(3)):
                    out[f"{dst}{name}.{p}"] = t
            if f"blocks.{i}.mlp.w12.{p}" in sd:
                w12 = sd[f"blocks.{i}.mlp.w12.{p}"]
                if v5:
                    out[f"{dst}mlp.gate_proj.{p}"], out[f"{dst}mlp.up_proj.{p}"] = w12.chunk(2)
                else:
                    out[f"{dst}mlp.weights_in.{p}"] = w12
    return out


def hf_config_kwargs(model) -> dict:
    """Keyword arguments for ``Dinov2Config`` / ``Dinov2WithRegistersConfig`` matching ``model``."""
    kw = dict(
        hidden_size=model.embed_dim,
        num_hidden_layers=model.n_blocks,
        num_attention_heads=model.num_heads,
        mlp_ratio=4,
        patch_size=model.patch_size,
        image_size=int((model.pos_embed.shape[1] - 1) ** 0.5) * model.patch_size,
        layerscale_value=float(model.init_values or 1.0),
        use_swiglu_ffn=hasattr(model.blocks[0].mlp, "w12"),
        layer_norm_eps=1e-6,
    )
    if model.num_register_tokens:
        kw["num_register_tokens"] = model.num_register_tokens
    return kw


def to_hf_model(model):
    """A ``transformers`` ``Dinov2Model`` (or ``Dinov2WithRegistersModel``) with ``model``'s weights."""
    import transformers

    kw = hf_config_kwargs(model)
    if model.num_register_tokens:
        hf = transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(**kw))
    else:
        hf = transformers.Dinov2Model(transformers.Dinov2Config(**kw))
    hf.load_state_dict(official_to_hf(model.state_dict()), strict=True)
    return hf.eval()
