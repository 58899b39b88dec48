"""This run's checkpoints: one typed :class:`TrainState`, saved and resumed with model, optimizer, sampler and RNG.

Layout (inside the run directory, :mod:`dinolab.train.run_dir`)::

    checkpoints/ckpt_0001250.pth   one process: model + optimizer + sampler + RNG states + TrainState, last K kept
    checkpoints/dcp_0001250/       several ranks: the same, as a torch.distributed.checkpoint directory
                                   (see dinolab.distributed.checkpoint); either kind resumes the run

:func:`save_checkpoint` writes the kind the process count calls for, :func:`resume_checkpoint` reads either on
any number of ranks. Also the weights a new run starts from: :func:`read_model_state` (another run's
checkpoint) and :func:`load_meta_weights` (``train.init_from``, ``--high-res``).
"""

from __future__ import annotations

import pickle
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dinolab.data.samplers import InfiniteSampler
from dinolab.distributed.checkpoint import (
    UnsafeCheckpointError,
    is_dcp_dir,
    load_dcp,
    load_full_state,
    load_train_state,
    read_dcp_metadata,
    read_dcp_tensors,
    save_dcp,
)
from dinolab.distributed.env import DistEnv, all_gather_objects
from dinolab.distributed.fsdp import unwrap
from dinolab.utils.io import atomic_torch_save
from dinolab.models.checkpoints import resample_pos_embed

_NAME = re.compile(r"^(?:ckpt_(\d{7,})\.pth|dcp_(\d{7,}))$")


class Checkpointer:
    def __init__(self, run_dir: str | Path, keep_last: int = 3) -> None:
        self.dir = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last

    def all(self) -> list[Path]:
        """Existing checkpoints (files and DCP directories), oldest first."""
        if not self.dir.is_dir():
            return []
        found = [(int(m.group(1) or m.group(2)), p) for p in self.dir.iterdir() if (m := _NAME.match(p.name))]
        return [p for _, p in sorted(found) if p.is_file() or is_dcp_dir(p)]

    def latest(self) -> Path | None:
        found = self.all()
        return found[-1] if found else None

    def latest_intact(self) -> tuple[Path, dict | None] | None:
        """The newest checkpoint that reads back, with its state (``None`` for a DCP directory, whose
        shards are read into the model later); a damaged newer one is named in a warning and skipped.

        Raises:
            ValueError: a checkpoint that asks to run code (it is refused, not skipped).
        """
        for path in reversed(self.all()):
            try:
                if is_dcp_dir(path):
                    read_dcp_metadata(path)
                    load_train_state(path)
                    return path, None
                return path, self.load(path)
            except UnsafeCheckpointError:
                raise
            except (RuntimeError, ValueError, OSError, EOFError, pickle.UnpicklingError) as err:
                reason = str(err).splitlines()[0] if str(err) else type(err).__name__
                print(f"warning: checkpoint {path} is damaged ({reason}): resuming from an older one", file=sys.stderr)
        return None

    def remove_stale_temps(self) -> list[Path]:
        """Temporary files and directories of writes that a killed process left (``.NAME.*.tmp``, ``dcp_*.tmp/``)
        in the run directory and its ``checkpoints/``; only the run's own process may call this."""
        removed = []
        for folder in (self.dir.parent, self.dir):
            if not folder.is_dir():
                continue
            for p in folder.iterdir():
                if (p.name.startswith(".") and p.name.endswith(".tmp") and p.is_file()) or (
                    folder == self.dir and p.name.startswith("dcp_") and p.name.endswith(".tmp") and p.is_dir()
                ):
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
                    removed.append(p)
        return removed

    def save(self, state: dict, iteration: int) -> Path:
        path = self.dir / f"ckpt_{iteration:07d}.pth"
        atomic_torch_save(state, path)
        self.prune()
        return path

    def dcp_path(self, iteration: int) -> Path:
        return self.dir / f"dcp_{iteration:07d}"

    def prune(self, keep: int | None = None) -> None:
        """Keep the last ``keep`` (default ``keep_last``) checkpoints of either kind; 0 removes them all."""
        keep = self.keep_last if keep is None else keep
        found = self.all()
        for old in found[: max(0, len(found) - keep)]:
            shutil.rmtree(old) if old.is_dir() else old.unlink()

    @staticmethod
    def load(path: str | Path) -> dict:
        """A checkpoint written by :meth:`save` (tensors, numbers, strings: ``weights_only`` safe).

        Raises:
            UnsafeCheckpointError: the file asks to unpickle something other than tensors and plain data.
        """
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            if "Weights only load failed" not in str(err):
                raise  # not a torch file, or a damaged one
            reason = next((line for line in str(err).splitlines() if "WeightsUnpickler error" in line or
                           "Unsupported global" in line), str(err).splitlines()[0])
            raise UnsafeCheckpointError(f"{path} is not a safe checkpoint: {reason.strip()}") from None


@dataclass
class TrainState:
    """Where the run is: saved in every checkpoint (as ``iteration`` and ``extra``), restored on resume."""

    iteration: int = 0  # steps done
    train_seconds: float = 0.0  # training time of every session so far, evaluation excluded
    knn_top1_init: float | None = None  # k-NN top-1 at initialisation (None: no k-NN set)

    def extra(self) -> dict:
        """The checkpoint's ``extra`` entry."""
        return {"knn_top1_init": self.knn_top1_init, "train_seconds": self.train_seconds}

    @classmethod
    def read(cls, saved: dict) -> TrainState:
        """From a checkpoint's ``iteration`` and ``extra``."""
        extra = saved["extra"]
        return cls(saved["iteration"], extra["train_seconds"], extra["knn_top1_init"])


def _cuda_rng_state() -> torch.Tensor | None:
    """The current CUDA device's RNG state (drop path draws its subsets there on a GPU), or None."""
    return torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None


def save_checkpoint(ckpt: Checkpointer, meta: nn.Module, optimizer: torch.optim.Optimizer, sampler: InfiniteSampler,
                    state: TrainState, per_rank_batch: int, env: DistEnv) -> Path:
    """A checkpoint of ``state.iteration``: one file in one process, else a DCP directory (every rank calls this:
    the RNG states are gathered). The last ``keep_last`` are kept."""
    consumed = state.iteration * per_rank_batch  # by this rank's sampler
    if not env.distributed:
        return ckpt.save({"iteration": state.iteration, "model": meta.state_dict(), "optimizer": optimizer.state_dict(),
                          "sampler": sampler.state_dict(consumed=consumed), "torch_rng": torch.get_rng_state(),
                          "cuda_rng": _cuda_rng_state(), "extra": state.extra()}, state.iteration)
    common = {"iteration": state.iteration, "sampler": sampler.state_dict(consumed=consumed)}
    ema_name = next(name for name, module in meta.named_children() if module is meta.ema)
    train_state = {**common, "torch_rng": all_gather_objects(torch.get_rng_state()),
                   "cuda_rng": all_gather_objects(_cuda_rng_state()), "extra": state.extra(),
                   "export_prefix": f"{ema_name}.backbone.", "export_arch": unwrap(meta.export_backbone).arch_kwargs}
    path = save_dcp(ckpt.dcp_path(state.iteration), meta, optimizer, train_state)
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


def resume_checkpoint(path: Path, state: dict | None, meta: nn.Module, optimizer: torch.optim.Optimizer,
                      sampler: InfiniteSampler, seed: int, env: DistEnv) -> TrainState:
    """Load a checkpoint into this run (any number of ranks). ``state``: the file's content as
    :meth:`Checkpointer.latest_intact` read it (``None`` for a DCP directory). On another number of ranks the
    RNG streams cannot continue: each rank starts a fresh one (drop-path subsets only)."""
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
    else:
        torch.manual_seed(seed + 1 + env.rank + 1_000_003 * state["iteration"])
    return TrainState.read(state)


def run_config_path(checkpoint: str | Path) -> Path:
    """``RUN_DIR/config.yaml`` of a checkpoint ``RUN_DIR/checkpoints/<ckpt>``."""
    return Path(checkpoint).resolve().parent.parent / "config.yaml"


def read_model_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The meta-architecture state dict (``student.*``, ``teacher.*`` ...) of a dinolab checkpoint.

    Raises:
        FileNotFoundError: no such file or directory.
        ValueError: the file is not a dinolab training checkpoint (e.g. a backbone-only file).
    """
    path = Path(path)
    if is_dcp_dir(path):
        return read_dcp_tensors(path, "model.")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    state = Checkpointer.load(path)
    if not isinstance(state.get("model"), dict) or not any(k.startswith("student.") for k in state["model"]):
        raise ValueError(
            f"{path} is not a dinolab training checkpoint (no 'model' with student/teacher weights); a backbone-only "
            "file has no DINO/iBOT heads: train them first with "
            "student.pretrained_weights=FILE student.freeze_backbone=true"
        )
    return state["model"]


def _is_center(key: str) -> bool:
    return key.endswith("_center.center")


def load_meta_weights(meta: nn.Module, sd: dict[str, torch.Tensor], name: str = "checkpoint") -> None:
    """Initialise ``meta`` (student, EMA side, heads) from a meta-architecture state dict ``sd``.

    Position embeddings stored for another grid (e.g. 224 -> 518 for high-resolution adaptation) are
    resampled bicubically. A distillation checkpoint loaded into a plain meta-architecture gives its
    student EMA as the teacher. Centering buffers are taken when both sides have them.

    Raises:
        ValueError: the weights do not fit (missing/unexpected keys or other shapes, first ones named).
    """
    own = meta.state_dict()
    if any(k.startswith("student_ema.") for k in sd) and not any(k.startswith("student_ema.") for k in own):
        sd = {"teacher." + k.removeprefix("student_ema.") if k.startswith("student_ema.") else k: v
              for k, v in sd.items() if not k.startswith("teacher.")}
    sd = dict(sd)
    for key, value in sd.items():
        if key.endswith("backbone.pos_embed") and key in own and value.shape != own[key].shape:
            sd[key] = resample_pos_embed(value, own[key].shape[1] - 1)
    missing = [k for k in own if k not in sd and not _is_center(k)]
    unexpected = [k for k in sd if k not in own and not _is_center(k)]
    mismatched = [k for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        detail = (f"shape of {mismatched[0]}: {tuple(sd[mismatched[0]].shape)} vs {tuple(own[mismatched[0]].shape)}"
                  if mismatched else f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}")
        raise ValueError(f"{name} does not fit this model: {detail}")
    meta.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
