"""Exported ONNX backbones in onnxruntime vs eager and compiled PyTorch, and the export parity figures.

One process, random weights (``dinolab.dinov2_vits14(weights=None)`` ...), fp32, CPU:

1. throughput (images/s) at 224 for batch 1 and 32: onnxruntime (the dynamic ONNX file that
   ``dinolab export`` writes), eager PyTorch, ``torch.compile`` (compilation excluded), with ratios to eager;
   plus onnxruntime on the fp16 export (``--fp16``) for the first arch;
2. parity: max abs difference of the fp32 ONNX and torch.export files against eager PyTorch, for the
   plain and register models, at 224 and at ``--other-size``.

    python bench/export.py [--archs vits14 vitb14] [--iters 3] [--other-size 280] [--no-fp16]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def images_per_s(fn, x, iters: int) -> float:
    fn(x)  # warm-up (and compilation)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn(x)
    return iters * x.shape[0] / (time.perf_counter() - t0)


def throughput(arch: str, tmp: Path, iters: int, batches: list[int], fp16: bool) -> list[tuple]:
    import dinolab
    from dinolab.export import ExportModule, load_runner, write_onnx

    torch.manual_seed(0)
    model = getattr(dinolab, f"dinov2_{arch}")(weights=None).eval()
    names = ExportModule(model).output_names
    path = tmp / f"{arch}.onnx"
    write_onnx(ExportModule(model).eval(), torch.randn(2, 3, 224, 224), path, dynamic=True)
    ort_run = load_runner(path, "onnx", names)
    compiled = torch.compile(model)

    def eager(x):
        with torch.inference_mode():
            return model(x)

    def comp(x):
        with torch.inference_mode():
            return compiled(x)

    rows = []
    for b in batches:
        x = torch.randn(b, 3, 224, 224)
        e = images_per_s(eager, x, iters)
        c = images_per_s(comp, x, iters)
        o = images_per_s(ort_run, x, iters)
        rows.append((arch, b, "fp32", e, c, o))
        print(f"{arch} batch {b}: eager {e:.1f}, compiled {c:.1f}, onnxruntime {o:.1f} images/s", flush=True)
    if fp16:
        half = ExportModule(model.half()).eval()
        path16 = tmp / f"{arch}_fp16.onnx"
        write_onnx(half, torch.randn(2, 3, 224, 224).half(), path16, dynamic=True)
        run16 = load_runner(path16, "onnx", names, "fp16")
        b = batches[-1]
        o16 = images_per_s(run16, torch.randn(b, 3, 224, 224), iters)
        rows.append((arch, b, "fp16 (onnxruntime only)", float("nan"), float("nan"), o16))
        print(f"{arch} batch {b}: onnxruntime fp16 {o16:.1f} images/s", flush=True)
    return rows


def parity_rows(arch: str, tmp: Path, other: int) -> list[tuple]:
    import dinolab
    from dinolab.export import export_backbone, load_runner, parity, synthetic_images

    torch.manual_seed(0)
    model = getattr(dinolab, f"dinov2_{arch}")(weights=None).eval()
    rows = []
    for fmt, suffix in (("onnx", ".onnx"), ("torch-export", ".pt2")):
        res = export_backbone(model, tmp / f"{arch}_parity{suffix}", fmt, size=224, patch_tokens=True,
                              log=lambda s: None)
        runner = load_runner(res.path, fmt, res.output_names)
        for s in (224, other):
            d = parity(runner, model, synthetic_images(2, (s, s), seed=1), res.output_names)
            rows.append((arch, fmt, s, d))
            print(f"{arch} {fmt} {s}: " + ", ".join(f"{k} {v:.1e}" for k, v in d.items()), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", nargs="+", default=["vits14", "vitb14"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--other-size", type=int, default=280)
    ap.add_argument("--fp16", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--skip-parity", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        rows = []
        for i, arch in enumerate(args.archs):
            rows += throughput(arch, tmp, args.iters, args.batches, args.fp16 and i == 0)
        prows = []
        if not args.skip_parity:
            for arch in args.archs:
                prows += parity_rows(arch, tmp, args.other_size)
                prows += parity_rows(f"{arch}_reg", tmp, args.other_size)
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, iters {args.iters}, 224x224")
    print("| model | batch | dtype | eager img/s | compiled img/s (x eager) | onnxruntime img/s (x eager) |")
    print("|---|---|---|---|---|---|")
    for arch, b, dt, e, c, o in rows:
        if e != e:  # fp16 row: no PyTorch figures
            print(f"| {arch} | {b} | {dt} | | | {o:.1f} |")
        else:
            print(f"| {arch} | {b} | {dt} | {e:.1f} | {c:.1f} ({c / e:.2f}x) | {o:.1f} ({o / e:.2f}x) |")
    if prows:
        print("\n| model | format | size | max abs diff (cls / patch / reg) |")
        print("|---|---|---|---|")
        for arch, fmt, s, d in prows:
            print(f"| {arch} | {fmt} | {s} | " + " / ".join(f"{v:.1e}" for v in d.values()) + " |")


if __name__ == "__main__":
    main()
