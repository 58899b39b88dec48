"""iBOT masked-patch cross-entropy (patch-level loss).

References: Zhou et al. 2022 (iBOT); official ``dinov2/loss/ibot_patch_loss.py`` ``forward_masked`` and its
use in ``dinov2/train/ssl_meta_arch.py`` (``forward_masked(...) * 2 * (1 / 2)``).
"""

from __future__ import annotations

import torch

from dinolab.losses.soft_ce import soft_cross_entropy


def ibot_loss(
    student_patch_logits: torch.Tensor,
    teacher_patch_probs: torch.Tensor,
    weights: torch.Tensor | None = None,
    n_images: int | None = None,
    *,
    masks: torch.Tensor | None = None,
    student_temp: float = 0.1,
) -> torch.Tensor:
    """Weighted cross-entropy over the masked patch tokens, as dinov2 ``forward_masked``.

    Pseudocode (``M`` masked tokens gathered from all masked global crops)::

        ce[m] = -sum_k teacher_patch_probs[m, k] * log_softmax(student_patch_logits[m] / student_temp)[k]
        loss  = sum_m weights[m] * ce[m] / n_images

    With the collate's weights (``1 / #masked tokens in the token's image``) this is the sum over masked
    images of their mean CE, divided by the number of global-crop images ``2B``: unmasked global crops count
    as 0 in the mean. The official code multiplies ``forward_masked`` by 2 (global crops processed together)
    and by ``1 / n_global_crops``; the product is 1, so this function is the optimised value itself.

    Args:
        student_patch_logits: [M, K] student head outputs of the masked tokens (student input masked).
        teacher_patch_probs: [M, K] teacher targets for the same tokens (teacher input unmasked).
        weights: [M] per-token weight, ``masks_weight`` from ``dinolab.data.collate.collate_crops``; None: computed
            from ``masks`` as the official ``forward_masked`` does when it gets no ``masks_weight``
            (``1 / masked tokens of the token's image``, ``clamp(min=1)``).
        n_images: number of global-crop images in the batch (``2B``, masked or not); None: ``masks.shape[0]``.
        masks: [n_images, N] bool, the masks the ``M`` tokens were gathered by (row-major order); needed only
            when ``weights`` or ``n_images`` is None.
        student_temp: student softmax temperature (official 0.1).

    Returns:
        Scalar fp32 loss (0 when ``M == 0``).
    """
    if student_patch_logits.ndim != 2 or student_patch_logits.shape != teacher_patch_probs.shape:
        raise ValueError(
            f"ibot_loss expects student and teacher [M,K] of equal shape, got "
            f"{tuple(student_patch_logits.shape)} and {tuple(teacher_patch_probs.shape)}"
        )
    if weights is None or n_images is None:
        if masks is None:
            raise ValueError("ibot_loss: give weights and n_images, or the masks to compute them from")
        if weights is None:
            per_image = 1.0 / masks.sum(-1).clamp(min=1.0)  # [n_images]
            weights = per_image.unsqueeze(-1).expand_as(masks)[masks]  # [M], as official forward_masked
        n_images = masks.shape[0] if n_images is None else n_images
    if weights.shape != student_patch_logits.shape[:1]:
        raise ValueError(f"ibot_loss: weights {tuple(weights.shape)} must be [M={student_patch_logits.shape[0]}]")
    if int(n_images) <= 0:
        raise ValueError(f"ibot_loss: n_images must be positive, got {n_images}")
    ce = soft_cross_entropy(student_patch_logits, teacher_patch_probs, student_temp)  # [M] fp32, chunked
    return (ce * weights.float()).sum() / int(n_images)
