from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dinolab.eval import segmentation
from dinolab.eval.data import load_segmentation
from dinolab.eval.metrics import confusion_matrix, segmentation_scores
from dinolab.eval.segmentation import LinearSegmentationHead, SegmentationConfig, segmentation_loss, train_head


def test_miou_and_pixel_accuracy_by_hand():
    target = torch.tensor([[0, 0, 1], [1, 2, 255]])
    pred = torch.tensor([[0, 1, 1], [1, 1, 0]])
    cm = confusion_matrix(pred, target, num_classes=4, ignore_index=255)
    assert cm.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]]
    scores = segmentation_scores(cm)
    # IoU0 = 1 / (2 + 1 - 1), IoU1 = 2 / (2 + 4 - 2), IoU2 = 0 / 1; class 3 absent: left out
    assert scores["mIoU"] == pytest.approx(100 * (0.5 + 0.5 + 0.0) / 3)
    assert scores["pixel_acc"] == pytest.approx(100 * 3 / 5)
    assert math.isnan(scores["iou"][3])


def test_loss_is_zero_not_nan_when_every_pixel_is_ignored():
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    loss = segmentation_loss(logits, [np.full((8, 8), 255), np.full((8, 8), 255)], ignore_index=255)
    assert loss.item() == 0.0


def test_loss_handles_masks_of_different_sizes():
    logits = torch.zeros(2, 3, 2, 2)  # uniform prediction: cross-entropy log(3) per pixel
    loss = segmentation_loss(logits, [np.zeros((4, 4), np.int64), np.ones((6, 2), np.int64)], ignore_index=255)
    assert loss.item() == pytest.approx(math.log(3))


def test_head_learns_separable_patch_features():
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (10, 4, 4), generator=gen)
    feats = torch.nn.functional.one_hot(labels, 3).float() * 2 + 0.1 * torch.randn(10, 4, 4, 3, generator=gen)
    masks = [m.numpy() for m in labels]  # label size = patch grid: upsampling is the identity
    torch.manual_seed(0)
    head = LinearSegmentationHead(3, 3, batchnorm=True)
    train_head(head, feats, masks, 255, SegmentationConfig(iterations=150, batch_size=4, lr=0.05, progress=False))
    head.eval()
    with torch.no_grad():
        pred = head(feats).argmax(1)
    assert torch.equal(pred, labels)


def test_run_multiscale_and_flip(tiny_model, segmentation_npz, feature_cfg):
    data = load_segmentation(segmentation_npz)
    cfg = SegmentationConfig(iterations=5, image_size=(16, 24), test_scales=(1.0, 2.0), test_flip=True,
                             features=feature_cfg, progress=False)
    artifacts: dict = {}
    metrics = segmentation.run(tiny_model, data, cfg, artifacts)
    for split in ("val", "test"):
        assert 0 <= metrics[f"seg/{split}/mIoU"] <= 100
        assert 0 <= metrics[f"seg/{split}/pixel_acc"] <= 100
        assert f"seg/{split}/iou/a" in metrics
    image, mask, pred = artifacts["seg_samples"][0]
    assert pred.shape == mask.shape == image.shape[:2]
