"""Linear probe: a grid of linear classifiers trained together on cached frozen features.

Protocol (dinov2 ``eval/linear.py``, RECIPE §2.10): the input of a classifier is the
concatenation of the class tokens of the last ``n`` blocks (n in {1, 4}), optionally followed by
the average-pooled patch tokens of the last block ("avgpool"); every token is taken after the
final LayerNorm. Each (n, avgpool) pair is trained with every learning rate of the official list
``{1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1}``, scaled as the
official code does by ``batch_size / 256`` (linear scaling rule; dinov2 multiplies by the global
batch size). SGD with momentum 0.9, no weight decay, cosine decay to 0 over ``iterations``
(official: 12,500 = 10 x 1,250), batch 128, heads initialised N(0, 0.01) with zero bias.

All 52 classifiers see the same batches; the heads of one input variant are the columns of one
weight matrix. Each head keeps its own learning rate: the momentum update
``buf_l = 0.9 buf_l + grad_l; W_l -= lr_l * s_t * buf_l`` (shared cosine factor ``s_t``) is
applied with a per-head step size, exactly what a separate ``torch.optim.SGD`` per head does.

Selection: the classifier with the best top-1 on the validation split is reported, with its
test top-1 where a test split exists. Without a validation split, ``val_fraction`` of the
training set (seeded) is held out for the choice (the official code picks on the evaluation set
itself; ``val_fraction=0`` does that here too, and then ``linear/val/*`` is the test split).

Augmentation: the official probe trains on RandomResizedCrop + flip views computed live. Here
``augment_views = V > 0`` extracts V augmented views of every training image (each seeded, cached
like any other features) and trains on those instead: V >= number of epochs is the official
protocol (every epoch sees fresh crops) without running the backbone inside the training loop.

Metric names: ``linear/val/top1``, ``linear/val/top5``, ``linear/test/top1``, ``linear/test/top5``
(percent), ``linear/best/lr``, ``linear/best/n_blocks``, ``linear/best/avgpool`` (0/1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from dinolab.data.splits import split_holdout
from dinolab.eval.data import ClassificationData
from dinolab.eval.features import classification_preprocess, global_spec, keeps_global_rng
from dinolab.features.cache import FeatureConfig, extract
from dinolab.eval.metrics import confusion_matrix, topk_accuracy

OFFICIAL_LRS = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)


@dataclass
class LinearConfig:
    """Linear-probe settings (defaults: dinov2 ``eval/linear.py``).

    Attributes:
        lrs: base learning rates, each multiplied by ``batch_size / 256``.
        n_last_blocks: class tokens of the last n blocks (values above the model depth are dropped).
        avgpool: with / without the mean patch token of the last block.
        iterations, batch_size, momentum: SGD schedule (cosine to 0, no warm-up, no weight decay).
        val_fraction: held-out share of train for the choice when there is no val split.
        augment_views: augmented views per training image (0: train on the plain eval-transform
            features).
        image_size: square input side; None: see :func:`~dinolab.eval.features.classification_preprocess`.
        seed: batches, held-out split and augmentations.
    """

    lrs: tuple[float, ...] = OFFICIAL_LRS
    n_last_blocks: tuple[int, ...] = (1, 4)
    avgpool: tuple[bool, ...] = (False, True)
    iterations: int = 12_500
    batch_size: int = 128
    momentum: float = 0.9
    val_fraction: float = 0.1
    augment_views: int = 0
    image_size: int | None = None
    seed: int = 0
    progress: bool = True
    features: FeatureConfig = field(default_factory=FeatureConfig)

    def __post_init__(self) -> None:
        if not self.lrs or min(self.lrs) <= 0:
            raise ValueError(f"lrs must be positive, got {self.lrs}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")


@dataclass(frozen=True)
class InputVariant:
    n_blocks: int
    avgpool: bool

    def build(self, cls: torch.Tensor, patch_mean: torch.Tensor) -> torch.Tensor:
        """cls [B, L, D], patch_mean [B, D] -> [B, n*D (+ D)] (official ``create_linear_input``)."""
        x = cls[:, -self.n_blocks :].flatten(1)
        return torch.cat([x, patch_mean], dim=1) if self.avgpool else x


class LinearGrid(nn.Module):
    """One stacked classifier bank per input variant: weight [D_in, L, C] for L learning rates.

    Heads sit side by side in one matrix so that a batch costs one matmul per variant.
    """

    def __init__(self, variants: list[InputVariant], dims: list[int], n_lrs: int, num_classes: int) -> None:
        super().__init__()
        self.variants = variants
        self.weights = nn.ParameterList(nn.Parameter(torch.randn(d, n_lrs, num_classes) * 0.01) for d in dims)
        self.biases = nn.ParameterList(nn.Parameter(torch.zeros(1, n_lrs, num_classes)) for _ in dims)

    def forward(self, cls: torch.Tensor, patch_mean: torch.Tensor) -> list[torch.Tensor]:
        """-> per variant logits [B, L, C]."""
        out = []
        for v, w, b in zip(self.variants, self.weights, self.biases):
            x = v.build(cls, patch_mean)  # [B, D_in]
            out.append((x @ w.flatten(1)).view(len(x), *w.shape[1:]) + b)
        return out


def cosine_factor(step: int, total: int) -> float:
    """0.5 (1 + cos(pi step / total)): 1 at step 0, 0 at ``total`` (``CosineAnnealingLR``, eta_min 0)."""
    return 0.5 * (1.0 + math.cos(math.pi * step / total))


def train_grid(
    grid: LinearGrid,
    cls: torch.Tensor,
    patch_mean: torch.Tensor,
    labels: torch.Tensor,
    lrs: torch.Tensor,
    cfg: LinearConfig,
) -> None:
    """SGD (momentum, per-head learning rate ``lrs`` [L], cosine schedule) on all heads at once.

    Args:
        cls: [N, L_blocks, D]; patch_mean: [N, D]; labels: [N].
    """
    gen = torch.Generator().manual_seed(cfg.seed)
    params = list(grid.parameters())
    momentum_bufs = [torch.zeros_like(p) for p in params]
    order, pos = torch.randperm(len(labels), generator=gen), 0
    for step in tqdm(range(cfg.iterations), desc="linear probe", disable=not cfg.progress, leave=False):
        if pos + cfg.batch_size > len(order):  # new epoch
            order, pos = torch.randperm(len(labels), generator=gen), 0
        idx = order[pos : pos + cfg.batch_size]
        pos += cfg.batch_size
        logits = grid(cls[idx], patch_mean[idx])  # [B, L, C] per variant
        # sum over heads of each head's mean cross-entropy: heads have disjoint parameters
        targets = labels[idx].repeat_interleave(len(lrs))  # row b * L + l of the flattened logits
        loss = sum(F.cross_entropy(lg.flatten(0, 1), targets, reduction="sum") for lg in logits) / len(idx)
        grads = torch.autograd.grad(loss, params)
        step_sizes = (lrs * cosine_factor(step, cfg.iterations)).view(1, -1, 1)  # per head, broadcast over [*, L, C]
        with torch.no_grad():
            for p, g, buf in zip(params, grads, momentum_bufs):
                buf.mul_(cfg.momentum).add_(g)
                p.sub_(step_sizes * buf)


@torch.no_grad()
def grid_accuracies(grid: LinearGrid, cls: torch.Tensor, patch_mean: torch.Tensor, labels: torch.Tensor, k: int):
    """Top-k accuracy [V, L] of every head (percent)."""
    return torch.tensor(
        [[topk_accuracy(lg[:, i], labels, k) for i in range(lg.shape[1])] for lg in grid(cls, patch_mean)]
    )


@keeps_global_rng
def probe_from_features(
    train: dict[str, torch.Tensor],
    val: dict[str, torch.Tensor],
    test: dict[str, torch.Tensor] | None,
    num_classes: int,
    cfg: LinearConfig,
    artifacts: dict | None = None,
) -> dict[str, float]:
    """Train the grid on ``train`` features, choose on ``val``, report val (and test).

    Each argument holds ``cls`` [N, L, D], ``patch_mean`` [N, D] and ``labels`` [N].
    """
    depth = train["cls"].shape[1]
    variants = [InputVariant(n, a) for n in sorted(set(cfg.n_last_blocks)) if n <= depth for a in cfg.avgpool]
    if not variants:
        raise ValueError(f"n_last_blocks {cfg.n_last_blocks} all exceed the {depth} blocks available")
    dim = train["cls"].shape[2]
    torch.manual_seed(cfg.seed)  # head initialisation
    grid = LinearGrid(variants, [v.n_blocks * dim + dim * v.avgpool for v in variants], len(cfg.lrs), num_classes)
    lrs = torch.tensor(cfg.lrs) * cfg.batch_size / 256.0
    train_grid(grid, train["cls"], train["patch_mean"], train["labels"], lrs, cfg)

    val_acc = grid_accuracies(grid, val["cls"], val["patch_mean"], val["labels"], 1)  # [V, L]
    best = int(val_acc.flatten().argmax())
    v_i, l_i = divmod(best, len(cfg.lrs))
    metrics = {
        "linear/val/top1": float(val_acc[v_i, l_i]),
        "linear/val/top5": float(grid_accuracies(grid, val["cls"], val["patch_mean"], val["labels"], 5)[v_i, l_i]),
        "linear/best/lr": cfg.lrs[l_i] * cfg.batch_size / 256.0,
        "linear/best/n_blocks": float(variants[v_i].n_blocks),
        "linear/best/avgpool": float(variants[v_i].avgpool),
    }
    report = test if test is not None else val
    with torch.no_grad():
        logits = grid(report["cls"], report["patch_mean"])[v_i][:, l_i]
    if test is not None:
        metrics["linear/test/top1"] = topk_accuracy(logits, test["labels"], 1)
        metrics["linear/test/top5"] = topk_accuracy(logits, test["labels"], 5)
    if artifacts is not None:
        artifacts["confusion"] = confusion_matrix(logits.argmax(1), report["labels"], num_classes).numpy()
        artifacts["confusion_title"] = "linear probe confusion matrix (best head)"
    return metrics


def _features(model, images, pre, cfg: LinearConfig, desc: str, labels: np.ndarray) -> dict[str, torch.Tensor]:
    feats = extract(model, images, pre, global_spec(model), cfg.features, desc)
    return {"cls": feats["cls"], "patch_mean": feats["patch_mean"], "labels": torch.from_numpy(labels)}


def _subset(feats: dict[str, torch.Tensor], idx: np.ndarray) -> dict[str, torch.Tensor]:
    t = torch.from_numpy(idx)
    return {k: v[t] for k, v in feats.items()}


def _augmented_train(model, data: ClassificationData, pre, cfg: LinearConfig, keep: np.ndarray) -> dict:
    """``augment_views`` augmented feature sets of the kept training images, stacked."""
    train = data.split("train")
    views = []
    for v in range(cfg.augment_views):
        aug = replace(pre, augment=True, seed=cfg.seed * 100_003 + v)
        views.append(_subset(_features(model, train.images, aug, cfg, f"linear aug view {v}", train.labels), keep))
    return {k: torch.cat([view[k] for view in views]) for k in views[0]}


def run(
    model: nn.Module, data: ClassificationData, cfg: LinearConfig = LinearConfig(), artifacts: dict | None = None
) -> dict[str, float]:
    """Linear-probe accuracy of ``model`` on ``data`` (see module docstring)."""
    train = data.split("train")
    pre = classification_preprocess(train.images.native_size, model.patch_size, cfg.image_size)
    train_f = _features(model, train.images, pre, cfg, "linear train", train.labels)
    test_f = None
    if "test" in data.splits:
        test_f = _features(model, data.splits["test"].images, pre, cfg, "linear test", data.splits["test"].labels)
    keep = np.arange(len(train.labels))
    if "val" in data.splits:
        val_f = _features(model, data.splits["val"].images, pre, cfg, "linear val", data.splits["val"].labels)
    elif cfg.val_fraction > 0:
        keep, held = split_holdout(len(train.labels), cfg.val_fraction, cfg.seed)
        train_f, val_f = _subset(train_f, keep), _subset(train_f, held)
    else:  # official behaviour: choose on the evaluation split
        val_f, test_f = test_f, None
    if cfg.augment_views > 0:
        train_f = _augmented_train(model, data, pre, cfg, keep)
    if artifacts is not None:
        artifacts["class_names"] = data.class_names
    return probe_from_features(train_f, val_f, test_f, data.num_classes, cfg, artifacts)
