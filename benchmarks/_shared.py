"""What the benchmark scripts share: progress lines, timing, the machine description, the common options.

Imported by the scripts in this folder (run as `python benchmarks/<script>.py`, which puts this folder on
sys.path); not part of the edm2 package.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable

import torch


def log(msg: str) -> None:
    """A progress line on stderr (stdout carries the JSON document only)."""
    print(msg, file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work, so that a timer reads the work, not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fastest(fn: Callable[[], object], device: torch.device, rounds: int, calls: int = 1) -> float:
    """Seconds per call of `fn`, from the fastest of `rounds` rounds of `calls` calls (no warm-up)."""
    best = float("inf")
    for _ in range(rounds):
        sync(device)
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync(device)
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def machine_info(device_types: list[str]) -> dict:
    """The machine a result was measured on: CPU model and its vector/matrix extensions, threads, versions,
    and the GPU when CUDA is among `device_types`."""
    cpu = platform.processor() or platform.machine()
    flags: list[str] = []
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
        names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
        cpu = names[0] if names else cpu
        flag_line = next((line for line in lines if line.startswith("flags")), "")
        flags = sorted({f for f in flag_line.split() if f.startswith(("avx2", "avx512f", "avx512_bf16", "amx"))})
    info = {"platform": platform.platform(), "cpu": cpu, "cpu_flags": flags, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "cuda_available": torch.cuda.is_available()}
    if "cuda" in device_types:
        info["cuda_device"] = torch.cuda.get_device_name(0)
        info["cuda_version"] = torch.version.cuda
    return info


def device_and_presets(description: str, default_presets: str = "cpu-digits8,edm2-img64-xs"
                       ) -> tuple[torch.device, list[str]]:
    """Parse `--presets a,b --device cpu|cuda` (the options of the single-device scripts)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--presets", default=default_presets, help="comma-separated preset names")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch.cuda.is_available() is False")
    return torch.device(args.device), args.presets.split(",")


def random_trainer(preset: str, batch: int, device: torch.device, precision: str | None = None,
                   compile: bool = False, images: int | None = None):
    """`edm2.training.setup` for `preset` at `batch` on a dataset of random items with labels (the preset's
    shape: uint8 pixels, or for latent presets float32 raw latents, a posterior mean and std per latent channel),
    without a run folder: what the benchmarks pass to `edm2.training.train_step`."""
    import numpy as np

    from edm2.data import ImageDataset
    from edm2.presets import get_preset
    from edm2.training import setup
    from edm2.training.options import TrainOptions, resolve_run

    p = get_preset(preset)
    net = p.network
    n = images or 4 * batch
    rng = np.random.default_rng(0)
    shape = [n, net.img_channels, net.img_resolution, net.img_resolution]
    if p.latents:
        items = np.concatenate([rng.normal(0, 4, shape), rng.uniform(0.01, 0.1, shape)], 1).astype(np.float32)
    else:
        items = rng.integers(0, 256, shape, dtype=np.uint8)
    dataset = ImageDataset(items, rng.integers(0, max(net.label_dim, 1), n), name="random",
                           num_classes=max(net.label_dim, 1))
    opts = TrainOptions(outdir="(none)", data="random", preset=preset, batch=batch, device=str(device),
                        precision=precision, compile=compile)
    return setup(resolve_run(opts, dataset, world=1), dataset, device)
