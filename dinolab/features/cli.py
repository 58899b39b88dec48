"""``dinolab extract --arch vits14 --images DIR --out feats.npz``: features of a folder or list of images to a file
(:func:`dinolab.features.files.extract_features`, then :func:`dinolab.features.store.save_features`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from dinolab.features.store import OUTPUT_SUFFIXES


def check_output_file(path: str | Path) -> Path:
    """Refuse, before any work, an output :func:`~dinolab.features.store.save_features` cannot write (suffix, folder).

    Raises:
        ValueError: one line naming ``path``.
    """
    path = Path(path)
    if path.suffix not in OUTPUT_SUFFIXES:
        raise ValueError(f"--out {path} must end with .npz or .safetensors")
    if path.is_dir():
        raise ValueError(f"--out {path} is a folder; expected a file ending with .npz or .safetensors")
    from dinolab.utils.io import check_output_dir

    check_output_dir(path.parent, f"--out {path}: its folder")
    return path


def run_extract(args: argparse.Namespace) -> int:
    from dinolab.data.images import resolve_image_source
    from dinolab.features.files import ExtractConfig, extract_features
    from dinolab.features.store import save_features
    from dinolab.utils.io import check_listed_files
    from dinolab.models.resolve import resize_for, resolve_backbone

    check_output_file(args.out)
    paths = resolve_image_source(args.images)
    if not paths:
        raise ValueError(f"no image files found in {args.images}")
    check_listed_files(paths, args.images)
    resolved = resolve_backbone(weights=args.weights, run=args.run, arch=args.arch)
    model = resolved.model
    size = args.size or resolved.input_size
    resize = resize_for(size) if args.resize is None else (args.resize or None)
    cfg = ExtractConfig(
        batch_size=args.batch_size, size=size, resize=resize, patch_tokens=args.patch_tokens,
        layers=args.layers, bf16=args.bf16, compile=args.compile, num_workers=args.workers,
    )
    feats = extract_features(model, paths, cfg)
    meta = {**resolved.info, **cfg.__dict__}
    save_features(feats, args.out, meta)
    print(f"wrote {len(feats['paths'])} images ({len(feats['skipped'])} skipped) to {args.out}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("extract", help="extract class (and patch) tokens of images to .npz/.safetensors")
    p.add_argument("--arch", default=None, help="backbone name (vits14, vitb14_reg, ...); default: read off "
                   "--weights (auto), or vits14 randomly initialised without weights")
    p.add_argument("--weights", default=None, help="local weights file; omitted: random initialisation")
    p.add_argument("--run", default=None, help="a training run folder: its exported teacher, its architecture "
                   "and its global crop size")
    p.add_argument("--images", required=True, help="a folder (recursive), an image, or a .txt list of paths")
    p.add_argument("--out", required=True, help="output file (.npz or .safetensors)")
    p.add_argument("--size", type=int, default=None, help="centre-crop size (a multiple of the patch size); "
                   "default: the model's own (--run: its global crop size; weights: their position grid, "
                   "at most 16 patches: 224 for patch 14)")
    p.add_argument("--resize", type=int, default=None, help="short side before the crop (0: straight to --size); "
                   "default: size x 256/224, the official evaluation transform")
    p.add_argument("--patch-tokens", action="store_true", help="also store patch tokens")
    p.add_argument("--layers", type=int, default=1, help="tokens of the last N blocks")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=0, help="data-loading worker processes")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    p.add_argument("--compile", action="store_true", help="torch.compile the backbone (worth it for large sets)")
    p.set_defaults(func=run_extract)
