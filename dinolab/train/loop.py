"""The training loop of ``dinolab train``: data, model, schedules, checkpoints, logging, k-NN.

:func:`train` takes a validated :class:`~dinolab.configs.schema.Config` and a run directory and
returns the run's summary. A directory that already holds a checkpoint of the same config resumes
from it exactly (model, teacher, optimizer, schedules, sampler position, RNG state), so the losses
after a resume equal those of an uninterrupted run. SIGINT/SIGTERM write a checkpoint and return.
A NaN/Inf loss raises ``FloatingPointError`` naming the iteration and term; the last good
checkpoint stays.

Launched by ``torchrun --nproc_per_node=N`` the same function trains data-parallel (FSDP2 or DDP,
``train.distributed``): every rank draws its own ``train.batch_size_per_gpu`` images (a rank-aware
sampler), the lr is scaled by the global batch, checkpoints are ``torch.distributed.checkpoint``
directories that resume on any number of ranks (one included), and only rank 0 logs, plots, evaluates,
exports and prints. Signals and non-finite losses stop every rank at the same iteration.
"""

from __future__ import annotations

import json
import shutil
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from dinolab.configs.schema import Config, load_config, to_yaml
from dinolab.data.datasets import open_dataset, open_labelled
from dinolab.data.loader import build_loader
from dinolab.data.samplers import InfiniteSampler
from dinolab.distributed.checkpoint import gather_backbone, is_dcp_dir, load_dcp, load_full_state, save_dcp
from dinolab.distributed.env import (
    DistEnv,
    all_gather_objects,
    barrier,
    init_distributed,
    max_over_ranks,
    mean_over_ranks,
    shutdown,
)
from dinolab.distributed.fsdp import parallelize, unwrap, unwrapped_side
from dinolab.utils.io import atomic_write_json, atomic_write_text
from dinolab.models.checkpoints import save_backbone
from dinolab.train.checkpointer import Checkpointer, load_meta_weights, read_model_state
from dinolab.train.host_memory import keep_freed_memory
from dinolab.train.loggers import check_available as check_loggers_available
from dinolab.models.vit import DinoVisionTransformer
from dinolab.train.meta_arch import SSLMetaArch
from dinolab.train.monitor import KnnMonitor
from dinolab.train.param_groups import ParamGroupConfig, build_param_groups
from dinolab.train.schedules import ScheduleConfig, scale_lr, schedule_values
from dinolab.train.step import train_step
from dinolab.utils.runtime import check_compiler, compile_blocks, resolve_device, resolve_precision

# Settings that may change between a run and its resume without changing its results.
_RESUME_FREE = {"train.max_iters", "train.num_workers", "train.log_every", "train.device", "train.knn_every",
                "train.distributed", "train.checkpoint_every", "train.keep_last", "train.loggers",
                # how the same step is executed (a resumed run may need another, e.g. no C++ compiler there)
                "train.compile", "train.keep_freed_memory", "train.varlen_attention", "train.activation_checkpointing"}


# ------------------------------------------------------------------ setup
def schedule_config(cfg: Config, global_batch: int) -> ScheduleConfig:
    """Every schedule of ``cfg`` in iterations; the lr scaled by the global batch."""
    o, t = cfg.optim, cfg.teacher
    to_iters = o.to_iters  # epochs -> iterations (compressed for high-resolution adaptation)
    base_lr = o.base_lr * o.base_lr_scale
    base_lr = scale_lr(base_lr, global_batch) if o.scaling_rule == "sqrt_wrt_1024" else base_lr
    return ScheduleConfig(
        total_iters=o.total_iters,
        warmup_iters=to_iters(o.warmup_epochs),
        base_lr=base_lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        weight_decay_end=o.weight_decay_end,
        momentum_teacher=t.momentum_teacher,
        final_momentum_teacher=t.final_momentum_teacher,
        warmup_teacher_temp=t.warmup_teacher_temp,
        teacher_temp=t.teacher_temp,
        warmup_teacher_temp_iters=min(to_iters(t.warmup_teacher_temp_epochs), o.total_iters),
        freeze_last_layer_iters=to_iters(o.freeze_last_layer_epochs),
    )


def build_meta_arch(cfg: Config) -> SSLMetaArch:
    """The self-supervised meta-architecture, the distillation one when ``distill.teacher_checkpoint`` is set,
    or the adaptation one (head warm-up, feature anchor) when ``adapt.weights`` is."""
    if cfg.distill.enabled:
        from dinolab.train.distill import DistillMetaArch

        return DistillMetaArch.from_config(cfg)
    if cfg.adapt.enabled:
        from dinolab.train.adapt import AdaptMetaArch

        return AdaptMetaArch.from_config(cfg)
    return SSLMetaArch.from_config(cfg)


def compile_backbones(meta: SSLMetaArch, device: torch.device | None = None) -> None:
    """``torch.compile`` every transformer block of every backbone in place (``train.compile``).

    On CPU, inductor compiles C++: without a compiler on the PATH this stops here, in one line.
    """
    if device is not None:
        check_compiler(device)
    compile_blocks(m for m in meta.modules() if isinstance(m, DinoVisionTransformer))


def build_optimizer(meta: SSLMetaArch, cfg: Config) -> torch.optim.AdamW:
    """AdamW over the student's parameter groups (after sharding: FSDP replaces the parameters)."""
    groups = build_param_groups(
        unwrapped_side(meta.student),
        ParamGroupConfig(layer_decay=cfg.optim.layerwise_decay, patch_embed_lr_mult=cfg.optim.patch_embed_lr_mult),
    )
    # fused where parameters are plain tensors (one kernel per group; measured no change in peak memory
    # on the ViT-S/14 bench); sharded DTensor parameters take foreach
    fused = not any(isinstance(p, DTensor) for g in groups for p in g["params"])
    return torch.optim.AdamW(
        groups, betas=(cfg.optim.adamw_beta1, cfg.optim.adamw_beta2), fused=fused, foreach=not fused
    )


def _config_diff(saved: Config, new: Config) -> list[str]:
    from omegaconf import OmegaConf

    def flat(c: Config) -> dict:
        out = {}

        def walk(node, prefix):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.") if isinstance(v, dict) else out.__setitem__(f"{prefix}{k}", v)

        walk(OmegaConf.to_container(OmegaConf.structured(c)), "")
        return out

    a, b = flat(saved), flat(new)
    return [f"{k}: {a.get(k)} -> {b.get(k)}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and k not in _RESUME_FREE]


# ------------------------------------------------------------------ logging
class RunLog:
    """Metrics as JSON lines (``metrics.jsonl``, always: resume and the plots read it) fanned out to the other
    ``train.loggers`` (TensorBoard ``tb/``, Weights & Biases, MLflow: :mod:`dinolab.train.loggers`).

    ``purge_step``: on resume (not None), TensorBoard drops the events a killed run wrote past its checkpoint,
    and W&B and MLflow continue the run folder's run.
    """

    def __init__(self, run_dir: Path, purge_step: int | None = None, loggers=("jsonl", "tensorboard"),
                 config: Config | None = None) -> None:
        import dataclasses

        from dinolab.train.loggers import open_loggers

        self.path = run_dir / "metrics.jsonl"
        config_dict = dataclasses.asdict(config) if config is not None else {}
        self.loggers = open_loggers(loggers, run_dir, config_dict, purge_step)

    def write(self, record: dict) -> None:
        for logger in self.loggers:
            logger.log_scalars(record, record["iteration"])

    def records(self) -> list[dict]:
        """Every complete record; a partial last line (a process killed while writing it) is left out."""
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # only the last line can be partial: appends are whole lines otherwise
        return [r for r in out if isinstance(r, dict) and "iteration" in r]

    def truncate_after(self, iteration: int) -> None:
        """Drop records past ``iteration`` (written after the checkpoint we resume from) and any partial line."""
        kept = [r for r in self.records() if r["iteration"] <= iteration]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def finish(self, summary: dict, *artifacts: Path) -> None:
        """The run's summary and files (plots, ``summary.json``) to the loggers that keep them."""
        for logger in self.loggers:
            logger.log_summary(summary)
            for path in artifacts:
                if path.exists():
                    logger.log_artifact(path)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


@contextmanager
def _stop_on_signals():
    """Turn SIGINT/SIGTERM into a signal number (0: none) the loop checks after each iteration."""
    flag = {"signum": 0}

    def handler(signum, frame):
        flag["signum"] = int(signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# ------------------------------------------------------------------ checkpoints
def _state(meta, optimizer, sampler, iteration, consumed, extra) -> dict:
    return {
        "iteration": iteration,
        "model": meta.state_dict(),
        "optimizer": optimizer.state_dict(),
        "sampler": sampler.state_dict(consumed=consumed),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": _cuda_rng_state(),
        "extra": extra,
    }


def _cuda_rng_state() -> torch.Tensor | None:
    """The current CUDA device's RNG state (drop path draws its subsets there on a GPU), or None."""
    return torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None


def _train_state(meta, sampler, iteration, consumed, extra) -> dict:
    """What a DCP checkpoint stores besides model and optimizer (a collective: gathers every rank's RNG)."""
    ema_name = next(name for name, module in meta.named_children() if module is meta.ema)
    return {
        "iteration": iteration,
        "sampler": sampler.state_dict(consumed=consumed),
        "torch_rng": all_gather_objects(torch.get_rng_state()),
        "cuda_rng": all_gather_objects(_cuda_rng_state()),
        "extra": extra,
        "export_prefix": f"{ema_name}.backbone.",
        "export_arch": unwrap(meta.export_backbone).arch_kwargs,
    }


def _save(
    ckpt: Checkpointer, meta, optimizer, sampler, iteration: int, per_rank_batch: int, extra: dict, env: DistEnv
) -> Path:
    consumed = iteration * per_rank_batch  # by this rank's sampler
    if not env.distributed:
        return ckpt.save(_state(meta, optimizer, sampler, iteration, consumed, extra), iteration)
    path = save_dcp(ckpt.dcp_path(iteration), meta, optimizer, _train_state(meta, sampler, iteration, consumed, extra))
    if env.is_main:
        ckpt.prune()
    return path


def resharded_sampler_state(saved: dict, sampler: InfiniteSampler) -> dict:
    """A sampler state saved by a run on ``W`` ranks, for ``sampler`` (rank r of ``W'``): the same
    global position, ``position * W / W'`` items per rank. Exact for ``W' == W``; otherwise the run
    continues the same epoch permutation from (about) the same global offset."""
    return {
        **saved,
        "rank": sampler.rank,
        "world_size": sampler.world_size,
        "position": saved["position"] * saved["world_size"] // sampler.world_size,
    }


def _resume(path: Path, state: dict | None, meta, optimizer, sampler: InfiniteSampler, cfg: Config,
            env: DistEnv) -> tuple[int, dict]:
    """Load a checkpoint into this run (any number of ranks); -> (iteration, extra). ``state``: the file's
    content as :meth:`Checkpointer.latest_intact` read it (``None`` for a DCP directory)."""
    if is_dcp_dir(path):
        state = load_dcp(path, meta, optimizer)
        rng_states, cuda_states = state["torch_rng"], state.get("cuda_rng") or []
    else:
        if env.distributed:
            load_full_state(meta, optimizer, state["model"], state["optimizer"])
        else:
            meta.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        rng_states, cuda_states = [state["torch_rng"]], [state.get("cuda_rng")]
    sampler.load_state_dict(resharded_sampler_state(state["sampler"], sampler))
    if len(rng_states) == env.world_size:
        torch.set_rng_state(rng_states[env.rank])
        if len(cuda_states) == env.world_size and cuda_states[env.rank] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(cuda_states[env.rank])
    else:  # another number of ranks: a fresh stream per rank (drop-path subsets only)
        torch.manual_seed(cfg.train.seed + 1 + env.rank + 1_000_003 * state["iteration"])
    return state["iteration"], state["extra"]


# ------------------------------------------------------------------ the loop
def _knn_wanted(cfg: Config) -> bool:
    return not (cfg.data.eval_path is None and cfg.data.path is not None)


def _knn_monitor(cfg: Config, device: torch.device, precision: str) -> KnnMonitor | None:
    if not _knn_wanted(cfg):
        return None
    data = open_labelled(cfg.data.eval_path, image_size=cfg.data.builtin_image_size)  # None: the embedded digits
    size = cfg.train.knn_image_size or cfg.crops.global_crops_size
    return KnnMonitor(data, image_size=size, k=cfg.train.knn_k, bf16=precision == "bf16")


def _evaluate(monitor: KnnMonitor | None, meta) -> dict | None:
    """k-NN of the exported backbone on rank 0 (gathered first when sharded: every rank calls this)."""
    backbone = gather_backbone(meta.export_backbone)
    return monitor(backbone) if monitor is not None and backbone is not None else None


def train(cfg: Config, run_dir: str | Path, resume: bool = True, progress: bool = True) -> dict:
    """Train (or resume) the run in ``run_dir``; returns the summary written to ``summary.json``.

    Under ``torchrun`` (several processes) it joins the process group first and leaves it at the end.
    """
    env = init_distributed(backend="gloo" if cfg.train.device == "cpu" else None)  # auto: NCCL where CUDA is
    try:
        summary = _train(cfg, Path(run_dir), resume, progress, env)
    except BaseException:
        shutdown(env)
        raise
    shutdown(env, synchronize=True)
    return summary


def _check_sources(cfg: Config) -> None:
    """Checkpoints the run starts from must exist before anything is written."""
    sources = {"distill.teacher_checkpoint": cfg.distill.teacher_checkpoint, "train.init_from": cfg.train.init_from}
    for key, path in sources.items():
        if path is not None and not Path(path).exists():
            raise FileNotFoundError(f"{key}: checkpoint {path} does not exist")


def _train(cfg: Config, run_dir: Path, resume: bool, progress: bool, env: DistEnv) -> dict:
    _check_sources(cfg)
    check_loggers_available(cfg.train.loggers)  # a missing wandb/mlflow package: one line, before any work
    device = resolve_device(cfg.train.device, env.local_rank)
    precision = resolve_precision(cfg.train.precision, device)
    images = open_dataset(cfg.data.path)  # bad input stops here, before the run folder is made
    if cfg.train.batch_size_per_gpu * env.world_size > len(images):
        raise ValueError(f"train.batch_size_per_gpu={cfg.train.batch_size_per_gpu} x {env.world_size} process(es) "
                         f"is larger than the {len(images)} images of {cfg.data.path or 'the embedded set'}")
    if cfg.train.keep_freed_memory:
        keep_freed_memory()
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpointer(run_dir, cfg.train.keep_last)
    if env.is_main:
        ckpt.remove_stale_temps()  # of writes a killed run left behind
    barrier()  # every rank sees the same checkpoints
    found = ckpt.latest_intact() if resume else None
    latest, latest_state = found if found is not None else (None, None)
    if latest is None and env.is_main:  # from scratch: an older run's checkpoints and curves would be mixed in
        if not resume:
            ckpt.prune(keep=0)
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
        shutil.rmtree(run_dir / "tb", ignore_errors=True)
    if latest is not None:
        saved = load_config(str(run_dir / "config.yaml"))
        diff = _config_diff(saved, cfg)
        if diff:
            raise ValueError(f"{run_dir} holds a run with another config ({'; '.join(diff[:3])}): use a new --output")
    if env.is_main:
        atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))

    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    loader, sampler = build_loader(cfg, images, env.rank, env.world_size)
    meta = build_meta_arch(cfg).to(device)
    if cfg.train.init_from and latest is None:
        load_meta_weights(meta, read_model_state(cfg.train.init_from), name=f"train.init_from={cfg.train.init_from}")
    parallelize(meta, cfg.train.distributed, device, precision)
    if cfg.train.compile:
        compile_backbones(meta, device)
    if env.distributed:
        torch.manual_seed(cfg.train.seed + 1 + env.rank)  # each rank draws its own drop-path subsets
    optimizer = build_optimizer(meta, cfg)
    scaler = _grad_scaler(device, precision, env, cfg.train.distributed)
    B = cfg.train.batch_size_per_gpu
    global_batch = B * env.world_size
    sched_cfg = schedule_config(cfg, global_batch)
    monitor = _knn_monitor(cfg, device, precision) if env.is_main else None

    start, extra = 0, {"knn_top1_init": None, "train_seconds": 0.0}
    if latest is not None:
        start, extra = _resume(latest, latest_state, meta, optimizer, sampler, cfg, env)
    log = RunLog(run_dir, purge_step=start + 1 if latest is not None else None, loggers=cfg.train.loggers,
                 config=cfg) if env.is_main else None
    if latest is not None:
        if log is not None:
            log.truncate_after(start)
            print(f"resuming {run_dir} from iteration {start} ({latest.name}) on {env.world_size} process(es)")
    elif _knn_wanted(cfg):
        knn = _evaluate(monitor, meta)
        if knn is not None:
            extra["knn_top1_init"] = knn["knn_top1"]
            log.write({"iteration": 0, **knn})

    end = min(sched_cfg.total_iters, cfg.train.max_iters or sched_cfg.total_iters)
    meta.train()
    last_saved, it, interrupted = None, start, None
    show = progress and env.is_main
    bar = tqdm(total=end, initial=start, desc="train", unit="it", disable=not show, dynamic_ncols=True)
    t0 = time.perf_counter()
    seconds_at_start = extra["train_seconds"]
    with _stop_on_signals() as stop:
        data = iter(loader)
        for it in range(start, end):
            batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in next(data).items()}
            sched = schedule_values(sched_cfg, it)
            losses = train_step(meta, optimizer, batch, sched, it, precision, cfg.optim.clip_grad, scaler)
            done = it + 1
            bar.update(1)
            bar.set_postfix({k: f"{v:.3f}" for k, v in losses.items()}, refresh=False)
            if done % cfg.train.log_every == 0 or done == end:
                losses = mean_over_ranks(losses)  # this rank's terms -> the global batch's
                if log is not None:
                    elapsed = extra["train_seconds"] + time.perf_counter() - t0
                    log.write({"iteration": done, **losses, "lr": sched.lr, "wd": sched.weight_decay,
                               "momentum": sched.momentum, "teacher_temp": sched.teacher_temp,
                               "images_per_second": (done - start) * global_batch / max(elapsed - seconds_at_start, 1e-9),
                               "elapsed_seconds": elapsed})
            if _knn_wanted(cfg) and cfg.train.knn_every and done % cfg.train.knn_every == 0 and done < end:
                t_eval = time.perf_counter()
                knn = _evaluate(monitor, meta)
                if knn is not None:
                    log.write({"iteration": done, **knn})
                t0 += time.perf_counter() - t_eval  # evaluation time is not training time
            signum = max_over_ranks(stop["signum"])  # a signal on any rank stops them all here
            periodic = cfg.train.checkpoint_every and done % cfg.train.checkpoint_every == 0
            if periodic or signum or done == end:
                now = time.perf_counter()
                extra["train_seconds"] += now - t0
                t0 = now
                last_saved = _save(ckpt, meta, optimizer, sampler, done, B, extra, env)
            if signum:
                interrupted = signal.Signals(signum).name
                break
    bar.close()
    final_iter = it + 1 if end > start else start
    summary = _finish(cfg, run_dir, meta, log, monitor, extra, final_iter, global_batch, interrupted, last_saved, env,
                      images)
    if log is not None:
        log.close()
    return summary


def _grad_scaler(device: torch.device, precision: str, env: DistEnv, mode: str):
    """A loss scaler for fp16 (GPU only); the sharded one all-reduces its inf checks over the ranks."""
    if precision != "fp16":
        return None
    if env.distributed and mode == "fsdp":
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(device.type)
    return torch.amp.GradScaler(device.type)


def _finish(cfg, run_dir, meta, log, monitor, extra, iteration, global_batch, interrupted, last_saved, env,
            images) -> dict:
    """Export the final backbone (teacher, or student EMA in distillation), evaluate, plot, write ``summary.json``."""
    backbone = gather_backbone(meta.export_backbone)  # a collective when sharded
    skipped = sorted({p for paths in all_gather_objects(images.skipped_paths()) for p in paths})  # every rank's reads
    summary = {
        "iterations": iteration,
        "images_per_second": iteration * global_batch / max(extra["train_seconds"], 1e-9),
        "train_seconds": extra["train_seconds"],
        "checkpoint": str(last_saved) if last_saved else None,
        "interrupted": interrupted,
        "arch": cfg.student.arch,
        "world_size": env.world_size,
        "skipped_files": len(skipped),  # unreadable or not regular files, stepped over (this session's reads)
    }
    if not env.is_main:
        return summary
    if skipped:
        from dinolab.data.images import warn_skipped

        warn_skipped(skipped)
        log.write({"iteration": iteration, "skipped_files": len(skipped)})
    save_backbone(backbone, run_dir / "teacher_backbone.pth")
    save_backbone(backbone, run_dir / "teacher_backbone.safetensors")
    if monitor is not None and not interrupted:
        knn = monitor(backbone)
        log.write({"iteration": iteration, **knn})
        summary.update(knn_top1_init=extra["knn_top1_init"], knn_top1_final=knn["knn_top1"], knn_n_test=knn["knn_n_test"])
    from dinolab.train.health import health_flags
    from dinolab.train.plots import plot_run

    records = log.records()
    summary["health"] = health_flags(records, cfg)  # DINO/iBOT at ln K, collapse: flags + what to try
    for message in summary["health"]["messages"]:
        print(f"warning: {message}", file=sys.stderr)
    plot_run(records, run_dir / "loss_curves.png", cfg)
    atomic_write_json(run_dir / "summary.json", summary)
    log.finish(summary, run_dir / "loss_curves.png", run_dir / "summary.json")
    return summary
