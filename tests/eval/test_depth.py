from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dinolab.eval import depth
from dinolab.eval.data import load_depth
from dinolab.eval.depth import DepthConfig, depth_metrics, lin_blocks
from dinolab.eval.depth_head import bin_centers, depth_from_probs, depth_to_bin, normalise_bins, silog_loss


def test_bin_encode_decode_round_trip():
    centers = bin_centers(1e-3, 10.0, 256)
    width = (10.0 - 1e-3) / 255
    depth_map = torch.rand(2, 5, 7) * 10
    idx = depth_to_bin(depth_map, centers)
    probs = F.one_hot(idx, 256).float()  # [..., K]
    decoded = depth_from_probs(probs, centers)
    assert (decoded - depth_map).abs().max() <= width / 2 + 1e-5  # nearest centre
    # decoding a centre's one-hot gives the centre, encoding a centre gives its index
    assert torch.equal(depth_to_bin(centers, centers), torch.arange(256))


def test_linear_normalisation_by_hand():
    logits = torch.tensor([-1.0, 0.0, 1.0]).view(1, 3, 1, 1)
    probs = normalise_bins(logits, "linear")[0, :, 0, 0]
    torch.testing.assert_close(probs, torch.tensor([0.1, 0.1, 1.1]) / 1.3)
    assert normalise_bins(torch.randn(2, 256, 3, 3)).sum(1).allclose(torch.ones(2, 3, 3))


def test_silog_is_scale_invariant_up_to_the_mean_term():
    gt = torch.rand(1, 6, 6) * 5 + 1
    valid = torch.ones_like(gt, dtype=torch.bool)
    assert silog_loss(gt, gt, valid, eps=0.0).item() == pytest.approx(0.0, abs=1e-6)
    # pred = 2 gt: g = log 2 everywhere, var 0 -> sqrt(0.15) log 2
    assert silog_loss(2 * gt, gt, valid, eps=0.0).item() == pytest.approx(math.sqrt(0.15) * math.log(2), rel=1e-5)


def test_silog_matches_the_official_formula_on_valid_pixels():
    gen = torch.Generator().manual_seed(0)
    pred, gt = torch.rand(2, 30, 40, generator=gen) * 5 + 0.1, torch.rand(2, 30, 40, generator=gen) * 5
    valid = gt > 1
    g = torch.log(pred[valid] + 1e-3) - torch.log(gt[valid] + 1e-3)  # dinov2 SigLoss
    expected = torch.sqrt(torch.var(g) + 0.15 * torch.pow(torch.mean(g), 2))
    torch.testing.assert_close(silog_loss(pred, gt, valid), expected)


def test_depth_metrics_by_hand():
    pred, gt = np.array([[2.0, 4.0]]), np.array([[2.0, 2.0]])
    m = depth_metrics(pred, gt, np.ones_like(gt, dtype=bool))
    assert m["rmse"] == pytest.approx(math.sqrt(2.0))
    assert m["abs_rel"] == pytest.approx(0.5)
    assert m["delta1"] == pytest.approx(0.5)
    assert m["log10"] == pytest.approx(math.log10(2) / 2)


def test_lin_blocks():
    assert lin_blocks("lin1", 12) == (11,)
    assert lin_blocks("lin4", 12) == (2, 5, 8, 11)
    assert lin_blocks("lin4", 24) == (4, 11, 17, 23)
    assert lin_blocks("lin4", 40) == (9, 19, 29, 39)


def test_upsampling_logits_equals_upsampling_features_then_conv():
    """The head upsamples 256 logits instead of the features (official order): same numbers."""
    conv = torch.nn.Conv2d(10, 6, kernel_size=1)
    feats = torch.randn(2, 10, 3, 5)
    up = lambda t: F.interpolate(t, scale_factor=4, mode="bilinear", align_corners=False)  # noqa: E731
    torch.testing.assert_close(conv(up(feats)), up(conv(feats)), rtol=1e-5, atol=1e-5)


def test_head_logits_equal_conv_then_bilinear_upsampling():
    head = depth.LinearDepthHead(10, bin_centers(0.1, 5.0, 6))
    feats = torch.randn(2, 3, 5, 10)  # [B, h, w, D]
    conv = torch.nn.Conv2d(10, 6, kernel_size=1)
    conv.weight.data = head.linear.weight.data[:, :, None, None].clone()
    conv.bias.data = head.linear.bias.data.clone()
    ref = F.interpolate(conv(feats.permute(0, 3, 1, 2)), scale_factor=4, mode="bilinear", align_corners=False)
    torch.testing.assert_close(head.logits(feats).permute(0, 3, 1, 2), ref, rtol=1e-5, atol=1e-5)


def test_run_leave_one_out_with_ranges_per_group(tiny_model, depth_npz, feature_cfg):
    data = load_depth(depth_npz)
    cfg = DepthConfig(iterations=3, head="lin4", image_size=(16, 24), features=feature_cfg, progress=False)
    artifacts: dict = {}
    metrics = depth.run(tiny_model, data, cfg, artifacts)
    assert metrics["depth/indoor/max_depth"] == 10.0 and metrics["depth/kitti/max_depth"] == 80.0
    for group in ("indoor", "kitti"):
        assert metrics[f"depth/{group}/rmse"] > 0
        assert 0 <= metrics[f"depth/{group}/delta1"] <= 1
    title, image, gt, pred = artifacts["depth_samples"][0]
    assert pred.shape == gt.shape
