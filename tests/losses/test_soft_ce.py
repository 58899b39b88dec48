import pytest
import torch
import torch.nn.functional as F

from dinolab.losses import soft_cross_entropy


def _plain(logits, targets, temp):
    return -(targets.float() * F.log_softmax(logits.float() / temp, dim=-1)).sum(-1)


@pytest.mark.parametrize("chunk", [1, 3, 7, 1000])
def test_equals_plain_expression_values_and_gradients(chunk):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 11, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.softmax(torch.randn(7, 11, generator=g, dtype=torch.float64) / 0.04, -1)
    weights = torch.rand(7, generator=g, dtype=torch.float64)
    ours = soft_cross_entropy(logits, targets, 0.1, chunk_rows=chunk)
    (ours.double() * weights).sum().backward()
    grad_ours, logits.grad = logits.grad.clone(), None
    ref = -(targets * F.log_softmax(logits / 0.1, dim=-1)).sum(-1)  # float64 reference
    (ref * weights).sum().backward()
    torch.testing.assert_close(ours.double(), ref, rtol=1e-6, atol=1e-6)  # forward runs in fp32
    torch.testing.assert_close(grad_ours, logits.grad, rtol=1e-6, atol=1e-6)


def test_gradient_formula_for_unnormalised_targets():
    # d/dl -sum t log softmax(l/T) = (softmax(l/T) sum(t) - t) / T, also when the rows of t do not sum to 1
    logits = torch.tensor([[0.3, -0.2, 0.1]], requires_grad=True)
    t = torch.tensor([[0.5, 0.0, 1.0]])
    soft_cross_entropy(logits, t, 0.5).sum().backward()
    p = torch.softmax(logits.detach() / 0.5, -1)
    torch.testing.assert_close(logits.grad, (p * 1.5 - t) / 0.5)


def test_bf16_logits_get_bf16_gradients_close_to_fp32():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(40, 300, generator=g)
    targets = torch.softmax(torch.randn(40, 300, generator=g) / 0.07, -1)
    lb = base.bfloat16().requires_grad_()
    soft_cross_entropy(lb, targets, 0.1, chunk_rows=16).sum().backward()
    lf = base.bfloat16().float().requires_grad_()
    _plain(lf, targets, 0.1).sum().backward()
    assert lb.grad.dtype == torch.bfloat16
    torch.testing.assert_close(lb.grad.float(), lf.grad, rtol=2e-2, atol=2e-3)


def test_shape_mismatch_is_one_clear_error():
    with pytest.raises(ValueError, match="equal shape"):
        soft_cross_entropy(torch.zeros(2, 3), torch.zeros(2, 4))
