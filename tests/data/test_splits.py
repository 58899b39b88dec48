"""The two split rules: per class (a source without a test split) and class-blind (the linear probe's val)."""

from __future__ import annotations

import numpy as np

from dinolab.data.splits import split_holdout, stratified_split


def test_stratified_split_counts_and_determinism() -> None:
    labels = np.array([0] * 9 + [1] * 6 + [2] * 1)
    train, test = stratified_split(labels, 1 / 3, seed=0)
    # round(9/3) = 3 and round(6/3) = 2 go to test; a singleton class stays in train.
    assert np.bincount(labels[test], minlength=3).tolist() == [3, 2, 0]
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(16))
    again = stratified_split(labels, 1 / 3, seed=0)
    assert np.array_equal(train, again[0]) and np.array_equal(test, again[1])


def test_split_holdout_is_a_disjoint_cover() -> None:
    keep, held = split_holdout(50, 0.1, seed=3)
    assert len(held) == 5 and len(keep) == 45
    assert np.array_equal(np.sort(np.concatenate([keep, held])), np.arange(50))
