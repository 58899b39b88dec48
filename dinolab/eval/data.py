"""Evaluation datasets: reading and checking the input formats of ``dinolab eval``.

Formats (every problem is a one-line ``ValueError`` naming the input and what was expected):

==============  ==============================================================================
classification  ``.npz`` with ``x_train`` uint8 [N, H, W, 3], ``y_train`` int [N], ``x_test`` /
                ``y_test`` and/or ``x_val`` / ``y_val``, optional ``class_names`` [C]
                (as ``shared/data/cifar10`` and ``imagenette``); or a folder with ``train/``,
                ``val/``, ``test/`` sub-folders, each holding one folder per class.
segmentation    ``.npz`` with ``x_<split>`` uint8 [N, H, W, 3] and ``mask_<split>`` [N, H, W] for
                split in train / val / test, optional ``class_names`` and ``ignore_index`` (as
                ``shared/data/camvid``); or a folder ``<split>/images/*`` + ``<split>/masks/*``
                (masks are single-channel PNGs, matched to images by file stem).
depth           ``.npz`` with ``x_train`` / ``depth_train`` and ``x_test`` / ``depth_test`` (metres,
                0 = invalid; a ``_m`` suffix on the depth name is accepted), or with groups
                ``x_<group>`` / ``depth_<group>_m`` and no split (as ``shared/data/depth_samples``:
                ``indoor``, ``kitti``), which the depth protocol evaluates leave-one-out.
retrieval       ``.npz`` with ``x_query`` [Q, H, W, 3], ``x_db`` [M, H, W, 3] and ``relevance``
                int [Q, M] (1 easy positive, 2 hard positive, -1 junk, 0 negative); or a ``.json``
                ``{"root": dir, "queries": [paths], "database": [paths], "gnd": [{"easy": [db
                indices], "hard": [...], "junk": [...], "bbx": [x0, y0, x1, y1]?}, ...]}`` (the
                Revisited Oxford/Paris ground truth layout; ``"ok"`` is read as ``"easy"``).
==============  ==============================================================================
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
from PIL import Image

from dinolab.data.images import list_images, load_rgb

SPLITS = ("train", "val", "test")


# ---------------------------------------------------------------------------------------------- images
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
            check_image_array(self.array, self.name)

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


def check_image_array(x: np.ndarray, name: str) -> None:
    """Raise a one-line ValueError unless ``x`` is uint8 [N, H, W, 3] with N > 0."""
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3 or len(x) == 0:
        raise ValueError(f"{name} must be a non-empty uint8 array [N, H, W, 3], got {x.dtype} {tuple(x.shape)}")


def _require(arrays: dict, key: str, source: str, expected: str) -> np.ndarray:
    if key not in arrays:
        raise ValueError(f"{source}: missing array {key!r} ({expected}); found {', '.join(sorted(arrays))}")
    return arrays[key]


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    if not path.exists():
        raise FileNotFoundError(f"data file {path} does not exist")
    with np.load(path, allow_pickle=False) as d:
        return {k: d[k] for k in d.files}


# ---------------------------------------------------------------------------------------------- classification
@dataclass
class LabelledImages:
    images: ImageSet
    labels: np.ndarray  # int64 [N]


@dataclass
class ClassificationData:
    """Splits (``train`` and at least one of ``val`` / ``test``) and class names."""

    splits: dict[str, LabelledImages]
    class_names: list[str]
    source: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def split(self, name: str) -> LabelledImages:
        if name not in self.splits:
            raise ValueError(f"{self.source}: no {name!r} split (found {', '.join(self.splits)})")
        return self.splits[name]

    @property
    def eval_split(self) -> str:
        """The split results are reported on: ``test`` when present, else ``val``."""
        return "test" if "test" in self.splits else "val"


CLASSIFICATION_EXPECTED = "classification npz needs x_train, y_train and x_test/y_test and/or x_val/y_val"


def load_classification(path: str | Path) -> ClassificationData:
    """Read a classification ``.npz`` or class-per-folder directory (see module docstring)."""
    path = Path(path)
    data = _classification_from_dir(path) if path.is_dir() else _classification_from_npz(path)
    _check_classification(data)
    return data


def _classification_from_npz(path: Path) -> ClassificationData:
    arrays = _read_npz(path)
    splits = {}
    for split in SPLITS:
        if f"x_{split}" not in arrays and f"y_{split}" not in arrays:
            continue
        x = _require(arrays, f"x_{split}", str(path), CLASSIFICATION_EXPECTED)
        y = _require(arrays, f"y_{split}", str(path), CLASSIFICATION_EXPECTED)
        splits[split] = LabelledImages(ImageSet(array=x, name=f"{path.name}:x_{split}"), _as_labels(y, path, split))
    if "class_names" in arrays:
        names = [str(s) for s in arrays["class_names"]]
    else:
        names = [str(i) for i in range(int(max(s.labels.max() for s in splits.values())) + 1)] if splits else []
    return ClassificationData(splits, names, str(path))


def _as_labels(y: np.ndarray, path: Path, split: str) -> np.ndarray:
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise ValueError(f"{path}: y_{split} must be a 1-D integer array, got {y.dtype} {tuple(y.shape)}")
    return y.astype(np.int64)


def _classification_from_dir(root: Path) -> ClassificationData:
    split_dirs = {s: root / s for s in SPLITS if (root / s).is_dir()}
    if "train" not in split_dirs:
        raise ValueError(f"{root}: expected sub-folders train/ and test/ (or val/), each with one folder per class")
    class_names = sorted(d.name for d in split_dirs["train"].iterdir() if d.is_dir())
    if not class_names:
        raise ValueError(f"{root / 'train'}: no class folders found")
    index = {name: i for i, name in enumerate(class_names)}
    splits = {}
    for split, d in split_dirs.items():
        paths, labels = [], []
        for cls_dir in sorted(p for p in d.iterdir() if p.is_dir()):
            if cls_dir.name not in index:
                raise ValueError(f"{cls_dir}: class {cls_dir.name!r} does not exist in {root / 'train'}")
            found = list_images(cls_dir)
            paths += found
            labels += [index[cls_dir.name]] * len(found)
        if not paths:
            raise ValueError(f"{d}: no images found in its class folders")
        splits[split] = LabelledImages(ImageSet(paths=paths, name=str(d)), np.array(labels, dtype=np.int64))
    return ClassificationData(splits, class_names, str(root))


def _check_classification(data: ClassificationData) -> None:
    if "train" not in data.splits or not ({"val", "test"} & set(data.splits)):
        raise ValueError(f"{data.source}: missing splits ({CLASSIFICATION_EXPECTED}); found {sorted(data.splits)}")
    c = data.num_classes
    for split, s in data.splits.items():
        if len(s.labels) != len(s.images):
            raise ValueError(f"{data.source}: {split} has {len(s.images)} images but {len(s.labels)} labels")
        if s.labels.min() < 0 or s.labels.max() >= c:
            raise ValueError(
                f"{data.source}: y_{split} holds labels in {s.labels.min()}..{s.labels.max()}, expected 0..{c - 1}"
                f" ({c} classes)"
            )


# ---------------------------------------------------------------------------------------------- segmentation
@dataclass
class SegmentationSplit:
    images: ImageSet
    masks: list[np.ndarray]  # int64 [H, W] each, same H, W as the matching image


@dataclass
class SegmentationData:
    splits: dict[str, SegmentationSplit]
    class_names: list[str]
    ignore_index: int
    source: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def split(self, name: str) -> SegmentationSplit:
        if name not in self.splits:
            raise ValueError(f"{self.source}: no {name!r} split (found {', '.join(self.splits)})")
        return self.splits[name]


SEGMENTATION_EXPECTED = "segmentation npz needs x_train, mask_train and x_val/mask_val and/or x_test/mask_test"


def load_segmentation(
    path: str | Path, num_classes: int | None = None, ignore_index: int | None = None
) -> SegmentationData:
    """Read a segmentation ``.npz`` or image/mask folders (see module docstring).

    Args:
        num_classes: needed only when the data has no ``class_names``; otherwise the mask maximum + 1.
        ignore_index: overrides the stored one; default 255.
    """
    path = Path(path)
    data = _segmentation_from_dir(path) if path.is_dir() else _segmentation_from_npz(path)
    if ignore_index is not None:
        data.ignore_index = ignore_index
    if not data.class_names:
        n = num_classes or 1 + max(int(m[m != data.ignore_index].max(initial=0)) for m in _all_masks(data))
        data.class_names = [str(i) for i in range(n)]
    _check_segmentation(data)
    return data


def _all_masks(data: SegmentationData):
    for s in data.splits.values():
        yield from s.masks


def _segmentation_from_npz(path: Path) -> SegmentationData:
    arrays = _read_npz(path)
    splits = {}
    for split in SPLITS:
        if f"x_{split}" not in arrays and f"mask_{split}" not in arrays:
            continue
        x = _require(arrays, f"x_{split}", str(path), SEGMENTATION_EXPECTED)
        m = _require(arrays, f"mask_{split}", str(path), SEGMENTATION_EXPECTED)
        images = ImageSet(array=x, name=f"{path.name}:x_{split}")
        if m.ndim != 3 or m.shape != x.shape[:3] or m.dtype.kind not in "iu":
            raise ValueError(f"{path}: mask_{split} must be integer [N, H, W] = {x.shape[:3]}, got {m.dtype} {m.shape}")
        splits[split] = SegmentationSplit(images, [mi.astype(np.int64) for mi in m])
    names = [str(s) for s in arrays["class_names"]] if "class_names" in arrays else []
    ignore = int(arrays["ignore_index"]) if "ignore_index" in arrays else 255
    return SegmentationData(splits, names, ignore, str(path))


def _segmentation_from_dir(root: Path) -> SegmentationData:
    splits = {}
    for split in SPLITS:
        img_dir, mask_dir = root / split / "images", root / split / "masks"
        if not img_dir.is_dir():
            continue
        if not mask_dir.is_dir():
            raise ValueError(f"{root / split}: expected images/ and masks/ sub-folders")
        masks_by_stem = {p.stem: p for p in list_images(mask_dir)}
        paths, masks = [], []
        for p in list_images(img_dir):
            if p.stem not in masks_by_stem:
                raise ValueError(f"{p}: no mask with the same file stem in {mask_dir}")
            with Image.open(masks_by_stem[p.stem]) as im:
                mask = np.asarray(im)
            if mask.ndim != 2:
                raise ValueError(f"{masks_by_stem[p.stem]}: masks must be single-channel (class index per pixel)")
            paths.append(p)
            masks.append(mask.astype(np.int64))
        splits[split] = SegmentationSplit(ImageSet(paths=paths, name=str(img_dir)), masks)
    return SegmentationData(splits, [], 255, str(root))


def _check_segmentation(data: SegmentationData) -> None:
    if "train" not in data.splits or not ({"val", "test"} & set(data.splits)):
        raise ValueError(f"{data.source}: missing splits ({SEGMENTATION_EXPECTED}); found {sorted(data.splits)}")
    c, ignore = data.num_classes, data.ignore_index
    for split, s in data.splits.items():
        for i, m in enumerate(s.masks):
            bad = (m != ignore) & ((m < 0) | (m >= c))
            if bad.any():
                raise ValueError(
                    f"{data.source}: mask_{split}[{i}] holds label {int(m[bad][0])}, expected 0..{c - 1}"
                    f" or ignore_index {ignore}"
                )
        if s.images.paths is not None:  # array masks were checked against the array shape on reading
            for i in range(len(s.masks)):
                hw = s.images[i].shape[:2]
                if s.masks[i].shape != hw:
                    raise ValueError(f"{s.images.paths[i]}: image is {hw} but its mask is {s.masks[i].shape}")


# ---------------------------------------------------------------------------------------------- depth
@dataclass
class DepthSplit:
    images: ImageSet
    depth: np.ndarray  # float32 [N, H, W] metres, 0 = invalid


@dataclass
class DepthGroup:
    """One depth domain with its own range: ``train`` None means evaluate leave-one-out on ``test``."""

    name: str
    test: DepthSplit
    train: DepthSplit | None = None


@dataclass
class DepthData:
    groups: dict[str, DepthGroup]
    source: str
    max_depth: float | None = None  # stored in the file (``max_depth`` scalar), else per group


DEPTH_EXPECTED = "depth npz needs x_train/depth_train and x_test/depth_test, or x_<group>/depth_<group>_m pairs"


def load_depth(path: str | Path) -> DepthData:
    """Read a depth ``.npz`` (see module docstring)."""
    path = Path(path)
    arrays = _read_npz(path)
    name = str(path)
    if "x_train" in arrays or "x_test" in arrays:
        train = _depth_split(arrays, "train", name)
        test = _depth_split(arrays, "test", name)
        groups = {"default": DepthGroup("default", test=test, train=train)}
    else:
        group_names = [k[2:] for k in sorted(arrays) if k.startswith("x_") and k[2:] not in SPLITS]
        groups = {g: DepthGroup(g, test=_depth_split(arrays, g, name)) for g in group_names}
        if not groups:
            raise ValueError(f"{name}: no depth images found ({DEPTH_EXPECTED}); found {', '.join(sorted(arrays))}")
    max_depth = float(arrays["max_depth"]) if "max_depth" in arrays else None
    return DepthData(groups, name, max_depth)


def _depth_split(arrays: dict, split: str, source: str) -> DepthSplit:
    x = _require(arrays, f"x_{split}", source, DEPTH_EXPECTED)
    key = f"depth_{split}_m" if f"depth_{split}_m" in arrays else f"depth_{split}"
    d = _require(arrays, key, source, DEPTH_EXPECTED)
    check_image_array(x, f"{source}:x_{split}")
    if d.shape != x.shape[:3] or d.dtype.kind != "f":
        raise ValueError(f"{source}: {key} must be float [N, H, W] = {x.shape[:3]} in metres, got {d.dtype} {d.shape}")
    if np.isnan(d).any() or (d < 0).any():
        raise ValueError(f"{source}: {key} holds NaN or negative depths; mark invalid pixels with 0")
    if not (d > 0).any():
        raise ValueError(f"{source}: {key} has no valid (> 0) depth pixel")
    return DepthSplit(ImageSet(array=x, name=f"{Path(source).name}:x_{split}"), d.astype(np.float32))


# ---------------------------------------------------------------------------------------------- retrieval
@dataclass
class RetrievalData:
    """Queries, database and per-query ground truth (database indices)."""

    queries: ImageSet
    database: ImageSet
    gnd: list[dict[str, np.ndarray]]  # per query: "easy", "hard", "junk" -> int64 index arrays
    source: str
    notes: list[str] = field(default_factory=list)

    @property
    def has_hard(self) -> bool:
        return any(len(g["hard"]) for g in self.gnd)


RETRIEVAL_EXPECTED = "retrieval npz needs x_query, x_db and relevance [Q, M] (1 easy, 2 hard, -1 junk, 0 negative)"


def gnd_from_relevance(relevance: np.ndarray) -> list[dict[str, np.ndarray]]:
    """Relevance matrix [Q, M] (1 easy, 2 hard, -1 junk, 0 negative) -> per-query index lists."""
    return [
        {"easy": np.flatnonzero(r == 1), "hard": np.flatnonzero(r == 2), "junk": np.flatnonzero(r == -1)}
        for r in relevance
    ]


def load_retrieval(path: str | Path) -> RetrievalData:
    """Read a retrieval ``.npz`` or ``.json`` (see module docstring)."""
    path = Path(path)
    if path.suffix == ".json":
        return _retrieval_from_json(path)
    arrays = _read_npz(path)
    xq = _require(arrays, "x_query", str(path), RETRIEVAL_EXPECTED)
    xd = _require(arrays, "x_db", str(path), RETRIEVAL_EXPECTED)
    rel = _require(arrays, "relevance", str(path), RETRIEVAL_EXPECTED)
    if rel.shape != (len(xq), len(xd)) or not np.isin(rel, (-1, 0, 1, 2)).all():
        raise ValueError(f"{path}: relevance must be [Q, M] = {(len(xq), len(xd))} with values in -1, 0, 1, 2")
    notes = [str(arrays["note"])] if "note" in arrays else []
    return RetrievalData(
        ImageSet(array=xq, name=f"{path.name}:x_query"),
        ImageSet(array=xd, name=f"{path.name}:x_db"),
        gnd_from_relevance(rel),
        str(path),
        notes,
    )


def _retrieval_from_json(path: Path) -> RetrievalData:
    spec = json.loads(path.read_text())
    root = Path(spec.get("root", path.parent))
    if not root.is_absolute():
        root = path.parent / root
    for key in ("queries", "database", "gnd"):
        if key not in spec:
            raise ValueError(f"{path}: missing key {key!r} (expected queries, database, gnd)")
    if len(spec["gnd"]) != len(spec["queries"]):
        raise ValueError(f"{path}: {len(spec['queries'])} queries but {len(spec['gnd'])} gnd entries")
    m = len(spec["database"])
    gnd, boxes = [], []
    for q, g in enumerate(spec["gnd"]):
        entry = {k: np.asarray(g.get(k, []), dtype=np.int64) for k in ("easy", "hard", "junk")}
        entry["easy"] = np.union1d(entry["easy"], np.asarray(g.get("ok", []), dtype=np.int64))
        for k, idx in entry.items():
            if len(idx) and (idx.min() < 0 or idx.max() >= m):
                raise ValueError(f"{path}: gnd[{q}].{k} has index {int(idx.max())} outside 0..{m - 1}")
        gnd.append(entry)
        boxes.append(tuple(g["bbx"]) if "bbx" in g else None)
    queries = ImageSet(
        paths=[root / p for p in spec["queries"]],
        name=f"{path.name}:queries",
        crop_boxes=boxes if any(b is not None for b in boxes) else None,
    )
    database = ImageSet(paths=[root / p for p in spec["database"]], name=f"{path.name}:database")
    return RetrievalData(queries, database, gnd, str(path), list(spec.get("notes", [])))
