"""Spherical k-means by exact-integer Lloyd iterations, collective under ``torchrun``.

Used by the pool k-means (:mod:`dinolab.curate.cluster`) and every level of hierarchical k-means
(:mod:`dinolab.curate.hierarchical`). Each rank holds the sample rows of its own chunks; centroid sums
and counts are all-reduced per iteration as exact integers
(:func:`~dinolab.curate.collective.fixed_point`), so the centroids are byte-identical for any number of
ranks. :func:`kmeans_plus_plus` seeds them the same way (hierarchical k-means; the pool k-means draws
``k`` sample rows). Memory per rank: its part of the sample, the ``k x D`` centroids and integer sums,
one chunk.
"""

from __future__ import annotations

import faiss
import numpy as np

from dinolab.curate import collective
from dinolab.curate.collective import fixed_point
from dinolab.curate.store import EmbeddingStore, l2_normalize

# Rows converted to fixed point at a time in a Lloyd iteration (integer sums: the result does not depend on it).
FIXED_POINT_BLOCK = 4096


def sample_rows(rows: np.ndarray, size: int, seed: int) -> np.ndarray:
    """A sorted random subset of ``rows`` of at most ``size`` elements (int64)."""
    if size >= len(rows):
        return np.asarray(rows, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(rows, size=size, replace=False)).astype(np.int64)


def assign(centroids: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Most similar centroid of each vector.

    Args:
        centroids: [K, D] unit vectors.
        x: [n, D] unit vectors.

    Returns:
        cluster [n] int64, sim [n] float32.
    """
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    sims, ids = index.search(np.ascontiguousarray(x, dtype=np.float32), 1)
    return ids[:, 0].astype(np.int64), sims[:, 0]


def sample_by_chunk(store: EmbeddingStore, sample: np.ndarray) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """(chunk, positions in ``sample``, embeddings) of the sample rows in each of this rank's chunks."""
    parts = []
    for chunk in collective.my_chunks(store.num_chunks()):
        start, emb = store.chunk_view(chunk)
        lo, hi = np.searchsorted(sample, [start, start + len(emb)])
        if hi > lo:
            parts.append((chunk, np.arange(lo, hi), emb[sample[lo:hi] - start]))
    return parts


def kmeans_plus_plus(store: EmbeddingStore, sample: np.ndarray, k: int, seed: int) -> np.ndarray:
    """k-means++ seeding (Arthur & Vassilvitskii 2007) over the sorted pool rows ``sample``, collective.

    Each rank keeps, for the sample rows of its own chunks, the cosine to the nearest centre chosen so far;
    the next centre is drawn with probability proportional to ``1 - cosine`` (half the squared distance of
    unit vectors). The draw walks the per-chunk weight sums in chunk order (each chunk's sum comes from its
    owner alone, so the all-reduce is exact) and the owner of the chosen chunk sends the row to all, so the
    centres do not depend on the number of ranks. Cost: ``k`` passes over this rank's sample rows.

    Returns:
        centres [k, D] float32 (on every rank).
    """
    parts = sample_by_chunk(store, sample)
    rng = np.random.default_rng(seed)
    owned = {chunk: j for j, (chunk, _, _) in enumerate(parts)}
    nearest = [np.full(len(positions), -np.inf, np.float32) for _, positions, _ in parts]
    centres = np.zeros((k, store.dim), np.float32)
    position = int(rng.integers(len(sample)))  # the first centre: a uniform draw
    for i in range(k):
        chunk = int(np.searchsorted(store.chunk_offsets(), sample[position], side="right") - 1)
        row = None
        if chunk in owned:
            _, positions, emb = parts[owned[chunk]]
            row = emb[position - positions[0]]
        centres[i] = collective.broadcast(row, src=chunk % collective.world_size())
        if i == k - 1:
            break
        weights = np.zeros(store.num_chunks())
        for j, (chunk, _, emb) in enumerate(parts):
            nearest[j] = np.maximum(nearest[j], emb @ centres[i])
            weights[chunk] = np.maximum(0.0, 1.0 - nearest[j].astype(np.float64)).sum()
        weights = collective.all_reduce_sum(weights)
        total = np.cumsum(weights)
        if total[-1] <= 0:  # every sample row is a centre already
            position = int(rng.integers(len(sample)))
            continue
        u = rng.random() * total[-1]
        chunk = int(min(np.searchsorted(total, u, side="right"), len(total) - 1))
        found = None
        if chunk in owned:
            _, positions, _ = parts[owned[chunk]]
            within = np.cumsum(np.maximum(0.0, 1.0 - nearest[owned[chunk]].astype(np.float64)))
            found = int(positions[min(np.searchsorted(within, u - (total[chunk] - weights[chunk]), side="right"),
                                      len(within) - 1)])
        position = collective.broadcast(found, src=chunk % collective.world_size())
    return centres


def lloyd(
    store: EmbeddingStore, sample: np.ndarray, k: int, n_iter: int, seed: int, init: np.ndarray | None = None
) -> np.ndarray:
    """Spherical Lloyd iterations over the sorted pool rows ``sample``, collective under torchrun.

    As in facebookresearch/ssl-data-curation: each rank assigns the sample rows of its own chunks to the
    nearest centroid chunk by chunk, centroid sums and counts are all-reduced, and the new centroid is the
    normalised sum (a cluster left empty keeps its centroid). The sums are exact integer sums
    (:func:`~dinolab.curate.collective.fixed_point`), and every assignment is computed on the same chunk
    of rows whatever the number of ranks, so the centroids are byte-identical for any W.

    Args:
        init: [k, D] starting centroids (the same on every rank); default ``k`` sample rows drawn with ``seed``.

    Returns:
        centroids [k, D] float32, unit norm (on every rank).
    """
    parts = sample_by_chunk(store, sample)
    if init is None:
        draw = np.sort(np.random.default_rng(seed).choice(len(sample), size=k, replace=False))
        centroids = np.zeros((k, store.dim), np.int64)
        for _, positions, emb in parts:
            hit = np.isin(draw, positions)
            centroids[hit] = fixed_point(emb[draw[hit] - positions[0]])
        centroids = l2_normalize(collective.all_reduce_sum(centroids).astype(np.float64) / collective.FIXED_POINT)
    else:
        centroids = np.array(init, dtype=np.float32)
    for _ in range(n_iter):
        sums = np.zeros((k, store.dim), np.int64)
        counts = np.zeros(k, np.int64)
        for _, _, emb in parts:
            cluster, _ = assign(centroids, emb)
            for start in range(0, len(emb), FIXED_POINT_BLOCK):  # bounds the 16 bytes per value of fixed_point
                block = slice(start, start + FIXED_POINT_BLOCK)
                np.add.at(sums, cluster[block], fixed_point(emb[block]))
            counts += np.bincount(cluster, minlength=k)
        sums, counts = collective.all_reduce_sum(sums), collective.all_reduce_sum(counts)
        filled = counts > 0
        centroids[filled] = l2_normalize(sums[filled].astype(np.float64) / collective.FIXED_POINT)
    return centroids
