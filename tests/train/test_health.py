"""Training health monitor (ln K flags, collapse) and the loss-curve figure."""

import json
import math
import warnings

import matplotlib
import numpy as np
import pytest

from dinolab.configs import load_config
from dinolab.train.health import health_flags
from dinolab.train.plots import plot_run
from tiny_run import TINY_RUN


def _cfg(*overrides):
    return load_config("cpu", ["dino.head.n_prototypes=256", "ibot.head.n_prototypes=128",
                               "train.batch_size_per_gpu=8", "ibot.mask_sample_probability=0.5", *overrides])


def _records(n, dino, ibot, koleo=lambda i: -0.2):
    return [{"iteration": i, "dino": dino(i), "ibot": ibot(i), "koleo": koleo(i), "lr": 1e-3,
             "total": dino(i) + ibot(i) + koleo(i)} for i in range(1, n + 1)]


def test_monitor_flags_a_term_stuck_at_ln_k_and_not_a_learning_one():
    cfg = _cfg()
    ln_dino, ln_ibot = math.log(256), math.log(128)
    ibot_uniform = ln_ibot * int(16 * 0.5) / 16  # 8 of the 16 global crops masked: the others count 0
    stuck = health_flags(_records(300, lambda i: ln_dino, lambda i: ibot_uniform), cfg)
    assert stuck["dino_at_uniform"] and stuck["ibot_at_uniform"] and not stuck["collapse"]
    assert len(stuck["messages"]) == 2
    assert "ln 256" in stuck["messages"][0] and "dino.head.n_prototypes=64" in stuck["messages"][0]
    assert "warm-up" in stuck["messages"][0]
    assert "teacher.teacher_temp=0.02" in stuck["messages"][0]  # the cpu preset's 0.04, halved
    assert "crops.solarize_p=0" in stuck["messages"][0]
    warmer = health_flags(_records(300, lambda i: ln_dino, lambda i: ibot_uniform), _cfg("teacher.teacher_temp=0.07"))
    assert "teacher.teacher_temp=0.035" in warmer["messages"][0]
    sharpest = health_flags(_records(300, lambda i: ln_dino, lambda i: ibot_uniform),
                            _cfg("teacher.teacher_temp=0.02", "teacher.warmup_teacher_temp=0.02"))
    assert "teacher.teacher_temp" not in sharpest["messages"][0]  # already at the sharpest suggested
    json.dumps(stuck)  # goes into summary.json as is

    learning = health_flags(_records(300, lambda i: ln_dino * (1 - 0.5 * i / 300),
                                     lambda i: ibot_uniform * (1 - 0.3 * i / 300)), cfg)
    assert not learning["dino_at_uniform"] and not learning["ibot_at_uniform"] and learning["messages"] == []
    # at ln K early, learning in the second half: not stuck
    late = health_flags(_records(300, lambda i: ln_dino if i < 150 else 0.8 * ln_dino, lambda i: 1.0), cfg)
    assert not late["dino_at_uniform"]


def test_monitor_flags_collapsed_class_tokens_from_the_koleo_term():
    cfg = _cfg()
    w = cfg.dino.koleo_loss_weight
    collapsed = -2 * w * math.log(1e-6)  # two chunks, nearest-neighbour distance 1e-6
    flags = health_flags(_records(20, lambda i: 2.0, lambda i: 1.0, lambda i: collapsed), cfg)
    assert flags["collapse"] and flags["cls_nn_distance"] == pytest.approx(1e-6)
    assert not health_flags(_records(20, lambda i: 2.0, lambda i: 1.0), cfg)["collapse"]
    assert health_flags([], cfg)["messages"] == []


@pytest.mark.parametrize("n", [0, 1, 50])
def test_loss_plot_writes_a_png_without_warnings_or_backend_change(tmp_path, n):
    cfg = _cfg()
    records = _records(n, lambda i: math.log(256) - i / 100, lambda i: 2.0)
    if n:
        records.append({"iteration": n, "knn_top1": 40.0, "knn_n_test": 10})
    backend = matplotlib.get_backend()
    path = tmp_path / "loss_curves.png"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plot_run(records, path, cfg)
    assert matplotlib.get_backend() == backend
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_tiny_run_has_health_in_its_summary(tmp_path, capsys):
    from dinolab.train.loop import train

    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (24, 20, 20, 3), dtype=np.uint8)
    data = tmp_path / "data.npz"
    np.savez(data, x_train=x[:18], y_train=np.arange(18) % 3, x_test=x[18:], y_test=np.arange(6) % 3)
    cfg = load_config("cpu", [*TINY_RUN, "optim.epochs=1"], base={"data": {"path": str(data)}})
    summary = train(cfg, tmp_path / "run", progress=False)
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["health"] == summary["health"]
    assert {"dino_at_uniform", "ibot_at_uniform", "collapse", "messages"} <= set(summary["health"])
    err = capsys.readouterr().err
    assert all(f"warning: {m}" in err for m in summary["health"]["messages"])
    assert (tmp_path / "run" / "loss_curves.png").exists()
