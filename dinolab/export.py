"""Backbone export (ONNX, ``torch.export``, safetensors) with a parity check against eager PyTorch.

Library: :func:`export_backbone` writes the file and returns the parity figures; :class:`ExportModule`
is the traced graph. CLI: ``dinolab export --weights W --format onnx --out model.onnx``.

Outputs carry the official ``forward_features`` names: ``x_norm_clstoken`` [B, D]; with
``patch_tokens`` also ``x_norm_patchtokens`` [B, N, D] and (models with registers) ``x_norm_regtokens``
[B, R, D]. ONNX and ``torch.export`` graphs take any batch and any height/width that are multiples
of the patch size (``dynamic=True``, the default): the position embeddings are interpolated inside the
graph with the official rules (bicubic; ``scale_factor=(n + 0.1)/M`` for the plain released models,
an exact size with antialias for the register ones; the stored grid used as is). The resampling is
written as two small weight matrices (:func:`bicubic_matrix`) rather than ``F.interpolate``, so
both exporters trace it with symbolic sizes; it matches ``F.interpolate`` to float rounding (~1e-6).
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

FORMATS = {"onnx": ".onnx", "torch-export": ".pt2", "safetensors": ".safetensors"}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# default parity tolerances: max abs difference of the LayerNorm'd tokens (|x| up to ~8, where one bf16 step is
# 3e-2). Measured, ViT-S/14 random init at 224 and 252: fp32 5e-6, fp16 1e-2, bf16 6e-2 (torch.export vs eager).
DEFAULT_TOLERANCE = {"fp32": 1e-4, "fp16": 5e-2, "bf16": 2.5e-1}
ONNX_OPSET = 18
EXTRA_HINT = 'pip install "dinolab[export]" (onnx, onnxruntime, onnxscript)'


# ---------------------------------------------------------------- in-graph position embeddings
def _cubic(x: torch.Tensor, a: float) -> torch.Tensor:
    """Keys' cubic convolution kernel (``a`` = -0.75 as ``F.interpolate``, -0.5 with antialias)."""
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def bicubic_matrix(n_out: int, n_in: int, in_per_out: torch.Tensor, antialias: bool) -> torch.Tensor:
    """Weights [n_out, n_in] of 1-d bicubic resampling as ``F.interpolate(mode="bicubic")`` computes it.

    ``in_per_out`` (0-d float tensor) is the source step per output pixel (``1/scale_factor``, or
    ``n_in/n_out``). Without antialias: source ``in_per_out * (i + 0.5) - 0.5``, taps clamped to the
    border (ATen ``upsample_bicubic2d``); with antialias: a kernel widened by the downscale factor and
    normalised per row (ATen ``_upsample_bicubic2d_aa``). ``n_out`` may be symbolic.
    """
    i = torch.arange(n_out, dtype=torch.float32)
    j = torch.arange(n_in, dtype=torch.float32)
    if antialias:
        center = in_per_out * (i + 0.5)
        w = _cubic((j[None, :] - center[:, None] + 0.5) / torch.clamp(in_per_out, min=1.0), -0.5)
        return w / w.sum(1, keepdim=True)
    src = in_per_out * (i + 0.5) - 0.5
    base = torch.floor(src)
    t = src - base
    taps = torch.stack([_cubic(t + 1, -0.75), _cubic(t, -0.75), _cubic(1 - t, -0.75), _cubic(2 - t, -0.75)], 1)
    index = (base[:, None] + torch.arange(-1, 3, dtype=torch.float32)[None]).clamp(0, n_in - 1)  # [n_out, 4]
    return (taps[:, :, None] * (index[:, :, None] == j[None, None, :]).to(torch.float32)).sum(1)


def interpolated_pos_embed(model: nn.Module, h0: int, w0: int) -> torch.Tensor:
    """Position embeddings [1, 1 + h0*w0, D] (fp32) for a grid of h0 x w0 patches, as the model's own
    ``interpolate_pos_encoding`` gives them, in tensor ops only (h0, w0 may be symbolic).

    The stored M x M grid is returned as is at h0 = w0 = M (the official shortcut): there the
    step is set to 1, where the bicubic weights are exactly the identity.
    """
    pos = model.pos_embed.float()
    M = math.isqrt(pos.shape[1] - 1)
    offset = float(model.interpolate_offset)
    one = torch.ones((), dtype=torch.float32)
    hw = torch.stack([h0 * one, w0 * one])  # [2] = (h0, w0) as a tensor: the comparisons below stay in the graph
    step = M / (hw + offset)  # offset > 0: 1/scale_factor; offset 0: M/n
    stored = (hw == M).all()
    step = torch.where(stored, torch.ones_like(step), step)
    wh = bicubic_matrix(h0, M, step[0], model.interpolate_antialias)  # [h0, M]
    ww = bicubic_matrix(w0, M, step[1], model.interpolate_antialias)  # [w0, M]
    grid = pos[0, 1:].reshape(M, M, -1)  # [M, M, D]
    grid = torch.einsum("hm,mnd,wn->hwd", wh, grid, ww).reshape(1, -1, grid.shape[-1])  # [1, h0*w0, D]
    return torch.cat((pos[:, :1], grid), dim=1)


class ExportModule(nn.Module):
    """The graph that is exported: x [B, 3, H, W] -> a tuple of the tensors named in :attr:`output_names`.

    Same computation as ``forward_features`` (no masks), with :func:`interpolated_pos_embed` so that
    H and W can stay symbolic.
    """

    def __init__(self, backbone: nn.Module, patch_tokens: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.patch_tokens = patch_tokens
        names = ["x_norm_clstoken"]
        if patch_tokens:
            names.append("x_norm_patchtokens")
            if backbone.num_register_tokens:
                names.append("x_norm_regtokens")
        self.output_names = names

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        m, p = self.backbone, self.backbone.patch_size
        t = m.patch_embed(x)  # [B, N, D]
        t = torch.cat((m.cls_token.expand(t.shape[0], -1, -1).to(t.dtype), t), dim=1)
        t = t + interpolated_pos_embed(m, x.shape[2] // p, x.shape[3] // p).to(m.pos_embed.dtype).to(t.dtype)
        r = m.num_register_tokens
        if r:
            t = torch.cat((t[:, :1], m.register_tokens.expand(t.shape[0], -1, -1).to(t.dtype), t[:, 1:]), dim=1)
        for blk in m.blocks:
            t = blk(t)
        t = m.norm(t)
        outs = {"x_norm_clstoken": t[:, 0], "x_norm_regtokens": t[:, 1 : r + 1], "x_norm_patchtokens": t[:, r + 1 :]}
        return tuple(outs[k] for k in self.output_names)


def reference_outputs(backbone: nn.Module, x: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """Eager ``forward_features`` of ``backbone`` on x [B, 3, H, W]: the named outputs."""
    with torch.inference_mode():
        out = backbone.forward_features(x)
    return {k: out[k] for k in names}


# ---------------------------------------------------------------- writing
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


def _require_onnx() -> None:
    import importlib.util

    missing = [m for m in ("onnx", "onnxruntime", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"--format onnx needs {', '.join(missing)}: {EXTRA_HINT}")


def _dynamic_shapes(patch: int, sizes: bool) -> dict:
    """Symbolic batch always (the example has 2 images, so it is not specialised to 1); height and width
    as ``patch * n`` when ``sizes``."""
    from torch.export import Dim

    batch, gh, gw = Dim("batch", min=1, max=4096), Dim("gh", min=1, max=512), Dim("gw", min=1, max=512)
    return {"x": {0: batch, 2: patch * gh, 3: patch * gw} if sizes else {0: batch}}


def write_torch_export(module: ExportModule, example: torch.Tensor, path: Path, dynamic: bool) -> None:
    """``torch.export.export`` (batch symbolic; height and width too when ``dynamic``), ``torch.export.save``."""
    from dinolab.utils.io import atomic_path

    shapes = _dynamic_shapes(module.backbone.patch_size, dynamic)
    program = torch.export.export(module, (example,), dynamic_shapes=shapes)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: save() wants a .pt2 name otherwise
        torch.export.save(program, f)


def write_onnx(module: ExportModule, example: torch.Tensor, path: Path, dynamic: bool,
               log: Callable[[str], None] = print) -> str:
    """``torch.onnx.export(dynamo=True)``, else the legacy TorchScript exporter; returns which one ran.

    One self-contained file, except for weights over 1.5 GiB (protobuf's 2 GiB limit), which go to
    ``<path>.data`` beside it. Both are written in a temporary folder and moved into place at the end.
    """
    import logging
    import os
    import tempfile
    import warnings

    names = dict(input_names=["x"], output_names=module.output_names, opset_version=ONNX_OPSET)
    external = sum(p.numel() * p.element_size() for p in module.parameters()) > 1.5 * 2**30
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed" lines
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tmp = Path(folder) / path.name  # the final name: an external-data file refers to it
        try:
            shapes = _dynamic_shapes(module.backbone.patch_size, dynamic)
            torch.onnx.export(module, (example,), str(tmp), dynamo=True, dynamic_shapes=shapes, verbose=False,
                              external_data=external, **names)
            how = "dynamo"
        except Exception as err:  # noqa: BLE001 - any exporter failure: try the other one, say why in one line
            log(f"torch.onnx dynamo exporter failed ({type(err).__name__}: {str(err).splitlines()[0][:120]}); "
                "trying the legacy exporter")
            for f in Path(folder).iterdir():
                f.unlink()
            axes = {"x": {0: "batch", 2: "height", 3: "width"} if dynamic else {0: "batch"}}
            axes.update({k: {0: "batch"} for k in module.output_names})
            if dynamic and "x_norm_patchtokens" in axes:
                axes["x_norm_patchtokens"][1] = "patches"
            torch.onnx.export(module, (example,), str(tmp), dynamo=False, dynamic_axes=axes, **names)
            how = "legacy"
        for f in sorted(Path(folder).iterdir(), key=lambda f: f == tmp):  # the .onnx last: never without its data
            os.replace(f, path.parent / f.name)
    return how


def write_safetensors(backbone: nn.Module, path: Path) -> None:
    """Backbone weights (official keys, in the backbone's dtype) with its constructor arguments."""
    from dinolab.models.checkpoints import save_backbone

    save_backbone(backbone, path)


# ---------------------------------------------------------------- running what was written
Runner = Callable[[torch.Tensor], dict[str, torch.Tensor]]


def load_runner(path: str | Path, fmt: str, output_names: list[str], dtype: str = "fp32") -> Runner:
    """A callable x [B, 3, H, W] -> {output name: tensor} that runs the written file in its own runtime:
    onnxruntime (CPU) for ONNX, ``torch.export.load(...).module()`` for ``.pt2``, a rebuilt backbone
    (``build_backbone("auto", weights=path)``) for safetensors."""
    path, torch_dtype = Path(path), DTYPES[dtype]
    if fmt == "onnx":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        np_dtype = np.float16 if dtype == "fp16" else np.float32

        def run_onnx(x: torch.Tensor) -> dict[str, torch.Tensor]:
            outs = session.run(output_names, {"x": x.numpy().astype(np_dtype)})
            return {k: torch.from_numpy(np.asarray(v)) for k, v in zip(output_names, outs)}

        return run_onnx
    if fmt == "torch-export":
        module = torch.export.load(str(path)).module()

        def run_program(x: torch.Tensor) -> dict[str, torch.Tensor]:
            with torch.inference_mode():
                return dict(zip(output_names, module(x.to(torch_dtype))))

        return run_program
    from dinolab.models import build_backbone

    backbone = build_backbone("auto", weights=path).to(torch_dtype).eval()
    return lambda x: reference_outputs(backbone, x.to(torch_dtype), output_names)


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
    from dinolab.data.transforms import EvalTransform

    transform, images = EvalTransform(size, None), []
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


# ---------------------------------------------------------------- the whole job
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


# ---------------------------------------------------------------- CLI
def _load_for_export(args: argparse.Namespace) -> tuple[nn.Module, int | None]:
    """The backbone of --weights or --run, and the run's global crop size (None for --weights)."""
    if args.run:
        from omegaconf import OmegaConf

        from dinolab.configs.schema import load_yaml
        from dinolab.eval.cli import load_backbone_from_run

        model, _ = load_backbone_from_run(args.run)
        crop = OmegaConf.select(load_yaml(Path(args.run) / "config.yaml"), "crops.global_crops_size")
        return model, int(crop) if crop else None
    from dinolab.models import build_backbone

    if not Path(args.weights).is_file():
        raise FileNotFoundError(f"weights file {args.weights} does not exist")
    return build_backbone(args.arch, weights=args.weights), None


def run_export(args: argparse.Namespace) -> int:
    check_request(args.format, args.out, args.dtype)
    if args.size is not None and args.size <= 0:
        raise ValueError(f"--size {args.size} must be positive")
    model, run_size = _load_for_export(args)
    size = args.size or run_size or 224
    if size % model.patch_size:
        raise ValueError(f"--size {size} is not a multiple of the patch size {model.patch_size}")
    tolerance = args.tolerance if args.tolerance is not None else DEFAULT_TOLERANCE[args.dtype]
    result = export_backbone(model, args.out, args.format, size=size, patch_tokens=args.patch_tokens,
                             dynamic=args.dynamic, dtype=args.dtype, check_images=args.check_images)
    for note in result.notes:
        print(note)
    if result.max_diff > tolerance:
        print(f"dinolab export: error: max abs difference {result.max_diff:.2e} vs eager PyTorch exceeds "
              f"--tolerance {tolerance:g} (file kept: {result.path})", file=sys.stderr)
        return 2
    print(f"parity ok: max abs difference {result.max_diff:.2e} <= {tolerance:g}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="export a backbone to ONNX / torch.export / safetensors, with a "
                              "parity check against PyTorch")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--weights", help="backbone weights (.pth/.safetensors, any supported layout)")
    src.add_argument("--run", help="training run directory (teacher_backbone.safetensors + config.yaml)")
    p.add_argument("--format", required=True, help=f"one of {', '.join(FORMATS)}")
    p.add_argument("--out", required=True, help="output file: .onnx, .pt2 or .safetensors (matching --format)")
    p.add_argument("--arch", default="auto", help="architecture of --weights (default: read off the file)")
    p.add_argument("--patch-tokens", action="store_true", help="also output patch (and register) tokens")
    p.add_argument("--size", type=int, default=None, help="export/check image size, a multiple of the patch "
                   "(default: the run's global crop size, else 224)")
    shape = p.add_mutually_exclusive_group()
    shape.add_argument("--dynamic", dest="dynamic", action="store_true", default=True,
                       help="symbolic batch and height/width, multiples of the patch (default)")
    shape.add_argument("--static", dest="dynamic", action="store_false",
                       help="height and width fixed to --size (the batch stays symbolic)")
    p.add_argument("--tolerance", type=float, default=None, help="max abs difference allowed vs PyTorch "
                   f"(default {', '.join(f'{k} {v:g}' for k, v in DEFAULT_TOLERANCE.items())})")
    p.add_argument("--dtype", default="fp32", help=f"one of {', '.join(DTYPES)} (bf16: not for onnx)")
    p.add_argument("--check-images", default=None, help="images for the parity check (folder, image, .txt); "
                   "default: deterministic synthetic images")
    p.set_defaults(func=run_export)
