"""The process group of a ``torchrun`` launch, and the few collectives the training loop needs.

``torchrun --nproc_per_node=N`` starts N processes and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT`` in each; :func:`init_distributed` turns them into a process group
(NCCL on CUDA, gloo on CPU). Without those variables, or with ``WORLD_SIZE=1``, it does nothing and
every helper here answers for a single process, so library code calls them unconditionally.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: ``rank`` of ``world_size``, ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    created_group: bool = False  # True when init_distributed created the group (and should destroy it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def launched_by_torchrun() -> bool:
    """True when the torchrun variables are set and ask for more than one process."""
    return all(v in os.environ for v in _TORCHRUN_VARS) and int(os.environ["WORLD_SIZE"]) > 1


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(backend: str | None = None, timeout_minutes: float = 30.0) -> DistEnv:
    """Join the torchrun process group (idempotent); a single-process :class:`DistEnv` otherwise.

    On CUDA each process uses GPU ``LOCAL_RANK``.
    """
    if is_initialized():
        return DistEnv(rank(), world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    if not launched_by_torchrun():
        return DistEnv()
    local = int(os.environ["LOCAL_RANK"])
    backend = backend or default_backend()
    kwargs = {}
    if backend == "nccl":
        torch.cuda.set_device(local)
        kwargs["device_id"] = torch.device("cuda", local)
    dist.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes), **kwargs)
    return DistEnv(dist.get_rank(), dist.get_world_size(), local, created_group=True)


def shutdown(env: DistEnv, synchronize: bool = False) -> None:
    """Destroy the process group if ``env`` created it.

    ``synchronize`` (for the normal end of a job, when every rank gets here): a barrier first, so that no rank
    tears down its gloo connections while a peer still uses them; a gloo process whose peer closed a pair
    under it can abort ("terminate called without an active exception", seen now and then in the 2-rank
    tests under load). Without it (the path of an exception) nothing waits for ranks that may not come.
    """
    if env.created_group and is_initialized():
        if synchronize and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def dist_env() -> tuple[int, int]:
    """``(rank, world_size)`` from an initialised process group, else from torchrun's ``RANK`` and ``WORLD_SIZE``
    (a launch whose ranks work apart, without a group, as curation's shards do)."""
    if is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def rank() -> int:
    """This process's rank (``RANK`` of the launch before/after the group exists; 0 alone)."""
    return dist.get_rank() if is_initialized() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """Rank 0: the one process that logs, plots, exports and prints."""
    return rank() == 0


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def _comm_device() -> torch.device:
    """Where small collective tensors must live: the current GPU under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Average each value over the ranks (every rank gets the result; same keys on every rank)."""
    if not is_initialized() or not values:
        return dict(values)
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return {k: float(v) / world_size() for k, v in zip(values, t.tolist())}


def max_over_ranks(value: int) -> int:
    """The largest ``value`` of any rank, e.g. a signal number where 0 means none."""
    if not is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.int64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def all_gather_objects(obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` in a single process."""
    if not is_initialized():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out
