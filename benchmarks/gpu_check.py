"""Prove the CUDA paths with short runs and write the GPU benchmark JSON; run through `benchmarks/gpu_check.sh`.

    bash benchmarks/gpu_check.sh [OUTDIR] [--budget SECONDS]

Checks, each a short real run of the `edm2` command line (the tiny preset, seconds each):
  train-fp32, train-bf16, train-fp16 (dynamic loss scaling, its scale in the checkpoint), train-compile,
  nccl (a one-process NCCL group: init, all_reduce, a data-parallel training step through torchrun),
  generate (fp32 images on CUDA equal the CPU ones to within one grey level; fp16 and bf16 images finite and
  close), then the benchmarks: `bench_core.py` and `bench_speed.py` on `edm2-img512-xs` and `edm2-img512-s`.
On a machine without CUDA the CUDA checks and benchmarks are skipped (and listed as such); the CPU checks
still run, so the script itself is tested everywhere. Everything lands in OUTDIR: one JSON per benchmark,
the logs, and `summary.json` (passed / failed / skipped per check, with seconds). Exit code 1 if a check
failed. The total stays within --budget seconds (default 480): a step that would start past it is skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
TINY = ["--data", "digits", "--preset", "cpu-tiny8", "--batch", "32", "--duration", "256", "--status", "128",
        "--snapshot", "128", "--checkpoint", "128"]
NCCL_SNIPPET = """
import os, torch
torch.distributed.init_process_group("nccl")
x = torch.ones(4, device="cuda") * (torch.distributed.get_rank() + 1)
torch.distributed.all_reduce(x)
assert torch.allclose(x, torch.full_like(x, sum(range(1, torch.distributed.get_world_size() + 1)))), x
torch.distributed.destroy_process_group()
print("nccl all_reduce ok")
"""


class Checks:
    def __init__(self, outdir: Path, budget: float) -> None:
        self.outdir = outdir
        self.deadline = time.time() + budget
        self.results: list[dict] = []

    def run(self, name: str, args: list[str], timeout: float, needs_cuda: bool, check=None) -> bool:
        """Run `args` (a command); passed when it exits 0 and `check()` (if any) returns None."""
        entry = {"check": name, "command": " ".join(args)}
        if needs_cuda and not torch.cuda.is_available():
            entry.update(status="skipped", reason="no CUDA device")
        elif time.time() + 10 > self.deadline:
            entry.update(status="skipped", reason="time budget used up")
        else:
            start = time.time()
            log = self.outdir / f"{name}.log"
            timeout = min(timeout, self.deadline - time.time())
            try:
                proc = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})
                log.write_text(proc.stdout)
                problem = f"exit code {proc.returncode}" if proc.returncode else (check() if check else None)
            except subprocess.TimeoutExpired as e:
                log.write_text((e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""))
                problem = f"timed out after {timeout:.0f} s"
            entry.update(status="failed" if problem else "passed", seconds=round(time.time() - start, 1))
            if problem:
                entry["problem"] = problem + f" (log: {log.name})"
        self.results.append(entry)
        print(f"[gpu_check] {name}: {entry['status']}" + (f" ({entry.get('problem') or entry.get('reason')})"
                                                         if entry["status"] != "passed" else
                                                         f" in {entry['seconds']} s"), flush=True)
        return entry["status"] == "passed"


def _scale_checkpointed(run: Path):
    def check():
        from edm2.files import find_checkpoints, load_tensors

        tensors, _ = load_tensors(find_checkpoints(run)[-1], kind="checkpoint")
        return None if "scaler/scale" in tensors else "fp16 run saved no loss scale"
    return check


def _images_close(a: Path, b: Path, tol: int):
    def check():
        import numpy as np
        from PIL import Image

        diffs = []
        for pa in sorted(a.glob("*.png")):
            with Image.open(pa) as ia, Image.open(b / pa.name) as ib:
                diffs.append(np.abs(np.asarray(ia, dtype=np.int16) - np.asarray(ib, dtype=np.int16)).max())
        if not diffs:
            return "no images"
        return None if max(diffs) <= tol else f"images differ by up to {max(diffs)} grey levels (allowed {tol})"
    return check


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir", nargs="?", default=str(HERE / "results" / "gpu-check"))
    parser.add_argument("--budget", type=float, default=480, help="seconds for everything")
    args = parser.parse_args()
    outdir = Path(args.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    c = Checks(outdir, args.budget)
    edm2 = [sys.executable, "-m", "edm2.cli"]
    cuda = torch.cuda.is_available()
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))

    for device in ["cpu"] + (["cuda"] if cuda else []):
        c.run(f"train-fp32-{device}", [*edm2, "train", "--outdir", str(work / f"fp32-{device}"), *TINY, "--device",
                                       device, "--precision", "fp32"], 120, False)
        c.run(f"train-bf16-{device}", [*edm2, "train", "--outdir", str(work / f"bf16-{device}"), *TINY, "--device",
                                       device, "--precision", "bf16"], 120, False)
    c.run("train-fp16-cuda", [*edm2, "train", "--outdir", str(work / "fp16"), *TINY, "--device", "cuda",
                              "--precision", "fp16"], 120, True, _scale_checkpointed(work / "fp16"))
    c.run("train-compile-cuda", [*edm2, "train", "--outdir", str(work / "compile"), *TINY, "--device", "cuda",
                                 "--compile"], 240, True)
    (work / "nccl.py").write_text(NCCL_SNIPPET)
    c.run("nccl-init", [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
                        str(work / "nccl.py")], 120, True)
    c.run("nccl-train", [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
                         "-m", "edm2.cli", "train", "--outdir", str(work / "ddp"), *TINY, "--device", "cuda"], 120,
          True)

    snapshot = work / "fp32-cpu" / "snapshot-0000000256-0.100.safetensors"
    gen = [*edm2, "generate", "--net", str(snapshot), "--seeds", "0-15", "--steps", "8"]
    c.run("generate-cpu", [*gen, "--outdir", str(work / "gen-cpu"), "--device", "cpu"], 120, False)
    c.run("generate-fp32-cuda", [*gen, "--outdir", str(work / "gen-cuda"), "--device", "cuda", "--precision",
                                 "fp32"], 120, True, _images_close(work / "gen-cpu", work / "gen-cuda", 1))
    for low in ("fp16", "bf16"):
        c.run(f"generate-{low}-cuda", [*gen, "--outdir", str(work / f"gen-{low}"), "--device", "cuda",
                                        "--precision", low], 120, True,
              _images_close(work / "gen-cpu", work / f"gen-{low}", 24))

    presets = "edm2-img512-xs,edm2-img512-s"
    for name, cmd in [
        ("bench_core", [sys.executable, str(HERE / "bench_core.py"), "--device", "cuda", "--presets", presets]),
        ("bench_speed_fp16", [sys.executable, str(HERE / "bench_speed.py"), "--device", "cuda", "--presets",
                              presets, "--low-precision", "fp16", "--rounds", "1"]),
        ("bench_speed_bf16", [sys.executable, str(HERE / "bench_speed.py"), "--device", "cuda", "--presets",
                              presets, "--low-precision", "bf16", "--rounds", "1", "--variants", "all,bf16"]),
    ]:
        json_path = outdir / f"{name}.json"
        c.run(name, ["bash", "-c", " ".join(f"'{a}'" for a in cmd) + f" > '{json_path}'"], 200, True,
              lambda p=json_path: None if p.is_file() and json.loads(p.read_text()).get("results") else "no JSON")

    summary = {"cuda": cuda, "device": torch.cuda.get_device_name(0) if cuda else None, "torch": torch.__version__,
               "checks": c.results,
               "failed": [r["check"] for r in c.results if r["status"] == "failed"],
               "skipped": [r["check"] for r in c.results if r["status"] == "skipped"]}
    (outdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"[gpu_check] {sum(r['status'] == 'passed' for r in c.results)} passed, {len(summary['failed'])} failed, "
          f"{len(summary['skipped'])} skipped; summary in {outdir / 'summary.json'}")
    if not cuda:
        print("[gpu_check] no CUDA device: every CUDA check and the GPU benchmarks were skipped")
    sys.exit(1 if summary["failed"] else 0)


if __name__ == "__main__":
    main()
