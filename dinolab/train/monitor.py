"""k-NN accuracy of a backbone during training: the honest signal (loss values say little).

It is the ``dinolab eval knn --image-size S`` protocol, S the run's own input size (``train.knn_image_size``,
default ``crops.global_crops_size``): each image of the labelled train and test splits is resized (shorter
side to S, bicubic) and centre-cropped to S x S (:func:`dinolab.eval.features.classification_preprocess`),
ImageNet-normalised, and embedded by the one core (:mod:`dinolab.features.embed`); the features are the
normalised class tokens of the last block, classified by the DINO weighted k-NN (``dinolab.eval.knn``,
T = 0.07) with k = ``min(k, train size)``. Nothing is cached (the weights change between calls).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dinolab.data.datasets import LabelledSplits
from dinolab.eval.features import classification_preprocess
from dinolab.eval.knn import KnnConfig, knn_from_features
from dinolab.features.cache import FeatureConfig
from dinolab.features.embed import EmbedOptions, FeatureSpec, embed


def class_tokens(backbone, images, image_size: int, batch_size: int = FeatureConfig.batch_size,
                 bf16: bool = False) -> torch.Tensor:
    """Images (uint8 [N, H, W, 3], or a sequence of PIL images such as ``ImageFiles``) -> class tokens [N, D]
    (fp32) of ``backbone``, as ``dinolab eval knn`` computes them at ``image_size``; its train/eval mode is kept."""
    was_training = backbone.training
    native_hw = np.asarray(images[0]).shape[:2]
    pre = classification_preprocess(native_hw, backbone.patch_size, image_size)
    options = EmbedOptions(batch_size=batch_size, bf16=bf16, progress=False)
    try:
        return embed(backbone, images, pre, FeatureSpec(), options).tokens["cls"][:, -1]
    finally:
        backbone.train(was_training)


@dataclass
class KnnMonitor:
    """Call with a backbone -> ``{"knn_top1": percent, "knn_n_test": count}``."""

    data: LabelledSplits
    image_size: int
    k: int = 20
    bf16: bool = False

    def __post_init__(self) -> None:
        self.y_train = torch.as_tensor(self.data.y_train)
        self.y_test = torch.as_tensor(self.data.y_test)
        self.num_classes = int(max(self.y_train.max(), self.y_test.max())) + 1

    def __call__(self, backbone) -> dict[str, float]:
        train = class_tokens(backbone, self.data.x_train, self.image_size, bf16=self.bf16)
        test = class_tokens(backbone, self.data.x_test, self.image_size, bf16=self.bf16)
        k = min(self.k, len(train))
        metrics = knn_from_features(train, self.y_train, test, self.y_test, self.num_classes, KnnConfig(ks=(k,)))
        return {"knn_top1": metrics[f"knn/k{k}/top1"], "knn_n_test": len(test)}
