"""The one labelled-set reader: npz, class folders (split layout or one folder) and builtin, one validator."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dinolab.data.builtin import load_builtin
from dinolab.data.labelled import read_labelled
from dinolab.eval.data import load_classification


def test_npz_splits_names_and_the_one_validator(tmp_path: Path) -> None:
    grey = np.arange(6 * 4 * 4, dtype=np.int32).reshape(6, 4, 4) % 256  # integer greyscale [N, H, W]
    np.savez(tmp_path / "g.npz", x_train=grey[:4], y_train=np.array([0, 1, 1, 0]), x_val=grey[4:],
             y_val=np.array([1, 0]))
    data = read_labelled(tmp_path / "g.npz")
    x = data.split("train").images.array
    assert x.dtype == np.uint8 and x.shape == (4, 4, 4, 3) and np.array_equal(x[..., 2], grey[:4])
    assert data.class_names == ["0", "1"] and data.eval_split == "val"
    assert load_classification(tmp_path / "g.npz").split("val").labels.tolist() == [1, 0]
    np.savez(tmp_path / "f.npz", x_train=grey[:4].astype(np.float32), y_train=np.zeros(4, int))
    with pytest.raises(ValueError, match=r"f.npz:x_train: images must be uint8 in \[0, 255\], got dtype float32"):
        read_labelled(tmp_path / "f.npz")
    np.savez(tmp_path / "y.npz", x_train=grey[:4], y_train=np.zeros(4))
    with pytest.raises(ValueError, match="y_train must be a 1-D integer array"):
        read_labelled(tmp_path / "y.npz")


def test_class_folders_one_folder_or_split_layout_hidden_folders_ignored(tmp_path: Path) -> None:
    for layout in ("one", "split/train", "split/val"):
        for label, cls in enumerate(("cat", "dog")):
            (tmp_path / layout / cls).mkdir(parents=True)
            Image.new("RGB", (5, 3), (label * 100, 0, 0)).save(tmp_path / layout / cls / "a.png")
        (tmp_path / layout / ".cache").mkdir()
    one = read_labelled(tmp_path / "one")
    assert list(one.splits) == ["train"] and one.class_names == ["cat", "dog"]
    assert one.split("train").labels.tolist() == [0, 1] and one.split("train").images[1][0, 0].tolist() == [100, 0, 0]
    split = load_classification(tmp_path / "split")
    assert list(split.splits) == ["train", "val"] and split.split("val").labels.tolist() == [0, 1]
    with pytest.raises(ValueError, match="missing splits"):
        load_classification(tmp_path / "one")  # evaluation needs a val or test split


def test_builtin_is_the_fixed_split() -> None:
    data = read_labelled(None, image_size=16)
    x_train, y_train, x_test, y_test = load_builtin("digits", image_size=16)
    assert np.array_equal(data.split("train").images.array, x_train)
    assert np.array_equal(data.split("test").labels, y_test)
    assert data.class_names == [str(i) for i in range(10)] and data.source == "builtin:digits"
