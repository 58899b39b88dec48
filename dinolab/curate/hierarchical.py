"""Hierarchical k-means with resampling, and balanced sampling from its leaves (Vo et al. 2024).

Level 1 clusters the pool rows; level l > 1 clusters the centroids of level l - 1. At each level,
when its sample size r > 1, ``resampling_steps`` times: take the r members closest to every
centroid, rerun k-means on this balanced set (warm-started from the current centroids; the
reference code re-initialises with k-means++, used here for the first run of each level), and
reassign all members. This pulls the centroids
towards a uniform cover of the data instead of its dense modes.

Balanced sampling spreads a target size over the top-level clusters as evenly as their sizes
allow ("water-filling": every cluster gets min(size, c), the remainder goes one by one to larger
clusters), recursively down to the level-1 clusters, which give their closest-to-centroid (or
random) members. Reference defaults for web images (``cur:configs/4levels_web_based_images.yaml``):
clusters {100k x 100 split, 500k, 50k, 10k}, resampling steps {1, 10, 10, 10}, sample sizes
{1, 10, 5, 3}, 50 iterations, closest-to-centroid sampling.

Under ``torchrun`` level 1 is distributed like the pool k-means (:func:`~dinolab.curate.kmeans.lloyd`:
each rank its own chunks, centroid sums and counts all-reduced per iteration as exact integers), and so
are its resampling steps and the leaf sampling: each rank proposes its best members per cluster, the
proposals are gathered and the choice made again. The upper levels (centroids only) run on every rank
alike. Results are byte-identical for any number of ranks. Memory per rank: the level-1 sample rows and
assignment of its own chunks, the centroids, the gathered proposals (``k x r`` rows per resampling step,
the sample itself at the end, on rank 0).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dinolab.curate import collective
from dinolab.curate.kmeans import assign, kmeans_plus_plus, lloyd, sample_rows
from dinolab.curate.selection import select_per_cluster, sort_key
from dinolab.curate.stages import Stage
from dinolab.curate.store import ArrayEmbeddings, EmbeddingStore
from dinolab.utils.io import atomic_save_npz


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
        seed: seed for sampling and k-means (``random`` sampling keys each row by it, :func:`~dinolab.curate.selection.row_keys`).
        use_gpu: unused (k-means here is exact-integer Lloyd on CPU; kept so that configs still load).
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
    """One level of the hierarchy, as this rank holds it.

    Attributes:
        centroids: [K_l, D] unit centroids (the same on every rank).
        rows: [M_l] the items clustered: at level 1 the pool rows of this rank's chunks, above it every
            cluster of level l - 1.
        assignment: [M_l] cluster of each item.
        sim: [M_l] similarity of each item to its centroid.
        sharded: the items are split over the ranks (level 1) rather than held by all.
    """

    centroids: np.ndarray
    rows: np.ndarray
    assignment: np.ndarray
    sim: np.ndarray
    sharded: bool


def _assign_rows(store: EmbeddingStore, rows: np.ndarray, centroids: np.ndarray, chunks: list[int]) -> tuple:
    """Assign the ``rows`` of ``store`` that fall in ``chunks``: (rows [m], cluster [m], sim [m])."""
    found = [(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))]
    for chunk in chunks:
        start, emb = store.chunk_view(chunk)
        lo, hi = np.searchsorted(rows, [start, start + len(emb)])
        if hi > lo:
            found.append((rows[lo:hi], *assign(centroids, emb[rows[lo:hi] - start])))
    return tuple(np.concatenate(parts) for parts in zip(*found, strict=True))


def kmeans_level(
    store: EmbeddingStore, rows: np.ndarray, k: int, steps: int, sample_size: int, cfg: HierarchicalConfig,
    sharded: bool,
) -> Level:
    """k-means of ``rows`` of ``store`` with resampling steps (see the module docstring), collective."""
    k = max(1, min(k, len(rows)))
    chunks = collective.my_chunks(store.num_chunks()) if sharded else list(range(store.num_chunks()))
    sample = sample_rows(rows, k * cfg.max_points_per_centroid, cfg.seed)
    centroids = lloyd(store, sample, k, cfg.n_iter, cfg.seed, init=kmeans_plus_plus(store, sample, k, cfg.seed))
    level = Level(centroids, *_assign_rows(store, rows, centroids, chunks), sharded=sharded)
    for _ in range(steps if sample_size > 1 else 0):
        key = sort_key("closest", level.rows, level.sim)
        closest, _, _ = select_per_cluster(level.rows, level.assignment, level.sim, key, np.full(k, sample_size),
                                           sharded)
        centroids = lloyd(store, closest, k, cfg.n_iter, cfg.seed, init=centroids)
        level = Level(centroids, *_assign_rows(store, rows, centroids, chunks), sharded=sharded)
    return level


def hierarchical_kmeans(store: EmbeddingStore, rows: np.ndarray, cfg: HierarchicalConfig) -> list[Level]:
    """All levels, bottom up; level 1 clusters ``rows`` (sorted pool rows) of ``store``, each rank those of its
    own chunks (sums all-reduced per iteration); the upper levels cluster the centroids below, on every rank."""
    levels: list[Level] = []
    level_store, level_rows = store, np.asarray(rows, dtype=np.int64)
    for k, steps, sample_size in zip(cfg.n_clusters, cfg.resampling_steps, cfg.sample_sizes, strict=True):
        levels.append(kmeans_level(level_store, level_rows, k, steps, sample_size, cfg, sharded=not levels))
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


def balanced_sample(levels: list[Level], cfg: HierarchicalConfig) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Balanced sample of pool rows from the hierarchy (module docstring), collective.

    Args:
        levels: from :func:`hierarchical_kmeans`.
        cfg: ``target_size``, ``sampling`` and ``seed``.

    Returns:
        sorted pool rows [S] int64 and their similarity to their level-1 centroid [S], on rank 0
        (``None, None`` on the others).
    """
    key = sort_key(cfg.sampling, levels[0].rows, levels[0].sim, cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    bottom = levels[0]
    sizes = [collective.all_reduce_sum(np.bincount(bottom.assignment, minlength=len(bottom.centroids)))]
    for level in levels[1:]:
        sizes.append(np.bincount(level.assignment, weights=sizes[-1], minlength=len(level.centroids)).astype(np.int64))
    quota = split_target(sizes[-1], cfg.target_size or int(sizes[0].sum()) // 2, rng)
    for depth in range(len(levels) - 1, 0, -1):
        parent_of_child = levels[depth].assignment
        child_quota = np.zeros(len(parent_of_child), dtype=np.int64)
        for parent in np.nonzero(quota)[0]:
            children = np.nonzero(parent_of_child == parent)[0]
            child_quota[children] = split_target(sizes[depth - 1][children], int(quota[parent]), rng)
        quota = child_quota
    rows, _, sims = select_per_cluster(bottom.rows, bottom.assignment, bottom.sim, key, quota, to_root=True)
    return rows, sims


def run_hierarchical(
    store: EmbeddingStore, rows: np.ndarray, cfg: HierarchicalConfig, stage: Stage
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Hierarchical k-means + balanced sampling as one stage (collective; recomputed whole if interrupted).

    Rank 0 writes ``levels.npz`` (``centroids_l`` per level l = 1..L, ``assignment_l`` and ``sim_l`` of the
    clusters below for l >= 2) and ``sample.npz`` (``rows``, ``sims``); the level-1 assignment of the pool
    rows stays split over the ranks (no per-row array of the whole pool on any rank).

    Returns:
        the sampled pool rows [S] and their similarity to their level-1 centroid [S] on rank 0;
        ``None, None`` on the others.
    """
    sample_file = stage.path("sample.npz")
    rank = collective.dist_env()[0]
    if not collective.open_stage(stage):
        levels = hierarchical_kmeans(store, rows, cfg)
        sample, sims = balanced_sample(levels, cfg)
        if rank == 0:
            arrays = {f"centroids_{i}": level.centroids for i, level in enumerate(levels, start=1)}
            for i, level in enumerate(levels[1:], start=2):
                arrays.update({f"assignment_{i}": level.assignment, f"sim_{i}": level.sim})
            atomic_save_npz(stage.path("levels.npz"), **arrays)
            atomic_save_npz(sample_file, rows=sample, sims=sims)
            stage.finish({"levels": [int(len(lv.centroids)) for lv in levels], "num_sampled": int(len(sample))})
        collective.barrier()
    if rank != 0:
        return None, None
    with np.load(sample_file, allow_pickle=False) as data:
        return data["rows"], data["sims"]
