"""The GPU check (issue 17): one prepared run that measures dinolab on a CUDA device in under ~8 minutes.

    python bench/gpu_check.py [--device cuda|cpu] [--smoke] [--out DIR]     (DIR: $OUT or ./gpu_check_out)

Parts, each guarded (a failure is recorded with its one-line error and the rest still runs) and each with
a time budget (a part past its budget records the rest of its rows as skipped):

  gemm         bf16 dense GEMM peak (8192^3 matmuls on CUDA), GFLOP/s
  extraction   dinolab backbones vs transformers ``Dinov2Model`` with the same (random) weights, ViT-S/B/L/g
               at 224 and 518, bf16 autocast, eager and regionally compiled (each block): images/s, peak
               memory, max abs difference of the class token (bf16 at the benchmark batch, fp32 on 2 images)
  train_step   ViT-S/14 and ViT-L/14, 2x224 + 8x98 crops, 65,536 prototypes (the step of
               ``bench/train_step.py``): images/s, peak memory, MFU = flop-counter FLOPs / step time / bf16
               peak; variants packed/separate, varlen attention, masked drop path, fp16 + GradScaler,
               compiled, activation checkpointing
  fsdp         FSDP2 at world size 1 (a one-process gloo/nccl group): shard, step, DCP save, reload into a
               fresh sharded model, the next losses equal
  resume       ``dinolab.train.loop.train`` on a generated uint8 npz: stopped at k and resumed == uninterrupted
               (metrics.jsonl)
  convergence  a 200-iteration ViT-S/14 run through the loop; the losses fall

``--smoke``: tiny sizes everywhere (width 32, depth 2, 32 px, batch 2, 64 prototypes, 2-3 iterations), well
under a minute on CPU. Writes ``results.json`` (rewritten after every part) and ``results.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import resource
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

PARTS = ("gemm", "varlen", "extraction", "train_step", "fsdp", "resume", "convergence")
# run order: the short correctness parts before the long measurements, so a budget overrun (or the shell's
# `timeout 540`) cuts extraction rows, not the FSDP/resume/convergence verdicts
ORDER = ("gemm", "varlen", "fsdp", "resume", "convergence", "train_step", "extraction")
# seconds per part on the GPU (the whole run ~8 minutes); smoke runs get a few seconds each
BUDGET = {"gemm": 20, "varlen": 15, "extraction": 170, "train_step": 170, "fsdp": 30, "resume": 40, "convergence": 70}
TOTAL_BUDGET = 480  # new rows start only before this; the shell allows 540

# train-step variants: overrides of bench/train_step.EFFICIENT (packed, efficient drop path, bf16, eager),
# with the config key each stands for
STEP_VARIANTS = {
    "efficient": ({}, "packed, efficient drop path, bf16, eager"),
    "separate": ({"pack_crops": False}, "train.pack_crops=false"),
    "varlen": ({"varlen_attention": True}, "train.varlen_attention=true"),
    "masked-dp": ({"drop_path_mode": "mask"}, "student.drop_path_mode=mask"),
    "fp16": ({"precision": "fp16"}, "train.precision=fp16 (GradScaler)"),
    "checkpointed": ({"activation_checkpointing": True}, "train.activation_checkpointing=true"),
    "compiled": ({"compile": True}, "train.compile=true"),  # last: its compilation is what a budget cut loses
}

NO_CPU_COMPILE = "compile not run in a CPU smoke (inductor's C++ build takes minutes)"
TINY_VIT = dict(embed_dim=32, depth=2, num_heads=2, patch_size=8, img_size=32)
TINY_CFG = ["student.embed_dim=32", "student.depth=2", "student.num_heads=2", "student.patch_size=8",
            "crops.global_crops_size=32", "crops.local_crops_size=16", "crops.local_crops_number=2",
            "dino.head.n_prototypes=64", "dino.head.hidden_dim=64", "dino.head.bottleneck_dim=32",
            "ibot.head.n_prototypes=64", "ibot.head.hidden_dim=64", "ibot.head.bottleneck_dim=32"]


def one_line(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {msg[0] if msg else ''}"[:300]


class Check:
    def __init__(self, device: str, smoke: bool, out: Path) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.smoke = smoke
        self.out = out
        self.t_start = time.perf_counter()
        self.results: dict = {"meta": self.meta(), "parts": {}}
        self.bf16_peak: float | None = None

    def meta(self) -> dict:
        m = {"device": str(self.device), "smoke": self.smoke, "torch": torch.__version__,
             "python": platform.python_version(),
             "host": platform.node(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        if self.cuda:
            m["gpu"] = torch.cuda.get_device_name(0)
            m["cuda"] = torch.version.cuda
        try:
            import transformers

            m["transformers"] = transformers.__version__
        except ImportError:
            m["transformers"] = None
        return m

    # ------------------------------------------------------------ bookkeeping
    def deadline(self, part: str) -> float:
        budget = BUDGET[part]
        if self.smoke:
            budget = min(budget, 30)
        end_all = self.t_start + (TOTAL_BUDGET if not self.smoke else 110)
        return min(time.perf_counter() + budget, end_all)

    def run_part(self, name: str, fn) -> None:
        t0 = time.perf_counter()
        entry: dict = {"status": "ok"}
        try:
            entry["data"] = fn(self.deadline(name))
        except BaseException as exc:  # noqa: BLE001 - one part's failure must not stop the others
            if isinstance(exc, KeyboardInterrupt):
                raise
            entry = {"status": "error", "error": one_line(exc), "traceback": traceback.format_exc()[-3000:]}
        entry["seconds"] = round(time.perf_counter() - t0, 2)
        self.results["parts"][name] = entry
        self.cleanup()
        self.write()
        print(f"[gpu_check] {name}: {entry['status']} in {entry['seconds']} s"
              + (f" ({entry['error']})" if entry["status"] == "error" else ""), flush=True)

    def cleanup(self) -> None:
        import gc

        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def write(self) -> None:
        self.results["meta"]["seconds"] = round(time.perf_counter() - self.t_start, 2)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "results.json").write_text(json.dumps(self.results, indent=1, default=str))
        (self.out / "results.md").write_text(to_markdown(self.results))

    # ------------------------------------------------------------ measuring helpers
    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def peak_mb(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # CPU: the process's peak RSS so far

    def autocast(self, dtype=torch.bfloat16):
        return torch.autocast(self.device.type, dtype=dtype)

    def timed(self, fn, warmup: int, min_iters: int, min_seconds: float) -> float:
        """Mean seconds per call after ``warmup`` calls, over at least ``min_iters`` calls and ``min_seconds``."""
        for _ in range(warmup):
            fn()
        self.sync()
        n, t0 = 0, time.perf_counter()
        while n < min_iters or time.perf_counter() - t0 < min_seconds:
            fn()
            n += 1
            if self.cuda and n % 4 == 0 or not self.cuda:
                self.sync()
        self.sync()
        return (time.perf_counter() - t0) / n

    # ------------------------------------------------------------ a. GEMM peak
    def gemm(self, deadline: float) -> dict:
        n = 8192 if self.cuda else (256 if self.smoke else 2048)
        reps = 20 if self.cuda else 5
        a = torch.randn(n, n, device=self.device, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=self.device, dtype=torch.bfloat16)
        for _ in range(3):
            a @ b
        self.sync()
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(reps):
                a @ b
            self.sync()
            best = min(best, time.perf_counter() - t0)
            if time.perf_counter() > deadline:
                break
        flops = 2 * n**3 * reps / best
        self.bf16_peak = flops
        return {"n": n, "reps": reps, "bf16_gflops": round(flops / 1e9, 1)}

    # ------------------------------------------------------------ varlen attention equality
    def varlen(self, deadline: float) -> dict:
        """The packed crops' one-call attention (``train.varlen_attention``: torch's FlashAttention varlen kernel
        on CUDA, the nested-jagged SDPA elsewhere) against per-group attention: values and input gradients, and
        the time of each (ViT-S/14 widths: 2x8 global crops of 257 tokens + 8x8 local crops of 50)."""
        from dinolab.layers.attention import Attention, _flash_varlen

        dim, heads = (384, 6) if not self.smoke else (32, 2)
        shapes = [(16, 257), (64, 50)] if not self.smoke else [(2, 17), (4, 5)]
        torch.manual_seed(0)
        attn = Attention(dim, heads).to(self.device)
        x = torch.randn(sum(b * t for b, t in shapes), dim, device=self.device)
        dtype = torch.bfloat16 if self.cuda else torch.float32
        results, timings = {}, {}
        for varlen in (False, True):
            attn.varlen = varlen
            xi = x.clone().requires_grad_(True)
            with torch.autocast(self.device.type, dtype=dtype, enabled=self.cuda):
                out = attn.forward_packed(xi, shapes)
            out.float().square().mean().backward()
            results[varlen] = (out.detach().float(), xi.grad.detach().float())
            self.sync()
            t0 = time.perf_counter()
            for _ in range(10):
                with torch.autocast(self.device.type, dtype=dtype, enabled=self.cuda):
                    attn.forward_packed(xi, shapes).float().square().mean().backward()
            self.sync()
            timings[varlen] = (time.perf_counter() - t0) / 10
        kernel = "flash varlen_attn" if (self.cuda and _flash_varlen() is not None) else "nested-jagged SDPA"
        return {
            "kernel": kernel, "dtype": str(dtype).removeprefix("torch."),
            "max_abs_diff_out": float((results[True][0] - results[False][0]).abs().max()),
            "max_abs_diff_grad": float((results[True][1] - results[False][1]).abs().max()),
            "per_group_ms": round(1e3 * timings[False], 3), "varlen_ms": round(1e3 * timings[True], 3),
            "varlen_speedup": round(timings[False] / timings[True], 3),
        }

    # ------------------------------------------------------------ b. extraction
    def extraction(self, deadline: float) -> dict:
        import dinolab
        from dinolab.models.hf import to_hf_model

        try:
            import transformers  # noqa: F401

            hf_note = None
        except ImportError as exc:
            hf_note = f"transformers not importable ({one_line(exc)}): HF columns skipped"
        if self.smoke:
            archs = {"tiny": None}
            sizes, batches = [32], {("tiny", 32): 2}
        else:
            archs = {"vits14": dinolab.dinov2_vits14, "vitb14": dinolab.dinov2_vitb14,
                     "vitl14": dinolab.dinov2_vitl14, "vitg14": dinolab.dinov2_vitg14}
            sizes = [224, 518]
            batches = {(a, s): 256 if (a, s) == ("vits14", 224) else 64 for a in archs for s in sizes}
        compile_ok = not (self.smoke and not self.cuda)
        rows: list[dict] = []
        # eager rows first (every arch), then the compiled ones, so a budget overrun loses compiled rows only
        for compiled in (False, True):
            for arch, build in archs.items():
                pending = [(s, batches[(arch, s)]) for s in sizes]
                if compiled and not compile_ok:
                    rows += [{"arch": arch, "size": s, "batch": bs, "compiled": True,
                              "skipped": NO_CPU_COMPILE}
                             for s, bs in pending]
                    continue
                if time.perf_counter() > deadline:
                    rows += [{"arch": arch, "size": s, "batch": bs, "compiled": compiled,
                              "skipped": "part budget spent"}
                             for s, bs in pending]
                    continue
                try:
                    ours, hf = self.build_pair(arch, build, to_hf_model, hf_note is None)
                except Exception as exc:  # noqa: BLE001
                    rows += [{"arch": arch, "size": s, "batch": bs, "compiled": compiled, "error": one_line(exc)}
                             for s, bs in pending]
                    continue
                if compiled:
                    for blk in ours.blocks:
                        blk.compile(dynamic=False)
                    if hf is not None:
                        for layer in hf.encoder.layer:
                            layer.compile(dynamic=False)
                for size, bs in pending:
                    row = {"arch": arch, "size": size, "batch": bs, "compiled": compiled}
                    if time.perf_counter() > deadline:
                        rows.append({**row, "skipped": "part budget spent"})
                        continue
                    rows.append(self.extraction_row(row, ours, hf, hf_note))
                    self.results["parts"]["extraction"] = {"status": "running", "data": {"rows": rows}}
                    self.write()
                del ours, hf
                self.cleanup()
        return {"rows": rows, "note": hf_note,
                "interpolation": "dinolab built with interpolate_offset=0: HF's exact resampling at 224"}

    def build_pair(self, arch, build, to_hf_model, with_hf: bool):
        from dinolab.models.vit import DinoVisionTransformer

        torch.manual_seed(0)
        ctx = torch.device(self.device) if self.cuda else contextlib.nullcontext()
        with ctx:
            if build is None:
                ours = DinoVisionTransformer(**TINY_VIT, init_values=1.0, interpolate_offset=0.0)
            else:
                ours = build(weights=None, interpolate_offset=0.0)
            ours = ours.to(self.device).eval()
        hf = None
        if with_hf:
            try:
                with ctx:
                    hf = to_hf_model(ours).to(self.device).eval()
            except Exception:  # noqa: BLE001 - built on the CPU then (slower to initialise, the same weights)
                hf = to_hf_model(ours.cpu()).to(self.device).eval()
                ours.to(self.device)
        return ours, hf

    def extraction_row(self, row: dict, ours, hf, hf_note) -> dict:
        size, bs = row["size"], row["batch"]
        x = torch.randn(bs, 3, size, size, device=self.device)
        warmup, iters, secs = (1, 2, 0.0) if self.smoke else ((3 if row["compiled"] else 2), 3, 1.5)

        def run_ours():
            return ours.forward_features(x)["x_norm_clstoken"]

        def run_hf():
            return hf(pixel_values=x).pooler_output

        out = dict(row)
        for name, fn in (("dinolab", run_ours), ("hf", run_hf)):
            if name == "hf" and hf is None:
                out["hf_note"] = hf_note
                continue
            try:
                self.cleanup()
                self.reset_peak()
                with torch.inference_mode(), self.autocast():
                    dt = self.timed(fn, warmup, iters, secs)
                out[f"{name}_images_per_s"] = round(bs / dt, 2)
                out[f"{name}_peak_mb"] = round(self.peak_mb(), 1)
            except Exception as exc:  # noqa: BLE001
                out[f"{name}_error"] = one_line(exc)
                self.cleanup()
        if hf is not None:
            try:
                with torch.inference_mode():
                    with self.autocast():
                        out["max_abs_diff_cls_bf16"] = (run_ours().float() - run_hf().float()).abs().max().item()
                    if not row["compiled"]:  # (another batch would recompile every block)
                        x2 = x[:2].float()
                        a = ours.forward_features(x2)["x_norm_clstoken"]
                        b = hf(pixel_values=x2).pooler_output
                        out["max_abs_diff_cls_fp32"] = (a - b).abs().max().item()
            except Exception as exc:  # noqa: BLE001
                out["diff_error"] = one_line(exc)
        if "dinolab_images_per_s" in out and "hf_images_per_s" in out:
            out["ratio_dinolab_to_hf"] = round(out["dinolab_images_per_s"] / out["hf_images_per_s"], 3)
        return out

    # ------------------------------------------------------------ c. the training step
    def train_step(self, deadline: float) -> dict:
        from torch.utils.flop_counter import FlopCounterMode

        from train_step import build_step

        if self.smoke:
            archs = {"vit_small": 2}
            extra = tuple(TINY_CFG)
            warmup, steps = 1, 2
        else:
            archs = {"vit_small": 64, "vit_large": 32}
            extra = ()
            warmup, steps = 3, 5
        peak = self.bf16_peak
        rows = []
        for k, (arch, batch0) in enumerate(archs.items()):
            flops = None
            # each arch its share of what is left (ViT-S's variants must not eat ViT-L's time)
            arch_deadline = time.perf_counter() + (deadline - time.perf_counter()) / (len(archs) - k)
            for name, (over, desc) in STEP_VARIANTS.items():
                row = {"arch": arch, "variant": name, "overrides": desc}
                if name == "compiled" and self.smoke and not self.cuda:
                    rows.append({**row, "skipped": NO_CPU_COMPILE})
                    continue
                if time.perf_counter() > arch_deadline:
                    rows.append({**row, "skipped": "part budget spent"})
                    continue
                batch = batch0
                while True:
                    row["batch"] = batch
                    try:
                        self.cleanup()
                        self.reset_peak()
                        step, meta, _ = build_step(over, arch, batch, 0.4, device=str(self.device), extra=extra,
                                                   keep_memory=not self.cuda)
                        dt = self.timed(lambda it=iter(range(10**6)): step(next(it)), warmup, steps, 0.0)
                        row["images_per_s"] = round(batch / dt, 2)
                        row["seconds_per_step"] = round(dt, 4)
                        row["peak_mb"] = round(self.peak_mb(), 1)
                        if flops is None and name == "efficient":
                            with FlopCounterMode(display=False) as counter:
                                step(0)
                            row["flops_per_step"] = counter.get_total_flops()
                            flops = row["flops_per_step"] / batch  # per image: variants may run another batch
                        if flops is not None and peak:
                            row["mfu"] = round(flops * batch / dt / peak, 4)
                        del step, meta
                        break
                    except torch.cuda.OutOfMemoryError as exc:
                        self.cleanup()
                        if batch <= 4:
                            row["error"] = one_line(exc)
                            break
                        batch //= 2
                    except Exception as exc:  # noqa: BLE001
                        row["error"] = one_line(exc)
                        break
                rows.append(row)
                self.results["parts"]["train_step"] = {"status": "running", "data": {"rows": rows}}
                self.write()
                self.cleanup()
        eff = {r["arch"]: r for r in rows if r["variant"] == "efficient" and "images_per_s" in r}
        for r in rows:
            if "images_per_s" in r and r["arch"] in eff:
                r["ratio_to_efficient"] = round(r["images_per_s"] / eff[r["arch"]]["images_per_s"], 3)
        return {"rows": rows, "bf16_peak_gflops": peak and round(peak / 1e9, 1),
                "crops": "2x32 + 2x16 (smoke)" if self.smoke else "2x224 + 8x98",
                "prototypes": 64 if self.smoke else 65536,
                "mfu": "flop-counter FLOPs of one efficient step (per image x batch) / mean step time / bf16 peak"}

    # ------------------------------------------------------------ d. FSDP2, resume, convergence
    @contextlib.contextmanager
    def process_group(self):
        import torch.distributed as dist

        if dist.is_initialized():
            yield
            return
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        backend = "nccl" if self.cuda else "gloo"
        kwargs = {"device_id": torch.device("cuda", 0)} if self.cuda else {}
        if self.cuda:
            torch.cuda.set_device(0)
        dist.init_process_group(backend, **kwargs)
        try:
            yield
        finally:
            dist.destroy_process_group()
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def fsdp(self, deadline: float) -> dict:
        from torch.distributed.fsdp import FSDPModule

        from dinolab.distributed.checkpoint import load_dcp, save_dcp
        from dinolab.distributed.fsdp import shard_meta_arch
        from train_step import build_step

        precision = "bf16"
        if self.smoke:
            arch, batch, extra = "vit_small", 2, tuple(TINY_CFG)
        else:
            arch, batch = "vit_small", 16
            extra = ("crops.global_crops_size=112", "crops.local_crops_size=56", "crops.local_crops_number=4",
                     "dino.head.n_prototypes=8192", "ibot.head.n_prototypes=8192")
        with self.process_group(), tempfile.TemporaryDirectory() as tmp:
            def sharded():
                step, meta, cfg = build_step({}, arch, batch, 0.1, device=str(self.device), extra=extra,
                                             keep_memory=False)
                shard_meta_arch(meta, self.device, precision)
                from dinolab.train.loop import build_optimizer

                opt = build_optimizer(meta, cfg)
                return meta, opt, cfg

            from dinolab.train.loop import schedule_config
            from dinolab.train.schedules import schedule_values
            from dinolab.train.step import train_step
            from train_step import synthetic_batch

            meta, opt, cfg = sharded()
            n_sharded = sum(isinstance(m, FSDPModule) for m in meta.modules())
            sched = schedule_values(schedule_config(cfg, batch), 5)
            data = {k: t.to(self.device) if torch.is_tensor(t) else t for k, t in synthetic_batch(cfg, batch).items()}

            def steps(meta, opt, its):
                return [train_step(meta, opt, data, sched, i, precision, cfg.optim.clip_grad)["total"] for i in its]

            first = steps(meta, opt, [0, 1])
            path = save_dcp(Path(tmp) / "dcp_2", meta, opt, {"iteration": 2})
            torch.manual_seed(123)
            cont = steps(meta, opt, [2, 3])
            del meta, opt
            meta2, opt2, _ = sharded()
            state = load_dcp(path, meta2, opt2)
            torch.manual_seed(123)
            resumed = steps(meta2, opt2, [2, 3])
        diff = max(abs(a - b) for a, b in zip(cont, resumed))
        tol = 1e-3 * max(1.0, abs(cont[0])) if self.cuda else 1e-5
        if not diff <= tol:
            raise AssertionError(f"DCP reload changed the next losses: {cont} vs {resumed} (max diff {diff:.3g})")
        return {"world_size": 1, "precision": precision, "fsdp_modules": n_sharded, "losses_before_save": first,
                "next_losses": cont, "next_losses_after_reload": resumed, "max_abs_diff": diff,
                "reloaded_iteration": state.get("iteration"), "equal": True}

    def npz(self, folder: Path, n: int, size: int) -> Path:
        """Random low-frequency uint8 images (learnable structure, not white noise)."""
        rng = np.random.default_rng(0)
        small = rng.integers(0, 256, size=(n, 4, 4, 3)).astype(np.float32)
        big = np.kron(small, np.ones((1, size // 4, size // 4, 1), dtype=np.float32))
        noise = rng.normal(0, 12, size=big.shape)
        path = folder / "images.npz"
        np.savez(path, images=np.clip(big + noise, 0, 255).astype(np.uint8))
        return path

    def loop_overrides(self, data: Path, tiny: bool) -> list[str]:
        dev = "cuda" if self.cuda else "cpu"
        common = [f"data.path={data}", f"train.device={dev}", "train.log_every=1", "train.knn_every=0",
                  f"train.num_workers={0 if self.smoke else 8}", "optim.epoch_length=20", "optim.epochs=10",
                  "optim.warmup_epochs=1", "teacher.warmup_teacher_temp_epochs=2", "train.keep_freed_memory=false"]
        if tiny:
            return common + ["student.arch=vit_small", "train.batch_size_per_gpu=2", "student.layerscale=1.0",
                             *TINY_CFG]
        return common + ["student.arch=vit_small", "student.patch_size=14", "train.batch_size_per_gpu=16",
                         "crops.global_crops_size=112", "crops.local_crops_size=56", "crops.local_crops_number=4",
                         "dino.head.n_prototypes=4096", "ibot.head.n_prototypes=4096", "student.drop_path_rate=0.1"]

    @staticmethod
    def losses(run: Path) -> dict[int, float]:
        out = {}
        for line in (run / "metrics.jsonl").read_text().splitlines():
            r = json.loads(line)
            if "total" in r:
                out[r["iteration"]] = r["total"]
        return out

    def resume(self, deadline: float) -> dict:
        from dinolab.configs import load_config
        from dinolab.train.loop import train

        n, k = (3, 2) if self.smoke else (8, 4)
        with self.process_group(), tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            data = self.npz(tmp, 16 if self.smoke else 64, 32 if self.smoke else 64)
            over = self.loop_overrides(data, tiny=self.smoke or not self.cuda) + [f"train.checkpoint_every={k}"]
            train(load_config(None, over + [f"train.max_iters={n}"]), tmp / "full", progress=False)
            train(load_config(None, over + [f"train.max_iters={k}"]), tmp / "split", progress=False)
            train(load_config(None, over + [f"train.max_iters={n}"]), tmp / "split", progress=False)
            full, split = self.losses(tmp / "full"), self.losses(tmp / "split")
            ckpts = sorted(p.name for p in (tmp / "split" / "checkpoints").iterdir())
        after = [i for i in range(k + 1, n + 1)]
        diff = max(abs(full[i] - split[i]) for i in after)
        tol = 1e-3 * max(1.0, abs(full[after[0]])) if self.cuda else 1e-6
        if not diff <= tol:
            raise AssertionError(f"resumed losses differ from the uninterrupted run by {diff:.3g} at {after}")
        return {"iterations": n, "stopped_at": k, "compared": after, "full": [full[i] for i in after],
                "resumed": [split[i] for i in after], "max_abs_diff": diff, "equal": True, "checkpoints": ckpts,
                "note": "world size 1: train() runs unsharded (parallelize is a no-op in one process); "
                        "FSDP2 + DCP at world size 1 is the 'fsdp' part"}

    def convergence(self, deadline: float) -> dict:
        from dinolab.configs import load_config
        from dinolab.train.loop import train

        iters = 3 if self.smoke else 200
        with self.process_group(), tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            data = self.npz(tmp, 16 if self.smoke else 512, 32 if self.smoke else 64)
            over = self.loop_overrides(data, tiny=self.smoke) + [f"train.max_iters={iters}", "train.checkpoint_every=0"]
            t0 = time.perf_counter()
            summary = train(load_config(None, over), tmp / "run", progress=False)
            seconds = time.perf_counter() - t0
            losses = self.losses(tmp / "run")
        its = sorted(losses)
        w = max(1, min(10, len(its) // 4))
        first = sum(losses[i] for i in its[:w]) / w
        last = sum(losses[i] for i in its[-w:]) / w
        return {"iterations": len(its), "seconds": round(seconds, 1), "first_mean": first, "last_mean": last,
                "falls": last < first, "images_per_second": summary.get("images_per_second"),
                "arch": "tiny (smoke)" if self.smoke else "ViT-S/14, 2x112 + 4x56, 4096 prototypes, batch 16"}


# ---------------------------------------------------------------- report
def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.4g}"
    return str(v)


def _table(rows: list[dict], cols: list[str]) -> str:
    cols = [c for c in cols if any(c in r for r in rows)]
    lines = ["| " + " | ".join(cols) + " | note |", "|" + "---|" * (len(cols) + 1)]
    for r in rows:
        note = "; ".join(str(r[k]) for k in r if k.endswith("error") or k in ("skipped", "hf_note"))
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + f" | {note} |")
    return "\n".join(lines)


def to_markdown(res: dict) -> str:
    m = res["meta"]
    out = [f"# GPU check: {m.get('gpu', m['device'])}{' (smoke)' if m['smoke'] else ''}", "",
           f"torch {m['torch']}, transformers {m.get('transformers')}, python {m['python']}, "
           f"started {m['started']}, {m.get('seconds')} s", ""]
    out += ["| part | status | seconds | error |", "|---|---|---|---|"]
    for name in PARTS:
        p = res["parts"].get(name)
        if p is None:
            out.append(f"| {name} | not run | | |")
        else:
            out.append(f"| {name} | {p['status']} | {p.get('seconds', '')} | {p.get('error', '')} |")
    parts = res["parts"]
    g = parts.get("gemm", {}).get("data")
    if g:
        out += ["", f"bf16 GEMM peak: {g['bf16_gflops']} GFLOP/s ({g['n']}^3, {g['reps']} reps)"]
    e = parts.get("extraction", {}).get("data")
    if e:
        out += ["", "## Extraction (bf16 autocast)", "", _table(e["rows"], [
            "arch", "size", "batch", "compiled", "dinolab_images_per_s", "hf_images_per_s", "ratio_dinolab_to_hf",
            "dinolab_peak_mb", "hf_peak_mb", "max_abs_diff_cls_bf16", "max_abs_diff_cls_fp32"])]
        if e.get("note"):
            out += ["", e["note"]]
    t = parts.get("train_step", {}).get("data")
    if t:
        out += ["", f"## Training step ({t.get('crops')} crops, {t.get('prototypes')} prototypes)", "",
                _table(t["rows"], ["arch", "variant", "overrides", "batch", "images_per_s", "ratio_to_efficient",
                                   "seconds_per_step", "peak_mb", "mfu"])]
    for name in ("fsdp", "resume", "convergence"):
        d = parts.get(name, {}).get("data")
        if d:
            out += ["", f"## {name}", "", "```", json.dumps(d, indent=1, default=str), "```"]
    return "\n".join(out) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    p.add_argument("--smoke", action="store_true", help="tiny sizes everywhere (seconds on a CPU)")
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out")
    p.add_argument("--only", nargs="*", choices=PARTS, default=list(PARTS))
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device visible to torch")
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.smoke and args.device == "cpu":
        # tiny ops gain nothing from threads, and on a shared CPU the OpenMP barriers of 2 threads cost ~50x
        torch.set_num_threads(1)
    check = Check(args.device, args.smoke, Path(args.out))
    check.write()
    for name in ORDER:
        if name in args.only:
            check.run_part(name, getattr(check, name))
    check.write()
    print((check.out / "results.md").read_text())


if __name__ == "__main__":
    main()
