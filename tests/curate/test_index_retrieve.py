from __future__ import annotations

import numpy as np
import pytest

from dinolab.curate.cluster import ClusterAssignment
from dinolab.curate.index import IndexConfig, build_index, index_array
from dinolab.curate.retrieve import (
    RetrieveConfig, Retrieved, cluster_based, read_jsonl, sample_based, union, write_jsonl,
)
from dinolab.curate.store import ArrayEmbeddings


def _unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_flat_search_equals_brute_force():
    rng = np.random.default_rng(0)
    pool, queries = _unit(rng, 500, 32), _unit(rng, 40, 32)
    sims, rows = index_array(pool, IndexConfig(kind="flat")).search(queries, 5)
    brute = queries @ pool.T
    ref_rows = np.argsort(-brute, axis=1)[:, :5]
    np.testing.assert_array_equal(rows, ref_rows)
    np.testing.assert_allclose(sims, np.take_along_axis(brute, ref_rows, axis=1), atol=1e-5)


def test_index_over_a_subset_answers_in_pool_rows():
    rng = np.random.default_rng(1)
    pool = _unit(rng, 300, 16)
    subset = np.arange(0, 300, 3)
    index = build_index(ArrayEmbeddings(pool, chunk_rows=64), IndexConfig(kind="flat"), rows=subset)
    _, rows = index.search(pool[subset[:10]], 1)
    np.testing.assert_array_equal(rows[:, 0], subset[:10])
    _, rows = index.search(pool[:1], 400)  # more neighbours than indexed vectors
    assert (rows[0, len(subset):] == -1).all() and set(rows[0, : len(subset)]) == set(subset)


def test_ivf_probing_every_cell_is_exact():
    rng = np.random.default_rng(2)
    pool, queries = _unit(rng, 2000, 32), _unit(rng, 20, 32)
    cfg = IndexConfig(kind="ivf", nlist=16, nprobe=16)
    _, rows = index_array(pool, cfg).search(queries, 4)
    np.testing.assert_array_equal(rows, np.argsort(-(queries @ pool.T), axis=1)[:, :4])


def test_searching_given_cells_equals_the_index_finding_them():
    # a sharded search sends each query's cells (found once, by its own rank) to every shard
    rng = np.random.default_rng(3)
    pool, queries = _unit(rng, 2000, 32), _unit(rng, 300, 32)
    index = index_array(pool, IndexConfig(kind="ivfsq", nlist=16, nprobe=3, search_batch=128))
    sims, cells = index.probes(queries)
    assert cells.shape == (300, 3) and index_array(pool, IndexConfig(kind="flat")).probes(queries) is None
    found, given = index.search(queries, 5), index.search(queries, 5, probes=(sims, cells))
    np.testing.assert_array_equal(found[1], given[1])
    np.testing.assert_array_equal(found[0], given[0])


def test_ivfpq_finds_near_copies():
    rng = np.random.default_rng(3)
    pool = _unit(rng, 3000, 64)
    noisy = pool[:50] + 0.2 * rng.standard_normal((50, 64)).astype(np.float32) / 8
    noisy /= np.linalg.norm(noisy, axis=1, keepdims=True)
    cfg = IndexConfig(kind="ivfpq", nlist=16, nprobe=16, pq_m=16, pq_nbits=6)
    _, rows = index_array(pool, cfg).search(noisy, 1)
    assert (rows[:, 0] == np.arange(50)).mean() > 0.9


def test_sample_based_unique_most_similar_and_capped():
    rng = np.random.default_rng(4)
    pool, seeds = _unit(rng, 400, 16), _unit(rng, 30, 16)
    index = index_array(pool, IndexConfig(kind="flat"))
    rows, sims = sample_based(index, seeds, n_per_seed=4, cap=10_000)
    brute = seeds @ pool.T
    top4 = np.argsort(-brute, axis=1)[:, :4]
    assert set(rows) == set(top4.ravel()) and len(rows) == len(set(rows))
    # Similarity to the most similar seed among those that retrieved the image.
    retrieved_by = np.zeros_like(brute, dtype=bool)
    np.put_along_axis(retrieved_by, top4, True, axis=1)
    expected = np.where(retrieved_by, brute, -np.inf).max(axis=0)[rows]
    np.testing.assert_allclose(sims, expected, atol=1e-5)
    capped, capped_sims = sample_based(index, seeds, n_per_seed=4, cap=7)
    np.testing.assert_array_equal(capped, rows[:7])  # the 7 most similar
    assert (np.diff(capped_sims) <= 0).all()


def _assignment(sizes):
    cluster = np.concatenate([np.full(s, c) for c, s in enumerate(sizes)])
    rng = np.random.default_rng(5)
    return ClusterAssignment(
        centroids=np.eye(len(sizes), 4, dtype=np.float32),
        rows=np.arange(len(cluster)) * 2,  # pool rows differ from positions
        cluster=cluster,
        sim=rng.random(len(cluster)).astype(np.float32),
    )


def test_cluster_based_respects_min_hits_per_cluster_and_cap():
    clusters = _assignment([50, 8, 30, 40, 5])
    hits = np.array([4, 10, 3, 7, 0])  # > 3 hits: clusters 0, 1, 3 (cluster 2 has exactly 3)
    rows, sims = cluster_based(hits, clusters, min_hits=3, per_cluster=20, cap=1000, strategy="closest", seed=0)
    taken = clusters.cluster[rows // 2]
    # Order by hits: cluster 1 (10 hits, only 8 images), cluster 3 (7 hits, 20 of 40), cluster 0 (20 of 50).
    np.testing.assert_array_equal(np.bincount(taken, minlength=5), [20, 8, 0, 20, 0])
    np.testing.assert_array_equal(taken, [1] * 8 + [3] * 20 + [0] * 20)
    # "closest": the 20 most similar members of cluster 3.
    members3 = np.nonzero(clusters.cluster == 3)[0]
    best3 = members3[np.argsort(-clusters.sim[members3])[:20]]
    assert set(rows[taken == 3] // 2) == set(best3)
    capped, _ = cluster_based(hits, clusters, min_hits=3, per_cluster=20, cap=30, strategy="random", seed=0)
    # The cap of 30 takes clusters 1 (8) and 3 (20) whole, then 2 images of cluster 0.
    np.testing.assert_array_equal(np.bincount(clusters.cluster[capped // 2], minlength=5), [2, 8, 0, 20, 0])


def test_auto_method_by_seed_set_size():
    cfg = RetrieveConfig(cluster_below=100)
    assert cfg.method_for(99) == "cluster" and cfg.method_for(100) == "sample"
    with pytest.raises(ValueError, match="retrieval method"):
        RetrieveConfig(method="nearest")


def test_union_keeps_most_similar_record_per_image_and_writes_one_line_each(tmp_path):
    a = Retrieved.of("a", "sample", np.array([3, 1, 5]), np.array([0.5, 0.9, 0.25], np.float32))
    b = Retrieved.of("b", "cluster", np.array([3, 5]), np.array([0.7, 0.25], np.float32))
    which, position = union([a, b])
    # row 1: a's; row 3: b's 0.7 beats a's 0.5; row 5: a tie at 0.25 goes to the earlier set
    assert [([a, b][w].seed_set, int([a, b][w].rows[p])) for w, p in zip(which, position)] == [
        ("a", 1), ("b", 3), ("a", 5)]
    assert write_jsonl(tmp_path / "m.jsonl", [a, b], (which, position), lambda rows: [f"img{r}" for r in rows]) == 3
    assert read_jsonl(tmp_path / "m.jsonl") == [
        {"path": "img1", "row": 1, "seed_set": "a", "method": "sample", "similarity": 0.9},
        {"path": "img3", "row": 3, "seed_set": "b", "method": "cluster", "similarity": 0.7},
        {"path": "img5", "row": 5, "seed_set": "a", "method": "sample", "similarity": 0.25}]


def test_ivf_training_is_lloyd_cells_and_the_residual_range_of_the_sample():
    import faiss

    from dinolab.curate.index import train_index
    from dinolab.curate.kmeans import lloyd, sample_rows
    from dinolab.curate.store import l2_normalize

    x = l2_normalize(np.random.default_rng(5).standard_normal((3000, 24)).astype(np.float32))
    store = ArrayEmbeddings(x, chunk_rows=400)
    cfg = IndexConfig(kind="ivfsq", nlist=12, use_gpu=False)
    index = train_index(store, cfg, np.arange(3000))
    sample = sample_rows(np.arange(3000), 64 * 12, cfg.seed)
    cells = index.quantizer.reconstruct_n(0, 12)
    assert np.array_equal(cells, lloyd(store, sample, 12, 10, cfg.seed))
    # 8-bit non-uniform range: per dimension [min, max - min] of x - (its most similar cell) over the sample
    residual = x[sample] - cells[np.argmax(x[sample] @ cells.T, axis=1)]
    low, high = residual.min(axis=0), residual.max(axis=0)
    trained = faiss.vector_to_array(index.sq.trained)
    np.testing.assert_allclose(trained, np.concatenate([low, high - low]), rtol=0, atol=1e-6)
    # the trained index answers like faiss's own IVFSQ training over the same cells
    ref = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(24), 24, 12, faiss.ScalarQuantizer.QT_8bit,
                                        faiss.METRIC_INNER_PRODUCT)
    ref.quantizer.add(cells)
    ref.train(x[sample])
    ref.nprobe = index.nprobe
    index.add(x), ref.add(x)
    assert np.mean(index.search(x[:200], 5)[1] == ref.search(x[:200], 5)[1]) > 0.95


@pytest.mark.parametrize("kind", ["flat", "ivf", "ivfsq", "ivfpq"])
def test_fill_index_holds_the_bytes_of_adding_chunk_by_chunk(kind, monkeypatch):
    # fill_index allocates each inverted list (or a flat index's codes) at its final size first; the index must
    # be the one faiss builds by adding the selected rows of every chunk in order
    import faiss

    from dinolab.curate.index import fill_index, train_index

    rng = np.random.default_rng(7)
    pool = _unit(rng, 3000, 32)
    store = ArrayEmbeddings(pool, chunk_rows=400)
    rows = np.sort(rng.choice(3000, 2100, replace=False))
    cfg = IndexConfig(kind=kind, nlist=20, nprobe=4, pq_m=8, pq_nbits=4, use_gpu=False)
    trained = train_index(store, cfg, rows)
    reference = faiss.clone_index(trained)
    for chunk in range(store.num_chunks()):
        start, emb = store.chunk(chunk)
        mine = rows[(rows >= start) & (rows < start + len(emb))]
        if len(mine):
            reference.add(np.ascontiguousarray(emb[mine - start]))
    filled = faiss.clone_index(trained)
    monkeypatch.setattr("dinolab.curate.index.FILL_BLOCK", 64)  # several blocks per chunk, the last one partial
    added = fill_index(filled, store, rows, range(store.num_chunks()))
    np.testing.assert_array_equal(added, rows)
    assert filled.ntotal == len(rows)
    assert faiss.serialize_index(filled).tobytes() == faiss.serialize_index(reference).tobytes()


def test_knn_edges_block_by_block_equal_edges_of_one_search():
    # knn_edges reduces each block of search_batch rows as it is answered; the edges are those of one search
    from dinolab.curate.dedup import edges_from_neighbours, knn_edges

    rng = np.random.default_rng(8)
    base = _unit(rng, 400, 16)
    pool = np.concatenate([base, base[:150] + 0.01 * rng.standard_normal((150, 16)).astype(np.float32)])
    pool /= np.linalg.norm(pool, axis=1, keepdims=True)
    index = index_array(pool, IndexConfig(kind="flat", search_batch=64))
    queries = pool[100:400]
    sims, nbrs = index_array(pool, IndexConfig(kind="flat", search_batch=4096)).search(queries, 6)
    whole = edges_from_neighbours(100, sims, nbrs, 5, 0.9)
    blocks = knn_edges(index, 100, queries, 5, 0.9)
    # the one duplicate of each of rows 100..149 is row 500..549 (base row i has its copy at 400 + i)
    assert set(zip(whole["src"].tolist(), whole["dst"].tolist())) == {(i, 400 + i) for i in range(100, 150)}
    for name in ("nn_sim", "src", "dst", "sim"):
        np.testing.assert_array_equal(blocks[name], whole[name])
