"""End-to-end training behaviour on a tiny model: loss falls, exact resume, signals, NaN, export."""

import json
import os
import signal

import numpy as np
import pytest
import torch

from dinolab.cli import main
from dinolab.configs import load_config
from dinolab.models import build_backbone
from dinolab.train import loop as loop_module
from dinolab.train.loop import train
from dinolab.train.meta_arch import SSLMetaArch
from dinolab.utils import runtime
from tiny_run import TINY_RUN

TINY = [*TINY_RUN, "optim.epochs=2"]


@pytest.fixture
def data(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (24, 20, 20, 3), dtype=np.uint8)
    y = np.arange(24) % 3
    x[y == 1, :, :, 0] = 250  # three visibly different classes for k-NN
    x[y == 2, :, :, 2] = 250
    path = tmp_path / "data.npz"
    np.savez(path, x_train=x[:18], y_train=y[:18], x_test=x[18:], y_test=y[18:])
    return str(path)


def tiny_cfg(data, *extra):
    return load_config("cpu", [*TINY, *extra], base={"data": {"path": data}})


def losses_by_iteration(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["iteration"]: r["total"] for r in records if "total" in r}


LOSS_FIELDS = ("dino", "ibot", "koleo", "total")


def loss_records(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["iteration"]: {k: r[k] for k in LOSS_FIELDS if k in r} for r in records if "total" in r}


@pytest.mark.parametrize("packing", ["true", "false"])
def test_resume_gives_the_same_losses_as_an_uninterrupted_run(data, tmp_path, packing):
    # drop path on (every paper preset uses 0.3-0.4): its random subsets must continue the same stream
    extra = ("student.drop_path_rate=0.4", f"train.pack_crops={packing}")
    full = tmp_path / "full"
    train(tiny_cfg(data, *extra), full, progress=False)
    split = tmp_path / "split"
    first = train(tiny_cfg(data, *extra, "train.max_iters=3"), split, progress=False)
    assert first["iterations"] == 3 and (split / "checkpoints" / "ckpt_0000003.pth").exists()
    second = train(tiny_cfg(data, *extra), split, progress=False)
    assert second["iterations"] == 6
    a, b = loss_records(full), loss_records(split)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    assert a == b  # bit for bit, every term


def test_loss_falls_and_outputs_are_written(data, tmp_path):
    run = tmp_path / "run"
    summary = train(tiny_cfg(data, "optim.epochs=8", "optim.base_lr=3e-3", "train.checkpoint_every=4",
                             "train.keep_last=2"), run, progress=False)
    losses = losses_by_iteration(run)
    first, last = np.mean([losses[i] for i in (1, 2, 3)]), np.mean([losses[i] for i in (22, 23, 24)])
    assert last < first
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["ckpt_0000020.pth", "ckpt_0000024.pth"]
    for name in ("config.yaml", "summary.json", "loss_curves.png", "teacher_backbone.pth", "teacher_backbone.safetensors"):
        assert (run / name).exists(), name
    assert summary["iterations"] == 24 and summary["images_per_second"] > 0
    assert list((run / "tb").iterdir())  # TensorBoard events


def test_exported_teacher_loads_with_the_public_constructors(data, tmp_path):
    run = tmp_path / "run"
    cfg = tiny_cfg(data, "train.max_iters=2")
    train(cfg, run, progress=False)
    meta = SSLMetaArch.from_config(cfg)
    meta.load_state_dict(torch.load(run / "checkpoints" / "ckpt_0000002.pth", weights_only=True)["model"])
    exported = build_backbone("auto", weights=run / "teacher_backbone.safetensors").eval()
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(exported(x), meta.teacher.backbone.eval()(x))


def test_knn_before_and_after_is_reported(data, tmp_path):
    cfg = load_config("cpu", [*TINY, "optim.epochs=1"], base={"data": {"path": data, "eval_path": data}})
    summary = train(cfg, tmp_path / "run", progress=False)
    assert summary["knn_n_test"] == 6
    assert 0 <= summary["knn_top1_init"] <= 100 and 0 <= summary["knn_top1_final"] <= 100


def test_sigterm_writes_a_checkpoint_and_stops(data, tmp_path, monkeypatch):
    real_step = loop_module.train_step

    def step_then_signal(*args, **kwargs):
        out = real_step(*args, **kwargs)
        if args[4] == 1:  # iteration index 1: the second step
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(loop_module, "train_step", step_then_signal)
    summary = train(tiny_cfg(data), tmp_path / "run", progress=False)
    assert summary["interrupted"] == "SIGTERM" and summary["iterations"] == 2
    assert (tmp_path / "run" / "checkpoints" / "ckpt_0000002.pth").exists()


def test_nan_loss_stops_naming_iteration_and_term(data, tmp_path, monkeypatch):
    from dinolab.train import meta_arch

    calls = {"n": 0}

    def bad_koleo(x):
        calls["n"] += 1
        return torch.tensor(float("nan")) if calls["n"] > 4 else torch.zeros(())

    monkeypatch.setattr(meta_arch, "koleo_loss", bad_koleo)
    cfg = tiny_cfg(data, "train.checkpoint_every=1")
    with pytest.raises(FloatingPointError, match=r"'koleo' is nan at iteration 3"):
        train(cfg, tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "checkpoints" / "ckpt_0000002.pth").exists()  # the last good one stays
    assert not (tmp_path / "run" / "checkpoints" / "ckpt_0000003.pth").exists()  # counted from 1, as the logs


def test_resume_with_another_config_is_refused(data, tmp_path):
    train(tiny_cfg(data, "train.max_iters=1"), tmp_path / "run", progress=False)
    with pytest.raises(ValueError, match=r"another config \(optim.base_lr"):
        train(tiny_cfg(data, "optim.base_lr=0.5"), tmp_path / "run", progress=False)
    # how the same step runs may change (e.g. a machine without a C++ compiler): the run resumes
    summary = train(tiny_cfg(data, "train.max_iters=2", "train.keep_freed_memory=false", "train.varlen_attention=true"),
                    tmp_path / "run", progress=False)
    assert summary["iterations"] == 2


def test_bad_config_is_one_line_before_any_work(tmp_path, capsys):
    assert main(["train", "--output", str(tmp_path / "r"), "optim.no_such_key=1"]) == 2
    assert main(["train", "--output", str(tmp_path / "r"), "teacher.centering=mean"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "dinolab train: error: invalid config: Key 'no_such_key' not in 'OptimConfig'",
        "dinolab train: error: teacher.centering must be 'sinkhorn_knopp' or 'softmax', got 'mean'",
    ]
    assert not (tmp_path / "r").exists()


def test_ema_update_formula():
    cfg = load_config("cpu", TINY)
    meta = SSLMetaArch.from_config(cfg)
    with torch.no_grad():
        for p in meta.student.parameters():
            p.add_(1.0)
    t_before = [p.clone() for p in meta.teacher.parameters()]
    s = [p.clone() for p in meta.student.parameters()]
    meta.update_teacher(0.9)
    for t0, s0, t1 in zip(t_before, s, meta.teacher.parameters()):
        torch.testing.assert_close(t1, 0.9 * t0 + 0.1 * s0)


@pytest.mark.parametrize("option", ["train.compile", "train.varlen_attention"])
def test_execution_options_give_the_same_losses(data, tmp_path, option):
    # compiled blocks, or all packed crops in one variable-length attention call: the same computation
    for flag in ("false", "true"):
        train(tiny_cfg(data, f"{option}={flag}", "train.max_iters=2"), tmp_path / flag, progress=False)
    off, on = losses_by_iteration(tmp_path / "false"), losses_by_iteration(tmp_path / "true")
    assert sorted(off) == sorted(on) == [1, 2]
    for it in off:
        assert on[it] == pytest.approx(off[it], abs=1e-4)


def test_compile_without_a_cpp_compiler_is_one_clear_error(data, tmp_path, monkeypatch):
    monkeypatch.setattr(runtime, "cpp_compiler", lambda: None)
    with pytest.raises(ValueError, match="C\\+\\+ compiler"):
        train(tiny_cfg(data, "train.compile=true", "train.max_iters=1"), tmp_path / "r", progress=False)


def test_varlen_attention_reaches_the_students_attention():
    meta = SSLMetaArch.from_config(load_config("cpu", TINY + ["train.varlen_attention=true"]))
    assert all(blk.attn.varlen for blk in meta.student.backbone.blocks)


def test_no_resume_starts_from_scratch(data, tmp_path):
    run = tmp_path / "run"
    train(tiny_cfg(data, "train.checkpoint_every=1"), run, progress=False)  # 6 iterations, last 3 kept
    summary = train(tiny_cfg(data, "train.max_iters=2", "train.checkpoint_every=1"), run, resume=False, progress=False)
    assert summary["iterations"] == 2
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["ckpt_0000001.pth", "ckpt_0000002.pth"]
    assert sorted(losses_by_iteration(run)) == [1, 2]


def test_unreadable_files_are_skipped_and_counted_in_the_summary(tmp_path, write_images):
    folder = tmp_path / "images"
    write_images(folder, 14, 20, names="{i:02d}.png")
    for name in ("bad1.png", "bad2.jpg", "bad3.png"):  # not images
        (folder / name).write_text("not an image")
    cfg = load_config("cpu", [*TINY, "train.max_iters=3"], base={"data": {"path": str(folder)}})
    with pytest.warns(UserWarning, match="skipped 3 unreadable images"):
        summary = train(cfg, tmp_path / "run", progress=False)
    assert summary["skipped_files"] == 3  # 17 files, 3 x 8 draws: every file is met at least once
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["skipped_files"] == 3


def test_an_interrupted_run_exits_with_the_signals_code(data, tmp_path, monkeypatch, capsys):
    real_step = loop_module.train_step

    def step_then_signal(*args, **kwargs):
        out = real_step(*args, **kwargs)
        if args[4] == 0:
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(loop_module, "train_step", step_then_signal)
    code = main(["train", "--data", data, "--output", str(tmp_path / "run"), "--no-progress", *TINY])
    assert code == 128 + signal.SIGINT  # 130: a scheduler can tell it from a finished run (0)
    assert "interrupted by SIGINT after iteration 1" in capsys.readouterr().err
    assert (tmp_path / "run" / "checkpoints" / "ckpt_0000001.pth").exists()


def test_written_files_follow_the_umask(data, tmp_path):
    old = os.umask(0o022)
    try:
        train(tiny_cfg(data, "train.max_iters=1"), tmp_path / "run", progress=False)
    finally:
        os.umask(old)
    run = tmp_path / "run"
    for name in ("config.yaml", "summary.json", "teacher_backbone.pth", "teacher_backbone.safetensors",
                 "checkpoints/ckpt_0000001.pth", "loss_curves.png"):
        assert oct((run / name).stat().st_mode & 0o777) == oct(0o644), name


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bf16_only_where_the_cpu_multiplies_it_natively(monkeypatch, native):
    # an AVX2-only CPU emulates bf16 matmuls (measured 0.9 vs 102 GFLOP/s fp32): auto must not pick it there
    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: native)
    assert runtime.resolve_precision("auto", torch.device("cpu")) == ("bf16" if native else "fp32")
    assert runtime.resolve_precision("bf16", torch.device("cpu")) == "bf16"  # asked for: kept


def test_native_bf16_is_read_from_the_cpu_flags(monkeypatch, tmp_path):
    for flags, expected in (("fpu avx2 avx512f", False), ("fpu avx2 avx512f avx512_bf16", True), ("amx_bf16", True)):
        info = tmp_path / "cpuinfo"
        info.write_text(f"processor : 0\nflags : {flags}\n")
        monkeypatch.setattr(runtime, "Path", lambda _p, info=info: info)
        runtime.cpu_has_fast_bf16.cache_clear()
        assert runtime.cpu_has_fast_bf16() is expected, flags
    runtime.cpu_has_fast_bf16.cache_clear()
