"""Throughput of the core training step and of the sampler; prints one JSON document to stdout.

    python benchmarks/bench_core.py [--device cpu|cuda] [--iters N] [--sample-steps 32]

Workloads: the `cpu-digits8` preset at batch 32 and `edm2-img64-xs` at batch 4, on the CPU and, when
torch.cuda.is_available(), on CUDA too (or only on the device given with --device).

Training step (what one iteration of EDM2 training costs): learning rate from
`learning_rate_schedule`, EDM2Loss forward with return_logvar, loss.sum() / batch backward,
`sanitize_gradients`, Adam (`make_adam`) step, PowerFunctionEMA update. Sampling: `edm_sampler`
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
from _shared import log, machine_info, sync

from edm2.ema import PowerFunctionEMA
from edm2.losses import EDM2Loss
from edm2.networks import Precond
from edm2.presets import get_preset
from edm2.sampling import edm_sampler
from edm2.training import learning_rate_schedule, make_adam, sanitize_gradients

WORKLOADS = [("cpu-digits8", 32), ("edm2-img64-xs", 4)]

# (warm-up iterations, timed iterations, timed sampling runs) per (preset, device type).
DEFAULT_PLAN = {
    ("cpu-digits8", "cpu"): (2, 20, 2),
    ("cpu-digits8", "cuda"): (5, 50, 5),
    ("edm2-img64-xs", "cpu"): (1, 2, 1),
    ("edm2-img64-xs", "cuda"): (5, 30, 3),
}


def bench_training(net: Precond, preset, batch: int, device: torch.device, warmup: int, iters: int) -> dict:
    tr = preset.training
    cfg = preset.network
    gen = torch.Generator(device).manual_seed(1)
    images = torch.randn([batch, cfg.img_channels, cfg.img_resolution, cfg.img_resolution], device=device,
                         generator=gen) * 0.5
    labels = torch.nn.functional.one_hot(torch.randint(cfg.label_dim, [batch], device=device, generator=gen),
                                         cfg.label_dim).float()
    loss_fn = EDM2Loss(P_mean=tr.P_mean, P_std=tr.P_std, sigma_data=cfg.sigma_data)
    opt = make_adam(net.parameters(), fused=True)  # as the training loop does
    ema = PowerFunctionEMA(net, stds=tr.ema_stds)
    net.train().requires_grad_(True)
    cur_nimg = 0
    loss_value = float("nan")

    def step() -> torch.Tensor:
        nonlocal cur_nimg
        lr = learning_rate_schedule(cur_nimg, batch, ref_lr=tr.lr, ref_batches=tr.decay, rampup_Mimg=tr.rampup_Mimg)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net, images, labels)
        loss.sum().mul(1 / batch).backward()
        sanitize_gradients(net.parameters())
        opt.step()
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
    if iters:
        loss_value = float(loss.detach().sum() / batch)
    return {
        "warmup_iters": warmup,
        "iters": iters,
        "seconds": round(seconds, 4),
        "iters_per_s": round(iters / seconds, 4) if iters else None,
        "images_per_s": round(iters * batch / seconds, 3) if iters else None,
        "last_loss": round(loss_value, 4),
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
    parser.add_argument("--presets", default=",".join(name for name, _ in WORKLOADS),
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
            entry["train"] = bench_training(net, preset, batch, device, warmup, iters)
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
