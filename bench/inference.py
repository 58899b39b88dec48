"""Feature-extraction throughput and peak memory: dinolab vs Hugging Face ``Dinov2Model``, same weights.

Each (implementation, arch, precision) runs in a fresh subprocess so its peak RSS is its own.
Prints images/s, peak RSS and the dinolab/HF throughput ratio (eager, and with each block compiled
as ``dinolab extract --compile`` does; compilation time excluded), and checks that both give the
same class tokens (max abs diff of the first values).

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

    from dinolab.utils.runtime import compile_blocks

    torch.manual_seed(0)
    # interpolate_offset 0: the exact-size resampling HF uses, so both compute the same outputs at 224
    ours = build_backbone(arch, interpolate_offset=0.0).eval()
    model = to_hf_model(ours) if impl == "hf" else ours
    if impl == "dinolab+compile":
        compile_blocks([ours], dynamic=None)
    torch.manual_seed(1)  # the same input in every subprocess, whatever building the models consumed
    x = torch.randn(batch, 3, size, size)

    def run():
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            return model(pixel_values=x).pooler_output if impl == "hf" else model(x)

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
    print(f"{'arch':8s} {'precision':9s} {'dinolab img/s':>14s} {'+compile':>9s} {'HF img/s':>9s} {'ratio':>6s} "
          f"{'compiled ratio':>15s} {'dinolab MB':>11s} {'HF MB':>7s} {'max|diff|':>9s}")
    for arch in args.archs:
        for precision in ("fp32", "bf16"):
            res = {}
            for impl in ("dinolab", "dinolab+compile", "hf"):
                cmd = [sys.executable, __file__, "--child", impl, arch, precision, "--batch", str(args.batch),
                       "--size", str(args.size), "--iters", str(args.iters)]
                res[impl] = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
            a, c, b = res["dinolab"], res["dinolab+compile"], res["hf"]
            diff = max(abs(u - v) for ra, rb in zip(a["cls"], b["cls"]) for u, v in zip(ra, rb))
            print(f"{arch:8s} {precision:9s} {a['images_per_second']:14.2f} {c['images_per_second']:9.2f} "
                  f"{b['images_per_second']:9.2f} {a['images_per_second'] / b['images_per_second']:6.2f} "
                  f"{c['images_per_second'] / b['images_per_second']:15.2f} {a['peak_rss_mb']:11.0f} "
                  f"{b['peak_rss_mb']:7.0f} {diff:9.1e}")


if __name__ == "__main__":
    main()
