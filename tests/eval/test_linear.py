from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from dinolab.eval import linear
from dinolab.eval.data import load_classification
from dinolab.eval.linear import (
    InputVariant,
    LinearConfig,
    LinearGrid,
    cosine_factor,
    probe_from_features,
    train_grid,
)


def separable_features(n: int, seed: int) -> dict[str, torch.Tensor]:
    """Class c has its class token pushed along axis c: linearly separable by construction."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 4
    cls = torch.randn(n, 2, 16, generator=gen) * 0.3
    cls[torch.arange(n), -1, labels] += 3.0
    return {"cls": cls, "patch_mean": torch.randn(n, 16, generator=gen) * 0.3, "labels": labels}


def test_probe_reaches_100_percent_on_separable_data():
    cfg = LinearConfig(lrs=(1e-2, 0.1), n_last_blocks=(1, 4), iterations=300, batch_size=32, progress=False)
    metrics = probe_from_features(
        separable_features(200, 0), separable_features(40, 1), separable_features(60, 2), 4, cfg
    )
    assert metrics["linear/val/top1"] == 100.0
    assert metrics["linear/test/top1"] == 100.0
    assert metrics["linear/best/n_blocks"] == 1.0  # n=4 exceeds the 2 available blocks and is dropped


def test_per_head_learning_rates_equal_separate_sgd():
    """The stacked update must equal one torch.optim.SGD (momentum 0.9, cosine) per head."""
    torch.manual_seed(0)
    n, d, c, lrs, steps = 16, 5, 3, (0.5, 0.05), 6
    cls, patch, labels = torch.randn(n, 1, d), torch.randn(n, d), torch.randint(0, c, (n,))
    grid = LinearGrid([InputVariant(1, False)], [d], len(lrs), c)
    start_w, start_b = grid.weights[0].detach().clone(), grid.biases[0].detach().clone()
    # full-batch steps: the sampling order cannot matter
    cfg = LinearConfig(lrs=lrs, iterations=steps, batch_size=n, progress=False)
    train_grid(grid, cls, patch, labels, torch.tensor(lrs), cfg)
    for l, lr in enumerate(lrs):
        w = start_w[:, l].clone().requires_grad_()
        b = start_b[0, l].clone().requires_grad_()
        opt = torch.optim.SGD([w, b], lr=lr, momentum=0.9)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_factor(s, steps))
        for _ in range(steps):
            opt.zero_grad()
            F.cross_entropy(cls[:, 0] @ w + b, labels).backward()
            opt.step()
            sched.step()
        torch.testing.assert_close(grid.weights[0][:, l].detach(), w.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grid.biases[0][0, l].detach(), b.detach(), rtol=1e-5, atol=1e-6)


def test_input_variant_concatenates_last_blocks_and_avgpool():
    cls = torch.arange(24.0).view(1, 4, 6)
    patch_mean = torch.full((1, 6), -1.0)
    x = InputVariant(2, True).build(cls, patch_mean)
    assert torch.equal(x[0], torch.cat([cls[0, 2], cls[0, 3], patch_mean[0]]))


def test_cosine_factor_endpoints():
    assert cosine_factor(0, 100) == 1.0
    assert math.isclose(cosine_factor(50, 100), 0.5)
    assert math.isclose(cosine_factor(100, 100), 0.0, abs_tol=1e-12)


def test_run_on_tiny_model_with_augmented_views(tiny_model, classification_npz, feature_cfg):
    data = load_classification(classification_npz)
    cfg = LinearConfig(iterations=20, batch_size=8, image_size=32, augment_views=2, features=feature_cfg,
                       progress=False)
    metrics = linear.run(tiny_model, data, cfg)
    assert {"linear/val/top1", "linear/test/top1", "linear/best/lr"} <= set(metrics)
    assert metrics["linear/best/lr"] in [lr * 8 / 256 for lr in cfg.lrs]
