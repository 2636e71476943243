"""The GPU check script runs on a machine without CUDA too: it runs the CPU checks and lists what it skipped."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_without_cuda_and_says_what_it_skipped(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path), "--budget", "300"],
                          capture_output=True, text=True, timeout=400)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert proc.returncode == 0 and summary["failed"] == [], proc.stdout + proc.stderr
    status = {r["check"]: r["status"] for r in summary["checks"]}
    assert status["train-fp32-cpu"] == status["train-bf16-cpu"] == status["generate-cpu"] == "passed"
    if not torch.cuda.is_available():
        cuda_checks = [name for name in status if "cuda" in name or "nccl" in name or name.startswith("bench")]
        assert {status[name] for name in cuda_checks} == {"skipped"} and len(cuda_checks) >= 10
        assert set(summary["skipped"]) == set(cuda_checks)
        assert "no CUDA device" in proc.stdout


def test_bench_recipes_reads_recipes_with_several_changes():
    import sys

    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    try:
        from bench_recipes import recipe_options, split_recipes
    finally:
        sys.path.pop(0)
    assert split_recipes("before,after:batch=64,lr=0.02,after,after:decay=1e9") == [
        "before", "after:batch=64,lr=0.02", "after", "after:decay=1e9"]
    opts = recipe_options("after:batch=64,lr=0.02", Path("d.npz"), 1, 60.0, Path("out"))
    assert (opts.batch, opts.lr, opts.budget, opts.preset) == (64, 0.02, 60.0, None)
