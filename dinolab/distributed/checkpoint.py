"""Distributed checkpoints with ``torch.distributed.checkpoint`` (DCP), and their consolidation.

A run on several ranks saves one DCP directory per checkpoint; each rank writes its own shards and
any number of ranks (one included, without a process group) can load it, because DCP reshards on load::

    RUN_DIR/checkpoints/
      dcp_0001250/
        .metadata                      tensor names, shapes, and which file holds which slice
        __0_0.distcp  __1_0.distcp     model + optimizer shards, one file per writing rank
        train_state.pth                iteration, sampler, RNG of every rank, extra (written by rank 0)
      dcp_0002500/ ...                 the last ``train.keep_last`` are kept

Keys are the meta-architecture's own (``model.student.backbone.blocks.0.attn.qkv.weight``,
``optimizer.state.student.…``), whatever the wrapping (FSDP2, DDP, none), through
``torch.distributed.checkpoint.state_dict.get_state_dict``. :func:`consolidate_backbone` turns one
directory into a single official-format backbone file (``.pth`` or ``.safetensors``).
"""

from __future__ import annotations

import dataclasses
import enum
import io
import pathlib
import pickle
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint import filesystem as dcp_filesystem
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from dinolab.distributed import env
from dinolab.distributed.fsdp import TRAINED_SIDE, is_sharded
from dinolab.utils.io import atomic_torch_save
from dinolab.models.checkpoints import save_backbone
from dinolab.models.vit import DinoVisionTransformer

TRAIN_STATE = "train_state.pth"


class UnsafeCheckpointError(ValueError):
    """A checkpoint file asks to run code (a pickled callable outside the allowed data classes)."""


def _metadata_classes() -> dict[tuple[str, str], object]:
    """What a DCP ``.metadata`` pickle may name: DCP's own data classes and enums, tensor sizes, dtypes,
    layouts and paths. Each only builds a value; none runs code chosen by the file."""
    allowed: dict[tuple[str, str], object] = {}
    for module in (dcp_metadata, dcp_filesystem):
        for name, obj in vars(module).items():
            if isinstance(obj, type) and obj.__module__ == module.__name__ and (
                dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)
            ):
                allowed[(module.__name__, name)] = obj
    for name, obj in vars(torch).items():
        if isinstance(obj, torch.dtype):
            allowed[("torch", name)] = obj
    allowed[("torch", "Size")] = torch.Size
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout  # layout by its name
    allowed[("collections", "OrderedDict")] = __import__("collections").OrderedDict
    for name in ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path"):
        allowed[("pathlib", name)] = getattr(pathlib, name)
    return allowed


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata; any other global (``os.system``, ``builtins.eval`` ...) is refused."""

    allowed = _metadata_classes()

    def find_class(self, module: str, name: str):
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"refuses to load {module}.{name}: only torch.distributed.checkpoint metadata classes are allowed"
            ) from None


def read_dcp_metadata(path: str | Path) -> Metadata:
    """The ``.metadata`` of a DCP directory, unpickled without running code from the file.

    Raises:
        ValueError: unreadable (damaged) or unsafe (names a callable outside DCP's data classes).
    """
    path = Path(path)
    try:
        with open(path / ".metadata", "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except UnsafeCheckpointError as err:
        raise UnsafeCheckpointError(f"{path}/.metadata is not a safe checkpoint: {err}") from None
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, IndexError) as err:
        raise ValueError(f"{path}/.metadata is damaged or not DCP metadata ({type(err).__name__}: {err})") from None
    if not isinstance(metadata, Metadata):
        raise ValueError(f"{path}/.metadata is not DCP metadata (holds a {type(metadata).__name__})")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader with the metadata read by :func:`read_dcp_metadata` (its own uses ``pickle.load``)."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        if kwargs.get("rank") is not None:  # per-rank metadata files: not written by dinolab
            raise ValueError(f"{self.path}: per-rank DCP metadata is not supported")
        metadata = read_dcp_metadata(self.path)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner with non-tensor values read by ``torch.load(weights_only=True)`` (its own uses
    ``weights_only=False``, which runs any pickled callable)."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as err:
            raise UnsafeCheckpointError(
                f"{read_item.dest_index.fqn}: refused a pickled object (torch.load with weights_only=True "
                "loads tensors and plain data only)"
            ) from None
        if self.flatten_state_dict:  # as DefaultLoadPlanner.load_bytes, with the safe load
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def _dcp_load(state: dict, path: str | Path, no_dist: bool) -> None:
    """``dcp.load`` from ``path`` through the safe reader and planner, without its warning for a load in one
    process, which is intended here (resume on one rank, consolidation, a distillation teacher)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*assuming the intent is to load in a single process")
        try:
            dcp.load(state, storage_reader=SafeFileSystemReader(str(path)), planner=SafeLoadPlanner(), no_dist=no_dist)
        except CheckpointException as err:  # DCP wraps every rank's exception with its traceback
            unsafe = re.search(r"UnsafeCheckpointError: (.*)", str(err))
            if unsafe:
                raise UnsafeCheckpointError(f"{path} is not a safe checkpoint: {unsafe.group(1)}") from None
            raise ValueError(f"{path} could not be read (damaged?): {str(err).strip().splitlines()[-1]}") from None


def load_train_state(path: str | Path) -> dict:
    """``train_state.pth`` of a DCP directory (plain data: ``weights_only`` safe).

    Raises:
        UnsafeCheckpointError: the file asks to unpickle something other than tensors and plain data.
    """
    file = Path(path) / TRAIN_STATE
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" not in str(err):
            raise
        raise UnsafeCheckpointError(f"{file} is not a safe checkpoint: torch.load(weights_only=True) refused it") from None


def is_dcp_dir(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / ".metadata").is_file()


def save_dcp(path: str | Path, meta: nn.Module, optimizer: torch.optim.Optimizer, train_state: dict) -> Path:
    """Every rank writes its shards of model + optimizer to ``path`` (a collective); rank 0 adds
    ``train_state`` and publishes the directory by renaming it from ``path.tmp`` once complete."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if env.is_main() and tmp.exists():
        shutil.rmtree(tmp)  # left over by an interrupted save
    env.barrier()
    model_sd, optim_sd = get_state_dict(meta, optimizer)
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp))
    if env.is_main():  # DCP's coordinator (rank 0) returns after every rank has written its files
        atomic_torch_save(train_state, tmp / TRAIN_STATE)
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    env.barrier()
    return path


def load_dcp(path: str | Path, meta: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Load model + optimizer from a DCP directory into this (any-sized) group; returns the train state."""
    path = Path(path)
    model_sd, optim_sd = get_state_dict(meta, optimizer)  # also creates the optimizer state to fill
    state = {"model": model_sd, "optimizer": optim_sd}
    _dcp_load(state, path, no_dist=not env.is_initialized())
    set_state_dict(meta, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    return load_train_state(path)


def load_full_state(meta: nn.Module, optimizer: torch.optim.Optimizer, model_sd: dict, optimizer_sd: dict) -> None:
    """Load a single-process checkpoint (``meta.state_dict()`` and ``optimizer.state_dict()``) into a
    sharded or replicated meta-architecture: every rank reads the full tensors and keeps its part."""
    set_state_dict(
        meta,
        optimizer,
        model_state_dict=model_sd,
        optim_state_dict=named_optimizer_state(optimizer_sd, TRAINED_SIDE + "."),
        options=StateDictOptions(full_state_dict=True),
    )


def named_optimizer_state(optimizer_sd: dict, prefix: str) -> dict:
    """``optimizer.state_dict()`` (state keyed by position) -> state keyed by parameter name.

    Positions follow the groups' order, whose ``param_names`` (``dinolab.train.param_groups``) name them.
    """
    names = [prefix + n for group in optimizer_sd["param_groups"] for n in group["param_names"]]
    positions = [i for group in optimizer_sd["param_groups"] for i in group["params"]]
    by_position = dict(zip(positions, names))
    return {
        "state": {by_position[i]: s for i, s in optimizer_sd["state"].items()},
        "param_groups": [
            {**g, "params": [prefix + n for n in g["param_names"]]} for g in optimizer_sd["param_groups"]
        ],
    }


def read_dcp_tensors(path: str | Path, prefix: str = "model.") -> dict[str, torch.Tensor]:
    """Every tensor of a DCP directory whose key starts with ``prefix`` (the prefix removed), read whole
    by this process alone (no process group needed)."""
    metadata = read_dcp_metadata(path).state_dict_metadata
    wanted = {
        key: torch.empty(m.size, dtype=m.properties.dtype)
        for key, m in metadata.items()
        if key.startswith(prefix) and isinstance(m, TensorStorageMetadata)
    }
    if not wanted:
        raise ValueError(f"{path} holds no tensors under {prefix!r}")
    _dcp_load(wanted, path, no_dist=True)
    return {key[len(prefix) :]: t for key, t in wanted.items()}


def gather_backbone(backbone: nn.Module) -> nn.Module | None:
    """A plain, whole copy of ``backbone`` on rank 0 (``None`` on the others); a collective when sharded.

    An unsharded backbone (one process, or a DDP replica) is returned as is on rank 0.
    """
    if not is_sharded(backbone):
        return backbone if env.is_main() else None
    device = next(backbone.parameters()).device
    full = get_model_state_dict(backbone, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not env.is_main():
        return None
    plain = DinoVisionTransformer(**backbone.arch_kwargs)
    plain.load_state_dict(full)
    return plain.to(device)


def consolidate_backbone(dcp_dir: str | Path, out_path: str | Path) -> Path:
    """The exported backbone (teacher, or the student EMA of a distillation) of a DCP checkpoint ->
    one official-format file (``.pth``, or ``.safetensors`` carrying its constructor arguments)."""
    dcp_dir, out_path = Path(dcp_dir), Path(out_path)
    if not is_dcp_dir(dcp_dir):
        raise FileNotFoundError(f"{dcp_dir} is not a DCP checkpoint directory (no .metadata)")
    read_dcp_metadata(dcp_dir)  # an unsafe or damaged folder is refused before anything else is read
    state = load_train_state(dcp_dir)
    weights = read_dcp_tensors(dcp_dir, "model." + state["export_prefix"])
    model = DinoVisionTransformer(**state["export_arch"])
    model.load_state_dict(weights)
    save_backbone(model, out_path)
    return out_path
