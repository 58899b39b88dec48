"""Nearest-neighbour indexes over pool embeddings (Faiss, inner product = cosine on unit vectors).

Kinds (``IndexConfig.kind``):

* ``flat`` -- exact ``IndexFlatIP``. Memory: all vectors, ``N x D x 4`` bytes (1M x 384: 1.5 GB).
  Search cost grows as N per query, so an exact k-NN graph costs ``N^2 D`` operations.
* ``ivf`` -- ``IndexIVFFlat``: vectors split into ``nlist`` k-means cells, a query scans ``nprobe``
  cells. Same memory as flat (exact similarities of the candidates found), ``nlist/nprobe``
  times less work, approximate recall.
* ``ivfsq`` -- ``IndexIVFScalarQuantizer``: as ``ivf`` with each coordinate stored in 8 bits
  (``sq_type="8bit"``, 4x less memory) or float16. On CPU the IVF scan is bound by memory
  bandwidth, so this is also about 2-4x faster than ``ivf``; similarities are off by ~1e-2.
* ``ivfpq`` -- ``IndexIVFPQ``: vectors compressed to ``pq_m`` bytes (+ 8-byte id), for pools that
  do not fit in memory as floats (1B x 64 B = 64 GB instead of 1.5 TB at D=384). Similarities are
  approximate too, so thresholds (dedup 0.6 / 0.45) apply to PQ estimates.
* ``auto`` -- ``flat`` below ``auto_flat_below`` vectors, ``ivf`` above.

Faiss holds the whole index in memory; it is the one structure whose size grows with the pool
(see the sizes above). Vectors are streamed into it chunk by chunk, into storage allocated at its final size
(:func:`fill_index`). ``use_gpu`` moves the index to
all visible GPUs when the faiss build has GPU support (guarded; faiss-cpu ignores it).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import faiss
import numpy as np
from tqdm import tqdm

from dinolab.curate import collective, kmeans
from dinolab.curate.store import EmbeddingStore, LazyRows

INDEX_KINDS = ("auto", "flat", "ivf", "ivfsq", "ivfpq")
SQ_TYPES = {"8bit": "QT_8bit", "fp16": "QT_fp16", "6bit": "QT_6bit", "4bit": "QT_4bit"}


@dataclass
class IndexConfig:
    """How to index the pool.

    Attributes:
        kind: one of ``auto``, ``flat``, ``ivf``, ``ivfsq``, ``ivfpq`` (module docstring).
        auto_flat_below: ``auto`` picks ``flat`` below this many vectors.
        nlist: IVF cells; 0 picks ``4 * sqrt(N)`` (at most N / 39, Faiss's minimum points per cell).
        nprobe: IVF cells scanned per query (recall vs time).
        sq_type: ``ivfsq`` code: ``8bit``, ``fp16``, ``6bit`` or ``4bit``.
        pq_m: PQ sub-quantisers (bytes per vector); must divide D.
        pq_nbits: bits per PQ code.
        train_size: vectors used to train IVF/PQ; 0 picks ``64 * nlist`` (at most N).
        search_batch: queries per Faiss call (bounds the [batch, k] result buffers; under torchrun, the
            queries each rank sends per round of a sharded search).
        use_gpu: move the index to GPUs when faiss has GPU support.
        seed: sampling seed for the training vectors.
    """

    kind: str = "auto"
    auto_flat_below: int = 200_000
    nlist: int = 0
    nprobe: int = 16
    sq_type: str = "8bit"
    pq_m: int = 32
    pq_nbits: int = 8
    train_size: int = 0
    search_batch: int = 4096
    use_gpu: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in INDEX_KINDS:
            raise ValueError(f"index kind must be one of {INDEX_KINDS}, got {self.kind!r}")
        if self.sq_type not in SQ_TYPES:
            raise ValueError(f"sq_type must be one of {tuple(SQ_TYPES)}, got {self.sq_type!r}")

    def resolved_kind(self, n: int) -> str:
        if self.kind != "auto":
            return self.kind
        return "flat" if n < self.auto_flat_below else "ivf"

    def resolved_nlist(self, n: int) -> int:
        nlist = self.nlist or int(4 * np.sqrt(max(n, 1)))
        return int(max(1, min(nlist, n // 39 if n >= 39 else 1)))


def gpu_available() -> bool:
    """True if this faiss build has GPU support and sees at least one GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def make_index(dim: int, n: int, cfg: IndexConfig) -> faiss.Index:
    """An empty (untrained) inner-product index of the configured kind for ``n`` vectors."""
    kind = cfg.resolved_kind(n)
    if kind == "flat":
        return faiss.IndexFlatIP(dim)
    nlist = cfg.resolved_nlist(n)
    quantizer = faiss.IndexFlatIP(dim)
    if kind == "ivf":
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    elif kind == "ivfsq":
        qtype = getattr(faiss.ScalarQuantizer, SQ_TYPES[cfg.sq_type])
        index = faiss.IndexIVFScalarQuantizer(quantizer, dim, nlist, qtype, faiss.METRIC_INNER_PRODUCT)
    else:
        if dim % cfg.pq_m:
            raise ValueError(f"pq_m={cfg.pq_m} must divide the embedding dimension {dim}")
        index = faiss.IndexIVFPQ(quantizer, dim, nlist, cfg.pq_m, cfg.pq_nbits, faiss.METRIC_INNER_PRODUCT)
    index.nprobe = min(cfg.nprobe, nlist)
    return index


def collect_blocks(
    blocks: Iterable[tuple[int, np.ndarray, np.ndarray]], num_queries: int, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The blocks a ``search_blocks`` yields, (first query, sims [B, k], rows [B, k]), as sims and rows [Q, k]."""
    sims = np.empty((num_queries, k), dtype=np.float32)
    rows = np.empty((num_queries, k), dtype=np.int64)
    for start, block_sims, block_rows in blocks:
        sims[start : start + len(block_sims)] = block_sims
        rows[start : start + len(block_rows)] = block_rows
    return sims, rows


class PoolIndex:
    """A Faiss index over selected pool rows; :meth:`search` answers in pool rows.

    Args:
        index: a trained and filled Faiss index; position i holds pool row ``row_ids[i]``.
        row_ids: [M] int64 pool row of each indexed vector.
        search_batch: queries per Faiss call.
    """

    def __init__(
        self, index: faiss.Index, row_ids: np.ndarray, search_batch: int = 16384, trained: faiss.Index | None = None
    ) -> None:
        self.index = index
        self.row_ids = np.asarray(row_ids, dtype=np.int64)
        self.search_batch = search_batch
        self.trained = trained  # an empty copy of the trained index, to fill with other rows

    def __len__(self) -> int:
        return len(self.row_ids)

    def search(
        self, queries: np.ndarray | LazyRows, k: int, probes: tuple[np.ndarray, np.ndarray] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """k nearest indexed vectors of each query by inner product.

        Args:
            queries: [Q, D] float32 unit vectors (an array, or :class:`LazyRows` read a block at a time).
            k: neighbours per query (more than indexed: missing slots get row -1, similarity -inf).
            probes: the IVF cells to scan, from :meth:`probes` (cell similarities [Q, nprobe], cells
                [Q, nprobe]); ``None``: the index finds them (the same cells).

        Returns:
            sims [Q, k] float32, descending per row; rows [Q, k] int64 pool rows.
        """
        return collect_blocks(self.search_blocks(queries, k, probes), len(queries), k)

    def search_blocks(
        self, queries: np.ndarray | LazyRows, k: int, probes: tuple[np.ndarray, np.ndarray] | None = None
    ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """:meth:`search` one block of ``search_batch`` queries at a time: yields (first query of the block,
        sims [B, k], rows [B, k]), so a caller that reduces each block holds one block's results."""
        for start in range(0, len(queries), self.search_batch):
            part = np.ascontiguousarray(queries[start : start + self.search_batch], dtype=np.float32)
            if probes is None:
                s, i = self.index.search(part, k)
            else:
                cells = slice(start, start + len(part))
                s, i = self.index.search_preassigned(part, k, probes[1][cells], probes[0][cells])
            found = i >= 0
            rows = np.where(found, self.row_ids[np.clip(i, 0, None)], -1)
            yield start, np.where(found, s, -np.inf).astype(np.float32), rows

    def probes(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """The IVF cells each query scans: similarities [Q, nprobe] float32, cells [Q, nprobe] int64, found
        by the coarse quantizer in batches of ``search_batch`` (as :meth:`search` does); ``None`` for an
        index without cells (flat, or on a GPU)."""
        ivf = faiss.try_extract_index_ivf(self.index) if isinstance(self.index, faiss.IndexIVF) else None
        if ivf is None:
            return None
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        found = [ivf.quantizer.search(queries[start : start + self.search_batch], ivf.nprobe)
                 for start in range(0, len(queries), self.search_batch)]
        if not found:
            return np.zeros((0, ivf.nprobe), np.float32), np.zeros((0, ivf.nprobe), np.int64)
        return np.concatenate([d for d, _ in found]), np.concatenate([i for _, i in found])


# Rows selected, assigned and added at once by fill_index (faiss's flat search block, distance_compute_blas_query_bs)
FILL_BLOCK = 4096
# Lloyd iterations of the IVF cells (faiss's own IVF training default, ``IndexIVF.cp.niter``, in faiss 1.15)
IVF_TRAIN_ITER = 10
# Rows a PQ encoder trains on (faiss's ``train_encoder_num_vectors`` for 8-bit PQ: 256 points per centroid)
PQ_TRAIN_ROWS = 65536
# Scalar quantizers whose training is a per-dimension min/max of the residuals (faiss RS_minmax, non-uniform)
_MINMAX_SQ = ("8bit", "6bit", "4bit")


def train_index(
    store: EmbeddingStore, cfg: IndexConfig, rows: np.ndarray, trained: faiss.Index | None = None
) -> faiss.Index:
    """An empty trained index for the sorted pool ``rows``, the same on every rank; collective under torchrun.
    With ``trained`` (an empty trained index of an earlier build over the same pool): a copy of it.

    The IVF cells are spherical k-means centroids of a sample of ``train_size`` rows (default ``64 * nlist``),
    computed by :func:`dinolab.curate.kmeans.lloyd`: each rank assigns the sample rows of its own chunks and
    the integer sums are all-reduced, so the cells are byte-identical for any number of ranks and no rank
    holds more than its part of the sample. The encoder: nothing for ``ivf`` and ``fp16``; the 8/6/4-bit
    scalar quantizer's range is the per-dimension min and max of the sample's residuals (all-reduced, as
    faiss's ``RS_minmax`` computes it on one machine); PQ codebooks are trained by faiss on rank 0 over at most
    :data:`PQ_TRAIN_ROWS` sample rows and sent to every rank.
    """
    if trained is not None:
        return faiss.clone_index(trained)
    index = make_index(store.dim, len(rows), cfg)
    if index.is_trained:  # flat
        return index
    nlist = cfg.resolved_nlist(len(rows))
    sample = kmeans.sample_rows(rows, cfg.train_size or 64 * nlist, cfg.seed)
    centroids = kmeans.lloyd(store, sample, nlist, IVF_TRAIN_ITER, cfg.seed)
    index.quantizer.add(np.ascontiguousarray(centroids, dtype=np.float32))
    if isinstance(index, faiss.IndexIVFPQ):
        return _train_pq_on_root(store, index, kmeans.sample_rows(sample, PQ_TRAIN_ROWS, cfg.seed))
    if isinstance(index, faiss.IndexIVFScalarQuantizer) and cfg.sq_type in _MINMAX_SQ:
        low, high = _residual_range(store, sample, centroids)
        faiss.copy_array_to_vector(np.concatenate([low, high - low]).astype(np.float32), index.sq.trained)
    index.is_trained = True
    return index


def _residual_range(store: EmbeddingStore, sample: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension min and max [D] over the sample rows of ``x - centroid(x)`` (all-reduced: exact)."""
    low = np.full(store.dim, np.inf, np.float32)
    high = np.full(store.dim, -np.inf, np.float32)
    for _, _, emb in kmeans.sample_by_chunk(store, sample):
        cluster, _ = kmeans.assign(centroids, emb)
        residual = emb - centroids[cluster]
        low, high = np.minimum(low, residual.min(axis=0)), np.maximum(high, residual.max(axis=0))
    return -collective.all_reduce_max(-low), collective.all_reduce_max(high)


def _train_pq_on_root(store: EmbeddingStore, index: faiss.Index, sample: np.ndarray) -> faiss.Index:
    """Rank 0 trains the PQ codebooks of ``index`` (its cells already set) on the ``sample`` rows; every rank
    receives the trained index."""
    rows = _gather_to_root(store, sample)
    if rows is not None:
        index.train(rows)  # the quantizer holds nlist centroids: faiss trains the codebooks only
    blob = faiss.serialize_index(index) if rows is not None else None
    return faiss.deserialize_index(collective.broadcast(blob))


def _gather_to_root(store: EmbeddingStore, rows: np.ndarray) -> np.ndarray | None:
    """Embeddings of the sorted ``rows`` [M, D] on rank 0 (``None`` elsewhere).

    Each rank reads only its own chunks and sends their selected rows to rank 0 chunk by chunk, so no
    rank touches the whole pool and rank 0 holds the result plus one chunk's part.
    """
    rank, world = collective.dist_env()
    offsets = store.chunk_offsets()
    out = np.empty((len(rows), store.dim), np.float32) if rank == 0 else None
    for chunk in range(store.num_chunks()):
        lo, hi = np.searchsorted(rows, offsets[chunk : chunk + 2])
        if hi == lo:
            continue
        owner, part = chunk % world, None
        if rank == owner:
            start, emb = store.chunk_view(chunk)
            part = emb[rows[lo:hi] - start]
        part = collective.to_root(part, owner, (int(hi - lo), store.dim), np.float32)
        if out is not None:
            out[lo:hi] = part
    return out


def build_index(
    store: EmbeddingStore, cfg: IndexConfig, rows: np.ndarray | None = None, trained: faiss.Index | None = None
) -> PoolIndex:
    """Train (IVF kinds) and fill an index over ``rows`` of ``store``, one chunk at a time.

    Args:
        store: the pool.
        cfg: index configuration.
        rows: sorted pool rows to index (e.g. those kept by deduplication); ``None`` = all rows.
        trained: an empty trained index to copy instead of training (``PoolIndex.trained`` of an
            earlier build over the same pool, e.g. dedup's index reused for retrieval).

    Returns:
        The filled :class:`PoolIndex`. Memory: the index itself (see the module docstring) plus
        one chunk and, while training, ``train_size x D`` floats (:func:`train_index`).
    """
    rows = np.arange(store.num_rows, dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
    index = train_index(store, cfg, rows, trained)
    empty_trained = faiss.clone_index(index)
    index = _maybe_to_gpu(index, cfg)
    fill_index(index, store, rows, range(store.num_chunks()))
    return PoolIndex(index, rows, cfg.search_batch, trained=empty_trained)


def fill_index(index: faiss.Index, store: EmbeddingStore, rows: np.ndarray, chunks: Iterable[int]) -> np.ndarray:
    """Add the selected sorted pool ``rows`` that fall in ``chunks`` to the trained ``index``, chunk by chunk.

    Storage is allocated at its final size before anything is added: a flat index's codes at once; an IVF
    index's inverted lists after a first pass that assigns every row to its cell (the cells are kept, 8 bytes
    a row, and handed to faiss's ``add_core`` in the second pass, so nothing is assigned twice). Adding chunk
    by chunk to growing lists would leave each list's capacity up to twice its size (~1.4x on average,
    measured). The index holds the same bytes as after ``index.add`` of every chunk in order.

    Returns:
        [M] int64 the pool rows added, in index order.
    """
    chunks, quiet = list(chunks), collective.dist_env()[0] != 0  # one progress bar, rank 0's
    offsets = store.chunk_offsets()
    bounds = [np.searchsorted(rows, offsets[c : c + 2]) for c in chunks]
    added = np.concatenate([rows[lo:hi] for lo, hi in bounds] or [np.zeros(0, np.int64)]).astype(np.int64)

    def blocks(chunk: int, lo: int, hi: int) -> Iterator[tuple[int, np.ndarray]]:
        """(offset in the chunk's selection, vectors) of the selected rows of one chunk, FILL_BLOCK at a time
        (one copy of a block, not of the chunk)."""
        start, emb = store.chunk_view(chunk)
        for first in range(lo, hi, FILL_BLOCK):
            yield first - lo, np.ascontiguousarray(emb[rows[first : min(first + FILL_BLOCK, hi)] - start])

    ivf = faiss.try_extract_index_ivf(index) if isinstance(index, faiss.IndexIVF) else None
    lists = faiss.downcast_InvertedLists(ivf.invlists) if ivf is not None else None
    if not isinstance(lists, faiss.ArrayInvertedLists):
        if isinstance(index, faiss.IndexFlatCodes):
            index.codes.resize((index.ntotal + len(added)) * index.code_size)  # capacity for all, then
            index.codes.resize(index.ntotal * index.code_size)  # back to the current size: no reallocation
        for chunk, (lo, hi) in tqdm(zip(chunks, bounds), total=len(chunks), desc="index", unit="chunk", disable=quiet):
            for _, vectors in blocks(chunk, lo, hi):
                index.add(vectors)
        return added
    # the cells as faiss's own add finds them (its flat quantizer searches FILL_BLOCK queries per BLAS call)
    cells = [np.concatenate([ivf.quantizer.assign(v, 1).ravel() for _, v in blocks(c, lo, hi)]
                            or [np.zeros(0, np.int64)]).astype(np.int64) for c, (lo, hi) in zip(chunks, bounds)]
    counts = np.bincount(np.concatenate(cells or [np.zeros(0, np.int64)]), minlength=ivf.nlist)
    for cell in np.nonzero(counts)[0]:
        size = lists.list_size(int(cell))
        lists.resize(int(cell), size + int(counts[cell]))  # allocates exactly (std::vector grows to the size asked)
        lists.resize(int(cell), size)  # keeps the capacity
    for chunk, (lo, hi), cell in tqdm(zip(chunks, bounds, cells), total=len(chunks), desc="index", unit="chunk",
                                      disable=quiet):
        for first, vectors in blocks(chunk, lo, hi):
            part = np.ascontiguousarray(cell[first : first + len(vectors)])
            ivf.add_core(len(vectors), faiss.swig_ptr(vectors), None, faiss.swig_ptr(part))
    return added


def index_array(vectors: np.ndarray, cfg: IndexConfig | None = None) -> PoolIndex:
    """A :class:`PoolIndex` over an in-memory array [N, D] of unit vectors (rows = positions)."""
    from dinolab.curate.store import ArrayEmbeddings

    return build_index(ArrayEmbeddings(vectors), cfg or IndexConfig())


def _maybe_to_gpu(index: faiss.Index, cfg: IndexConfig) -> faiss.Index:
    if not (cfg.use_gpu and gpu_available()):
        return index
    return faiss.index_cpu_to_all_gpus(index)
