"""Single-process behaviour of the distributed helpers, and sampler positions carried across rank counts."""

from __future__ import annotations

import numpy as np

from dinolab.data.samplers import InfiniteSampler
from dinolab.distributed import env
from dinolab.train.checkpointer import resharded_sampler_state


def test_without_torchrun_everything_answers_for_one_process(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    state = env.init_distributed()
    assert (state.rank, state.world_size, state.distributed, state.is_main) == (0, 1, False, True)
    assert not env.is_initialized()
    assert env.mean_over_ranks({"a": 2.5}) == {"a": 2.5} and env.max_over_ranks(15) == 15
    assert env.all_gather_objects("x") == ["x"]


def take(sampler: InfiniteSampler, n: int) -> list[int]:
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def test_two_rank_sampler_position_continues_on_one_rank():
    # 2 ranks consumed 3 steps of 2 images each = the first 12 of epoch 0's permutation of 20 samples
    ranks = [InfiniteSampler(20, seed=7, rank=r, world_size=2) for r in range(2)]
    seen = [take(s, 6) for s in ranks]
    saved = ranks[0].state_dict(consumed=6)
    one = InfiniteSampler(20, seed=7)
    one.load_state_dict(resharded_sampler_state(saved, one))
    perm = np.random.default_rng([7, 0]).permutation(20)
    assert sorted(seen[0] + seen[1]) == sorted(perm[:12].tolist())  # what the two ranks drew
    assert take(one, 8) == perm[12:20].tolist()  # one rank continues with the rest of the epoch


def test_one_rank_sampler_position_continues_on_two_ranks():
    one = InfiniteSampler(20, seed=7)
    take(one, 8)
    ranks = [InfiniteSampler(20, seed=7, rank=r, world_size=2) for r in range(2)]
    for s in ranks:
        s.load_state_dict(resharded_sampler_state(one.state_dict(consumed=8), s))
    perm = np.random.default_rng([7, 0]).permutation(20)
    assert sorted(take(ranks[0], 6) + take(ranks[1], 6)) == sorted(perm[8:20].tolist())
