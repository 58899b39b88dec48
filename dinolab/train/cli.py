"""``dinolab train``: self-supervised pretraining from a folder, list, npz or the embedded default."""

from __future__ import annotations

import argparse
import json

from dinolab.configs.schema import load_config, preset_names

DEFAULT_PRESET = "cpu"


def run_train(args: argparse.Namespace) -> int:
    from dinolab.train.loop import train

    base = {"data": {k: v for k, v in (("path", args.data), ("eval_path", args.eval_data)) if v is not None}}
    cfg = load_config(args.preset, args.overrides, base=base)
    try:
        summary = train(cfg, args.output, resume=not args.no_resume, progress=not args.no_progress)
    except FloatingPointError as err:
        print(f"dinolab train: stopped: {err}; the last good checkpoint is kept in {args.output}/checkpoints")
        return 3
    print(json.dumps(summary, indent=2))
    if summary.get("knn_top1_final") is not None:
        print(
            f"k-NN top-1 of the teacher on {summary['knn_n_test']} held-out images: "
            f"{summary['knn_top1_init']:.1f}% at initialisation -> {summary['knn_top1_final']:.1f}% after "
            f"{summary['iterations']} iterations (plots: {args.output}/loss_curves.png)"
        )
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="self-supervised DINOv2 pretraining",
        description="Train a backbone with the DINOv2 recipe. Without --data: a few minutes on the embedded "
        "handwritten-digits set (scikit-learn), with k-NN before/after. Overrides: key=value, e.g. optim.base_lr=1e-3.",
    )
    p.add_argument("--data", default=None, help="folder of images (recursive), .txt list, .npz (x_train/images) or .jsonl manifest")
    p.add_argument("--eval-data", default=None, help="labelled set for k-NN during training (npz x_train/y_train/x_test/y_test or class folders)")
    p.add_argument("--output", default="runs/dinolab", help="run directory (resumed when it holds a checkpoint)")
    p.add_argument("--preset", default=DEFAULT_PRESET, help=f"one of {', '.join(preset_names())} or a .yaml path (default {DEFAULT_PRESET})")
    p.add_argument("--no-resume", action="store_true", help="start from scratch even if the run directory holds a checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", help="config overrides key=value")
    p.set_defaults(func=run_train)
