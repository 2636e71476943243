"""Peak resident memory of `edm2 generate` and `edm2 metrics gen` against the number of seeds, in one process and
under torchrun; prints one JSON document.

    python benchmarks/bench_generate_memory.py [--seeds 64,1024,8192] [--steps 1] [--batch 32] [--processes 1,2]
                                               [--workdir DIR] [--control 64,1024]

Inputs, made in --workdir (default: a temporary folder in /dev/shm when there is one, so that writing the PNGs
costs no disk flushes; tmpfs pages are not resident memory of the writer): a snapshot of a minimal EDM2 `Precond`
at 256x256x3 (model_channels 1, one level, no attention, random weights: memory does not depend on them), small
DINOv2 weights in the published layout (random, width 64, one block) and reference statistics at 256x256.

Every run is the real command line in fresh processes: `edm2 generate --outdir` (one PNG per seed) and
`edm2 metrics gen` (the samples straight into the feature network), with --steps Heun steps and --batch images
per batch, for each seed count; with 2 processes through `torchrun --nproc-per-node 2` (gloo, one thread each).
Each process runs the command as `python -m edm2.cli` does, through this script's `--probe` entry, which then
writes its peak resident set (the kernel's high-water mark, VmHWM of /proc/self/status). oneDNN is switched off
in the probes: it is slow on convolutions of one or two channels, and the pipeline's memory does not depend on
the convolution kernel. glibc's malloc runs with a fixed mmap threshold (MALLOC_MMAP_THRESHOLD_=131072, unless
--default-malloc): with its default, dynamic threshold, the freed tensors of a batch may stay in the heap, and the
peak of one command wanders by a few hundred MiB from run to run, which hides a trend or its absence.

Flatness is the largest peak over the smallest across the seed counts (per process count; under torchrun the
larger rank's peak). The `control` rows keep every image (`generate_images(..., return_images=True)`), to show
that the measurement sees memory that grows with the seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _shared import log, machine_info

RESOLUTION = 256
NETWORK = dict(img_resolution=RESOLUTION, img_channels=3, label_dim=0, model_channels=1, channel_mult=(1,),
               num_blocks=0, attn_resolutions=(), use_fp16=False)


def peak_rss_kib() -> int:
    """This process's peak resident set (VmHWM): unlike getrusage's ru_maxrss it does not count the parent's pages
    at the fork."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def probe(result_dir: str, args: list[str]) -> None:
    """Run in a child: `edm2 <args>` in this process (as `python -m edm2.cli`), or with `args[0] == 'api'` the
    control (`generate_images` keeping every image), then write this rank's peak resident set and exit code."""
    torch.backends.mkldnn.enabled = False
    code = 0
    try:
        if args[0] == "api":
            keep_all(args[1], int(args[2]), int(args[3]), int(args[4]))
        else:
            from edm2.cli import main

            main(args, prog_name="edm2")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    rank = int(os.environ.get("RANK", "0"))
    record = {"rank": rank, "exit": code, "peak_rss_kib": peak_rss_kib()}
    Path(result_dir, f"rank{rank}.json").write_text(json.dumps(record))
    sys.exit(code)


def keep_all(net_path: str, num: int, steps: int, batch: int) -> None:
    """The control: every sample kept and returned, as `generate_images` returns them by default."""
    from edm2.files import load_network
    from edm2.generate import generate_images
    from edm2.sampling import SamplerSettings

    net, _ = load_network(net_path)
    generate_images(net, list(range(num)), None, SamplerSettings(num_steps=steps), batch_size=batch)


def make_inputs(workdir: Path) -> dict[str, Path]:
    """The snapshot, the detector folder and the reference statistics."""
    from edm2.files import Snapshot, save_snapshot
    from edm2.metrics.dinov2 import DinoVisionTransformer
    from edm2.metrics.stats import MetricStats, save_reference
    from edm2.networks import Precond
    from edm2.presets import NetworkConfig

    torch.manual_seed(0)
    net = Precond(**NETWORK)
    paths = {"net": workdir / "net.safetensors", "det": workdir / "detectors", "ref": workdir / "ref.npz"}
    save_snapshot(paths["net"], Snapshot(net.state_dict(), NetworkConfig(**NETWORK), 0.1, 0, {}))
    paths["det"].mkdir(exist_ok=True)
    torch.save(DinoVisionTransformer(embed_dim=64, depth=1, num_heads=1).state_dict(),
               paths["det"] / "dinov2_vitl14_pretrain.pth")
    sigma = np.cov(np.random.default_rng(0).normal(size=[64, 200]))
    save_reference(paths["ref"], {"fd_dinov2": MetricStats(np.zeros(64), sigma, 200)}, (RESOLUTION, RESOLUTION))
    return paths


def command_args(kind: str, paths: dict[str, Path], num: int, steps: int, batch: int, out: Path) -> list[str]:
    """The arguments of one run: 'generate' (PNGs to `out`), 'metrics gen', or the 'control'."""
    if kind == "control":
        return ["api", str(paths["net"]), str(num), str(steps), str(batch)]
    common = ["--net", str(paths["net"]), "--seeds", f"0-{num - 1}", "--steps", str(steps), "--batch", str(batch),
              "--device", "cpu"]
    if kind == "generate":
        return ["generate", *common, "--outdir", str(out)]
    return ["metrics", "gen", *common, "--ref", str(paths["ref"]), "--detector-dir", str(paths["det"])]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], processes: int, result_dir: Path, env: dict[str, str]) -> tuple[list[dict], float]:
    """Run the probe with `args` in `processes` fresh processes (torchrun when more than one) in the environment
    `env`; the ranks' records and the wall time."""
    entry = [str(Path(__file__).resolve()), "--probe", str(result_dir), *args]
    env = dict(env)
    if processes == 1:
        cmd = [sys.executable, *entry]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes), "--master-addr",
               "127.0.0.1", "--master-port", str(free_port()), *entry]
        env["OMP_NUM_THREADS"] = "1"
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return [json.loads((result_dir / f"rank{r}.json").read_text()) for r in range(processes)], seconds


def run_series(kind: str, paths: dict[str, Path], counts: list[int], processes: int, steps: int, batch: int,
               workdir: Path, env: dict[str, str]) -> dict:
    """One command at every seed count: peak resident memory per rank, time, and the flatness ratio."""
    rows = []
    for num in counts:
        out, result_dir = workdir / "out", workdir / "ranks"
        result_dir.mkdir(exist_ok=True)
        records, seconds = launch(command_args(kind, paths, num, steps, batch, out), processes, result_dir, env)
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(result_dir)
        peaks = [round(r["peak_rss_kib"] / 1024, 1) for r in records]
        rows.append({"seeds": num, "peak_rss_MiB": max(peaks), "peak_rss_MiB_per_rank": peaks,
                     "seconds": round(seconds, 1), "seconds_per_image": round(seconds / num, 4)})
        log(f"  {kind}, {processes} process(es), {num} seeds: {peaks} MiB, {seconds:.0f} s")
    peaks = [row["peak_rss_MiB"] for row in rows]
    return {"processes": processes, "rows": rows, "flatness": round(max(peaks) / min(peaks), 4)}


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--probe":
        probe(sys.argv[2], sys.argv[3:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="64,1024,8192", help="comma-separated seed counts")
    parser.add_argument("--steps", type=int, default=1, help="Heun steps (1: one network evaluation)")
    parser.add_argument("--batch", type=int, default=32, help="images per batch (--batch of both commands)")
    parser.add_argument("--processes", default="1,2", help="comma-separated process counts (2: torchrun)")
    parser.add_argument("--control", default="64,1024", help="seed counts of the keep-every-image control ('' none)")
    parser.add_argument("--workdir", help="folder for the inputs and the PNGs  [default: a temporary folder]")
    parser.add_argument("--default-malloc", action="store_true", help="leave glibc's mmap threshold dynamic")
    args = parser.parse_args()
    env = dict(os.environ) if args.default_malloc else {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    shm = Path("/dev/shm")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-gen-mem-", dir=shm if shm.is_dir() else None))
    workdir.mkdir(parents=True, exist_ok=True)
    counts = [int(c) for c in args.seeds.split(",")]
    results = {"machine": machine_info(["cpu"]), "command": " ".join(sys.argv), "setup": {
        "network": {k: list(v) if isinstance(v, tuple) else v for k, v in NETWORK.items()}, "steps": args.steps,
        "batch": args.batch, "detector": "DINOv2 layout, width 64, 1 block", "workdir_tmpfs": str(workdir).startswith(
            "/dev/shm"), "malloc_mmap_threshold": env.get("MALLOC_MMAP_THRESHOLD_", "dynamic (glibc default)")},
        "runs": {}}
    try:
        paths = make_inputs(workdir)
        for kind in ("generate", "metrics gen"):
            for processes in [int(p) for p in args.processes.split(",")]:
                log(f"{kind}, {processes} process(es)")
                series = run_series(kind, paths, counts, processes, args.steps, args.batch, workdir, env)
                results["runs"][f"{kind}/{processes}"] = series
        if args.control:
            log("control: generate_images keeping every image")
            results["runs"]["control/1"] = run_series("control", paths, [int(c) for c in args.control.split(",")],
                                                      1, args.steps, args.batch, workdir, env)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
