"""Deterministic train / held-out splits of a labelled set (the only place a split is drawn).

- :func:`stratified_split`: per class, for a source without its own test split (an npz with only
  ``x_train/y_train``, one folder of class folders, the builtin digits).
- :func:`split_holdout`: class-blind, the linear probe's validation split carved out of ``train``.
"""

from __future__ import annotations

import numpy as np


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified split: each class sends ``round(n_c * test_fraction)`` items to test.

    Every class with at least 2 items keeps at least one on each side.

    Args:
        labels: [N] integer labels.

    Returns:
        ``(train_idx, test_idx)``, each sorted int64.
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = 0 if len(idx) < 2 else min(max(int(round(len(idx) * test_fraction)), 1), len(idx) - 1)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def split_holdout(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded ``(train indices, held-out indices)`` of ``range(n)`` with ``round(fraction * n)`` held out."""
    perm = np.random.default_rng(seed).permutation(n)
    n_val = int(round(fraction * n))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])
