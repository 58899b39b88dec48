from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dinolab.losses import dino_loss


def _logits_for(probs: torch.Tensor, temp: float) -> torch.Tensor:
    """Student logits whose softmax at temperature ``temp`` is ``probs``."""
    return temp * probs.log()


def _official_dinov2_dino_terms(student_global, student_local, teacher_probs_chunks):
    """Frozen re-statement of dinov2 ssl_meta_arch.forward_backward + DINOLoss.forward (our own code).

    student_global [2B, K] (crop-major), student_local [nL*B, K], teacher_probs_chunks [2, B, K] in crop order.
    Returns local_term + global_term as the official code optimises them.
    """
    temp = 0.1
    n_global, n_local = 2, student_local.shape[0] // teacher_probs_chunks.shape[1]

    def official_forward(student_list, teacher_list):
        total = 0
        for s in student_list:
            lsm = F.log_softmax(s / temp, dim=-1)
            for t in teacher_list:
                total -= torch.sum(t * lsm, dim=-1).mean()
        return total

    n_terms = (n_global - 1) * n_global + max(n_local * n_global, 1)
    local = official_forward(student_local.chunk(n_local), list(teacher_probs_chunks)) / n_terms
    swapped = torch.cat((teacher_probs_chunks[1], teacher_probs_chunks[0]))  # "cat'd in reverse"
    glob = official_forward([student_global], [swapped]) * 2 / n_terms
    return local + glob


def test_identical_distributions_give_their_entropy():
    # image 0: p = (1/2, 1/4, 1/4) -> H = 1.5 ln 2; image 1: uniform over 3 -> H = ln 3
    p = torch.tensor([[0.5, 0.25, 0.25], [1 / 3, 1 / 3, 1 / 3]], dtype=torch.float64)
    student = _logits_for(p, 0.1).expand(4, 2, 3)
    teacher = p.expand(2, 2, 3)
    expected = (1.5 * math.log(2) + math.log(3)) / 2
    for ignore in (False, True):
        loss = dino_loss(student, teacher, student_temp=0.1, ignore_diagonal=ignore)
        assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_diagonal_exclusion_by_hand():
    # student crops q0 = (.5, .5), q1 = (.8, .2); teacher crops t0 = (1, 0), t1 = (0, 1); one image
    q = torch.tensor([[[0.5, 0.5]], [[0.8, 0.2]]], dtype=torch.float64)
    t = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]], dtype=torch.float64)
    student = _logits_for(q, 0.1)
    # pairs (0,1) and (1,0): CE(t1, q0) = ln 2, CE(t0, q1) = -ln 0.8 -> mean = ln(2.5) / 2
    loss = dino_loss(student, t, student_temp=0.1, ignore_diagonal=True)
    assert loss.item() == pytest.approx(math.log(2.5) / 2, rel=1e-6)
    # all four pairs: ln 2 + ln 2 - ln 0.8 - ln 0.2 = ln 25 -> / 4
    loss_all = dino_loss(student, t, student_temp=0.1, ignore_diagonal=False)
    assert loss_all.item() == pytest.approx(math.log(25) / 4, rel=1e-6)


@pytest.mark.parametrize("n_local", [8, 2])
def test_matches_official_normalisation(n_local):
    torch.manual_seed(n_local)
    batch, n_protos = 5, 16
    student_global = torch.randn(2 * batch, n_protos)
    student_local = torch.randn(n_local * batch, n_protos)
    teacher = torch.softmax(torch.randn(2, batch, n_protos) / 0.07, dim=-1)
    expected = _official_dinov2_dino_terms(student_global, student_local, teacher)
    student = torch.cat([student_global, student_local]).view(2 + n_local, batch, n_protos)
    loss = dino_loss(student, teacher, student_temp=0.1, ignore_diagonal=True)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_gradient_reaches_student_only_through_kept_pairs():
    # with ignore_diagonal and S == T == 2, the student crop 0 only sees teacher crop 1
    torch.manual_seed(0)
    student = torch.randn(2, 3, 8, requires_grad=True)
    teacher = torch.softmax(torch.randn(2, 3, 8), dim=-1)
    dino_loss(student, teacher, ignore_diagonal=True).backward()
    changed_teacher0 = teacher.clone()
    changed_teacher0[0] = torch.softmax(torch.randn(3, 8), dim=-1)
    student2 = student.detach().clone().requires_grad_(True)
    dino_loss(student2, changed_teacher0, ignore_diagonal=True).backward()
    torch.testing.assert_close(student.grad[0], student2.grad[0])  # crop 0 never compared with teacher 0
    assert not torch.allclose(student.grad[1], student2.grad[1])


def test_rejects_bad_shapes_and_empty_pairs():
    with pytest.raises(ValueError, match="teacher_probs"):
        dino_loss(torch.zeros(2, 3, 4), torch.zeros(2, 3, 5), ignore_diagonal=False)
    with pytest.raises(ValueError, match="S,B,K"):
        dino_loss(torch.zeros(3, 4), torch.zeros(2, 3, 4), ignore_diagonal=False)
    with pytest.raises(ValueError, match="no \\(student, teacher\\) pair"):
        dino_loss(torch.zeros(1, 3, 4), torch.zeros(1, 3, 4), ignore_diagonal=True)
