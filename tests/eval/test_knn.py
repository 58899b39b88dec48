from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from dinolab.eval import knn
from dinolab.eval.data import load_classification
from dinolab.eval.knn import KnnConfig, few_shot_indices, knn_votes, nearest_neighbours


def test_votes_by_hand_weighting_beats_majority_at_low_temperature():
    # query (1, 0); one class-1 neighbour at cosine 1.0 and two class-0 neighbours at cosine 0.9
    s = math.sqrt(1 - 0.9**2)
    train = torch.tensor([[1.0, 0.0], [0.9, s], [0.9, -s], [-1.0, 0.0]])
    labels = torch.tensor([1, 0, 0, 0])
    query = torch.tensor([[1.0, 0.0]])
    for temperature, winner in ((0.07, 1), (1.0, 0)):
        votes = knn_votes(train, labels, query, num_classes=2, ks=(3,), temperature=temperature)[3][0]
        # by hand: class 1 gets exp(1 / T), class 0 gets 2 exp(0.9 / T); only the ratio is defined
        expected_ratio = math.exp(1.0 / temperature) / (2 * math.exp(0.9 / temperature))
        assert math.isclose(votes[1].item() / votes[0].item(), expected_ratio, rel_tol=1e-4)
        assert int(votes.argmax()) == winner
    # k = 1: only the nearest neighbour votes
    votes = knn_votes(train, labels, query, num_classes=2, ks=(1,))[1][0]
    assert votes[0].item() == 0 and votes[1].item() > 0


def brute_force_votes(train, labels, queries, num_classes, k, temperature):
    """Reference: the full similarity matrix, a sort, and a loop over neighbours."""
    sims = queries @ train.T
    out = torch.zeros(len(queries), num_classes, dtype=torch.float64)
    for q in range(len(queries)):
        order = torch.argsort(sims[q], descending=True)[:k]
        for j in order.tolist():
            out[q, labels[j]] += math.exp(sims[q, j].item() / temperature)
    return out


def test_blockwise_votes_match_brute_force():
    gen = torch.Generator().manual_seed(0)
    train = F.normalize(torch.randn(203, 16, generator=gen), dim=1)
    labels = torch.randint(0, 5, (203,), generator=gen)
    queries = F.normalize(torch.randn(37, 16, generator=gen), dim=1)
    ks = (1, 10, 20, 100)
    votes = knn_votes(train, labels, queries, 5, ks, temperature=0.07, query_block=8, train_block=17)
    for k in ks:
        ref = brute_force_votes(train, labels, queries, 5, k, 0.07)
        got = votes[k].double()
        # each row is scaled by a per-query constant: compare the rows after normalisation
        torch.testing.assert_close(got / got.sum(1, keepdim=True), ref / ref.sum(1, keepdim=True), rtol=1e-4, atol=1e-6)
        assert torch.equal(got.argmax(1), ref.argmax(1))


def test_nearest_neighbours_blockwise_equals_full_topk():
    gen = torch.Generator().manual_seed(1)
    train = F.normalize(torch.randn(50, 8, generator=gen), dim=1)
    queries = F.normalize(torch.randn(6, 8, generator=gen), dim=1)
    sims, idx = nearest_neighbours(train, queries, k=7, train_block=9)
    ref_sims, ref_idx = (queries @ train.T).topk(7, dim=1)
    torch.testing.assert_close(sims, ref_sims)
    assert torch.equal(idx, ref_idx)


def test_k_larger_than_train_set_is_clamped():
    train = F.normalize(torch.randn(4, 3), dim=1)
    votes = knn_votes(train, torch.tensor([0, 1, 0, 1]), train, 2, ks=(200,))
    assert votes[200].shape == (4, 2)


def test_few_shot_indices_take_n_per_class():
    labels = np.array([0] * 10 + [1] * 3 + [2] * 7)
    idx = few_shot_indices(labels, 5, np.random.default_rng(0))
    counts = np.bincount(labels[idx])
    assert counts.tolist() == [5, 3, 5]  # a class with fewer than n keeps all of its images
    assert len(np.unique(idx)) == len(idx)


def test_run_on_tiny_model(tiny_model, classification_npz, feature_cfg):
    data = load_classification(classification_npz)
    cfg = KnnConfig(ks=(1, 5), image_size=32, n_per_class=(2,), n_tries=2, features=feature_cfg)
    metrics = knn.run(tiny_model, data, cfg)
    assert set(metrics) >= {"knn/k1/top1", "knn/k5/top5", "knn/2shot/k1/top1", "knn/2shot/k1/top1_std"}
    assert all(0 <= v <= 100 for v in metrics.values())
    assert metrics["knn/k5/top5"] == 100.0  # 3 classes: the top 5 always holds the label
