"""``dinolab eval PROTOCOL``: frozen-feature evaluation of a backbone, one library call per protocol.

    dinolab eval knn --arch vits14 --weights dinov2_vits14_pretrain.pth --data ../shared/data/cifar10/cifar10.npz
    dinolab eval linear --run runs/my_run --data imagenette.npz --out results.json iterations=2000
    dinolab eval segmentation --arch vits14 --data camvid.npz n_last_blocks=4 test_scales=[0.75,1.0,1.25]
    dinolab eval retrieval --arch vits14 --data imagenette.npz      # builds the constructed set
    dinolab eval depth --arch vits14 --data depth_samples.npz head=lin4

``key=value`` arguments (:mod:`dinolab.configs.merge`; ``--set key=value`` is the deprecated spelling)
override fields of the protocol's config dataclass (``features.*`` for extraction); see each protocol
module (``dinolab.eval.knn`` ...) for the fields and the metric names. Without ``--out`` the metrics are
printed as JSON; with it, ``results.json`` and a Markdown report with pictures are written
(:mod:`dinolab.eval.report`).

From a notebook: ``evaluate("knn", model, "cifar10.npz", KnnConfig())`` does what the command does.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from dinolab.configs.merge import merge

from dinolab.eval import data as eval_data
from dinolab.eval import depth, knn, linear, logreg, retrieval, segmentation
from dinolab.features.cache import model_fingerprint
from dinolab.utils.runtime import resolve_device
from dinolab.eval.report import write_results
from dinolab.models.resolve import load_backbone_from_run, resolve_backbone  # noqa: F401 (re-exported)


@dataclass(frozen=True)
class Protocol:
    config: type
    load: Callable[[str, Any], Any]  # (data path, config) -> data object
    run: Callable[..., dict[str, float]]


PROTOCOLS: dict[str, Protocol] = {
    "knn": Protocol(knn.KnnConfig, lambda p, c: eval_data.load_classification(p), knn.run),
    "linear": Protocol(linear.LinearConfig, lambda p, c: eval_data.load_classification(p), linear.run),
    "logreg": Protocol(logreg.LogRegConfig, lambda p, c: eval_data.load_classification(p), logreg.run),
    "retrieval": Protocol(retrieval.RetrievalConfig, retrieval.load_data, retrieval.run),
    "segmentation": Protocol(
        segmentation.SegmentationConfig,
        lambda p, c: eval_data.load_segmentation(p, ignore_index=c.ignore_index),
        segmentation.run,
    ),
    "depth": Protocol(depth.DepthConfig, lambda p, c: eval_data.load_depth(p), depth.run),
}
CLASSIFICATION_PROTOCOLS = ("knn", "linear", "logreg", "retrieval")  # square inputs: image_size is one int


def load_model(arch: str | None, weights: str | None, run: str | None) -> tuple[nn.Module, dict]:
    """A backbone from ``--run DIR``, ``--weights`` (architecture read off it unless ``--arch``) or ``--arch``
    (random initialisation): :func:`dinolab.models.resolve.resolve_backbone`; ``info["input_size"]`` is the
    size that fits it (the run's crop size, the weights' grid)."""
    resolved = resolve_backbone(weights=weights, run=run, arch=arch)
    return resolved.model, {**resolved.info, "input_size": resolved.input_size}


def build_config(protocol: str, overrides: list[str]) -> Any:
    """The protocol's config dataclass with ``key=value`` overrides applied (types checked)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {', '.join(PROTOCOLS)}")
    return merge(PROTOCOLS[protocol].config, overrides=overrides, context=f"invalid {protocol} config")


def evaluate(protocol: str, model: nn.Module, data_path: str | Path, cfg: Any, artifacts: dict | None = None):
    """Load ``data_path`` in the protocol's format and run the protocol: metrics dict."""
    p = PROTOCOLS[protocol]
    return p.run(model, p.load(str(data_path), cfg), cfg, artifacts)


def _bf16_is_fast(device: str) -> bool:
    """bf16 autocast by default where it is fast: CUDA, or a CPU with native bf16 (else fp32, said in one line)."""
    from dinolab.utils.runtime import cpu_has_fast_bf16

    if resolve_device(device).type == "cuda" or cpu_has_fast_bf16():
        return True
    print("note: this CPU has no native bfloat16 (AVX512-BF16/AMX): extracting in float32", file=sys.stderr)
    return False


def run_eval(args: argparse.Namespace) -> int:
    if args.set_overrides:
        print("note: --set is deprecated: write the overrides as plain arguments, e.g. dinolab eval knn ... ks=[10,20]",
              file=sys.stderr)
    overrides = list(args.overrides) + list(args.set_overrides)
    if args.image_size is not None:
        overrides.append(f"image_size={args.image_size}")
    bf16 = not args.no_bf16 and _bf16_is_fast(args.device)
    overrides += [f"features.batch_size={args.batch_size}", f"features.bf16={bf16}"]
    overrides += [f"features.use_cache={not args.no_cache}"]
    if args.cache_dir:
        overrides.append(f"features.cache_dir={args.cache_dir}")
    cfg = build_config(args.protocol, overrides)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, info = load_model(args.arch, args.weights, args.run)
    if args.run and args.image_size is None and args.protocol in CLASSIFICATION_PROTOCOLS:
        cfg.image_size = info["input_size"]  # the run's own crop size, as during its training-time k-NN
    model = model.to(resolve_device(args.device)).eval()
    info["fingerprint"] = model_fingerprint(model)
    artifacts: dict = {}
    start = time.perf_counter()
    metrics = evaluate(args.protocol, model, args.data, cfg, artifacts)
    seconds = time.perf_counter() - start
    if args.out:
        paths = write_results(args.out, args.protocol, metrics, cfg, info, str(args.data), artifacts, seconds)
        print(f"wrote {', '.join(str(p) for p in paths)}")
    for note in artifacts.get("notes", []):
        print(f"note: {note}")
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}, indent=1))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="frozen-feature evaluation: knn, linear, logreg, retrieval, segmentation, depth",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("protocol", choices=list(PROTOCOLS), help="evaluation protocol")
    p.add_argument("--arch", help="backbone name (vits14, vitb14_reg, vit_small ...); default: read off --weights "
                   "(auto), or vits14 randomly initialised without weights")
    p.add_argument("--weights", help="local weights file (.pth / .safetensors); omitted: random init")
    p.add_argument("--run", help="training run directory (teacher_backbone.safetensors + config.yaml): its "
                   "architecture, and its global crop size as the input size of knn/linear/logreg/retrieval")
    p.add_argument("--data", required=True, help="dataset file or folder (format: dinolab.eval.data)")
    p.add_argument("--out", help="results JSON path (a Markdown report and PNGs are written beside it)")
    p.add_argument("--image-size", help="input size: an int (square) or [H,W] for dense protocols")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    p.add_argument("--no-bf16", action="store_true", help="extract in float32 instead of bfloat16 autocast (the default only where bf16 is "
                   "fast: CUDA, or a CPU with AVX512-BF16/AMX)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda ...")
    p.add_argument("--cache-dir", help="feature cache folder (default ~/.cache/dinolab/eval-features)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the feature cache")
    p.add_argument("--threads", type=int, help="torch CPU threads (1 can be much faster on a busy shared CPU)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="protocol config overrides, anywhere on the line, e.g. iterations=2000 ks=[10,20]")
    p.add_argument("--set", dest="set_overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="deprecated spelling of the same overrides")
    p.set_defaults(func=run_eval)
