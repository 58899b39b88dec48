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

Files are read through :class:`~dinolab.data.image_files.ImageFiles`, which never lets one bad file
end a long run; labelled sets are read by :func:`dinolab.data.labelled.read_labelled`.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from dinolab.data.augment import MultiCropAugmentation
from dinolab.data.builtin import BUILTIN_PREFIX, load_builtin
from dinolab.data.image_files import FORMATS, ImageFiles, readable_mask
from dinolab.data.images import IMAGE_EXTENSIONS, as_image_array, list_images, read_path_list
from dinolab.data.labelled import ImageSet, read_labelled
from dinolab.data.splits import stratified_split

__all__ = ["ArrayImages", "BUILTIN_PREFIX", "ImageFiles", "LabelledSplits", "MultiCropDataset", "open_dataset",
           "open_labelled", "read_manifest", "readable_mask"]  # ImageFiles, readable_mask: re-exported


class ArrayImages(Dataset):
    """Images held in memory as uint8 [N, H, W, 3]; ``dataset[i]`` is a PIL RGB image."""

    def __init__(self, images: np.ndarray, *, source: str | Path) -> None:
        self.source = str(source)
        self.images = as_image_array(images, self.source)

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
    """Labelled images from ``path`` (:func:`dinolab.data.labelled.read_labelled`), split into train / test.

    A source without its own test split (an npz with only ``x_train/y_train``, one folder of
    class folders) is split by :func:`~dinolab.data.splits.stratified_split` with ``test_fraction``
    and ``seed``. Unreadable files of a folder are dropped (with a warning naming them), their labels
    with them. ``image_size`` applies to builtin sets only.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: unknown format, missing arrays, or no classes.
    """
    data = read_labelled(path, with_special=True, image_size=image_size)
    splits = {name: (s.images, s.labels) for name, s in data.splits.items()}
    if "test" not in splits:
        images, labels = splits["train"]
        tr, te = stratified_split(labels, test_fraction, seed)
        splits["train"], splits["test"] = _subset(images, labels, tr), _subset(images, labels, te)
    out = {name: _materialise(images, labels, data.source, name) for name, (images, labels) in splits.items()}
    return LabelledSplits(*out["train"], *out["test"], data.class_names, *out.get("val", (None, None)),
                          source=data.source)


def _subset(images: ImageSet, labels: np.ndarray, idx: np.ndarray) -> tuple[ImageSet, np.ndarray]:
    if images.array is not None:
        return ImageSet(array=images.array[idx], name=images.name), labels[idx]
    return ImageSet(paths=[images.paths[i] for i in idx], name=images.name), labels[idx]


def _materialise(images: ImageSet, labels: np.ndarray, source: str,
                 split: str) -> tuple[np.ndarray | ImageFiles, np.ndarray]:
    """An array split as its array; a file split as :class:`ImageFiles` of its readable files (labels aligned)."""
    if images.array is not None:
        return images.array, labels
    ok = readable_mask(images.paths)  # drop before building ImageFiles so labels stay aligned
    return ImageFiles([p for p, k in zip(images.paths, ok) if k], source=Path(source) / split), labels[ok]


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
