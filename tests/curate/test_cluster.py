from __future__ import annotations

import numpy as np

from dinolab.curate.cluster import KMeansConfig, pool_kmeans
from dinolab.curate.selection import rank_in_group, row_keys, sort_key, take_per_cluster
from dinolab.curate.kmeans import kmeans_plus_plus
from dinolab.curate.hierarchical import HierarchicalConfig, balanced_sample, hierarchical_kmeans, split_target
from dinolab.curate.stages import Stage
from dinolab.curate.store import ArrayEmbeddings


def _blobs(sizes, dim=32, spread=0.05, seed=0):
    """Tight clusters around orthogonal directions; returns unit vectors and true labels."""
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.full(s, c) for c, s in enumerate(sizes)])
    x = np.eye(len(sizes), dim)[labels] + spread * rng.standard_normal((len(labels), dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


def _same_partition(a, b):
    return len(np.unique(np.stack([a, b]), axis=1).T) == len(np.unique(a)) == len(np.unique(b))


def test_pool_kmeans_recovers_separated_clusters(tmp_path):
    x, labels = _blobs([60, 80, 100, 40])
    rows = np.arange(0, len(x), 1)
    result = pool_kmeans(ArrayEmbeddings(x, chunk_rows=64), rows, KMeansConfig(n_clusters=4, seed=1),
                         Stage(tmp_path / "c", "cluster", {}))
    assert _same_partition(result.cluster, labels)
    np.testing.assert_allclose(result.sim, np.sum(x * result.centroids[result.cluster], axis=1), atol=1e-5)


def test_kmeans_plus_plus_seeds_one_centre_per_separated_blob():
    # after a centre in one blob its members weigh ~0.013 (1 - cosine) and the other blobs' ~1, so the next
    # centre falls in a new blob with probability ~0.99 per draw: all four blobs ~98% of the time
    # (a uniform draw of 4 rows: 0.75 x 0.5 x 0.25 = 9%)
    x, labels = _blobs([40, 40, 40, 40], spread=0.02, seed=3)
    store = ArrayEmbeddings(x, chunk_rows=50)
    blobs_found = [len(set(np.argmax(kmeans_plus_plus(store, np.arange(len(x)), 4, seed) @ np.eye(4, 32).T, axis=1)))
                   for seed in range(20)]
    assert blobs_found.count(4) >= 17


def test_rank_in_group_by_hand():
    groups = np.array([1, 0, 1, 1, 0])
    key = np.array([0.3, 0.9, 0.1, 0.2, 0.5])
    np.testing.assert_array_equal(rank_in_group(groups, key), [2, 1, 0, 1, 0])
    picked = take_per_cluster(groups, sort_key("closest", np.arange(5), key), np.array([1, 2]))  # most similar first
    np.testing.assert_array_equal(picked, [0, 1, 3])


def test_random_keys_belong_to_rows_not_positions():
    keys = row_keys(np.arange(1000), seed=0)
    assert 0 <= keys.min() and keys.max() < 1 and abs(keys.mean() - 0.5) < 0.05
    np.testing.assert_array_equal(row_keys(np.array([7, 3]), 0), keys[[7, 3]])  # whichever rank holds them
    assert not np.array_equal(row_keys(np.arange(10), 1), keys[:10])


def test_split_target_water_filling():
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(split_target(np.array([1, 5, 10]), 9, rng), [1, 4, 4])
    quota = split_target(np.array([1, 5, 10]), 10, rng)
    assert quota.sum() == 10 and quota[0] == 1 and sorted(quota[1:]) == [4, 5]
    np.testing.assert_array_equal(split_target(np.array([3, 2]), 50, rng), [3, 2])


def test_hierarchical_balanced_sample_evens_out_cluster_sizes():
    # 4 blobs of very different size; a balanced sample of 40 takes 10 from each.
    x, labels = _blobs([400, 100, 30, 20], seed=2)
    cfg = HierarchicalConfig(n_clusters=[8, 4], resampling_steps=[1, 3], sample_sizes=[1, 2], n_iter=20,
                             target_size=40, seed=0)
    rows = np.arange(len(x))
    levels = hierarchical_kmeans(ArrayEmbeddings(x, chunk_rows=128), rows, cfg)
    assert [len(lv.centroids) for lv in levels] == [8, 4]
    top_of_row = levels[1].assignment[levels[0].assignment]
    assert _same_partition(top_of_row, labels)  # the top level finds the 4 blobs
    sample, sims = balanced_sample(levels, cfg)
    np.testing.assert_array_equal(np.bincount(labels[sample], minlength=4), [10, 10, 10, 10])
    assert len(np.unique(sample)) == 40
    np.testing.assert_allclose(sims, np.sum(x[sample] * levels[0].centroids[levels[0].assignment[sample]], axis=1),
                               atol=1e-5)
