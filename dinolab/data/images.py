"""Finding and reading image files: the one place that knows which suffixes are images.

Every reader in dinolab (training data, feature extraction, evaluation, curation, viz) goes
through :func:`list_images` and :func:`load_rgb` so that "what counts as an image" and "what
happens with a broken file" are decided once:

* only regular files are ever opened: a FIFO, socket or device (or a dangling link) is refused
  by :func:`open_image` from its ``stat`` alone, so a named pipe in a ``.txt`` list cannot hang a
  reader; readers that skip unreadable files count it with them;
* a decompression bomb (more than ``2 * PIL.Image.MAX_IMAGE_PIXELS`` pixels), a truncated file or
  a file that is not an image raises :class:`UnreadableImageError` (an ``OSError``);
* 16-bit and float images are scaled to 8 bits before the RGB conversion (:func:`to_rgb`);
* in-memory arrays are checked and made uint8 [N, H, W, 3] by :func:`as_image_array`;
* file names are whatever the OS gives (``str`` with ``surrogateescape`` for undecodable bytes):
  :func:`display_path` prints them, :func:`path_bytes` hashes them.
"""

from __future__ import annotations

import contextlib
import os
import stat
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")

# PIL errors that mean "this file is not a usable image". DecompressionBombError is not an OSError.
DECODE_ERRORS = (OSError, ValueError, EOFError, Image.DecompressionBombError)


class UnreadableImageError(OSError):
    """A file that cannot be used as an image: missing, not a regular file, truncated, not an
    image, or a decompression bomb. The message names the file (see :func:`display_path`)."""


def display_path(path: str | Path) -> str:
    """``path`` printable anywhere: undecodable bytes of the name become ``\xff`` escapes.

    File names come from the OS as ``str`` with lone surrogates standing for bytes that are not
    UTF-8 (``surrogateescape``); such a string cannot be encoded for a strict UTF-8 stream or log.
    """
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def path_bytes(path: str | Path) -> bytes:
    """The file name as the OS stores it (bytes): what to hash, never fails on an odd name."""
    return os.fsencode(path)


def is_image_path(path: str | Path) -> bool:
    """True if the file name ends with a known image suffix (any case)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def list_images(root: str | Path, *, with_special: bool = False) -> list[Path]:
    """All image files under ``root`` (recursive), sorted, so the order is stable across runs.

    Only regular files are listed, unless ``with_special``: then entries with an image suffix that
    are not regular files (FIFOs, sockets, devices, dangling links) are listed too, so that a reader
    that skips and counts unreadable files (datasets, extract, curate) counts them as well;
    :func:`load_rgb` refuses them without opening them.

    Raises:
        FileNotFoundError: ``root`` does not exist.
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"image folder {display_path(root)} does not exist")
    if root.is_file():
        return [root]
    keep = (lambda p: not p.is_dir()) if with_special else (lambda p: p.is_file())
    return sorted(p for p in root.rglob("*") if is_image_path(p) and keep(p))


def read_path_list(list_file: str | Path) -> list[Path]:
    """Paths from a text file, one per line; blank lines and ``#`` comments are ignored.

    Relative paths are resolved against the list file's folder. The list is read as UTF-8 with
    ``surrogateescape``, so a line holding a name that is not valid UTF-8 names that very file.
    Entries are not checked here: a missing or non-regular file is refused (and counted) when read.
    """
    list_file = Path(list_file)
    base = list_file.parent
    paths = []
    text = list_file.read_bytes().decode("utf-8", "surrogateescape").lstrip("\ufeff")
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        p = Path(line)
        paths.append(p if p.is_absolute() else base / p)
    return paths


def resolve_image_source(source: str | Path) -> list[Path]:
    """A folder (recursive), a single image, or a ``.txt`` list of paths -> list of paths.

    Folder entries with an image suffix that are not regular files are kept (``with_special``), so
    the reader skips and counts them with the other unreadable files.
    """
    source = Path(source)
    if source.is_file() and source.suffix.lower() == ".txt":
        return read_path_list(source)
    return list_images(source, with_special=True)


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "not a regular file"


@contextlib.contextmanager
def open_regular_file(path: str | Path) -> Iterator:
    """A binary file object for ``path``, which must be a regular file (anything else is never opened).

    The ``stat`` check comes first; the open itself is non-blocking and checked again with
    ``fstat``, so a file swapped for a FIFO in between cannot block either.

    Raises:
        UnreadableImageError: missing, unreadable, or not a regular file.
    """
    try:
        st = os.stat(path)
    except OSError as err:
        raise UnreadableImageError(f"cannot read {display_path(path)}: {err.strerror or err}") from err
    if not stat.S_ISREG(st.st_mode):
        raise UnreadableImageError(f"{display_path(path)} is {_file_kind(st.st_mode)}, not a regular file: not opened")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as err:
        raise UnreadableImageError(f"cannot read {display_path(path)}: {err.strerror or err}") from err
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise UnreadableImageError(f"{display_path(path)} is {_file_kind(mode)}, not a regular file")
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with f:
        yield f


@contextlib.contextmanager
def open_image(path: str | Path) -> Iterator[Image.Image]:
    """``PIL.Image.open`` of a regular file (header only; call ``load()`` to decode), closed on exit.

    Raises:
        UnreadableImageError: not a regular file, not an image, or a decompression bomb.
    """
    with open_regular_file(path) as f:
        try:
            im = Image.open(f)
        except DECODE_ERRORS as err:
            raise UnreadableImageError(f"{display_path(path)} is not a readable image ({_reason(err)})") from err
        with im:
            yield im


def _reason(err: BaseException) -> str:
    if isinstance(err, Image.DecompressionBombError):
        return f"decompression bomb: more than 2 x {Image.MAX_IMAGE_PIXELS} pixels"
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__


def to_uint8(array: np.ndarray) -> np.ndarray:
    """Pixel values of a 16-bit, 32-bit integer or float image -> uint8, by the rules below.

    * unsigned 16-bit (PIL modes ``I;16*``): the dtype's range, ``0..65535 -> 0..255``
      (``round(v / 257)``). The range is what the file declares, so brightness is absolute: a dark
      16-bit photo stays dark, every image of a data set gets the same scale, 8-bit data stored as
      16-bit (``v * 257``) comes back exactly, and a flat image is not stretched into noise.
      Per-image min..max would change all of that (only data using a fraction of the range, such as
      12-bit sensor data, comes out darker than it would with stretching).
    * signed integers (mode ``I``, which Pillow also uses for 16-bit PNGs): the same 16-bit scale
      when every value lies in ``0..65535``; otherwise the image's own min..max.
    * floats (mode ``F``): there is no dtype range, so ``0..1 -> 0..255`` when every value lies in
      [0, 1] (the usual convention for float images), otherwise the image's own min..max;
      NaN and infinities count as the minimum.

    Min..max maps ``lo -> 0`` and ``hi -> 255`` linearly (a constant image becomes 0). All results are
    rounded to the nearest integer.
    """
    a = np.asarray(array)
    if a.dtype == np.uint8:
        return a
    if a.dtype.kind == "u" and a.dtype.itemsize == 2:
        return ((a.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    if a.dtype.kind in "iu":
        a64 = a.astype(np.int64)
        if a64.size == 0 or (a64.min() >= 0 and a64.max() <= 65535):
            return ((a64 * 255 + 32767) // 65535).astype(np.uint8)
        return _stretch(a64.astype(np.float64))
    a = a.astype(np.float64)
    finite = np.isfinite(a)
    if not finite.any():
        return np.zeros(a.shape, np.uint8)
    lo_f, hi_f = a[finite].min(), a[finite].max()
    a = np.where(finite, a, lo_f)
    if lo_f >= 0.0 and hi_f <= 1.0:
        return np.rint(a * 255.0).astype(np.uint8)
    return _stretch(a)


def _stretch(a: np.ndarray) -> np.ndarray:
    lo, hi = a.min(), a.max()
    if hi <= lo:
        return np.zeros(a.shape, np.uint8)
    return np.rint((a - lo) * (255.0 / (hi - lo))).astype(np.uint8)


WIDE_MODES = ("I", "F")  # mode prefixes: I, I;16, I;16B, I;16L, I;16N, I;16S ..., F


def to_rgb(im: Image.Image) -> Image.Image:
    """Any decoded PIL image -> 8-bit RGB: 16-bit / 32-bit / float greyscale scaled by :func:`to_uint8`
    first (a plain ``convert("RGB")`` clips them at 255: a 16-bit photo comes out nearly white)."""
    if im.mode.startswith(WIDE_MODES):
        im = Image.fromarray(to_uint8(np.asarray(im)), mode="L")
    return im.convert("RGB")


def load_rgb(path: str | Path) -> Image.Image:
    """Open an image file and convert it to 8-bit RGB (greyscale, RGBA, 16-bit and float included).

    Raises:
        UnreadableImageError (an OSError): the file is missing, not a regular file (never opened),
            truncated, not an image, or a decompression bomb.
    """
    with open_image(path) as im:
        try:
            im.load()
            return to_rgb(im)
        except DECODE_ERRORS as err:
            raise UnreadableImageError(f"{display_path(path)} is not a readable image ({_reason(err)})") from err


def try_load_rgb(path: str | Path) -> Image.Image | None:
    """:func:`load_rgb`, but ``None`` for an unreadable file instead of an exception."""
    try:
        return load_rgb(path)
    except DECODE_ERRORS:
        return None


def warn_skipped(skipped: list[str], what: str = "images", show: int = 3) -> None:
    """One warning line naming the first few unreadable files and how many there were."""
    if not skipped:
        return
    names = ", ".join(display_path(s) for s in skipped[:show])
    more = f" and {len(skipped) - show} more" if len(skipped) > show else ""
    warnings.warn(f"skipped {len(skipped)} unreadable {what}: {names}{more}", stacklevel=2)


def as_image_array(array: np.ndarray, source: str) -> np.ndarray:
    """Check and normalise an in-memory image array to uint8 [N, H, W, 3] (the one array validator).

    Accepts [N, H, W, 3], [N, H, W, 1] and greyscale [N, H, W] (repeated to 3 channels), and
    integer dtypes whose values lie in [0, 255]; a uint8 [N, H, W, 3] array is returned as is.

    Raises:
        ValueError: another shape, a float dtype, values outside [0, 255], or no image (one line
            starting with ``source``).
    """
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4 or array.shape[-1] not in (1, 3):
        raise ValueError(f"{source}: images must be [N, H, W, 3] or [N, H, W], got shape {array.shape}")
    if len(array) == 0:
        raise ValueError(f"no images in {source}: the array is empty")
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.integer) or (array.size and (array.min() < 0 or array.max() > 255)):
            raise ValueError(f"{source}: images must be uint8 in [0, 255], got dtype {array.dtype}")
        array = array.astype(np.uint8)
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return array
