"""Metrics shared by several protocols: top-k accuracy, confusion matrices, mIoU.

Accuracies, IoUs and pixel accuracy are returned in percent, as the papers report them.
"""

from __future__ import annotations

import torch


def topk_correct(scores: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Whether each true label is among the ``k`` highest scores.

    Args:
        scores: [N, C] (any monotone score: logits, probabilities, votes).
        labels: [N] int.

    Returns:
        [N] bool. ``k`` larger than C counts every sample as correct.
    """
    k = min(k, scores.shape[1])
    return (scores.topk(k, dim=1).indices == labels[:, None]).any(dim=1)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float:
    """Percentage of samples whose label is in the top ``k`` of ``scores`` [N, C]."""
    return 100.0 * topk_correct(scores, labels, k).float().mean().item()


def confusion_matrix(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int | None = None
) -> torch.Tensor:
    """Counts [C, C] with rows = true class, columns = predicted class.

    Args:
        pred, target: int tensors of the same shape (any: [N], [B, H, W] ...).
        ignore_index: target value whose positions are not counted.
    """
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    if ignore_index is not None:
        keep = target != ignore_index
        pred, target = pred[keep], target[keep]
    flat = target * num_classes + pred
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def segmentation_scores(confusion: torch.Tensor) -> dict[str, float | list[float]]:
    """mIoU and pixel accuracy from a confusion matrix [C, C] (rows true, columns predicted).

    IoU_c = TP / (TP + FP + FN). Classes that never occur in the target nor in the prediction
    (union 0) have no IoU and are left out of the mean, as mmseg's ``nanmean`` does.

    Returns:
        ``mIoU`` and ``pixel_acc`` (percent) and ``iou`` (per class, percent, NaN when undefined).
    """
    cm = confusion.double()
    tp = cm.diag()
    union = cm.sum(0) + cm.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    return {
        "mIoU": 100.0 * torch.nanmean(iou).item(),
        "pixel_acc": 100.0 * (tp.sum() / cm.sum().clamp(min=1)).item(),
        "iou": (100.0 * iou).tolist(),
    }
