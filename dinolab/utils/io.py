"""Atomic file writes: a long job never leaves a half-written checkpoint, manifest or result.

Every writer goes to a temporary file in the destination folder, flushes it to disk, then
renames it over the target with ``os.replace`` (atomic on POSIX and Windows). A full disk is
reported as ``OSError(ENOSPC)`` naming the destination.

Also the checks a command makes of its paths before any work: an output folder that can be made
(:func:`check_output_dir`), a list of files of which at least one exists (:func:`check_listed_files`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed to ``path``.

    On an exception the temporary file is removed and ``path`` is left untouched.
    A full disk raises ``OSError(ENOSPC)`` naming ``path`` (the writer's own error, e.g. torch's
    ``enforce fail at inline_container.cc ... file write failed``, says nothing of disk space).
    """
    path = Path(path)
    with _disk_full_names(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    tmp_path = Path(tmp)
    try:
        with _disk_full_names(path):
            yield tmp_path
            with open(tmp_path, "rb+") as f:
                os.fsync(f.fileno())
            os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600 (writers may recreate it): open()'s mode
            os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _umask() -> int:
    """The process's umask, read without changing it (Linux: /proc/self/status; elsewhere set and
    restored at once, as Python offers no getter)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def _disk_full_names(path: Path) -> Iterator[None]:
    """Re-raise a failed write for lack of space as ``OSError(ENOSPC or EDQUOT, ..., path)``."""
    try:
        yield
    except (OSError, RuntimeError) as err:
        if not is_disk_full(err):
            raise
        code = err.errno if isinstance(err, OSError) else errno.ENOSPC
        raise OSError(code, os.strerror(code), str(path)) from err


def is_disk_full(err: BaseException) -> bool:
    """True for a write that failed for lack of space: ``OSError`` ENOSPC / EDQUOT, or torch's
    ``RuntimeError`` from its zip writer (``inline_container.cc``, ``file write failed``; the zip
    *reader*'s errors, a truncated file, are not this)."""
    if isinstance(err, OSError):
        return err.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(err)
    return isinstance(err, RuntimeError) and (
        "file write failed" in text or ("inline_container" in text and "PytorchStreamReader" not in text))


def unpickling_reason(err: BaseException) -> str:
    """The reason inside ``torch.load(weights_only=True)``'s paragraph, in one short line
    (``Unsupported global: GLOBAL numpy._core.multiarray._reconstruct``, ``Unsupported operand 105``),
    else the error's first line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for i, line in enumerate(lines):
        marker = "WeightsUnpickler error:"
        if marker in line:
            reason = line.split(marker, 1)[1].strip() or (lines[i + 1] if i + 1 < len(lines) else "")
            return reason.split(" was not an allowed global")[0].split(". ")[0].rstrip(".")
    return lines[0] if lines else type(err).__name__


def check_output_dir(path: str | Path, option: str) -> Path:
    """Refuse, before any work, an output folder that cannot be one: an existing file, a path below
    a file, or a folder that cannot be created. Creates nothing.

    Raises:
        ValueError: one line naming ``option`` and ``path``.
    """
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"{option} {path} is a file; expected a folder (a new or existing one)")
    ancestor = path
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"{option} {path}: {ancestor} is a file, so no folder can be made below it")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        what = "folder" if ancestor == path else f"{ancestor}, where it would be created,"
        raise ValueError(f"{option} {path}: the {what} is not writable")
    return path


def check_listed_files(paths: Sequence[str | Path], source: str | Path) -> None:
    """Refuse, before any work, a list (``.txt``, manifest) none of whose files exists.

    Stops at the first existing file, so a long valid list costs one ``stat``.

    Raises:
        ValueError: one line: how many are listed, that none exists, the first one.
    """
    if not paths or any(os.path.exists(p) for p in paths):
        return
    n = len(paths)
    raise ValueError(f"{source} lists {n} file{'s' if n > 1 else ''} and none exists (the first: {paths[0]}; "
                     "relative paths are read from the list's folder)")


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n")


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def atomic_save_npz(path: str | Path, **arrays: np.ndarray) -> None:
    """``numpy.savez`` to ``path`` atomically (``path`` should end with ``.npz``)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
