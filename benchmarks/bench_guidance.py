"""Unguided vs classifier-free guidance vs autoguidance, each with and without a guidance interval, on a CPU-sized
model; and the 2D toy's exact log-likelihood per method. Prints one JSON document, writes the plots.

    python benchmarks/bench_guidance.py [--workdir DIR] [--main-kimg 64] [--samples 1000] [--steps 32]
                                        [--weights 1,1.25,1.5,2,2.5,3] [--interval 0.3,3] [--no-toy]
                                        [--toy-steps N] [--toy-interval 0,0.5]

Digits (8x8, 10 classes, the built-in data): the main model is `cpu-digits8` trained for --main-kimg thousand
images (Ki); the classifier-free guide is the same recipe at 16 channels, unconditional, trained as long; the
autoguide is the same recipe at 16 channels, conditional, trained a quarter as long (a smaller and
shorter-trained version of the main model, the autoguidance paper's recipe), at two EMA lengths. Every method
samples the same seeds (seed i of class i mod 10) and is judged by the digits judge: class accuracy and the
Frechet distance in its features. The toy part trains the 2D models of `edm2 toy` and measures the exact
log-likelihood of each method's samples under the true class density.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from _shared import log, machine_info

from edm2.files import load_network
from edm2.metrics.digits import DigitsJudge
from edm2.metrics.guidance_sweep import Guide, JudgeScore, guidance_sweep
from edm2.sampling import SamplerSettings
from edm2.training import TrainOptions, train

Ki = 1024


def train_model(outdir: Path, kimg: int, channels: int | None, cond: bool) -> float:
    """Train one digits model (cpu-digits8 recipe) unless its run is complete; seconds spent."""
    start = time.perf_counter()
    opts = TrainOptions(outdir=str(outdir), data="digits", preset="cpu-digits8", duration=kimg * Ki,
                        channels=channels, cond=cond, snapshot=kimg * Ki // 4, checkpoint=kimg * Ki // 2,
                        status=kimg * Ki // 4, device="cpu")
    result = train(opts, progress=False)
    log(f"  {outdir.name}: {result['status']} at {result['nimg']} images, {time.perf_counter() - start:.0f} s")
    return time.perf_counter() - start


def final_snapshot(run: Path, sigma_rel: float):
    return load_network(sorted(run.glob(f"snapshot-*-{sigma_rel:.3f}.safetensors"))[-1])[0]


def digits_study(workdir: Path, main_kimg: int, samples: int, steps: int, weights: list[float],
                 interval: tuple[float, float]) -> dict:
    log("training the main model, the classifier-free guide and the autoguide ...")
    seconds = {"main": train_model(workdir / "main", main_kimg, None, True),
               "uncond": train_model(workdir / "uncond", main_kimg, 16, False),
               "autoguide": train_model(workdir / "autoguide", max(main_kimg // 4, 4), 16, True)}
    net = final_snapshot(workdir / "main", 0.10)
    guides = {"cfg": [Guide("cfg (uncond C=16)", final_snapshot(workdir / "uncond", 0.10), 0.10)],
              "autoguidance": [Guide(f"autog (C=16, 1/4 length, EMA {s:.2f})", final_snapshot(workdir / "autoguide",
                                                                                          s), s) for s in (0.05, 0.10)]}
    score = JudgeScore(DigitsJudge(), samples)
    rows, baseline = [], None
    for band in (None, interval):
        settings = SamplerSettings(num_steps=steps, guidance_interval=band)
        for method, gs in guides.items():
            log(f"sampling {method}{' with interval ' + str(band) if band else ''} ...")
            table = guidance_sweep(net, gs, weights, score, "fd", settings, echo=log)
            baseline = table.baseline
            rows += [{"method": method, "interval": band, **r} for r in table.rows]
    best = {}
    for method in guides:
        for band in (None, interval):
            mine = [r for r in rows if r["method"] == method and r["interval"] == band]
            key = f"{method}{' + interval' if band else ''}"
            best[key] = min(mine, key=lambda r: r["fd"])
    return {"train_seconds": seconds, "unguided": baseline, "best": best, "rows": rows}


def plot_digits(study: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=120)
    curves = {}
    for r in study["rows"]:
        label = f"{r['guide']}{' + interval' if r['interval'] else ''}"
        curves.setdefault(label, []).append(r)
    for ax, key in zip(axes, ("fd", "accuracy")):
        for label, rs in curves.items():
            ax.plot([r["weight"] for r in rs], [r[key] for r in rs], "o-" if "interval" not in label else "s--",
                    ms=3, label=label)
        ax.axhline(study["unguided"][key], color="gray", lw=0.8, label="no guidance")
        ax.set_xlabel("guidance weight w")
        ax.set_ylabel("judge Frechet distance" if key == "fd" else "class accuracy")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("digits: guidance methods against weight (lower FD is better)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def toy_study(workdir: Path, toy_steps: int | None, interval: tuple[float, float]) -> dict:
    """The 2D toy: train its three models (unless done), sample each method with and without a guidance interval,
    exact mean log-likelihood of the samples under the true class density; the figures."""
    from edm2.toy.experiment import DEFAULT_GUIDANCE, MODEL_FILES, load_models, plot_run, train_models

    rundir = workdir / "toy"
    start = time.perf_counter()
    if not all((rundir / f).is_file() for f in MODEL_FILES.values()):
        log("training the toy models ...")
        train_models(rundir, steps=toy_steps)
    trained = time.perf_counter() - start
    models = load_models(rundir)
    plain = plot_run(models, rundir / "toy.png", DEFAULT_GUIDANCE, results_json=rundir / "toy_results.json")
    banded = plot_run(models, rundir / "toy_interval.png", DEFAULT_GUIDANCE, interval=interval)
    return {"train_seconds": trained, "guidance": DEFAULT_GUIDANCE, "log_likelihood": plain,
            "log_likelihood_with_interval": {"interval": interval, **banded},
            "figures": [str(rundir / "toy.png"), str(rundir / "toy_interval.png")]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("bench-guidance"))
    parser.add_argument("--main-kimg", type=int, default=64)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--weights", default="1,1.25,1.5,2,2.5,3")
    parser.add_argument("--interval", default="0.3,3")
    parser.add_argument("--no-toy", action="store_true")
    parser.add_argument("--toy-steps", type=int, help="toy training steps (default: edm2 toy train's)")
    parser.add_argument("--toy-interval", default="0,0.5", help="the toy's guidance interval")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    weights = [float(w) for w in args.weights.split(",")]
    lo, hi = (float(v) for v in args.interval.split(","))
    study = digits_study(args.workdir, args.main_kimg, args.samples, args.steps, weights, (lo, hi))
    plot_digits(study, args.workdir / "guidance_digits.png")
    result = {"benchmark": "guidance", "machine": machine_info(["cpu"]), "settings": vars(args) | {
        "workdir": str(args.workdir)}, "digits": study, "digits_plot": str(args.workdir / "guidance_digits.png")}
    if not args.no_toy:
        toy_band = tuple(float(v) for v in args.toy_interval.split(","))
        result["toy"] = toy_study(args.workdir, args.toy_steps, toy_band)
    result["seconds"] = time.perf_counter() - start
    json.dump(result, sys.stdout, indent=2, default=str)
    print()


if __name__ == "__main__":
    main()
