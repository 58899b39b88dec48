"""DINOv2 losses as pure functions, usable in any training loop.

    dino_loss        image-level CE, student crops vs teacher global crops       (dino.py)
    ibot_loss        masked-patch CE with per-image token weights                (ibot.py)
    koleo_loss       nearest-neighbour spreading regulariser                     (koleo.py)
    soft_cross_entropy  per-row CE against soft targets, chunked (iBOT's [M, K])  (soft_ce.py)
    sinkhorn_knopp   balanced teacher targets, all-reduced when distributed      (centering.py)
    softmax_center   teacher softmax minus an EMA centre; EmaCenter holds it     (centering.py)
"""

from __future__ import annotations

from dinolab.losses.centering import EmaCenter, sinkhorn_knopp, softmax_center
from dinolab.losses.dino import dino_loss
from dinolab.losses.ibot import ibot_loss
from dinolab.losses.koleo import koleo_loss
from dinolab.losses.soft_ce import soft_cross_entropy

__all__ = ["EmaCenter", "dino_loss", "ibot_loss", "koleo_loss", "sinkhorn_knopp", "soft_cross_entropy", "softmax_center"]
