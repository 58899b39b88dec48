"""Training-step speed and memory: the paper's efficient path against the naive one, in one run.

ViT-S/14, 2x224 + 8x98 crops (the official step the brief measured at 0.90 images/s, 4.5 GB on a
2-core CPU), synthetic images, full DINOv2 step (teacher, student, three losses, AdamW, EMA).
Every variant runs in a fresh subprocess (its own peak RSS). Compared:

    naive       separate global/local forwards, masked drop path, fp32
    efficient   packed forwards, drop path that skips dropped samples, bf16 autocast
    (a) packing alone, (b) drop-path flavour alone at d=0.4, (c) precision alone, (d) torch.compile,
    (e) activation checkpointing of the student's blocks (memory for recomputation),
    (f) glibc giving freed memory back to the kernel (``train.keep_freed_memory=false``; every other
        variant keeps it for reuse, as ``dinolab train`` does by default),
    (g) all packed crops attending in one nested-jagged SDPA call (``train.varlen_attention``, for CUDA)

and the efficient step's achieved FLOP/s (counted by torch.utils.flop_counter) as a fraction of
this machine's bf16 GEMM peak, measured here.

Each variant runs ``--warmup`` steps first (the first steps grow the heap, create the optimizer state and
compile: with 2, part of the compilation still fell into the timed steps), then
the mean of ``--steps`` timed steps.

    python bench/train_step.py [--batch 8] [--steps 3] [--warmup 4] [--arch vit_small] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

# the efficient path; each variant changes some of it
EFFICIENT = dict(pack_crops=True, drop_path_mode="efficient", precision="bf16", compile=False,
                 activation_checkpointing=False, keep_freed_memory=True, varlen_attention=False)
VARIANTS = {
    "naive": dict(pack_crops=False, drop_path_mode="mask", precision="fp32"),
    "efficient": {},
    "a/separate": dict(pack_crops=False),
    "b/masked-dp": dict(drop_path_mode="mask"),
    "c/fp32": dict(precision="fp32"),
    "d/compiled": dict(compile=True),
    "e/checkpointed": dict(activation_checkpointing=True),
    "f/fresh-pages": dict(keep_freed_memory=False),
    "g/varlen-attn": dict(varlen_attention=True),
}


def gemm_peak(dtype_name: str, n: int = 2048, reps: int = 10, trials: int = 5) -> float:
    """Best of ``trials`` timings of ``reps`` square n x n matmuls: FLOP/s (the best, as peaks are quoted)."""
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(trials):
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 * reps / best


def block_gemm_ceiling(dim: int, tokens: int, reps: int = 5, trials: int = 3) -> float:
    """bf16 FLOP/s of the four GEMMs of a ViT block (qkv, proj, fc1, fc2) at the step's token count: what
    the model's own matrix shapes reach here, a ceiling below the square-GEMM peak."""
    import torch

    shapes = [(dim, 3 * dim), (dim, dim), (dim, 4 * dim), (4 * dim, dim)]
    mats = [(torch.randn(tokens, k, dtype=torch.bfloat16), torch.randn(k, n, dtype=torch.bfloat16)) for k, n in shapes]
    flops = sum(2 * tokens * k * n for k, n in shapes) * reps
    for a, b in mats:
        a @ b
    best = float("inf")
    for _ in range(trials):
        t0 = time.perf_counter()
        for _ in range(reps):
            for a, b in mats:
                a @ b
        best = min(best, time.perf_counter() - t0)
    return flops / best


def synthetic_batch(cfg, batch: int) -> dict:
    import numpy as np
    import torch

    from dinolab.data.collate import collate_crops
    from dinolab.data.masking import MaskingGenerator

    c, g = cfg.crops, cfg.crops.global_crops_size // cfg.student.patch_size
    samples = [
        {"global_crops": [torch.randn(3, c.global_crops_size, c.global_crops_size) for _ in range(2)],
         "local_crops": [torch.randn(3, c.local_crops_size, c.local_crops_size) for _ in range(c.local_crops_number)]}
        for _ in range(batch)
    ]
    return collate_crops(samples, mask_generator=MaskingGenerator((g, g), max_num_patches=0.5 * g * g), n_tokens=g * g,
                         rng=np.random.default_rng(0))


def build_step(v: dict, arch: str, batch: int, drop_path: float, device: str = "cpu", extra: tuple = (),
               keep_memory: bool = True):
    """The step of one variant, ready to run: ``(step(i) -> losses, meta, cfg)``.

    ``v`` overrides :data:`EFFICIENT` (``pack_crops``, ``drop_path_mode``, ``precision`` (also ``fp16``, with a
    ``GradScaler``), ``compile``, ``activation_checkpointing``, ``varlen_attention``, ``keep_freed_memory``);
    ``extra``: further config overrides (``key=value``) after the ViT/14 2x224 + 8x98 ones, e.g. a tiny model.
    Shared with ``bench/gpu_check.py``.
    """
    import torch

    from dinolab.configs import load_config
    from dinolab.train.loop import build_optimizer, schedule_config
    from dinolab.utils.cpu_tuning import keep_freed_memory
    from dinolab.train.meta_arch import SSLMetaArch
    from dinolab.train.schedules import schedule_values
    from dinolab.train.step import train_step

    v = {**EFFICIENT, **v}
    precision = v["precision"]
    if v["keep_freed_memory"] and keep_memory:
        keep_freed_memory()
    cfg = load_config(None, [
        f"student.arch={arch}", "student.patch_size=14", f"student.drop_path_rate={drop_path}",
        f"student.drop_path_mode={v['drop_path_mode']}", "crops.global_crops_size=224", "crops.local_crops_size=98",
        "crops.local_crops_number=8", f"train.pack_crops={v['pack_crops']}", f"train.batch_size_per_gpu={batch}",
        f"train.activation_checkpointing={v['activation_checkpointing']}",
        f"train.varlen_attention={v['varlen_attention']}", *extra,
    ])
    dev = torch.device(device)
    torch.manual_seed(0)
    if dev.type == "cuda":  # built in place: initialising a ViT-L/g meta-architecture on the CPU takes seconds
        with dev:
            meta = SSLMetaArch.from_config(cfg)
    else:
        meta = SSLMetaArch.from_config(cfg)
    meta = meta.to(dev)
    if v["compile"]:
        from dinolab.train.loop import compile_backbones

        compile_backbones(meta)
    opt = build_optimizer(meta, cfg)
    scaler = torch.amp.GradScaler(dev.type) if precision == "fp16" else None
    sched = schedule_values(schedule_config(cfg, batch), 1000)
    data = {k: t.to(dev) if torch.is_tensor(t) else t for k, t in synthetic_batch(cfg, batch).items()}

    def step(i: int) -> dict:
        return train_step(meta, opt, data, sched, i, precision, cfg.optim.clip_grad, scaler)

    return step, meta, cfg


def run_variant(name: str, arch: str, batch: int, steps: int, drop_path: float, warmup: int) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    step, _, _ = build_step(VARIANTS[name], arch, batch, drop_path)
    for i in range(warmup):  # (and compilation)
        step(i)
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        step(i)
        times.append(time.perf_counter() - t0)
    dt = sum(times) / steps
    out = {"images_per_second": batch / dt, "seconds_per_step": dt, "best_seconds_per_step": min(times),
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if name == "efficient":
        with FlopCounterMode(display=False) as counter:
            step(0)
        out["flops_per_step"] = counter.get_total_flops()
        # the peak again, in this process right after the steps: shared machines drift by +-10% in minutes
        out["adjacent_bf16_peak"] = gemm_peak("bfloat16")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="vit_small")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--drop-path", type=float, default=0.4)
    p.add_argument("--only", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(run_variant(args.child, args.arch, args.batch, args.steps, args.drop_path, args.warmup)))
        return
    peak = {d: gemm_peak(d) for d in ("float32", "bfloat16")}
    print(f"GEMM peak here: fp32 {peak['float32'] / 1e9:.0f} GFLOP/s, bf16 {peak['bfloat16'] / 1e9:.0f} GFLOP/s")
    print(f"{args.arch}/14, 2x224 + 8x98 crops, batch {args.batch}, drop path {args.drop_path}, "
          f"mean of {args.steps} steps after {args.warmup} warm-up steps")
    res = {}
    for name in args.only:
        cmd = [sys.executable, __file__, "--child", name, "--arch", args.arch, "--batch", str(args.batch),
               "--steps", str(args.steps), "--drop-path", str(args.drop_path), "--warmup", str(args.warmup)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            print(f"{name:12s} failed: {proc.stderr.strip().splitlines()[-1]}")
            continue
        res[name] = json.loads(proc.stdout.splitlines()[-1])
        r = res[name]
        print(f"{name:12s} {r['images_per_second']:7.2f} images/s  {r['seconds_per_step']:7.2f} s/step  {r['peak_rss_mb']:7.0f} MB peak RSS")
    pairs = [("efficient", "naive"), ("efficient", "a/separate"), ("efficient", "b/masked-dp"),
             ("efficient", "c/fp32"), ("d/compiled", "efficient"), ("e/checkpointed", "naive"),
             ("e/checkpointed", "efficient"), ("efficient", "f/fresh-pages"), ("g/varlen-attn", "efficient")]
    for a, b in pairs:
        if a in res and b in res:
            print(f"{a} / {b}: {res[a]['images_per_second'] / res[b]['images_per_second']:.2f}x images/s, "
                  f"{res[a]['peak_rss_mb'] / res[b]['peak_rss_mb']:.2f}x peak memory")
    if "efficient" in res:
        e = res["efficient"]
        achieved = e["flops_per_step"] / e["seconds_per_step"]
        print(f"efficient step: {achieved / 1e9:.0f} GFLOP/s = {100 * achieved / peak['bfloat16']:.0f}% of the bf16 GEMM peak")
        adjacent = e["adjacent_bf16_peak"]
        best = e["flops_per_step"] / e["best_seconds_per_step"]
        print(f"  against the peak measured right after its steps ({adjacent / 1e9:.0f} GFLOP/s): mean step "
              f"{100 * achieved / adjacent:.0f}%, best step {100 * best / adjacent:.0f}% (best against best, as peaks are quoted)")
        dim = {"vit_small": 384, "vit_base": 768, "vit_large": 1024}.get(args.arch)
        if dim:
            tokens = args.batch * (2 * 257 + 8 * 50)
            ceiling = block_gemm_ceiling(dim, tokens)
            print(f"ViT block GEMMs at {tokens} tokens reach {ceiling / 1e9:.0f} GFLOP/s here "
                  f"({100 * ceiling / peak['bfloat16']:.0f}% of the peak); the efficient step reaches "
                  f"{100 * achieved / ceiling:.0f}% of that")
        for name in ("d/compiled", "e/checkpointed"):  # the same model FLOPs (recomputation not counted)
            if name in res:
                achieved = res["efficient"]["flops_per_step"] / res[name]["seconds_per_step"]
                print(f"{name} step: {achieved / 1e9:.0f} model GFLOP/s = {100 * achieved / peak['bfloat16']:.0f}% of the peak")


if __name__ == "__main__":
    main()
