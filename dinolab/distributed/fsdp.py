"""Data parallelism for the meta-architecture: FSDP2 (``fully_shard``) or DDP, chosen by ``train.distributed``.

FSDP2 (the default): each transformer block is one ``fully_shard`` unit, then each sub-module root
(``backbone``, ``dino_head``, ``ibot_head``) of every side of the meta-architecture (``student``,
``teacher``, and in distillation ``student_ema``). Every side is sharded the same way (dim 0 over the
same mesh), so rank r holds the same slice of a teacher parameter as of the student one and the EMA
update runs on local shards without communication (:func:`local_tensors`). Frozen / EMA sides never run
backward, so they reshard right after their forward (an FSDP root otherwise keeps its parameters
unsharded after forward, expecting backward, and the EMA would then read full tensors).

Mixed precision (``MixedPrecisionPolicy``) follows the official layout (RECIPE 2.8): parameters gathered
in the compute dtype (bf16/fp16); gradients of the backbone reduced in that dtype, those of the
student heads in fp32; the sharded master weights stay fp32.

DDP (the alternative): every student sub-module is wrapped in ``DistributedDataParallel``; the teacher is
a full replica on every rank, updated from the (all-reduced, hence identical) student.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterator

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from dinolab.distributed import env

DISTRIBUTED_MODES = ("fsdp", "ddp")
TRAINED_SIDE = "student"


@contextlib.contextmanager
def view_outputs_expected() -> Iterator[None]:
    """Forward passes that return views without FSDP2's warning about them, inside this block only.

    Our backbone returns views of its final norm (``x_norm_clstoken = x_norm[:, 0]``); FSDP2 warns that an
    in-place op on such a view would skip its pre-backward hook. The training code never does one.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
        yield


def data_parallel_mesh(device: torch.device) -> DeviceMesh:
    """A 1-D mesh over all ranks on ``device``'s type."""
    return init_device_mesh(device.type, (env.world_size(),))


def mixed_precision_policy(precision: str, reduce_fp32: bool) -> MixedPrecisionPolicy:
    """fp32: no casting; bf16/fp16: parameters in that dtype, gradients reduced in it or in fp32."""
    if precision == "fp32":
        return MixedPrecisionPolicy()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if reduce_fp32 else dtype)


def shard_module(module: nn.Module, mesh: DeviceMesh, policy: MixedPrecisionPolicy, frozen: bool) -> None:
    """``fully_shard`` each of ``module.blocks`` (if any), then ``module`` itself, with neighbour prefetch."""
    reshard = True if frozen else None  # None: FSDP's default (the root keeps params for backward)
    blocks = list(getattr(module, "blocks", []))
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard)
    fully_shard(module, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard)
    for current, following in zip(blocks, blocks[1:]):  # gather block i+1 while block i computes
        current.set_modules_to_forward_prefetch([following])
    if not frozen:
        for current, previous in zip(blocks[1:], blocks):
            current.set_modules_to_backward_prefetch([previous])


def shard_meta_arch(meta: nn.Module, device: torch.device, precision: str) -> None:
    """FSDP2 over every ``nn.ModuleDict`` side of ``meta`` (student trainable, the others frozen/EMA)."""
    mesh = data_parallel_mesh(device)
    for side_name, side in meta.named_children():
        if not isinstance(side, nn.ModuleDict):
            continue  # e.g. EmaCenter buffers: replicated, all-reduced by their own update
        for name, module in side.items():
            # nothing to train (another side, or e.g. a frozen backbone): no backward, reshard after forward
            frozen = side_name != TRAINED_SIDE or not any(p.requires_grad for p in module.parameters())
            reduce_fp32 = name != "backbone" and not frozen  # the student heads, as the official policy
            shard_module(module, mesh, mixed_precision_policy(precision, reduce_fp32), frozen)


def wrap_ddp(meta: nn.Module, device: torch.device) -> None:
    """Wrap every student sub-module with trainable parameters in DDP (in place)."""
    student: nn.ModuleDict = getattr(meta, TRAINED_SIDE)
    device_ids = [device.index] if device.type == "cuda" else None
    for name, module in list(student.items()):
        if any(p.requires_grad for p in module.parameters()):  # DDP refuses a fully frozen module
            student[name] = DistributedDataParallel(module, device_ids=device_ids)


def parallelize(meta: nn.Module, mode: str, device: torch.device, precision: str) -> None:
    """Shard (``fsdp``) or replicate (``ddp``) ``meta`` over the process group; no-op in one process.

    Build the optimizer afterwards (FSDP replaces the parameters by sharded ones); the parameter
    groups see through DDP wrappers (:func:`unwrap`).
    """
    if env.world_size() == 1:
        return
    if mode not in DISTRIBUTED_MODES:
        raise ValueError(f"train.distributed must be one of {', '.join(DISTRIBUTED_MODES)}, got {mode!r}")
    if mode == "fsdp":
        shard_meta_arch(meta, device, precision)
    else:
        wrap_ddp(meta, device)


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (or the module itself)."""
    return module.module if isinstance(module, DistributedDataParallel) else module


def unwrapped_side(side: nn.ModuleDict) -> nn.ModuleDict:
    """A ModuleDict view of ``side`` with DDP wrappers removed (official parameter names)."""
    return nn.ModuleDict({k: unwrap(m) for k, m in side.items()})


def is_sharded(module: nn.Module) -> bool:
    return isinstance(module, FSDPModule)


def local_tensors(tensors) -> list[torch.Tensor]:
    """This rank's shard of each tensor (``DTensor.to_local()``, sharing storage); plain tensors as is."""
    return [t.to_local() if isinstance(t, DTensor) else t for t in tensors]

