"""Building a backbone by name, optionally with local weights (no downloads, ever)."""

from __future__ import annotations

from pathlib import Path

from dinolab.models.checkpoints import infer_arch_kwargs, load_backbone_weights, read_arch_kwargs, read_state_dict
from dinolab.models.registry import resolve_arch
from dinolab.models.vit import DinoVisionTransformer


def build_backbone(arch: str | None, weights: str | Path | dict | None = None, **overrides) -> DinoVisionTransformer:
    """A :class:`DinoVisionTransformer` for ``arch`` (see :func:`dinolab.models.arch_names`).

    Args:
        arch: ``vits14``, ``vitb14_reg``, ``vit_small`` ..., or None / ``"auto"`` to read the
            architecture off ``weights``: the constructor arguments a dinolab ``.safetensors``
            stores, else sizes, patch, registers and FFN read from the shapes (64 dims per head,
            as every official model).
        weights: a local ``.pth`` / ``.safetensors`` file (official, dinolab or Hugging Face layout),
            a state dict, or None for the official random initialisation.
        overrides: constructor keyword arguments (``img_size``, ``drop_path_rate`` ...).
    """
    if arch in (None, "auto"):
        if weights is None:
            raise ValueError("arch 'auto' needs weights to read the architecture from")
        stored = None if isinstance(weights, dict) else read_arch_kwargs(weights)
        if not isinstance(weights, dict):
            weights = read_state_dict(weights)
        model = DinoVisionTransformer(**{**(stored or infer_arch_kwargs(weights)), **overrides})
    else:
        model = DinoVisionTransformer(**resolve_arch(arch, **overrides))
    if weights is not None:
        load_backbone_weights(model, weights)
    return model
