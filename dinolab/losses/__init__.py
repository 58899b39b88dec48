"""DINOv2 losses as pure functions, usable in any training loop.

    dino_loss        image-level CE, student crops vs teacher global crops       (dino.py)
    ibot_loss        masked-patch CE with per-image token weights                (ibot.py)
    koleo_loss       nearest-neighbour spreading regulariser                     (koleo.py)
    sinkhorn_knopp   balanced teacher targets, all-reduced when distributed      (centering.py)
    softmax_center   teacher softmax minus an EMA centre; EmaCenter holds it     (centering.py)
"""

from __future__ import annotations

from dinolab.losses.centering import EmaCenter, sinkhorn_knopp, softmax_center
from dinolab.losses.dino import dino_loss
from dinolab.losses.ibot import ibot_loss
from dinolab.losses.koleo import koleo_loss

__all__ = ["EmaCenter", "dino_loss", "ibot_loss", "koleo_loss", "sinkhorn_knopp", "softmax_center"]
