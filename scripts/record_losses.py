"""Record every loss field of the refactoring reference runs as JSON (timing fields dropped), or compare two records.

A refactor keeps these numbers bit-identical: record before the first move, then after every move, at the same
OpenMP thread count (1 vs 2 threads differ in the last bit of some sums)::

    .venv/bin/python scripts/record_losses.py before.json [--main]   # --main: also the main job's first 50 its (~4 min)
    .venv/bin/python scripts/record_losses.py after.json [--main]
    .venv/bin/python scripts/record_losses.py --compare before.json after.json

The runs: the tiny run (tests/train/tiny_run.py), with k-NN, drop path 0.4 packed and unpacked, softmax centering,
stopped at 3 and resumed with drop path 0.4, and 2 gloo ranks under FSDP2 with drop path 0.4.
"""
import json, os, subprocess, sys, tempfile
from pathlib import Path
import numpy as np
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "train"))
sys.path.insert(0, str(ROOT / "tests" / "distributed"))
from tiny_run import TINY_RUN
from dinolab.configs import load_config
from dinolab.train.loop import train

DROP = ("images_per_second", "elapsed_seconds", "seconds", "time")
def rec(d):
    out = []
    for l in (Path(d) / "metrics.jsonl").read_text().splitlines():
        r = json.loads(l)
        out.append({k: v for k, v in r.items() if not any(x in k for x in DROP)})
    return out

def two_rank_worker(rank, data, root, port):
    os.environ["MASTER_PORT"] = str(port)
    from dinolab.train.loop import train as tr
    from test_train_loop import tiny_cfg
    tr(tiny_cfg(data, "train.distributed=fsdp", "student.drop_path_rate=0.4"), f"{root}/fsdp", progress=False)

def compare(first: str, second: str) -> int:
    """Print the first differing record of each run that differs; 0 when every run in both is identical."""
    a, b = (json.loads(Path(p).read_text()) for p in (first, second))
    differing = 0
    for name in a:
        if name not in b:
            print("missing in second:", name)
            continue
        if a[name] != b[name]:
            differing += 1
            for i, (r, s) in enumerate(zip(a[name], b[name])):
                fields = {f: (r.get(f), s.get(f)) for f in set(r) | set(s) if r.get(f) != s.get(f)}
                if fields:
                    print(name, "record", i, fields)
                    break
            if len(a[name]) != len(b[name]):
                print(name, "lengths", len(a[name]), len(b[name]))
    print("IDENTICAL" if not differing else f"{differing} runs differ", "over", [n for n in a if n in b])
    return 1 if differing else 0


if __name__ == "__main__":
    if sys.argv[1] == "--compare":
        sys.exit(compare(sys.argv[2], sys.argv[3]))
    out = sys.argv[1]
    root = Path(tempfile.mkdtemp())
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (24, 20, 20, 3), dtype=np.uint8)
    y = np.arange(24) % 3
    x[y == 1, :, :, 0] = 250
    np.savez(root / "d.npz", x_train=x[:18], y_train=y[:18], x_test=x[18:], y_test=y[18:])
    cfg = lambda *e: load_config("cpu", [*TINY_RUN, "optim.epochs=2", *e],
                                 base={"data": {"path": str(root / "d.npz"), "eval_path": str(root / "d.npz")}})
    res = {}
    variants = {
        "tiny": [], "tiny_knn": ["train.knn_every=2"],
        "tiny_dp_packed": ["student.drop_path_rate=0.4", "train.pack_crops=true"],
        "tiny_dp_unpacked": ["student.drop_path_rate=0.4", "train.pack_crops=false"],
        "tiny_mean_center": ["teacher.centering=softmax"],
    }
    for name, extra in variants.items():
        train(cfg(*extra), root / name, progress=False)
        res[name] = rec(root / name)
    train(cfg("student.drop_path_rate=0.4", "train.max_iters=3", "train.checkpoint_every=1"), root / "split", progress=False)
    train(cfg("student.drop_path_rate=0.4", "train.checkpoint_every=1"), root / "split", progress=False)
    res["tiny_dp_resumed"] = rec(root / "split")
    from dist_harness import free_port, run_ranks
    run_ranks(two_rank_worker, 2, str(root / "d.npz"), str(root), free_port())
    res["two_rank_fsdp_dp"] = rec(root / "fsdp")
    if "--main" in sys.argv:
        subprocess.run([sys.executable, "-m", "dinolab", "train", "--output", str(root / "main50"), "--no-progress",
                        "train.max_iters=50"], check=True, stdout=subprocess.DEVNULL)
        res["main50"] = rec(root / "main50")
    Path(out).write_text(json.dumps(res, indent=1))
    print({k: len(v) for k, v in res.items()})
