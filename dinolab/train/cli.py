"""``dinolab train``: self-supervised pretraining from a folder, list, npz or the embedded default.

Also, from a dinolab checkpoint (``RUN/checkpoints/ckpt_*.pth`` or ``dcp_*/``):

* ``--distill-from CKPT``: distil that run's (frozen) model into the student of ``--preset``
  (``distill.teacher_checkpoint``; presets ``distill_vits14``, ``distill_vitb14``, ``distill_vitl14``);
* ``--high-res CKPT``: high-resolution adaptation, the run's own config with the ``highres`` deltas
  (``dinolab/configs/deltas/highres.yaml``: 518 px, schedules compressed into 10k iterations, a reduced lr),
  initialised from CKPT; they are no preset of their own (``--preset highres`` is refused in one line);
* ``--init-from CKPT``: a new run initialised from CKPT (``train.init_from``);
* ``--adapt WEIGHTS``: continued pretraining of a released backbone (an official hub ``.pth``, a Hugging Face
  state dict, a dinolab export or a run folder) on ``--data``: the student built from and initialised with the
  weights, a head warm-up on the frozen backbone, then the whole model at a reduced lr (presets ``adapt_vits14``,
  ``adapt_vitb14``, ``adapt_vitl14``, ``adapt_cpu``; see ``dinolab/train/adapt.py``).

Under ``torchrun --nproc_per_node=N`` the same command trains on N processes; only rank 0 prints.
"""

from __future__ import annotations

import argparse
import signal
import sys
import json
from pathlib import Path

from dinolab.configs.schema import Config, load_config, load_run_config, preset_names, to_yaml

DEFAULT_PRESET = "cpu"
DEMO_PRESET = "demo"  # the embedded default (no --data): the cpu recipe, minutes long
HIGH_RES_PRESET = "highres"  # dinolab/configs/deltas/highres.yaml, not a --preset


def build_config(args: argparse.Namespace) -> Config:
    """Preset (or, with ``--high-res``, the source run's config + the high-res deltas) <- flags <- overrides."""
    if args.high_res and args.init_from:
        raise ValueError("--high-res already initialises from its checkpoint: drop --init-from")
    base: dict = {"data": {k: v for k, v in (("path", args.data), ("eval_path", args.eval_data)) if v is not None}}
    if args.distill_from:
        base["distill"] = {"teacher_checkpoint": args.distill_from}
    init_from = args.high_res or args.init_from
    if init_from:
        base["train"] = {"init_from": init_from}
    if getattr(args, "adapt", None):
        return _adapt_config(args, base)
    if args.high_res:
        from dinolab.train.checkpointer import run_config_path

        if not Path(args.high_res).exists():
            raise FileNotFoundError(f"--high-res: checkpoint {args.high_res} does not exist")
        return load_run_config(run_config_path(args.high_res), args.preset or HIGH_RES_PRESET, args.overrides, base)
    preset = args.preset or (DEFAULT_PRESET if args.data else DEMO_PRESET)
    return load_config(preset, args.overrides, base=base)


def _adapt_config(args: argparse.Namespace, base: dict) -> Config:
    """``--adapt WEIGHTS``: preset (default: by the weights' size) <- the weights' architecture and crops <-
    an epoch of the data (``optim.epoch_length = images // global batch``, unless overridden) <- overrides."""
    from dinolab.distributed.env import dist_env

    from dinolab.train.adapt import adapt_base

    if args.distill_from or args.high_res or args.init_from:
        raise ValueError("--adapt starts from its weights: drop --distill-from/--high-res/--init-from")
    deltas, default_preset = adapt_base(args.adapt)
    base.update(deltas)
    preset = args.preset or default_preset
    cfg = load_config(preset, args.overrides, base=base)
    if any(o.split("=", 1)[0].strip() == "optim.epoch_length" for o in args.overrides):
        return cfg
    batch = cfg.train.batch_size_per_gpu * dist_env()[1]
    base["optim"] = {"epoch_length": max(1, dataset_size(cfg.data.path) // batch)}
    return load_config(preset, args.overrides, base=base)


def dataset_size(path: str | None) -> int:
    """Images in the training source ``data.path``, found cheaply (no image is decoded; an ``.npz``
    is measured from its array header). Checks the source as ``open_dataset`` does, and refuses a
    list none of whose files exists.

    Raises:
        FileNotFoundError, ValueError: one line naming the source.
    """
    from dinolab.data.datasets import ImageFiles, open_dataset
    from dinolab.utils.io import check_listed_files

    n = _npz_length(Path(path)) if path is not None and str(path).lower().endswith(".npz") else None
    if n is not None:
        return n
    images = open_dataset(path)
    if isinstance(images, ImageFiles):
        check_listed_files(images.paths, path)
    return len(images)


def _npz_length(path: Path) -> int | None:
    """Length of the ``x_train`` / ``images`` array of an ``.npz``, read off its header; None: let
    ``open_dataset`` decide (no such file, no such array, not a zip, compressed header...)."""
    import zipfile

    import numpy as np

    try:
        with zipfile.ZipFile(path) as z:
            name = next((f"{k}.npy" for k in ("x_train", "images") if f"{k}.npy" in z.namelist()), None)
            if name is None:
                return None
            with z.open(name) as f:
                version = np.lib.format.read_magic(f)
                read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
                if version not in read:
                    return None
                shape = read[version](f)[0]
    except (OSError, zipfile.BadZipFile, ValueError):
        return None
    return int(shape[0]) if shape else None


def validate_run(cfg: Config, output: str | Path) -> None:
    """Everything a run reads, checked before any work and before the run folder is made:
    the output folder, the checkpoints it starts from, the data (one batch must fit in it), the
    k-NN set, the precision on this device and the compiler ``train.compile`` needs
    (:mod:`dinolab.train.preflight`; the images are counted without decoding them).

    Raises:
        FileNotFoundError, ValueError: one line naming the input.
    """
    from dinolab.distributed.env import dist_env

    from dinolab.utils.io import check_output_dir
    from dinolab.train.preflight import check_batch, check_sources, resolve_runtime

    check_output_dir(output, "--output")
    check_sources(cfg)
    check_batch(cfg, dataset_size(cfg.data.path), dist_env()[1])
    resolve_runtime(cfg)


def apply_process_options(cfg: Config) -> None:
    """The process-wide settings of a ``dinolab train`` process, which the library ``train()`` never applies:
    ``train.keep_freed_memory`` (glibc keeps freed memory for the next step,
    :func:`dinolab.utils.cpu_tuning.keep_freed_memory`); ``summary.json`` says whether it took effect."""
    if cfg.train.keep_freed_memory:
        from dinolab.utils.cpu_tuning import keep_freed_memory

        keep_freed_memory()


def run_train(args: argparse.Namespace) -> int:
    from dinolab.distributed.env import is_main
    from dinolab.train.loop import train

    cfg = build_config(args)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    validate_run(cfg, args.output)
    apply_process_options(cfg)
    try:
        summary = train(cfg, args.output, resume=not args.no_resume, progress=not args.no_progress)
    except FloatingPointError as err:
        if is_main():
            print(f"dinolab train: stopped: {err}; the last good checkpoint is kept in {args.output}/checkpoints")
        return 3
    stopped = summary.get("interrupted")
    code = 128 + int(signal.Signals[stopped]) if stopped else 0  # 130 SIGINT, 143 SIGTERM: the shell's convention
    if not is_main():
        return code
    print(json.dumps(summary, indent=2))
    if stopped:
        print(f"dinolab train: interrupted by {stopped} after iteration {summary['iterations']}; checkpoint "
              f"{summary['checkpoint']}: rerun the same command to resume (exit code {code})", file=sys.stderr)
        return code
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
                        f"with --high-res: the {HIGH_RES_PRESET} deltas, applied over the source run's config)")
    p.add_argument("--distill-from", default=None, metavar="CKPT",
                   help="distil a dinolab run's checkpoint (frozen teacher with its heads) into the preset's student")
    p.add_argument("--high-res", default=None, metavar="CKPT",
                   help="high-resolution adaptation of a dinolab run from this checkpoint "
                        "(its config + the highres deltas of dinolab/configs/deltas/)")
    p.add_argument("--init-from", default=None, metavar="CKPT",
                   help="start a new run from a dinolab checkpoint's student, teacher and heads")
    p.add_argument("--adapt", default=None, metavar="WEIGHTS",
                   help="continue pretraining a released backbone on --data: an official hub .pth, a Hugging Face "
                        "state dict, a dinolab export (.pth/.safetensors) or a run folder; the student takes the "
                        "weights' architecture and crop sizes (default preset: adapt_vits14/vitb14/vitl14 by size, "
                        "adapt_cpu for small models)")
    p.add_argument("--no-resume", action="store_true", help="start from scratch even if the run directory holds a checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (preset + flags + overrides) as YAML and exit")
    p.add_argument("overrides", nargs="*", help="config overrides key=value")
    p.set_defaults(func=run_train)
