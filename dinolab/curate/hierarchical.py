"""Hierarchical k-means with resampling, and balanced sampling from its leaves (Vo et al. 2024).

Level 1 clusters the pool rows; level l > 1 clusters the centroids of level l - 1. At each level,
when its sample size r > 1, ``resampling_steps`` times: take the r members closest to every
centroid, rerun k-means on this balanced set (warm-started from the current centroids; the
reference code re-initialises with k-means++), and reassign all members. This pulls the centroids
towards a uniform cover of the data instead of its dense modes.

Balanced sampling spreads a target size over the top-level clusters as evenly as their sizes
allow ("water-filling": every cluster gets min(size, c), the remainder goes one by one to larger
clusters), recursively down to the level-1 clusters, which give their closest-to-centroid (or
random) members. Reference defaults for web images (``cur:configs/4levels_web_based_images.yaml``):
clusters {100k x 100 split, 500k, 50k, 10k}, resampling steps {1, 10, 10, 10}, sample sizes
{1, 10, 5, 3}, 50 iterations, closest-to-centroid sampling.

Memory: level 1 as :mod:`dinolab.curate.cluster` (plus, per resampling step, the gathered
``k x r x D`` floats); upper levels hold only centroids.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dinolab.curate.cluster import assign, sample_rows, spherical_kmeans, take_per_cluster
from dinolab.curate.stages import Stage
from dinolab.curate.store import ArrayEmbeddings, EmbeddingStore
from dinolab.io import atomic_save_npz


@dataclass
class HierarchicalConfig:
    """Hierarchical k-means and balanced sampling settings (lists: one entry per level, bottom up).

    Attributes:
        n_clusters: clusters per level, decreasing.
        resampling_steps: resampling steps per level (used where the sample size is > 1).
        sample_sizes: members per cluster taken in each resampling step.
        n_iter: Lloyd iterations per k-means run.
        max_points_per_centroid: level-1 training sample per centroid.
        sampling: leaf sampling, ``closest`` or ``random``.
        target_size: images to sample; 0 = half of the clustered rows.
        seed: seed for sampling and k-means.
        use_gpu: train on GPU when faiss has GPU support.
    """

    n_clusters: list[int] = field(default_factory=lambda: [1000, 100, 10])
    resampling_steps: list[int] = field(default_factory=lambda: [1, 10, 10])
    sample_sizes: list[int] = field(default_factory=lambda: [1, 10, 5])
    n_iter: int = 50
    max_points_per_centroid: int = 256
    sampling: str = "closest"
    target_size: int = 0
    seed: int = 0
    use_gpu: bool = True

    def __post_init__(self) -> None:
        n = len(self.n_clusters)
        if n == 0 or len(self.resampling_steps) != n or len(self.sample_sizes) != n:
            raise ValueError(
                "n_clusters, resampling_steps and sample_sizes need one entry per level, got "
                f"{list(self.n_clusters)}, {list(self.resampling_steps)}, {list(self.sample_sizes)}"
            )


@dataclass
class Level:
    """One level of the hierarchy.

    Attributes:
        centroids: [K_l, D] unit centroids.
        assignment: [M_l] cluster of each item below (pool rows for level 1, level l-1 clusters above).
        sim: [M_l] similarity of each item to its centroid.
    """

    centroids: np.ndarray
    assignment: np.ndarray
    sim: np.ndarray


def _assign_store(store: EmbeddingStore, rows: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stream ``rows`` of ``store`` and assign them: cluster [M], sim [M]."""
    cluster = np.empty(len(rows), dtype=np.int64)
    sim = np.empty(len(rows), dtype=np.float32)
    for start, emb in store.iter_chunks():
        lo, hi = np.searchsorted(rows, [start, start + len(emb)])
        if hi > lo:
            cluster[lo:hi], sim[lo:hi] = assign(centroids, emb[rows[lo:hi] - start])
    return cluster, sim


def kmeans_level(
    store: EmbeddingStore, rows: np.ndarray, k: int, steps: int, sample_size: int, cfg: HierarchicalConfig
) -> Level:
    """k-means of ``rows`` of ``store`` with resampling steps (see the module docstring)."""
    k = max(1, min(k, len(rows)))
    train = store.gather(sample_rows(rows, k * cfg.max_points_per_centroid, cfg.seed))
    centroids = spherical_kmeans(train, k, cfg.n_iter, cfg.seed, None, cfg.use_gpu, cfg.max_points_per_centroid)
    cluster, sim = _assign_store(store, rows, centroids)
    for _ in range(steps if sample_size > 1 else 0):
        closest = take_per_cluster(cluster, sim, np.full(k, sample_size), "closest")
        centroids = spherical_kmeans(
            store.gather(rows[closest]), k, cfg.n_iter, cfg.seed, centroids, cfg.use_gpu, cfg.max_points_per_centroid
        )
        cluster, sim = _assign_store(store, rows, centroids)
    return Level(centroids, cluster, sim)


def hierarchical_kmeans(store: EmbeddingStore, rows: np.ndarray, cfg: HierarchicalConfig) -> list[Level]:
    """All levels, bottom up; level 1 clusters ``rows`` (sorted pool rows) of ``store``."""
    levels: list[Level] = []
    level_store, level_rows = store, np.asarray(rows, dtype=np.int64)
    for k, steps, sample_size in zip(cfg.n_clusters, cfg.resampling_steps, cfg.sample_sizes, strict=True):
        levels.append(kmeans_level(level_store, level_rows, k, steps, sample_size, cfg))
        centroids = levels[-1].centroids
        level_store, level_rows = ArrayEmbeddings(centroids), np.arange(len(centroids), dtype=np.int64)
    return levels


def split_target(sizes: np.ndarray, target: int, rng: np.random.Generator) -> np.ndarray:
    """Spread ``target`` over clusters of the given sizes as evenly as possible.

    Every cluster gets ``min(size, c)`` for the largest cap c whose total fits, and the remainder
    goes one each to randomly chosen clusters larger than c.

    Args:
        sizes: [K] int cluster sizes.
        target: total wanted (clipped to ``sizes.sum()``).

    Returns:
        [K] int64 quotas, ``quota <= sizes`` and ``quota.sum() == min(target, sizes.sum())``.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    if target >= sizes.sum():
        return sizes.copy()
    lo, hi = 0, int(sizes.max())  # invariant: total(lo) <= target < total(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if np.minimum(sizes, mid).sum() <= target:
            lo = mid
        else:
            hi = mid
    quota = np.minimum(sizes, lo)
    remainder = int(target - quota.sum())
    if remainder:
        quota[rng.choice(np.nonzero(sizes > lo)[0], size=remainder, replace=False)] += 1
    return quota


def balanced_sample(levels: list[Level], rows: np.ndarray, cfg: HierarchicalConfig) -> np.ndarray:
    """Balanced sample of pool rows from the hierarchy (module docstring).

    Args:
        levels: from :func:`hierarchical_kmeans`.
        rows: [M] pool rows clustered at level 1 (same order as ``levels[0].assignment``).
        cfg: ``target_size``, ``sampling`` and ``seed``.

    Returns:
        Sorted pool rows [S] int64.
    """
    rng = np.random.default_rng(cfg.seed)
    target = cfg.target_size or len(rows) // 2
    sizes = [np.bincount(levels[0].assignment, minlength=len(levels[0].centroids))]
    for level in levels[1:]:
        sizes.append(np.bincount(level.assignment, weights=sizes[-1], minlength=len(level.centroids)).astype(np.int64))
    quota = split_target(sizes[-1], target, rng)
    for depth in range(len(levels) - 1, 0, -1):
        parent_of_child = levels[depth].assignment
        child_quota = np.zeros(len(parent_of_child), dtype=np.int64)
        for parent in np.nonzero(quota)[0]:
            children = np.nonzero(parent_of_child == parent)[0]
            child_quota[children] = split_target(sizes[depth - 1][children], int(quota[parent]), rng)
        quota = child_quota
    picked = take_per_cluster(levels[0].assignment, levels[0].sim, quota, cfg.sampling, cfg.seed)
    return np.sort(np.asarray(rows, dtype=np.int64)[picked])


def run_hierarchical(store: EmbeddingStore, rows: np.ndarray, cfg: HierarchicalConfig, stage: Stage) -> np.ndarray:
    """Hierarchical k-means + balanced sampling as one stage (recomputed whole if interrupted).

    Writes ``levels.npz`` (``centroids_l``, ``assignment_l``, ``sim_l`` per level l = 1..L) and
    ``sample.npz`` (``rows``). Returns the sampled pool rows.
    """
    sample_file = stage.path("sample.npz")
    if not stage.done:
        stage.open()
        levels = hierarchical_kmeans(store, rows, cfg)
        arrays = {}
        for i, level in enumerate(levels, start=1):
            arrays.update(
                {f"centroids_{i}": level.centroids, f"assignment_{i}": level.assignment, f"sim_{i}": level.sim}
            )
        atomic_save_npz(stage.path("levels.npz"), **arrays)
        sample = balanced_sample(levels, rows, cfg)
        atomic_save_npz(sample_file, rows=sample)
        stage.finish({"levels": [int(len(lv.centroids)) for lv in levels], "num_sampled": int(len(sample))})
    with np.load(sample_file, allow_pickle=False) as data:
        return data["rows"]
