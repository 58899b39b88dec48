"""Fixtures shared by every test folder: odd files (FIFOs, undecodable names) and a guard against hangs."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

import pytest


@contextlib.contextmanager
def _deadline(seconds: float):
    """Fail the test if the body runs longer than ``seconds`` (SIGALRM: main thread, POSIX).

    A reader that opens a FIFO blocks in ``open()`` until a writer comes; the alarm interrupts it, so
    the test fails instead of hanging the suite.
    """

    def fail(signum, frame):
        # pytest.fail raises a BaseException: code that catches OSError / Exception cannot swallow it.
        pytest.fail(f"still running after {seconds} s: something blocked (a FIFO opened?)", pytrace=False)

    previous = signal.signal(signal.SIGALRM, fail)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def deadline():
    """``with deadline(5): ...`` fails the test instead of hanging past 5 seconds."""
    if not hasattr(signal, "setitimer"):
        pytest.skip("needs signal.setitimer (POSIX)")
    return _deadline


@pytest.fixture
def make_fifo():
    """``make_fifo(path)`` creates a named pipe (nobody writes to it: opening it to read blocks)."""
    if not hasattr(os, "mkfifo"):
        pytest.skip("needs os.mkfifo (POSIX)")

    def make(path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.mkfifo(path)
        return path

    return make


@pytest.fixture
def opened_paths(monkeypatch):
    """The paths passed to ``os.open`` / ``open`` while the test runs (to prove a file was never opened)."""
    import builtins

    seen: list[str] = []
    real_os_open, real_open = os.open, builtins.open

    def spy_os_open(path, *args, **kwargs):
        if isinstance(path, (str, bytes, os.PathLike)):
            seen.append(os.fsdecode(path))
        return real_os_open(path, *args, **kwargs)

    def spy_open(file, *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)):
            seen.append(os.fsdecode(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(os, "open", spy_os_open)
    monkeypatch.setattr(builtins, "open", spy_open)
    return seen


def undecodable_name(stem: bytes = b"bad\xff", suffix: str = ".png") -> str:
    """A file name that is not valid UTF-8, as the OS hands it to Python (``surrogateescape``)."""
    return os.fsdecode(stem + suffix.encode())


@pytest.fixture
def bad_name():
    """``bad_name()`` -> ``"bad\\udcff.png"``: the name ``b"bad\\xff.png"`` as Python sees it."""
    try:
        os.fsencode(undecodable_name())
    except UnicodeEncodeError:  # a filesystem encoding without surrogateescape (not POSIX)
        pytest.skip("file names with undecodable bytes need a POSIX filesystem encoding")
    return undecodable_name


def _write_images(folder, n: int, size: int, names: str = "{i}.png") -> list:
    """``n`` random RGB PNGs of ``size`` x ``size`` in ``folder`` (made if missing), seed 0; returns the paths."""
    import numpy as np
    from PIL import Image

    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = [folder / names.format(i=i) for i in range(n)]
    for path in paths:
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
    return paths


@pytest.fixture
def write_images():
    """The :func:`_write_images` writer: ``write_images(folder, n, size)`` -> paths of random RGB PNGs."""
    return _write_images


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only add synchronisation (and spin-waits on a busy 2-core machine: 3x)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
