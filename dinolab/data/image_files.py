"""A list of image files as a dataset that never lets one bad file end a long run.

:class:`ImageFiles` answers a request for an unreadable file (missing, truncated, not an image, a
decompression bomb, or not a regular file: a FIFO, socket or device is never opened) with the next
readable one, records the bad index in shared memory (so DataLoader workers' findings reach the main
process) and warns, naming it. :attr:`ImageFiles.num_skipped` counts them (with the files ``verify``
dropped up front) and :meth:`ImageFiles.report_skipped` gives the one-line summary at the end of a run.
"""

from __future__ import annotations

import warnings
from multiprocessing import RawArray
from multiprocessing.context import get_spawning_popen
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from dinolab.data.images import DECODE_ERRORS, IMAGE_EXTENSIONS, display_path, open_image, try_load_rgb, warn_skipped

FORMATS = "a folder of images, a .txt list of paths, a .jsonl/.csv manifest with a 'path' column, or an .npz"
WARN_FIRST = 3  # per process, how many bad files get their own warning as they are met


class SharedFlags:
    """One byte per item in shared memory: set in DataLoader workers, read in the main process.

    Shared with workers started by fork (inherited) or spawn (passed while spawning). Any other
    pickling (``copy.deepcopy``, ``torch.save``) takes an unshared snapshot instead of failing.
    """

    def __init__(self, size: int) -> None:
        self._flags: Any = RawArray("B", size)

    def set(self, index: int) -> None:
        self._flags[index] = 1

    def indices(self) -> np.ndarray:
        """Indices whose flag is set: [K] int64, ascending."""
        return np.flatnonzero(np.frombuffer(self._flags, dtype=np.uint8))

    def __getstate__(self) -> dict[str, Any]:
        spawning = get_spawning_popen() is not None
        return {"flags": self._flags if spawning else bytearray(bytes(self._flags))}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._flags = state["flags"]


class ImageFiles(Dataset):
    """Images read from a list of files; ``dataset[i]`` is a PIL RGB image.

    An unreadable file (missing, truncated, not an image, a decompression bomb, not a regular file)
    is replaced by the next readable file in order, so a sample is always returned and the
    replacement is deterministic; the bad index is recorded. :attr:`num_skipped` counts the skipped
    files (for a training log / summary) and :meth:`skipped_paths` names them. It is also a
    ``Sequence`` of images for evaluation code.

    Args:
        paths: image files.
        source: what the user passed (named in messages).
        verify: open every file's header now and drop the unreadable ones (cheap: no decoding;
            a truncated file is still only found when read); they count in :attr:`num_skipped`.
        max_substitutes: how many consecutive unreadable files to step over before giving up.

    Raises:
        ValueError: no (readable) file.
    """

    def __init__(
        self, paths: Sequence[str | Path], *, source: str | Path, verify: bool = False, max_substitutes: int = 100
    ) -> None:
        self.source = str(source)
        paths = [Path(p) for p in paths]
        self._dropped: list[str] = []  # dropped up front by ``verify``
        if verify:
            ok = readable_mask(paths)
            self._dropped = [str(p) for p, k in zip(paths, ok) if not k]
            paths = [p for p, k in zip(paths, ok) if k]
        if not paths:
            raise ValueError(f"no readable images in {display_path(self.source)} "
                             f"(expected {FORMATS}; suffixes {IMAGE_EXTENSIONS})")
        self.paths = paths
        self.max_substitutes = max_substitutes
        self._bad = SharedFlags(len(paths))
        self._warned = 0

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Image.Image:
        n = len(self.paths)
        if not -n <= index < n:  # also ends plain iteration (``for image in dataset``)
            raise IndexError(f"index {index} out of range for {n} images")
        for step in range(min(n, self.max_substitutes + 1)):
            i = (index + step) % n
            image = try_load_rgb(self.paths[i])
            if image is not None:
                return image
            self._record_bad(i)
        raise OSError(f"{display_path(self.source)}: {min(n, self.max_substitutes + 1)} consecutive unreadable "
                      f"images from {display_path(self.paths[index % n])}")

    def _record_bad(self, index: int) -> None:
        self._bad.set(index)
        if self._warned < WARN_FIRST:  # per process; the full list is in report_skipped()
            self._warned += 1
            warnings.warn(f"skipping unreadable image {display_path(self.paths[index])} (using the next readable one)",
                          stacklevel=3)

    @property
    def num_skipped(self) -> int:
        """Skipped files: those ``verify`` dropped plus the distinct unreadable files met so far, in
        this process and its DataLoader workers (the count for a training log / summary)."""
        return len(self._dropped) + len(self._bad.indices())

    def skipped_paths(self) -> list[str]:
        """The skipped files: those ``verify`` dropped, then those met so far in dataset order.

        Names are the OS's (``str`` with ``surrogateescape``); print them with
        :func:`~dinolab.data.images.display_path`.
        """
        return self._dropped + [str(self.paths[i]) for i in self._bad.indices()]

    def report_skipped(self) -> None:
        """One warning naming the first few unreadable files and their count (nothing if none)."""
        warn_skipped(self.skipped_paths())


def readable_mask(paths: Sequence[Path]) -> np.ndarray:
    """Which files have an image header PIL can open: [N] bool. Warns naming the first few others.

    Cheap (no decoding), so a truncated file passes and is only caught when read. A file that is
    not a regular file (FIFO, socket, device) is refused without being opened; a decompression bomb
    is refused from its header.
    """
    ok = np.ones(len(paths), dtype=bool)
    for i, p in enumerate(paths):
        try:
            with open_image(p):
                pass
        except DECODE_ERRORS:
            ok[i] = False
    warn_skipped([str(p) for p, k in zip(paths, ok) if not k])
    return ok
