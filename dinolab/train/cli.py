"""``dinolab train``: self-supervised pretraining from a folder, list, npz or the embedded default.

Also, from a dinolab checkpoint (``RUN/checkpoints/ckpt_*.pth`` or ``dcp_*/``):

* ``--distill-from CKPT``: distil that run's (frozen) model into the student of ``--preset``
  (``distill.teacher_checkpoint``; presets ``distill_vits14``, ``distill_vitb14``, ``distill_vitl14``);
* ``--high-res CKPT``: high-resolution adaptation, the run's own config with the ``highres`` deltas
  (518 px, schedules compressed into 10k iterations, a reduced lr), initialised from CKPT;
* ``--init-from CKPT``: a new run initialised from CKPT (``train.init_from``).

Under ``torchrun --nproc_per_node=N`` the same command trains on N processes; only rank 0 prints.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dinolab.configs.schema import Config, load_config, load_run_config, preset_names

DEFAULT_PRESET = "cpu"
DEMO_PRESET = "demo"  # the embedded default (no --data): the cpu recipe, minutes long
HIGH_RES_PRESET = "highres"


def build_config(args: argparse.Namespace) -> Config:
    """Preset (or, with ``--high-res``, the source run's config + the high-res deltas) <- flags <- overrides."""
    base: dict = {"data": {k: v for k, v in (("path", args.data), ("eval_path", args.eval_data)) if v is not None}}
    if args.distill_from:
        base["distill"] = {"teacher_checkpoint": args.distill_from}
    init_from = args.high_res or args.init_from
    if init_from:
        base["train"] = {"init_from": init_from}
    if args.high_res:
        from dinolab.train.checkpointer import run_config_path

        if not Path(args.high_res).exists():
            raise FileNotFoundError(f"--high-res: checkpoint {args.high_res} does not exist")
        return load_run_config(run_config_path(args.high_res), args.preset or HIGH_RES_PRESET, args.overrides, base)
    preset = args.preset or (DEFAULT_PRESET if args.data else DEMO_PRESET)
    return load_config(preset, args.overrides, base=base)


def run_train(args: argparse.Namespace) -> int:
    from dinolab.distributed.env import is_main
    from dinolab.train.loop import train

    if args.high_res and args.init_from:
        raise ValueError("--high-res already initialises from its checkpoint: drop --init-from")
    cfg = build_config(args)
    try:
        summary = train(cfg, args.output, resume=not args.no_resume, progress=not args.no_progress)
    except FloatingPointError as err:
        if is_main():
            print(f"dinolab train: stopped: {err}; the last good checkpoint is kept in {args.output}/checkpoints")
        return 3
    if not is_main():
        return 0
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
        "handwritten-digits set (scikit-learn), with k-NN before/after. Overrides: key=value, e.g. optim.base_lr=1e-3. "
        "Several GPUs/nodes: launch with torchrun (see README).",
    )
    p.add_argument("--data", default=None, help="folder of images (recursive), .txt list, .npz (x_train/images) or .jsonl manifest")
    p.add_argument("--eval-data", default=None, help="labelled set for k-NN during training (npz x_train/y_train/x_test/y_test or class folders)")
    p.add_argument("--output", default="runs/dinolab", help="run directory (resumed when it holds a checkpoint)")
    p.add_argument("--preset", default=None,
                   help=f"one of {', '.join(preset_names())} or a .yaml path (default {DEFAULT_PRESET} with --data, "
                        f"{DEMO_PRESET} without; "
                        f"with --high-res: {HIGH_RES_PRESET}, applied over the source run's config)")
    p.add_argument("--distill-from", default=None, metavar="CKPT",
                   help="distil a dinolab run's checkpoint (frozen teacher with its heads) into the preset's student")
    p.add_argument("--high-res", default=None, metavar="CKPT",
                   help="high-resolution adaptation of a dinolab run from this checkpoint "
                        "(its config + preset highres)")
    p.add_argument("--init-from", default=None, metavar="CKPT",
                   help="start a new run from a dinolab checkpoint's student, teacher and heads")
    p.add_argument("--no-resume", action="store_true", help="start from scratch even if the run directory holds a checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", help="config overrides key=value")
    p.set_defaults(func=run_train)
