"""Labelled image sets: the one reader of ``.npz`` arrays, class-per-folder trees and the builtin set.

==========================  ===================================================================
``*.npz``                   ``x_<split>`` images (uint8 [N, H, W, 3], [N, H, W, 1] or greyscale
                            [N, H, W]) with ``y_<split>`` integer labels [N], for split in train
                            / val / test; optional ``class_names`` [C]
a folder                    ``train/`` (+ ``val/``, ``test/``) each holding one folder per class, or
                            one folder of class folders (then everything is ``train``)
``None`` / ``builtin:NAME``  the embedded labelled set (:mod:`dinolab.data.builtin`), train + test
==========================  ===================================================================

:func:`read_labelled` returns the splits the source has; what a caller needs on top (an evaluation
split, a held-out split drawn by :mod:`dinolab.data.splits`) it adds itself. Every problem is a
one-line ``ValueError`` naming the input.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from dinolab.data.builtin import BUILTIN_PREFIX, load_builtin
from dinolab.data.images import as_image_array, list_images, load_rgb

SPLITS = ("train", "val", "test")


@dataclass
class ImageSet:
    """Images held in memory (uint8 array [N, H, W, 3]) or as files (read lazily).

    ``name`` says where they came from (used in messages); :attr:`fingerprint` identifies the
    content for the feature cache (array bytes, or path + size + mtime of every file).
    """

    array: np.ndarray | None = None
    paths: list[Path] | None = None
    name: str = "images"
    crop_boxes: list[tuple[int, int, int, int] | None] | None = None  # (x0, y0, x1, y1) per image

    def __post_init__(self) -> None:
        if (self.array is None) == (self.paths is None):
            raise ValueError(f"{self.name}: give exactly one of an image array or a list of paths")
        if self.array is not None:
            self.array = as_image_array(self.array, self.name)

    def __len__(self) -> int:
        return len(self.array) if self.array is not None else len(self.paths)

    def __getitem__(self, i: int) -> np.ndarray:
        """Image ``i`` as uint8 [H, W, 3] (cropped to its box when one is given)."""
        image = self.array[i] if self.array is not None else np.asarray(load_rgb(self.paths[i]))
        box = self.crop_boxes[i] if self.crop_boxes is not None else None
        if box is not None:
            x0, y0, x1, y1 = (int(round(v)) for v in box)
            image = image[max(y0, 0) : y1, max(x0, 0) : x1]
        return image

    @property
    def native_size(self) -> tuple[int, int]:
        """(H, W) of the first image (all images of an array share it)."""
        return tuple(self[0].shape[:2])

    @cached_property
    def fingerprint(self) -> str:
        h = hashlib.sha256()
        if self.array is not None:
            h.update(repr((self.array.shape, str(self.array.dtype))).encode())
            h.update(np.ascontiguousarray(self.array).data)
        else:
            for p in self.paths:
                st = p.stat()
                h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        if self.crop_boxes is not None:
            h.update(repr(self.crop_boxes).encode())
        return h.hexdigest()[:32]


@dataclass
class LabelledImages:
    images: ImageSet
    labels: np.ndarray  # int64 [N]


class NamedSplits:
    """Lookup shared by data sets of named splits with class names (``splits``, ``class_names``, ``source``
    attributes): :class:`LabelledSet` and segmentation's ``SegmentationData``."""

    splits: dict
    class_names: list[str]
    source: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def split(self, name: str):
        """The split ``name``; a one-line ValueError naming the source and its splits when it has none."""
        if name not in self.splits:
            raise ValueError(f"{self.source}: no {name!r} split (found {', '.join(self.splits)})")
        return self.splits[name]


@dataclass
class LabelledSet(NamedSplits):
    """Named splits of labelled images (``train`` always) and the class names."""

    splits: dict[str, LabelledImages]
    class_names: list[str]
    source: str

    @property
    def eval_split(self) -> str:
        """The split results are reported on: ``test`` when present, else ``val``."""
        return "test" if "test" in self.splits else "val"


EXPECTED = "labelled npz needs x_train, y_train and x_test/y_test and/or x_val/y_val"


def read_labelled(path: str | Path | None, *, with_special: bool = False, image_size: int = 32) -> LabelledSet:
    """The labelled set at ``path`` (see the module table), checked: labels 0..C-1, one per image.

    Args:
        with_special: list non-regular entries of class folders too (for readers that drop and count
            unreadable files, :func:`dinolab.data.images.list_images`).
        image_size: side of the builtin set's images (builtin only).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: unknown format, missing arrays or class folders, bad shapes, dtypes or labels.
    """
    if path is None or str(path).startswith(BUILTIN_PREFIX):
        data = _from_builtin("digits" if path is None else str(path)[len(BUILTIN_PREFIX) :], image_size)
    else:
        path = Path(path).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"data path {path} does not exist")
        if path.is_dir():
            data = _from_folders(path, with_special)
        elif path.suffix.lower() == ".npz":
            data = _from_npz(path)
        else:
            raise ValueError(f"cannot read labelled images from {path}: expected an .npz with x_train/y_train "
                             "(+ x_test/y_test) or a folder of class folders")
    _check(data)
    return data


def _from_builtin(name: str, image_size: int) -> LabelledSet:
    x_train, y_train, x_test, y_test = load_builtin(name, image_size=image_size)
    source = f"{BUILTIN_PREFIX}{name}"
    splits = {"train": LabelledImages(ImageSet(array=x_train, name=f"{source}:train"), y_train),
              "test": LabelledImages(ImageSet(array=x_test, name=f"{source}:test"), y_test)}
    return LabelledSet(splits, _range_names(splits), source)


def _from_npz(path: Path) -> LabelledSet:
    with np.load(path, allow_pickle=False) as d:
        arrays = {k: d[k] for k in d.files}
    splits = {}
    for split in SPLITS:
        if f"x_{split}" not in arrays and f"y_{split}" not in arrays:
            continue
        for key in (f"x_{split}", f"y_{split}"):
            if key not in arrays:
                raise ValueError(f"{path}: missing array {key!r} ({EXPECTED}); found {', '.join(sorted(arrays))}")
        images = ImageSet(array=arrays[f"x_{split}"], name=f"{path.name}:x_{split}")
        splits[split] = LabelledImages(images, _as_labels(arrays[f"y_{split}"], path, split))
    if "train" not in splits:
        raise ValueError(f"{path}: missing splits ({EXPECTED}); found {', '.join(sorted(arrays))}")
    names = [str(c) for c in arrays["class_names"]] if "class_names" in arrays else _range_names(splits)
    return LabelledSet(splits, names, str(path))


def _as_labels(y: np.ndarray, path: Path, split: str) -> np.ndarray:
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise ValueError(f"{path}: y_{split} must be a 1-D integer array, got {y.dtype} {tuple(y.shape)}")
    return y.astype(np.int64)


def _range_names(splits: dict[str, LabelledImages]) -> list[str]:
    """``"0" .. "C-1"`` for a set that names no classes, C from the largest label."""
    return [str(i) for i in range(int(max(s.labels.max(initial=0) for s in splits.values())) + 1)]


def _from_folders(root: Path, with_special: bool) -> LabelledSet:
    split_dirs = {s: root / s for s in SPLITS if (root / s).is_dir()}
    if "train" not in split_dirs:
        split_dirs = {"train": root}  # one folder of class folders
    class_names = _class_names(split_dirs["train"])
    splits = {}
    for split, folder in split_dirs.items():
        paths, labels = _class_files(folder, class_names, split_dirs["train"], with_special)
        if not paths:
            raise ValueError(f"{folder}: no images found in its class folders")
        splits[split] = LabelledImages(ImageSet(paths=paths, name=str(folder)), labels)
    return LabelledSet(splits, class_names, str(root))


def _class_names(folder: Path) -> list[str]:
    names = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not names:
        raise ValueError(f"{folder} has no class sub-folders (expected one folder of images per class)")
    return names


def _class_files(folder: Path, class_names: list[str], train: Path,
                 with_special: bool) -> tuple[list[Path], np.ndarray]:
    """Images of each class folder under ``folder``, labelled by position in ``class_names``."""
    index = {name: i for i, name in enumerate(class_names)}
    paths, labels = [], []
    for cls_dir in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if cls_dir.name not in index:
            raise ValueError(f"{cls_dir}: class {cls_dir.name!r} does not exist in {train}")
        found = list_images(cls_dir, with_special=with_special)
        paths += found
        labels += [index[cls_dir.name]] * len(found)
    return paths, np.asarray(labels, dtype=np.int64)


def _check(data: LabelledSet) -> None:
    c = data.num_classes
    for split, s in data.splits.items():
        if len(s.labels) != len(s.images):
            raise ValueError(f"{data.source}: {split} has {len(s.images)} images but {len(s.labels)} labels "
                             "(one label per image)")
        if len(s.labels) and (s.labels.min() < 0 or s.labels.max() >= c):
            raise ValueError(
                f"{data.source}: y_{split} holds labels in {s.labels.min()}..{s.labels.max()}, expected 0..{c - 1}"
                f" ({c} classes)"
            )
