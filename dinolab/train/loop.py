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

import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from dinolab.configs.schema import Config
from dinolab.data.datasets import open_dataset
from dinolab.data.loader import build_loader
from dinolab.data.samplers import InfiniteSampler
from dinolab.distributed.checkpoint import gather_backbone
from dinolab.distributed.env import DistEnv, all_gather_objects, init_distributed, max_over_ranks, mean_over_ranks
from dinolab.distributed.env import shutdown
from dinolab.distributed.fsdp import parallelize
from dinolab.models.checkpoints import save_backbone
from dinolab.train.build import (
    build_knn_monitor, build_meta_arch, build_optimizer, compile_backbones, grad_scaler, knn_wanted, schedule_config,
)
from dinolab.train.checkpointer import TrainState, load_meta_weights, read_model_state
from dinolab.train.checkpointer import resume_checkpoint, save_checkpoint
from dinolab.train.loggers import check_available as check_loggers_available
from dinolab.train.meta_arch import SSLMetaArch
from dinolab.train.monitor import KnnMonitor
from dinolab.train.preflight import check_batch, check_sources, resolve_runtime
from dinolab.train.run_dir import RunDir, RunLog
from dinolab.train.schedules import ScheduleConfig, schedule_values
from dinolab.train.signals import stop_on_signals
from dinolab.train.step import train_step
from dinolab.utils.cpu_tuning import freed_memory_kept
from dinolab.utils.io import atomic_write_json


@dataclass
class Session:
    """One session of a run (from start or resume to the end or a signal): what setup built, the loop runs and
    :func:`_finish` reports."""

    cfg: Config
    env: DistEnv
    folder: RunDir
    device: torch.device
    precision: str  # resolved: fp32, bf16 or fp16
    images: torch.utils.data.Dataset  # the training images (their skipped files are counted at the end)
    loader: DataLoader
    sampler: InfiniteSampler
    meta: SSLMetaArch
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    schedules: ScheduleConfig
    monitor: KnnMonitor | None  # rank 0 with a k-NN set
    state: TrainState
    log: RunLog | None = None  # rank 0
    last_saved: Path | None = None
    interrupted: str | None = None  # the name of the signal that stopped the session

    @property
    def global_batch(self) -> int:
        return self.cfg.train.batch_size_per_gpu * self.env.world_size


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


def _train(cfg: Config, run_dir: Path, resume: bool, progress: bool, env: DistEnv) -> dict:
    """setup -> resume (or k-NN of the initialisation) -> loop -> finish."""
    session = _setup(cfg, run_dir, resume, env)
    _loop(session, progress)
    summary = _finish(session)
    if session.log is not None:
        session.log.close()
    return summary


# ------------------------------------------------------------------ setup
def _setup(cfg: Config, run_dir: Path, resume: bool, env: DistEnv) -> Session:
    """Check the inputs (before the run folder is made), open the folder, build data, model and optimizer,
    then resume from the newest checkpoint or evaluate the initialisation."""
    check_sources(cfg)
    check_loggers_available(cfg.train.loggers)  # a missing wandb/mlflow package: one line, before any work
    device, precision = resolve_runtime(cfg, env.local_rank)
    images = open_dataset(cfg.data.path)  # bad input stops here, before the run folder is made
    check_batch(cfg, len(images), env.world_size)
    folder = RunDir(run_dir, cfg.train.keep_last)
    latest, latest_state = folder.open(cfg, resume, env)

    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    loader, sampler = build_loader(cfg, images, env.rank, env.world_size)
    meta = build_meta_arch(cfg).to(device)
    if cfg.train.init_from and latest is None:
        load_meta_weights(meta, read_model_state(cfg.train.init_from), name=f"train.init_from={cfg.train.init_from}")
    parallelize(meta, cfg.train.distributed, device, precision)
    if cfg.train.compile:
        compile_backbones(meta)  # the compiler was checked with the inputs
    if env.distributed:
        torch.manual_seed(cfg.train.seed + 1 + env.rank)  # each rank draws its own drop-path subsets
    optimizer = build_optimizer(meta, cfg)
    session = Session(
        cfg, env, folder, device, precision, images, loader, sampler, meta, optimizer,
        scaler=grad_scaler(device, precision, env, cfg.train.distributed),
        schedules=schedule_config(cfg, cfg.train.batch_size_per_gpu * env.world_size),
        monitor=build_knn_monitor(cfg, precision) if env.is_main else None,
        state=TrainState(),
    )
    _resume_or_evaluate(session, latest, latest_state)
    return session


def _resume_or_evaluate(s: Session, latest: Path | None, latest_state: dict | None) -> None:
    """Continue from ``latest`` (its state, the log truncated to it), or log the k-NN of the initialisation;
    then open the run log (rank 0)."""
    if latest is not None:
        s.state = resume_checkpoint(latest, latest_state, s.meta, s.optimizer, s.sampler, s.cfg.train.seed, s.env)
    start = s.state.iteration
    if s.env.is_main:
        s.log = RunLog(s.folder.path, purge_step=start + 1 if latest is not None else None,
                       loggers=s.cfg.train.loggers, config=s.cfg)
    if latest is not None:
        if s.log is not None:
            s.log.truncate_after(start)
            print(f"resuming {s.folder.path} from iteration {start} ({latest.name}) on {s.env.world_size} process(es)")
    elif knn_wanted(s.cfg):
        knn = _evaluate(s.monitor, s.meta)
        if knn is not None:
            s.state.knn_top1_init = knn["knn_top1"]
            s.log.write({"iteration": 0, **knn})


def _evaluate(monitor: KnnMonitor | None, meta: SSLMetaArch) -> dict | None:
    """k-NN of the exported backbone on rank 0 (gathered first when sharded: every rank calls this)."""
    backbone = gather_backbone(meta.export_backbone)
    return monitor(backbone) if monitor is not None and backbone is not None else None


# ------------------------------------------------------------------ the loop
def _loop(s: Session, progress: bool) -> None:
    """Train from ``s.state.iteration`` to the end (``train.max_iters`` or the schedules') or a signal, logging
    every ``train.log_every``, evaluating every ``train.knn_every``, checkpointing every ``checkpoint_every``."""
    cfg, state = s.cfg, s.state
    start = state.iteration
    end = min(s.schedules.total_iters, cfg.train.max_iters or s.schedules.total_iters)
    s.meta.train()
    bar = tqdm(total=end, initial=start, desc="train", unit="it", disable=not (progress and s.env.is_main),
               dynamic_ncols=True)
    t0 = time.perf_counter()
    seconds_at_start = state.train_seconds
    with stop_on_signals() as stop:
        data = iter(s.loader)
        for it in range(start, end):
            batch = {k: v.to(s.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in next(data).items()}
            sched = schedule_values(s.schedules, it)
            losses = train_step(s.meta, s.optimizer, batch, sched, it, s.precision, cfg.optim.clip_grad, s.scaler)
            state.iteration = done = it + 1
            bar.update(1)
            bar.set_postfix({k: f"{v:.3f}" for k, v in losses.items()}, refresh=False)
            if done % cfg.train.log_every == 0 or done == end:
                losses = mean_over_ranks(losses)  # this rank's terms -> the global batch's
                if s.log is not None:
                    elapsed = state.train_seconds + time.perf_counter() - t0
                    speed = (done - start) * s.global_batch / max(elapsed - seconds_at_start, 1e-9)
                    s.log.write({"iteration": done, **losses, "lr": sched.lr, "wd": sched.weight_decay,
                                 "momentum": sched.momentum, "teacher_temp": sched.teacher_temp,
                                 "images_per_second": speed, "elapsed_seconds": elapsed})
            if knn_wanted(cfg) and cfg.train.knn_every and done % cfg.train.knn_every == 0 and done < end:
                t_eval = time.perf_counter()
                knn = _evaluate(s.monitor, s.meta)
                if knn is not None:
                    s.log.write({"iteration": done, **knn})
                t0 += time.perf_counter() - t_eval  # evaluation time is not training time
            signum = max_over_ranks(stop["signum"])  # a signal on any rank stops them all here
            periodic = cfg.train.checkpoint_every and done % cfg.train.checkpoint_every == 0
            if periodic or signum or done == end:
                now = time.perf_counter()
                state.train_seconds += now - t0
                t0 = now
                s.last_saved = save_checkpoint(s.folder.checkpoints, s.meta, s.optimizer, s.sampler, state,
                                               cfg.train.batch_size_per_gpu, s.env)
            if signum:
                s.interrupted = signal.Signals(signum).name
                break
    bar.close()


# ------------------------------------------------------------------ the end
def _finish(s: Session) -> dict:
    """Export the final backbone (teacher, or student EMA in distillation), evaluate, plot, write ``summary.json``."""
    backbone = gather_backbone(s.meta.export_backbone)  # a collective when sharded
    skipped = sorted({p for paths in all_gather_objects(s.images.skipped_paths()) for p in paths})  # every rank's reads
    state, run_dir = s.state, s.folder.path
    summary = {
        "iterations": state.iteration,
        "images_per_second": state.iteration * s.global_batch / max(state.train_seconds, 1e-9),
        "train_seconds": state.train_seconds,
        "checkpoint": str(s.last_saved) if s.last_saved else None,
        "interrupted": s.interrupted,
        "arch": s.cfg.student.arch,
        "world_size": s.env.world_size,
        "skipped_files": len(skipped),  # unreadable or not regular files, stepped over (this session's reads)
        "keep_freed_memory": freed_memory_kept(),  # in effect in this process (applied by `dinolab train` only)
    }
    if not s.env.is_main:
        return summary
    from dinolab.train.health import health_flags
    from dinolab.train.plots import plot_run

    if skipped:
        from dinolab.data.images import warn_skipped

        warn_skipped(skipped)
        s.log.write({"iteration": state.iteration, "skipped_files": len(skipped)})
    save_backbone(backbone, run_dir / "teacher_backbone.pth")
    save_backbone(backbone, run_dir / "teacher_backbone.safetensors")
    if s.monitor is not None and not s.interrupted:
        knn = s.monitor(backbone)
        s.log.write({"iteration": state.iteration, **knn})
        summary.update(knn_top1_init=state.knn_top1_init, knn_top1_final=knn["knn_top1"], knn_n_test=knn["knn_n_test"])
    records = s.log.records()
    summary["health"] = health_flags(records, s.cfg)  # DINO/iBOT at ln K, collapse: flags + what to try
    for message in summary["health"]["messages"]:
        print(f"warning: {message}", file=sys.stderr)
    plot_run(records, run_dir / "loss_curves.png", s.cfg)
    atomic_write_json(run_dir / "summary.json", summary)
    s.log.finish(summary, run_dir / "loss_curves.png", run_dir / "summary.json")
    return summary
