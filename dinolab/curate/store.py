"""Read access to a pool of embeddings, one chunk at a time.

Every curation stage after ``embed`` reads embeddings through :class:`EmbeddingStore`, which hides
where they live:

* :class:`ShardedEmbeddings` -- a folder written by :mod:`dinolab.curate.embed` (``manifest.json``
  plus ``shard_00000.npz`` ... each holding ``embeddings [n, D]``, ``ids [n]``, ``paths [n]``);
* :class:`ArrayEmbeddings` -- an array already in memory, or a precomputed ``.npy`` file opened with
  ``mmap_mode="r"`` (streamed from disk, never loaded whole).

Rows are numbered ``0 .. N-1`` in shard order; every later stage refers to images by this row.
Chunks are returned as float32 and L2-normalised, so inner product = cosine similarity.
Memory: one chunk of ``chunk_rows x D`` floats (a shard, for a sharded store); an array store's
:meth:`~EmbeddingStore.chunk_view` reads and normalises only the rows asked for (what the stages use).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np

EMBED_MANIFEST = "manifest.json"
PRECOMPUTED_SUFFIXES = (".npy", ".npz", ".safetensors")


# Rows whose norms are computed at once by l2_normalize (bounds its [rows, D] temporary of squares)
NORM_BLOCK_ROWS = 4096


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows of ``x`` [N, D] scaled to unit L2 norm, as float32 (zero rows stay zero).

    The norms are taken ``NORM_BLOCK_ROWS`` rows at a time (``np.linalg.norm`` squares its whole input first:
    one more copy of a chunk); each row's norm is the same either way (a reduction along the row)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.empty((len(x), 1), np.float32)
    for start in range(0, len(x), NORM_BLOCK_ROWS):
        block = slice(start, start + NORM_BLOCK_ROWS)
        norms[block] = np.linalg.norm(x[block], axis=1, keepdims=True)
    return x / np.maximum(norms, eps)


class LazyRows:
    """Rows of an array [n, D] (e.g. a memmap slice) normalised when indexed: ``len()``, ``rows[a:b]`` and
    ``rows[positions]`` return float32 unit rows [m, D] equal to those of ``l2_normalize(array)`` (each row's
    norm is its own), without a normalised copy of the whole array.

    Args:
        array: [n, D] raw embeddings.
    """

    def __init__(self, array: np.ndarray) -> None:
        self.array = array
        self.shape = (len(array), array.shape[1])

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, which: slice | np.ndarray) -> np.ndarray:
        return l2_normalize(self.array[which]).reshape(-1, self.shape[1])


class EmbeddingStore:
    """A pool of N embeddings of dimension D, read chunk by chunk (see the module docstring)."""

    num_rows: int
    dim: int

    def iter_chunks(self) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(first_row, embeddings [n, D] float32, unit norm)`` covering all rows in order."""
        for i in range(self.num_chunks()):
            yield self.chunk(i)

    def num_chunks(self) -> int:
        raise NotImplementedError

    def chunk(self, index: int) -> tuple[int, np.ndarray]:
        """``(first_row, embeddings [n, D])`` of chunk ``index`` (the resumable unit of work)."""
        raise NotImplementedError

    def chunk_offsets(self) -> np.ndarray:
        """[num_chunks + 1] int64: chunk i holds rows ``offsets[i] .. offsets[i + 1] - 1`` (read nothing)."""
        raise NotImplementedError

    def chunk_view(self, index: int) -> tuple[int, np.ndarray | LazyRows]:
        """``(first_row, rows)`` of chunk ``index``, where ``rows[i]`` / ``rows[a:b]`` / ``rows[positions]`` give
        the same float32 unit rows as ``chunk(index)[1]`` and, where the store can, read and normalise only
        the rows asked for (:class:`LazyRows`); by default the whole chunk (an array)."""
        return self.chunk(index)

    def paths(self, rows: np.ndarray) -> list[str] | None:
        """Image path of each row, or ``None`` if the pool has no paths (bare embeddings file)."""
        raise NotImplementedError

    def gather(self, rows: np.ndarray) -> np.ndarray:
        """Embeddings of the given rows [len(rows), D] float32, in the order given.

        One streaming pass over the chunks; memory is the result plus one chunk.
        """
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        for start, emb in self.iter_chunks():
            lo, hi = np.searchsorted(sorted_rows, [start, start + len(emb)])
            if hi > lo:
                out[order[lo:hi]] = emb[sorted_rows[lo:hi] - start]
        return out


class ArrayEmbeddings(EmbeddingStore):
    """Embeddings in an array [N, D] (in memory or a ``np.load(..., mmap_mode="r")`` memmap).

    Args:
        array: [N, D] embeddings (any float dtype; normalised per chunk on read).
        paths: optional image path per row.
        chunk_rows: rows per chunk.
    """

    def __init__(self, array: np.ndarray, paths: list[str] | None = None, chunk_rows: int = 65536) -> None:
        if array.ndim != 2:
            raise ValueError(f"embeddings must be a 2-D array [N, D], got shape {array.shape}")
        if paths is not None and len(paths) != len(array):
            raise ValueError(f"{len(paths)} paths for {len(array)} embeddings")
        self.array = array
        self._paths = None if paths is None else [str(p) for p in paths]
        self.chunk_rows = int(chunk_rows)
        self.num_rows, self.dim = int(array.shape[0]), int(array.shape[1])

    def num_chunks(self) -> int:
        return -(-self.num_rows // self.chunk_rows)

    def chunk_offsets(self) -> np.ndarray:
        return np.minimum(np.arange(self.num_chunks() + 1, dtype=np.int64) * self.chunk_rows, self.num_rows)

    def chunk(self, index: int) -> tuple[int, np.ndarray]:
        start = index * self.chunk_rows
        return start, l2_normalize(self.array[start : start + self.chunk_rows])

    def chunk_view(self, index: int) -> tuple[int, LazyRows]:
        start = index * self.chunk_rows
        return start, LazyRows(self.array[start : start + self.chunk_rows])

    def paths(self, rows: np.ndarray) -> list[str] | None:
        if self._paths is None:
            return None
        return [self._paths[int(r)] for r in rows]


class ShardedEmbeddings(EmbeddingStore):
    """A folder written by :func:`dinolab.curate.embed.embed_images` (finished stage only).

    Args:
        folder: the stage folder holding ``manifest.json`` and the shard files.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        manifest_path = self.folder / EMBED_MANIFEST
        if not manifest_path.exists():
            raise FileNotFoundError(f"embeddings folder {self.folder} has no {EMBED_MANIFEST}")
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("status") != "done":
            raise ValueError(f"embeddings in {self.folder} are not finished (status {manifest.get('status')!r})")
        shards = manifest["shards"]
        self.shard_files = [self.folder / s["file"] for s in shards]
        counts = np.array([s["count"] for s in shards], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(counts)])
        self.num_rows = int(self.offsets[-1])
        self.dim = int(manifest["outputs"]["dim"])

    def num_chunks(self) -> int:
        return len(self.shard_files)

    def chunk_offsets(self) -> np.ndarray:
        return self.offsets.astype(np.int64)

    def _load(self, index: int) -> np.lib.npyio.NpzFile:
        return np.load(self.shard_files[index], allow_pickle=False)

    def chunk(self, index: int) -> tuple[int, np.ndarray]:
        with self._load(index) as data:
            emb = data["embeddings"]
        return int(self.offsets[index]), l2_normalize(emb.reshape(-1, self.dim))

    def paths(self, rows: np.ndarray) -> list[str] | None:
        rows = np.asarray(rows, dtype=np.int64)
        shard_of = np.searchsorted(self.offsets, rows, side="right") - 1
        out: list[str] = [""] * len(rows)
        for shard in np.unique(shard_of):
            with self._load(int(shard)) as data:
                shard_paths = data["paths"]
            where = np.nonzero(shard_of == shard)[0]
            for i in where:
                out[i] = str(shard_paths[rows[i] - self.offsets[shard]])
        return out


def load_precomputed(path: str | Path, chunk_rows: int = 65536) -> ArrayEmbeddings:
    """Open a precomputed embeddings file as a pool.

    ``.npy``: an [N, D] array, memory-mapped (streamed). ``.npz``: key ``embeddings`` (or the only
    array) and optional ``paths``; loaded whole. ``.safetensors``: key ``embeddings``; loaded whole.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: unknown suffix or no ``embeddings`` array.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"embeddings file {path} does not exist")
    suffix = path.suffix.lower()
    paths = None
    if suffix == ".npy":
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    elif suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            keys = list(data.keys())
            key = "embeddings" if "embeddings" in keys else (keys[0] if len(keys) == 1 else None)
            if key is None:
                raise ValueError(f"{path}: expected an array named 'embeddings', found {keys}")
            array = data[key]
            paths = [str(p) for p in data["paths"]] if "paths" in keys else None
    elif suffix == ".safetensors":
        from safetensors.numpy import load_file

        tensors = load_file(str(path))
        if "embeddings" not in tensors:
            raise ValueError(f"{path}: expected a tensor named 'embeddings', found {sorted(tensors)}")
        array = tensors["embeddings"]
    else:
        raise ValueError(f"{path}: embeddings file must end with one of {PRECOMPUTED_SUFFIXES}")
    return ArrayEmbeddings(array, paths=paths, chunk_rows=chunk_rows)


def is_precomputed(path: str | Path) -> bool:
    """True if ``path`` names a precomputed embeddings file (by suffix)."""
    return Path(path).suffix.lower() in PRECOMPUTED_SUFFIXES
