"""Throughput and memory of the metrics; prints one JSON document to stdout.

    python benchmarks/bench_metrics.py [--device cpu|cuda] [--batch 8] [--rounds 2] [--gen-images 4]
                                       [--gen-steps 4] [--memory-images 32,256]

1. Feature extraction, images/s, per detector: the real networks (Inception-v3 of the FID graph, DINOv2
   ViT-L/14) at their real shapes (random weights), uint8 images of 64x64 and 512x512 in, features out
   (preprocessing included). Fastest of --rounds after one warm-up call.
2. Generation plus measurement, images/s: `edm2.metrics.measure.measure_model` (sampler with --gen-steps Heun
   steps, uint8 conversion, both detectors) for a `cpu-rgb32` network and an `edm2-img512-xs`-sized network
   (the edm2-img64-xs preset: the same U-Net on 64x64 RGB pixels, since latents need the VAE decoder). Random
   network weights; the cost does not depend on them.
3. Peak memory against the number of images measured: `measure_model` on a minimal network with a small DINOv2,
   each count in a fresh process (peak RSS from /proc, Linux; peak CUDA memory on CUDA). Flat means the
   statistics are sums.

Both devices are measured when CUDA is available (or only --device). Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch
from _shared import fastest, log, machine_info, sync

from edm2.metrics.detectors import DETECTORS, Detector
from edm2.metrics.dinov2 import DinoVisionTransformer
from edm2.metrics.inception import InceptionV3
from edm2.metrics.measure import ModelUnderTest, measure_model
from edm2.networks import Precond
from edm2.presets import get_preset
from edm2.sampling import SamplerSettings


def detector(metric: str, device: torch.device, small: bool = False) -> Detector:
    """The real network shapes (ViT-L/14: the defaults) with torch's default initialisation: speed does not
    depend on the weights."""
    if metric == "fid":
        return Detector(DETECTORS[metric], InceptionV3(), device)
    net = DinoVisionTransformer(embed_dim=64, depth=1, num_heads=1) if small else DinoVisionTransformer()
    return Detector(DETECTORS[metric], net, device)


def bench_features(device: torch.device, batch: int, rounds: int) -> dict:
    out = {}
    for metric in ("fid", "fd_dinov2"):
        det = detector(metric, device)
        for size in (64, 512):
            images = torch.randint(0, 256, [batch, 3, size, size], dtype=torch.uint8, device=device)
            det(images)  # warm-up (kernel selection)
            seconds = fastest(lambda: det(images), device, rounds)  # noqa: B023
            out[f"{metric}/{size}px"] = {"batch": batch, "images_per_s": round(batch / seconds, 3)}
            log(f"  {device.type} {metric} {size}px: {batch / seconds:.2f} img/s")
    return out


def bench_generation(device: torch.device, images: int, steps: int) -> dict:
    dets = {m: detector(m, device) for m in ("fid", "fd_dinov2")}
    out = {}
    for preset in ("cpu-rgb32", "edm2-img64-xs"):
        config = get_preset(preset).network
        torch.manual_seed(0)
        net = Precond(**config.to_dict()).to(device)
        model = ModelUnderTest(net, settings=SamplerSettings(num_steps=steps), batch_size=images, device=device)
        measure_model(model, [0, 1], dets)  # warm-up
        sync(device)
        start = time.perf_counter()
        measure_model(model, list(range(images)), dets)
        sync(device)
        seconds = time.perf_counter() - start
        out[preset] = {"images": images, "steps": steps, "images_per_s": round(images / seconds, 4)}
        log(f"  {device.type} generate+measure {preset}: {images / seconds:.3f} img/s ({steps} steps)")
    return out


def _peak_rss_kib() -> int:
    """This process's peak resident set (VmHWM). Not getrusage's ru_maxrss: after fork + exec that also counts
    the parent's pages at the fork."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def memory_probe(count: int, device: str) -> dict:
    """Run in a child process: measure `count` generated images, report peak memory."""
    dev = torch.device(device)
    config = get_preset("cpu-tiny8").network
    net = Precond(**config.to_dict()).to(dev)
    dets = {"fd_dinov2": detector("fd_dinov2", dev, small=True)}
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    measure_model(ModelUnderTest(net, settings=SamplerSettings(num_steps=2), batch_size=16, device=dev),
                  list(range(count)), dets)
    result = {"images": count, "peak_rss_MiB": round(_peak_rss_kib() / 1024, 1)}
    if dev.type == "cuda":
        result["peak_cuda_MiB"] = round(torch.cuda.max_memory_allocated(dev) / 2**20, 1)
    return result


def bench_memory(device: torch.device, counts: list[int]) -> list[dict]:
    rows = []
    for count in counts:
        proc = subprocess.run([sys.executable, __file__, "--memory-probe", str(count), "--device", device.type],
                              capture_output=True, text=True, check=True)
        rows.append(json.loads(proc.stdout))
        log(f"  {device.type} memory, {count} images: {rows[-1]}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], help="only this device  [default: cpu and cuda]")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--gen-images", type=int, default=4, help="at least 2 (statistics need two)")
    parser.add_argument("--gen-steps", type=int, default=4)
    parser.add_argument("--memory-images", default="32,256,1024")
    parser.add_argument("--memory-probe", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe, args.device or "cpu")))
        return
    devices = [args.device] if args.device else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    results = {"machine": machine_info(devices), "command": " ".join(sys.argv), "devices": {}}
    for name in devices:
        device = torch.device(name)
        log(f"{name}: feature extraction")
        entry = {"features": bench_features(device, args.batch, args.rounds)}
        log(f"{name}: generation plus measurement")
        entry["generate_and_measure"] = bench_generation(device, args.gen_images, args.gen_steps)
        log(f"{name}: peak memory against images measured")
        entry["memory"] = bench_memory(device, [int(c) for c in args.memory_images.split(",")])
        results["devices"][name] = entry
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
