"""Spherical k-means of the pool with Faiss, trained on a sample and assigned chunk by chunk.

DINOv2 App. A.4 clusters the deduplicated pool into 100k clusters for cluster-based retrieval.
The pool k-means (:func:`pool_kmeans`) trains on at most ``max_points_per_centroid x k`` rows (a random
sample), each rank holding the sample rows of its own chunks, with centroid sums and counts
all-reduced per iteration (:func:`sharded_kmeans`, :func:`~dinolab.curate.kmeans.lloyd`); every row
is then assigned to its most similar centroid, one chunk per resumable shard, each rank its own chunks. Memory per rank: its part of the
sample, the ``k x D`` centroids and integer sums, one chunk, and the assignment of its own chunks
(20 bytes per kept row) for retrieval.

Stage folder: ``centroids.npy`` [K, D] and one shard per chunk with ``rows``, ``cluster``, ``sim``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dinolab.curate import collective
from dinolab.curate.kmeans import assign, lloyd, sample_rows
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
    """Rows of the pool and the cluster each belongs to: under torchrun, the rows of this rank's chunks.

    Attributes:
        centroids: [K, D] unit centroids.
        rows: [M] pool rows clustered (sorted; this rank's).
        cluster: [M] int64 cluster of each row.
        sim: [M] float32 cosine similarity of each row to its centroid.
    """

    centroids: np.ndarray
    rows: np.ndarray
    cluster: np.ndarray
    sim: np.ndarray

    def clusters_of(self, rows: np.ndarray) -> np.ndarray:
        """[n] cluster of each of the given pool rows held here, -1 for the others."""
        rows = np.asarray(rows, dtype=np.int64)
        if not len(self.rows):
            return np.full(len(rows), -1, np.int64)
        at = np.minimum(np.searchsorted(self.rows, rows), len(self.rows) - 1)
        return np.where(self.rows[at] == rows, self.cluster[at], -1)


def assign_chunk(store: EmbeddingStore, index: int, rows: np.ndarray, centroids: np.ndarray) -> dict[str, np.ndarray]:
    """Assignment of the selected ``rows`` that fall in chunk ``index`` of the store."""
    start, emb = store.chunk_view(index)
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


def pool_kmeans(store: EmbeddingStore, rows: np.ndarray, cfg: KMeansConfig, stage: Stage) -> ClusterAssignment:
    """Cluster ``rows`` of the pool (resumable; collective under torchrun).

    Centroids once (:func:`sharded_kmeans`, saved by rank 0 as ``centroids.npy``), then one assignment
    shard per chunk, each rank its own chunks.

    Args:
        store: the pool.
        rows: sorted pool rows to cluster (e.g. kept after deduplication); the same on every rank.
        cfg: k-means settings.
        stage: the cluster stage.

    Returns:
        This rank's part of the assignment (:func:`load_assignment` of its own chunks), on every rank.
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
    return load_assignment(stage, collective.my_chunks(num_shards))


def load_assignment(stage: Stage, shards: list[int]) -> ClusterAssignment:
    """The :class:`ClusterAssignment` of the given shards (chunks) of a finished :func:`pool_kmeans` stage."""
    shards = [stage.load_shard(i) for i in shards] or [{"rows": np.zeros(0, np.int64),
                                                        "cluster": np.zeros(0, np.int64), "sim": np.zeros(0)}]
    return ClusterAssignment(
        centroids=np.load(stage.path("centroids.npy")),
        rows=np.concatenate([s["rows"] for s in shards]).astype(np.int64),
        cluster=np.concatenate([s["cluster"] for s in shards]).astype(np.int64),
        sim=np.concatenate([s["sim"] for s in shards]).astype(np.float32),
    )


def example_rows(stage: Stage, num_shards: int, how_many: int, per_row: int, seed: int) -> list[np.ndarray]:
    """Pool rows of ``how_many`` random clusters of a finished stage, closest to the centroid first
    (for the report; reads the shards one at a time and keeps only the members of the chosen clusters)."""
    present = [np.unique(stage.load_shard(i)["cluster"]) for i in range(num_shards)]
    present = np.unique(np.concatenate(present)) if present else np.zeros(0, np.int64)
    if not len(present):
        return []
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(present, size=min(how_many, len(present)), replace=False))
    parts = []
    for i in range(num_shards):
        shard = stage.load_shard(i)
        member = np.isin(shard["cluster"], chosen)
        parts.append((shard["cluster"][member], shard["sim"][member], shard["rows"][member]))
    cluster, sim, rows = (np.concatenate(p) for p in zip(*parts, strict=True))
    examples = []
    for c in chosen:
        members = np.nonzero(cluster == c)[0]
        examples.append(rows[members[np.argsort(-sim[members])][:per_row]])
    return examples
