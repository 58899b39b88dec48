"""Instance retrieval: cosine ranking of global features, mAP with the Revisited Oxford/Paris protocol.

The paper (§7.3) ranks the database by cosine similarity of the class tokens and reports mAP on
Revisited Oxford / Paris (Radenović et al., CVPR 2018); no code was released. The Revisited ground
truth gives every query "easy" and "hard" positives and "junk" images. Its three protocols:

========  ======================  =======================
setup     positives               ignored (junk)
========  ======================  =======================
easy      easy                    junk + hard
medium    easy + hard             junk
hard      hard                    junk + easy
========  ======================  =======================

Ignored images are removed from the ranking before AP is computed (each positive moves up by
the number of ignored images ranked above it). AP is the Revisited ``compute_ap``: trapezoidal
integration of precision over recall, ``sum_j ((j / r_j) + (j + 1) / (r_j + 1)) / (2 n)`` for
the j-th positive at 0-based rank r_j (precision 1 at rank 0); queries without positives are left
out of the mean. mP@k is the Revisited definition (k clipped to the rank of the last positive).

No retrieval benchmark is available offline, so :mod:`dinolab.eval.retrieval_set` constructs one from
any image array: queries with augmented copies of themselves as positives among distractors (a
constructed set, marked as such in the outputs; it measures robustness to augmentation, not landmark
retrieval).

Metric names: ``retrieval/mAP`` (all positives, = medium) and ``retrieval/mP@{k}``; with hard
positives also ``retrieval/{easy,medium,hard}/mAP`` and ``.../mP@{k}`` (percent).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dinolab.eval.data import ClassificationData, RetrievalData, load_classification, load_retrieval
from dinolab.eval.features import classification_preprocess, global_spec
from dinolab.eval.retrieval_set import build_augmented_retrieval_set, relevance_matrix
from dinolab.features.cache import FeatureConfig, extract


@dataclass
class RetrievalConfig:
    """Retrieval settings.

    Attributes:
        image_size: square input side; None: see :func:`~dinolab.eval.features.classification_preprocess`
            (images are centre-cropped to a square: fine for the constructed set, not for the
            full-frame Revisited Oxford/Paris images).
        kappas: k of mP@k.
        query_block: queries ranked per block.
        n_queries, easy_copies, hard_copies, junk_copies, seed: the constructed set (used when
            the data is a classification file, see :func:`~dinolab.eval.retrieval_set.build_augmented_retrieval_set`).
    """

    image_size: int | None = None
    kappas: tuple[int, ...] = (1, 5, 10)
    query_block: int = 1024
    n_queries: int = 200
    easy_copies: int = 2
    hard_copies: int = 2
    junk_copies: int = 1
    seed: int = 0
    features: FeatureConfig = field(default_factory=FeatureConfig)


# ---------------------------------------------------------------------------------------------- ranking and AP
def rank_database(query_feats: torch.Tensor, db_feats: torch.Tensor, query_block: int = 1024) -> np.ndarray:
    """Database indices by decreasing cosine similarity.

    Args:
        query_feats: [Q, D]; db_feats: [M, D] (normalised here).

    Returns:
        ranks [Q, M] int64: ``ranks[q, 0]`` is the most similar database image.
    """
    q, d = F.normalize(query_feats.float(), dim=1), F.normalize(db_feats.float(), dim=1)
    blocks = [q[s : s + query_block] @ d.T for s in range(0, len(q), query_block)]  # [block, M] similarities
    return torch.cat([torch.argsort(b, dim=1, descending=True) for b in blocks]).numpy()


def average_precision(positive_ranks: np.ndarray, n_positives: int) -> float:
    """Revisited ``compute_ap``: positive_ranks = sorted 0-based ranks (junk already removed)."""
    ap = 0.0
    for j, rank in enumerate(positive_ranks):
        precision_before = 1.0 if rank == 0 else j / rank
        precision_after = (j + 1) / (rank + 1)
        ap += (precision_before + precision_after) / (2.0 * n_positives)
    return ap


def positive_ranks(ranking: np.ndarray, positives: np.ndarray, junk: np.ndarray) -> np.ndarray:
    """Sorted 0-based ranks of ``positives`` in ``ranking`` [M] after removing ``junk`` from it."""
    pos = np.flatnonzero(np.isin(ranking, positives))
    junk_pos = np.flatnonzero(np.isin(ranking, junk))
    return pos - np.searchsorted(junk_pos, pos)  # junk ranked above each positive


def mean_average_precision(
    ranks: np.ndarray, positives: list[np.ndarray], junk: list[np.ndarray], kappas: tuple[int, ...] = (1, 5, 10)
) -> tuple[float, np.ndarray, dict[int, float]]:
    """mAP over queries that have positives, the per-query APs (NaN for none) and mP@k.

    Args:
        ranks: [Q, M] from :func:`rank_database`.
        positives, junk: per query, database indices.
    """
    aps = np.full(len(ranks), np.nan)
    precisions = {k: [] for k in kappas}
    for q, ranking in enumerate(ranks):
        if len(positives[q]) == 0:
            continue
        pr = positive_ranks(ranking, positives[q], junk[q])
        aps[q] = average_precision(pr, len(positives[q]))
        one_based = pr + 1
        for k in kappas:
            kq = min(one_based.max(), k)
            precisions[k].append((one_based <= kq).sum() / kq)
    valid = ~np.isnan(aps)
    if not valid.any():
        raise ValueError("no query has a positive database image: mAP is undefined")
    return float(aps[valid].mean()), aps, {k: float(np.mean(v)) for k, v in precisions.items()}


def revisited_protocols(gnd: list[dict[str, np.ndarray]]) -> dict[str, tuple[list[np.ndarray], list[np.ndarray]]]:
    """(positives, junk) per query for the easy / medium / hard setups (table in module docstring)."""
    union = np.union1d
    return {
        "easy": ([g["easy"] for g in gnd], [union(g["junk"], g["hard"]) for g in gnd]),
        "medium": ([union(g["easy"], g["hard"]) for g in gnd], [g["junk"] for g in gnd]),
        "hard": ([g["hard"] for g in gnd], [union(g["junk"], g["easy"]) for g in gnd]),
    }


def retrieval_metrics(ranks: np.ndarray, gnd: list[dict[str, np.ndarray]], kappas: tuple[int, ...]) -> dict[str, float]:
    """Flat metrics (percent) from rankings [Q, M] and Revisited-style ground truth."""
    setups = revisited_protocols(gnd)
    metrics = {}
    m_ap, _, mp = mean_average_precision(ranks, *setups["medium"], kappas)
    metrics["retrieval/mAP"] = 100 * m_ap
    metrics.update({f"retrieval/mP@{k}": 100 * v for k, v in mp.items()})
    if any(len(g["hard"]) for g in gnd):
        for name, (pos, junk) in setups.items():
            if not any(len(p) for p in pos):
                continue
            m_ap, _, mp = mean_average_precision(ranks, pos, junk, kappas)
            metrics[f"retrieval/{name}/mAP"] = 100 * m_ap
            metrics.update({f"retrieval/{name}/mP@{k}": 100 * v for k, v in mp.items()})
    return metrics


# ---------------------------------------------------------------------------------------------- data
def retrieval_set_from_classification(data: ClassificationData, cfg: RetrievalConfig) -> RetrievalData:
    """The constructed set built from the evaluation split of a classification dataset."""
    split = data.split(data.eval_split)
    array = split.images.array
    if array is None:
        array = np.stack([split.images[i] for i in range(len(split.images))])
    return build_augmented_retrieval_set(
        array, cfg.n_queries, cfg.easy_copies, cfg.hard_copies, cfg.junk_copies, cfg.seed,
        source=f"{data.source}:{data.eval_split}",
    )


def load_data(path: str | Path, cfg: RetrievalConfig = RetrievalConfig()) -> RetrievalData:
    """A retrieval file (``.json``, or ``.npz`` with ``x_query``), or a classification file / folder
    from whose evaluation split the constructed set is built (``cfg.n_queries`` ...)."""
    path = Path(path)
    if path.suffix == ".json":
        return load_retrieval(path)
    if path.suffix == ".npz" and path.exists():
        with np.load(path, allow_pickle=False) as arrays:
            if "x_query" in arrays.files:
                return load_retrieval(path)
    return retrieval_set_from_classification(load_classification(path), cfg)


# ---------------------------------------------------------------------------------------------- run
def run(
    model: nn.Module, data: RetrievalData, cfg: RetrievalConfig = RetrievalConfig(), artifacts: dict | None = None
) -> dict[str, float]:
    """Rank the database for every query by class-token cosine similarity; mAP / mP@k."""
    pre = classification_preprocess(data.database.native_size, model.patch_size, cfg.image_size)
    spec = global_spec(model)
    q = extract(model, data.queries, pre, spec, cfg.features, "retrieval queries")["cls"][:, -1]
    d = extract(model, data.database, pre, spec, cfg.features, "retrieval database")["cls"][:, -1]
    ranks = rank_database(q, d, cfg.query_block)
    if artifacts is not None:
        artifacts["notes"] = list(data.notes)
        artifacts["retrieval_examples"] = _examples(data, ranks)
    return retrieval_metrics(ranks, data.gnd, cfg.kappas)


def _examples(data: RetrievalData, ranks: np.ndarray, n_queries: int = 4, top: int = 6) -> list[dict]:
    """Query image, its top database images and their relevance codes, for the report."""
    rel = relevance_matrix(data)
    picks = np.linspace(0, len(ranks) - 1, min(n_queries, len(ranks))).astype(int)
    return [
        {
            "query": data.queries[q],
            "retrieved": [data.database[i] for i in ranks[q, :top]],
            "relevance": rel[q, ranks[q, :top]].tolist(),
        }
        for q in picks
    ]
