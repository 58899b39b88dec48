"""Two gloo ranks curate exactly as one process: the same curated.jsonl, dedup components and k-means.

Every stage runs on both ranks, each on its own chunks (sharded k-NN index, per-chunk relative dedup,
k-means and hierarchical k-means with all-reduced integer sums, sharded retrieval searches); rank 0
merges and writes. A rank that
dies after its first dedup shard is restarted and the run ends with the same bytes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))
from dist_harness import run_ranks  # noqa: E402

from dinolab.curate.pipeline import CurateConfig, run_curation  # noqa: E402
from dinolab.curate.stages import Stage  # noqa: E402

def _load_planted_pool():
    """tests/curate/conftest.py's generator, loaded by path: a spawned rank's ``import conftest`` may find
    another folder's conftest first (the whole suite puts several on sys.path)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("curate_conftest", Path(__file__).with_name("conftest.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.planted_pool


planted_pool = _load_planted_pool()


def _inputs(folder: Path, write: bool = True) -> dict:
    """The input files (written when ``write``: by one rank only, as two ranks rewriting the same file race)."""
    if write:
        x, _ = planted_pool(n_base=300, dim=32, n_groups=25, copies=2, noise=0.3, seed=0)
        np.save(folder / "pool.npy", x)
        rng = np.random.default_rng(1)
        np.save(folder / "near.npy", x[:40] + 0.05 * rng.standard_normal((40, 32)).astype(np.float32))
        np.save(folder / "few.npy", x[40:46] + 0.05 * rng.standard_normal((6, 32)).astype(np.float32))
        np.save(folder / "eval.npy", x[100:104])
    return {"pool": folder / "pool.npy", "seeds": {"near": folder / "near.npy", "few": folder / "few.npy"},
            "eval_sets": {"val": folder / "eval.npy"}}


def _config(index: str = "flat") -> CurateConfig:
    cfg = CurateConfig(chunk_rows=64)  # 350 rows: 6 chunks, strided 3 + 3 over 2 ranks
    cfg.dedup.k = 8
    cfg.index.kind = index
    if index == "ivf":  # IVF cells trained on rows sent by both ranks; searches in rounds of 16 queries
        cfg.index.nlist, cfg.index.nprobe, cfg.index.search_batch = 6, 2, 16
    cfg.kmeans.n_clusters = 6
    cfg.kmeans.n_iter = 5
    cfg.kmeans.max_points_per_centroid = 30  # a 180-row sample spread over the chunks of both ranks
    cfg.retrieve.cluster_below = 10  # "near" (40 seeds) sample-based, "few" (6 seeds) cluster-based
    cfg.retrieve.per_cluster = 20
    cfg.retrieve.min_hits = 1
    cfg.retrieve.cap = 50
    cfg.hierarchical_sample = True  # level 1 over the chunks of both ranks, with a resampling step above it
    cfg.hierarchical.n_clusters, cfg.hierarchical.resampling_steps = [8, 3], [2, 2]
    cfg.hierarchical.sample_sizes, cfg.hierarchical.max_points_per_centroid = [4, 2], 20
    cfg.hierarchical.n_iter, cfg.hierarchical.target_size = 5, 40
    cfg.hierarchical.sampling = "random" if index == "ivf" else "closest"
    return cfg


def _curate(rank: int, folder: str, out: str, fail_after_first_dedup_shard: bool, index: str = "flat") -> None:
    torch.distributed.init_process_group("gloo")
    try:
        if fail_after_first_dedup_shard and rank == 1:
            original = Stage.write_shard

            def write_then_die(self, index, arrays, extra=None):
                original(self, index, arrays, extra)
                if self.name == "dedup":
                    raise RuntimeError("rank 1 killed after its first dedup shard")

            Stage.write_shard = write_then_die
        inputs = _inputs(Path(folder), write=rank == 0)
        torch.distributed.barrier()  # the files are complete before any rank reads them
        run_curation(inputs["pool"], inputs["seeds"], out, _config(index), eval_sets=inputs["eval_sets"])
    finally:
        torch.distributed.destroy_process_group()


def _outputs(out: Path) -> dict[str, bytes]:
    files = ["curated.jsonl", "retrieve/near.jsonl", "retrieve/few.jsonl", "cluster/centroids.npy",
             "relative_dedup/keep.npz", "hierarchical/levels.npz", "hierarchical/sample.npz",
             "dedup/components_rows.npy", "dedup/components_labels.npy"]
    found = {name: (out / name).read_bytes() for name in files}
    for i in range(6):
        with np.load(out / "cluster" / f"shard_{i:05d}.npz") as data:
            found[f"cluster {i}"] = b"".join(data[k].tobytes() for k in ("rows", "cluster", "sim"))
    return found


def _one_process(folder: Path, index: str) -> dict[str, bytes]:
    inputs = _inputs(folder)
    counts = run_curation(inputs["pool"], inputs["seeds"], folder / "out", _config(index),
                          eval_sets=inputs["eval_sets"])
    assert counts["self_dedup"]["num_duplicate_components"] >= 25 and counts["retrieve"]["few"]["method"] == "cluster"
    assert counts["curated"] > 0 and counts["hierarchical"]["num_sampled"] == 40
    return _outputs(folder / "out")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict[str, bytes]:
    return _one_process(tmp_path_factory.mktemp("one"), "flat")


def test_two_ranks_give_the_same_bytes_as_one_process(tmp_path, one_process):
    run_ranks(_curate, 2, str(tmp_path), str(tmp_path / "out"), False)
    two = _outputs(tmp_path / "out")
    assert [name for name in one_process if one_process[name] != two[name]] == []


def test_a_rank_killed_mid_dedup_restarts_and_finishes_the_same(tmp_path, one_process):
    # either rank's error may be the one reported: rank 1's own, or rank 0's lost connection to it
    with pytest.raises(Exception, match=r"killed after its first dedup shard|Connection reset|Connection closed"):
        run_ranks(_curate, 2, str(tmp_path), str(tmp_path / "out"), True)
    dedup = tmp_path / "out" / "dedup"
    assert not (dedup / "components_rows.npy").exists() and (dedup / "shard_00001.json").exists()
    run_ranks(_curate, 2, str(tmp_path), str(tmp_path / "out"), False)
    two = _outputs(tmp_path / "out")
    assert [name for name in one_process if one_process[name] != two[name]] == []


def test_two_ranks_with_an_ivf_index_and_searches_in_rounds_give_the_same_bytes(tmp_path):
    (tmp_path / "one").mkdir()
    one = _one_process(tmp_path / "one", "ivf")
    run_ranks(_curate, 2, str(tmp_path), str(tmp_path / "out"), False, "ivf")
    two = _outputs(tmp_path / "out")
    assert [name for name in one if one[name] != two[name]] == []


def _trained_bytes(rank: int, folder: str) -> None:
    """Rank r trains the ivfsq and ivfpq indexes of a 2,000-row pool (chunks strided over the ranks) and
    writes their serialized bytes."""
    from dinolab.curate.index import IndexConfig, train_index
    from dinolab.curate.store import ArrayEmbeddings, l2_normalize

    if rank >= 0:  # -1: one process, no process group
        torch.distributed.init_process_group("gloo")
    x = l2_normalize(np.random.default_rng(3).standard_normal((2000, 16)).astype(np.float32))
    store = ArrayEmbeddings(x, chunk_rows=300)
    for kind in ("ivfsq", "ivfpq"):
        cfg = IndexConfig(kind=kind, nlist=8, pq_m=4, pq_nbits=4, use_gpu=False)
        blob = faiss_bytes(train_index(store, cfg, np.arange(2000)))
        if rank <= 0:
            (Path(folder) / f"{kind}.bin").write_bytes(blob)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def faiss_bytes(index) -> bytes:
    import faiss

    return faiss.serialize_index(index).tobytes()


def test_ivf_cells_and_encoders_train_on_two_ranks_to_the_bytes_of_one_process(tmp_path):
    (tmp_path / "one").mkdir(), (tmp_path / "two").mkdir()
    _trained_bytes(-1, str(tmp_path / "one"))
    run_ranks(_trained_bytes, 2, str(tmp_path / "two"))
    for kind in ("ivfsq", "ivfpq"):
        assert (tmp_path / "one" / f"{kind}.bin").read_bytes() == (tmp_path / "two" / f"{kind}.bin").read_bytes(), kind
