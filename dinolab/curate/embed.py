"""Embed a pool of images with a backbone: L2-normalised class tokens, streamed to shard files.

Output (one :class:`~dinolab.curate.stages.Stage` folder)::

    manifest.json            # config hash, shard list (count, skipped files), outputs: dim, counts
    shard_00000.npz          # embeddings [n, D] float16|float32 (unit norm), ids [n] int64 (position
    shard_00000.json         #   in the image list), paths [n] str; only readable images are stored
    ...

Shard ``s`` covers images ``s * shard_size .. (s + 1) * shard_size - 1`` of the sorted image list,
so the layout does not depend on the number of ranks. Under ``torchrun`` (``RANK`` and
``WORLD_SIZE`` set) rank r embeds shards ``r, r + W, ...``; a restarted run skips finished shards.
Unreadable files (a FIFO, socket or device among them: never opened) are logged, listed in their
shard's marker and skipped; ``outputs.num_skipped`` counts them.
Memory: one shard of embeddings (``shard_size x D``) plus the model and one batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from dinolab.curate.stages import Stage
from dinolab.curate.store import l2_normalize
from dinolab.data.images import display_path, warn_skipped
from dinolab.distributed.env import dist_env
from dinolab.features.embed import EmbedOptions, embed
from dinolab.features.inputs import Preprocess
from dinolab.utils.runtime import resolve_device

log = logging.getLogger(__name__)


@dataclass
class EmbedConfig:
    """How images are embedded.

    Attributes:
        shard_size: images per shard file (the unit of resumption and of memory).
        batch_size: images per forward pass.
        float16: store embeddings as float16 (half the disk; cosine error ~1e-3).
        crop_size: centre-crop size fed to the backbone (a multiple of its patch size).
        resize_size: shorter side before the crop; ``None`` resizes straight to ``crop_size``.
        num_workers: DataLoader worker processes decoding images.
        device: ``auto`` (this rank's GPU if any, else CPU), ``cpu``, ``cuda``, ``cuda:1``...
    """

    shard_size: int = 65536
    batch_size: int = 64
    float16: bool = True
    crop_size: int = 224
    resize_size: int | None = 256
    num_workers: int = 4
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.shard_size < 1 or self.batch_size < 1:
            raise ValueError(f"shard_size and batch_size must be >= 1, got {self.shard_size}, {self.batch_size}")


def feature_dim(model: torch.nn.Module) -> int:
    """The backbone's output width (``embed_dim``)."""
    dim = getattr(model, "embed_dim", None)
    if dim is None:
        raise ValueError(f"model {type(model).__name__} has no embed_dim attribute")
    return int(dim)


def embed_shard(
    model: torch.nn.Module, paths: Sequence[Path], first_id: int, cfg: EmbedConfig
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Embed one shard of image files: L2-normalised class tokens of ``model`` (on its device).

    Returns:
        arrays ``embeddings [n, D]``, ``ids [n]`` (``first_id`` + position), ``paths [n]`` for the
        n readable images, and the list of unreadable paths.
    """
    options = EmbedOptions(batch_size=cfg.batch_size, num_workers=cfg.num_workers, desc=f"embed ids {first_id}+")
    embedded = embed(model, paths, Preprocess.official(cfg.crop_size, cfg.resize_size), options=options)
    skipped = [str(paths[i]) for i in embedded.skipped]
    for path in skipped:
        log.warning("skipping unreadable image %s", display_path(path))
    dtype = np.float16 if cfg.float16 else np.float32
    if embedded.kept:
        emb = l2_normalize(embedded.tokens["cls"][:, -1].numpy())
    else:
        emb = np.zeros((0, feature_dim(model)), np.float32)
    arrays = {
        "embeddings": emb.astype(dtype),
        "ids": first_id + np.asarray(embedded.kept, dtype=np.int64),
        "paths": np.asarray([str(paths[i]) for i in embedded.kept], dtype=str),
    }
    return arrays, skipped


def embed_images(
    paths: Sequence[str | Path],
    model: torch.nn.Module | Callable[[], torch.nn.Module],
    stage: Stage,
    cfg: EmbedConfig | None = None,
    rank: int | None = None,
    world_size: int | None = None,
) -> bool:
    """Embed ``paths`` into ``stage``'s folder, resuming after the last finished shard.

    Args:
        paths: image files (their order defines ids and shards; pass a sorted list).
        model: a backbone (its last block's normalised class token is embedded, see
            :mod:`dinolab.features.embed`) or any module returning [B, D] from [B, 3, H, W] images, or a
            function building it (called only if some shard is left to compute).
        stage: an opened stage (its config should name the model and ``cfg``).
        cfg: embedding settings.
        rank, world_size: default from :func:`dinolab.distributed.env.dist_env`.

    Returns:
        True if the stage is finished (always on one rank; on several ranks, once every shard exists).
    """
    cfg = cfg or EmbedConfig()
    if rank is None or world_size is None:
        rank, world_size = dist_env()
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("no images to embed (empty image list)")
    if stage.done:
        return True
    stage.open()
    device = resolve_device(cfg.device)
    loaded: list[torch.nn.Module] = []
    num_shards = -(-len(paths) // cfg.shard_size)
    skipped_per_shard: dict[int, list[str]] = {}

    def compute(index: int) -> dict[str, np.ndarray]:
        if not loaded:
            built = model if isinstance(model, torch.nn.Module) else model()
            loaded.append(built.to(device).eval())
        start = index * cfg.shard_size
        arrays, skipped = embed_shard(loaded[0], paths[start : start + cfg.shard_size], start, cfg)
        skipped_per_shard[index] = skipped
        return arrays

    def marker_info(index: int, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
        return {"dim": int(arrays["embeddings"].shape[1]), "skipped": skipped_per_shard.pop(index, [])}

    stage.run_shards(num_shards, compute, desc="embed", rank=rank, world_size=world_size, info=marker_info)
    return stage.try_finish(num_shards, outputs=lambda: _embed_outputs(stage, num_shards, len(paths)))


def _embed_outputs(stage: Stage, num_shards: int, num_images: int) -> dict[str, Any]:
    markers = stage.shard_markers(num_shards) or []
    skipped = [p for m in markers for p in m.get("skipped", [])]
    warn_skipped(skipped)
    return {
        "dim": markers[0]["dim"],
        "num_images": num_images,
        "num_embedded": sum(m["count"] for m in markers),
        "num_skipped": len(skipped),
    }
