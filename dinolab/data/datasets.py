"""Image datasets, unlabelled for pretraining and labelled for evaluation, without torchvision.

:func:`open_dataset` and :func:`open_labelled` pick the format from the path:

===========================  ==================================================================
a folder                     every image below it (recursive; jpg jpeg png webp bmp tif tiff, any
                             case); for labels, one sub-folder per class, or ``train/`` + ``test/``
                             (+ ``val/``) each holding class sub-folders
``*.txt``                    one image path per line (relative to the list's folder)
``*.jsonl`` / ``*.csv``      a manifest with a ``path`` field / column (what curation writes)
``*.npz``                    ``x_train`` or ``images``: uint8 [N, H, W, 3] or greyscale [N, H, W];
                             for labels ``x_train/y_train/x_test/y_test`` (+ ``x_val/y_val``)
``None`` / ``builtin:NAME``  the embedded real data set (:mod:`dinolab.data.builtin`)
===========================  ==================================================================

A long run never dies on one bad file: :class:`ImageFiles` answers a request for an unreadable
file (missing, truncated, not an image, a decompression bomb, or not a regular file: a FIFO,
socket or device is never opened) with the next readable one, records the bad index in shared
memory (so DataLoader workers' findings reach the main process) and warns, naming it.
:attr:`ImageFiles.num_skipped` counts them (with the files ``verify`` dropped up front) and
:meth:`ImageFiles.report_skipped` gives the one-line summary at the end of a run.
"""

from __future__ import annotations

import csv
import json
import warnings
from dataclasses import dataclass
from multiprocessing import RawArray
from multiprocessing.context import get_spawning_popen
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from dinolab.data.augment import MultiCropAugmentation
from dinolab.data.images import (
    DECODE_ERRORS,
    IMAGE_EXTENSIONS,
    display_path,
    list_images,
    open_image,
    read_path_list,
    try_load_rgb,
    warn_skipped,
)

BUILTIN_PREFIX = "builtin:"
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


class ArrayImages(Dataset):
    """Images held in memory as uint8 [N, H, W, 3]; ``dataset[i]`` is a PIL RGB image."""

    def __init__(self, images: np.ndarray, *, source: str | Path) -> None:
        self.source = str(source)
        self.images = as_image_array(images, self.source)
        if len(self.images) == 0:
            raise ValueError(f"no images in {self.source}: the array is empty")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index])

    @property
    def num_skipped(self) -> int:
        return 0  # arrays have no unreadable files; kept so both sources answer the same calls

    def skipped_paths(self) -> list[str]:
        return []

    def report_skipped(self) -> None:
        pass


class MultiCropDataset(Dataset):
    """Unlabelled images -> multi-crop samples whose randomness is a function of (seed, key).

    ``dataset[key]`` augments image ``key % len(images)`` with a generator seeded by
    ``(seed, key)``. Feed it the keys of ``InfiniteSampler(..., yield_keys=True)`` (``epoch * N +
    index``): every draw of an image gets fresh crops, yet the crops depend neither on the worker
    that made them nor on whether the run was resumed.

    Returns per item: ``{"global_crops": 2 x [3, G, G], "local_crops": n_local x [3, L, L]}``.
    """

    def __init__(self, images: Dataset, augmentation: MultiCropAugmentation, seed: int = 0) -> None:
        self.images = images
        self.augmentation = augmentation
        self.seed = seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: int) -> dict[str, list]:
        image = self.images[key % len(self.images)]
        return self.augmentation(image, rng=np.random.default_rng([self.seed, int(key)]))


def open_dataset(path: str | Path | None, *, verify: bool = False) -> ImageFiles | ArrayImages:
    """Unlabelled images from ``path``, the format picked from it (see the module table).

    ``None`` or ``"builtin:NAME"`` gives the training split of an embedded data set.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: unknown format, empty source, or an array of the wrong shape / dtype.
    """
    if path is None or str(path).startswith(BUILTIN_PREFIX):
        from dinolab.data.builtin import load_builtin

        name = "digits" if path is None else str(path)[len(BUILTIN_PREFIX) :]
        return ArrayImages(load_builtin(name)[0], source=f"{BUILTIN_PREFIX}{name}")
    path = _existing(path)
    suffix = path.suffix.lower()
    if path.is_dir():  # non-regular entries are listed so that they are skipped and counted, never opened
        return ImageFiles(list_images(path, with_special=True), source=path, verify=verify)
    if suffix == ".npz":
        return ArrayImages(_npz_images(path), source=path)
    if suffix == ".txt":
        return ImageFiles(read_path_list(path), source=path, verify=verify)
    if suffix in (".jsonl", ".csv"):
        return ImageFiles(read_manifest(path), source=path, verify=verify)
    if suffix in IMAGE_EXTENSIONS:
        return ImageFiles([path], source=path, verify=verify)
    raise ValueError(f"cannot read images from {path}: expected {FORMATS}")


def read_manifest(path: str | Path) -> list[Path]:
    """Image paths from a ``.jsonl`` (records with ``"path"``) or ``.csv`` (a ``path`` column).

    Relative paths are resolved against the manifest's folder.
    """
    path = Path(path)
    if path.suffix.lower() == ".jsonl":
        text = path.read_bytes().decode("utf-8", "surrogateescape")
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
            records = list(csv.DictReader(f))
    missing = [i for i, r in enumerate(records, 1) if not isinstance(r, dict) or not r.get("path")]
    if missing:
        raise ValueError(f"manifest {path}: record {missing[0]} has no 'path' field (each record needs one)")
    return [p if p.is_absolute() else path.parent / p for p in (Path(r["path"]) for r in records)]


def as_image_array(array: np.ndarray, source: str) -> np.ndarray:
    """Check and normalise an image array to uint8 [N, H, W, 3].

    Accepts [N, H, W, 3], [N, H, W, 1] and greyscale [N, H, W] (repeated to 3 channels), and
    integer dtypes whose values lie in [0, 255].

    Raises:
        ValueError: another shape, a float dtype, or values outside [0, 255].
    """
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4 or array.shape[-1] not in (1, 3):
        raise ValueError(f"{source}: images must be [N, H, W, 3] or [N, H, W], got shape {array.shape}")
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.integer) or (array.size and (array.min() < 0 or array.max() > 255)):
            raise ValueError(f"{source}: images must be uint8 in [0, 255], got dtype {array.dtype}")
        array = array.astype(np.uint8)
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return array


@dataclass
class LabelledSplits:
    """A labelled image set split for evaluation.

    ``x_*`` are uint8 [N, H, W, 3] arrays (npz, builtin) or :class:`ImageFiles` (folders; a
    sequence of PIL images); ``y_*`` are int64 [N]. ``x_val`` / ``y_val`` exist only when the
    source has a validation split.
    """

    x_train: np.ndarray | ImageFiles
    y_train: np.ndarray
    x_test: np.ndarray | ImageFiles
    y_test: np.ndarray
    class_names: list[str] | None = None
    x_val: np.ndarray | ImageFiles | None = None
    y_val: np.ndarray | None = None
    source: str = ""


def open_labelled(
    path: str | Path | None, *, test_fraction: float = 0.25, seed: int = 0, image_size: int = 32
) -> LabelledSplits:
    """Labelled images from ``path`` (npz, class folders, or builtin), split into train / test.

    A source without its own test split (an npz with only ``x_train/y_train``, one folder of
    class folders) is split by :func:`stratified_split` with ``test_fraction`` and ``seed``.
    ``image_size`` applies to builtin sets only.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: unknown format, missing arrays, or no classes.
    """
    if path is None or str(path).startswith(BUILTIN_PREFIX):
        from dinolab.data.builtin import load_builtin

        name = "digits" if path is None else str(path)[len(BUILTIN_PREFIX) :]
        x_train, y_train, x_test, y_test = load_builtin(name, image_size=image_size)
        return LabelledSplits(x_train, y_train, x_test, y_test, source=f"{BUILTIN_PREFIX}{name}")
    path = _existing(path)
    if path.suffix.lower() == ".npz":
        return _labelled_npz(path, test_fraction, seed)
    if path.is_dir():
        return _labelled_folders(path, test_fraction, seed)
    raise ValueError(f"cannot read labelled images from {path}: expected an .npz with x_train/y_train "
                     "(+ x_test/y_test) or a folder of class folders")


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified split: each class sends ``round(n_c * test_fraction)`` items to test.

    Every class with at least 2 items keeps at least one on each side.

    Args:
        labels: [N] integer labels.

    Returns:
        ``(train_idx, test_idx)``, each sorted int64.
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = 0 if len(idx) < 2 else min(max(int(round(len(idx) * test_fraction)), 1), len(idx) - 1)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _labelled_npz(path: Path, test_fraction: float, seed: int) -> LabelledSplits:
    with np.load(path, allow_pickle=False) as data:
        keys = set(data.files)
        if not {"x_train", "y_train"} <= keys:
            raise ValueError(f"{path} must hold x_train and y_train (+ x_test/y_test), found {sorted(keys)}")
        arrays = {k: data[k] for k in keys if k[:2] in ("x_", "y_")}
        class_names = [str(c) for c in data["class_names"]] if "class_names" in keys else None
    splits = {}
    for split in ("train", "test", "val"):
        if f"x_{split}" in arrays:
            x = as_image_array(arrays[f"x_{split}"], f"{path}:x_{split}")
            y = arrays.get(f"y_{split}")
            if y is None or len(y) != len(x):
                raise ValueError(f"{path}: y_{split} must hold one label per image of x_{split} ({len(x)})")
            splits[split] = (x, y.astype(np.int64))
    if "test" not in splits:
        x, y = splits["train"]
        tr, te = stratified_split(y, test_fraction, seed)
        splits["train"], splits["test"] = (x[tr], y[tr]), (x[te], y[te])
    val = splits.get("val", (None, None))
    return LabelledSplits(*splits["train"], *splits["test"], class_names, *val, source=str(path))


def _labelled_folders(root: Path, test_fraction: float, seed: int) -> LabelledSplits:
    split_dirs = {s: root / s for s in ("train", "test", "val") if (root / s).is_dir()}
    if {"train", "test"} <= split_dirs.keys():
        class_names = _class_names(split_dirs["train"])
        parts = {s: _class_files(d, class_names) for s, d in split_dirs.items()}
    else:
        class_names = _class_names(root)
        paths, labels = _class_files(root, class_names)
        tr, te = stratified_split(labels, test_fraction, seed)
        parts = {"train": ([paths[i] for i in tr], labels[tr]), "test": ([paths[i] for i in te], labels[te])}
    out = {}
    for split, (paths, labels) in parts.items():
        ok = readable_mask(paths)  # drop before building ImageFiles so labels stay aligned
        out[split] = (ImageFiles([p for p, k in zip(paths, ok) if k], source=root / split), labels[ok])
    val = out.get("val", (None, None))
    return LabelledSplits(*out["train"], *out["test"], class_names, *val, source=str(root))


def _class_names(folder: Path) -> list[str]:
    names = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not names:
        raise ValueError(f"{folder} has no class sub-folders (expected one folder of images per class)")
    return names


def _class_files(folder: Path, class_names: list[str]) -> tuple[list[Path], np.ndarray]:
    """Images of each class folder under ``folder``, labelled by position in ``class_names``."""
    unknown = sorted(d.name for d in folder.iterdir() if d.is_dir() and d.name not in class_names)
    if unknown:
        raise ValueError(f"{folder} has classes absent from the training split: {unknown[:5]}")
    paths, labels = [], []
    for label, name in enumerate(class_names):
        if (folder / name).is_dir():
            files = list_images(folder / name, with_special=True)  # non-regular ones: dropped by readable_mask
            paths += files
            labels += [label] * len(files)
    return paths, np.asarray(labels, dtype=np.int64)


def _npz_images(path: Path) -> np.ndarray:
    with np.load(path, allow_pickle=False) as data:
        for key in ("x_train", "images"):
            if key in data.files:
                return as_image_array(data[key], f"{path}:{key}")
        raise ValueError(f"{path} has no image array: expected 'x_train' or 'images', found {data.files}")


def _existing(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data path {path} does not exist")
    return path


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
