"""Spherical k-means of the pool with Faiss, trained on a sample and assigned chunk by chunk.

DINOv2 App. A.4 clusters the deduplicated pool into 100k clusters for cluster-based retrieval.
The pool k-means (:func:`pool_kmeans`) trains on at most ``max_points_per_centroid x k`` rows (a random
sample), each rank holding the sample rows of its own chunks, with centroid sums and counts
all-reduced per iteration (:func:`sharded_kmeans`); every row is then assigned to its most similar
centroid, one chunk per resumable shard, each rank its own chunks. Memory per rank: its part of the
sample, the ``k x D`` centroids and integer sums, one chunk; on rank 0 the per-row results
(12 bytes x N) for retrieval. :func:`lloyd` also serves hierarchical k-means.

Stage folder: ``centroids.npy`` [K, D] and one shard per chunk with ``rows``, ``cluster``, ``sim``.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

from dinolab.curate import collective
from dinolab.curate.collective import fixed_point
from dinolab.curate.stages import Stage
from dinolab.curate.store import EmbeddingStore, l2_normalize
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


def _sample_by_chunk(store: EmbeddingStore, sample: np.ndarray) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """(chunk, positions in ``sample``, embeddings) of the sample rows in each of this rank's chunks."""
    parts = []
    for chunk in collective.my_chunks(store.num_chunks()):
        start, emb = store.chunk(chunk)
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
    parts = _sample_by_chunk(store, sample)
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


def sharded_kmeans(store: EmbeddingStore, rows: np.ndarray, cfg: KMeansConfig) -> np.ndarray:
    """Spherical k-means of a sample of ``rows`` (``max_points_per_centroid x k`` rows drawn with ``cfg.seed``),
    each rank holding the sample rows of its own chunks (:func:`lloyd`).

    Returns:
        centroids [k, D] float32, unit norm (on every rank).
    """
    k = cfg.resolved_k(len(rows))
    return lloyd(store, sample_rows(rows, k * cfg.max_points_per_centroid, cfg.seed), k, cfg.n_iter, cfg.seed)


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
    parts = _sample_by_chunk(store, sample)
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
            np.add.at(sums, cluster, fixed_point(emb))
            counts += np.bincount(cluster, minlength=k)
        sums, counts = collective.all_reduce_sum(sums), collective.all_reduce_sum(counts)
        filled = counts > 0
        centroids[filled] = l2_normalize(sums[filled].astype(np.float64) / collective.FIXED_POINT)
    return centroids


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
