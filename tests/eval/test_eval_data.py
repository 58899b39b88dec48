from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from dinolab.eval.data import load_classification, load_depth, load_retrieval, load_segmentation


def _images(n: int, h: int = 8, w: int = 8) -> np.ndarray:
    return np.zeros((n, h, w, 3), np.uint8)


@pytest.mark.parametrize(
    "arrays, message",
    [
        (dict(x_train=_images(4), y_train=np.zeros(4, int), x_test=_images(2)), "missing array 'y_test'"),
        (dict(x_train=_images(4), y_train=np.zeros(4, int)), "missing splits"),
        (dict(x_train=np.zeros((4, 8, 8, 3), np.float32), y_train=np.zeros(4, int), x_test=_images(2),
              y_test=np.zeros(2, int)), "x_train: images must be uint8 in [0, 255], got dtype float32"),
        (dict(x_train=_images(4), y_train=np.zeros(3, int), x_test=_images(2), y_test=np.zeros(2, int)),
         "4 images but 3 labels"),
        (dict(x_train=_images(4), y_train=np.array([0, 1, 2, 0]), x_test=_images(2), y_test=np.array([0, 3]),
              class_names=np.array(["a", "b", "c"])), "labels in 0..3, expected 0..2"),
        (dict(x_train=_images(2), y_train=np.array([0, -1]), x_test=_images(1), y_test=np.array([0])),
         "expected 0..0"),
    ],
)
def test_classification_npz_errors(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(ValueError) as err:
        load_classification(path)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_classification(tmp_path / "nope.npz")


def test_class_per_folder(tmp_path):
    for split, per_class in (("train", 3), ("test", 1)):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (10, 12), (i * 40, 0, 0)).save(tmp_path / split / cls / f"{i}.png")
    data = load_classification(tmp_path)
    assert data.class_names == ["cat", "dog"]
    assert data.split("train").labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert data.split("test").images[1].shape == (12, 10, 3)
    (tmp_path / "test" / "bird").mkdir()
    Image.new("RGB", (10, 12)).save(tmp_path / "test" / "bird" / "0.png")
    with pytest.raises(ValueError, match="class 'bird' does not exist"):
        load_classification(tmp_path)


def test_segmentation_npz_errors(tmp_path):
    masks = np.zeros((2, 8, 8), np.uint8)
    masks[0, 0, 0] = 7  # not a class of 3 and not the ignore index
    np.savez(tmp_path / "s.npz", x_train=_images(2), mask_train=masks, x_val=_images(2),
             mask_val=np.zeros((2, 8, 8), np.uint8), class_names=np.array(["a", "b", "c"]))
    with pytest.raises(ValueError, match="holds label 7, expected 0..2 or ignore_index 255"):
        load_segmentation(tmp_path / "s.npz")
    np.savez(tmp_path / "t.npz", x_train=_images(2), mask_train=np.zeros((2, 8, 9), np.uint8))
    with pytest.raises(ValueError, match=r"mask_train must be integer \[N, H, W\]"):
        load_segmentation(tmp_path / "t.npz")
    np.savez(tmp_path / "u.npz", x_train=_images(2), mask_train=np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="missing splits"):
        load_segmentation(tmp_path / "u.npz")


def test_segmentation_folders(tmp_path):
    for split in ("train", "val"):
        (tmp_path / split / "images").mkdir(parents=True)
        (tmp_path / split / "masks").mkdir(parents=True)
        Image.new("RGB", (6, 4)).save(tmp_path / split / "images" / "a.jpg")
        Image.fromarray(np.array([[0, 1, 2, 255, 0, 0]] * 4, np.uint8)).save(tmp_path / split / "masks" / "a.png")
    data = load_segmentation(tmp_path)
    assert data.num_classes == 3 and data.ignore_index == 255
    assert data.split("val").masks[0].shape == (4, 6)
    Image.new("RGB", (6, 4)).save(tmp_path / "train" / "images" / "b.jpg")
    with pytest.raises(ValueError, match="no mask with the same file stem"):
        load_segmentation(tmp_path)


def test_depth_formats_and_errors(tmp_path):
    d = np.ones((2, 8, 8), np.float32)
    np.savez(tmp_path / "groups.npz", x_indoor=_images(2), depth_indoor_m=d, x_kitti=_images(2), depth_kitti_m=d)
    data = load_depth(tmp_path / "groups.npz")
    assert set(data.groups) == {"indoor", "kitti"} and data.groups["indoor"].train is None
    np.savez(tmp_path / "split.npz", x_train=_images(2), depth_train=d, x_test=_images(2), depth_test=d)
    assert load_depth(tmp_path / "split.npz").groups["default"].train is not None
    np.savez(tmp_path / "neg.npz", x_a=_images(2), depth_a_m=-d)
    with pytest.raises(ValueError, match="NaN or negative depths"):
        load_depth(tmp_path / "neg.npz")
    np.savez(tmp_path / "shape.npz", x_a=_images(2), depth_a_m=np.ones((2, 8, 7), np.float32))
    with pytest.raises(ValueError, match=r"must be float \[N, H, W\]"):
        load_depth(tmp_path / "shape.npz")
    np.savez(tmp_path / "half.npz", x_train=_images(2), depth_train=d)
    with pytest.raises(ValueError, match="missing array 'x_test'"):
        load_depth(tmp_path / "half.npz")


def test_retrieval_json_reads_revisited_ground_truth(tmp_path):
    for name in ("q.png", "d0.png", "d1.png", "d2.png"):
        Image.new("RGB", (20, 10)).save(tmp_path / name)
    spec = {"queries": ["q.png"], "database": ["d0.png", "d1.png", "d2.png"],
            "gnd": [{"ok": [2], "hard": [0], "junk": [1], "bbx": [2, 1, 12, 9]}]}
    (tmp_path / "gnd.json").write_text(json.dumps(spec))
    data = load_retrieval(tmp_path / "gnd.json")
    g = data.gnd[0]
    assert g["easy"].tolist() == [2] and g["hard"].tolist() == [0] and g["junk"].tolist() == [1]
    assert data.queries[0].shape == (8, 10, 3)  # cropped to the query box
    spec["gnd"][0]["ok"] = [5]
    (tmp_path / "bad.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="outside 0..2"):
        load_retrieval(tmp_path / "bad.json")
