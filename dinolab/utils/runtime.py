"""Where and in what precision a job runs: the device, the training precision, autocast and ``torch.compile``.

* :func:`resolve_device`: ``auto`` is the GPU of this process (``LOCAL_RANK`` under ``torchrun``), else the CPU.
* :func:`resolve_precision`: ``auto`` is bf16 only where bf16 is fast (:func:`cpu_has_fast_bf16` on CPU).
* :func:`autocast_context`: the forward passes' autocast for a precision name (none for fp32).
* :func:`check_compiler` / :func:`compile_blocks`: ``torch.compile`` per transformer block; on CPU inductor
  builds C++, so a missing compiler is one line before any work.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """``auto``: the GPU of this rank if there is one, else the CPU; ``cuda`` without an index: this rank's GPU.

    ``local_rank``: the process's GPU index (default ``$LOCAL_RANK``, 0 outside ``torchrun``).
    """
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if name == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", local_rank)
    return device


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


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 on GPUs that support it and on CPUs that multiply bf16 natively (AVX512-BF16 / AMX), else
    fp32 (an AVX2-only CPU emulates bf16 ~100x slower than fp32); fp16 is refused on CPU (~70x slower)."""
    if precision == "auto":
        on_cpu = device.type == "cpu" and cpu_has_fast_bf16()
        ok = on_cpu or (device.type == "cuda" and torch.cuda.is_bf16_supported())
        return "bf16" if ok else "fp32"
    if precision == "fp16" and device.type == "cpu":
        raise ValueError("train.precision=fp16 is for GPUs only (fp16 matmuls are ~70x slower on CPU): use bf16")
    return precision


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16/fp16 autocast on ``device`` for a resolved precision name; fp32 runs without one."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def cpp_compiler() -> str | None:
    """The C++ compiler inductor would use on CPU (``$CXX``, g++, c++, clang++ on the PATH), or None."""
    return next((path for name in (os.environ.get("CXX"), "g++", "c++", "clang++") if name
                 for path in [shutil.which(name)] if path), None)


def check_compiler(device: torch.device) -> None:
    """``train.compile=true`` on CPU needs a C++ compiler (inductor builds C++): one line when there is none."""
    if device.type == "cpu" and not cpp_compiler():
        raise ValueError("train.compile=true needs a C++ compiler on CPU (g++ or c++ on the PATH, or $CXX): "
                         "install one, or set train.compile=false")


def compile_blocks(backbones: Iterable[nn.Module], dynamic: bool | None = False) -> None:
    """``torch.compile`` every transformer block (``backbone.blocks``) of each backbone in place.

    Per block, not the whole model: every entry point (``forward_features``, ``get_intermediate_layers``,
    packed crops) then runs compiled code, and one graph serves all the blocks of a size.
    """
    for backbone in backbones:
        for blk in backbone.blocks:
            blk.compile(dynamic=dynamic)
