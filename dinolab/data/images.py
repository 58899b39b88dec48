"""Finding and reading image files: the one place that knows which suffixes are images.

Every reader in dinolab (training data, feature extraction, evaluation, curation, viz) goes
through :func:`list_images` and :func:`load_rgb` so that "what counts as an image" and "what
happens with a broken file" are decided once.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


def is_image_path(path: str | Path) -> bool:
    """True if the file name ends with a known image suffix (any case)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def list_images(root: str | Path) -> list[Path]:
    """All image files under ``root`` (recursive), sorted, so the order is stable across runs.

    Raises:
        FileNotFoundError: ``root`` does not exist.
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"image folder {root} does not exist")
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*") if p.is_file() and is_image_path(p))


def read_path_list(list_file: str | Path) -> list[Path]:
    """Paths from a text file, one per line; blank lines and ``#`` comments are ignored.

    Relative paths are resolved against the list file's folder.
    """
    list_file = Path(list_file)
    base = list_file.parent
    paths = []
    for line in list_file.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        p = Path(line)
        paths.append(p if p.is_absolute() else base / p)
    return paths


def resolve_image_source(source: str | Path) -> list[Path]:
    """A folder (recursive), a single image, or a ``.txt`` list of paths -> list of paths."""
    source = Path(source)
    if source.is_file() and source.suffix.lower() == ".txt":
        return read_path_list(source)
    return list_images(source)


def load_rgb(path: str | Path) -> Image.Image:
    """Open an image file and convert it to 8-bit RGB (greyscale and RGBA included).

    Raises:
        OSError: the file is missing, truncated or not an image.
    """
    with Image.open(path) as im:
        im.load()
        return im.convert("RGB")


def try_load_rgb(path: str | Path) -> Image.Image | None:
    """:func:`load_rgb`, but ``None`` for an unreadable file instead of an exception."""
    try:
        return load_rgb(path)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def warn_skipped(skipped: list[str], what: str = "images", show: int = 3) -> None:
    """One warning line naming the first few unreadable files and how many there were."""
    if not skipped:
        return
    names = ", ".join(str(s) for s in skipped[:show])
    more = f" and {len(skipped) - show} more" if len(skipped) > show else ""
    warnings.warn(f"skipped {len(skipped)} unreadable {what}: {names}{more}", stacklevel=2)


def to_uint8_array(image: Image.Image) -> np.ndarray:
    """PIL RGB image -> uint8 array [H, W, 3]."""
    return np.asarray(image.convert("RGB"), dtype=np.uint8)
