"""The dtype a hand-written product runs in (what ``F.linear`` would pick, with or without autocast), and whether
this CPU multiplies bfloat16 natively."""

from __future__ import annotations

import functools
from pathlib import Path

import torch


def compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The autocast dtype of ``x``'s device when autocast is on there, else the promotion of both dtypes."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(x.dtype, weight.dtype)


@functools.lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """True where the CPU multiplies bfloat16 natively (x86 AVX512-BF16 or AMX-BF16, read from /proc/cpuinfo).

    Elsewhere torch emulates bf16 matmuls and they are far slower than fp32: measured 0.9 vs 102 GFLOP/s
    (1024^2, AMD EPYC with AVX2 only), while machines with AMX reach 400-1,000 bf16 GFLOP/s. Unknown
    platforms (no /proc/cpuinfo) count as slow, so ``precision=auto`` never picks the slow path by guess.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))
