"""Spherical k-means of the pool with Faiss, trained on a sample and assigned chunk by chunk.

DINOv2 App. A.4 clusters the deduplicated pool into 100k clusters for cluster-based retrieval.
The pool k-means (:func:`pool_kmeans`) trains on at most ``max_points_per_centroid x k`` rows (a random
sample), each rank holding the sample rows of its own chunks, with centroid sums and counts
all-reduced per iteration (:func:`sharded_kmeans`, :func:`~dinolab.curate.kmeans.lloyd`); every row is then assigned to its most similar
centroid, one chunk per resumable shard, each rank its own chunks. Memory per rank: its part of the
sample, the ``k x D`` centroids and integer sums, one chunk; on rank 0 the per-row results
(20 bytes x K kept rows) for retrieval.

Stage folder: ``centroids.npy`` [K, D] and one shard per chunk with ``rows``, ``cluster``, ``sim``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dinolab.curate import collective
from dinolab.curate.kmeans import assign, lloyd
from dinolab.curate.stages import Stage
from dinolab.curate.store import EmbeddingStore
from dinolab.utils.io import atomic_path


@dataclass
class KMeansConfig:
    """Spherical k-means settings.

    Attributes:
        n_clusters: clusters; 0 picks ``N // 100`` clipped to [2, 100_000] (paper: 100k for 744M).
        n_iter: Lloyd iterations.
        max_points_per_centroid: training sample size per centroid (Faiss's default is 256).
        seed: sampling and initialisation seed.
        use_gpu: unused (exact-integer Lloyd on CPU, :func:`lloyd`; kept so that configs still load).
    """

    n_clusters: int = 0
    n_iter: int = 20
    max_points_per_centroid: int = 256
    seed: int = 0
    use_gpu: bool = True

    def resolved_k(self, n: int) -> int:
        k = self.n_clusters or int(np.clip(n // 100, 2, 100_000))
        return max(1, min(k, n))


@dataclass
class ClusterAssignment:
    """Rows of the pool and the cluster each belongs to.

    Attributes:
        centroids: [K, D] unit centroids.
        rows: [M] pool rows clustered (sorted).
        cluster: [M] int64 cluster of each row.
        sim: [M] float32 cosine similarity of each row to its centroid.
    """

    centroids: np.ndarray
    rows: np.ndarray
    cluster: np.ndarray
    sim: np.ndarray

    def cluster_of_rows(self, num_rows: int) -> np.ndarray:
        """[num_rows] cluster per pool row, -1 for rows that were not clustered."""
        lookup = np.full(num_rows, -1, dtype=np.int64)
        lookup[self.rows] = self.cluster
        return lookup


def sample_rows(rows: np.ndarray, size: int, seed: int) -> np.ndarray:
    """A sorted random subset of ``rows`` of at most ``size`` elements."""
    if size >= len(rows):
        return np.asarray(rows, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(rows, size=size, replace=False)).astype(np.int64)


def assign_chunk(store: EmbeddingStore, index: int, rows: np.ndarray, centroids: np.ndarray) -> dict[str, np.ndarray]:
    """Assignment of the selected ``rows`` that fall in chunk ``index`` of the store."""
    start, emb = store.chunk(index)
    lo, hi = np.searchsorted(rows, [start, start + len(emb)])
    chunk_rows = rows[lo:hi]
    cluster, sim = assign(centroids, emb[chunk_rows - start]) if len(chunk_rows) else (np.zeros(0, np.int64),) * 2
    return {"rows": chunk_rows, "cluster": cluster, "sim": np.asarray(sim, dtype=np.float32)}


def sharded_kmeans(store: EmbeddingStore, rows: np.ndarray, cfg: KMeansConfig) -> np.ndarray:
    """Spherical k-means of a sample of ``rows`` (``max_points_per_centroid x k`` rows drawn with ``cfg.seed``),
    each rank holding the sample rows of its own chunks (:func:`lloyd`).

    Returns:
        centroids [k, D] float32, unit norm (on every rank).
    """
    k = cfg.resolved_k(len(rows))
    return lloyd(store, sample_rows(rows, k * cfg.max_points_per_centroid, cfg.seed), k, cfg.n_iter, cfg.seed)


def pool_kmeans(store: EmbeddingStore, rows: np.ndarray, cfg: KMeansConfig, stage: Stage) -> ClusterAssignment | None:
    """Cluster ``rows`` of the pool (resumable; collective under torchrun).

    Centroids once (:func:`sharded_kmeans`, saved by rank 0 as ``centroids.npy``), then one assignment
    shard per chunk, each rank its own chunks.

    Args:
        store: the pool.
        rows: sorted pool rows to cluster (e.g. kept after deduplication); the same on every rank.
        cfg: k-means settings.
        stage: the cluster stage.

    Returns:
        The assignment on rank 0 (:func:`load_assignment`); ``None`` on other ranks.
    """
    rows = np.asarray(rows, dtype=np.int64)
    centroids_file = stage.path("centroids.npy")
    num_shards = store.num_chunks()
    rank, world_size = collective.dist_env()
    if not collective.open_stage(stage):
        if not collective.broadcast(centroids_file.exists()):
            centroids = sharded_kmeans(store, rows, cfg)
            if rank == 0:
                with atomic_path(centroids_file) as tmp:
                    with open(tmp, "wb") as f:
                        np.save(f, centroids)
            collective.barrier()
        centroids = np.load(centroids_file)
        stage.run_shards(num_shards, lambda i: assign_chunk(store, i, rows, centroids), desc="k-means assign",
                         rank=rank, world_size=world_size)
        collective.barrier()
        if rank == 0:
            stage.finish({"n_clusters": int(len(centroids)), "num_rows": int(len(rows))}, num_shards)
        collective.barrier()
    return load_assignment(stage, num_shards) if rank == 0 else None


def load_assignment(stage: Stage, num_shards: int) -> ClusterAssignment:
    """The :class:`ClusterAssignment` stored by a finished :func:`pool_kmeans` stage."""
    shards = [stage.load_shard(i) for i in range(num_shards)]
    return ClusterAssignment(
        centroids=np.load(stage.path("centroids.npy")),
        rows=np.concatenate([s["rows"] for s in shards]).astype(np.int64),
        cluster=np.concatenate([s["cluster"] for s in shards]).astype(np.int64),
        sim=np.concatenate([s["sim"] for s in shards]).astype(np.float32),
    )


def rank_in_group(groups: np.ndarray, key: np.ndarray) -> np.ndarray:
    """Position of each element within its group when the group is sorted by ``key`` ascending.

    Args:
        groups: [M] int group of each element.
        key: [M] sort key (ties broken by element index).

    Returns:
        [M] int64 rank, 0 for the element with the smallest key of its group.
    """
    order = np.lexsort((np.arange(len(groups)), key, groups))
    sorted_groups = groups[order]
    starts = np.r_[0, np.nonzero(np.diff(sorted_groups))[0] + 1]
    group_start = np.repeat(starts, np.diff(np.r_[starts, len(groups)]))
    ranks = np.empty(len(groups), dtype=np.int64)
    ranks[order] = np.arange(len(groups)) - group_start
    return ranks


def take_per_cluster(
    cluster: np.ndarray, sim: np.ndarray, quota: np.ndarray, strategy: str = "closest", seed: int = 0
) -> np.ndarray:
    """Indices of the elements selected from every cluster, at most ``quota[c]`` from cluster c.

    Args:
        cluster: [M] cluster of each element.
        sim: [M] similarity to the cluster centroid.
        quota: [K] elements wanted from each cluster.
        strategy: ``closest`` (highest similarity to the centroid first) or ``random``.
        seed: seed for ``random``.

    Returns:
        Sorted element indices [S] int64.
    """
    if strategy == "closest":
        key = -np.asarray(sim, dtype=np.float64)
    elif strategy == "random":
        key = np.random.default_rng(seed).random(len(cluster))
    else:
        raise ValueError(f"sampling strategy must be 'closest' or 'random', got {strategy!r}")
    if len(cluster) == 0:
        return np.zeros(0, dtype=np.int64)
    ranks = rank_in_group(cluster, key)
    return np.nonzero(ranks < quota[cluster])[0].astype(np.int64)
