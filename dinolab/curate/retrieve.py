"""Retrieve pool images close to curated seed sets (DINOv2 App. A.4) and write the manifest.

* **sample-based** (large seed sets): the N nearest deduplicated pool images of every seed image
  (N = 4 by default; the paper uses 4 for GLDv2 and ImageNet-22k, 32 for ImageNet-1k);
* **cluster-based** (small seed sets): count, per k-means cluster of the pool, how many of the
  seed images' nearest pool images fall in it; every cluster holding **more than** ``min_hits``
  (3) of them contributes up to ``per_cluster`` images (10,000 in the paper), closest to the
  centroid first;
* a cap per seed set (1M in the paper): sample-based keeps the most similar images,
  cluster-based takes whole clusters in decreasing hit count and cuts the last one.

``method="auto"`` picks cluster-based for seed sets smaller than ``cluster_below`` images.
Each record: ``{"path", "row", "seed_set", "method", "similarity"}``; ``similarity`` is to the
nearest seed image (sample-based) or to the cluster centroid (cluster-based). The union over seed
sets keeps one record per pool image (the most similar) and is what ``dinolab train --data
curated.jsonl`` reads (it uses ``"path"``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from dinolab.curate import collective
from dinolab.curate.cluster import ClusterAssignment
from dinolab.curate.index import PoolIndex
from dinolab.curate.selection import select_per_cluster, sort_key
from dinolab.curate.store import ArrayEmbeddings, EmbeddingStore
from dinolab.utils.io import atomic_path

METHODS = ("auto", "sample", "cluster")


@dataclass
class RetrieveConfig:
    """Retrieval settings (paper values as defaults).

    Attributes:
        method: ``auto``, ``sample`` or ``cluster``.
        cluster_below: ``auto`` uses cluster-based retrieval for seed sets with fewer images.
        n_per_seed: sample-based: pool images per seed image (N).
        hits_per_seed: cluster-based: nearest pool images per seed image counted as cluster hits.
        min_hits: cluster-based: a cluster is used when it holds more than this many hits.
        per_cluster: cluster-based: images taken from each used cluster (M).
        cap: most images retrieved for one seed set.
        cluster_sampling: which members of a cluster: ``closest`` to the centroid or ``random``.
        seed: seed for ``random``.
    """

    method: str = "auto"
    cluster_below: int = 1_000_000
    n_per_seed: int = 4
    hits_per_seed: int = 4
    min_hits: int = 3
    per_cluster: int = 10_000
    cap: int = 1_000_000
    cluster_sampling: str = "closest"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"retrieval method must be one of {METHODS}, got {self.method!r}")

    def method_for(self, num_seeds: int) -> str:
        if self.method != "auto":
            return self.method
        return "cluster" if num_seeds < self.cluster_below else "sample"


def sample_based(
    index: PoolIndex, seeds: EmbeddingStore | np.ndarray, n_per_seed: int, cap: int
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The ``n_per_seed`` nearest pool rows of every seed image, deduplicated, at most ``cap``.

    Args:
        index: index over the deduplicated pool (a :class:`PoolIndex`, or collectively a
            :class:`~dinolab.curate.sharded.ShardedIndex`).
        seeds: [S, D] unit seed embeddings, or a store of them (searched by :func:`search_seed_set`).

    Returns:
        rows [R] int64 and their similarity to the nearest seed [R] float32, most similar first
        (``None, None`` on ranks other than 0).
    """
    sims, rows = search_seed_set(index, seeds, n_per_seed)
    if sims is None:
        return None, None
    return best_unique(rows.ravel(), sims.ravel(), cap)


def search_seed_set(
    index: PoolIndex, seeds: EmbeddingStore | np.ndarray, k: int, gather: bool = True
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """k nearest pool rows of every seed, each rank searching its own chunks of the seed set (collective
    with a sharded index); the candidates are gathered on rank 0 (``gather``) or stay on their rank.

    Returns:
        sims [S, k], rows [S, k] on rank 0 (seeds in rank-then-chunk order); ``None, None`` elsewhere;
        without ``gather``, this rank's seeds' on every rank.
    """
    if isinstance(seeds, np.ndarray):
        seeds = ArrayEmbeddings(seeds)
    mine = collective.my_chunks(seeds.num_chunks())
    found = []
    for j in range(collective.lockstep_rounds(len(mine))):
        queries = seeds.chunk_view(mine[j])[1] if j < len(mine) else np.zeros((0, seeds.dim), np.float32)
        sims, rows = index.search(queries, k)
        if j < len(mine):
            found.append((sims, rows))
    gathered = [part for per_rank in collective.all_gather(found) for part in per_rank] if gather else found
    if gather and collective.dist_env()[0] != 0:
        return None, None
    if not gathered:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    return np.concatenate([s for s, _ in gathered]), np.concatenate([r for _, r in gathered])


def best_unique(rows: np.ndarray, sims: np.ndarray, cap: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row once with its highest similarity, most similar first (ties by row), at most ``cap``.

    Args:
        rows: [R] pool rows (-1 = no result, dropped).
        sims: [R] similarities.
    """
    valid = rows >= 0
    sims, rows = sims[valid], rows[valid]
    order = np.lexsort((rows, -sims))  # most similar first, ties by row
    rows, sims = rows[order], sims[order]
    _, first = np.unique(rows, return_index=True)  # first occurrence = highest similarity
    first = np.sort(first)[:cap]
    return rows[first], sims[first]


def cluster_based(
    hits: np.ndarray, clusters: ClusterAssignment, min_hits: int, per_cluster: int, cap: int, strategy: str, seed: int
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Images of the clusters with more than ``min_hits`` hits, ``per_cluster`` each, at most ``cap``.

    Collective under torchrun: cluster sizes are all-reduced, each rank proposes the members of its own
    rows (:func:`~dinolab.curate.selection.select_per_cluster`), rank 0 makes the choice.

    Args:
        hits: [K] hits per cluster (seeds' nearest pool images in it, :func:`retrieve_sharded`); the same
            on every rank.
        clusters: this rank's part of the k-means assignment of the pool.

    Returns:
        rows [R] int64 and their similarity to their centroid [R] float32, grouped by cluster in
        decreasing hit count (ties: lower cluster id first), on rank 0; ``None, None`` elsewhere.
    """
    num_clusters = len(clusters.centroids)
    hits = np.pad(hits, (0, max(0, num_clusters - len(hits))))[:num_clusters]
    chosen = np.nonzero(hits > min_hits)[0]
    chosen = chosen[np.lexsort((chosen, -hits[chosen]))]
    sizes = collective.all_reduce_sum(np.bincount(clusters.cluster, minlength=num_clusters))
    take = np.minimum(sizes[chosen], per_cluster)
    # The cap cuts in cluster order: full clusters first, then part of the one that crosses it.
    before = np.cumsum(take) - take
    take = np.clip(cap - before, 0, take)
    quota = np.zeros(num_clusters, dtype=np.int64)
    quota[chosen] = take
    key = sort_key(strategy, clusters.rows, clusters.sim, seed)
    rows, cluster, sim = select_per_cluster(clusters.rows, clusters.cluster, clusters.sim, key, quota, to_root=True)
    if rows is None:
        return None, None
    rank_of_cluster = np.full(num_clusters, num_clusters, dtype=np.int64)
    rank_of_cluster[chosen] = np.arange(len(chosen))
    order = np.lexsort((-sim, rank_of_cluster[cluster]))
    return rows[order], sim[order].astype(np.float32)


@dataclass
class Retrieved:
    """The pool rows one method retrieved for one seed set, as columns (16 bytes a row, not a dict a row).

    Attributes:
        seed_set: the seed set's name (``"hierarchical"`` for the hierarchical sample).
        method: ``sample``, ``cluster`` or ``hierarchical``.
        rows: [R] int64 pool rows.
        sims: [R] float64 similarities, rounded to 6 decimals as the manifest writes them.
    """

    seed_set: str
    method: str
    rows: np.ndarray
    sims: np.ndarray

    @classmethod
    def of(cls, seed_set: str, method: str, rows: np.ndarray, sims: np.ndarray) -> Retrieved:
        rounded = np.array([round(float(sim), 6) for sim in np.asarray(sims).ravel()], dtype=np.float64)
        return cls(seed_set, method, np.asarray(rows, dtype=np.int64).ravel(), rounded)


def _every_entry(sets: list[Retrieved]) -> tuple[np.ndarray, np.ndarray]:
    """(set, position) of every row of every set, in order."""
    which = [np.full(len(s.rows), i, np.int64) for i, s in enumerate(sets)]
    position = [np.arange(len(s.rows), dtype=np.int64) for s in sets]
    return np.concatenate(which or [np.zeros(0, np.int64)]), np.concatenate(position or [np.zeros(0, np.int64)])


def union(sets: list[Retrieved]) -> tuple[np.ndarray, np.ndarray]:
    """One entry per pool row over all ``sets``: the most similar (ties: the earliest set, then the earliest
    position in it); sorted by row.

    Returns:
        (set [U], position [U]): which of ``sets`` and which position in it each kept entry is.
    """
    which, position = _every_entry(sets)
    if not sets:
        return which, position
    rows = np.concatenate([s.rows for s in sets])
    sims = np.concatenate([s.sims for s in sets])
    order = np.lexsort((np.arange(len(rows)), -sims, rows))  # by row, most similar first, earliest first
    first = order[np.r_[True, rows[order][1:] != rows[order][:-1]]] if len(order) else order
    return which[first], position[first]


# Manifest lines are written in blocks of this many rows (bounds the paths looked up at once).
WRITE_BLOCK = 65536


def write_jsonl(
    path: str | Path,
    sets: list[Retrieved],
    entries: tuple[np.ndarray, np.ndarray] | None = None,
    paths_of: Callable[[np.ndarray], list[str] | None] | None = None,
) -> int:
    """The manifest: one JSON line ``{"path", "row", "seed_set", "method", "similarity"}`` per entry, written
    atomically and streamed (no record objects for the whole manifest).

    Args:
        sets: the retrieved sets.
        entries: (set, position) of each line (:func:`union`); default every row of every set in order.
        paths_of: pool rows -> image paths (``None`` entries when the pool has none).

    Returns:
        lines written.
    """
    which, position = entries if entries is not None else _every_entry(sets)
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        for start in range(0, len(which), WRITE_BLOCK):
            block = list(zip(which[start : start + WRITE_BLOCK], position[start : start + WRITE_BLOCK], strict=True))
            rows = [int(sets[w].rows[p]) for w, p in block]
            paths = paths_of(np.array(rows, np.int64)) if paths_of is not None else None
            for j, ((w, p), row) in enumerate(zip(block, rows, strict=True)):
                f.write(json.dumps({"path": None if paths is None else paths[j], "row": row,
                                    "seed_set": sets[w].seed_set, "method": sets[w].method,
                                    "similarity": float(sets[w].sims[p])}) + "\n")
    return int(len(which))


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def retrieve_sharded(
    name: str,
    seeds: EmbeddingStore,
    index: Any,
    clusters: ClusterAssignment | None,
    cfg: RetrieveConfig,
) -> tuple[str, np.ndarray | None, np.ndarray | None]:
    """Run the configured method for one seed set (collective under torchrun; also in one process).

    Each rank searches its own chunks of the seed set (``rank, rank + W, ...``) in ``index`` (a
    :class:`~dinolab.curate.sharded.ShardedIndex`: every rank's shard of the kept pool, or one
    :class:`PoolIndex`); rank 0 gathers the candidates (rows and similarities, ``n_per_seed`` or
    ``hits_per_seed`` per seed) and applies the cap (sample-based) or the cluster choice, quotas and cap
    (cluster-based, with ``clusters``, rank 0's).

    Returns:
        (method, pool rows [R], similarities [R]) on rank 0; (method, None, None) on other ranks.
    """
    method = cfg.method_for(seeds.num_rows)
    if method == "sample":
        return (method, *sample_based(index, seeds, cfg.n_per_seed, cfg.cap))
    if clusters is None:
        raise ValueError(f"seed set {name!r}: cluster-based retrieval needs the cluster stage")
    _, rows = search_seed_set(index, seeds, cfg.hits_per_seed, gather=False)
    # every rank counts the hits that fall in its own rows
    candidates = np.concatenate(collective.all_gather(rows[rows >= 0].ravel()))
    hit = clusters.clusters_of(candidates)
    hits = collective.all_reduce_sum(np.bincount(hit[hit >= 0], minlength=len(clusters.centroids)))
    return (method, *cluster_based(hits, clusters, cfg.min_hits, cfg.per_cluster, cfg.cap, cfg.cluster_sampling,
                                   cfg.seed))
