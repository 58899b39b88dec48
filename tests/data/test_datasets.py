"""Datasets: formats, unreadable files, empty sources, labelled splits, per-key augmentation seeds."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dinolab.configs.schema import CropsConfig
from dinolab.data.augment import MultiCropAugmentation
from dinolab.data.datasets import (
    ArrayImages,
    ImageFiles,
    MultiCropDataset,
    open_dataset,
    open_labelled,
)


def _save(path: Path, value: int, size: tuple[int, int] = (12, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, value, value)).save(path)
    return path


def _truncated_jpeg(path: Path) -> Path:
    """A JPEG whose header opens but whose data stops half way (a common broken download)."""
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path, quality=95)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def _image_size(image: Image.Image) -> tuple[int, int]:
    return image.size  # module level, so spawn/forkserver workers can unpickle it


@pytest.fixture
def folder_with_bad_files(tmp_path: Path) -> Path:
    root = tmp_path / "imgs"
    _save(root / "a.png", 10)
    (root / "b_corrupt.jpg").write_bytes(b"this is not a jpeg")
    _save(root / "c.JPG", 30)
    _save(root / "sub" / "d.webp", 40)
    (root / "notes.txt").write_text("not an image, not listed")
    return root


def test_folder_is_recursive_and_any_case(folder_with_bad_files: Path) -> None:
    ds = open_dataset(folder_with_bad_files)
    assert isinstance(ds, ImageFiles)
    assert [p.name for p in ds.paths] == ["a.png", "b_corrupt.jpg", "c.JPG", "d.webp"]
    with pytest.warns(UserWarning, match="b_corrupt.jpg"):
        assert len(list(ds)) == 4  # iterable as a sequence: stops at the end


def test_corrupt_file_is_substituted_counted_and_named(folder_with_bad_files: Path) -> None:
    ds = open_dataset(folder_with_bad_files)
    with pytest.warns(UserWarning, match="b_corrupt.jpg"):
        image = ds[1]
    # The substitute is the next readable file in order, c.JPG (grey level 30).
    assert np.asarray(image)[0, 0].tolist() == [30, 30, 30]
    assert ds.num_skipped == 1
    assert ds.skipped_paths() == [str(folder_with_bad_files / "b_corrupt.jpg")]
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable images: .*b_corrupt.jpg"):
        ds.report_skipped()


def test_truncated_file_is_substituted(tmp_path: Path) -> None:
    _truncated_jpeg(tmp_path / "a.jpg")
    _save(tmp_path / "b.png", 77)
    ds = open_dataset(tmp_path)
    with pytest.warns(UserWarning, match="a.jpg"):
        assert np.asarray(ds[0])[0, 0, 0] == 77
    assert ds.num_skipped == 1


def test_verify_drops_unreadable_files_up_front(folder_with_bad_files: Path) -> None:
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable images: .*b_corrupt.jpg"):
        ds = open_dataset(folder_with_bad_files, verify=True)
    assert len(ds) == 3


def test_skips_found_in_dataloader_workers_reach_the_main_process(folder_with_bad_files: Path) -> None:
    ds = open_dataset(folder_with_bad_files)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=1, collate_fn=_image_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sizes = list(loader)
    assert len(sizes) == 4
    assert ds.num_skipped == 1
    assert ds.skipped_paths()[0].endswith("b_corrupt.jpg")


def test_only_bad_files_raise_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "x.png").write_bytes(b"junk")
    ds = open_dataset(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(OSError, match="unreadable"):
            ds[0]


def test_empty_folder_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "readme.md").write_text("no images here")
    with pytest.raises(ValueError, match=str(tmp_path)):
        open_dataset(tmp_path)


def test_missing_path_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope"):
        open_dataset(tmp_path / "nope")


def test_npz_rgb_and_images_key(tmp_path: Path) -> None:
    x = np.random.default_rng(0).integers(0, 256, (5, 6, 7, 3), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", x_train=x, y_train=np.arange(5))
    np.savez(tmp_path / "b.npz", images=x)
    for name in ("a.npz", "b.npz"):
        ds = open_dataset(tmp_path / name)
        assert isinstance(ds, ArrayImages) and len(ds) == 5
        np.testing.assert_array_equal(np.asarray(ds[3]), x[3])


def test_npz_greyscale_is_repeated_to_rgb(tmp_path: Path) -> None:
    x = np.random.default_rng(0).integers(0, 256, (4, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "g.npz", images=x)
    item = np.asarray(open_dataset(tmp_path / "g.npz")[2])
    assert item.shape == (8, 8, 3)
    for c in range(3):
        np.testing.assert_array_equal(item[..., c], x[2])


def test_npz_bad_content_is_a_clear_error(tmp_path: Path) -> None:
    np.savez(tmp_path / "k.npz", pixels=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="x_train.*images.*pixels"):
        open_dataset(tmp_path / "k.npz")
    np.savez(tmp_path / "f.npz", images=np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        open_dataset(tmp_path / "f.npz")
    np.savez(tmp_path / "e.npz", images=np.zeros((0, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="empty"):
        open_dataset(tmp_path / "e.npz")


def test_txt_list_and_manifests_resolve_relative_paths(tmp_path: Path) -> None:
    _save(tmp_path / "imgs" / "one.png", 1)
    _save(tmp_path / "imgs" / "two.png", 2)
    (tmp_path / "list.txt").write_text("# comment\nimgs/two.png\n\nimgs/one.png\n")
    records = [{"path": "imgs/one.png", "cluster": 3}, {"path": str(tmp_path / "imgs" / "two.png")}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    (tmp_path / "m.csv").write_text("path,score\nimgs/two.png,0.5\n")
    assert [np.asarray(open_dataset(tmp_path / "list.txt")[i])[0, 0, 0] for i in range(2)] == [2, 1]
    assert [np.asarray(open_dataset(tmp_path / "m.jsonl")[i])[0, 0, 0] for i in range(2)] == [1, 2]
    assert np.asarray(open_dataset(tmp_path / "m.csv")[0])[0, 0, 0] == 2


def test_manifest_without_path_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "m.jsonl").write_text('{"file": "a.png"}\n')
    with pytest.raises(ValueError, match="record 1 has no 'path'"):
        open_dataset(tmp_path / "m.jsonl")


def test_labelled_npz_with_and_without_test_split(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (12, 4, 4, 3), dtype=np.uint8)
    y = np.repeat(np.arange(3), 4)
    np.savez(tmp_path / "full.npz", x_train=x[:8], y_train=y[:8], x_test=x[8:], y_test=y[8:],
             x_val=x[:2], y_val=y[:2], class_names=np.array(["a", "b", "c"]))
    s = open_labelled(tmp_path / "full.npz")
    assert s.x_train.shape == (8, 4, 4, 3) and s.y_test.tolist() == [2, 2, 2, 2]
    assert s.x_val.shape == (2, 4, 4, 3) and s.class_names == ["a", "b", "c"]
    np.savez(tmp_path / "train_only.npz", x_train=x, y_train=y)
    s = open_labelled(tmp_path / "train_only.npz", test_fraction=0.25)
    assert np.bincount(s.y_test).tolist() == [1, 1, 1] and len(s.x_train) == 9
    np.savez(tmp_path / "bad.npz", x_train=x, y_train=y[:5])
    with pytest.raises(ValueError, match="one label per image"):
        open_labelled(tmp_path / "bad.npz")


def test_labelled_class_folders_single_and_split_layout(tmp_path: Path) -> None:
    for cls, value in (("cat", 10), ("dog", 20)):
        for i in range(4):
            _save(tmp_path / "single" / cls / f"{i}.png", value)
            _save(tmp_path / "layout" / ("train" if i < 3 else "test") / cls / f"{i}.png", value)
    (tmp_path / "single" / "dog" / "broken.png").write_bytes(b"junk")
    with pytest.warns(UserWarning, match="broken.png"):
        s = open_labelled(tmp_path / "single", test_fraction=0.25)
    assert s.class_names == ["cat", "dog"]
    assert len(s.x_train) + len(s.x_test) == 8 and np.bincount(s.y_test).tolist() == [1, 1]
    # Labels stay aligned with images after the unreadable file was dropped.
    for x, y in ((s.x_train, s.y_train), (s.x_test, s.y_test)):
        assert [np.asarray(x[i])[0, 0, 0] for i in range(len(x))] == [10 + 10 * int(v) for v in y]
    s = open_labelled(tmp_path / "layout")
    assert s.y_train.tolist() == [0, 0, 0, 1, 1, 1] and s.y_test.tolist() == [0, 1]


def test_builtin_name_and_none_open_the_embedded_set() -> None:
    assert len(open_dataset("builtin:digits")) == len(open_dataset(None)) == 1198
    with pytest.raises(ValueError, match="digits"):
        open_dataset("builtin:nope")


def test_multicrop_dataset_seeds_by_key() -> None:
    x = np.random.default_rng(0).integers(0, 256, (3, 20, 20, 3), dtype=np.uint8)
    aug = MultiCropAugmentation(CropsConfig(global_crops_size=8, local_crops_size=4, local_crops_number=2))
    ds = MultiCropDataset(ArrayImages(x, source="test"), aug, seed=5)
    a, b = ds[4], ds[4]
    crops = lambda out: out["global_crops"] + out["local_crops"]  # noqa: E731
    assert all(torch.equal(u, v) for u, v in zip(crops(a), crops(b)))
    # Key 4 and key 1 name the same image (4 % 3) on different draws: different crops.
    c = ds[1]
    assert not torch.equal(a["global_crops"][0], c["global_crops"][0])
    # A different dataset seed changes the crops of the same key.
    d = MultiCropDataset(ArrayImages(x, source="test"), aug, seed=6)[4]
    assert not torch.equal(a["global_crops"][0], d["global_crops"][0])
