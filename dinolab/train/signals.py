"""SIGINT/SIGTERM as a flag the training loop reads after each iteration (it then checkpoints and returns)."""

from __future__ import annotations

import signal
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def stop_on_signals() -> Iterator[dict[str, int]]:
    """Within the block SIGINT/SIGTERM set ``flag["signum"]`` (0: none) instead of stopping the process; the
    previous handlers come back after it."""
    flag = {"signum": 0}

    def handler(signum, frame) -> None:
        flag["signum"] = int(signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)
