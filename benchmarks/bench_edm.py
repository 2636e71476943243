"""Training and sampling speed of an EDM (2022) network next to an EDM2 network, in one process; one JSON
document on stdout (progress on stderr).

    python benchmarks/bench_edm.py [--presets edm-cifar10-ddpmpp-edm,cpu-rgb32] [--batch 32] [--device cpu|cuda]
                                   [--rounds 2] [--steps 2]

Per preset: parameters and GFLOPs per evaluation (`edm2.complexity`), training images/s (one optimizer step of
`--batch` random images through `edm2.training.train_step`, the preset's own recipe: for edm-* presets its
loss, augmentation and Adam; fastest of `--rounds` steps after one untimed step), and sampling images/s
(`edm2.generate.sample_batch` with `--steps` Heun steps, 2 steps - 1 evaluations, fastest of `--rounds`); the
sampling rate is also scaled to the EDM paper's CIFAR-10 setting, 18 steps (35 evaluations), as
batch / (35 x seconds per evaluation). The ratios compare the first preset with the second, measured in turns
in this same run; absolute numbers depend on the machine (reported) and on what else runs on it.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from _shared import fastest, log, machine_info, random_trainer

from edm2.complexity import count_complexity
from edm2.generate import sample_batch
from edm2.presets import get_preset
from edm2.sampling import SamplerSettings
from edm2.training import train_step

EDM_CIFAR_NFE = 35  # 18 Heun steps, the EDM paper's CIFAR-10 sampler


def measure(preset: str, batch: int, device: torch.device, rounds: int, steps: int) -> dict:
    log(f"{preset}: building")
    c = count_complexity(get_preset(preset).network)
    t = random_trainer(preset, batch, device)
    cur = [0]

    def step() -> None:
        train_step(t, cur[0], t.data.micro_batches(cur[0]))
        cur[0] += batch

    log(f"{preset}: training (1 untimed + {rounds} timed steps of {batch})")
    step()
    train_s = fastest(step, device, rounds)
    net = t.net.eval().requires_grad_(False)
    settings = SamplerSettings(num_steps=steps)
    seeds = list(range(batch))
    log(f"{preset}: sampling ({rounds} x {steps} Heun steps, {settings.evaluations} evaluations)")
    sample_s = fastest(lambda: sample_batch(net, seeds, settings=settings, device=device), device, rounds)
    per_eval = sample_s / settings.evaluations
    return {"preset": preset, "parameters": c.parameters, "gflops_per_eval": round(c.gflops, 3),
            "network": type(net).__name__, "train_seconds_per_step": train_s, "train_images_per_s": batch / train_s,
            "sample_seconds": sample_s, "sample_steps": steps, "sample_evaluations": settings.evaluations,
            "sample_images_per_s": batch / sample_s,
            f"sample_images_per_s_at_{EDM_CIFAR_NFE}_evaluations": batch / (EDM_CIFAR_NFE * per_eval)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="edm-cifar10-ddpmpp-edm,cpu-rgb32", help="two comma-separated presets")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="Heun steps of the timed sampling")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch.cuda.is_available() is False")
    device = torch.device(args.device)
    start = time.perf_counter()
    results = [measure(p, args.batch, device, args.rounds, args.steps) for p in args.presets.split(",")]
    out = {"machine": machine_info([args.device]), "batch": args.batch, "results": results,
           "wall_seconds": time.perf_counter() - start}
    if len(results) == 2:
        a, b = results
        out["ratio_first_to_second"] = {
            "train_images_per_s": a["train_images_per_s"] / b["train_images_per_s"],
            "sample_images_per_s": a["sample_images_per_s"] / b["sample_images_per_s"],
            "parameters": a["parameters"] / b["parameters"], "gflops_per_eval": a["gflops_per_eval"] / b[
                "gflops_per_eval"]}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
