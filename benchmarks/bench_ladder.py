"""EDM2's ablation ladder at CPU scale: configurations B to G (Table 1) trained on the same data for the same number of
images, judged at their best post-hoc EMA, with the Figure 3 magnitudes of C, D and E and the Figure 5a curves.

    OMP_NUM_THREADS=1 python benchmarks/bench_ladder.py [--datasets glyphs32,shapes32] [--configs B,C,D,E,F,G]
        [--duration 24576] [--work bench-ladder] [--samples 200] [--steps 12] > result.json

For each dataset (`recipe_data.py`: grey digits from 20 fonts, colour shapes; 20000 images) a judge is trained once
(`edm2.metrics.judge`); each configuration trains the dataset's CPU preset (cpu-gray32 / cpu-rgb32; G is the preset
itself) with `--config`, single-threaded; the EMA length is chosen post hoc over a grid and the best length's
Frechet distance and class accuracy in the judge's feature space are reported, with the whole curve (Figure 5a).
The growth of the magnitudes (median over blocks of last / first status report, `edm2.training.dynamics.growth`)
checks Figure 3's claims: C, activations and weights grow; D, activations flat and weights grow; E, both flat.
`instrument_cost` measures what the magnitudes cost: a measured step against a plain one, and that difference
spread over the status interval. Results go to `--work` as they come (a rerun skips finished cells); the JSON
document to stdout; the plots beside it (`--plots`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from _shared import log, machine_info
from bench_recipes import judge_for, judge_sweep

from edm2.data import open_dataset
from edm2.metrics.judge import Judge
from edm2.presets import get_preset
from edm2.training import TrainOptions, train
from edm2.training.dynamics import DynamicsProbe, growth, plot_dynamics, read_dynamics
from edm2.training.ladder import config_preset
from edm2.training.options import resolve_run
from edm2.training.step import setup, train_step

GRID = (0.03, 0.05, 0.08, 0.12, 0.17, 0.23)
PRESET_FOR_CHANNELS = {1: "cpu-gray32", 3: "cpu-rgb32"}


def run_config(name: str, data: Path, judge: Judge, config: str, duration: int, work: Path, samples: int,
               steps: int) -> dict:
    """Train one configuration and judge its EMA grid."""
    tag = f"{name}-{config}"
    outdir = work / "runs" / tag
    preset = PRESET_FOR_CHANNELS[judge.net.channels]
    log(f"[{tag}] training {duration} images ...")
    result = train(TrainOptions(outdir=str(outdir), data=str(data), preset=preset, config=config, duration=duration,
                                device="cpu", workers=0), progress=False)
    run = result["run"]
    log(f"[{tag}] {result['nimg']} images in {result['seconds']:.0f} s; judging the EMA grid ...")
    start = time.process_time()
    sweep = judge_sweep(outdir, work / "sweeps" / tag, tag, judge, samples, steps, GRID)
    _, series = read_dynamics(outdir)
    best = sweep.best
    return {"dataset": name, "config": config, "preset": preset, "images": result["nimg"], "lr": run["lr"],
            "decay": run["decay"], "train_s": round(result["seconds"], 1),
            "eval_cpu_s": round(time.process_time() - start, 1), "best_sigma_rel": best["sigma_rel"],
            "fd": best["fd"], "accuracy": best["accuracy"],
            "growth": {kind: growth(values) for kind, values in series.items()},
            "sweep": [{k: r[k] for k in ("sigma_rel", "fd", "accuracy")} for r in sweep.rows]}


def instrument_cost(data: Path, preset: str, rounds: int = 12) -> dict:
    """Seconds per training step with and without the magnitudes measured, and the relative cost at the preset's
    status interval (one measured step per interval)."""
    dataset = open_dataset(str(data))
    p = get_preset(preset)
    run = resolve_run(TrainOptions(outdir="unused", data=str(data), preset=preset, device="cpu", workers=0), dataset)
    t = setup(run, dataset, torch.device("cpu"))
    probe = DynamicsProbe(t.net)
    times = {"plain": [], "measured": []}
    with t.data.steps(0) as batches:
        for i in range(2 * rounds + 2):
            kind = "measured" if i % 2 else "plain"
            start = time.perf_counter()
            if kind == "measured":
                with probe.measuring(t.optimizer):
                    train_step(t, i * run.batch, next(batches))
                probe.collect()
            else:
                train_step(t, i * run.batch, next(batches))
            if i >= 2:
                times[kind].append(time.perf_counter() - start)
    plain, measured = (sorted(v)[len(v) // 2] for v in times.values())
    interval_steps = max(p.training.status // run.batch, 1)
    return {"preset": preset, "step_s": plain, "measured_step_s": measured, "status_every_steps": interval_steps,
            "relative_cost_at_status_interval": (measured - plain) / plain / interval_steps}


def plot_ema_curves(rows: list[dict], path: Path) -> None:
    """Figure 5a: Frechet distance against EMA length, one line per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from edm2.files import save_figure

    datasets = sorted({r["dataset"] for r in rows})
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4), squeeze=False)
    for ax, name in zip(axes[0], datasets):
        for r in (r for r in rows if r["dataset"] == name):
            ax.plot([s["sigma_rel"] for s in r["sweep"]], [s["fd"] for s in r["sweep"]], "o-", ms=3,
                    label=f"config {r['config']} (best {r['fd']:.1f})")
        ax.set_xlabel("EMA length sigma_rel")
        ax.set_ylabel("Frechet distance (judge features)")
        ax.set_title(f"{name}: quality vs EMA length per configuration", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", default="glyphs32,shapes32")
    parser.add_argument("--configs", default="B,C,D,E,F,G")
    parser.add_argument("--duration", type=int, default=24576, help="training images per configuration")
    parser.add_argument("--work", default="bench-ladder", help="folder for data, judges, runs and partial results")
    parser.add_argument("--images", type=int, default=20000, help="images per synthetic dataset")
    parser.add_argument("--samples", type=int, default=200, help="samples judged per EMA length")
    parser.add_argument("--steps", type=int, default=12, help="Heun steps per sample")
    parser.add_argument("--plots", default=None, help="folder of the plots  [default: WORK]")
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = Path(args.work)
    plots = Path(args.plots) if args.plots else work
    plots.mkdir(parents=True, exist_ok=True)
    cells_file = work / "cells.jsonl"
    done = [json.loads(line) for line in cells_file.read_text().splitlines()] if cells_file.exists() else []
    judges, costs = {}, {}
    for name in args.datasets.split(","):
        data, judge = judge_for(name, work, args.images)
        judges[name] = {"data": str(data), "real_accuracy": judge.real_accuracy}
        costs[name] = instrument_cost(data, PRESET_FOR_CHANNELS[judge.net.channels])
        log(f"{name}: instruments cost {100 * costs[name]['relative_cost_at_status_interval']:.2f} % of training")
        for config in args.configs.split(","):
            key = (name, config, args.duration, args.samples, args.steps)
            if any((d["dataset"], d["config"], d["images"], d["samples"], d["heun_steps"]) == key for d in done):
                continue
            row = {**run_config(name, data, judge, config, args.duration, work, args.samples, args.steps),
                   "samples": args.samples, "heun_steps": args.steps}
            done.append(row)
            with cells_file.open("a") as f:
                f.write(json.dumps(row) + "\n")
            log(f"  -> config {config}: best sigma_rel {row['best_sigma_rel']:.2f}, FD {row['fd']:.1f}, accuracy "
                f"{100 * row['accuracy']:.1f} %, growth {row['growth']}")
        runs = {f"{name} config {c}": work / "runs" / f"{name}-{c}" for c in "CDE" if c in args.configs.split(",")}
        if runs:
            judges[name]["figure3"] = plot_dynamics(runs, plots / f"ladder_dynamics_{name}.png")
    rows = [d for d in done if d["dataset"] in set(args.datasets.split(","))]
    if rows:
        plot_ema_curves(rows, plots / "ladder_ema.png")
    json.dump({"machine": machine_info(["cpu"]), "command": " ".join(sys.argv), "threads": 1,
               "judges": judges, "instrument_cost": costs,
               "configs": {c: config_preset(get_preset("cpu-rgb32"), c).description for c in args.configs.split(",")},
               "rows": rows}, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
