"""Feature-extraction throughput and peak memory: dinolab vs Hugging Face ``Dinov2Model``, same weights.

Each (implementation, arch, precision) runs in a fresh subprocess so its peak RSS is its own.
Prints images/s, peak RSS and the dinolab/HF throughput ratio, and checks that both give the same
class tokens (fp32 max abs diff).

    python bench/inference.py [--archs vits14 vitb14] [--batch 32] [--size 224] [--iters 5]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def measure(impl: str, arch: str, precision: str, batch: int, size: int, iters: int) -> dict:
    import torch

    from dinolab.models import build_backbone
    from dinolab.models.hf import to_hf_model

    torch.manual_seed(0)
    ours = build_backbone(arch).eval()
    model = ours if impl == "dinolab" else to_hf_model(ours)
    x = torch.randn(batch, 3, size, size)

    def run():
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            return model(x) if impl == "dinolab" else model(pixel_values=x).pooler_output

    out = run()  # warm-up
    t0 = time.perf_counter()
    for _ in range(iters):
        out = run()
    dt = (time.perf_counter() - t0) / iters
    return {"images_per_second": batch / dt, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "cls": out.float()[:4, :8].tolist()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", nargs="+", default=["vits14", "vitb14"])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child, args.batch, args.size, args.iters)))
        return
    print(f"batch {args.batch}, {args.size}x{args.size}, mean of {args.iters} forwards after one warm-up")
    print(f"{'arch':8s} {'precision':9s} {'dinolab img/s':>14s} {'HF img/s':>9s} {'ratio':>6s} {'dinolab MB':>11s} {'HF MB':>7s} {'max|diff|':>9s}")
    for arch in args.archs:
        for precision in ("fp32", "bf16"):
            res = {}
            for impl in ("dinolab", "hf"):
                cmd = [sys.executable, __file__, "--child", impl, arch, precision, "--batch", str(args.batch),
                       "--size", str(args.size), "--iters", str(args.iters)]
                res[impl] = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
            a, b = res["dinolab"], res["hf"]
            diff = max(abs(u - v) for ra, rb in zip(a["cls"], b["cls"]) for u, v in zip(ra, rb))
            print(f"{arch:8s} {precision:9s} {a['images_per_second']:14.2f} {b['images_per_second']:9.2f} "
                  f"{a['images_per_second'] / b['images_per_second']:6.2f} {a['peak_rss_mb']:11.0f} {b['peak_rss_mb']:7.0f} {diff:9.1e}")


if __name__ == "__main__":
    main()
