"""A seeded, rank-aware infinite sampler whose position is saved and restored exactly.

As the official ``ShardedInfiniteSampler`` (dinov2 ``data/samplers.py``): epoch ``e`` is one
pass over a permutation of the data seeded by ``(seed, e)``, and rank ``r`` of ``W`` takes the
stride ``perm[r::W]``, so ranks never share an index within an epoch. Unlike the official
sampler, the stream is a pure function of ``(seed, rank, world_size, position)``: resuming at a
saved position yields exactly the indices an uninterrupted run would have seen (RECIPE §6.12).
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
from torch.utils.data import Sampler


class InfiniteSampler(Sampler[int]):
    """Endless stream of dataset indices (or sample keys) for one rank.

    Args:
        num_samples: dataset size N.
        seed: permutation seed, shared by all ranks.
        rank, world_size: this process's shard; ``rank`` in ``[0, world_size)``.
        shuffle: ``False`` walks ``0..N-1`` in order each epoch (still strided by rank).
        yield_keys: yield ``epoch * N + index`` instead of ``index``: a key unique to each draw,
            which :class:`dinolab.data.datasets.MultiCropDataset` turns back into ``key % N``
            and uses to seed the augmentation.

    ``position`` counts the items this rank's stream has produced; iteration starts there. A
    DataLoader pulls indices ahead of the training loop (prefetching), so save the position the
    loop has actually consumed: ``state_dict(consumed=start + steps * per_rank_batch)``.
    """

    def __init__(
        self,
        num_samples: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        yield_keys: bool = False,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if num_samples < world_size:
            raise ValueError(f"need at least one sample per rank: {num_samples} samples for {world_size} ranks")
        self.num_samples = num_samples
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.yield_keys = yield_keys
        self.position = 0
        # len(range(rank, N, W)): how many indices this rank draws per epoch.
        self.per_epoch = len(range(rank, num_samples, world_size))

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """This rank's indices for ``epoch``, in order: [per_epoch] int64."""
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
        else:
            order = np.arange(self.num_samples)
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        epoch, offset = divmod(self.position, self.per_epoch)
        while True:
            base = epoch * self.num_samples if self.yield_keys else 0
            for index in self.epoch_indices(epoch)[offset:].tolist():
                self.position += 1
                yield base + index
            epoch, offset = epoch + 1, 0

    def state_dict(self, consumed: int | None = None) -> dict[str, Any]:
        """The sampler's identity and position (``consumed`` overrides the produced count)."""
        return {
            "num_samples": self.num_samples,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "shuffle": self.shuffle,
            "position": self.position if consumed is None else int(consumed),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state["position"]``; the next ``iter()`` resumes there.

        Raises:
            ValueError: the state belongs to a different data set size, seed or sharding, so the
                same position would not name the same samples.
        """
        for key in ("num_samples", "seed", "rank", "world_size", "shuffle"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"sampler state has {key}={state[key]!r} but this sampler has {getattr(self, key)!r}; "
                    "resume with the same data and number of processes"
                )
        self.position = int(state["position"])
