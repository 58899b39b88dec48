"""Union-find (disjoint sets) over integer ids, with a vectorised bulk union for large edge lists.

Self-deduplication (DINOv2 App. A.3) links every pair of pool images whose cosine similarity is
above a threshold and keeps one image per connected component. A Python loop over tens of millions
of edges is too slow, so :meth:`UnionFind.union_edges` processes a whole edge array per round:

1. find the root of both ends of every edge (pointer jumping = path compression for all ids),
2. hook the larger root of every edge whose ends differ onto the smaller one
   (``np.minimum.at`` resolves several edges hooking the same root deterministically),
3. repeat until no edge joins two different roots.

Parents always point to a smaller-or-equal id, so there are no cycles and the root of a component
is its **lowest id** -- a deterministic representative whatever the edge order.
Memory: one int64 parent per id (8 bytes x N) plus the edge arrays of one call.
"""

from __future__ import annotations

import numpy as np


class UnionFind:
    """Disjoint sets over ids ``0 .. n-1``; the root of each set is its lowest id.

    Args:
        n: number of elements.
    """

    def __init__(self, n: int) -> None:
        if n < 0:
            raise ValueError(f"UnionFind needs n >= 0, got {n}")
        self.parent = np.arange(n, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.parent)

    def find(self, x: int) -> int:
        """Root of ``x`` (with path halving)."""
        parent = self.parent
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = int(parent[x])
        return int(x)

    def union(self, a: int, b: int) -> int:
        """Merge the sets of ``a`` and ``b``; returns the root of the merged set (the lower root)."""
        ra, rb = self.find(a), self.find(b)
        lo, hi = min(ra, rb), max(ra, rb)
        self.parent[hi] = lo
        return lo

    def compress(self) -> None:
        """Make every parent point straight at its root (pointer jumping until stable)."""
        parent = self.parent
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                return
            parent[:] = grand

    def union_edges(self, src: np.ndarray, dst: np.ndarray) -> None:
        """Merge the sets of ``src[i]`` and ``dst[i]`` for every edge i.

        Args:
            src: [E] integer ids.
            dst: [E] integer ids.
        """
        src = np.asarray(src, dtype=np.int64)
        dst = np.asarray(dst, dtype=np.int64)
        if src.shape != dst.shape:
            raise ValueError(f"src and dst must have the same shape, got {src.shape} and {dst.shape}")
        while len(src):
            self.compress()
            root_src, root_dst = self.parent[src], self.parent[dst]
            differ = root_src != root_dst
            if not differ.any():
                return
            # Edges already inside one set never matter again: drop them to shrink later rounds.
            root_src, root_dst = root_src[differ], root_dst[differ]
            src, dst = src[differ], dst[differ]
            hi = np.maximum(root_src, root_dst)
            lo = np.minimum(root_src, root_dst)
            np.minimum.at(self.parent, hi, lo)

    def roots(self) -> np.ndarray:
        """Root (lowest id of its set) of every element: [N] int64."""
        self.compress()
        return self.parent.copy()


def connected_components(n: int, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Component label of every node of an undirected graph: the lowest node id in its component.

    Args:
        n: number of nodes.
        src: [E] edge start ids.
        dst: [E] edge end ids.

    Returns:
        [n] int64 labels; ``labels[i] == i`` exactly for the representative of each component.
    """
    uf = UnionFind(n)
    uf.union_edges(src, dst)
    return uf.roots()
