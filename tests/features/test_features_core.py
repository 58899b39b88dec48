"""The image -> features core: token shapes, the official preprocessing, unreadable files skipped and named."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dinolab.data.transforms import EvalTransform
from dinolab.features.embed import EmbedOptions, FeatureSpec, embed, embed_batch
from dinolab.features.inputs import Preprocess
from dinolab.models import DinoVisionTransformer


@pytest.fixture
def model():
    torch.manual_seed(0)
    return DinoVisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2,
                                 num_register_tokens=2).eval()


def test_token_shapes_and_layers(model):
    x = torch.randn(2, 3, 16, 24)  # a 4 x 6 patch grid
    out = embed_batch(model, x, FeatureSpec(layers=(0, 2), patch="all"))
    assert out["cls"].shape == (2, 2, 32) and out["patch"].shape == (2, 2, 4, 6, 32)
    assert out["cls"].dtype == torch.float32
    mean = embed_batch(model, x, FeatureSpec(layers=2, patch="mean"))["patch_mean"]
    torch.testing.assert_close(mean, out["patch"][:, -1].mean(dim=(1, 2)))  # block 2 is the last of both
    ff = model.forward_features(x)
    with_regs = embed_batch(model, x, FeatureSpec(registers=True, patch="all"))
    torch.testing.assert_close(with_regs["registers"], ff["x_norm_regtokens"])
    torch.testing.assert_close(with_regs["cls"][:, 0], out["cls"][:, 1])
    torch.testing.assert_close(with_regs["patch"][:, 0], out["patch"][:, 1])


def test_registers_need_the_last_normalised_block():
    with pytest.raises(ValueError, match="registers"):
        FeatureSpec(layers=2, registers=True)


def test_official_preprocess_is_resize_then_centre_crop():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 77, 3), dtype=np.uint8))
    torch.testing.assert_close(Preprocess.official(28, 33)(image), EvalTransform(28, 33)(image), rtol=0, atol=0)
    assert Preprocess.official(28, None)(image).shape == (3, 28, 28)
    with pytest.raises(ValueError, match="square"):
        Preprocess((28, 42), resize=32)


def test_unreadable_files_are_skipped_and_reported(model, tmp_path):
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(paths[-1])
    paths.insert(1, tmp_path / "broken.png")
    paths[1].write_bytes(b"not a png")
    got = embed(model, paths, Preprocess((16, 16)), options=EmbedOptions(batch_size=2, progress=False))
    assert got.kept == [0, 2, 3] and got.skipped == [1]
    alone = embed_batch(model, Preprocess((16, 16))(Image.open(paths[3]))[None])["cls"]
    torch.testing.assert_close(got.tokens["cls"][2], alone[0])


def test_embedding_leaves_the_global_rng_alone(model):
    """Training calls the k-NN monitor between steps: drawing from the global RNG would change the next crops."""
    images = np.zeros((3, 16, 16, 3), np.uint8)
    state = torch.get_rng_state()
    embed(model, images, Preprocess((16, 16)), options=EmbedOptions(batch_size=2, progress=False))
    assert torch.equal(torch.get_rng_state(), state)
