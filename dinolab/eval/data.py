"""Evaluation datasets: reading and checking the input formats of ``dinolab eval``.

Formats (every problem is a one-line ``ValueError`` naming the input and what was expected; image
arrays are checked by :func:`dinolab.data.images.as_image_array`, the one validator):

==============  ==============================================================================
classification  a labelled set of :mod:`dinolab.data.labelled` with ``train`` and ``val`` and/or ``test``
                (as ``shared/data/cifar10`` and ``imagenette``).
segmentation    ``.npz`` with ``x_<split>`` images [N, H, W, 3] and ``mask_<split>`` [N, H, W] for
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

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from dinolab.data.images import as_image_array, list_images
from dinolab.data.labelled import (  # noqa: F401
    EXPECTED, SPLITS, ImageSet, LabelledImages, LabelledSet, NamedSplits, read_labelled)


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
ClassificationData = LabelledSet  # the protocols' name for a labelled set with an evaluation split


def load_classification(path: str | Path) -> LabelledSet:
    """Read a classification ``.npz`` or class-per-folder directory (:func:`dinolab.data.labelled.read_labelled`)
    that holds ``train`` and at least one of ``val`` / ``test``."""
    data = read_labelled(Path(path))
    if not {"val", "test"} & set(data.splits):
        raise ValueError(f"{data.source}: missing splits ({EXPECTED}); found {sorted(data.splits)}")
    return data


# ---------------------------------------------------------------------------------------------- segmentation
@dataclass
class SegmentationSplit:
    images: ImageSet
    masks: list[np.ndarray]  # int64 [H, W] each, same H, W as the matching image


@dataclass
class SegmentationData(NamedSplits):
    splits: dict[str, SegmentationSplit]
    class_names: list[str]
    ignore_index: int
    source: str


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
        masks = (m for split in data.splits.values() for m in split.masks)
        n = num_classes or 1 + max(int(m[m != data.ignore_index].max(initial=0)) for m in masks)
        data.class_names = [str(i) for i in range(n)]
    _check_segmentation(data)
    return data


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
    x = as_image_array(x, f"{source}:x_{split}")
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
