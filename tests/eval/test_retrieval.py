from __future__ import annotations

import numpy as np
import pytest
import torch

from dinolab.eval import retrieval
from dinolab.eval.data import load_retrieval
from dinolab.eval.retrieval import RetrievalConfig, average_precision, mean_average_precision, rank_database, retrieval_metrics
from dinolab.eval.retrieval_set import build_augmented_retrieval_set, save_retrieval_npz

# positives at 0-based ranks 0 and 2 of 2: (1 + 1)/4 + (1/2 + 2/3)/4
AP_RANKS_0_2 = 0.5 + (0.5 + 2 / 3) / 4


def test_average_precision_by_hand():
    assert average_precision(np.array([0, 2]), 2) == pytest.approx(AP_RANKS_0_2)
    assert average_precision(np.array([0, 1, 2]), 3) == pytest.approx(1.0)
    # a positive never retrieved (3 positives, 1 found at rank 0) counts as recall lost
    assert average_precision(np.array([0]), 3) == pytest.approx(1 / 3)


def test_junk_is_removed_from_the_ranking():
    # database ids: 0 junk, 1 positive, 2 negative, 3 positive; ranking in that order
    ranks = np.array([[0, 1, 2, 3]])
    m_ap, aps, _ = mean_average_precision(ranks, [np.array([1, 3])], [np.array([0])])
    assert m_ap == pytest.approx(AP_RANKS_0_2)  # positives move to ranks 0 and 2
    m_ap_no_junk, _, _ = mean_average_precision(ranks, [np.array([1, 3])], [np.array([], dtype=int)])
    assert m_ap_no_junk == pytest.approx((0 + 0.5) / 4 + (1 / 3 + 2 / 4) / 4)  # ranks 1 and 3


def test_revisited_easy_medium_hard_on_constructed_ground_truth():
    # ranking: e0 h0 n j e1 h1 -> database ids 0..5
    e0, h0, n, j, e1, h1 = range(6)
    ranks = np.array([[e0, h0, n, j, e1, h1]])
    gnd = [{"easy": np.array([e0, e1]), "hard": np.array([h0, h1]), "junk": np.array([j])}]
    m = retrieval_metrics(ranks, gnd, kappas=(1,))
    # easy: hard and junk ignored -> e0 n e1 -> ranks 0, 2
    assert m["retrieval/easy/mAP"] == pytest.approx(100 * AP_RANKS_0_2)
    # medium: junk ignored -> e0 h0 n e1 h1 -> ranks 0, 1, 3, 4
    medium = (2 + 2 + (2 / 3 + 3 / 4) + (3 / 4 + 4 / 5)) / 8
    assert m["retrieval/medium/mAP"] == pytest.approx(100 * medium)
    assert m["retrieval/mAP"] == pytest.approx(100 * medium)
    # hard: easy and junk ignored -> h0 n h1 -> ranks 0, 2
    assert m["retrieval/hard/mAP"] == pytest.approx(100 * AP_RANKS_0_2)


def test_queries_without_positives_are_left_out_of_the_mean():
    ranks = np.array([[0, 1], [1, 0]])
    m_ap, aps, _ = mean_average_precision(ranks, [np.array([0]), np.array([], dtype=int)], [np.array([])] * 2)
    assert m_ap == 1.0 and np.isnan(aps[1])


def test_rank_database_orders_by_cosine():
    q = torch.tensor([[1.0, 0.0]])
    db = torch.tensor([[0.0, 1.0], [2.0, 0.1], [1.0, 1.0], [-1.0, 0.0]])  # cosines 0, ~1, 0.71, -1
    assert rank_database(q, db).tolist() == [[1, 2, 0, 3]]


def test_constructed_set_structure_and_npz_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (20, 24, 24, 3)).astype(np.uint8)
    data = build_augmented_retrieval_set(images, n_queries=5, easy_copies=2, hard_copies=1, junk_copies=1, seed=0)
    assert len(data.queries) == 5 and len(data.database) == 15 + 5 * 4
    for g in data.gnd:
        assert (len(g["easy"]), len(g["hard"]), len(g["junk"])) == (2, 1, 1)
    assert "constructed" in data.notes[0]
    # the query images themselves are not in the database; the distractors are
    db = data.database.array.reshape(len(data.database), -1)
    for qi in range(5):
        assert not (db == data.queries.array[qi].reshape(-1)).all(axis=1).any()
    again = build_augmented_retrieval_set(images, n_queries=5, easy_copies=2, hard_copies=1, junk_copies=1, seed=0)
    assert np.array_equal(again.database.array, data.database.array)  # deterministic
    save_retrieval_npz(data, tmp_path / "r.npz")
    loaded = load_retrieval(tmp_path / "r.npz")
    for a, b in zip(loaded.gnd, data.gnd):
        assert all(np.array_equal(a[k], b[k]) for k in ("easy", "hard", "junk"))
    assert "constructed" in loaded.notes[0]


def test_run_builds_the_set_from_a_classification_file(tiny_model, classification_npz, feature_cfg):
    cfg = RetrievalConfig(image_size=32, n_queries=4, features=feature_cfg)
    data = retrieval.load_data(classification_npz, cfg)
    artifacts: dict = {}
    metrics = retrieval.run(tiny_model, data, cfg, artifacts)
    assert {"retrieval/mAP", "retrieval/easy/mAP", "retrieval/hard/mAP", "retrieval/mP@10"} <= set(metrics)
    assert "constructed" in artifacts["notes"][0]
