"""InfiniteSampler: disjoint rank shards, per-epoch coverage, determinism, exact resume."""

from __future__ import annotations

from itertools import islice

import pytest
import torch

from dinolab.data.samplers import InfiniteSampler


def _take(sampler: InfiniteSampler, n: int) -> list[int]:
    return list(islice(iter(sampler), n))


def test_ranks_get_disjoint_shards_covering_each_epoch() -> None:
    n, world = 10, 3
    samplers = [InfiniteSampler(n, seed=1, rank=r, world_size=world) for r in range(world)]
    assert [s.per_epoch for s in samplers] == [4, 3, 3]
    for epoch in range(3):
        shards = [set(s.epoch_indices(epoch).tolist()) for s in samplers]
        assert sum(len(sh) for sh in shards) == n and set().union(*shards) == set(range(n))
    # The stream of each rank is its epoch shards one after another.
    first = _take(InfiniteSampler(n, seed=1, rank=1, world_size=world), 6)
    assert first == samplers[1].epoch_indices(0).tolist() + samplers[1].epoch_indices(1).tolist()


def test_every_index_once_per_epoch_and_epochs_reshuffle() -> None:
    stream = _take(InfiniteSampler(50, seed=0), 150)
    epochs = [stream[i : i + 50] for i in (0, 50, 100)]
    assert all(sorted(e) == list(range(50)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]


def test_same_seed_same_stream_other_seed_other_stream() -> None:
    assert _take(InfiniteSampler(100, seed=7), 120) == _take(InfiniteSampler(100, seed=7), 120)
    assert _take(InfiniteSampler(100, seed=7), 120) != _take(InfiniteSampler(100, seed=8), 120)
    assert _take(InfiniteSampler(5, shuffle=False), 7) == [0, 1, 2, 3, 4, 0, 1]


def test_keys_encode_epoch_and_index() -> None:
    keys = _take(InfiniteSampler(6, seed=0, yield_keys=True), 18)
    assert [k // 6 for k in keys] == [0] * 6 + [1] * 6 + [2] * 6
    assert [k % 6 for k in keys] == _take(InfiniteSampler(6, seed=0), 18)


@pytest.mark.parametrize("stop", [0, 5, 13, 37])
@pytest.mark.parametrize("rank", [0, 2])
def test_resume_yields_exactly_the_uninterrupted_stream(stop: int, rank: int) -> None:
    make = lambda: InfiniteSampler(13, seed=3, rank=rank, world_size=3, yield_keys=True)  # noqa: E731
    reference = _take(make(), stop + 40)
    first = make()
    assert _take(first, stop) == reference[:stop]
    state = first.state_dict()
    assert state["position"] == stop
    resumed = make()
    resumed.load_state_dict(state)
    assert _take(resumed, 40) == reference[stop:]


def test_resume_through_a_dataloader_from_the_consumed_count() -> None:
    sampler = InfiniteSampler(23, seed=0)
    reference = _take(InfiniteSampler(23, seed=0), 8 * 4)
    loader = iter(torch.utils.data.DataLoader(range(23), batch_size=4, sampler=sampler, num_workers=0))
    steps = [next(loader).tolist() for _ in range(3)]
    state = sampler.state_dict(consumed=3 * 4)  # what the loop used, whatever the loader prefetched
    resumed_sampler = InfiniteSampler(23, seed=0)
    resumed_sampler.load_state_dict(state)
    resumed = iter(torch.utils.data.DataLoader(range(23), batch_size=4, sampler=resumed_sampler))
    steps += [next(resumed).tolist() for _ in range(5)]
    assert sum(steps, []) == reference


def test_mismatched_state_is_rejected() -> None:
    state = InfiniteSampler(10, seed=0, world_size=2).state_dict()
    with pytest.raises(ValueError, match="world_size"):
        InfiniteSampler(10, seed=0, world_size=1).load_state_dict(state)
    with pytest.raises(ValueError, match="num_samples"):
        InfiniteSampler(11, seed=0, world_size=2).load_state_dict(state)


def test_invalid_sharding_is_rejected() -> None:
    with pytest.raises(ValueError, match="rank"):
        InfiniteSampler(10, rank=2, world_size=2)
    with pytest.raises(ValueError, match="at least one sample per rank"):
        InfiniteSampler(3, rank=0, world_size=4)
