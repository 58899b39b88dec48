"""``dinolab export``: ``--weights W`` or ``--run DIR`` to a file, with a parity check against eager PyTorch
(exit code 2 when the difference exceeds ``--tolerance``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from torch import nn

from dinolab.export.check import DEFAULT_TOLERANCE, check_request, export_backbone
from dinolab.export.writers import DTYPES, FORMATS


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
