"""Weighted k-nearest-neighbour classification on frozen class tokens (the DINO protocol).

Following DINO (Caron et al. 2021, §4.1) and dinov2 ``eval/knn.py``: features are the L2-normalised
class tokens of the last block; a query's ``k`` nearest training features by cosine similarity
vote for their class with weight ``exp(sim / T)``, T = 0.07, and the class with the largest summed
vote wins (top-1; top-5 ranks the summed votes). dinov2 turns the top-``max(k)`` similarities into
``softmax(sim / T)`` first; that divides every vote of a query by the same number, so predictions
are identical.

The similarity matrix is never formed whole: queries go in blocks of ``query_block`` and training
features in blocks of ``train_block``, keeping a running top-``k`` per query, so memory is
``query_block x (train_block + k)`` whatever the data size.

Metric names: ``knn/k{k}/top1``, ``knn/k{k}/top5`` (percent, on the test split, else val); few-shot
``knn/{n}shot/k{k}/top1`` (mean over ``n_tries`` random draws of n training images per class) and
``.../top1_std``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dinolab.eval.data import ClassificationData
from dinolab.eval.features import classification_preprocess, global_spec
from dinolab.features.cache import FeatureConfig, extract
from dinolab.eval.metrics import confusion_matrix, topk_accuracy


@dataclass
class KnnConfig:
    """k-NN settings (defaults: DINO / dinov2).

    Attributes:
        ks: numbers of neighbours evaluated (values above the training-set size are clamped).
        temperature: T in the vote weight exp(sim / T).
        image_size: square input side; None: see :func:`~dinolab.eval.features.classification_preprocess`.
        query_block, train_block: block sizes of the similarity computation.
        n_per_class: few-shot sizes (training images per class); empty: full training set only.
        n_tries: random draws per few-shot size.
        seed: seed of the few-shot draws.
    """

    ks: tuple[int, ...] = (10, 20, 100, 200)
    temperature: float = 0.07
    image_size: int | None = None
    query_block: int = 256
    train_block: int = 8192
    n_per_class: tuple[int, ...] = ()
    n_tries: int = 3
    seed: int = 0
    features: FeatureConfig = field(default_factory=FeatureConfig)

    def __post_init__(self) -> None:
        if not self.ks or min(self.ks) < 1:
            raise ValueError(f"ks must be positive integers, got {self.ks}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


def nearest_neighbours(
    train_feats: torch.Tensor, query_feats: torch.Tensor, k: int, train_block: int = 8192
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` cosine similarities of each query, training set scanned in blocks.

    Args:
        train_feats: [M, D] L2-normalised.
        query_feats: [Q, D] L2-normalised.

    Returns:
        sims [Q, k'] (descending) and train indices [Q, k'], k' = min(k, M).
    """
    k = min(k, len(train_feats))
    best_sims = query_feats.new_empty(len(query_feats), 0)
    best_idx = torch.empty(len(query_feats), 0, dtype=torch.long, device=query_feats.device)
    for start in range(0, len(train_feats), train_block):
        sims = query_feats @ train_feats[start : start + train_block].T  # [Q, block]
        s, i = sims.topk(min(k, sims.shape[1]), dim=1)
        merged_sims, merged_idx = torch.cat([best_sims, s], 1), torch.cat([best_idx, i + start], 1)
        best_sims, pos = merged_sims.topk(min(k, merged_sims.shape[1]), dim=1)
        best_idx = merged_idx.gather(1, pos)
    return best_sims, best_idx


def knn_votes(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    query_feats: torch.Tensor,
    num_classes: int,
    ks: tuple[int, ...],
    temperature: float = 0.07,
    query_block: int = 256,
    train_block: int = 8192,
) -> dict[int, torch.Tensor]:
    """Summed class votes for every ``k``.

    Args:
        train_feats: [M, D] L2-normalised; train_labels: [M] int.
        query_feats: [Q, D] L2-normalised.

    Returns:
        ``{k: votes [Q, C]}``, votes[q, c] = sum of exp(sim / T) over the k nearest neighbours of q
        with label c (scaled per query by a constant, which leaves every ranking unchanged).
    """
    k_max = max(ks)
    out: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    for start in range(0, len(query_feats), query_block):
        sims, idx = nearest_neighbours(train_feats, query_feats[start : start + query_block], k_max, train_block)
        # exp((sim - max) / T): the per-query shift only rescales votes and keeps exp() finite.
        weights = torch.exp((sims - sims[:, :1]) / temperature)  # [q, k']
        onehot = F.one_hot(train_labels[idx], num_classes).to(weights.dtype)  # [q, k', C]
        cumulative = (onehot * weights[..., None]).cumsum(dim=1)  # votes of the first j neighbours
        for k in ks:
            out[k].append(cumulative[:, min(k, sims.shape[1]) - 1])
    return {k: torch.cat(v) for k, v in out.items()}


def knn_accuracies(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    query_feats: torch.Tensor,
    query_labels: torch.Tensor,
    num_classes: int,
    cfg: KnnConfig,
    prefix: str = "knn",
) -> tuple[dict[str, float], dict[int, torch.Tensor]]:
    """Top-1 / top-5 for every k; also returns the votes (for confusion matrices)."""
    votes = knn_votes(
        train_feats, train_labels, query_feats, num_classes, cfg.ks, cfg.temperature, cfg.query_block, cfg.train_block
    )
    metrics = {}
    for k, v in votes.items():
        metrics[f"{prefix}/k{k}/top1"] = topk_accuracy(v, query_labels, 1)
        metrics[f"{prefix}/k{k}/top5"] = topk_accuracy(v, query_labels, 5)
    return metrics, votes


def few_shot_indices(labels: np.ndarray, n_per_class: int, rng: np.random.Generator) -> np.ndarray:
    """``n_per_class`` random indices of every class (all of a class that has fewer), sorted."""
    picked = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        picked.append(rng.choice(members, size=min(n_per_class, len(members)), replace=False))
    return np.sort(np.concatenate(picked))


def knn_from_features(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    query_feats: torch.Tensor,
    query_labels: torch.Tensor,
    num_classes: int,
    cfg: KnnConfig,
    artifacts: dict | None = None,
) -> dict[str, float]:
    """Full-data and few-shot k-NN metrics from raw (not yet normalised) features [M, D], [Q, D]."""
    train_feats, query_feats = F.normalize(train_feats.float(), dim=1), F.normalize(query_feats.float(), dim=1)
    metrics, votes = knn_accuracies(train_feats, train_labels, query_feats, query_labels, num_classes, cfg)
    if artifacts is not None:
        k_show = 20 if 20 in votes else cfg.ks[0]
        artifacts["confusion"] = confusion_matrix(votes[k_show].argmax(1), query_labels, num_classes).numpy()
        artifacts["confusion_title"] = f"k-NN (k={k_show}) confusion matrix"
    for n in cfg.n_per_class:
        tries = []
        for t in range(cfg.n_tries):
            idx = torch.from_numpy(few_shot_indices(train_labels.numpy(), n, np.random.default_rng([cfg.seed, n, t])))
            m, _ = knn_accuracies(train_feats[idx], train_labels[idx], query_feats, query_labels, num_classes, cfg)
            tries.append(m)
        for k in cfg.ks:
            top1 = np.array([m[f"knn/k{k}/top1"] for m in tries])
            metrics[f"knn/{n}shot/k{k}/top1"] = float(top1.mean())
            metrics[f"knn/{n}shot/k{k}/top1_std"] = float(top1.std())
    return metrics


def run(
    model: nn.Module, data: ClassificationData, cfg: KnnConfig = KnnConfig(), artifacts: dict | None = None
) -> dict[str, float]:
    """k-NN accuracy of ``model``'s class tokens: train split as memory, test (else val) as queries."""
    train, query = data.split("train"), data.split(data.eval_split)
    pre = classification_preprocess(train.images.native_size, model.patch_size, cfg.image_size)
    spec = global_spec(model)
    train_f = extract(model, train.images, pre, spec, cfg.features, "knn train")["cls"][:, -1]
    query_f = extract(model, query.images, pre, spec, cfg.features, f"knn {data.eval_split}")["cls"][:, -1]
    if artifacts is not None:
        artifacts["class_names"] = data.class_names
    train_y, query_y = torch.from_numpy(train.labels), torch.from_numpy(query.labels)
    return knn_from_features(train_f, train_y, query_f, query_y, data.num_classes, cfg, artifacts)
