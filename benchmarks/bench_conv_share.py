"""Where sampling time goes on this machine, and what that bounds; prints one JSON document.

    python benchmarks/bench_conv_share.py [--presets cpu-digits8,edm2-img64-xs] [--device cpu]

For each preset, one eval-mode network evaluation (as in sampling, batch from PLANS) runs under
torch.profiler: the share of time spent in convolution kernels, and the rate those convolutions reach
(multiply-accumulates from edm2.complexity divided by their time). By Amdahl's law, a fast path that
leaves the convolutions as they are cannot speed the evaluation up by more than 1 / share (everything
else gone); that bound is reported as `max_speedup_without_faster_convolutions`. Then one 3x3 convolution of the
preset's widest level is timed in float32 and in bfloat16 (the precision that can make convolutions
faster, on hardware with native bf16: AVX512-BF16/AMX on CPUs, tensor cores on GPUs).
"""

from __future__ import annotations

import json
import shlex
import sys

import torch
from _shared import device_and_presets, fastest, log, machine_info
from torch.profiler import ProfilerActivity, profile

from edm2.complexity import count_complexity
from edm2.networks import Precond
from edm2.presets import get_preset

PLANS = {"cpu-digits8": 32, "edm2-img64-xs": 2, "edm2-img512-xs": 16, "cpu-rgb32": 16}
CONV_KERNELS = ("convolution", "conv2d", "cudnn", "mkldnn_conv")


def conv_share(preset: str, device: torch.device) -> dict:
    cfg = get_preset(preset).network
    batch = PLANS.get(preset, 4)
    torch.manual_seed(0)
    net = Precond(**cfg.to_dict()).to(device).eval().requires_grad_(False)
    x = torch.randn(batch, cfg.img_channels, cfg.img_resolution, cfg.img_resolution, device=device)
    sigma = torch.full([batch], 2.0, device=device)
    labels = torch.eye(cfg.label_dim, device=device)[torch.arange(batch) % cfg.label_dim] if cfg.label_dim else None
    with torch.no_grad():
        net(x, sigma, labels)  # warm-up (and the cached normalized weights)
        seconds = fastest(lambda: net(x, sigma, labels), device, rounds=3)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            net(x, sigma, labels)
    events = prof.key_averages()
    use_cuda = device.type == "cuda"
    self_time = (lambda e: e.self_device_time_total) if use_cuda else (lambda e: e.self_cpu_time_total)
    total = sum(self_time(e) for e in events)
    conv = sum(self_time(e) for e in events if any(k in e.key for k in CONV_KERNELS))
    share = conv / total
    macs = count_complexity(cfg).macs * batch
    return {"preset": preset, "batch": batch, "seconds_per_evaluation": round(seconds, 4),
            "convolution_share": round(share, 3),
            "convolution_gmac_per_s": round(macs / (share * seconds) / 1e9, 1),
            "max_speedup_without_faster_convolutions": round(1 / share, 2)}


def conv_precision(preset: str, device: torch.device) -> dict:
    cfg = get_preset(preset).network
    width = cfg.model_channels * max(cfg.channel_mult)
    res = cfg.img_resolution >> (len(cfg.channel_mult) - 1)
    batch = PLANS.get(preset, 4)
    x = torch.randn(batch, width, res, res, device=device)
    w = torch.randn(width, width, 3, 3, device=device)
    out = {"shape": [batch, width, res, res]}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        xd, wd = x.to(dtype), w.to(dtype)
        torch.nn.functional.conv2d(xd, wd, padding=1)
        seconds = fastest(lambda xd=xd, wd=wd: torch.nn.functional.conv2d(xd, wd, padding=1), device, rounds=5)
        out[f"{name}_ms"] = round(seconds * 1e3, 3)
    out["bfloat16_speedup"] = round(out["float32_ms"] / out["bfloat16_ms"], 3)
    return out


def main() -> None:
    device, presets = device_and_presets(__doc__.split("\n\n")[0])
    results = []
    for preset in presets:
        log(f"[{device}] {preset}")
        results.append({**conv_share(preset, device), "one_convolution": conv_precision(preset, device)})
    print(json.dumps({"command": shlex.join(["python", *sys.argv]), "machine": machine_info([device.type]),
                      "device": str(device), "results": results}, indent=2))


if __name__ == "__main__":
    main()
