"""Linear semantic segmentation on frozen patch tokens.

Paper §7.4 / dinov2 ``eval/segmentation`` (``BNHead``): the patch tokens of the last block (after
the final LayerNorm) go through BatchNorm and a 1x1 convolution (a linear layer per patch) to
low-resolution class logits, which are bilinearly upsampled to the label size; the loss is the
per-pixel cross-entropy ignoring ``ignore_index``. The "+ms" variant concatenates the last 4
blocks and tests at several scales (with flips), averaging the softmax at label resolution.

Because the backbone is frozen, the patch tokens are extracted once (and cached); only the head
is trained (AdamW, cosine schedule). Inputs: whole images resized so that the shorter side is
``short_side`` (default 12 patches, 168 for p14: CamVid 120x160 -> 168x224; official runs use
512-640 crops), or exactly ``image_size``.

Metric names (percent): ``seg/{val,test}/mIoU``, ``seg/{val,test}/pixel_acc`` and per class
``seg/{split}/iou/{class name}``; mean IoU over classes present in the labels or predictions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from dinolab.eval.data import SegmentationData, SegmentationSplit
from dinolab.eval.features import dense_preprocess, keeps_global_rng
from dinolab.features.cache import FeatureConfig, extract
from dinolab.features.embed import FeatureSpec
from dinolab.features.inputs import Preprocess
from dinolab.eval.metrics import confusion_matrix, segmentation_scores


@dataclass
class SegmentationConfig:
    """Linear-segmentation settings.

    Attributes:
        n_last_blocks: 1 ("linear") or 4 (concatenated, the "+ms" head).
        batchnorm: BatchNorm before the linear layer (official ``BNHead``).
        image_size: (H, W) input, multiples of the patch size; None: from ``short_side``.
        short_side: shorter input side when ``image_size`` is None.
        iterations, batch_size, lr, weight_decay: AdamW with cosine decay on the head.
        test_scales: input scales averaged at test time, e.g. (0.75, 1.0, 1.25); the head is
            trained at scale 1.
        test_flip: also average horizontally flipped inputs.
        ignore_index: overrides the dataset's.
    """

    n_last_blocks: int = 1
    batchnorm: bool = True
    image_size: tuple[int, int] | None = None
    short_side: int | None = None
    iterations: int = 1000
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    test_scales: tuple[float, ...] = (1.0,)
    test_flip: bool = False
    ignore_index: int | None = None
    seed: int = 0
    progress: bool = True
    features: FeatureConfig = field(default_factory=FeatureConfig)


class LinearSegmentationHead(nn.Module):
    """(BatchNorm +) 1x1 convolution: patch features [B, h, w, D] -> logits [B, C, h, w]."""

    def __init__(self, in_dim: int, num_classes: int, batchnorm: bool = True) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_dim) if batchnorm else nn.Identity()
        self.classifier = nn.Conv2d(in_dim, num_classes, kernel_size=1)
        nn.init.normal_(self.classifier.weight, std=0.01)  # mmseg decode-head init
        nn.init.zeros_(self.classifier.bias)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.bn(feats.permute(0, 3, 1, 2)))


def patch_features(feats: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cached ``patch`` [N, L, h, w, D] float16 -> [N, h, w, L*D] float32 (blocks concatenated)."""
    p = feats["patch"]
    return p.permute(0, 2, 3, 1, 4).flatten(3).float()


def upsampled_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[B, C, h, w] -> [B, C, H, W] bilinear (align_corners False, as mmseg ``resize``)."""
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def segmentation_loss(logits: torch.Tensor, masks: list[np.ndarray], ignore_index: int) -> torch.Tensor:
    """Per-pixel cross-entropy of logits [B, C, h, w] upsampled to each mask [H_i, W_i], averaged
    over the labelled pixels of the batch (0, not NaN, when every pixel is ignored)."""
    if len({m.shape for m in masks}) == 1:
        pairs = [(upsampled_logits(logits, masks[0].shape), torch.from_numpy(np.stack(masks)))]
    else:  # masks of different sizes (image folders): one image at a time
        pairs = [(upsampled_logits(logits[j : j + 1], m.shape), torch.from_numpy(m)[None]) for j, m in enumerate(masks)]
    total = sum(F.cross_entropy(lg, t, ignore_index=ignore_index, reduction="sum") for lg, t in pairs)
    n_labelled = sum(int((t != ignore_index).sum()) for _, t in pairs)
    return total / max(n_labelled, 1)


def train_head(
    head: nn.Module, feats: torch.Tensor, masks: list[np.ndarray], ignore_index: int, cfg: SegmentationConfig
) -> None:
    """AdamW with cosine decay on random batches of feats [N, h, w, D] and their masks."""
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / cfg.iterations)))
    head.train()
    for _ in tqdm(range(cfg.iterations), desc="segmentation head", disable=not cfg.progress, leave=False):
        idx = torch.randint(len(feats), (min(cfg.batch_size, len(feats)),), generator=gen)
        loss = segmentation_loss(head(feats[idx]), [masks[i] for i in idx.tolist()], ignore_index)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


@torch.no_grad()
def predict_probs(head: nn.Module, feats: torch.Tensor, size: tuple[int, int], flipped: bool = False) -> torch.Tensor:
    """Softmax [C, H, W] of one image's features [h, w, D] at label size (un-mirrored if ``flipped``)."""
    probs = upsampled_logits(head(feats[None]), size).softmax(1)[0]
    return probs.flip(-1) if flipped else probs


def _test_views(native_hw: tuple[int, int], patch_size: int, cfg: SegmentationConfig) -> list[Preprocess]:
    views = []
    for s in cfg.test_scales:
        pre = dense_preprocess(native_hw, patch_size, cfg.image_size, cfg.short_side, s)
        views.append(pre)
        if cfg.test_flip:
            views.append(Preprocess(pre.size, hflip=True))
    return views


def evaluate_split(
    model: nn.Module, head: nn.Module, split: SegmentationSplit, spec: FeatureSpec, data: SegmentationData,
    ignore_index: int, cfg: SegmentationConfig, name: str,
) -> tuple[torch.Tensor, list[np.ndarray]]:
    """Confusion matrix [C, C] over the split and the predicted label maps."""
    head.eval()
    views = _test_views(split.images.native_size, model.patch_size, cfg)
    view_feats = [patch_features(extract(model, split.images, v, spec, cfg.features, f"seg {name}")) for v in views]
    cm = torch.zeros(data.num_classes, data.num_classes, dtype=torch.long)
    preds = []
    for i, mask in enumerate(split.masks):
        probs = sum(predict_probs(head, f[i], mask.shape, v.hflip) for f, v in zip(view_feats, views))
        pred = probs.argmax(0)
        cm += confusion_matrix(pred, torch.from_numpy(mask), data.num_classes, ignore_index)
        preds.append(pred.numpy().astype(np.int64))
    return cm, preds


@keeps_global_rng
def run(
    model: nn.Module, data: SegmentationData, cfg: SegmentationConfig = SegmentationConfig(),
    artifacts: dict | None = None,
) -> dict[str, float]:
    """Train a linear head on the train split; mIoU / pixel accuracy on val and test."""
    ignore = data.ignore_index if cfg.ignore_index is None else cfg.ignore_index
    train = data.split("train")
    if cfg.n_last_blocks > model.n_blocks:
        raise ValueError(f"n_last_blocks {cfg.n_last_blocks} exceeds the model's {model.n_blocks} blocks")
    spec = FeatureSpec(layers=cfg.n_last_blocks, norm=True, patch="all")
    pre = dense_preprocess(train.images.native_size, model.patch_size, cfg.image_size, cfg.short_side)
    train_feats = patch_features(extract(model, train.images, pre, spec, cfg.features, "seg train"))
    torch.manual_seed(cfg.seed)
    head = LinearSegmentationHead(train_feats.shape[-1], data.num_classes, cfg.batchnorm)
    train_head(head, train_feats, train.masks, ignore, cfg)
    metrics: dict[str, float] = {}
    for name in ("val", "test"):
        if name not in data.splits:
            continue
        cm, preds = evaluate_split(model, head, data.splits[name], spec, data, ignore, cfg, name)
        scores = segmentation_scores(cm)
        metrics[f"seg/{name}/mIoU"] = scores["mIoU"]
        metrics[f"seg/{name}/pixel_acc"] = scores["pixel_acc"]
        for cls_name, iou in zip(data.class_names, scores["iou"]):
            metrics[f"seg/{name}/iou/{cls_name}"] = iou
        if artifacts is not None:
            split = data.splits[name]
            picks = np.linspace(0, len(preds) - 1, min(4, len(preds))).astype(int)
            artifacts["seg_samples"] = [(split.images[i], split.masks[i], preds[i]) for i in picks]
            artifacts["class_names"], artifacts["ignore_index"] = data.class_names, ignore
            artifacts["confusion"], artifacts["confusion_title"] = cm.numpy(), f"segmentation confusion ({name})"
    return metrics
