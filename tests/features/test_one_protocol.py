"""One image, one model: every consumer of features gets the same class token (one protocol, one core)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dinolab.curate.embed import EmbedConfig, embed_shard
from dinolab.curate.store import l2_normalize
from dinolab.eval.data import ImageSet
from dinolab.eval.features import classification_preprocess, global_spec
from dinolab.features.cache import FeatureConfig, extract
from dinolab.features.files import ExtractConfig, extract_features
from dinolab.models import DinoVisionTransformer
from dinolab.train.monitor import class_tokens
from dinolab.viz.patches import patch_features

SIZE = 16  # the model's own input: 4 x 4 patches of 4 px, so no path resizes or crops


@pytest.fixture
def model():
    torch.manual_seed(0)
    return DinoVisionTransformer(img_size=SIZE, patch_size=4, embed_dim=32, depth=2, num_heads=2).eval()


@pytest.fixture
def image(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    path = tmp_path / "one.png"  # lossless: the file and the array hold the same pixels
    Image.fromarray(pixels).save(path)
    return path, pixels


def test_extract_eval_monitor_curate_and_viz_agree_on_the_class_token(model, image):
    path, pixels = image
    extracted = extract_features(model, [path], ExtractConfig(size=SIZE, resize=None, progress=False))
    ref = torch.from_numpy(extracted["cls_tokens"][0])  # [D]

    images = ImageSet(array=pixels[None], name="one")
    pre = classification_preprocess(images.native_size, model.patch_size, SIZE)  # what `dinolab eval knn` uses
    evaluated = extract(model, images, pre, global_spec(model), FeatureConfig(bf16=False, use_cache=False,
                                                                               progress=False))["cls"][0, -1]
    monitored = class_tokens(model, pixels[None], SIZE)[0]
    viz = patch_features(model, path, SIZE).cls
    curated, _ = embed_shard(model, [path], 0, EmbedConfig(crop_size=SIZE, resize_size=None, float16=False,
                                                          num_workers=0, device="cpu"))

    assert ref.shape == (32,)
    for name, token in (("eval", evaluated), ("monitor", monitored), ("viz", viz)):
        assert torch.equal(token, ref), name
    np.testing.assert_array_equal(curated["embeddings"][0], l2_normalize(ref.numpy()[None])[0])  # unit norm


def test_training_knn_is_the_eval_knn_protocol_at_the_runs_input_size(tmp_path):
    """A file-backed labelled set of 40 x 50 images, a patch-4 model trained at 16 px: the k-NN the monitor prints
    is ``dinolab eval knn --image-size 16`` on the same splits (not a fixed 64 x 64 resize)."""
    from dinolab.data.datasets import open_labelled
    from dinolab.eval import knn
    from dinolab.eval.data import ClassificationData, LabelledImages
    from dinolab.train.monitor import KnnMonitor

    rng = np.random.default_rng(1)
    for split in ("train", "test"):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(4):
                tint = np.array([200, 30, 30] if c == "a" else [30, 30, 200], np.uint8)
                pixels = (rng.integers(0, 80, (40, 50, 3)) + tint // 2).astype(np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / c / f"{i}.png")
    torch.manual_seed(0)
    model = DinoVisionTransformer(img_size=SIZE, patch_size=4, embed_dim=32, depth=2, num_heads=2).train()
    splits = open_labelled(tmp_path)
    got = KnnMonitor(splits, image_size=SIZE, k=3)(model)
    assert model.training  # the monitor hands the backbone back in training mode

    as_set = {s: LabelledImages(ImageSet(paths=list(getattr(splits, f"x_{s}").paths), name=s),
                                getattr(splits, f"y_{s}")) for s in ("train", "test")}
    cfg = knn.KnnConfig(ks=(3,), image_size=SIZE, features=FeatureConfig(bf16=False, use_cache=False, progress=False))
    expected = knn.run(model, ClassificationData(as_set, ["a", "b"], str(tmp_path)), cfg)
    assert got == {"knn_top1": expected["knn/k3/top1"], "knn_n_test": 8}
    train_set = as_set["train"].images  # and the features themselves are the protocol's, bit for bit
    pre = classification_preprocess(train_set.native_size, model.patch_size, SIZE)
    ref = extract(model, train_set, pre, global_spec(model), cfg.features)["cls"][:, -1]
    assert torch.equal(class_tokens(model, splits.x_train, SIZE), ref)
