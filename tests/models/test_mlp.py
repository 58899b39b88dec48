import torch
import torch.nn.functional as F

from dinolab.layers.mlp import Mlp, gelu_linear


def _plain(mlp: Mlp, x: torch.Tensor) -> torch.Tensor:
    return mlp.fc2(F.gelu(mlp.fc1(x)))  # what autograd sees without gelu_linear (GELU input and output kept)


def _grads(mlp, x, forward, weights):
    x = x.detach().clone().requires_grad_()
    mlp.zero_grad()
    (forward(mlp, x) * weights).sum().backward()
    return [x.grad.clone()] + [p.grad.clone() for p in mlp.parameters()]


def test_gelu_linear_mlp_equals_the_plain_mlp_in_float64():
    torch.manual_seed(0)
    mlp = Mlp(6, 24).double()
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    weights = torch.randn(2, 5, 6, dtype=torch.float64)
    torch.testing.assert_close(mlp(x), _plain(mlp, x), rtol=1e-12, atol=1e-12)
    ours, plain = _grads(mlp, x, Mlp.forward, weights), _grads(mlp, x, _plain, weights)
    for a, b in zip(ours, plain):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_under_bf16_autocast_dtypes_and_values_follow_autocast():
    torch.manual_seed(1)
    mlp = Mlp(16, 64)
    x = torch.randn(40, 16)
    weights = torch.randn(40, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, plain = mlp(x), _plain(mlp, x)
        assert ours.dtype == plain.dtype == torch.bfloat16
        torch.testing.assert_close(ours, plain, rtol=1e-2, atol=1e-2)
        g_ours, g_plain = _grads(mlp, x, Mlp.forward, weights), _grads(mlp, x, _plain, weights)
    for a, b in zip(g_ours, g_plain):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def test_gelu_linear_without_bias():
    torch.manual_seed(2)
    h, w = torch.randn(3, 8, dtype=torch.float64, requires_grad=True), torch.randn(4, 8, dtype=torch.float64)
    torch.testing.assert_close(gelu_linear(h, w, None), F.gelu(h) @ w.T)
    gelu_linear(h, w, None).sum().backward()
    expected = torch.autograd.grad((F.gelu(h) @ w.T).sum(), h)[0]
    torch.testing.assert_close(h.grad, expected)
