"""Resumable pipeline stages: atomic outputs, a manifest per stage, resume at the last finished shard.

A stage owns one folder::

    <out>/<stage>/
        manifest.json          # {"stage", "config_hash", "config", "status": "running" | "done",
                               #  "shards": [{"file", "count", ...}], "outputs": {...}}
        shard_00000.npz        # the output of shard 0 (atomic write)
        shard_00000.json       # its completion marker, written after the .npz (atomic write)
        ...                    # plus whole-stage outputs written before ``finish``

Rules that make a killed run safe to restart with the same command:

* every file is written with :mod:`dinolab.utils.io` (temporary file + rename), so a file either exists
  whole or not at all;
* a shard counts as finished only when its ``.json`` marker exists, and a restarted stage skips
  finished shards;
* a stage whose manifest says ``done`` is never recomputed;
* the manifest records a hash of the stage configuration (which includes the hashes of the stages
  it reads). If a later run asks for the same stage with a different configuration,
  ``on_change="error"`` (the default) raises a ValueError naming both hashes, and
  ``on_change="recompute"`` deletes the stage folder and starts it again. Downstream stages see
  a new upstream hash, so they follow the same rule.

Manifests hold no timestamps, so a resumed run writes the same manifest as an uninterrupted one.
With several ranks, each rank runs shards ``rank, rank + world_size, ...``; any rank may call
:meth:`Stage.try_finish`, which finishes the stage only once every shard marker exists.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from tqdm import tqdm

from dinolab.utils.io import atomic_save_npz, atomic_write_json

MANIFEST = "manifest.json"
ON_CHANGE_CHOICES = ("error", "recompute")
# Most per-row values :meth:`Stage.column` reads back: every row up to this, a regular subsample beyond.
MAX_COLUMN = 1 << 20


def config_hash(config: dict[str, Any]) -> str:
    """Short stable hash of a JSON-serialisable configuration (key order does not matter)."""
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class Stage:
    """One resumable stage rooted at ``folder`` (see the module docstring).

    Args:
        folder: the stage folder (created on :meth:`open`).
        name: stage name, recorded in the manifest.
        config: JSON-serialisable configuration of this stage, including upstream hashes.
        on_change: what to do when the folder holds this stage run with another configuration:
            ``"error"`` or ``"recompute"``.
    """

    folder: Path
    name: str
    config: dict[str, Any]
    on_change: str = "error"

    def __post_init__(self) -> None:
        self.folder = Path(self.folder)
        if self.on_change not in ON_CHANGE_CHOICES:
            raise ValueError(f"on_change must be one of {ON_CHANGE_CHOICES}, got {self.on_change!r}")
        self.hash = config_hash(self.config)

    @property
    def manifest_path(self) -> Path:
        return self.folder / MANIFEST

    def read_manifest(self) -> dict[str, Any] | None:
        if not self.manifest_path.exists():
            return None
        return json.loads(self.manifest_path.read_text())

    def open(self) -> Stage:
        """Check a previous run's configuration and write the ``running`` manifest if none exists."""
        previous = self.read_manifest()
        if previous is not None and previous.get("config_hash") != self.hash:
            if self.on_change == "error":
                raise ValueError(
                    f"stage '{self.name}' in {self.folder} was run with another configuration "
                    f"(hash {previous.get('config_hash')}, now {self.hash}); use a new output folder "
                    "or ask for a recompute (on_change='recompute', CLI --recompute)"
                )
            shutil.rmtree(self.folder)
            previous = None
        if previous is None:
            self._write_manifest(status="running")
        return self

    @property
    def done(self) -> bool:
        manifest = self.read_manifest()
        return manifest is not None and manifest.get("config_hash") == self.hash and manifest.get("status") == "done"

    @property
    def outputs(self) -> dict[str, Any]:
        """The ``outputs`` dict of a finished stage."""
        manifest = self.read_manifest()
        return {} if manifest is None else manifest.get("outputs", {})

    def path(self, name: str) -> Path:
        return self.folder / name

    def shard_file(self, index: int) -> Path:
        return self.folder / f"shard_{index:05d}.npz"

    def shard_marker(self, index: int) -> Path:
        return self.folder / f"shard_{index:05d}.json"

    def shard_finished(self, index: int) -> bool:
        return self.shard_marker(index).exists()

    def load_shard(self, index: int) -> dict[str, np.ndarray]:
        with np.load(self.shard_file(index), allow_pickle=False) as data:
            return {k: data[k] for k in data.keys()}

    def column(self, key: str, limit: int = MAX_COLUMN) -> np.ndarray:
        """The per-row array ``key`` of a finished stage's shards, in row order: all of it when there are at
        most ``limit`` rows, else every ``ceil(N / limit)``-th row (one shard in memory at a time)."""
        shards = self.read_manifest()["shards"]
        step = max(1, -(-sum(int(m["count"]) for m in shards) // limit))
        values, first = [np.zeros(0, np.float32)], 0
        for i, marker in enumerate(shards):
            values.append(self.load_shard(i)[key][(-first) % step :: step])  # rows that are multiples of step
            first += int(marker["count"])
        return np.concatenate(values)

    def run_shards(
        self,
        num_shards: int,
        compute: Callable[[int], dict[str, np.ndarray]],
        desc: str | None = None,
        rank: int = 0,
        world_size: int = 1,
        info: Callable[[int, dict[str, np.ndarray]], dict[str, Any]] | None = None,
    ) -> int:
        """Compute every unfinished shard of this rank and write it atomically.

        Args:
            num_shards: total number of shards of the stage.
            compute: shard index -> arrays to save; the first array's length is the shard's count.
            desc: progress-bar label (default: the stage name).
            rank: this rank; it runs shards ``rank, rank + world_size, ...``.
            world_size: number of ranks.
            info: optional extra JSON fields for the shard marker, from the shard index and arrays.

        Returns:
            The number of shards computed by this call (finished ones are skipped).
        """
        mine = self.unfinished(num_shards, rank, world_size)
        for index in tqdm(mine, desc=desc or self.name, unit="shard", disable=not mine):
            arrays = compute(index)
            self.write_shard(index, arrays, info(index, arrays) if info is not None else None)
        return len(mine)

    def write_shard(self, index: int, arrays: dict[str, np.ndarray], extra: dict[str, Any] | None = None) -> None:
        """Save shard ``index`` (atomic ``.npz``), then its marker (``file``, ``count`` and ``extra``)."""
        atomic_save_npz(self.shard_file(index), **arrays)
        first = next(iter(arrays.values()))
        marker = {"file": self.shard_file(index).name, "count": int(len(first)), **(extra or {})}
        atomic_write_json(self.shard_marker(index), marker)

    def unfinished(self, num_shards: int, rank: int = 0, world_size: int = 1) -> list[int]:
        """This rank's shards (``rank, rank + world_size, ...``) that have no marker yet."""
        return [i for i in range(rank, num_shards, world_size) if not self.shard_finished(i)]

    def shard_markers(self, num_shards: int) -> list[dict[str, Any]] | None:
        """The markers of all shards in order, or ``None`` if some shard is unfinished."""
        if not all(self.shard_finished(i) for i in range(num_shards)):
            return None
        return [json.loads(self.shard_marker(i).read_text()) for i in range(num_shards)]

    def finish(self, outputs: dict[str, Any] | None = None, num_shards: int = 0) -> None:
        """Mark the stage done, recording its shard markers and ``outputs``."""
        shards = self.shard_markers(num_shards)
        if shards is None:
            raise RuntimeError(f"stage '{self.name}': cannot finish, some of {num_shards} shards are missing")
        self._write_manifest(status="done", shards=shards, outputs=outputs or {})

    def try_finish(self, num_shards: int, outputs: Callable[[], dict[str, Any]] | None = None) -> bool:
        """Finish the stage if every shard exists (any rank may call this); True if done now."""
        if self.done:
            return True
        if self.shard_markers(num_shards) is None:
            return False
        self.finish(outputs() if outputs else {}, num_shards)
        return True

    def _write_manifest(self, status: str, shards: list[dict] | None = None, outputs: dict | None = None) -> None:
        manifest = {
            "stage": self.name,
            "config_hash": self.hash,
            "config": self.config,
            "status": status,
            "shards": shards or [],
            "outputs": outputs or {},
        }
        atomic_write_json(self.manifest_path, manifest)
