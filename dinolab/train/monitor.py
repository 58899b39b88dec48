"""k-NN accuracy of a backbone during training: the honest signal (loss values say little).

Features are the backbone's normalised class tokens of the labelled train and test splits, resized
to ``image_size`` and ImageNet-normalised; classification is the DINO weighted k-NN
(``dinolab.eval.knn``, T = 0.07).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from dinolab.data.datasets import LabelledSplits
from dinolab.data.transforms import normalize
from dinolab.eval.knn import KnnConfig, knn_from_features
from dinolab.features.embed import embed_batch


def _as_array(images) -> np.ndarray:
    if isinstance(images, np.ndarray):
        return images
    return np.stack([np.asarray(im.convert("RGB").resize((64, 64))) for im in images])


@torch.inference_mode()
def class_tokens(backbone, images: np.ndarray, image_size: int, batch_size: int = 256, bf16: bool = False) -> torch.Tensor:
    """uint8 images [N, H, W, 3] -> class tokens [N, D] (fp32) of ``backbone`` in eval mode."""
    was_training = backbone.training
    backbone.eval()
    device = next(backbone.parameters()).device
    feats = []
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(images[start : start + batch_size]).to(device).permute(0, 3, 1, 2).float() / 255.0
        if x.shape[-2:] != (image_size, image_size):
            x = F.interpolate(x, size=(image_size, image_size), mode="bicubic", antialias=True).clamp(0, 1)
        feats.append(embed_batch(backbone, normalize(x), bf16=bf16)["cls"][:, 0])
    backbone.train(was_training)
    return torch.cat(feats)


@dataclass
class KnnMonitor:
    """Call with a backbone -> ``{"knn_top1": percent, "knn_n_test": count}``."""

    data: LabelledSplits
    image_size: int
    k: int = 20
    bf16: bool = False

    def __post_init__(self) -> None:
        self.x_train, self.x_test = _as_array(self.data.x_train), _as_array(self.data.x_test)
        self.y_train = torch.as_tensor(self.data.y_train)
        self.y_test = torch.as_tensor(self.data.y_test)
        self.num_classes = int(max(self.y_train.max(), self.y_test.max())) + 1

    def __call__(self, backbone) -> dict[str, float]:
        train = class_tokens(backbone, self.x_train, self.image_size, bf16=self.bf16)
        test = class_tokens(backbone, self.x_test, self.image_size, bf16=self.bf16)
        k = min(self.k, len(train))
        metrics = knn_from_features(train, self.y_train, test, self.y_test, self.num_classes, KnnConfig(ks=(k,)))
        return {"knn_top1": metrics[f"knn/k{k}/top1"], "knn_n_test": len(test)}
