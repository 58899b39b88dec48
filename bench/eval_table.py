"""The frozen-feature evaluation table of issue 4, for one backbone, in minutes on a 2-core CPU.

Rows (data under ``--data-root``, i.e. ``../shared/data``):

=====================  ==========================================================================
cifar10, imagenette    k-NN (k = 20 shown; 10/20/100/200 in the JSON) and linear-probe top-1 on
                       the test split (linear: C chosen on 10% of train held out)
camvid                 linear segmentation mIoU on test (BN + linear on the last block)
retrieval              mAP (medium = all positives; easy / hard in the JSON) on a CONSTRUCTED set:
                       200 Imagenette test images as queries, their augmented copies as
                       positives among the other 800 test images (not a standard benchmark)
depth_samples          lin.1 RMSE (m) / delta1, leave-one-out on 5 indoor and 3 KITTI frames
                       (plumbing only)
=====================  ==========================================================================

Speed settings (printed with the table): bfloat16 extraction; inputs 112x112 for classification
and retrieval, shorter side 168 for CamVid and depth (see ``dinolab.eval.features``); the linear
probe runs ``--linear-iterations`` SGD steps (official 12,500) over cached features; feature
cache in ``--cache-dir``, so a second run of the same weights skips the backbone. The seconds of
each row include feature extraction (0 when cached).

    .venv/bin/python bench/eval_table.py --arch vits14 --threads 1          # random init (seed 0)
    .venv/bin/python bench/eval_table.py --arch vits14 --weights W.pth
    .venv/bin/python bench/eval_table.py --run runs/my_run --out-dir outputs/eval_table_run

Threads: when other jobs share the 2 cores, 2 torch threads were measured 4x (backbone) to 10x
(linear-probe steps) slower than 1 (OpenMP threads waiting on each other); ``--threads 1`` then.

Writes ``eval_table.json`` (every metric, config and time), ``eval_table.md`` and each protocol's
results JSON / Markdown / pictures under ``--out-dir``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

from dinolab.eval.cli import PROTOCOLS, build_config, evaluate, load_model
from dinolab.features.cache import model_fingerprint
from dinolab.eval.report import write_results
from dinolab.utils.io import atomic_write_json, atomic_write_text

# (row name, protocol, data file under --data-root, config overrides, metrics shown)
ROWS = [
    ("cifar10 k-NN", "knn", "cifar10/cifar10.npz", [], ["knn/k20/top1"]),
    ("cifar10 linear", "linear", "cifar10/cifar10.npz", ["iterations={it}"], ["linear/test/top1"]),
    ("imagenette k-NN", "knn", "imagenette/imagenette.npz", [], ["knn/k20/top1"]),
    ("imagenette linear", "linear", "imagenette/imagenette.npz", ["iterations={it}"], ["linear/test/top1"]),
    ("camvid seg", "segmentation", "camvid/camvid.npz", ["iterations={seg_it}"],
     ["seg/test/mIoU", "seg/test/pixel_acc"]),
    ("retrieval (constructed)", "retrieval", "imagenette/imagenette.npz", [],
     ["retrieval/mAP", "retrieval/easy/mAP", "retrieval/hard/mAP"]),
    ("depth lin.1", "depth", "depth_samples/depth_samples.npz", ["iterations={depth_it}"],
     ["depth/indoor/rmse", "depth/indoor/delta1", "depth/kitti/rmse", "depth/kitti/delta1"]),
]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)  # a random initialisation is the same model (and cache entry) every run
    model, info = load_model(args.arch, args.weights, args.run)
    model.eval()
    info["fingerprint"] = model_fingerprint(model)
    out_dir = Path(args.out_dir)
    table, total_start = [], time.perf_counter()
    for name, protocol, data_file, overrides, shown in ROWS:
        if args.only and not any(o in name for o in args.only):
            continue
        cfg = build_config(protocol, _overrides(protocol, overrides, args))
        artifacts: dict = {}
        start = time.perf_counter()
        metrics = evaluate(protocol, model, Path(args.data_root) / data_file, cfg, artifacts)
        seconds = time.perf_counter() - start
        stem = name.split(" (")[0].replace(" ", "_").replace(".", "")
        write_results(out_dir / f"{stem}.json", protocol, metrics, cfg, info, data_file, artifacts, seconds)
        table.append({"row": name, "protocol": protocol, "seconds": seconds, "shown": {k: metrics[k] for k in shown},
                      "metrics": metrics, "notes": artifacts.get("notes", [])})
        print(f"{name:26s} {seconds:7.1f} s  " + "  ".join(f"{k}={metrics[k]:.4g}" for k in shown), flush=True)
    total = time.perf_counter() - total_start
    summary = {"model": info, "settings": vars(args), "total_seconds": total, "rows": table}
    atomic_write_json(out_dir / "eval_table.json", summary)
    md = markdown(summary)
    atomic_write_text(out_dir / "eval_table.md", md)
    print("\n" + md)
    return 0


def _overrides(protocol: str, templates: list[str], args: argparse.Namespace) -> list[str]:
    values = {"it": args.linear_iterations, "seg_it": args.seg_iterations, "depth_it": args.depth_iterations}
    out = [t.format(**values) for t in templates]
    out += [f"features.bf16={not args.no_bf16}", f"features.batch_size={args.batch_size}"]
    out.append(f"features.progress={args.progress}")
    if "progress" in {f.name for f in dataclasses.fields(PROTOCOLS[protocol].config)}:
        out.append(f"progress={args.progress}")
    if args.cache_dir:
        out.append(f"features.cache_dir={args.cache_dir}")
    return out


def markdown(summary: dict) -> str:
    model = summary["model"]
    lines = [
        f"Model: `{model.get('arch')}`, weights `{model.get('weights')}` (fingerprint {model['fingerprint'][:12]})",
        "",
        "| row | metric | value | seconds |",
        "|---|---|---|---|",
    ]
    for row in summary["rows"]:
        for i, (k, v) in enumerate(row["shown"].items()):
            name, seconds = (row["row"], f"{row['seconds']:.0f}") if i == 0 else ("", "")
            lines.append(f"| {name} | {k} | {v:.4g} | {seconds} |")
    s = summary["settings"]
    lines += [
        "",
        f"Total {summary['total_seconds']:.0f} s. bf16={not s['no_bf16']}, linear {s['linear_iterations']} SGD "
        f"iterations (official 12,500), segmentation head {s['seg_iterations']} and depth head "
        f"{s['depth_iterations']} AdamW steps; accuracies / mIoU / mAP in percent, depth RMSE in metres.",
        "Retrieval is a constructed set (Imagenette test images + augmented copies), not a standard benchmark; "
        "depth_samples has 8 frames (leave-one-out, plumbing only).",
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", help="backbone name (vits14 ...)")
    p.add_argument("--weights", help="weights file; omitted: random initialisation (seeded)")
    p.add_argument("--run", help="training run directory instead of --arch/--weights")
    p.add_argument("--data-root", default="../shared/data", help="folder holding cifar10/, imagenette/ ...")
    p.add_argument("--out-dir", default="outputs/eval_table")
    p.add_argument("--cache-dir", help="feature cache (default ~/.cache/dinolab/eval-features)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--no-bf16", action="store_true")
    p.add_argument("--linear-iterations", type=int, default=2500)
    p.add_argument("--seg-iterations", type=int, default=500)
    p.add_argument("--depth-iterations", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", nargs="+", help="run only rows whose name contains one of these words")
    p.add_argument("--progress", action="store_true", help="show the progress bars of every stage")
    p.add_argument("--threads", type=int, help="torch CPU threads (1 is several times faster on a shared, busy CPU)")
    args = p.parse_args(argv)
    if not args.run and not args.arch:
        p.error("give --arch (and --weights) or --run")
    return args


if __name__ == "__main__":
    sys.exit(main())
