"""Odd files: 16-bit / float images, FIFOs and devices, undecodable names, decompression bombs."""

from __future__ import annotations

import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dinolab.data.datasets import open_dataset
from dinolab.data.images import (
    UnreadableImageError,
    display_path,
    list_images,
    load_rgb,
    read_path_list,
    resolve_image_source,
    try_load_rgb,
)


def png16_grey(values: np.ndarray) -> bytes:
    """A 16-bit greyscale PNG written by hand (IHDR bit depth 16, colour type 0, big-endian samples)."""
    h, w = values.shape
    raw = b"".join(b"\x00" + values[r].astype(">u2").tobytes() for r in range(h))  # filter 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _save(path: Path, value: int, size: tuple[int, int] = (6, 5)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, value, value)).save(path, format="PNG")
    return path


# ------------------------------------------------------------------------------------------ 16-bit / float


def test_16bit_png_gradient_is_scaled_by_the_dtype_range(tmp_path):
    # 8-bit value = round(v * 255 / 65535) = round(v / 257), worked out by hand:
    #   0 -> 0;  128 / 257 = 0.498 -> 0;  129 / 257 = 0.502 -> 1;  257 -> 1;  1000 / 257 = 3.89 -> 4;
    #   32767 / 257 = 127.498 -> 127;  32768 / 257 = 127.502 -> 128;  257 * 200 -> 200;  65535 -> 255
    values = np.array([[0, 128, 129, 257, 1000, 32767, 32768, 51400, 65535]], dtype=np.uint16)
    expected = [0, 0, 1, 1, 4, 127, 128, 200, 255]
    path = tmp_path / "grad16.png"
    path.write_bytes(png16_grey(np.repeat(values, 2, axis=0)))
    with Image.open(path) as im:
        assert im.mode.startswith("I")  # what Pillow hands over: plain convert("RGB") would clip it
    rgb = np.asarray(load_rgb(path))
    assert rgb.shape == (2, 9, 3) and rgb.dtype == np.uint8
    for c in range(3):
        assert rgb[0, :, c].tolist() == expected
        assert rgb[1, :, c].tolist() == expected


def test_16bit_photo_is_not_white(tmp_path):
    """A mid-grey 16-bit image (the issue's "99.5% white") comes out mid-grey in the readers too."""
    path = tmp_path / "grey16.png"
    path.write_bytes(png16_grey(np.full((8, 8), 128 * 257, dtype=np.uint16)))  # 8-bit 128 stored as 16-bit
    assert np.asarray(load_rgb(path))[0, 0].tolist() == [128, 128, 128]
    ds = open_dataset(path)
    assert np.asarray(ds[0])[4, 4].tolist() == [128, 128, 128]


def test_32bit_integer_image_outside_16_bits_is_stretched_min_to_max(tmp_path):
    # min -100 -> 0, max 1000 -> 255: (v + 100) * 255 / 1100; 0 -> 23.18 -> 23, 100 -> 46.36 -> 46
    path = tmp_path / "int32.tif"
    Image.fromarray(np.array([[-100, 0, 100, 1000]], dtype=np.int32)).save(path)
    assert np.asarray(load_rgb(path))[0, :, 0].tolist() == [0, 23, 46, 255]


def test_32bit_integer_image_within_16_bits_uses_the_16bit_scale(tmp_path):
    path = tmp_path / "int32_small.tif"
    Image.fromarray(np.array([[0, 257 * 10, 65535]], dtype=np.int32)).save(path)
    assert np.asarray(load_rgb(path))[0, :, 1].tolist() == [0, 10, 255]


def test_float_images_in_unit_range_and_outside_it(tmp_path):
    unit = tmp_path / "unit.tif"
    Image.fromarray(np.array([[0.0, 0.2, 0.6, 1.0]], dtype=np.float32)).save(unit)
    # 0.2 * 255 = 51, 0.6 * 255 = 153
    assert np.asarray(load_rgb(unit))[0, :, 2].tolist() == [0, 51, 153, 255]
    wide = tmp_path / "wide.tif"
    Image.fromarray(np.array([[-1.0, 0.0, 3.0]], dtype=np.float32)).save(wide)
    # min..max: (v + 1) * 255 / 4; 0 -> 63.75 -> 64
    assert np.asarray(load_rgb(wide))[0, :, 0].tolist() == [0, 64, 255]


# ------------------------------------------------------------------------------------ FIFOs and devices


def _fifo_folder(tmp_path: Path, make_fifo) -> Path:
    root = tmp_path / "imgs"
    _save(root / "a.png", 10)
    make_fifo(root / "b.png")  # a named pipe with an image suffix
    _save(root / "c.png", 30)
    return root


def test_fifo_in_a_folder_is_skipped_counted_and_not_opened(tmp_path, make_fifo, deadline, opened_paths):
    root = _fifo_folder(tmp_path, make_fifo)
    fifo = str(root / "b.png")
    assert [p.name for p in list_images(root)] == ["a.png", "c.png"]  # plain listings: regular files only
    with deadline(10):
        ds = open_dataset(root)
        with pytest.warns(UserWarning, match="b.png"):
            images = [np.asarray(ds[i])[0, 0, 0] for i in range(len(ds))]
    assert images == [10, 30, 30]  # the FIFO's slot gets the next readable image
    assert ds.num_skipped == 1 and ds.skipped_paths() == [fifo]
    assert fifo not in opened_paths


def test_fifo_and_device_in_a_txt_list_are_skipped_and_counted(tmp_path, make_fifo, deadline, opened_paths):
    root = _fifo_folder(tmp_path, make_fifo)
    listing = root / "list.txt"
    listing.write_text("a.png\nb.png\n/dev/null\nc.png\n")
    with deadline(10):
        ds = open_dataset(listing)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            images = [np.asarray(ds[i])[0, 0, 0] for i in range(len(ds))]
    assert images == [10, 30, 30, 30]
    assert ds.num_skipped == 2 and ds.skipped_paths() == [str(root / "b.png"), "/dev/null"]
    assert str(root / "b.png") not in opened_paths and "/dev/null" not in opened_paths


def test_verify_drops_a_fifo_without_opening_it_and_counts_it(tmp_path, make_fifo, deadline, opened_paths):
    root = _fifo_folder(tmp_path, make_fifo)
    with deadline(10):
        with pytest.warns(UserWarning, match=r"skipped 1 unreadable images: .*b\.png"):
            ds = open_dataset(root, verify=True)
    assert [p.name for p in ds.paths] == ["a.png", "c.png"]
    assert ds.num_skipped == 1 and ds.skipped_paths() == [str(root / "b.png")]
    assert str(root / "b.png") not in opened_paths


def test_load_rgb_names_the_kind_of_special_file(tmp_path, make_fifo, deadline):
    fifo = make_fifo(tmp_path / "pipe.jpg")
    with deadline(10):
        with pytest.raises(UnreadableImageError, match="pipe.jpg is a FIFO"):
            load_rgb(fifo)
        with pytest.raises(OSError, match="character device"):
            load_rgb("/dev/null")
        assert try_load_rgb(fifo) is None
    assert fifo in resolve_image_source(tmp_path)  # listed for the readers that skip and count


# ------------------------------------------------------------------------------------ undecodable names


def test_undecodable_file_name_works_in_the_dataset(tmp_path, bad_name):
    root = tmp_path / "imgs"
    bad = _save(root / bad_name(), 50)
    _save(root / "good.png", 60)
    assert os.fsencode(bad).endswith(b"/bad\xff.png")
    ds = open_dataset(root)
    assert sorted(np.asarray(ds[i])[0, 0, 0] for i in range(len(ds))) == [50, 60]
    assert ds.num_skipped == 0
    assert display_path(bad).endswith("bad\\xff.png")
    # in a .txt list (written as raw bytes, as a shell would)
    listing = tmp_path / "list.txt"
    listing.write_bytes(os.fsencode(bad) + b"\n")
    assert read_path_list(listing) == [bad]
    assert np.asarray(open_dataset(listing)[0])[0, 0, 0] == 50


def test_unreadable_file_with_undecodable_name_is_named_in_the_warning(tmp_path, bad_name):
    root = tmp_path / "imgs"
    (root).mkdir()
    (root / bad_name(b"broken\xfe", ".jpg")).write_bytes(b"not a jpeg")
    _save(root / "ok.png", 70)
    ds = open_dataset(root)
    with pytest.warns(UserWarning, match=r"broken\\xfe\.jpg"):
        assert np.asarray(ds[0])[0, 0, 0] == 70
    assert ds.num_skipped == 1
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable images: .*broken\\xfe\.jpg"):
        ds.report_skipped()


# ------------------------------------------------------------------------------------ decompression bombs


def test_decompression_bomb_is_unreadable_skipped_and_counted(tmp_path, monkeypatch):
    root = tmp_path / "imgs"
    _save(root / "a.png", 10)
    _save(root / "b_bomb.png", 20, size=(30, 30))  # 900 pixels > 2 x 100: PIL's DecompressionBombError
    _save(root / "c.png", 30)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(UnreadableImageError, match="decompression bomb"):
        load_rgb(root / "b_bomb.png")
    ds = open_dataset(root)
    with pytest.warns(UserWarning, match="b_bomb.png"):
        assert np.asarray(ds[1])[0, 0, 0] == 30
    assert ds.num_skipped == 1 and ds.skipped_paths() == [str(root / "b_bomb.png")]
    with pytest.warns(UserWarning, match="b_bomb.png"):
        verified = open_dataset(root, verify=True)
    assert len(verified) == 2 and verified.num_skipped == 1
