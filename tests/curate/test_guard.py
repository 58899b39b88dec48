"""curate guards its own outcome: a stage that removes most of the pool, or whose threshold sits inside the
bulk of the similarities, says so in one line with the quantiles and a suggested threshold; --strict stops."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from dinolab.curate.cli import register
from dinolab.curate.guard import outcome_problem


def test_a_threshold_inside_the_bulk_is_named_with_quantiles_and_a_suggestion():
    sims = np.linspace(0.8, 1.0, 101)  # quantiles by hand: 5% 0.81, 25% 0.85, 50% 0.90, 75% 0.95, 95% 0.99
    msg = outcome_problem("self-dedup", "dedup.threshold", 300, 200, sims, threshold=0.9)
    assert "dedup.threshold=0.9 lies inside the bulk" in msg
    assert "0.810/0.850/0.900/0.950/0.990" in msg
    assert "try dedup.threshold=0.980" in msg  # the 90th percentile: 0.8 + 0.9 * 0.2


def test_removing_most_of_the_pool_is_named():
    msg = outcome_problem("self-dedup", "dedup.threshold", 300, 1, np.full(300, 0.93), threshold=0.6)
    assert msg.startswith("self-dedup: kept 1 of 300 rows")


def test_a_healthy_stage_says_nothing():
    sims = np.random.default_rng(0).normal(0.2, 0.05, 1000)  # far below the threshold
    assert outcome_problem("self-dedup", "dedup.threshold", 1000, 990, sims, threshold=0.6) is None


def _collapsed_pool(tmp_path):
    """300 embeddings all within cosine ~0.99 of one direction: what an untrained backbone gives."""
    rng = np.random.default_rng(0)
    x = np.ones((300, 64)) + 0.05 * rng.standard_normal((300, 64))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    np.savez(tmp_path / "pool.npz", embeddings=x, paths=np.array([f"/p/{i}.jpg" for i in range(300)]))
    return tmp_path / "pool.npz"


def _run(argv):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["curate", *argv])
    return args.func(args)


def test_the_pipeline_warns_and_strict_stops(tmp_path, caplog, capsys):
    pool = _collapsed_pool(tmp_path)
    sample = ["--hierarchical", "hierarchical.n_clusters=[2]", "hierarchical.resampling_steps=[1]",
              "hierarchical.sample_sizes=[1]", "hierarchical.target_size=1"]
    assert _run(["--pool", str(pool), "--out", str(tmp_path / "out"), *sample]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "self-dedup" in r.getMessage()]
    assert len(warnings) == 1 and "kept" in warnings[0] and "try dedup.threshold=" in warnings[0]
    from dinolab.cli import main

    assert main(["curate", "--pool", str(pool), "--out", str(tmp_path / "strict"), "--strict", *sample]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]  # besides the progress bars
    assert len(errors) == 1 and "self-dedup: kept" in errors[0] and errors[0].endswith("(--strict)")
    assert "Traceback" not in err
