"""Collectives for curation under ``torchrun`` (gloo or nccl), no-ops in one process.

Every stage after embedding runs on all ranks: rank r owns the pool chunks ``r, r + W, ...`` (as
embedding strides shards), exchanges only what it must with these helpers, and rank 0 alone writes
manifests and whole-stage files while the others wait at :func:`barrier`.

Outputs must not depend on W, so every reduction here is order-free: sums are exact integer sums
(:func:`fixed_point`), and merged neighbour lists are sorted by ``(-similarity, row)``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from dinolab.distributed.env import dist_env, is_initialized, world_size

# Fixed-point scale for exact (hence order-free) sums of unit-vector coordinates: 2^32 steps per unit
# leaves 2^31 summands of |x| <= 1 before int64 overflows, and is finer than float32 near 1e-2.
FIXED_POINT = 2.0**32


def barrier() -> None:
    if is_initialized():
        torch.distributed.barrier()


def _device() -> torch.device:
    if is_initialized() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (picklable objects)."""
    if not is_initialized():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def all_gather(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (picklable objects, e.g. small arrays)."""
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def gather(obj: Any) -> list[Any] | None:
    """``[obj of rank 0, obj of rank 1, ...]`` on rank 0, ``None`` elsewhere (picklable objects)."""
    if not is_initialized():
        return [obj]
    out = [None] * torch.distributed.get_world_size() if dist_env()[0] == 0 else None
    torch.distributed.gather_object(obj, out, dst=0)
    return out


def _padded(x: np.ndarray, length: int) -> torch.Tensor:
    """``x`` [n, ...] as a tensor of ``length`` rows (zero rows appended) on the collective's device."""
    out = np.zeros((length, *x.shape[1:]), x.dtype)
    out[: len(x)] = x
    return torch.from_numpy(out).to(_device())


def all_gather_rows(x: np.ndarray, counts: list[int] | None = None) -> list[np.ndarray]:
    """Every rank's ``x`` [n_r, ...] (same trailing shape and dtype everywhere) on every rank, as arrays.

    A tensor collective (no pickling): memory is W x max(n_r) rows. ``counts`` (every rank's n_r) saves
    one small collective where the caller knows them.
    """
    if world_size() == 1:
        return [x]
    counts = counts if counts is not None else all_gather(len(x))
    sent = _padded(x, max(counts))
    out = [torch.empty_like(sent) for _ in counts]
    torch.distributed.all_gather(out, sent)
    return [t.cpu().numpy()[:n] for t, n in zip(out, counts, strict=True)]


def gather_rows(x: np.ndarray, dst: int, length: int) -> list[np.ndarray] | None:
    """Every rank's ``x`` [length, ...] on rank ``dst`` (a list over ranks); ``None`` on the others."""
    if world_size() == 1:
        return [x]
    sent = _padded(x, length)
    out = [torch.empty_like(sent) for _ in range(world_size())] if dist_env()[0] == dst else None
    torch.distributed.gather(sent, out, dst=dst)
    return None if out is None else [t.cpu().numpy() for t in out]


def to_root(x: np.ndarray | None, owner: int, shape: tuple[int, ...], dtype: type) -> np.ndarray | None:
    """Rank ``owner``'s array ``x`` (of ``shape`` and ``dtype``) on rank 0, ``None`` elsewhere (point to point)."""
    rank = dist_env()[0] if is_initialized() else 0
    if owner == 0 or not is_initialized():
        return x if rank == 0 else None
    if rank == owner:
        torch.distributed.send(torch.from_numpy(np.ascontiguousarray(x, dtype=dtype)).to(_device()), dst=0)
    elif rank == 0:
        buffer = torch.from_numpy(np.empty(shape, dtype)).to(_device())
        torch.distributed.recv(buffer, src=owner)
        return buffer.cpu().numpy()
    return None


def _all_reduce(x: np.ndarray, op: Any) -> np.ndarray:
    if not is_initialized():
        return x
    t = torch.from_numpy(np.ascontiguousarray(x)).to(_device())
    torch.distributed.all_reduce(t, op=op)
    return t.cpu().numpy()


def all_reduce_sum(x: np.ndarray) -> np.ndarray:
    """Element-wise sum over ranks of an int64 or float array (exact for integers)."""
    return _all_reduce(x, torch.distributed.ReduceOp.SUM)


def all_reduce_max(x: np.ndarray) -> np.ndarray:
    """Element-wise maximum over ranks (exact for any dtype)."""
    return _all_reduce(x, torch.distributed.ReduceOp.MAX)


def fixed_point(x: np.ndarray) -> np.ndarray:
    """Float array -> int64 fixed point (:data:`FIXED_POINT`), whose sums are exact in any order."""
    return np.rint(np.asarray(x, dtype=np.float64) * FIXED_POINT).astype(np.int64)


def my_chunks(num_chunks: int) -> list[int]:
    """The pool chunks this rank owns: ``rank, rank + W, ...``."""
    rank, world_size = dist_env()
    return list(range(rank, num_chunks, world_size))


def lockstep_rounds(count: int) -> int:
    """Rounds every rank must run when rank r has ``count`` items of work: the largest count."""
    return max(all_gather(int(count)))


def merge_topk(sims: list[np.ndarray], rows: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k over the neighbour lists that several index shards returned for the same queries.

    Args:
        sims: per shard [Q, k_s] similarities (missing slots -inf).
        rows: per shard [Q, k_s] pool rows (missing slots -1).

    Returns:
        sims [Q, k], rows [Q, k], sorted by (-similarity, row): the same whatever the sharding.
    """
    s = np.concatenate(sims, axis=1)
    r = np.concatenate(rows, axis=1)
    if s.shape[1] < k:
        pad = k - s.shape[1]
        s = np.pad(s, ((0, 0), (0, pad)), constant_values=-np.inf)
        r = np.pad(r, ((0, 0), (0, pad)), constant_values=-1)
    # missing slots (row -1) last, then most similar first, ties by row
    order = np.lexsort((r, -s, r < 0), axis=1)[:, :k]
    return np.take_along_axis(s, order, axis=1), np.take_along_axis(r, order, axis=1)


def run_lockstep(stage: Any, num_shards: int, compute: Any) -> int:
    """Run this rank's unfinished shards of ``stage`` in rounds that every rank joins.

    ``compute(index)`` returns the shard's arrays; it may call collectives (a sharded search), so a
    rank with no shard left in a round still calls ``compute(None)``, whose result is dropped.
    A restarted rank begins at its first unfinished shard.

    Returns:
        The number of shards this rank computed.
    """
    rank, world_size = dist_env()
    mine = stage.unfinished(num_shards, rank, world_size)
    for j in range(lockstep_rounds(len(mine))):
        index = mine[j] if j < len(mine) else None
        arrays = compute(index)
        if index is not None:
            stage.write_shard(index, arrays)
    return len(mine)


def open_stage(stage: Any) -> bool:
    """Every rank agrees whether ``stage`` is done; if not, rank 0 opens it. Returns done."""
    done = bool(broadcast(stage.done))
    if not done and dist_env()[0] == 0:
        stage.open()
    barrier()
    return done
