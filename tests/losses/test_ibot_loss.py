from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dinolab.losses import ibot_loss


def _official_forward_masked_scaled(student, teacher, masks):
    """Frozen re-statement of dinov2 iBOTPatchLoss.forward_masked (x 2 x 1/2 in ssl_meta_arch), our own code."""
    loss = torch.sum(teacher * F.log_softmax(student / 0.1, dim=-1), dim=-1)
    weights = (1 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks]
    return (-(loss * weights).sum() / masks.shape[0]) * 2 * (1 / 2)


def test_weighted_example_by_hand():
    # 4 global-crop images; image 0 has 1 masked token, image 2 has 2, images 1 and 3 none
    # token 0: q = (.5, .5),  t = (1, 0) -> CE ln 2,      weight 1
    # token 1: q = (.25, .75), t = (0, 1) -> CE -ln .75,   weight 1/2
    # token 2: q = (.25, .75), t = (1, 0) -> CE ln 4,      weight 1/2
    q = torch.tensor([[0.5, 0.5], [0.25, 0.75], [0.25, 0.75]], dtype=torch.float64)
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    weights = torch.tensor([1.0, 0.5, 0.5], dtype=torch.float64)
    loss = ibot_loss(0.1 * q.log(), t, weights, n_images=4)
    expected = (math.log(2) + 0.5 * math.log(4 / 3) + 0.5 * math.log(4)) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_matches_official_forward_masked():
    torch.manual_seed(0)
    n_images, n_tokens, n_protos = 6, 10, 12
    masks = torch.rand(n_images, n_tokens) < 0.3
    masks[1] = False  # an unmasked image still counts in the denominator
    n_masked = int(masks.sum())
    student = torch.randn(n_masked, n_protos)
    teacher = torch.softmax(torch.randn(n_masked, n_protos) / 0.05, dim=-1)
    weights = (1 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks]
    expected = _official_forward_masked_scaled(student, teacher, masks)
    torch.testing.assert_close(ibot_loss(student, teacher, weights, n_images), expected)


def test_no_masked_tokens_gives_zero():
    loss = ibot_loss(torch.zeros(0, 5), torch.zeros(0, 5), torch.zeros(0), n_images=4)
    assert loss.item() == 0.0


def test_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="weights"):
        ibot_loss(torch.zeros(3, 5), torch.zeros(3, 5), torch.zeros(2), n_images=2)
    with pytest.raises(ValueError, match="equal shape"):
        ibot_loss(torch.zeros(3, 5), torch.zeros(3, 4), torch.zeros(3), n_images=2)
    with pytest.raises(ValueError, match="n_images"):
        ibot_loss(torch.zeros(3, 5), torch.zeros(3, 5), torch.zeros(3), n_images=0)


def test_weights_from_the_masks_as_official_forward_masked():
    import torch

    from dinolab.losses import ibot_loss

    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(4, 6, dtype=torch.bool)
    masks[0, [0, 2, 5]] = True  # 3 masked tokens: weight 1/3 each
    masks[2, [1]] = True  # 1 masked token: weight 1
    M, K = int(masks.sum()), 8
    s, t = torch.randn(M, K, generator=g), torch.softmax(torch.randn(M, K, generator=g), -1)
    by_hand = torch.tensor([1 / 3, 1 / 3, 1 / 3, 1.0])
    expected = ibot_loss(s, t, by_hand, 4)
    torch.testing.assert_close(ibot_loss(s, t, masks=masks), expected)
    ce = -(t * torch.log_softmax(s / 0.1, -1)).sum(-1)
    torch.testing.assert_close(expected, (ce * by_hand).sum() / 4)
