"""Speed of the fast paths against the plain float32 eager path, side by side in one process; one JSON
document on stdout (progress on stderr).

    python benchmarks/bench_speed.py [--presets cpu-digits8,edm2-img64-xs] [--device cpu|cuda]
                                     [--threads N] [--compile] [--rounds R] [--low-precision bf16|fp16]

Every variant runs the same work on the same network, data and noise: a training step (EDM2 loss forward
and backward, gradient guard, Adam, two power EMAs) and EDM sampling (Heun) in eval mode. "plain" is the
official-numbers path: float32, eager, explicit attention, vector_norm, weights normalized at every call,
for-loop Adam. Each other variant switches fast paths on, alone and then all together, and reports its
speed-up over "plain" measured in this same process, next to the largest absolute difference of its
outputs from those of "plain" (sampled images in [-1, 1]; weights after the timed training steps).
Variants are timed in turns, `--rounds` times, and the fastest round counts, which keeps the ratios
meaningful on a machine shared with other work. Peak memory: on CUDA the allocator's peak per variant,
on the CPU the peak resident set size of the process while the variant ran (sampled every 5 ms).

Workloads: `cpu-digits8` and `edm2-img64-xs` on the CPU, `edm2-img512-xs` and `edm2-img512-s` on CUDA
(when present). img64-xs costs seconds per network evaluation on a CPU, so it gets a batch of 2 and
few sampling steps there; images/s scale to other step counts as 1 / (2 steps - 1).

`--compile` adds torch.compile variants; their first call (which compiles, minutes on a small CPU with a
cold inductor cache) is reported as compile_seconds and not timed.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import shlex
import sys
import threading
import time
from dataclasses import dataclass

import torch
from _shared import log, machine_info, random_trainer, sync

from edm2.ema import PowerFunctionEMA
from edm2.layers import fast_paths
from edm2.networks import Precond
from edm2.presets import get_preset
from edm2.sampling import edm_sampler
from edm2.training import make_adam, train_step


@dataclass(frozen=True)
class Variant:
    """One combination of fast paths."""

    name: str
    precision: str = "fp32"
    weight_cache: bool = False
    sdpa: bool = False
    strided_norm: bool = False
    channels_last: bool = False
    fused_adam: bool = False  # Adam in one fused kernel over all tensors (CPU and CUDA), as the trainer
    compile: bool = False


def sample_variants(low: str, with_compile: bool) -> list[Variant]:
    fast = dict(weight_cache=True, sdpa=True, strided_norm=True)
    out = [
        Variant("plain"),
        Variant("weight_cache", weight_cache=True),
        Variant("sdpa", sdpa=True),
        Variant("strided_norm", strided_norm=True),
        Variant("channels_last", channels_last=True),
        Variant(low, precision=low),
        Variant(f"{low}+channels_last", precision=low, channels_last=True),
        Variant("all_fp32", **fast),
        Variant("all", precision=low, channels_last=True, **fast),
    ]
    if with_compile:
        out += [Variant("compile_fp32", compile=True, **fast),
                Variant("all+compile", precision=low, channels_last=True, compile=True, **fast)]
    return out


def train_variants(low: str, with_compile: bool) -> list[Variant]:
    out = [
        Variant("plain"),
        Variant("fused_adam", fused_adam=True),
        Variant("sdpa+strided_norm", sdpa=True, strided_norm=True),
        Variant("channels_last", channels_last=True),
        Variant(low, precision=low),
        Variant(f"{low}+channels_last", precision=low, channels_last=True),
        Variant("all_fp32", fused_adam=True, sdpa=True, strided_norm=True),
        Variant("all", precision=low, channels_last=True, fused_adam=True, sdpa=True, strided_norm=True),
    ]
    if with_compile:
        out += [Variant("compile_fp32", fused_adam=True, sdpa=True, strided_norm=True, compile=True),
                Variant("all+compile", precision=low, channels_last=True, fused_adam=True, sdpa=True,
                        strided_norm=True, compile=True)]
    return out


@dataclass(frozen=True)
class Plan:
    """Work per workload: training batch, untimed and timed steps; sampling batch, Heun steps, timed runs."""

    train_batch: int
    train_warmup: int
    train_iters: int
    sample_batch: int
    sample_steps: int
    sample_runs: int


PLANS = {
    ("cpu-digits8", "cpu"): Plan(128, 2, 4, 32, 16, 1),
    ("edm2-img64-xs", "cpu"): Plan(2, 1, 1, 2, 2, 1),
    ("edm2-img512-xs", "cuda"): Plan(64, 5, 20, 64, 32, 1),
    ("edm2-img512-s", "cuda"): Plan(64, 5, 20, 64, 32, 1),
}
DEFAULT_PRESETS = {"cpu": ["cpu-digits8", "edm2-img64-xs"], "cuda": ["edm2-img512-xs", "edm2-img512-s"]}


class PeakMemory:
    """Peak memory while the block runs: CUDA allocator peak, or the process's resident set size."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0
        self._stop = threading.Event()

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _watch(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss())

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif os.path.exists("/proc/self/statm"):
            self.peak = self._rss()
            self._thread = threading.Thread(target=self._watch, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif hasattr(self, "_thread"):
            self._stop.set()
            self._thread.join()

    @property
    def mib(self) -> float:
        return round(self.peak / 2**20, 1)


def build_net(preset: str, device: torch.device) -> Precond:
    """The preset's network with every learned gain in U(0.2, 1) (at initialization they are 0, which hides
    the U-Net), so that every layer shapes the outputs being compared."""
    torch.manual_seed(0)
    net = Precond(**get_preset(preset).network.to_dict())
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim == 0:
                p.copy_(torch.rand([], generator=gen) * 0.8 + 0.2)
    return net.to(device)


def prepare(net: Precond, v: Variant, train: bool) -> tuple[Precond, torch.nn.Module]:
    """(the network, the callable to run) for variant `v`."""
    net = net.train().requires_grad_(True) if train else net.eval().requires_grad_(False)
    net.set_precision(v.precision)
    if v.channels_last:
        net = net.to(memory_format=torch.channels_last)
    return net, torch.compile(net) if v.compile else net


def switches(v: Variant):
    return fast_paths(weight_cache=v.weight_cache, sdpa=v.sdpa, strided_norm=v.strided_norm)


def bench_sampling(base: Precond, v: Variant, plan: Plan, device: torch.device) -> tuple[dict, torch.Tensor]:
    gen = torch.Generator(device).manual_seed(2)
    noise = torch.randn([plan.sample_batch, base.img_channels, base.img_resolution, base.img_resolution],
                        device=device, generator=gen)
    labels = None
    if base.label_dim:
        classes = torch.randint(base.label_dim, [plan.sample_batch], device=device, generator=gen)
        labels = torch.nn.functional.one_hot(classes, base.label_dim).float()
    net, model = prepare(copy.deepcopy(base), v, train=False)
    with switches(v), torch.no_grad(), PeakMemory(device) as mem:
        start = time.perf_counter()
        edm_sampler(model, noise, labels, num_steps=1)  # warm-up (and compilation): one evaluation
        sync(device)
        warmup = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(plan.sample_runs):
            images = edm_sampler(model, noise, labels, num_steps=plan.sample_steps)
        sync(device)
        seconds = time.perf_counter() - start
    result = {"seconds": seconds, "images_per_s": plan.sample_runs * plan.sample_batch / seconds,
              "peak_memory_MiB": mem.mib, "finite": bool(torch.isfinite(images).all())}
    if v.compile:
        result["compile_seconds"] = round(warmup, 1)
    return result, images.float().cpu()


def bench_training(base: Precond, v: Variant, plan: Plan, device: torch.device, preset: str) -> tuple[dict, dict]:
    """`edm2.training.train_step` (what the trainer runs) with the variant's switches, from `base`'s weights."""
    t = random_trainer(preset, plan.train_batch, device, precision=v.precision, compile=v.compile)
    t.net.load_state_dict(base.state_dict())
    t.net.to(memory_format=torch.channels_last if v.channels_last else torch.contiguous_format)
    t.optimizer = make_adam(t.net.parameters(), fused=True) if v.fused_adam else \
        make_adam(t.net.parameters(), foreach=False)
    ema = PowerFunctionEMA(t.net, stds=t.run.ema_stds)
    batch = plan.train_batch
    # From the end of the learning-rate warm-up, so that the steps are visible in the weights; the data and
    # the noise depend on the image count only, so every variant sees the same.
    cur_nimg = -(-int(t.run.rampup_Mimg * 1e6) // batch) * batch
    losses = []

    def step() -> None:
        nonlocal cur_nimg
        loss, _ = train_step(t, cur_nimg, t.data.micro_batches(cur_nimg))
        cur_nimg += batch
        ema.update(cur_nimg=cur_nimg, batch_size=batch)
        losses.append(loss)

    with switches(v), PeakMemory(device) as mem:
        start = time.perf_counter()
        for _ in range(plan.train_warmup):
            step()
        sync(device)
        warmup = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(plan.train_iters):
            step()
        sync(device)
        seconds = time.perf_counter() - start
    last_loss = float(losses[-1])
    result = {"seconds": seconds, "images_per_s": plan.train_iters * batch / seconds, "peak_memory_MiB": mem.mib,
              "last_loss": last_loss}
    if v.compile:
        result["compile_seconds"] = round(warmup, 1)
    weights = {k: w.detach().float().cpu() for k, w in t.net.state_dict().items()}
    weights["loss"] = torch.tensor(last_loss)
    return result, weights


def compare_images(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def compare_weights(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a if k != "loss")


def run_workload(preset: str, device: torch.device, plan: Plan, rounds: int, low: str, with_compile: bool,
                 only: list[str] | None = None, kinds: tuple[str, ...] = ("sample", "train")) -> dict:
    base = build_net(preset, device)
    entry = {"preset": preset, "device": str(device), "plan": dataclasses.asdict(plan),
             "parameters": sum(p.numel() for p in base.parameters())}
    all_kinds = {"sample": sample_variants(low, with_compile), "train": train_variants(low, with_compile)}
    for kind in kinds:
        variants = [v for v in all_kinds[kind] if only is None or v.name in only or v.name == "plain"]
        best: dict[str, dict] = {}
        outputs: dict[str, object] = {}
        for r in range(rounds):
            for v in variants:
                if v.compile and r > 0:
                    continue  # compiled once; one round (the compile cost dominates its first)
                log(f"[{device}] {preset} {kind} {v.name} (round {r + 1}/{rounds})")
                if kind == "sample":
                    res, out = bench_sampling(base, v, plan, device)
                else:
                    res, out = bench_training(base, v, plan, device, preset)
                if v.name not in best or res["seconds"] < best[v.name]["seconds"]:
                    best[v.name] = res
                outputs[v.name] = out
        table = {}
        for v in variants:
            res = best[v.name]
            diff = compare_images(outputs[v.name], outputs["plain"]) if kind == "sample" else \
                compare_weights(outputs[v.name], outputs["plain"])
            table[v.name] = {
                "speedup_vs_plain": round(best["plain"]["seconds"] / res["seconds"], 3),
                "max_abs_diff_vs_plain": float(f"{diff:.3g}"),
                "images_per_s": round(res["images_per_s"], 3),
                "seconds": round(res["seconds"], 3),
                **{k: v_ for k, v_ in res.items() if k not in ("seconds", "images_per_s")},
                "switches": {k: val for k, val in dataclasses.asdict(v).items() if k != "name"},
            }
        entry[kind] = table
    del base
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="only this device (default: cpu, plus cuda when available)")
    parser.add_argument("--presets", default=None, help="comma-separated workloads (default: per device)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds per variant (the fastest counts)")
    parser.add_argument("--compile", action="store_true", help="add torch.compile variants")
    parser.add_argument("--variants", default=None, help="comma-separated subset of the variants (plain always)")
    parser.add_argument("--kinds", default="sample,train", help="sample, train or both")
    parser.add_argument("--low-precision", choices=["bf16", "fp16"], default="bf16",
                        help="the low precision of the mixed-precision variants (fp16: CUDA only)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch.cuda.is_available() is False")
    if args.threads:
        torch.set_num_threads(args.threads)
    device_types = [args.device] if args.device else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if args.low_precision == "fp16" and "cpu" in device_types:
        parser.error("--low-precision fp16 needs --device cuda")

    results = []
    total_start = time.perf_counter()
    for dtype in device_types:
        device = torch.device(dtype)
        presets = args.presets.split(",") if args.presets else DEFAULT_PRESETS[dtype]
        for preset in presets:
            plan = PLANS.get((preset, dtype))
            if plan is None:
                parser.error(f"no plan for {preset} on {dtype}; known: {sorted(PLANS)}")
            only = args.variants.split(",") if args.variants else None
            results.append(run_workload(preset, device, plan, args.rounds, args.low_precision, args.compile, only,
                                        tuple(args.kinds.split(","))))
    report = {
        "command": shlex.join(["python", *sys.argv]),
        "machine": machine_info(device_types),
        "results": results,
        "total_seconds": round(time.perf_counter() - total_start, 1),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
