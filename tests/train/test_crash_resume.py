"""A run killed at any moment (``kill -9``, also in the middle of a checkpoint write) and restarted until it
finishes gives the same losses, bit for bit, as the uninterrupted run; damaged files do not block a resume.

The killed runs are subprocesses of ``python -c WORKER``: they train the same tiny config (drop path 0.4, a
checkpoint every iteration) and die either after a random delay or inside the N-th ``torch.save``, after
writing half of its bytes. ``DINOLAB_KILL_SEED`` picks other random moments.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dinolab.configs import load_config
from dinolab.train.loop import train
from tiny_run import TINY_RUN

OVERRIDES = [*TINY_RUN, "optim.epochs=3", "student.drop_path_rate=0.4", "train.checkpoint_every=1"]
LOSS_FIELDS = ("dino", "ibot", "koleo", "total")

WORKER = r"""
import os, signal, sys, threading, time
import torch
sys.path.insert(0, sys.argv[1])
from tiny_run import TINY_RUN  # noqa: F401 (the test passes the overrides)
from dinolab.configs import load_config
from dinolab.train.loop import train

data, run, mode, value = sys.argv[2], sys.argv[3], sys.argv[4], float(sys.argv[5])
overrides = sys.argv[6:]
if mode == "save":  # die inside the value-th torch.save, half of its bytes written
    real_save, calls = torch.save, [0]

    def dying_save(obj, f, *args, **kwargs):
        calls[0] += 1
        if calls[0] < value:
            return real_save(obj, f, *args, **kwargs)
        import io
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        with open(f, "wb") as out:
            out.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            out.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    torch.save = dying_save
elif mode == "time":  # die after value seconds of training
    threading.Timer(value, lambda: os.kill(os.getpid(), signal.SIGKILL)).start()
cfg = load_config("cpu", overrides, base={"data": {"path": data}})
t0 = time.perf_counter()
train(cfg, run, progress=False)
print(f"trained in {time.perf_counter() - t0:.2f} s")
os._exit(0)
"""


@pytest.fixture
def data(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (24, 20, 20, 3), dtype=np.uint8)
    path = tmp_path / "data.npz"
    np.savez(path, x_train=x)
    return str(path)


def losses(run: Path) -> dict[int, dict]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["iteration"]: {k: r[k] for k in LOSS_FIELDS} for r in records if "total" in r}


def launch(data: str, run: Path, mode: str, value: float) -> int:
    args = [sys.executable, "-c", WORKER, str(Path(__file__).parent), data, str(run), mode, str(value), *OVERRIDES]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    print(mode, value, done.returncode, done.stdout.strip()[-200:], done.stderr.strip()[-300:])
    return done.returncode


@pytest.mark.slow
def test_killed_at_random_moments_resumes_bit_for_bit(data, tmp_path):
    reference = tmp_path / "reference"  # in a subprocess too: the same thread count, the same float sums
    assert launch(data, reference, "none", 0.0) == 0
    expected = losses(reference)
    assert sorted(expected) == list(range(1, 10))

    seed = int(os.environ.get("DINOLAB_KILL_SEED", "0"))
    rng = np.random.default_rng(seed)
    run = tmp_path / "killed"
    # two kills inside checkpoint writes (the 1st and a later one), then random moments, then to the end
    plan = [("save", 1.0), ("time", float(rng.uniform(0.8, 2.4))), ("save", 3.0),
            ("time", float(rng.uniform(0.8, 2.4))), ("time", float(rng.uniform(0.8, 2.4))), ("none", 0.0)]
    codes = []
    for mode, value in plan:
        codes.append(launch(data, run, mode, value))
        if (run / "summary.json").exists():
            break
    assert codes[0] == -signal.SIGKILL, codes  # the first write really was interrupted
    assert (run / "summary.json").exists(), f"did not finish after {codes} (seed {seed})"
    assert losses(run) == expected, f"kill plan {plan} (DINOLAB_KILL_SEED={seed})"
    leftovers = [p.name for p in (run / "checkpoints").iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def tiny(data: str, *extra: str):
    return load_config("cpu", [*TINY_RUN, "optim.epochs=2", "student.drop_path_rate=0.4", *extra],
                       base={"data": {"path": data}})


def test_a_damaged_newest_checkpoint_falls_back_to_the_intact_one(data, tmp_path, capsys):
    reference = tmp_path / "reference"
    train(tiny(data), reference, progress=False)
    run = tmp_path / "run"
    train(tiny(data, "train.max_iters=4", "train.checkpoint_every=2"), run, progress=False)
    newest = run / "checkpoints" / "ckpt_0000004.pth"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated, as by a full disk or a bad copy
    (run / "checkpoints" / ".ckpt_0000005.pth.abc123.tmp").write_bytes(b"partial")  # a killed write's temp
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 5, "dino": 1.')  # a partial last line
    summary = train(tiny(data), run, progress=False)
    assert "ckpt_0000004.pth is damaged" in capsys.readouterr().err
    assert summary["iterations"] == 6
    assert losses(run) == losses(reference)  # resumed from iteration 2, exactly
    assert not (run / "checkpoints" / ".ckpt_0000005.pth.abc123.tmp").exists()
