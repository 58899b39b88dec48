"""The whole export job, :func:`export_backbone`: refuse a bad request (:func:`check_request`), write the file, then
run it against eager PyTorch (:func:`parity`) on check images or deterministic synthetic ones."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from dinolab.export.graph import ExportModule, reference_outputs
from dinolab.export.writers import (DTYPES, FORMATS, Runner, _require_onnx, load_runner, write_onnx,
                                    write_safetensors, write_torch_export)

# default parity tolerances: max abs difference of the LayerNorm'd tokens (|x| up to ~8, where one bf16 step is
# 3e-2). Measured, ViT-S/14 random init at 224 and 252: fp32 5e-6, fp16 1e-2, bf16 6e-2 (torch.export vs eager).
DEFAULT_TOLERANCE = {"fp32": 1e-4, "fp16": 5e-2, "bf16": 2.5e-1}


@dataclass
class ExportResult:
    """What :func:`export_backbone` wrote and measured.

    ``parity`` maps ``"BxHxW"`` to {output name: max abs difference vs eager PyTorch}.
    """

    path: Path
    format: str
    dtype: str
    dynamic: bool
    output_names: list[str]
    parity: dict[str, dict[str, float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def max_diff(self) -> float:
        return max((d for per in self.parity.values() for d in per.values()), default=0.0)


def check_request(fmt: str, out: str | Path, dtype: str = "fp32") -> Path:
    """Refuse, before any work, an unknown format or dtype, an --out suffix that does not match, a folder.

    Raises:
        ValueError: one line naming the valid options.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    out = Path(out)
    if out.suffix != FORMATS[fmt]:
        raise ValueError(f"--out {out} must end with {FORMATS[fmt]} for --format {fmt}")
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; expected a file ending with {FORMATS[fmt]}")
    if fmt == "onnx" and dtype == "bf16":
        # measured (onnxruntime 1.32): loading a bf16 graph fails, "Type 'tensor(bfloat16)' of input parameter (x)
        # of operator (Conv) ... is invalid"
        raise ValueError("--dtype bf16 is not offered for onnx: onnxruntime (CPU) refuses bf16 models (no bf16 Conv); "
                         "use fp32 or fp16, or --format torch-export")
    if fmt == "onnx":
        _require_onnx()
    from dinolab.utils.io import check_output_dir

    check_output_dir(out.parent, f"--out {out}: its folder")
    return out



def synthetic_images(n: int, size: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """n deterministic smooth images [n, 3, H, W], normalised like ImageNet inputs (roughly N(0, 1))."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, 3, 8, 8, generator=g)
    x = torch.nn.functional.interpolate(coarse, size=size, mode="bilinear", align_corners=False)
    return x + 0.3 * torch.randn(n, 3, *size, generator=g)


def load_check_images(source: str | Path | None, size: int, limit: int = 4) -> torch.Tensor:
    """Up to ``limit`` images of ``source`` (a folder, an image, a .txt list) as [B, 3, size, size]
    (short side resized to ``size``, centre crop, ImageNet normalisation); synthetic ones without a source."""
    if source is None:
        return synthetic_images(2, (size, size))
    from dinolab.data.images import resolve_image_source, try_load_rgb
    from dinolab.features.inputs import Preprocess

    transform, images = Preprocess.official(size, None), []
    for p in resolve_image_source(source):
        image = try_load_rgb(p)
        if image is not None:
            images.append(transform(image))
        if len(images) == limit:
            break
    if not images:
        raise ValueError(f"--check-images {source}: no readable image")
    return torch.stack(images)


def parity(runner: Runner, reference: nn.Module, x: torch.Tensor, names: list[str]) -> dict[str, float]:
    """{output: max abs difference} between the exported model and eager ``forward_features`` on x."""
    ref = reference_outputs(reference, x.to(next(reference.parameters()).dtype), names)
    got = runner(x)
    return {k: (got[k].float() - ref[k].float()).abs().max().item() for k in names}



def export_backbone(
    backbone: nn.Module,
    out: str | Path,
    fmt: str = "onnx",
    *,
    size: int = 224,
    patch_tokens: bool = False,
    dynamic: bool = True,
    dtype: str = "fp32",
    check_images: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> ExportResult:
    """Write ``backbone`` as ``fmt`` to ``out``, then run the file against eager PyTorch.

    The parity check runs at ``size`` and (dynamic exports) at ``size + 2 * patch`` with a different
    batch size, on ``check_images`` (else deterministic synthetic images). The reference is the
    eager backbone in the export dtype.

    Raises:
        ValueError: bad format/dtype/suffix, or ``size`` not a multiple of the patch size.
    """
    out = check_request(fmt, out, dtype)
    p = backbone.patch_size
    if size <= 0 or size % p:
        raise ValueError(f"--size {size} is not a positive multiple of the patch size {p}")
    if dtype != "fp32":
        backbone = copy.deepcopy(backbone).to(DTYPES[dtype])
    backbone = backbone.eval()
    module = ExportModule(backbone, patch_tokens).eval()
    dynamic = dynamic and fmt != "safetensors"  # weights have no shapes to fix
    result = ExportResult(out, fmt, dtype, dynamic, module.output_names)
    example = synthetic_images(2, (size, size)).to(DTYPES[dtype])
    t0 = time.perf_counter()
    what = ("weights" if fmt == "safetensors" else "dynamic batch and height/width" if dynamic
            else f"dynamic batch, fixed {size}x{size}")
    log(f"exporting {fmt} ({dtype}, {what}) to {out} ...")
    with torch.inference_mode(fmt == "safetensors"):
        if fmt == "onnx":
            if write_onnx(module, example, out, dynamic, log) == "legacy":
                result.notes.append("written by the legacy TorchScript ONNX exporter")
        elif fmt == "torch-export":
            write_torch_export(module, example, out, dynamic)
        else:
            write_safetensors(backbone, out)
    log(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB) in {time.perf_counter() - t0:.1f} s; checking parity ...")
    runner = load_runner(out, fmt, module.output_names, dtype)
    sizes = [size, size + 2 * p] if dynamic else [size]
    for i, s in enumerate(sizes):
        x = load_check_images(check_images, s)
        if i:  # another batch size too
            x = torch.cat([x, x[:1].flip(-1)])
        diffs = parity(runner, backbone, x, module.output_names)
        key = f"{x.shape[0]}x{s}x{s}"
        result.parity[key] = diffs
        log(f"parity {key}: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    return result

