"""Backbones (official DINOv2 layout), heads and weight conversion."""

from dinolab.models.factory import build_backbone
from dinolab.models.registry import ARCHS, HUB_MODELS, arch_names, resolve_arch
from dinolab.models.vit import DinoVisionTransformer

__all__ = ["ARCHS", "HUB_MODELS", "DinoVisionTransformer", "arch_names", "build_backbone", "resolve_arch"]
