"""Named architectures: the official sizes and the hub configurations of the released weights.

``ARCHS`` holds the sizes (``vit_small`` ... ``vit_giant2``); ``HUB_MODELS`` the exact settings
the released checkpoints need (img_size 518, LayerScale, FFN, registers and the interpolation
quirks: plain checkpoints ``interpolate_offset=0.1``, no antialias; register checkpoints
``interpolate_offset=0.0``, antialias). Look sizes up here, never by ``globals()[name]``.
"""

from __future__ import annotations

ARCHS: dict[str, dict] = {
    "vit_tiny": dict(embed_dim=192, depth=12, num_heads=3, mlp_ratio=4),
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6, mlp_ratio=4),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12, mlp_ratio=4),
    "vit_large": dict(embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4),
    "vit_giant2": dict(embed_dim=1536, depth=40, num_heads=24, mlp_ratio=4),
}

_HUB_SIZES = {"vits14": "vit_small", "vitb14": "vit_base", "vitl14": "vit_large", "vitg14": "vit_giant2"}


def register_interpolation(num_register_tokens: int) -> dict:
    """How the position embeddings are resampled, by the official rule: plain models ``interpolate_offset=0.1``
    without antialias, register models ``interpolate_offset=0.0`` with antialias (as their checkpoints need)."""
    registers = bool(num_register_tokens)
    return dict(interpolate_antialias=registers, interpolate_offset=0.0 if registers else 0.1)


def _hub_config(size: str, registers: bool) -> dict:
    return dict(
        arch=_HUB_SIZES[size],
        img_size=518,
        patch_size=14,
        init_values=1.0,
        ffn_layer="swiglufused" if size == "vitg14" else "mlp",
        num_register_tokens=4 if registers else 0,
        **register_interpolation(4 if registers else 0),
    )


HUB_MODELS: dict[str, dict] = {}
for _size in _HUB_SIZES:
    HUB_MODELS[_size] = _hub_config(_size, registers=False)
    HUB_MODELS[f"{_size}_reg"] = _hub_config(_size, registers=True)


def arch_names() -> list[str]:
    """Every name :func:`resolve_arch` accepts."""
    return sorted(HUB_MODELS) + sorted(ARCHS)


def resolve_arch(name: str, **overrides) -> dict:
    """Constructor kwargs for an arch name (``vits14``, ``dinov2_vits14_reg``, ``vit_small`` ...).

    Raises:
        ValueError: unknown name; the message lists the known ones.
    """
    key = name.removeprefix("dinov2_")
    if key.endswith("_reg4"):  # the official file names say reg4
        key = key[:-1]
    if key in HUB_MODELS:
        cfg = dict(HUB_MODELS[key])
        cfg.update(ARCHS[cfg.pop("arch")])
    elif key in ARCHS:
        cfg = dict(ARCHS[key])
    else:
        raise ValueError(f"unknown arch {name!r}; expected one of {', '.join(arch_names())}")
    cfg.update(overrides)
    return cfg
