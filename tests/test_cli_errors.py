"""Every user error is one line ``dinolab CMD: error: ...`` naming the input, exit code 2, no traceback,
printed before any work (no model built, no run folder made, no output written)."""

from __future__ import annotations

import errno
import pickle
import socket

import numpy as np
import pytest
from PIL import Image

import dinolab.utils.io
import dinolab.models
from dinolab.cli import main
from dinolab.configs.schema import load_config
from dinolab.models import build_backbone
from dinolab.models.checkpoints import save_backbone


def one_error_line(capsys, command: str, *names: str) -> str:
    """The single stderr line of a refused command; it names every ``names``; no traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith(f"dinolab {command}: error: "), lines[0]
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a backbone is built (the error must come before any work)."""

    def refuse(*args, **kwargs):
        raise AssertionError("a backbone was built before the input was checked")

    monkeypatch.setattr(dinolab.models, "build_backbone", refuse)


@pytest.fixture
def images(tmp_path, write_images):
    write_images(tmp_path / "imgs", 4, 32)
    return tmp_path / "imgs"


@pytest.fixture
def missing_list(tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text("gone/a.png\ngone/b.png\n# a comment\ngone/c.png\n")
    return listing


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "w.pth"
    save_backbone(build_backbone("vit_small", patch_size=14, img_size=28, depth=1), path)
    return path


# ---------------------------------------------------------------- 1, 11: train --output and the run folder
def test_train_output_is_a_file(tmp_path, capsys):
    target = tmp_path / "afile"
    target.write_text("keep me")
    assert main(["train", "--output", str(target)]) == 2
    one_error_line(capsys, "train", str(target), "--output")
    assert main(["train", "--output", str(target / "sub")]) == 2
    one_error_line(capsys, "train", str(target / "sub"), "is a file")
    assert target.read_text() == "keep me"


@pytest.mark.parametrize("args", [
    ["optim.base_lr=abc"],
    ["--data", "{tmp}/no_such_data"],
    ["--data", "{tmp}/list.txt"],
    ["--eval-data", "{tmp}/no_such_eval"],
    ["train.init_from={tmp}/no_such.pth"],
    ["student.pretrained_weights={tmp}/no_such.pth"],
    ["train.precision=fp16", "train.device=cpu"],
])
def test_failed_validation_leaves_no_run_folder(tmp_path, missing_list, capsys, args):
    run = tmp_path / "runs" / "new"
    assert main(["train", "--output", str(run), *[a.format(tmp=tmp_path) for a in args]]) == 2
    one_error_line(capsys, "train")
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------- 2: curate --out
def test_curate_out_is_a_file(tmp_path, images, capsys):
    target = tmp_path / "afile"
    target.write_text("")
    assert main(["curate", "--pool", str(images), "--seeds", f"a={images}", "--out", str(target)]) == 2
    one_error_line(capsys, "curate", str(target), "--out")


def test_curate_list_without_any_existing_file(tmp_path, missing_list, capsys):
    out = tmp_path / "cur"
    assert main(["curate", "--pool", str(missing_list), "--seeds", f"a={missing_list}", "--out", str(out)]) == 2
    one_error_line(capsys, "curate", str(missing_list), "3 files", "none exists", "a.png")
    assert not out.exists()


# ---------------------------------------------------------------- 3: lists whose files are all missing
def test_train_list_without_any_existing_file(tmp_path, missing_list, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", str(missing_list), "--output", str(run)]) == 2
    one_error_line(capsys, "train", str(missing_list), "3 files", "none exists", str(tmp_path / "gone" / "a.png"))
    assert not run.exists()


def test_extract_list_without_any_existing_file(tmp_path, missing_list, no_model, capsys):
    out = tmp_path / "f.npz"
    assert main(["extract", "--images", str(missing_list), "--out", str(out)]) == 2
    one_error_line(capsys, "extract", str(missing_list), "3 files", "none exists", "a.png")
    assert not out.exists()


# ---------------------------------------------------------------- 4: viz on a file that is not an image
@pytest.mark.parametrize("what", ["pca", "attention"])
def test_viz_on_a_text_file(tmp_path, monkeypatch, capsys, what):
    import dinolab.viz.cli as viz_cli

    monkeypatch.setattr(viz_cli, "resolve_backbone", lambda *a, **k: pytest.fail("model loaded before the check"))
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    out = tmp_path / "out.png"
    assert main(["viz", what, str(notes), "--out", str(out)]) == 2
    one_error_line(capsys, "viz", str(notes), "not an image")
    assert not out.exists()


def test_viz_match_on_a_folder(tmp_path, images, monkeypatch, capsys):
    import dinolab.viz.cli as viz_cli

    monkeypatch.setattr(viz_cli, "resolve_backbone", lambda *a, **k: pytest.fail("model loaded before the check"))
    assert main(["viz", "match", str(images / "0.png"), str(images), "--out", str(tmp_path / "m.png")]) == 2
    one_error_line(capsys, "viz", str(images), "folder")


# ---------------------------------------------------------------- 5: serve on a busy port
def test_serve_on_a_busy_port(tmp_path, monkeypatch, capsys):
    import dinolab.viz.cli as viz_cli

    monkeypatch.setattr(viz_cli, "resolve_backbone", lambda *a, **k: pytest.fail("model loaded before the port check"))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--root", str(tmp_path), "--port", str(port)]) == 2
    one_error_line(capsys, "serve", str(port), "already in use", "--port")


def test_serve_bind_race_is_one_line(tmp_path, monkeypatch, capsys):
    import dinolab.viz.cli as viz_cli

    def taken(cfg, model):
        raise OSError(errno.EADDRINUSE, "Address already in use")

    from dinolab.models import build_backbone
    from dinolab.models.resolve import ResolvedBackbone

    tiny = build_backbone("vit_small", patch_size=14, embed_dim=32, depth=1, num_heads=2, img_size=28)
    monkeypatch.setattr(viz_cli, "resolve_backbone", lambda *a, **k: ResolvedBackbone(tiny, 28, {}))
    monkeypatch.setattr(viz_cli, "serve", taken)
    assert main(["serve", "--root", str(tmp_path), "--port", "0"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("dinolab: no --weights or --run given")  # the model was built: the bind came after
    assert err[1:] == ["dinolab serve: error: port 0 on 127.0.0.1 is already in use: "
                       "pick another with --port (--port 0: any free port)"]


# ---------------------------------------------------------------- 6: YAML with a Python tag
def test_preset_with_a_python_tag(tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.yaml"
    evil.write_text(f'optim:\n  base_lr: !!python/object/apply:os.system ["touch {marker}"]\n')
    assert main(["train", "--preset", str(evil), "--output", str(tmp_path / "run")]) == 2
    one_error_line(capsys, "train", str(evil), "!!python/object/apply:os.system", "line 2")
    assert not marker.exists() and not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="not valid YAML"):
        (tmp_path / "bad.yaml").write_text("optim: [1\n")
        load_config(str(tmp_path / "bad.yaml"))


# ---------------------------------------------------------------- 7: disk full
@pytest.mark.parametrize("failure", [
    OSError(errno.ENOSPC, "No space left on device"),
    RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file data/0: "
                 "file write failed"),
])
def test_disk_full_names_the_destination(tmp_path, tiny_weights, monkeypatch, capsys, failure):
    def full(obj, f, *args, **kwargs):
        open(f, "wb").write(b"partial")
        raise failure

    monkeypatch.setattr(dinolab.utils.io.torch, "save", full)
    out = tmp_path / "out" / "converted.pth"
    assert main(["convert", str(tiny_weights), str(out)]) == 2
    line = one_error_line(capsys, "convert", f"no space left on device writing {out}")
    assert line.endswith(str(out))
    assert list(out.parent.iterdir()) == []  # neither the destination nor a temporary file


def test_disk_full_outside_atomic_writes_is_one_line(tmp_path, monkeypatch, capsys):
    import dinolab.models.convert as convert_module

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x.log"))

    monkeypatch.setattr(convert_module, "convert", full)
    assert main(["convert", "a.pth", "b.pth"]) == 2
    one_error_line(capsys, "convert", f"no space left on device writing {tmp_path / 'x.log'}")


def test_a_truncated_checkpoint_is_no_full_disk():
    read = RuntimeError("[enforce fail at inline_container.cc:326] . PytorchStreamReader failed reading zip archive: "
                        "failed finding central directory")
    assert not dinolab.utils.io.is_disk_full(read)
    assert dinolab.utils.io.is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))


def test_atomic_path_keeps_other_errors(tmp_path):
    with pytest.raises(OSError) as info:
        with dinolab.utils.io.atomic_path(tmp_path / "f.bin"):
            raise OSError(errno.EIO, "I/O error")
    assert info.value.errno == errno.EIO
    with pytest.raises(OSError) as info:
        with dinolab.utils.io.atomic_path(tmp_path / "f.bin"):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "f.bin")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- 8: weights that are not weights
@pytest.mark.parametrize("content", [b"in the notes\n", b"hello world", b"", b"PK\x03\x04junk"])
def test_extract_weights_not_a_weights_file(tmp_path, images, capsys, content):
    notes = tmp_path / "notes.txt"
    notes.write_bytes(content)
    assert main(["extract", "--weights", str(notes), "--images", str(images), "--out", str(tmp_path / "f.npz")]) == 2
    one_error_line(capsys, "extract", f"{notes} is not a weights file", ".pth", ".safetensors")


def test_weights_holding_python_objects(tmp_path, images, capsys):
    import torch

    unsafe = tmp_path / "unsafe.pth"
    torch.save({"a": np.zeros(3)}, unsafe)
    assert main(["extract", "--weights", str(unsafe), "--images", str(images), "--out", str(tmp_path / "f.npz")]) == 2
    one_error_line(capsys, "extract", str(unsafe), "Unsupported global")


def test_unpickling_error_is_its_reason_only(monkeypatch, capsys):
    import dinolab.models.convert as convert_module

    message = ("Weights only load failed. In PyTorch 2.6, we changed the default value of the `weights_only` ...\n"
               "Please file an issue ... WeightsUnpickler error: \n\nUnsupported operand 105\n\n"
               "Check the documentation of torch.load to learn more")

    def unsafe(*args, **kwargs):
        raise pickle.UnpicklingError(message)

    monkeypatch.setattr(convert_module, "convert", unsafe)
    assert main(["convert", "a.pth", "b.pth"]) == 2
    line = one_error_line(capsys, "convert", "Unsupported operand 105")
    assert "PyTorch 2.6" not in line
    monkeypatch.setattr(convert_module, "convert", lambda *a, **k: (_ for _ in ()).throw(pickle.UnpicklingError("bad\nmore")))
    assert main(["convert", "a.pth", "b.pth"]) == 2
    assert "more" not in one_error_line(capsys, "convert", "bad")


def test_permission_denied_names_the_path(tmp_path, monkeypatch, capsys):
    import dinolab.models.convert as convert_module

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", "/root/out.pth")

    monkeypatch.setattr(convert_module, "convert", denied)
    assert main(["convert", "a.pth", "b.pth"]) == 2
    one_error_line(capsys, "convert", "Permission denied: /root/out.pth")


def test_convert_of_a_text_file(tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("hello world")
    assert main(["convert", str(notes), str(tmp_path / "o.pth")]) == 2
    one_error_line(capsys, "convert", f"{notes} is not a weights file")


# ---------------------------------------------------------------- 9: extract --out suffix first
@pytest.mark.parametrize("name", ["x.csv", "x.NPZ", "x"])
def test_extract_out_suffix_before_work(tmp_path, images, no_model, capsys, name):
    out = tmp_path / name
    assert main(["extract", "--images", str(images), "--out", str(out)]) == 2
    one_error_line(capsys, "extract", str(out), ".npz or .safetensors")
    assert not out.exists()


def test_extract_out_below_a_file(tmp_path, images, no_model, capsys):
    (tmp_path / "afile").write_text("")
    out = tmp_path / "afile" / "f.npz"
    assert main(["extract", "--images", str(images), "--out", str(out)]) == 2
    one_error_line(capsys, "extract", str(out), "is a file")


# ---------------------------------------------------------------- 10: a batch larger than the data set
def test_batch_larger_than_the_folder(tmp_path, images, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", str(images), "--output", str(run), "train.batch_size_per_gpu=100000"]) == 2
    one_error_line(capsys, "train", "train.batch_size_per_gpu=100000", "4 images", str(images), "at most 4")
    assert not run.exists()


def test_batch_larger_than_the_npz(tmp_path, capsys, monkeypatch):
    import dinolab.data.datasets as datasets

    data = tmp_path / "d.npz"
    np.savez(data, x_train=np.zeros((5, 8, 8, 3), np.uint8))
    monkeypatch.setattr(datasets, "open_dataset", lambda *a, **k: pytest.fail("the npz was loaded to count it"))
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--output", str(run), "train.batch_size_per_gpu=6"]) == 2
    one_error_line(capsys, "train", "train.batch_size_per_gpu=6", "5 images", str(data))
    assert not run.exists()


def test_batch_larger_than_the_shards_under_torchrun(tmp_path, images, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", "--data", str(images), "--output", str(tmp_path / "run"), "train.batch_size_per_gpu=3"]) == 2
    one_error_line(capsys, "train", "train.batch_size_per_gpu=3 x 2 processes", "at most 2")


# ---------------------------------------------------------------- non-finite config values
@pytest.mark.parametrize("override,key", [
    ("optim.base_lr=inf", "optim.base_lr"),
    ("optim.base_lr=nan", "optim.base_lr"),
    ("dino.loss_weight=-inf", "dino.loss_weight"),
    ("ibot.mask_ratio_min_max=[0.1,.inf]", "ibot.mask_ratio_min_max[1]"),
])
def test_non_finite_values_are_refused(tmp_path, capsys, override, key):
    run = tmp_path / "run"
    assert main(["train", "--output", str(run), override]) == 2
    one_error_line(capsys, "train", f"{key} must be a finite number")
    assert not run.exists()
