"""Self- and relative deduplication of an embedding pool (DINOv2 App. A.3).

Self-deduplication: a k-NN graph over the pool (k = 64, cosine), keep the edges with similarity
above 0.6, take connected components with a union-find, keep one image per component: its lowest
row (deterministic, whatever the order in which Faiss returns neighbours).

Relative deduplication: every pool image is compared with the images of the evaluation sets; a
pool image more similar than 0.45 to any of them condemns its whole self-dedup component.

Both run as resumable stages over the pool's chunks (one shard of edges / hits per chunk); under
``torchrun`` each rank computes its own chunks (``rank, rank + W, ...``). Memory per rank: its shard
of the Faiss index (:mod:`dinolab.curate.sharded`), one chunk of queries with their ``[chunk, k]``
neighbours. The union-find (rank 0) runs over the rows that have a duplicate edge only, and the
components are stored for those rows (:class:`Components`); relative dedup works per chunk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from dinolab.curate import collective
from dinolab.curate.index import IndexConfig, PoolIndex, index_array
from dinolab.curate.sharded import ShardedIndex
from dinolab.curate.stages import Stage
from dinolab.curate.store import EmbeddingStore
from dinolab.curate.union_find import UnionFind
from dinolab.utils.io import atomic_path, atomic_save_npz


@dataclass
class DedupConfig:
    """Deduplication settings (paper values as defaults).

    Attributes:
        k: neighbours per image in the k-NN graph.
        threshold: cosine similarity above which two pool images are duplicates.
        relative_threshold: cosine similarity to an evaluation image above which a pool
            component is dropped.
    """

    k: int = 64
    threshold: float = 0.6
    relative_threshold: float = 0.45


@dataclass
class Components:
    """Connected components of the duplicate graph, stored for the rows that have a duplicate only
    (every other row is its own component), so their size is the number of duplicated rows, not N.

    Attributes:
        rows: [M] sorted pool rows in a component of two or more rows.
        labels: [M] the lowest row of each one's component.
    """

    rows: np.ndarray
    labels: np.ndarray

    def labels_of(self, rows: np.ndarray) -> np.ndarray:
        """[n] component label of each of the given pool rows (the row itself outside every component)."""
        rows = np.asarray(rows, dtype=np.int64)
        if not len(self.rows):
            return rows.copy()
        at = np.minimum(np.searchsorted(self.rows, rows), len(self.rows) - 1)
        return np.where(self.rows[at] == rows, self.labels[at], rows)

    @property
    def num_components(self) -> int:
        """Components of two or more rows."""
        return int(len(np.unique(self.labels)))

    FILES = ("components_rows.npy", "components_labels.npy")

    def save(self, stage: Stage) -> None:
        for name, array in zip(self.FILES, (self.rows, self.labels), strict=True):
            with atomic_path(stage.path(name)) as tmp, open(tmp, "wb") as f:
                np.save(f, np.asarray(array, np.int64))

    @classmethod
    def open(cls, stage: Stage) -> Components:
        """Memory-mapped: a rank looking up the rows of its own chunks reads only their part of the files."""
        return cls(*(np.load(stage.path(name), mmap_mode="r") for name in cls.FILES))


def knn_edges(index: PoolIndex, first_row: int, queries: np.ndarray, k: int, threshold: float) -> dict[str, np.ndarray]:
    """Duplicate edges of one chunk of pool rows.

    Args:
        index: index over the pool (a :class:`PoolIndex` or, collectively, a :class:`ShardedIndex`).
        first_row: pool row of ``queries[0]``.
        queries: [n, D] unit embeddings of rows ``first_row .. first_row + n - 1``.
        k: neighbours per row (the row itself is searched for too and dropped).
        threshold: keep edges with similarity strictly above this.

    Returns:
        ``nn_sim [n]`` float32 similarity to the nearest other row (-inf if none),
        ``src [E]``, ``dst [E]`` int64 rows and ``sim [E]`` float32 of the kept edges. The edges are taken
        from each block of ``search_batch`` rows as it is answered, so only one block's ``[block, k + 1]``
        neighbours are held at a time.
    """
    parts = [edges_from_neighbours(first_row + start, sims, nbrs, k, threshold)
             for start, sims, nbrs in index.search_blocks(queries, k + 1)]
    if not parts:
        return edges_from_neighbours(first_row, np.zeros((0, k + 1), np.float32), np.zeros((0, k + 1), np.int64),
                                     k, threshold)
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


def edges_from_neighbours(
    first_row: int, sims: np.ndarray, nbrs: np.ndarray, k: int, threshold: float
) -> dict[str, np.ndarray]:
    """:func:`knn_edges` from the ``[n, k + 1]`` neighbours of rows ``first_row ..``."""
    src = (first_row + np.arange(len(sims), dtype=np.int64))[:, None]
    other = (nbrs != src) & (nbrs >= 0)
    # An exact copy can be returned before the row itself, so "self" is found by id, not by rank.
    masked = np.where(other, sims, -np.inf)
    nn_sim = masked.max(axis=1) if k > 0 else np.full(len(sims), -np.inf, np.float32)
    edge = other & (sims > threshold)
    src_full = np.broadcast_to(src, nbrs.shape)
    return {
        "nn_sim": nn_sim.astype(np.float32),
        "src": src_full[edge].astype(np.int64),
        "dst": nbrs[edge].astype(np.int64),
        "sim": sims[edge].astype(np.float32),
    }


def self_dedup(
    store: EmbeddingStore,
    cfg: DedupConfig,
    stage: Stage,
    index_cfg: IndexConfig | None = None,
    make_index: Callable[[], PoolIndex | ShardedIndex] | None = None,
) -> Components:
    """Connected components of the duplicate graph of the pool (resumable; collective under torchrun).

    Every rank queries its own chunks (``rank, rank + W, ...``) against the whole pool: by default a
    :class:`ShardedIndex` (each rank indexes its chunks, a search asks every rank), built only if some
    shard is left to compute; ``make_index`` replaces it (e.g. one :class:`PoolIndex` in one process).
    Each rank writes one shard of edges per chunk; rank 0 then reads the edge shards into a union-find
    over the rows that have an edge (:func:`components_from_shards`) and writes them
    (:meth:`Components.save`: ``rows``, ``labels``: lowest row of each component), so the components do
    not depend on the number of ranks.

    Returns:
        the :class:`Components` (on every rank): row i is kept iff ``labels_of([i]) == i``.
    """
    rank = collective.dist_env()[0]
    if not collective.open_stage(stage):
        num_shards = store.num_chunks()
        built: list[PoolIndex | ShardedIndex] = []

        def compute(i: int | None) -> dict[str, np.ndarray]:
            if not built:  # every rank gets here in the first round: building is collective
                built.append(make_index() if make_index else ShardedIndex(store, index_cfg or IndexConfig()))
            first_row, emb = store.chunk_view(i) if i is not None else (0, np.zeros((0, store.dim), np.float32))
            return knn_edges(built[0], first_row, emb, cfg.k, cfg.threshold)

        collective.run_lockstep(stage, num_shards, compute)
        built.clear()
        collective.barrier()
        if rank == 0:
            _finish_self_dedup(stage, num_shards, store.num_rows)
        collective.barrier()
    return Components.open(stage)


def _finish_self_dedup(stage: Stage, num_shards: int, num_rows: int) -> None:
    found, num_edges = components_from_shards(stage, num_shards)
    found.save(stage)
    num_components = found.num_components
    stage.finish(
        {
            "num_rows": num_rows,
            "num_kept": int(num_rows - len(found.rows) + num_components),
            "num_duplicate_components": num_components,
            "num_edges": num_edges,
            "components": list(Components.FILES),
        },
        num_shards,
    )


def components_from_shards(stage: Stage, num_shards: int) -> tuple[Components, int]:
    """Union-find over the edges of every shard, one shard in memory at a time.

    The union-find runs over the rows that have an edge (``M`` of them, renumbered ``0 .. M-1`` in row
    order, so its lowest-id root is the lowest row), not over the whole pool: memory ``O(M)`` plus one shard.

    Returns:
        the :class:`Components`, the number of edges read.
    """
    ends = []
    for i in range(num_shards):
        shard = stage.load_shard(i)
        ends.append(np.unique(np.concatenate([shard["src"], shard["dst"]])))
    rows = np.unique(np.concatenate(ends)) if ends else np.zeros(0, np.int64)
    uf = UnionFind(len(rows))
    num_edges = 0
    for i in range(num_shards):
        shard = stage.load_shard(i)
        uf.union_edges(np.searchsorted(rows, shard["src"]), np.searchsorted(rows, shard["dst"]))
        num_edges += int(shard["src"].size)
    return Components(rows.astype(np.int64), rows[uf.roots()].astype(np.int64)), num_edges


def nearest_neighbour_similarities(stage: Stage) -> np.ndarray:
    """Similarity of each pool row to its nearest other row (:meth:`Stage.column`: at most 2^20 of them),
    from a finished self-dedup stage."""
    return stage.column("nn_sim")


def relative_similarities(stage: Stage) -> np.ndarray:
    """Similarity of each pool row to its nearest evaluation image (:meth:`Stage.column`), from a finished
    relative-dedup stage."""
    return stage.column("eval_sim")


def eval_hits(index: PoolIndex, queries: np.ndarray) -> np.ndarray:
    """Similarity of each query [n, D] to its nearest evaluation image -> [n] float32."""
    sims, _ = index.search(queries, 1)
    return sims[:, 0]


def relative_dedup(
    store: EmbeddingStore,
    eval_embeddings: np.ndarray,
    components: Components,
    cfg: DedupConfig,
    stage: Stage,
) -> np.ndarray:
    """Rows kept after self- and relative deduplication (resumable; each rank its own chunks).

    Args:
        store: the pool.
        eval_embeddings: [M, D] unit embeddings of all evaluation images (held in memory on every rank;
            exact index).
        components: from :func:`self_dedup`.
        cfg: thresholds.
        stage: stage writing one shard of nearest-evaluation similarities per chunk, then (rank 0)
            ``keep.npz``.

    Each rank flags the rows of its own chunks above ``cfg.relative_threshold``; the labels of the
    flagged components are gathered, and each rank keeps the representatives of its chunks whose
    component was not flagged; rank 0 gathers them into ``keep.npz``.

    Returns:
        Sorted pool rows [K] int64 (on every rank): component representatives whose component has no
        image above ``cfg.relative_threshold`` to any evaluation image.
    """
    keep_file = stage.path("keep.npz")
    rank, world_size = collective.dist_env()
    if not collective.open_stage(stage):
        num_shards = store.num_chunks()
        index = index_array(eval_embeddings, IndexConfig(kind="flat")) if len(eval_embeddings) else None

        def compute(i: int) -> dict[str, np.ndarray]:
            _, emb = store.chunk_view(i)
            if index is None:
                return {"eval_sim": np.full(len(emb), -np.inf, np.float32)}
            return {"eval_sim": eval_hits(index, emb)}

        stage.run_shards(num_shards, compute, desc="relative dedup", rank=rank, world_size=world_size)
        collective.barrier()
        keep_parts, flagged = _keep_my_chunks(store, components, stage, cfg.relative_threshold)
        gathered = collective.gather(keep_parts)
        if rank == 0:
            by_chunk = {chunk: rows for parts in gathered for chunk, rows in parts.items()}
            keep = np.concatenate([by_chunk[c] for c in sorted(by_chunk)] or [np.zeros(0, np.int64)])
            atomic_save_npz(keep_file, rows=keep)
            stage.finish(
                {
                    "num_flagged_images": flagged["images"],
                    "num_dropped_components": flagged["components"],
                    "num_kept": int(len(keep)),
                    "keep": keep_file.name,
                },
                num_shards,
            )
        collective.barrier()
    with np.load(keep_file, allow_pickle=False) as data:
        return data["rows"]


def _keep_my_chunks(
    store: EmbeddingStore, components: Components, stage: Stage, threshold: float
) -> tuple[dict[int, np.ndarray], dict[str, int]]:
    """This rank's kept rows per chunk, and the numbers of flagged images and components (all ranks)."""
    offsets = store.chunk_offsets()
    mine = collective.my_chunks(store.num_chunks())
    flagged_labels, representatives, num_flagged = [np.zeros(0, np.int64)], {}, 0
    for chunk in mine:
        rows = np.arange(offsets[chunk], offsets[chunk + 1], dtype=np.int64)
        labels = components.labels_of(rows)
        flagged = stage.load_shard(chunk)["eval_sim"] > threshold
        flagged_labels.append(labels[flagged])
        num_flagged += int(flagged.sum())
        representatives[chunk] = rows[labels == rows]
    dropped = np.unique(np.concatenate(collective.all_gather(np.concatenate(flagged_labels))))
    keep = {chunk: reps[~np.isin(reps, dropped)] for chunk, reps in representatives.items()}
    total_flagged = int(collective.all_reduce_sum(np.array([num_flagged], np.int64))[0])
    return keep, {"images": total_flagged, "components": int(len(dropped))}
