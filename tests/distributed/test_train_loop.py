"""``dinolab train`` on two CPU ranks (gloo, FSDP2 and DDP): rank-0-only outputs, a SIGTERM on one rank stops
both at the same iteration with a DCP checkpoint, which one process resumes and consolidates."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest
import torch
from dist_harness import free_port, run_ranks

from dinolab.configs import load_config
from dinolab.distributed.checkpoint import consolidate_backbone
from dinolab.models.checkpoints import read_state_dict

TINY = [
    "student.embed_dim=32", "student.num_heads=2", "student.depth=2",
    "dino.head.n_prototypes=64", "dino.head.hidden_dim=32", "dino.head.bottleneck_dim=16",
    "ibot.head.n_prototypes=64", "ibot.head.hidden_dim=32", "ibot.head.bottleneck_dim=16",
    "crops.global_crops_size=16", "crops.local_crops_size=8", "crops.local_crops_number=2",
    "train.batch_size_per_gpu=4", "train.num_workers=0", "train.log_every=1", "train.knn_every=0",
    "train.checkpoint_every=0", "train.precision=fp32", "optim.epoch_length=3", "optim.epochs=2",
    "optim.warmup_epochs=1", "teacher.warmup_teacher_temp_epochs=1", "train.compile=false",
]
MODES = ("fsdp", "ddp")


def tiny_cfg(data: str, *extra: str):
    return load_config("cpu", [*TINY, *extra], base={"data": {"path": data, "eval_path": data}})


def interrupted_worker(rank: int, data: str, root: str, ports: list[int]) -> None:
    from dinolab.train import loop as loop_module

    real_step = loop_module.train_step

    def step_then_signal(*args, **kwargs):
        out = real_step(*args, **kwargs)
        if rank == 1 and args[4] == 1:  # only rank 1 is signalled, after its second step
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    loop_module.train_step = step_then_signal
    for mode, port in zip(MODES, ports):  # one process group per run
        os.environ["MASTER_PORT"] = str(port)
        summary = loop_module.train(tiny_cfg(data, f"train.distributed={mode}"), f"{root}/{mode}", progress=False)
        torch.save(summary, f"{root}/{mode}/summary_rank{rank}.pt")


@pytest.fixture(scope="module")
def interrupted_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (24, 20, 20, 3), dtype=np.uint8)
    y = np.arange(24) % 3
    x[y == 1, :, :, 0] = 250
    data = root / "data.npz"
    np.savez(data, x_train=x[:18], y_train=y[:18], x_test=x[18:], y_test=y[18:])
    run_ranks(interrupted_worker, 2, str(data), str(root), [free_port() for _ in MODES])
    return str(data), root


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("mode", MODES)
def test_sigterm_on_one_rank_stops_both_with_a_dcp_checkpoint(interrupted_runs, mode):
    _, root = interrupted_runs
    run = root / mode
    for rank in (0, 1):
        summary = torch.load(run / f"summary_rank{rank}.pt", weights_only=True)
        assert summary["interrupted"] == "SIGTERM" and summary["iterations"] == 2 and summary["world_size"] == 2
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["dcp_0000002"]
    # one writer: each iteration logged once, the losses averaged over the ranks; k-NN at start (rank 0)
    assert [(r["iteration"], "total" in r) for r in records(run)] == [(0, False), (1, True), (2, True)]
    assert (run / "teacher_backbone.safetensors").exists()


@pytest.mark.parametrize("mode", MODES)
def test_one_process_resumes_and_consolidates_the_two_rank_checkpoint(interrupted_runs, mode, tmp_path):
    from dinolab.train.loop import train

    data, root = interrupted_runs
    run = root / mode
    out = consolidate_backbone(run / "checkpoints" / "dcp_0000002", tmp_path / "teacher.safetensors")
    exported = read_state_dict(run / "teacher_backbone.safetensors")  # written by rank 0 at the stop
    consolidated = read_state_dict(out)
    assert sorted(consolidated) == sorted(exported) and "blocks.1.mlp.fc2.weight" in consolidated
    for key, value in exported.items():
        torch.testing.assert_close(consolidated[key], value, rtol=0, atol=0)

    summary = train(tiny_cfg(data, f"train.distributed={mode}"), run, progress=False)
    assert summary["iterations"] == 6 and summary["interrupted"] is None and summary["world_size"] == 1
    assert summary["knn_top1_init"] is not None  # carried over from the 2-rank run's checkpoint
    assert [r["iteration"] for r in records(run) if "total" in r] == [1, 2, 3, 4, 5, 6]
    assert np.isfinite([r["total"] for r in records(run) if "total" in r]).all()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["ckpt_0000006.pth", "dcp_0000002"]


def resume_worker(rank: int, data: str, root: str, ports: list[int]) -> None:
    from dinolab.train import loop as loop_module

    extra = ("student.drop_path_rate=0.4", "train.distributed=fsdp")  # each rank draws its own drop-path subsets
    runs = [("full", ()), ("split", ("train.max_iters=3",)), ("split", ())]
    for (name, more), port in zip(runs, ports):  # one process group per call
        os.environ["MASTER_PORT"] = str(port)
        loop_module.train(tiny_cfg(data, *extra, *more), f"{root}/{name}", progress=False)


def test_two_ranks_resume_on_two_ranks_bit_for_bit_with_drop_path(tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "data.npz"
    x = rng.integers(0, 255, (24, 20, 20, 3), dtype=np.uint8)
    np.savez(data, x_train=x[:18], y_train=np.arange(18) % 3, x_test=x[18:], y_test=np.arange(6) % 3)
    run_ranks(resume_worker, 2, str(data), str(tmp_path), [free_port() for _ in range(3)])
    fields = ("dino", "ibot", "koleo", "total")
    full, split = ({r["iteration"]: [r[k] for k in fields] for r in records(tmp_path / name) if "total" in r}
                   for name in ("full", "split"))
    assert sorted(full) == [1, 2, 3, 4, 5, 6]
    assert split == full
