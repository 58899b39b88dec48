"""A curation stage checks its own outcome: one that removes most of the pool, or whose threshold lies inside
the bulk of the similarities it thresholds, is almost always a threshold that does not suit the embeddings
(e.g. an untrained or a domain-shifted backbone, where every image looks like every other).

:func:`outcome_problem` returns a one-line message with the similarity quantiles and a suggested threshold, or
None; the pipeline logs it as a warning, and ``strict`` (``dinolab curate --strict``) makes it an error.
"""

from __future__ import annotations

import numpy as np

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
MAX_REMOVED_SHARE = 0.5
SUGGESTED_QUANTILE = 0.9  # a threshold at the 90th percentile flags at most ~10% of the rows


def outcome_problem(stage: str, key: str, n_in: int, n_kept: int, similarities: np.ndarray,
                    threshold: float) -> str | None:
    """Why ``stage`` looks wrong, in one line, or None.

    Args:
        stage: its name in the message (``self-dedup``, ``relative dedup``).
        key: the config key of its threshold (``dedup.threshold`` ...), named in the suggestion.
        n_in, n_kept: rows before and after the stage.
        similarities: [N] the similarities the stage thresholds (nearest neighbour, nearest evaluation image).
        threshold: the stage's threshold (a row is removed when its similarity is above it).
    """
    sims = np.asarray(similarities, dtype=np.float64)
    sims = sims[np.isfinite(sims)]
    if n_in == 0 or len(sims) == 0:
        return None
    q = np.quantile(sims, QUANTILES)
    removed_most = n_kept < (1.0 - MAX_REMOVED_SHARE) * n_in
    in_bulk = q[1] < threshold < q[3]
    if not (removed_most or in_bulk):
        return None
    why = f"kept {n_kept} of {n_in} rows" if removed_most else f"{key}={threshold:g} lies inside the bulk"
    quantiles = "/".join(f"{v:.3f}" for v in q)
    suggested = float(np.quantile(sims, SUGGESTED_QUANTILE))
    return (f"{stage}: {why} (similarity quantiles 5/25/50/75/95%: {quantiles}; threshold {threshold:g}): "
            f"try {key}={suggested:.3f} (its 90th percentile), or embed with trained weights (--weights/--run)")
