"""Peak memory of post-hoc EMA reconstruction against the number of snapshots; prints one JSON document.

    python benchmarks/bench_posthoc.py [--mb 32] [--ns 8,32] [--outputs 2] [--workdir DIR] [--no-naive]

A generic model (a stack of Linear layers, --mb megabytes of float32 parameters) is tracked by
`edm2.ema.PosthocEMA` (sigma_rel 0.05 and 0.10) over a synthetic training run and saved at the largest
number of snapshot times in --ns; the smaller counts use every k-th time of the same run (hard links, so
all series span the same training time). Each reconstruction of --outputs EMA lengths runs in a fresh
process that measures its peak resident memory above the baseline just before the call: from the
kernel's high-water mark (VmHWM after resetting it through /proc/self/clear_refs) where Linux allows it,
and from RSS sampled every millisecond in a thread otherwise. Streaming should need about
(outputs + 1) models whatever the count; the `naive` rows load every snapshot at once for contrast, to
show that the measurement sees memory that grows with the count.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

MB = 1 << 20


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def hwm_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakSampler:
    """Largest RSS seen by a thread polling /proc/self/statm every `interval` seconds."""

    def __init__(self, interval: float = 0.001) -> None:
        self.interval, self.peak, self._stop = interval, rss_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def make_model(mb: float) -> torch.nn.Module:
    width = 1024
    layers = max(1, round(mb * MB / 4 / (width * width + width)))
    return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])


def write_snapshots(model: torch.nn.Module, folder: Path, times: int) -> None:
    from edm2.ema.trackers import PosthocEMA

    ema = PosthocEMA(model, folder, stds=(0.05, 0.10), snapshot_every=4)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for step in range(1, 4 * times + 1):
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen), alpha=1e-3)
            ema.update(step)


def child(source: Path, outdir: Path, outputs: int, naive: bool) -> dict:
    """Measure one reconstruction in this (fresh) process."""
    import gc

    from edm2.ema.reconstruct import posthoc_reconstruct, scan_snapshots
    from edm2.files import load_tensors

    stds = [0.06 + 0.04 * i for i in range(outputs)]
    gc.collect()
    base = rss_bytes()
    hwm_ok = reset_hwm()
    t0 = time.time()
    with PeakSampler() as sampler:
        if naive:  # every snapshot in memory at once, then combined (equal weights: the cost is the same)
            held = [load_tensors(i.path)[0] for i in scan_snapshots(source)]
            for _ in stds:
                out = {k: sum(h[k] for h in held) / len(held) for k in held[0]}
            del held, out
        else:
            posthoc_reconstruct(source, outdir, stds)
    seconds = time.time() - t0
    hwm = hwm_bytes() if hwm_ok else None
    return {"baseline_rss_mb": base / MB, "peak_above_baseline_mb_hwm": None if hwm is None else (hwm - base) / MB,
            "peak_above_baseline_mb_sampled": (sampler.peak - base) / MB, "seconds": seconds}


def run_child(source: Path, outdir: Path, outputs: int, naive: bool) -> dict:
    cmd = [sys.executable, __file__, "--child", str(source), "--child-out", str(outdir), "--outputs", str(outputs)]
    if naive:
        cmd.append("--naive")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return json.loads(proc.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=32, help="Model size in MB of float32 parameters.")
    parser.add_argument("--ns", default="8,32", help="Snapshot counts (times; two averages each) to compare.")
    parser.add_argument("--outputs", type=int, default=2, help="EMA lengths reconstructed per call.")
    parser.add_argument("--workdir", type=Path, help="Where to write the snapshots.  [default: a temp folder]")
    parser.add_argument("--no-naive", action="store_true", help="Skip the load-everything contrast.")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--naive", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.child_out, args.outputs, args.naive)))
        return

    torch.set_num_threads(1)
    ns = sorted(int(n) for n in args.ns.split(","))
    if any(ns[-1] % n for n in ns):
        parser.error("every count in --ns must divide the largest one")
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        model = make_model(args.mb)
        model_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / MB
        print(f"writing {ns[-1]} x 2 snapshots of a {model_mb:.1f} MB model ...", file=sys.stderr)
        dense = tmp / f"n{ns[-1]}"
        write_snapshots(model, dense, ns[-1])
        del model
        files = sorted(dense.glob("snapshot-*.safetensors"))
        folders = {ns[-1]: dense}
        for n in ns[:-1]:
            folder = tmp / f"n{n}"
            folder.mkdir()
            step = ns[-1] // n
            for f in files:
                if (int(f.name.split("-")[1]) // 4) % step == 0:
                    os.link(f, folder / f.name)
            folders[n] = folder
        rows = {}
        for n in ns:
            print(f"reconstructing {args.outputs} lengths from {n} snapshot times ...", file=sys.stderr)
            rows[n] = {"streaming": run_child(folders[n], tmp / f"out{n}", args.outputs, naive=False)}
            if not args.no_naive:
                rows[n]["naive_load_all"] = run_child(folders[n], tmp / f"naive{n}", args.outputs, naive=True)

    key = "peak_above_baseline_mb_hwm" if rows[ns[0]]["streaming"]["peak_above_baseline_mb_hwm"] is not None \
        else "peak_above_baseline_mb_sampled"
    peaks = {n: rows[n]["streaming"][key] for n in ns}
    report = {
        "model_mb": model_mb, "outputs": args.outputs, "averages_per_snapshot": 2, "measure": key,
        "expected_streaming_peak_mb": (args.outputs + 1) * model_mb,
        "runs": {str(n): rows[n] for n in ns},
        "streaming_peak_in_models": {str(n): peaks[n] / model_mb for n in ns},
        f"streaming_peak_ratio_n{ns[-1]}_over_n{ns[0]}": peaks[ns[-1]] / peaks[ns[0]],
    }
    if not args.no_naive:
        naive = {n: rows[n]["naive_load_all"][key] for n in ns}
        report[f"naive_peak_ratio_n{ns[-1]}_over_n{ns[0]}"] = naive[ns[-1]] / naive[ns[0]]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
