"""k-NN top-1 of several backbones on one test set, with the standard errors of their differences.

Each backbone (a run folder or weights file) is evaluated with the ``dinolab eval knn`` protocol (its class token,
the train split as memory, the test split as queries, at the run's own crop size); the per-image outcomes then give,
for every backbone against the first one, the difference in accuracy, its standard error when the two are
evaluated on the same images (paired: sqrt(var(d_i) / n) with d_i = correct_a - correct_b per image) and the
standard error of one accuracy (sqrt(p (1 - p) / n), the unpaired yardstick; the differences are also given in
units of the first backbone's). Used for README "Adapt a released backbone"::

    python bench/adapt_gain.py --data builtin:digits --k 20 source=runs/src adapted=runs/a900 scratch=runs/s900
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
import torch.nn.functional as F

from dinolab.eval import data as eval_data
from dinolab.eval import knn
from dinolab.eval.cli import load_model
from dinolab.eval.features import classification_preprocess, global_spec
from dinolab.features.cache import extract


def correct_per_image(source: str, data_path: str, k: int, cfg: knn.KnnConfig) -> np.ndarray:
    """[Q] bool: whether the k-NN vote (``k`` neighbours) of each test image names its class."""
    is_run = not source.endswith((".pth", ".pt", ".safetensors"))
    model, info = load_model(None, None if is_run else source, source if is_run else None)
    data = eval_data.load_classification(data_path)
    train, query = data.split("train"), data.split(data.eval_split)
    pre = classification_preprocess(train.images.native_size, model.patch_size, info["input_size"])
    spec = global_spec(model)
    train_f = F.normalize(extract(model, train.images, pre, spec, cfg.features, "train")["cls"][:, -1].float(), dim=1)
    query_f = F.normalize(extract(model, query.images, pre, spec, cfg.features, "test")["cls"][:, -1].float(), dim=1)
    votes = knn.knn_votes(train_f, torch.from_numpy(train.labels), query_f, data.num_classes, (k,), cfg.temperature)
    return (votes[k].argmax(1).numpy() == query.labels)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("backbones", nargs="+", help="NAME=RUN_DIR or NAME=WEIGHTS; differences are against the first")
    p.add_argument("--data", required=True,
                   help="labelled set with train and test splits (npz, folders, builtin:NAME)")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    cfg = knn.KnnConfig()
    cfg.features.bf16, cfg.features.use_cache = False, False
    outcomes = {}
    for item in args.backbones:
        name, _, source = item.partition("=")
        if not source:
            p.error(f"backbone {item!r}: expected NAME=RUN_DIR or NAME=WEIGHTS")
        outcomes[name] = correct_per_image(source, args.data, args.k, cfg).astype(np.float64)
    first = next(iter(outcomes))
    n = len(outcomes[first])
    rows = []
    print(f"k-NN top-1 (k = {args.k}) on {args.data}, {n} test images; differences against {first!r}")
    print(f"{'backbone':>12} {'top-1':>7} {'SE':>5} {'diff':>6} {'paired SE':>10} {'diff/paired SE':>15} "
          f"{'diff/SE of ' + first:>16}")
    first_se = np.sqrt(outcomes[first].mean() * (1 - outcomes[first].mean()) / n)
    for name, correct in outcomes.items():
        acc = correct.mean()
        se = np.sqrt(acc * (1 - acc) / n)
        d = correct - outcomes[first]
        paired = np.sqrt(d.var(ddof=1) / n) if name != first else float("nan")
        diff = d.mean()
        rows.append({"name": name, "top1": 100 * acc, "se": 100 * se, "diff": 100 * diff, "paired_se": 100 * paired})
        print(f"{name:>12} {100 * acc:7.1f} {100 * se:5.2f} {100 * diff:+6.1f} {100 * paired:10.2f} "
              f"{diff / paired if name != first else float('nan'):15.1f} {diff / first_se:16.1f}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"data": args.data, "k": args.k, "n": n, "backbones": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
