"""Where curation's embeddings come from, and the pool index reused across stages.

:class:`Sources` opens pools, seed sets and evaluation sets: an embeddings file directly, an image source by
embedding it on every rank (one resumable stage each, keyed by the file names' hash, the model and the embed
settings); :class:`PoolIndexes` builds the sharded pool index for dedup and reuses its IVF training for retrieval.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from dinolab.curate.embed import dist_env, embed_images
from dinolab.curate.index import IndexConfig
from dinolab.curate.sharded import ShardedIndex
from dinolab.curate.stages import Stage
from dinolab.curate.store import EmbeddingStore, ShardedEmbeddings, is_precomputed, load_precomputed
from dinolab.data.images import path_bytes, resolve_image_source

if TYPE_CHECKING:
    from dinolab.curate.pipeline import CurateConfig

log = logging.getLogger(__name__)

# Seed of the random backbone used when no weights are given (identical on every rank).
RANDOM_INIT_SEED = 0

# Settings that change speed, not results: left out of stage hashes so a run can resume elsewhere.
HARDWARE_FIELDS = ("use_gpu", "search_batch", "num_workers", "device", "batch_size")


def result_key(cfg: Any) -> dict:
    """The fields of a config dataclass that change results."""
    return {k: v for k, v in asdict(cfg).items() if k not in HARDWARE_FIELDS}


def _hash_strings(items: list[str]) -> str:
    """Hash of file names as the OS stores them (bytes), so any name works, even one that is not UTF-8
    (a ``str`` with ``surrogateescape``); for UTF-8 names the bytes, hence the hash, are unchanged."""
    digest = hashlib.sha256()
    for item in items:
        digest.update(path_bytes(item) + b"\n")
    return digest.hexdigest()[:16]


def _file_key(path: str | Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    path = Path(path).resolve()
    return {"file": str(path), "bytes": path.stat().st_size if path.exists() else None}


class Sources:
    """Opens pools / seed sets / evaluation sets: precomputed files directly, image sources by embedding."""

    def __init__(self, out: Path, cfg: CurateConfig, model: torch.nn.Module | Callable[[], torch.nn.Module] | None):
        self.out, self.cfg = out, cfg
        self.model = model if model is not None else self._build_model
        self.rank, self.world_size = dist_env()
        self.pending: list[tuple[list[Path], Stage]] = []

    def _build_model(self) -> torch.nn.Module:
        from dinolab.models import build_backbone

        if self.cfg.weights is not None:
            return build_backbone(self.cfg.arch, weights=self.cfg.weights)
        log.warning("no --weights: curating with a randomly initialised %s is only a test of the pipeline, "
                    "its embeddings are not meaningful", self.cfg.arch)
        # The same seed on every rank (and in one process): all ranks embed with the same random model.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            return build_backbone(self.cfg.arch, weights=None)

    def embed(self, name: str, source: str | Path) -> tuple[Path | None, dict[str, Any]]:
        """Embed an image source on this rank (no-op for embeddings files) -> (folder, hash key)."""
        if is_precomputed(source):
            return None, {"precomputed": _file_key(source)}
        paths = resolve_image_source(source)
        config = {
            "images": _hash_strings([str(p) for p in paths]),
            "num_images": len(paths),
            "arch": self.cfg.arch,
            "weights": _file_key(self.cfg.weights),
            "embed": result_key(self.cfg.embed),
        }
        stage = Stage(self.out / "embed" / name, "embed", config, self.cfg.on_change).open()
        embed_images(paths, self.model, stage, self.cfg.embed, self.rank, self.world_size)
        self.pending.append((paths, stage))
        return stage.folder, {"embed": stage.hash}

    def finish_all(self) -> None:
        """On rank 0 after all ranks embedded: finish (or complete) every embedding stage."""
        for paths, stage in self.pending:
            if not embed_images(paths, self.model, stage, self.cfg.embed, rank=0, world_size=1):
                raise RuntimeError(f"embedding stage {stage.folder} did not finish")

    def open(self, source: str | Path, folder: Path | None) -> EmbeddingStore:
        if folder is None:
            return load_precomputed(source, chunk_rows=self.cfg.chunk_rows)
        return ShardedEmbeddings(folder)


class PoolIndexes:
    """Builds the sharded pool index for dedup, then reuses its training (IVF cells) for retrieval."""

    def __init__(self, store: EmbeddingStore, cfg: IndexConfig) -> None:
        self.store, self.cfg = store, cfg
        self.trained = None

    def full(self) -> ShardedIndex:
        index = ShardedIndex(self.store, self.cfg)
        self.trained = index.trained
        return index

    def over(self, rows: np.ndarray) -> ShardedIndex:
        # The kept rows are a subset of the pool, so the pool's IVF cells suit them; reuse them
        # unless "auto" picks another kind for the smaller count.
        same_kind = self.cfg.resolved_kind(len(rows)) == self.cfg.resolved_kind(self.store.num_rows)
        trained = self.trained if same_kind else None
        return ShardedIndex(self.store, self.cfg, rows=rows, trained=trained)
