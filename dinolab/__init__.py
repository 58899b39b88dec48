"""dinolab: DINOv2 as practical software.

The hub entry points (``dinolab.dinov2_vits14`` ...) build backbones with the official API and
state-dict layout; ``dinolab.train(...)`` and ``dinolab.embed(...)`` are the one-call jobs (:mod:`dinolab.api`);
everything else lives in sub-packages (``models``, ``data``, ``losses``,
``train``, ``eval``, ``curate``, ``viz``; process-level helpers in ``utils``).
"""

from dinolab.hub import (
    dinov2_vitb14,
    dinov2_vitb14_reg,
    dinov2_vitg14,
    dinov2_vitg14_reg,
    dinov2_vitl14,
    dinov2_vitl14_reg,
    dinov2_vits14,
    dinov2_vits14_reg,
)
from dinolab.models import DinoVisionTransformer, build_backbone
from dinolab import train  # the package, callable: dinolab.train(data=..., output=...) (dinolab.api.train)
from dinolab.api import embed

__version__ = "0.1.0"

__all__ = [
    "DinoVisionTransformer",
    "build_backbone",
    "embed",
    "train",
    "dinov2_vitb14",
    "dinov2_vitb14_reg",
    "dinov2_vitg14",
    "dinov2_vitg14_reg",
    "dinov2_vitl14",
    "dinov2_vitl14_reg",
    "dinov2_vits14",
    "dinov2_vits14_reg",
]
