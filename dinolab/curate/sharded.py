"""A pool index sharded by rank: each rank indexes the rows of its own chunks; a search asks every rank.

Under ``torchrun`` with W ranks, rank r fills its index with the selected rows of chunks
``r, r + W, ...`` only, so each rank holds about 1/W of the index. The IVF cells (if any) are trained
once, on rank 0, and sent to all ranks, so every shard uses the same coarse quantizer and a query
probes the same cells in every shard: the union of the shards' top-k is the top-k of one index over
all rows (exact for ``flat``, the same approximation as one index for IVF kinds).

:func:`ShardedIndex.search` is collective: every rank calls it with its own queries (possibly none);
the queries of all ranks are gathered, each rank searches them in its shard, and the results come back
to their rank and are merged with :func:`~dinolab.curate.collective.merge_topk`.
Memory per rank: its index shard, plus W ranks' queries and their ``[Q, k]`` results for one call.
"""

from __future__ import annotations

import faiss
import numpy as np

from dinolab.curate import collective
from dinolab.curate.index import IndexConfig, PoolIndex, _maybe_to_gpu, _sample_rows, make_index
from dinolab.curate.store import EmbeddingStore


def train_once(store: EmbeddingStore, cfg: IndexConfig, rows: np.ndarray, trained: faiss.Index | None = None) -> faiss.Index:
    """An empty trained index for ``rows`` (rank 0 trains, every rank receives it)."""
    if trained is not None:
        return faiss.clone_index(trained)
    blob = None
    if collective.dist_env()[0] == 0:
        index = make_index(store.dim, len(rows), cfg)
        if not index.is_trained:
            nlist = cfg.resolved_nlist(len(rows))
            index.train(store.gather(_sample_rows(rows, cfg.train_size or 64 * nlist, cfg.seed)))
        blob = faiss.serialize_index(index)
    return faiss.deserialize_index(collective.broadcast(blob))


class ShardedIndex:
    """This rank's shard of an index over ``rows`` of the pool (see the module docstring).

    Args:
        store: the pool.
        cfg: index configuration (``kind`` and ``nlist`` resolved from the total number of rows).
        rows: sorted pool rows to index; ``None`` = all rows. Every rank passes the same rows.
        trained: an empty trained index to reuse (e.g. the dedup index's cells for retrieval).
    """

    def __init__(
        self, store: EmbeddingStore, cfg: IndexConfig, rows: np.ndarray | None = None,
        trained: faiss.Index | None = None,
    ) -> None:
        all_rows = np.arange(store.num_rows, dtype=np.int64) if rows is None else np.asarray(rows, np.int64)
        self.trained = train_once(store, cfg, all_rows, trained)
        index = _maybe_to_gpu(faiss.clone_index(self.trained), cfg)
        mine = []
        for chunk in collective.my_chunks(store.num_chunks()):
            start, emb = store.chunk(chunk)
            lo, hi = np.searchsorted(all_rows, [start, start + len(emb)])
            if hi > lo:
                index.add(np.ascontiguousarray(emb[all_rows[lo:hi] - start]))
                mine.append(all_rows[lo:hi])
        rows_here = np.concatenate(mine) if mine else np.zeros(0, np.int64)
        self.local = PoolIndex(index, rows_here, cfg.search_batch)
        self.dim = store.dim

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Collective k-NN search of this rank's ``queries`` [Q, D] over every shard -> sims, rows [Q, k]."""
        queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim)
        if not collective.initialised():
            sims, rows = self.local.search(queries, k)
            return collective.merge_topk([sims], [rows], k)
        asked = collective.all_gather(queries)
        answers = [self.local.search(q, k) if len(q) else None for q in asked]
        received = collective.all_gather(answers)  # received[s][r]: shard s's answer to rank r
        mine = [per_shard[collective.dist_env()[0]] for per_shard in received]
        mine = [a for a in mine if a is not None]
        if not mine:
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
        return collective.merge_topk([s for s, _ in mine], [r for _, r in mine], k)
