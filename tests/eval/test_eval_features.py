from __future__ import annotations

import numpy as np
import pytest
import torch

from dinolab.eval.data import ImageSet
from dinolab.eval.features import classification_preprocess, dense_preprocess
from dinolab.features.cache import extract, model_fingerprint
from dinolab.features.embed import FeatureSpec
from dinolab.features.inputs import Preprocess


def _count_forwards(model):
    calls = []
    original = model.get_intermediate_layers

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    model.get_intermediate_layers = counting
    return calls


def test_second_extraction_is_a_cache_hit(tiny_model, feature_cfg, tmp_path):
    images = ImageSet(array=np.random.default_rng(0).integers(0, 255, (20, 16, 16, 3)).astype(np.uint8))
    pre, spec = Preprocess((32, 32)), FeatureSpec(layers=2, patch="all")
    calls = _count_forwards(tiny_model)
    first = extract(tiny_model, images, pre, spec, feature_cfg)
    n_batches = len(calls)
    assert n_batches == 2  # 20 images, batch 16
    second = extract(tiny_model, images, pre, spec, feature_cfg)
    assert len(calls) == n_batches  # no forward pass: read from disk
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert first["cls"].shape == (20, 2, 32) and first["patch"].shape == (20, 2, 4, 4, 32)
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1
    # another preprocessing or other weights are different entries
    extract(tiny_model, images, Preprocess((32, 32), hflip=True), spec, feature_cfg)
    with torch.no_grad():
        tiny_model.norm.weight.add_(1.0)
    extract(tiny_model, images, pre, spec, feature_cfg)
    assert len(calls) == n_batches + 4
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 3


def test_fingerprint_follows_the_weights(tiny_model):
    before = model_fingerprint(tiny_model)
    assert model_fingerprint(tiny_model) == before
    with torch.no_grad():
        tiny_model.blocks[0].attn.qkv.weight[0, 0] += 1e-3
    assert model_fingerprint(tiny_model) != before


def test_features_match_a_direct_forward(tiny_model, feature_cfg):
    array = np.random.default_rng(1).integers(0, 255, (3, 32, 32, 3)).astype(np.uint8)
    pre = Preprocess((32, 32))
    feats = extract(tiny_model, ImageSet(array=array), pre, FeatureSpec(layers=1, patch="mean"),
                    type(feature_cfg)(bf16=False, use_cache=False, progress=False))
    x = torch.stack([pre(a) for a in array])
    with torch.no_grad():
        out = tiny_model.forward_features(x)
    torch.testing.assert_close(feats["cls"][:, -1], out["x_norm_clstoken"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(feats["patch_mean"], out["x_norm_patchtokens"].mean(1), rtol=1e-5, atol=1e-5)


def test_default_input_sizes():
    assert classification_preprocess((32, 32), 14).size == (112, 112)  # CIFAR
    assert classification_preprocess((96, 96), 14).size == (112, 112)  # Imagenette
    big = classification_preprocess((375, 500), 14)
    assert big.size == (224, 224) and big.crop_fraction == 0.875  # official resize 256, crop 224
    assert classification_preprocess((32, 32), 4).size == (32, 32)  # a patch-4 CPU model
    assert classification_preprocess((32, 32), 14, image_size=56).size == (56, 56)
    assert dense_preprocess((120, 160), 14).size == (168, 224)  # CamVid
    assert dense_preprocess((240, 320), 14).size == (168, 224)  # NYU
    assert dense_preprocess((187, 621), 14).size == (168, 560)  # KITTI
    assert dense_preprocess((120, 160), 14, scale=1.5).size == (252, 336)
    with pytest.raises(ValueError, match="multiples of the patch size 14"):
        classification_preprocess((32, 32), 14, image_size=100)


def test_preprocess_shapes_and_seeded_augmentation():
    image = np.random.default_rng(0).integers(0, 255, (30, 40, 3)).astype(np.uint8)
    assert Preprocess((28, 42))(image).shape == (3, 28, 42)
    aug = Preprocess((16, 16), augment=True, seed=3)
    assert torch.equal(aug(image, 5), aug(image, 5))
    assert not torch.equal(aug(image, 5), aug(image, 6))
    flipped = Preprocess((30, 40), hflip=True)(image)
    assert torch.equal(flipped, Preprocess((30, 40))(image).flip(-1))


def test_protocols_that_seed_their_heads_leave_the_callers_rng_alone():
    import torch

    from dinolab.eval import depth, linear, segmentation
    from dinolab.eval.features import keeps_global_rng

    @keeps_global_rng
    def seeds_and_draws():
        torch.manual_seed(0)
        return torch.rand(3)

    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = seeds_and_draws()
    assert torch.equal(torch.get_rng_state(), state)  # the caller's stream is where it was
    assert torch.equal(first, seeds_and_draws())  # and the seeded draws are still reproducible
    for fn in (linear.probe_from_features, segmentation.run, depth._fit_predict):  # every protocol that seeds
        assert getattr(fn, "__wrapped__", None) is not None, fn.__name__
