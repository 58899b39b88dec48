"""Choosing members per cluster: at most ``quota[c]`` of cluster c, best key first, over all ranks.

Used by cluster-based retrieval (:mod:`dinolab.curate.retrieve`) and by hierarchical k-means's resampling
and leaf sampling (:mod:`dinolab.curate.hierarchical`). Under ``torchrun`` each rank holds the members
of its own chunks: it proposes its best ``quota[c]`` per cluster, the proposals are gathered and the
choice is made again (:func:`select_per_cluster`), so the result does not depend on the number of ranks.
Keys: ``closest`` = highest similarity to the centroid first; ``random`` = a pseudo-random key per pool
row (:func:`row_keys`), the same whichever rank holds the row. Ties go to the lower row.
"""

from __future__ import annotations

import numpy as np

from dinolab.curate import collective

STRATEGIES = ("closest", "random")


def row_keys(rows: np.ndarray, seed: int) -> np.ndarray:
    """A pseudo-random key in [0, 1) for every pool row: splitmix64 of (row, seed) [n] float64."""
    with np.errstate(over="ignore"):
        golden = np.uint64(0x9E3779B97F4A7C15)
        z = np.asarray(rows, np.uint64) + np.uint64(seed) * golden + golden
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def sort_key(strategy: str, rows: np.ndarray, sim: np.ndarray, seed: int = 0) -> np.ndarray:
    """[n] key (smallest first) of the members ``rows`` with similarities ``sim`` for ``strategy``."""
    if strategy == "closest":
        return -np.asarray(sim, dtype=np.float64)
    if strategy == "random":
        return row_keys(rows, seed)
    raise ValueError(f"sampling strategy must be one of {STRATEGIES}, got {strategy!r}")


def rank_in_group(groups: np.ndarray, key: np.ndarray) -> np.ndarray:
    """Position of each element within its group when the group is sorted by ``key`` ascending.

    Args:
        groups: [M] int group of each element.
        key: [M] sort key (ties broken by element index).

    Returns:
        [M] int64 rank, 0 for the element with the smallest key of its group.
    """
    order = np.lexsort((np.arange(len(groups)), key, groups))
    sorted_groups = groups[order]
    starts = np.r_[0, np.nonzero(np.diff(sorted_groups))[0] + 1]
    group_start = np.repeat(starts, np.diff(np.r_[starts, len(groups)]))
    ranks = np.empty(len(groups), dtype=np.int64)
    ranks[order] = np.arange(len(groups)) - group_start
    return ranks


def take_per_cluster(cluster: np.ndarray, key: np.ndarray, quota: np.ndarray) -> np.ndarray:
    """Sorted indices [S] of the elements with the ``quota[c]`` smallest keys of every cluster c.

    Args:
        cluster: [M] cluster of each element.
        key: [M] sort key (ties: lower index first).
        quota: [K] elements wanted from each cluster.
    """
    if len(cluster) == 0:
        return np.zeros(0, dtype=np.int64)
    return np.nonzero(rank_in_group(cluster, key) < quota[cluster])[0].astype(np.int64)


def select_per_cluster(
    rows: np.ndarray, cluster: np.ndarray, sim: np.ndarray, key: np.ndarray, quota: np.ndarray,
    sharded: bool = True, to_root: bool = False,
) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """:func:`take_per_cluster` over the members of every rank (collective when ``sharded``).

    Args:
        rows: [M] sorted items of this rank (pool rows, or clusters of a level below).
        cluster, sim, key: [M] cluster, similarity to its centroid and sort key of each.
        quota: [K] items wanted per cluster (the same on every rank).
        sharded: the items are split over the ranks; ``False``: every rank holds them all (no exchange).
        to_root: gather the proposals on rank 0 only (the others get ``None`` x 3) instead of on all.

    Returns:
        the chosen items [S] (sorted), their clusters [S] and similarities [S].
    """
    def best(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
        picked = take_per_cluster(arrays[1], arrays[3], quota)
        return tuple(a[picked] for a in arrays)

    mine = best(rows, cluster, sim, key)
    if not sharded:
        return mine[:3]
    gathered = collective.gather(mine) if to_root else collective.all_gather(mine)
    if gathered is None:
        return None, None, None
    merged = [np.concatenate(parts) for parts in zip(*gathered, strict=True)]
    order = np.argsort(merged[0], kind="stable")  # by item, so that ties go to the lower one
    return best(*(a[order] for a in merged))[:3]
