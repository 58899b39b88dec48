from __future__ import annotations

import math

import pytest
import torch

from dinolab.losses import koleo_loss

EPS = 1e-8


def test_antipodal_pair_exact_value():
    # e, -e in D = 3; the distance is ||x - y + eps||: row e sees (2 + eps, eps, eps), row -e sees
    # (-2 + eps, eps, eps); each distance gets + eps inside the log, and the loss is their mean
    x = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]], dtype=torch.float64)
    row_e = -math.log(math.sqrt((2 + EPS) ** 2 + 2 * EPS**2) + EPS)
    row_minus_e = -math.log(math.sqrt((2 - EPS) ** 2 + 2 * EPS**2) + EPS)
    expected = (row_e + row_minus_e) / 2
    assert koleo_loss(x).item() == pytest.approx(expected, rel=1e-14, abs=0)
    assert expected == pytest.approx(-math.log(2) - EPS / 2, abs=1e-15)  # -log 2 - eps/2 + O(eps^2)
    # fp32 cannot see eps next to 2: exactly -log 2 there; the scale of the inputs does not matter
    x32 = torch.tensor([[3.0, 0.0, 0.0], [-0.5, 0.0, 0.0]])
    assert koleo_loss(x32).item() == pytest.approx(-math.log(2), abs=1e-7)


def test_three_points_on_a_circle_by_hand():
    # angles 0, 90, 180 degrees: every nearest neighbour is at distance sqrt(2) -> -log sqrt(2)
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    assert koleo_loss(x).item() == pytest.approx(-0.5 * math.log(2), abs=1e-7)


def test_matches_brute_force_nearest_neighbour():
    torch.manual_seed(0)
    x = torch.randn(7, 5, dtype=torch.float64)
    unit = x / x.norm(dim=1, keepdim=True)
    nn_dist = [min((unit[i] - unit[j]).norm().item() for j in range(7) if j != i) for i in range(7)]
    expected = -sum(math.log(d) for d in nn_dist) / 7
    assert koleo_loss(x).item() == pytest.approx(expected, abs=1e-6)


def test_duplicates_are_finite_in_value_and_gradient():
    dim = 4
    x = torch.tensor([[0.3, -1.2, 0.5, 2.0]] * 5, dtype=torch.float64, requires_grad=True)
    loss = koleo_loss(x)
    # distance of a duplicate is ||eps * 1|| = eps sqrt(D)
    assert loss.item() == pytest.approx(-math.log(EPS * math.sqrt(dim) + EPS), rel=1e-6)
    loss.backward()
    assert torch.isfinite(x.grad).all()


def test_half_precision_duplicates_stay_finite():
    x = torch.ones(4, 8, dtype=torch.float16)
    loss = koleo_loss(x)
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss)


def test_autocast_is_disabled_inside():
    x = torch.randn(6, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = koleo_loss(x)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, koleo_loss(x))


def test_batch_of_one_is_zero():
    loss = koleo_loss(torch.randn(1, 16))
    assert loss.item() == 0.0
    assert koleo_loss(torch.randn(0, 16)).item() == 0.0
