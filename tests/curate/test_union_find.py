from __future__ import annotations

import numpy as np
import pytest
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components as scipy_components

from dinolab.curate.union_find import UnionFind, connected_components


def test_constructed_graph_components_and_lowest_representative():
    # Components by hand: {0, 3, 7} (chain 7-3, 3-0), {1}, {2, 5, 6} (6-5, 5-2), {4}, {8, 9}.
    src = np.array([7, 3, 6, 5, 9])
    dst = np.array([3, 0, 5, 2, 8])
    labels = connected_components(10, src, dst)
    np.testing.assert_array_equal(labels, [0, 1, 2, 0, 4, 2, 2, 0, 8, 8])


def test_scalar_union_matches_bulk_union():
    edges = [(4, 1), (1, 6), (8, 9), (9, 4)]
    uf = UnionFind(10)
    for a, b in edges:
        uf.union(a, b)
    assert uf.find(9) == 1 and uf.find(6) == 1 and uf.find(0) == 0
    bulk = connected_components(10, np.array([a for a, _ in edges]), np.array([b for _, b in edges]))
    np.testing.assert_array_equal(uf.roots(), bulk)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_graph_matches_scipy(seed):
    rng = np.random.default_rng(seed)
    n, e = 2000, 1500
    src, dst = rng.integers(0, n, e), rng.integers(0, n, e)
    labels = connected_components(n, src, dst)
    graph = coo_matrix((np.ones(e), (src, dst)), shape=(n, n))
    n_comp, ref = scipy_components(graph, directed=False)
    assert len(np.unique(labels)) == n_comp
    # Same partition: each scipy component maps to exactly one label and vice versa.
    pairs = np.unique(np.stack([labels, ref]), axis=1)
    assert pairs.shape[1] == n_comp
    # Each label is the lowest member of its component.
    for lab in np.unique(labels)[:50]:
        assert lab == np.nonzero(labels == lab)[0].min()


def test_edge_order_does_not_change_labels():
    rng = np.random.default_rng(3)
    src, dst = rng.integers(0, 300, 400), rng.integers(0, 300, 400)
    perm = rng.permutation(400)
    np.testing.assert_array_equal(connected_components(300, src, dst), connected_components(300, dst[perm], src[perm]))
