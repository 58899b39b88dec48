from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dinolab.curate.embed import EmbedConfig, dist_env, embed_images
from dinolab.curate.stages import Stage
from dinolab.curate.store import ShardedEmbeddings


class _LinearEmbedder(torch.nn.Module):
    embed_dim = 16

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(3 * 16 * 16, self.embed_dim)

    def forward(self, x):
        return self.proj(x.flatten(1))


def _images(folder, n):
    rng = np.random.default_rng(0)
    folder.mkdir()
    paths = []
    for i in range(n):
        p = folder / f"{i:03d}.png"
        Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8)).save(p)
        paths.append(p)
    return paths


def _cfg(**kw):
    return EmbedConfig(shard_size=4, batch_size=3, crop_size=16, resize_size=None, num_workers=0, device="cpu", **kw)


def test_two_ranks_write_the_same_shards_as_one(tmp_path):
    paths = _images(tmp_path / "img", 11)
    model = _LinearEmbedder()
    single = Stage(tmp_path / "one", "embed", {"x": 1}).open()
    assert embed_images(paths, model, single, _cfg(), rank=0, world_size=1)

    shared = Stage(tmp_path / "two", "embed", {"x": 1}).open()
    assert not embed_images(paths, model, shared, _cfg(), rank=0, world_size=2)  # shards 0 and 2 only
    assert [shared.shard_finished(i) for i in range(3)] == [True, False, True]
    assert embed_images(paths, model, shared, _cfg(), rank=1, world_size=2)  # shard 1, then the stage is done
    assert (tmp_path / "one" / "manifest.json").read_text() == (tmp_path / "two" / "manifest.json").read_text()

    store = ShardedEmbeddings(tmp_path / "two")
    emb = np.concatenate([e for _, e in store.iter_chunks()])
    with torch.no_grad():
        ref = torch.nn.functional.normalize(model(torch.stack([_to_input(p) for p in paths])), dim=1).numpy()
    np.testing.assert_allclose(emb, ref, atol=2e-3)  # float16 storage
    assert store.paths(np.array([10, 0])) == [str(paths[10]), str(paths[0])]


def _to_input(path):
    from dinolab.data.transforms import EvalTransform

    return EvalTransform(crop_size=16, resize_size=None)(Image.open(path))


def test_float32_option_and_unreadable_files(tmp_path):
    paths = _images(tmp_path / "img", 5)
    paths[2].write_bytes(b"broken")
    stage = Stage(tmp_path / "e", "embed", {}).open()
    with pytest.warns(UserWarning, match="skipped 1 unreadable images"):
        embed_images(paths, _LinearEmbedder(), stage, _cfg(float16=False), rank=0, world_size=1)
    shard = stage.load_shard(0)
    assert shard["embeddings"].dtype == np.float32
    np.testing.assert_array_equal(shard["ids"], [0, 1, 3])
    np.testing.assert_allclose(np.linalg.norm(shard["embeddings"], axis=1), 1.0, atol=1e-6)
    marker = json.loads(stage.shard_marker(0).read_text())
    assert marker["skipped"] == [str(paths[2])]


def test_rank_from_torchrun_environment(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert dist_env() == (3, 8)
