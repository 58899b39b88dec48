"""A pool index sharded by rank: each rank indexes the rows of its own chunks; a search asks every rank.

Under ``torchrun`` with W ranks, rank r fills its index with the selected rows of chunks
``r, r + W, ...`` only, so each rank holds about 1/W of the index. The IVF cells (if any) are trained
once, collectively (:func:`~dinolab.curate.index.train_index`: each rank works on the training rows of
its own chunks, and every rank ends with the same cells), so every shard uses the same coarse quantizer
and a query probes the same cells in every shard: the union of the shards' top-k is the top-k of one
index over all rows (exact for ``flat``, the same approximation as one index for IVF kinds).

:func:`ShardedIndex.search` is collective: every rank calls it with its own queries (possibly none);
block by block (``search_batch`` queries per rank), the queries of all ranks are gathered, each rank
searches them in its shard, and the results go back to their rank and are merged with
:func:`~dinolab.curate.collective.merge_topk`. Memory per rank: its index shard, plus W blocks of queries
and their ``[block, k]`` results; while training, its part of the training rows.
"""

from __future__ import annotations

from collections.abc import Iterator

import faiss
import numpy as np

from dinolab.curate import collective
from dinolab.curate.index import IndexConfig, PoolIndex, _maybe_to_gpu, collect_blocks, fill_index, train_index
from dinolab.curate.store import EmbeddingStore, LazyRows


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
        self.trained = train_index(store, cfg, all_rows, trained)
        index = _maybe_to_gpu(faiss.clone_index(self.trained), cfg)
        rows_here = fill_index(index, store, all_rows, collective.my_chunks(store.num_chunks()))
        self.local = PoolIndex(index, rows_here, cfg.search_batch)
        self.dim = store.dim

    def search(self, queries: np.ndarray | LazyRows, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Collective k-NN search of this rank's ``queries`` [Q, D] over every shard -> sims, rows [Q, k]
        (:meth:`search_blocks`, concatenated)."""
        return collect_blocks(self.search_blocks(queries, k), len(queries), k)

    def search_blocks(self, queries: np.ndarray | LazyRows, k: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """Collective k-NN search of this rank's ``queries`` [Q, D] (an array or :class:`LazyRows`, read a block
        at a time) over every shard, one block of ``search_batch`` queries at a time: yields (first query of the
        block, sims [B, k], rows [B, k]). Every rank must run the generator to its end (a rank with fewer blocks
        still takes part in every round).

        Each round gathers every rank's block (a tensor all-gather) with, for an IVF index, the cells each
        query probes (found once, by its own rank's coarse quantizer, not again by every shard), answers all
        of them from this shard, and sends each rank the answers to its block (one gather per rank), so
        memory is W blocks of queries and answers, whatever Q.
        """
        if collective.world_size() == 1:
            for start, sims, rows in self.local.search_blocks(queries, k):
                yield (start, *collective.merge_topk([sims], [rows], k))
            return
        batch = self.local.search_batch
        counts = collective.all_gather(len(queries))
        rank = collective.dist_env()[0]
        for start in range(0, max(counts), batch):
            sizes = [min(batch, max(0, n - start)) for n in counts]
            block = np.ascontiguousarray(queries[start : start + batch], dtype=np.float32).reshape(-1, self.dim)
            asked = collective.all_gather_rows(block, sizes)
            # IVF: each rank finds the cells of its own queries once, and every shard scans just those
            probes = self.local.probes(block)
            if probes is None:
                answers = [self.local.search(q, k) for q in asked]
            else:
                cells = zip(*(collective.all_gather_rows(p, sizes) for p in probes), strict=True)
                answers = [self.local.search(q, k, probes=c) for q, c in zip(asked, cells, strict=True)]
            merged = None
            for dst, size in enumerate(sizes):
                sims = collective.gather_rows(answers[dst][0], dst, size)
                rows = collective.gather_rows(answers[dst][1], dst, size)
                if dst == rank and size:
                    merged = collective.merge_topk(sims, rows, k)
            del answers, asked
            if merged is not None:
                yield (start, *merged)
