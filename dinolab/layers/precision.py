"""The dtype a hand-written product runs in (what ``F.linear`` would pick, with or without autocast)."""

from __future__ import annotations

import torch


def compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The autocast dtype of ``x``'s device when autocast is on there, else the promotion of both dtypes."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(x.dtype, weight.dtype)
