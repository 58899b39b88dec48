"""The run directory: its config (written once, compared on resume), its metrics log and its checkpoints.

Layout::

    RUN_DIR/
      config.yaml                    the resolved config (written once, checked on resume)
      checkpoints/                   ckpt_*.pth (one process) or dcp_*/ (several ranks): dinolab.train.checkpointer
      metrics.jsonl, tb/             the run log (RunLog): JSON lines, always; TensorBoard and the other loggers
      teacher_backbone.{pth,safetensors}, loss_curves.png, summary.json   written at the end

:meth:`RunDir.open` prepares it for a session: the temporary files of a killed write removed, the newest intact
checkpoint found (resume), or an older run's checkpoints and curves cleared (a fresh start).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from omegaconf import OmegaConf

from dinolab.configs.schema import Config, load_config, to_yaml
from dinolab.distributed.env import DistEnv, barrier
from dinolab.utils.io import atomic_write_text
from dinolab.train.checkpointer import Checkpointer
from dinolab.train.loggers import open_loggers

# Settings that may change between a run and its resume without changing its results.
RESUME_FREE = {"train.max_iters", "train.num_workers", "train.log_every", "train.device", "train.knn_every",
               "train.distributed", "train.checkpoint_every", "train.keep_last", "train.loggers",
               # how the same step is executed (a resumed run may need another, e.g. no C++ compiler there)
               "train.compile", "train.keep_freed_memory", "train.varlen_attention", "train.activation_checkpointing"}


def _flat(cfg: Config) -> dict:
    """``{"optim.base_lr": 0.004, ...}``: every leaf of ``cfg`` by its dotted key."""
    out = {}

    def walk(node: dict, prefix: str) -> None:
        for k, v in node.items():
            walk(v, f"{prefix}{k}.") if isinstance(v, dict) else out.__setitem__(f"{prefix}{k}", v)

    walk(OmegaConf.to_container(OmegaConf.structured(cfg)), "")
    return out


def config_diff(saved: Config, new: Config) -> list[str]:
    """``"key: old -> new"`` for each setting that differs and changes the results (not in :data:`RESUME_FREE`)."""
    a, b = _flat(saved), _flat(new)
    return [f"{k}: {a.get(k)} -> {b.get(k)}" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and k not in RESUME_FREE]


class RunDir:
    """``RUN_DIR`` of one run: its paths and :class:`~dinolab.train.checkpointer.Checkpointer`."""

    def __init__(self, path: Path, keep_last: int) -> None:
        self.path = path
        self.checkpoints = Checkpointer(path, keep_last)

    def open(self, cfg: Config, resume: bool, env: DistEnv) -> tuple[Path | None, dict | None]:
        """Make the folder ready for a session of ``cfg`` (every rank calls this); -> the checkpoint to resume
        from and its content (``None`` for a DCP directory), or ``(None, None)`` for a fresh start.

        Raises:
            ValueError: the folder holds a checkpoint of another config (the differences named).
        """
        self.path.mkdir(parents=True, exist_ok=True)
        if env.is_main:
            self.checkpoints.remove_stale_temps()  # of writes a killed run left behind
        barrier()  # every rank sees the same checkpoints
        found = self.checkpoints.latest_intact() if resume else None
        latest, latest_state = found if found is not None else (None, None)
        if latest is None and env.is_main:  # from scratch: an older run's checkpoints and curves would be mixed in
            if not resume:
                self.checkpoints.prune(keep=0)
            (self.path / "metrics.jsonl").unlink(missing_ok=True)
            shutil.rmtree(self.path / "tb", ignore_errors=True)
        if latest is not None:
            diff = config_diff(load_config(str(self.path / "config.yaml")), cfg)
            if diff:
                raise ValueError(f"{self.path} holds a run with another config ({'; '.join(diff[:3])}): "
                                 "use a new --output")
        if env.is_main:
            atomic_write_text(self.path / "config.yaml", to_yaml(cfg))
        return latest, latest_state


class RunLog:
    """Metrics as JSON lines (``metrics.jsonl``, always: resume and the plots read it) fanned out to the other
    ``train.loggers`` (TensorBoard ``tb/``, Weights & Biases, MLflow: :mod:`dinolab.train.loggers`).

    ``purge_step``: on resume (not None), TensorBoard drops the events a killed run wrote past its checkpoint,
    and W&B and MLflow continue the run folder's run.
    """

    def __init__(self, run_dir: Path, purge_step: int | None = None, loggers=("jsonl", "tensorboard"),
                 config: Config | None = None) -> None:
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
