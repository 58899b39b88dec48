from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from dinolab.models.heads import (
    DINOHead,
    convert_official_head_state_dict,
    to_official_head_state_dict,
    weight_normalized_linear,
)


def _official_state_dict(in_dim, out_dim, hidden, bottleneck, seed=0) -> dict[str, torch.Tensor]:
    """An official-format head state dict (keys of dinov2 DINOHead with the old weight_norm), random values."""
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "mlp.0.weight": (hidden, in_dim),
        "mlp.0.bias": (hidden,),
        "mlp.2.weight": (hidden, hidden),
        "mlp.2.bias": (hidden,),
        "mlp.4.weight": (bottleneck, hidden),
        "mlp.4.bias": (bottleneck,),
        "last_layer.weight_g": (out_dim, 1),
        "last_layer.weight_v": (out_dim, bottleneck),
    }
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def _official_forward(sd, x):
    """The official head as formulas: GELU MLP, L2 normalise, weight-normalised prototypes g * v / ||v||."""
    h = nn.functional.gelu(x @ sd["mlp.0.weight"].T + sd["mlp.0.bias"])
    h = nn.functional.gelu(h @ sd["mlp.2.weight"].T + sd["mlp.2.bias"])
    z = h @ sd["mlp.4.weight"].T + sd["mlp.4.bias"]
    z = z / z.norm(dim=-1, keepdim=True)
    w = sd["last_layer.weight_g"] * sd["last_layer.weight_v"] / sd["last_layer.weight_v"].norm(dim=1, keepdim=True)
    return z @ w.T


def test_shapes_and_initialisation():
    torch.manual_seed(0)
    head = DINOHead(in_dim=64, out_dim=50, hidden_dim=256, bottleneck_dim=32)
    out = head(torch.randn(2, 7, 64))
    assert out.shape == (2, 7, 50)
    g = head.last_layer.parametrizations.weight.original0
    assert g.shape == (50, 1) and g.requires_grad and torch.all(g == 1)
    # the effective prototypes are unit vectors at init and logits of a unit input lie in [-1, 1]
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(50))
    assert out.abs().max() <= 1 + 1e-6
    linears = [m for m in head.mlp if isinstance(m, nn.Linear)]
    assert len(linears) == 3
    assert all(torch.all(m.bias == 0) for m in linears)
    weights = torch.cat([m.weight.flatten() for m in linears])
    assert weights.std().item() == pytest.approx(0.02, rel=0.05)


def test_one_layer_mlp():
    head = DINOHead(in_dim=8, out_dim=5, bottleneck_dim=4, nlayers=1)
    assert isinstance(head.mlp, nn.Linear) and head(torch.randn(3, 8)).shape == (3, 5)


def test_loads_official_weight_g_weight_v_keys():
    official = _official_state_dict(16, 10, 24, 8)
    head = DINOHead(in_dim=16, out_dim=10, hidden_dim=24, bottleneck_dim=8)
    head.load_state_dict(official, strict=True)
    x = torch.randn(5, 16)
    torch.testing.assert_close(head(x), _official_forward(official, x))
    # and back: our keys -> official keys round trip
    assert to_official_head_state_dict(head.state_dict()).keys() == official.keys()


def test_loads_official_keys_nested_under_a_prefix():
    official = {f"dino_head.{k}": v for k, v in _official_state_dict(16, 10, 24, 8, seed=1).items()}
    student = nn.ModuleDict({"dino_head": DINOHead(in_dim=16, out_dim=10, hidden_dim=24, bottleneck_dim=8)})
    student.load_state_dict(official, strict=True)
    torch.testing.assert_close(
        student["dino_head"].last_layer.parametrizations.weight.original0, official["dino_head.last_layer.weight_g"]
    )
    converted = convert_official_head_state_dict(official)
    assert "dino_head.last_layer.parametrizations.weight.original1" in converted
    assert "dino_head.last_layer.weight_v" not in converted


@pytest.mark.skipif(not hasattr(nn.utils, "weight_norm"), reason="deprecated torch.nn.utils.weight_norm removed")
def test_key_names_match_the_deprecated_weight_norm():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        old = nn.utils.weight_norm(nn.Linear(8, 10, bias=False))
    old_sd = {f"last_layer.{k}": v for k, v in old.state_dict().items()}
    assert set(old_sd) == {"last_layer.weight_g", "last_layer.weight_v"}
    head = DINOHead(in_dim=16, out_dim=10, hidden_dim=24, bottleneck_dim=8)
    missing, unexpected = head.load_state_dict(old_sd, strict=False)
    assert unexpected == [] and all(k.startswith("mlp.") for k in missing)
    torch.testing.assert_close(head.last_layer.weight, old.weight)


def _parametrized_reference(x, direction, magnitude):
    layer = weight_norm(nn.Linear(direction.shape[1], direction.shape[0], bias=False)).to(direction.dtype)
    with torch.no_grad():
        layer.parametrizations.weight.original0.copy_(magnitude)
        layer.parametrizations.weight.original1.copy_(direction)
    return layer, layer(x)


@pytest.mark.parametrize("block_rows", [1, 3, None])
def test_weight_normalized_linear_equals_the_parametrized_layer(block_rows):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 2, 6, generator=g, dtype=torch.float64, requires_grad=True)
    direction = torch.randn(7, 6, generator=g, dtype=torch.float64, requires_grad=True)
    magnitude = (torch.rand(7, 1, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    before = direction.detach().clone()
    out = weight_normalized_linear(x, direction, magnitude, block_rows=block_rows)
    weights = torch.randn(out.shape, generator=g, dtype=torch.float64)
    (out * weights).sum().backward()
    assert torch.equal(direction.detach(), before)  # the parameter is never written in place
    x_ref = x.detach().requires_grad_()
    layer, ref = _parametrized_reference(x_ref, direction.detach(), magnitude.detach())
    (ref * weights).sum().backward()
    p = layer.parametrizations.weight
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(direction.grad, p.original1.grad)
    torch.testing.assert_close(magnitude.grad, p.original0.grad)


def test_head_under_bf16_autocast_matches_the_parametrized_head():
    torch.manual_seed(0)
    head = DINOHead(16, out_dim=300, hidden_dim=32, bottleneck_dim=8)
    x = torch.randn(10, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(x)
        ref = head.last_layer(torch.nn.functional.normalize(head.mlp(x), dim=-1))
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
    out.float().square().sum().backward()
    p = head.last_layer.parametrizations.weight
    grads = [p.original0.grad.clone(), p.original1.grad.clone()]
    head.zero_grad()
    ref.float().square().sum().backward()
    assert p.original0.grad.dtype == torch.float32
    for ours, theirs in zip(grads, [p.original0.grad, p.original1.grad]):
        torch.testing.assert_close(ours, theirs, rtol=3e-2, atol=3e-3)


def test_weight_normalized_linear_shape_error():
    with pytest.raises(ValueError, match="magnitude"):
        weight_normalized_linear(torch.zeros(2, 4), torch.zeros(3, 4), torch.zeros(3))
