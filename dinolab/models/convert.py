"""Backbone weights between official ``.pth``, safetensors and Hugging Face layouts (``dinolab convert IN OUT``,
:mod:`dinolab.models.cli`).

Any checkpoint :func:`dinolab.models.checkpoints.to_backbone_state_dict` reads (official hub file,
training checkpoint with chunked blocks or ``teacher.backbone.`` prefixes, dinolab export, HF
state dict) is written as one of: ``official`` (``.pth`` with official keys), ``safetensors``
(official keys), ``hf`` (``Dinov2Model`` keys, ``.safetensors`` or ``.bin``/``.pth``).
"""

from __future__ import annotations

from pathlib import Path

from dinolab.models import hf
from dinolab.models.checkpoints import describe, save_backbone, to_backbone_state_dict
from dinolab.models.factory import read_weights

TARGETS = ("official", "safetensors", "hf")


def convert(src: str | Path, dst: str | Path, to: str | None = None, hf_naming: str | None = None) -> str:
    """Convert ``src`` to ``dst``; ``to`` defaults from the output suffix. Returns a summary line."""
    dst = Path(dst)
    to = to or ("safetensors" if dst.suffix == ".safetensors" else "official")
    if to not in TARGETS:
        raise ValueError(f"--to must be one of {TARGETS}, got {to!r}")
    sd = to_backbone_state_dict(read_weights(src))
    if to == "hf":
        save_backbone(hf.official_to_hf(sd, naming=hf_naming), dst)
    else:
        if to == "safetensors" and dst.suffix != ".safetensors":
            raise ValueError(f"--to safetensors needs an output ending in .safetensors, got {dst}")
        save_backbone(sd, dst)
    return f"{src} -> {dst} ({to}; {describe(sd)}; {sum(v.numel() for v in sd.values()) / 1e6:.1f}M values)"
