"""Run a function on N CPU ranks (gloo), as ``torchrun`` would: one process per rank, torchrun's variables set."""

from __future__ import annotations

import os
import socket
import warnings

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn, world_size: int, port: int, args: tuple) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    fn(rank, *args)


def run_ranks(fn, world_size: int, *args, attempts: int = 3) -> None:
    """``fn(rank, *args)`` in ``world_size`` fresh processes; raises if any of them fails.

    A rank killed by a signal (seen here now and then under load: gloo's C++ threads abort a process with
    "terminate called without an active exception") is infrastructure, not a result: the group is started
    again on a fresh port, up to ``attempts`` times. A Python exception in a rank (a failed assertion)
    raises at once.
    """
    for attempt in range(attempts):
        try:
            mp.start_processes(_entry, args=(fn, world_size, free_port(), args), nprocs=world_size, join=True,
                               start_method="spawn")
            return
        except mp.ProcessExitedException as exc:
            if attempt == attempts - 1:
                raise
            # visible in pytest's warnings summary, so that the rate of this flake can be followed
            warnings.warn(f"a rank died ({exc}); starting the {world_size} ranks again", RuntimeWarning, stacklevel=2)
