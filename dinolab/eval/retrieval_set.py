"""A constructed retrieval set, and the npz format retrieval sets are saved in.

No retrieval benchmark is available offline, so :func:`build_augmented_retrieval_set` constructs
one from any image array (``bench/eval_table.py`` uses the Imagenette test images): every query
image gets ``easy_copies`` mildly augmented copies (large crop, flip, light colour change) and
``hard_copies`` strongly augmented ones (10-30% crop, strong colour jitter, grey) in the database,
plus ``junk_copies`` tiny crops (1-3% of the area: may not show the object, so ignored as
Revisited junk); the non-query images are distractors. Results on it are marked as a constructed
set in the outputs; they measure robustness to augmentation, not landmark retrieval.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from dinolab.data.augment import color_jitter, sample_crop_box
from dinolab.eval.data import ImageSet, RetrievalData, gnd_from_relevance
from dinolab.utils.io import atomic_save_npz

CONSTRUCTED_NOTE = (
    "constructed retrieval set: query images with augmented copies of themselves as positives "
    "(easy: mild, hard: strong augmentation; junk: tiny crops, ignored) among distractor images; "
    "not a standard benchmark"
)


def _augmented_copy(image: np.ndarray, strength: str, rng: np.random.Generator) -> np.ndarray:
    """A random crop (resized back to the image size) with flip and colour changes."""
    pil = Image.fromarray(image)
    scale = {"easy": (0.5, 1.0), "hard": (0.1, 0.3), "junk": (0.01, 0.03)}[strength]
    top, left, h, w = sample_crop_box(pil.width, pil.height, scale, (3 / 4, 4 / 3), rng)
    pil = pil.resize(pil.size, Image.BICUBIC, box=(left, top, left + w, top + h))
    if rng.random() < 0.5:
        pil = pil.transpose(Image.FLIP_LEFT_RIGHT)
    if strength == "easy":
        pil = color_jitter(pil, rng, 0.2, 0.2, 0.2, 0.0)
    elif strength == "hard":
        pil = color_jitter(pil, rng, 0.4, 0.4, 0.4, 0.1)
        if rng.random() < 0.3:
            pil = pil.convert("L").convert("RGB")
    return np.asarray(pil)


def build_augmented_retrieval_set(
    images: np.ndarray,
    n_queries: int = 200,
    easy_copies: int = 2,
    hard_copies: int = 2,
    junk_copies: int = 1,
    seed: int = 0,
    source: str = "images",
) -> RetrievalData:
    """A retrieval set from an image array [N, H, W, 3] (see module docstring); deterministic in ``seed``.

    Queries are ``n_queries`` random images; the database holds their augmented copies and the
    other N - n_queries images, shuffled.
    """
    if not 0 < n_queries < len(images):
        raise ValueError(f"n_queries must be in 1..{len(images) - 1} for {len(images)} images, got {n_queries}")
    rng = np.random.default_rng(seed)
    query_idx = np.sort(rng.choice(len(images), n_queries, replace=False))
    distractors = np.setdiff1d(np.arange(len(images)), query_idx)
    kinds = [("easy", 1)] * easy_copies + [("hard", 2)] * hard_copies + [("junk", -1)] * junk_copies
    db_images, owner, code = [images[i] for i in distractors], [-1] * len(distractors), [0] * len(distractors)
    for q, i in enumerate(query_idx):
        for strength, c in kinds:
            db_images.append(_augmented_copy(images[i], strength, rng))
            owner.append(q)
            code.append(c)
    order = rng.permutation(len(db_images))
    owner, code = np.asarray(owner)[order], np.asarray(code)[order]
    relevance = np.zeros((n_queries, len(order)), dtype=np.int8)
    copies = owner >= 0
    relevance[owner[copies], np.flatnonzero(copies)] = code[copies]
    note = f"{CONSTRUCTED_NOTE} (from {source}: {n_queries} queries, {len(order)} database images, seed {seed})"
    return RetrievalData(
        ImageSet(array=images[query_idx], name=f"{source}:queries"),
        ImageSet(array=np.stack(db_images)[order], name=f"{source}:constructed-db"),
        gnd_from_relevance(relevance),
        source,
        [note],
    )


def relevance_matrix(data: RetrievalData) -> np.ndarray:
    """int8 [Q, M]: 1 easy, 2 hard, -1 junk, 0 negative (the npz format)."""
    rel = np.zeros((len(data.queries), len(data.database)), dtype=np.int8)
    for q, g in enumerate(data.gnd):
        rel[q, g["easy"]], rel[q, g["hard"]], rel[q, g["junk"]] = 1, 2, -1
    return rel


def save_retrieval_npz(data: RetrievalData, path: str) -> None:
    """Write an in-memory (array) retrieval set in the npz format :func:`~dinolab.eval.data.load_retrieval` reads."""
    if data.queries.array is None or data.database.array is None:
        raise ValueError("only retrieval sets held as image arrays can be saved as npz")
    atomic_save_npz(
        path, x_query=data.queries.array, x_db=data.database.array, relevance=relevance_matrix(data),
        note=np.array(" | ".join(data.notes)),
    )
