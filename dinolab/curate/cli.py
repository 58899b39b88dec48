"""``dinolab curate``: build a pretraining set from a raw pool and curated seed sets.

Example::

    dinolab curate --pool /data/raw --seeds in1k=/data/imagenet/train gldv2=/data/gld.npy \\
        --eval-sets in1k-val=/data/imagenet/val --out runs/curated --arch vitl14 --weights vitl14.pth \\
        dedup.threshold=0.6 kmeans.n_clusters=100000 retrieve.cap=1000000

``key=value`` overrides (any field of :class:`~dinolab.curate.pipeline.CurateConfig`, dotted; the syntax
of :mod:`dinolab.configs.merge`) go anywhere on the line: items after ``--seeds`` / ``--eval-sets``
whose key is a configuration field are told apart from ``NAME=PATH`` by that key (``-- key=value``
still works, with a deprecation note). The same command resumes a killed run; under ``torchrun`` every
rank embeds its share of the shards.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os

import torch

from dinolab.configs.merge import is_field_override, merge
from dinolab.curate.pipeline import CurateConfig, run_curation


def is_override(item: str) -> bool:
    """True if ``item`` is ``key=value`` with ``key`` a (dotted) :class:`CurateConfig` field."""
    return is_field_override(item, CurateConfig)


def parse_named(items: list[str] | None, option: str) -> tuple[dict[str, str], list[str]]:
    """``["name=path", ...]`` -> ``({name: path}, overrides)``.

    argparse gives ``--seeds`` every item up to the next option, so trailing ``key=value``
    overrides land here; they are returned apart.
    """
    named: dict[str, str] = {}
    overrides = []
    for item in items or []:
        if is_override(item):
            overrides.append(item)
            continue
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"{option} expects NAME=PATH, got {item!r}")
        if name in named:
            raise ValueError(f"{option}: name {name!r} given twice")
        named[name] = path
    return named, overrides


def _model_flags(args: argparse.Namespace) -> dict:
    """``--run DIR``: its teacher, the architecture read off it, its crop size; ``--weights`` without ``--arch``:
    the architecture read off the weights and their input size (:mod:`dinolab.models.resolve`)."""
    from dinolab.models.resolve import resize_for, resolve_backbone, run_weights

    if getattr(args, "run", None) is None and args.weights is None:
        return {}
    resolved = resolve_backbone(weights=args.weights, run=getattr(args, "run", None), arch=args.arch)
    size = resolved.input_size
    flags = {"arch": args.arch or "auto", "embed": {"crop_size": size, "resize_size": resize_for(size)}}
    if getattr(args, "run", None) is not None:
        flags["weights"] = str(run_weights(args.run))
    return flags


def build_config(args: argparse.Namespace, extra_overrides: list[str] | None = None) -> CurateConfig:
    """:class:`CurateConfig` from defaults, ``--arch``/``--weights``/flags, then ``key=value`` overrides."""
    flags = {"arch": args.arch, "weights": args.weights, **_model_flags(args)}
    if args.recompute:
        flags["on_change"] = "recompute"
    if getattr(args, "strict", False):
        flags["strict"] = True
    if args.hierarchical:
        flags["hierarchical_sample"] = True
    overrides = list(args.overrides) + list(extra_overrides or [])
    return merge(CurateConfig, [{k: v for k, v in flags.items() if v is not None}], overrides, context="bad override")


def check_sources(sources: dict[str, str]) -> None:
    """Every source exists, and a ``.txt`` list names at least one existing file (before any work)."""
    from pathlib import Path

    from dinolab.data.images import read_path_list
    from dinolab.utils.io import check_listed_files

    for option, path in sources.items():
        if not Path(path).exists():
            raise FileNotFoundError(f"{option}: {path} does not exist")
        if Path(path).is_file() and Path(path).suffix.lower() == ".txt":
            check_listed_files(read_path_list(path), path)


def _init_distributed() -> bool:
    """Start a gloo process group under torchrun (only barriers are needed); True if started here."""
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1 or torch.distributed.is_initialized():
        return False
    torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(days=7))
    return True


def run(args: argparse.Namespace) -> int:
    from dinolab.utils.io import check_output_dir

    check_output_dir(args.out, "--out")
    seeds, seed_overrides = parse_named(args.seeds, "--seeds")
    eval_sets, eval_overrides = parse_named(args.eval_sets, "--eval-sets")
    cfg = build_config(args, seed_overrides + eval_overrides)
    check_sources({"--pool": args.pool, **{f"--seeds {n}": p for n, p in seeds.items()},
                   **{f"--eval-sets {n}": p for n, p in eval_sets.items()}})
    from dinolab.utils.cpu_tuning import return_freed_memory

    return_freed_memory()  # freed buffers go back to the kernel: a lower peak per rank (process-wide: here only)
    started = _init_distributed()
    try:
        counts = run_curation(args.pool, seeds, args.out, cfg, eval_sets=eval_sets)
    finally:
        if started:
            torch.distributed.destroy_process_group()
    if counts:
        print(json.dumps(counts, indent=2))
        print(f"curated manifest: {os.path.join(args.out, 'curated.jsonl')}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "curate",
        help="curate a pretraining set: embed, deduplicate, cluster, retrieve (Faiss)",
        description=__doc__.split("Example::")[0].strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Overrides: any CurateConfig field, e.g. dedup.threshold=0.6 index.kind=ivfpq "
        "embed.shard_size=65536 kmeans.n_clusters=100000 retrieve.method=sample hierarchical.target_size=1000000.",
    )
    parser.add_argument(
        "--pool", required=True, help="image folder, .txt list of images, or embeddings .npy/.npz/.safetensors"
    )
    parser.add_argument(
        "--seeds", nargs="+", action="extend", metavar="NAME=PATH", help="curated seed sets (images or embeddings)"
    )
    parser.add_argument(
        "--eval-sets", nargs="+", action="extend", metavar="NAME=PATH", help="evaluation sets for relative dedup"
    )
    parser.add_argument("--out", required=True, help="output folder (rerun the same command to resume)")
    parser.add_argument("--arch", default=None, help="backbone, e.g. vits14 or vitl14_reg (default vits14)")
    parser.add_argument("--weights", default=None, help="backbone weights .pth / .safetensors (architecture and "
                        "input size read off them unless --arch / embed.crop_size=...)")
    parser.add_argument("--run", default=None, help="a training run folder: its exported teacher, architecture "
                        "and global crop size")
    parser.add_argument(
        "--hierarchical", action="store_true", help="also draw a balanced sample with hierarchical k-means"
    )
    parser.add_argument("--recompute", action="store_true", help="recompute stages whose configuration changed")
    parser.add_argument("--strict", action="store_true", help="stop when a stage removes most of the pool or its "
                        "threshold lies inside the bulk of the similarities (default: a one-line warning)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="configuration overrides")
    parser.set_defaults(func=run)
