from __future__ import annotations

import numpy as np
import pytest


def planted_pool(
    n_base: int = 400, dim: int = 128, n_groups: int = 30, copies: int = 2, noise: float = 0.3, seed: int = 0
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Random unit vectors plus noisy copies of some of them, shuffled.

    In 128-d, two independent random unit vectors have cosine ~ N(0, 1/128) (std 0.09), so no
    accidental pair reaches 0.6; a copy with noise 0.3 has cosine ~ 1 / sqrt(1 + 0.09) ~ 0.96.

    Returns:
        embeddings [N, dim] float32 unit rows, and the row groups of planted duplicates.
    """
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((n_base, dim))
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    rows = [base]
    group_members = []
    for g in range(n_groups):
        noisy = base[g] + noise * rng.standard_normal((copies, dim)) / np.sqrt(dim)
        rows.append(noisy / np.linalg.norm(noisy, axis=1, keepdims=True))
        group_members.append([g] + [n_base + g * copies + c for c in range(copies)])
    x = np.concatenate(rows).astype(np.float32)
    perm = rng.permutation(len(x))
    inverse = np.argsort(perm)  # new position of old row i
    groups = [np.sort(inverse[np.array(m)]) for m in group_members]
    return x[perm], groups


@pytest.fixture
def make_pool():
    """The :func:`planted_pool` generator, for tests."""
    return planted_pool
