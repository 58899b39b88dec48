"""Embedded data: scikit-learn digits split and upscaled, sample photos."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits

from dinolab.data.builtin import load_builtin, sample_photos
from dinolab.data.datasets import open_labelled


def test_digits_split_is_stratified_complete_and_fixed() -> None:
    digits = load_digits()
    x_train, y_train, x_test, y_test = load_builtin("digits", image_size=8)
    class_counts = np.bincount(digits.target)
    assert np.bincount(y_test).tolist() == [round(c / 3) for c in class_counts]
    assert len(y_train) + len(y_test) == len(digits.target) == 1797
    # At native size the images are the originals (0..16 stretched to 0..255), each used once.
    originals = np.rint(digits.images * 255 / 16).astype(np.uint8)
    split = np.concatenate([x_train, x_test])
    assert split.shape == (1797, 8, 8, 3) and split.dtype == np.uint8
    assert (split[..., 0] == split[..., 2]).all()
    assert sorted(map(bytes, split[..., 0])) == sorted(map(bytes, originals))
    again = load_builtin("digits", image_size=8)
    assert np.array_equal(again[0], x_train) and np.array_equal(again[3], y_test)


def test_digits_upscaled() -> None:
    x_train, y_train, x_test, _ = load_builtin("digits", image_size=32)
    assert x_train.shape == (1198, 32, 32, 3) and x_test.shape == (599, 32, 32, 3)
    assert y_train.dtype == np.int64
    # Bicubic upscaling keeps the mean brightness of each image (up to clipping and rounding).
    small = load_builtin("digits", image_size=8)[0]
    assert np.abs(x_train.mean(axis=(1, 2, 3)) - small.mean(axis=(1, 2, 3))).max() < 4


def test_unknown_name_lists_the_available_sets() -> None:
    with pytest.raises(ValueError, match="available: digits"):
        load_builtin("mnist")


def test_open_labelled_none_is_the_builtin_split() -> None:
    s = open_labelled(None)
    ref = load_builtin("digits")
    assert np.array_equal(s.x_test, ref[2]) and np.array_equal(s.y_train, ref[1])


def test_sample_photos() -> None:
    photos = sample_photos()
    assert [(p.mode, p.size) for p in photos] == [("RGB", (640, 427))] * 2
