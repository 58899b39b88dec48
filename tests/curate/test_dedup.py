from __future__ import annotations

import json

import numpy as np
import pytest

from dinolab.curate.dedup import Components, DedupConfig, relative_dedup, self_dedup
from dinolab.curate.stages import Stage
from dinolab.curate.store import ArrayEmbeddings


def _cfg(k: int = 8) -> DedupConfig:
    return DedupConfig(k=k)


def test_self_dedup_finds_planted_duplicates_and_keeps_one(tmp_path, make_pool):
    x, groups = make_pool()
    store = ArrayEmbeddings(x, chunk_rows=128)
    labels = self_dedup(store, _cfg(), Stage(tmp_path / "dedup", "dedup", {"t": 0.6})).labels_of(np.arange(len(x)))
    for members in groups:
        # All copies in one component, labelled by its lowest row.
        assert set(labels[members]) == {members.min()}
    planted = np.concatenate(groups)
    others = np.setdiff1d(np.arange(len(x)), planted)
    np.testing.assert_array_equal(labels[others], others)  # no false duplicates
    kept = np.nonzero(labels == np.arange(len(x)))[0]
    assert len(kept) == len(x) - sum(len(m) - 1 for m in groups)


def test_self_dedup_threshold_is_configurable(tmp_path, make_pool):
    x, _ = make_pool(noise=0.3)
    cfg = _cfg()
    cfg.threshold = 0.99  # copies sit near 0.96: no edge survives
    components = self_dedup(ArrayEmbeddings(x), cfg, Stage(tmp_path / "d", "dedup", {"t": 0.99}))
    assert len(components.rows) == 0
    np.testing.assert_array_equal(components.labels_of(np.arange(len(x))), np.arange(len(x)))


def test_components_label_every_row_from_the_duplicated_rows_only():
    components = Components(np.array([0, 1, 2, 4, 5]), np.array([0, 1, 0, 1, 0]))  # {0,2,5}, {1,4}, {3}, {6}
    np.testing.assert_array_equal(components.labels_of(np.arange(7)), [0, 1, 0, 3, 1, 0, 6])
    assert components.num_components == 2


def test_relative_dedup_against_eval_set(tmp_path, make_pool):
    x, groups = make_pool()
    store = ArrayEmbeddings(x, chunk_rows=100)
    cfg = _cfg()
    components = self_dedup(store, cfg, Stage(tmp_path / "self", "dedup", {}))
    labels = components.labels_of(np.arange(len(x)))
    # The evaluation set holds a noisy copy of the last member of group 0 and one unrelated vector.
    target = groups[0][-1]
    rng = np.random.default_rng(9)
    near = x[target] + 0.3 * rng.standard_normal(x.shape[1]) / np.sqrt(x.shape[1])
    far = rng.standard_normal(x.shape[1])
    evals = np.stack([near / np.linalg.norm(near), far / np.linalg.norm(far)]).astype(np.float32)
    keep = relative_dedup(store, evals, components, cfg, Stage(tmp_path / "rel", "relative", {}))
    representatives = np.nonzero(labels == np.arange(len(x)))[0]
    np.testing.assert_array_equal(keep, np.setdiff1d(representatives, [groups[0].min()]))
    assert not np.isin(groups[0], keep).any()


class _Crashing(ArrayEmbeddings):
    """A store that raises once when chunk ``crash_at`` is read a second time (the first read
    builds the index, the second queries it), counting chunk reads."""

    def __init__(self, *args, crash_at: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.crash_at = crash_at
        self.reads: list[int] = []

    def chunk_view(self, index):  # what the stages read chunks with
        self.reads.append(index)
        if index == self.crash_at and self.reads.count(index) == 2:
            self.crash_at = None
            raise RuntimeError("simulated kill")
        return super().chunk_view(index)


def test_killed_stage_resumes_and_writes_the_same_manifest(tmp_path, make_pool):
    x, _ = make_pool()
    cfg, config = _cfg(), {"k": 8, "threshold": 0.6}
    reference = self_dedup(ArrayEmbeddings(x, chunk_rows=100), cfg, Stage(tmp_path / "ref", "dedup", config)).labels

    store = _Crashing(x, chunk_rows=100, crash_at=2)
    stage = Stage(tmp_path / "run", "dedup", config)
    with pytest.raises(RuntimeError, match="simulated kill"):
        self_dedup(store, cfg, stage)
    assert stage.shard_finished(1) and not stage.shard_finished(2)
    assert json.loads(stage.manifest_path.read_text())["status"] == "running"

    store.reads.clear()
    labels = self_dedup(store, cfg, Stage(tmp_path / "run", "dedup", config)).labels
    # Only the unfinished shards are queried again (the index build streams every chunk once).
    queried = store.reads[store.num_chunks():]
    assert queried == list(range(2, store.num_chunks()))
    np.testing.assert_array_equal(labels, reference)
    assert (tmp_path / "run" / "manifest.json").read_text() == (tmp_path / "ref" / "manifest.json").read_text()

    # A finished stage is never recomputed.
    store.reads.clear()
    self_dedup(store, cfg, Stage(tmp_path / "run", "dedup", config))
    assert store.reads == []


def test_changed_config_is_an_error_or_a_recompute(tmp_path, make_pool):
    x, _ = make_pool(n_base=50, n_groups=3)
    store = ArrayEmbeddings(x)
    self_dedup(store, _cfg(), Stage(tmp_path / "d", "dedup", {"threshold": 0.6}))
    with pytest.raises(ValueError, match="another configuration"):
        self_dedup(store, _cfg(), Stage(tmp_path / "d", "dedup", {"threshold": 0.7}))
    cfg = _cfg()
    cfg.threshold = 0.99
    components = self_dedup(store, cfg, Stage(tmp_path / "d", "dedup", {"threshold": 0.99}, on_change="recompute"))
    assert len(components.rows) == 0


def test_similarities_read_back_whole_or_as_a_regular_subsample(tmp_path):
    stage = Stage(tmp_path / "s", "dedup", {}).open()
    values, bounds = np.arange(103, dtype=np.float32), [0, 10, 47, 80, 103]  # shards of unequal sizes
    for i in range(4):
        stage.write_shard(i, {"nn_sim": values[bounds[i] : bounds[i + 1]]})
    stage.finish({}, 4)
    np.testing.assert_array_equal(stage.column("nn_sim", limit=103), values)
    np.testing.assert_array_equal(stage.column("nn_sim", limit=50), values[::3])  # rows 0, 3, 6, ...
