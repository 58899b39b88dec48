"""Feature extraction: good files in order, bad files skipped and named, both output formats."""

import numpy as np
import pytest
import torch
from PIL import Image

from dinolab.cli import main
from dinolab.features.files import ExtractConfig, extract_features
from dinolab.features.store import load_features, save_features
from dinolab.models import DinoVisionTransformer, build_backbone
from dinolab.models.checkpoints import save_backbone


@pytest.fixture
def image_folder(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    for name in ("a.png", "sub/b.JPG", "c.webp"):
        Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(folder / name)
    (folder / "broken.jpg").write_bytes(b"not a jpeg at all")
    (folder / "notes.txt").write_text("not an image suffix: ignored")
    return folder


def test_extract_skips_corrupt_file_and_warns(image_folder, tmp_path):
    torch.manual_seed(0)
    model = DinoVisionTransformer(img_size=28, patch_size=14, embed_dim=32, depth=1, num_heads=2)
    paths = sorted(p for p in image_folder.rglob("*") if p.suffix.lower() != ".txt" and p.is_file())
    with pytest.warns(UserWarning, match="broken.jpg"):
        feats = extract_features(model, paths, ExtractConfig(batch_size=2, size=28, resize=32, patch_tokens=True,
                                                            progress=False))
    assert [p.split("/")[-1] for p in feats["paths"]] == ["a.png", "c.webp", "b.JPG"]
    assert feats["skipped"] == [str(image_folder / "broken.jpg")]
    assert feats["cls_tokens"].shape == (3, 32) and feats["patch_tokens"].shape == (3, 4, 32)
    # each row is the model's class token of that image alone
    from dinolab.data.images import load_rgb
    from dinolab.data.transforms import EvalTransform

    x = EvalTransform(28, 32)(load_rgb(image_folder / "c.webp"))[None]
    with torch.no_grad():
        np.testing.assert_allclose(feats["cls_tokens"][1], model.eval()(x)[0].numpy(), atol=1e-5)


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_extract_cli_writes_readable_file(image_folder, tmp_path, suffix):
    weights = tmp_path / "w.pth"
    save_backbone(build_backbone("vit_small", patch_size=14, img_size=28, depth=2), weights)
    out = tmp_path / f"feats{suffix}"
    with pytest.warns(UserWarning, match="broken.jpg"):
        rc = main(["extract", "--weights", str(weights), "--images", str(image_folder),
                   "--out", str(out), "--size", "28", "--resize", "28", "--layers", "2", "--batch-size", "2"])
    assert rc == 0
    feats = load_features(out)
    assert feats["cls_tokens"].shape == (3, 2, 384)
    assert len(feats["paths"]) == 3 and feats["skipped"][0].endswith("broken.jpg")
    assert feats["meta"]["layers"] == 2


def test_extract_cli_bad_input_is_one_line(tmp_path, capsys):
    assert main(["extract", "--images", str(tmp_path / "missing"), "--out", str(tmp_path / "f.npz")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]


def test_save_features_rejects_unknown_suffix(tmp_path):
    with pytest.raises(ValueError, match=r"\.npz or \.safetensors"):
        save_features({"cls_tokens": np.zeros((1, 2)), "paths": ["x"], "skipped": []}, tmp_path / "f.csv")


def test_extract_txt_list_with_fifo_and_undecodable_name(image_folder, tmp_path, make_fifo, bad_name, deadline,
                                                         opened_paths):
    """A FIFO in the list is skipped and named, never opened (it used to hang); an undecodable name works."""
    import os

    odd = image_folder / bad_name()
    Image.fromarray(np.full((40, 60, 3), 200, dtype=np.uint8)).save(odd, format="PNG")
    fifo = make_fifo(image_folder / "pipe.png")
    listing = tmp_path / "list.txt"
    listing.write_bytes(b"\n".join([b"imgs/a.png", b"imgs/pipe.png", os.fsencode(odd), b"imgs/c.webp"]) + b"\n")
    weights = tmp_path / "w.pth"
    save_backbone(build_backbone("vit_small", patch_size=14, img_size=28, depth=1), weights)
    with deadline(60):
        for suffix in (".npz", ".safetensors"):
            out = tmp_path / f"feats{suffix}"
            with pytest.warns(UserWarning, match=r"skipped 1 unreadable files: .*pipe\.png"):
                assert main(["extract", "--weights", str(weights), "--images", str(listing), "--out", str(out),
                             "--size", "28", "--resize", "28", "--batch-size", "2"]) == 0
            feats = load_features(out)
            assert feats["paths"] == [str(image_folder / "a.png"), str(odd), str(image_folder / "c.webp")]
            assert feats["skipped"] == [str(fifo)]
            assert feats["cls_tokens"].shape == (3, 384)
            assert os.path.exists(feats["paths"][1])  # the stored name still names the file
    assert str(fifo) not in opened_paths
