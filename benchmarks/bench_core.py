"""Throughput of the core training step and of the sampler; prints one JSON document to stdout.

    python benchmarks/bench_core.py [--device cpu|cuda] [--iters N] [--sample-steps 32]

Workloads: the `cpu-digits8` preset at batch 32 and `edm2-img64-xs` at batch 4, on the CPU and, when
torch.cuda.is_available(), on CUDA too (or only on the device given with --device).

Training step (what one iteration of EDM2 training costs): `edm2.training.train_step` as the trainer runs it
(batch from a dataset of random uint8 images, EDM2 loss forward and backward, gradient guard, fused Adam,
at the precision the trainer picks for the device) plus the PowerFunctionEMA update. Sampling: `edm_sampler`
(Heun, --sample-steps steps = 2 steps - 1 evaluations) with the network in eval mode under no_grad.
Warm-up iterations and runs are excluded from the timings. Progress goes to stderr.

The defaults keep the CPU part short: img64-xs costs seconds per network evaluation on a laptop
CPU, so it gets 2 timed training iterations and exactly one full sampling run there.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time

import torch
from _shared import log, machine_info, random_trainer, sync

from edm2.ema import PowerFunctionEMA
from edm2.networks import Precond
from edm2.presets import get_preset
from edm2.sampling import edm_sampler
from edm2.training import train_step

WORKLOADS = [("cpu-digits8", 32), ("edm2-img64-xs", 4), ("edm2-img512-xs", 64), ("edm2-img512-s", 64)]
DEFAULT_PRESETS = "cpu-digits8,edm2-img64-xs"  # the img512 ones are for GPUs (benchmarks/gpu_check.sh)

# (warm-up iterations, timed iterations, timed sampling runs) per (preset, device type).
DEFAULT_PLAN = {
    ("cpu-digits8", "cpu"): (2, 20, 2),
    ("cpu-digits8", "cuda"): (5, 50, 5),
    ("edm2-img64-xs", "cpu"): (1, 2, 1),
    ("edm2-img64-xs", "cuda"): (5, 30, 3),
    ("edm2-img512-xs", "cpu"): (1, 1, 1),
    ("edm2-img512-xs", "cuda"): (5, 20, 1),
    ("edm2-img512-s", "cpu"): (1, 1, 1),
    ("edm2-img512-s", "cuda"): (5, 20, 1),
}


def bench_training(name: str, batch: int, device: torch.device, warmup: int, iters: int) -> dict:
    t = random_trainer(name, batch, device)
    ema = PowerFunctionEMA(t.net, stds=t.run.ema_stds)
    cur_nimg = 0

    def step() -> torch.Tensor:
        nonlocal cur_nimg
        loss, _ = train_step(t, cur_nimg, t.data.micro_batches(cur_nimg))
        cur_nimg += batch
        ema.update(cur_nimg=cur_nimg, batch_size=batch)
        return loss

    for _ in range(warmup):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        loss = step()
    sync(device)
    seconds = time.perf_counter() - start
    return {
        "warmup_iters": warmup,
        "iters": iters,
        "seconds": round(seconds, 4),
        "iters_per_s": round(iters / seconds, 4) if iters else None,
        "images_per_s": round(iters * batch / seconds, 3) if iters else None,
        "last_loss": round(float(loss), 4) if iters else float("nan"),
        "precision": t.run.precision,
    }


def bench_sampling(net: Precond, preset, batch: int, device: torch.device, steps: int, runs: int) -> dict:
    cfg = preset.network
    gen = torch.Generator(device).manual_seed(2)
    noise = torch.randn([batch, cfg.img_channels, cfg.img_resolution, cfg.img_resolution], device=device,
                        generator=gen)
    labels = torch.nn.functional.one_hot(torch.randint(cfg.label_dim, [batch], device=device, generator=gen),
                                         cfg.label_dim).float()
    net.eval().requires_grad_(False)
    with torch.no_grad():
        edm_sampler(net, noise, labels, num_steps=1)  # warm-up: one evaluation in eval mode, not timed
        sync(device)
        start = time.perf_counter()
        for _ in range(runs):
            out = edm_sampler(net, noise, labels, num_steps=steps)
        sync(device)
        seconds = time.perf_counter() - start
    nfe = 2 * steps - 1
    return {
        "steps": steps,
        "nfe_per_run": nfe,
        "runs": runs,
        "seconds": round(seconds, 4),
        "images_per_s": round(runs * batch / seconds, 4),
        "evals_per_s": round(runs * nfe / seconds, 4),
        "finite": bool(torch.isfinite(out).all()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="only this device (default: cpu, plus cuda when available)")
    parser.add_argument("--iters", type=int, default=None,
                        help="timed training iterations per workload (default: per workload and device)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed training iterations before timing")
    parser.add_argument("--sample-steps", type=int, default=32, help="Heun steps per sampling run")
    parser.add_argument("--sample-runs", type=int, default=None, help="timed sampling runs (at least 1)")
    parser.add_argument("--presets", default=DEFAULT_PRESETS,
                        help="comma-separated subset of " + ", ".join(name for name, _ in WORKLOADS))
    args = parser.parse_args()

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch.cuda.is_available() is False")
    if args.device:
        devices = [torch.device(args.device)]
    else:
        devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    chosen = args.presets.split(",")
    unknown = sorted(set(chosen) - {name for name, _ in WORKLOADS})
    if unknown:
        parser.error(f"unknown workload(s) {unknown}")

    results = []
    total_start = time.perf_counter()
    for device in devices:
        for name, batch in WORKLOADS:
            if name not in chosen:
                continue
            warmup, iters, runs = DEFAULT_PLAN[(name, device.type)]
            warmup = warmup if args.warmup is None else args.warmup
            iters = iters if args.iters is None else args.iters
            runs = max(1, runs if args.sample_runs is None else args.sample_runs)
            preset = get_preset(name)
            torch.manual_seed(0)
            net = Precond(**preset.network.to_dict()).to(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            entry = {"preset": name, "device": str(device), "batch": batch,
                     "parameters": sum(p.numel() for p in net.parameters()),
                     "fp16": bool(preset.network.use_fp16 and device.type == "cuda")}
            log(f"[{device}] {name} batch {batch}: training, {warmup} warm-up + {iters} timed iterations")
            entry["train"] = bench_training(name, batch, device, warmup, iters)
            log(f"[{device}] {name} batch {batch}: sampling, {runs} run(s) of {args.sample_steps} steps")
            entry["sample"] = bench_sampling(net, preset, batch, device, args.sample_steps, runs)
            if device.type == "cuda":
                entry["peak_memory_GiB"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
            results.append(entry)
            del net

    report = {
        "command": shlex.join(["python", *sys.argv]),
        "machine": machine_info([d.type for d in devices]),
        "settings": {"sample_steps": args.sample_steps, "iters": args.iters, "warmup": args.warmup,
                     "sample_runs": args.sample_runs},
        "results": results,
        "total_seconds": round(time.perf_counter() - total_start, 2),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
