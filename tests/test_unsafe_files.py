"""No entry point runs code from a file or folder a user points it at.

A malicious ``.pth`` (a pickle whose ``__reduce__`` calls ``os.system``) and a malicious ``dcp_*`` folder
(its ``.metadata``, and separately a non-tensor value inside a shard file) are fed to every command that
reads weights or checkpoints. Each must refuse with one line, exit code 2, and the payload must not run.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dinolab.cli import main

sys.path.insert(0, str(Path(__file__).parent / "train"))
from tiny_run import TINY_RUN  # noqa: E402


class Payload:
    """Unpickling this runs ``touch MARKER``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def marker(tmp_path):
    return tmp_path / "PWNED"


@pytest.fixture
def evil_pth(tmp_path, marker):
    path = tmp_path / "evil.pth"
    torch.save({"model": Payload(marker)}, path)
    return path


@pytest.fixture
def evil_dcp(tmp_path, marker):
    """A DCP folder whose .metadata runs the payload when unpickled with plain ``pickle``."""
    import pickle

    folder = tmp_path / "ckpt" / "checkpoints" / "dcp_0000001"
    folder.mkdir(parents=True)
    (folder / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    torch.save({"iteration": 1}, folder / "train_state.pth")
    return folder


@pytest.fixture
def images(tmp_path, write_images):
    write_images(tmp_path / "images", 4, 28)
    return tmp_path / "images"


def tiny_data(tmp_path) -> Path:
    x = np.random.default_rng(0).integers(0, 255, (24, 20, 20, 3), dtype=np.uint8)
    path = tmp_path / "data.npz"
    np.savez(path, x_train=x[:18], y_train=np.arange(18) % 3, x_test=x[18:], y_test=np.arange(6) % 3)
    return path


def commands(weights: Path, images: Path, tmp_path: Path) -> dict[str, list[str]]:
    data = tiny_data(tmp_path)
    train = ["train", "--data", str(data), "--output", str(tmp_path / "out"), *TINY_RUN, "train.max_iters=1"]
    return {
        "train --init-from": [*train, "--init-from", str(weights)],
        "train --distill-from": ["train", "--preset", "distill_vits14", "--distill-from", str(weights),
                                 "--data", str(data), "--output", str(tmp_path / "out2")],
        "train --high-res": ["train", "--high-res", str(weights), "--data", str(data), "--output", str(tmp_path / "o3")],
        "extract": ["extract", "--weights", str(weights), "--images", str(images), "--out", str(tmp_path / "f.npz")],
        "convert": ["convert", str(weights), str(tmp_path / "c.safetensors")],
        "eval knn": ["eval", "knn", "--arch", "vits14", "--weights", str(weights), "--data", str(data),
                     "--out", str(tmp_path / "r.json")],
        "viz pca": ["viz", "pca", str(images / "0.png"), "--weights", str(weights), "--out", str(tmp_path / "p.png")],
        "serve": ["serve", "--root", str(images), "--weights", str(weights), "--port", "0"],
        "curate": ["curate", "--pool", str(images), "--seeds", f"a={images}", "--out", str(tmp_path / "cur"),
                   "--weights", str(weights)],
    }


def assert_refused(argv, capsys, marker):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert not marker.exists(), f"{argv[0]} ran the payload"
    assert code == 2, (argv, code, err)
    errors = [line for line in err if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in "\n".join(err), err


ENTRY_POINTS = ["train --init-from", "train --distill-from", "train --high-res", "extract", "convert", "eval knn",
                "viz pca", "serve", "curate"]


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_a_malicious_pth_is_refused_everywhere(entry, evil_pth, images, tmp_path, capsys, marker):
    assert_refused(commands(evil_pth, images, tmp_path)[entry], capsys, marker)


@pytest.mark.parametrize("entry", ["train --init-from", "train --distill-from", "train --high-res"])
def test_a_malicious_dcp_folder_is_refused_everywhere(entry, evil_dcp, images, tmp_path, capsys, marker):
    assert_refused(commands(evil_dcp, images, tmp_path)[entry], capsys, marker)


def test_consolidating_a_malicious_dcp_folder_is_refused(evil_dcp, tmp_path, marker):
    from dinolab.distributed.checkpoint import consolidate_backbone

    with pytest.raises(ValueError, match=r"not a safe checkpoint: refuses to load posix.system"):
        consolidate_backbone(evil_dcp, tmp_path / "b.safetensors")
    assert not marker.exists()


def test_resuming_a_run_with_a_malicious_checkpoint_is_refused(tmp_path, capsys, marker, evil_pth):
    data = tiny_data(tmp_path)
    run = tmp_path / "run"
    argv = ["train", "--data", str(data), "--output", str(run), *TINY_RUN, "train.max_iters=1"]
    assert main(argv) == 0
    capsys.readouterr()
    os.replace(evil_pth, run / "checkpoints" / "ckpt_0000001.pth")
    assert_refused(argv, capsys, marker)
    (run / "checkpoints" / "ckpt_0000001.pth").unlink()
    dcp = run / "checkpoints" / "dcp_0000001"
    dcp.mkdir()
    import pickle

    (dcp / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    torch.save({"iteration": 1}, dcp / "train_state.pth")
    assert_refused(argv, capsys, marker)


def test_a_pickled_value_inside_a_dcp_shard_is_refused(tmp_path, marker):
    """DCP stores non-tensor values as pickles inside its shard files; loading them must not run them."""
    import torch.distributed.checkpoint as dcp

    from dinolab.distributed.checkpoint import read_dcp_tensors, _dcp_load

    folder = tmp_path / "dcp_0000001"
    dcp.save({"model.w": torch.ones(2), "extra": Payload(marker)}, checkpoint_id=str(folder), no_dist=True)
    assert read_dcp_tensors(folder, "model.")["w"].tolist() == [1.0, 1.0]  # tensors alone: fine
    state = {"model.w": torch.zeros(2), "extra": None}
    with pytest.raises(ValueError, match="not a safe checkpoint: extra: refused a pickled object"):
        _dcp_load(state, folder, no_dist=True)
    assert not marker.exists()
