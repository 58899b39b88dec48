"""DINO cross-entropy between student crops and teacher global crops (image-level loss).

References: Caron et al. 2021 (DINO), Oquab et al. 2023 (DINOv2); official code
``dinov2/loss/dino_clstoken_loss.py`` + ``dinov2/train/ssl_meta_arch.py:147-343`` and the vectorised
``dinov3/loss/dino_clstoken_loss.py`` (``ignore_diagonal``).
"""

from __future__ import annotations

import torch

from dinolab.losses.soft_ce import soft_cross_entropy


def dino_loss(
    student_logits: torch.Tensor,
    teacher_probs: torch.Tensor,
    *,
    student_temp: float = 0.1,
    ignore_diagonal: bool,
) -> torch.Tensor:
    """Mean cross-entropy of every student crop against every teacher crop of the same image.

    Pseudocode (``S`` student crops, ``T`` teacher crops, ``B`` images)::

        loss, count = 0, 0
        for b in range(B):
            for s in range(S):
                for t in range(T):
                    if ignore_diagonal and s == t:    # student global crop i vs teacher crop i
                        continue
                    loss += -sum_k teacher_probs[t, b, k] * log_softmax(student_logits[s, b] / student_temp)[k]
                    count += 1
        return loss / count

    With ``ignore_diagonal`` the first ``min(S, T)`` student crops must be the global crops, in the same
    order as the teacher crops, so pair ``(i, i)`` is the same view.

    Official normalisation (dinov2 ``ssl_meta_arch.forward_backward``): the local term is
    ``sum over n_local x 2 (local, teacher) pairs of the per-image mean CE`` and the global term is
    ``the per-image mean CE of student global crop A vs teacher crop B and B vs A, x 2``; both are divided
    by ``n_global_terms + n_local_terms = 2 x 1 + max(2 x n_local, 1)``. With 2 global + 8 local crops that
    is the sum over 18 pairs / 18, exactly what this function returns with ``S = 10, T = 2,
    ignore_diagonal=True`` (global crops first). The only difference: with no local crops the official
    denominator is 3 for 2 pairs (``max(0, 1)`` quirk), here it is 2 (as dinov3).

    Args:
        student_logits: [S, B, K] student head outputs (logits, before temperature).
        teacher_probs: [T, B, K] teacher targets, each row a distribution over K (centred and sharpened,
            e.g. by ``sinkhorn_knopp`` or ``softmax_center``); no gradient flows into them.
        student_temp: student softmax temperature (official 0.1).
        ignore_diagonal: skip the same-view pairs ``(i, i)``, ``i < min(S, T)``.

    Returns:
        Scalar fp32 loss: sum of CE over the kept (s, t, b) triples divided by their number.
    """
    if student_logits.ndim != 3 or teacher_probs.ndim != 3:
        raise ValueError(
            f"dino_loss expects student_logits [S,B,K] and teacher_probs [T,B,K], got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_probs.shape)}"
        )
    n_student, batch, n_protos = student_logits.shape
    if teacher_probs.shape[1:] != (batch, n_protos):
        raise ValueError(
            f"dino_loss: teacher_probs {tuple(teacher_probs.shape)} must match student [*, {batch}, {n_protos}]"
        )
    n_teacher = teacher_probs.shape[0]
    keep = torch.ones(n_student, n_teacher, dtype=torch.float32, device=student_logits.device)
    if ignore_diagonal:
        keep.fill_diagonal_(0.0)
    n_pairs = int(keep.sum().item())
    if n_pairs == 0:
        raise ValueError(f"dino_loss: no (student, teacher) pair left with S={n_student}, T={n_teacher}")
    # The cross-entropy is linear in its target: the sum over the kept teacher crops of one student crop's
    # CE is one CE against the sum of those targets (mass 1 or 2, unnormalised), computed in cache-sized chunks.
    summed_targets = torch.einsum("st,tbk->sbk", keep, teacher_probs.float())  # [S, B, K]
    ce = soft_cross_entropy(
        student_logits.reshape(-1, n_protos), summed_targets.reshape(-1, n_protos), student_temp
    )  # [S * B]
    return ce.sum() / (n_pairs * batch)
