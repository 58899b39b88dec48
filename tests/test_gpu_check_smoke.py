"""The GPU check (bench/gpu_check.py) dry-run on CPU with tiny sizes: every part reports, the CPU ones pass."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("gemm", "extraction", "train_step", "fsdp", "resume", "convergence")


def test_gpu_check_smoke_on_cpu(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--device", "cpu", "--smoke",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((out / "results.json").read_text())
    assert (out / "results.md").read_text().startswith("# GPU check")
    parts = res["parts"]
    for name in PARTS:  # every part: numbers or a recorded error
        assert parts[name]["status"] in ("ok", "error"), name
        assert "data" in parts[name] or parts[name]["error"], name
    errors = {n: p.get("error") for n, p in parts.items() if p["status"] != "ok"}
    assert not errors, errors

    assert parts["gemm"]["data"]["bf16_gflops"] > 0
    eager = [r for r in parts["extraction"]["data"]["rows"] if not r["compiled"]]
    assert eager and all(r["dinolab_images_per_s"] > 0 for r in eager)
    if "hf_images_per_s" in eager[0]:  # transformers installed: same weights, same class token in fp32
        assert all(r["max_abs_diff_cls_fp32"] < 1e-4 for r in eager)
    steps = {r["variant"]: r for r in parts["train_step"]["data"]["rows"]}
    for name in ("efficient", "separate", "varlen", "masked-dp", "checkpointed"):
        assert steps[name].get("images_per_s", 0) > 0, steps[name]
    assert steps["efficient"]["flops_per_step"] > 0 and steps["efficient"]["mfu"] > 0
    assert parts["fsdp"]["data"]["equal"] and parts["fsdp"]["data"]["fsdp_modules"] > 0
    assert parts["resume"]["data"]["equal"]
    assert parts["varlen"]["data"]["max_abs_diff_out"] < 1e-5 and parts["varlen"]["data"]["max_abs_diff_grad"] < 1e-5
    assert parts["convergence"]["data"]["iterations"] >= 2
