"""The official ``torch.hub`` entry points, same names, local weights only.

``dinolab.dinov2_vits14(weights="dinov2_vits14_pretrain.pth")`` replaces
``torch.hub.load("facebookresearch/dinov2", "dinov2_vits14")``; the model, its outputs and its
state dict are those of the official code. ``weights=None`` gives the random initialisation.
"""

from __future__ import annotations

from pathlib import Path

from dinolab.models.factory import build_backbone
from dinolab.models.vit import DinoVisionTransformer


def _hub(arch: str, weights: str | Path | None, pretrained: bool, kwargs: dict) -> DinoVisionTransformer:
    if pretrained and weights is None:
        raise ValueError(f"dinolab never downloads weights: pass weights='path/to/dinov2_{arch}_pretrain.pth'")
    return build_backbone(arch, weights=weights, **kwargs)


def dinov2_vits14(*, weights: str | Path | None = None, pretrained: bool = False, **kwargs) -> DinoVisionTransformer:
    """ViT-S/14 (21M parameters), 384-d features."""
    return _hub("vits14", weights, pretrained, kwargs)


def dinov2_vitb14(*, weights: str | Path | None = None, pretrained: bool = False, **kwargs) -> DinoVisionTransformer:
    """ViT-B/14 (86M parameters), 768-d features."""
    return _hub("vitb14", weights, pretrained, kwargs)


def dinov2_vitl14(*, weights: str | Path | None = None, pretrained: bool = False, **kwargs) -> DinoVisionTransformer:
    """ViT-L/14 (300M parameters), 1024-d features."""
    return _hub("vitl14", weights, pretrained, kwargs)


def dinov2_vitg14(*, weights: str | Path | None = None, pretrained: bool = False, **kwargs) -> DinoVisionTransformer:
    """ViT-g/14 (1.1B parameters, SwiGLU), 1536-d features."""
    return _hub("vitg14", weights, pretrained, kwargs)


def dinov2_vits14_reg(*, weights: str | Path | None = None, pretrained: bool = False, **kwargs) -> DinoVisionTransformer:
    """ViT-S/14 with 4 register tokens."""
    return _hub("vits14_reg", weights, pretrained, kwargs)


def dinov2_vitb14_reg(*, weights: str | Path | None = None, pretrained: bool = False, **kwargs) -> DinoVisionTransformer:
    """ViT-B/14 with 4 register tokens."""
    return _hub("vitb14_reg", weights, pretrained, kwargs)


def dinov2_vitl14_reg(*, weights: str | Path | None = None, pretrained: bool = False, **kwargs) -> DinoVisionTransformer:
    """ViT-L/14 with 4 register tokens."""
    return _hub("vitl14_reg", weights, pretrained, kwargs)


def dinov2_vitg14_reg(*, weights: str | Path | None = None, pretrained: bool = False, **kwargs) -> DinoVisionTransformer:
    """ViT-g/14 with 4 register tokens."""
    return _hub("vitg14_reg", weights, pretrained, kwargs)
