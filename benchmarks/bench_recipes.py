"""Sample quality at a CPU budget: the default recipe before issue #12 against the one after, side by side.

    OMP_NUM_THREADS=1 python benchmarks/bench_recipes.py [--budgets 5,15,45] [--datasets glyphs32,shapes32]
        [--recipes before,after] [--work bench-recipes] [--samples 200] [--steps 10] > result.json

For each dataset (synthetic, `recipe_data.py`: grey digits from 20 fonts, colour shapes; 20000 images each) a judge
is trained once (`edm2.metrics.judge`); for each budget (single-thread CPU minutes, measured as process CPU time
by `--budget-clock cpu`) and recipe a model is trained with `--budget`, the EMA length is chosen post hoc (a grid
of sigma_rel, the lengths the snapshots support), and the best length's class accuracy and Frechet distance in
the judge's feature space are reported. Recipes:

- `before`: the defaults before the issue: for grey 32x32 the old cpu-gray28 network at 32x32 (C=32, two blocks
  per level), for colour the old cpu-rgb32 preset (C=64, four levels); batch 128, lr 0.01, decay 5000 batches,
  warm-up 50000 images, EMAs 0.05/0.10, whatever the budget (the same snapshot density as `after`);
- `after`: `--preset auto --budget B`, nothing else;
- `after:lr=0.02,batch=32,P_mean=-0.4,...`: `after` with options changed (the sweep in docs/recipes.md); in
  `--recipes` a `key=value` without a recipe name belongs to the recipe before it.

Results go to `--work` as they come (a rerun skips finished cells) and the JSON document to stdout; the plot
(`--plot`) shows Frechet distance and accuracy against the budget per dataset and recipe.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
from _shared import log, machine_info
from recipe_data import dataset_file

from edm2.data import open_dataset
from edm2.ema.sweep import ema_sweep
from edm2.metrics.judge import Judge, JudgeQuality, train_judge
from edm2.presets import PRESETS, NetworkConfig, Preset, TrainingConfig
from edm2.training import TrainOptions, train
from edm2.training.recipes import choose_preset

DATASETS = {"glyphs32": ("glyphs", 32), "shapes32": ("shapes", 32), "photos32": ("photos", 32)}
GRID = (0.05, 0.10, 0.15, 0.20)
OLD_TRAINING = TrainingConfig(batch_size=128, duration=2 << 20, lr=0.0100, decay=5000, rampup_Mimg=0.05, P_mean=-0.8,
                              P_std=1.6)
OLD_NETWORKS = {
    1: NetworkConfig(img_resolution=32, img_channels=1, label_dim=10, model_channels=32, channel_mult=(1, 2, 2),
                     num_blocks=2, attn_resolutions=(8,), use_fp16=False),
    3: NetworkConfig(img_resolution=32, img_channels=3, label_dim=10, model_channels=64, channel_mult=(1, 2, 2, 2),
                     num_blocks=2, attn_resolutions=(8,), use_fp16=False),
}
FIELDS = {"lr": float, "batch": int, "P_mean": float, "P_std": float, "decay": float, "rampup": int,
          "dropout": float, "preset": str, "channels": int, "config": str, "seed": int}
# Network changes a recipe may ask for on top of the preset `--preset auto` chooses: attention resolutions
# ('attn=8', 'attn=16+8', 'attn=none').
NETWORK_FIELDS = ("attn",)


def recipe_options(recipe: str, data: Path, channels: int, budget_s: float, outdir: Path) -> TrainOptions:
    """The TrainOptions of a recipe name (see the module docstring)."""
    base = dict(outdir=str(outdir), data=str(data), budget=budget_s, budget_clock="cpu", device="cpu")
    if recipe == "before":
        old = Preset("before", "defaults before issue 12", OLD_NETWORKS[channels], OLD_TRAINING)
        return TrainOptions(**base, preset=old, batch=128, lr=0.01, decay=5000, rampup=50_000,
                            ema_stds=(0.05, 0.10))
    name, _, changes = recipe.partition(":")
    if name != "after":
        raise ValueError(f"unknown recipe {recipe!r}")
    opts = TrainOptions(**base)
    for item in filter(None, changes.split(",")):
        key, _, value = item.partition("=")
        if key == "attn":
            dataset = open_dataset(str(data))
            preset = choose_preset(dataset.resolution, channels, len(dataset), "cpu")[0]
            attn = () if value == "none" else tuple(int(r) for r in value.split("+"))
            preset = dataclasses.replace(preset, network=preset.network.replace(attn_resolutions=attn))
            opts = dataclasses.replace(opts, preset=preset)
            continue
        opts = dataclasses.replace(opts, **{key: FIELDS[key](value)})
    return opts


def split_recipes(text: str) -> list[str]:
    """`before,after:lr=0.02,batch=32,after` -> ['before', 'after:lr=0.02,batch=32', 'after']: a `key=value`
    piece without a recipe name continues the recipe before it."""
    recipes: list[str] = []
    for piece in text.split(","):
        if ":" not in piece and "=" in piece and recipes and recipes[-1].startswith("after"):
            recipes[-1] += ("," if ":" in recipes[-1] else ":") + piece
        else:
            recipes.append(piece)
    return recipes


def judge_for(name: str, work: Path, images: int) -> tuple[Path, Judge]:
    kind, res = DATASETS[name]
    data = dataset_file(kind, res, images, work / "data")
    path = work / "data" / f"judge-{name}-{images}.safetensors"
    if not path.exists():
        log(f"{name}: training the judge ...")
        train_judge(open_dataset(data)).save(path)
    judge = Judge.load(path)
    log(f"{name}: judge held-out accuracy {100 * judge.real_accuracy:.1f} %")
    return data, judge


def judge_sweep(run: Path, outdir: Path, tag: str, judge: Judge, samples: int, steps: int, grid: tuple[float, ...]):
    """The EMA grid of a run (the lengths its snapshots support) judged: the `ema_sweep` result."""
    return ema_sweep(run, outdir, grid, JudgeQuality(judge, samples, steps), key="fd", skip_unsupported=True,
                     json_path="sweep.json", plot_path="sweep.png", secondary="accuracy",
                     title=f"{tag}: quality vs EMA length", echo=log)


def run_cell(name: str, data: Path, judge: Judge, budget_min: float, recipe: str, work: Path, samples: int,
             steps: int, grid: tuple[float, ...] = GRID) -> dict:
    """Train one model within the budget and judge its best post-hoc EMA."""
    tag = f"{name}-{budget_min:g}min-{recipe.replace(':', '-').replace(',', '-').replace('=', '')}"
    outdir = work / "runs" / tag
    opts = recipe_options(recipe, data, judge.net.channels, 60 * budget_min, outdir)
    log(f"[{tag}] training for {budget_min:g} CPU-minutes ...")
    result = train(opts, progress=False)
    run = result["run"]
    log(f"[{tag}] {run['preset']}: {result['nimg']} images in {result['seconds']:.0f} s; judging the EMA grid ...")
    start = time.process_time()
    sweep = judge_sweep(outdir, work / "sweeps" / tag, tag, judge, samples, steps, grid)
    best = sweep.best
    return {"dataset": name, "budget_min": budget_min, "recipe": recipe, "preset": run["preset"],
            "network": {k: run["network"][k] for k in ("model_channels", "channel_mult", "num_blocks",
                                                       "attn_resolutions")},
            "batch": run["batch"], "lr": run["lr"], "decay": run["decay"], "rampup": round(run["rampup_Mimg"] * 1e6),
            "P_mean": run["P_mean"], "P_std": run["P_std"], "ema_stds": run["ema_stds"], "images": result["nimg"],
            "steps": result["nimg"] // run["batch"], "train_cpu_s": round(result["seconds"], 1),
            "eval_cpu_s": round(time.process_time() - start, 1), "best_sigma_rel": best["sigma_rel"],
            "fd": best["fd"], "accuracy": best["accuracy"], "grid": list(grid),
            "sweep": [{k: r[k] for k in ("sigma_rel", "fd", "accuracy")} for r in sweep.rows]}


def plot(rows: list[dict], path: Path) -> None:
    """Frechet distance and accuracy against the budget, a line per recipe measured at more than one budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from edm2.files import atomic_output

    budgets = {}
    for r in rows:
        budgets.setdefault(r["recipe"], set()).add(r["budget_min"])
    rows = [r for r in rows if len(budgets[r["recipe"]]) > 1] or rows  # one-budget sweep cells: in the JSON
    names = sorted({r["dataset"] for r in rows})
    recipes = sorted({r["recipe"] for r in rows}, key=lambda r: (r not in ("before", "after"), r))
    colours = {recipe: plt.get_cmap("tab20")((2 * i) % 20 + (2 * i) // 20 % 2) for i, recipe in enumerate(recipes)}
    fig, axes = plt.subplots(2, len(names), figsize=(5 * len(names), 6.5), dpi=110, squeeze=False)
    for col, name in enumerate(names):
        for recipe in sorted({r["recipe"] for r in rows if r["dataset"] == name}):
            cells = sorted((r for r in rows if r["dataset"] == name and r["recipe"] == recipe),
                           key=lambda r: r["budget_min"])
            x = [r["budget_min"] for r in cells]
            axes[0, col].plot(x, [r["fd"] for r in cells], "o-", color=colours[recipe], label=recipe)
            axes[1, col].plot(x, [100 * r["accuracy"] for r in cells], "o-", color=colours[recipe], label=recipe)
        axes[0, col].set_title(f"{name}: Frechet distance (judge features), lower is better", fontsize=9)
        axes[1, col].set_title(f"{name}: samples recognised as their class (%)", fontsize=9)
        for ax in axes[:, col]:
            ax.set_xscale("log")
            ax.set_xlabel("budget (single-thread CPU minutes)")
            ax.legend(fontsize=7)
        axes[0, col].set_yscale("log")
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budgets", default="5,15,45", help="CPU-minute budgets")
    parser.add_argument("--datasets", default="glyphs32,shapes32")
    parser.add_argument("--recipes", default="before,after", help="before, after, after:key=value,...")
    parser.add_argument("--work", default="bench-recipes", help="folder for data, judges, runs and partial results")
    parser.add_argument("--images", type=int, default=20000, help="images per synthetic dataset")
    parser.add_argument("--samples", type=int, default=200, help="samples judged per EMA length")
    parser.add_argument("--steps", type=int, default=10, help="Heun steps per sample")
    parser.add_argument("--grid", default=",".join(f"{s:g}" for s in GRID), help="EMA lengths judged per run")
    parser.add_argument("--plot", default=None, help="PNG of the results  [default: WORK/bench_recipes.png]")
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = Path(args.work)
    (work / "runs").mkdir(parents=True, exist_ok=True)
    cells_file = work / "cells.jsonl"
    done = [json.loads(line) for line in cells_file.read_text().splitlines()] if cells_file.exists() else []
    judges = {}
    for name in args.datasets.split(","):
        data, judge = judge_for(name, work, args.images)
        judges[name] = {"data": str(data), "real_accuracy": judge.real_accuracy}
        for budget in (float(b) for b in args.budgets.split(",")):
            for recipe in split_recipes(args.recipes):
                key = (name, budget, recipe, args.samples, args.steps)
                if any((d["dataset"], d["budget_min"], d["recipe"], d["samples"], d["heun_steps"]) == key
                       for d in done):
                    continue
                grid = tuple(float(g) for g in args.grid.split(","))
                row = {**run_cell(name, data, judge, budget, recipe, work, args.samples, args.steps, grid),
                       "samples": args.samples, "heun_steps": args.steps}
                done.append(row)
                with cells_file.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                log(f"  -> best sigma_rel {row['best_sigma_rel']:.2f}: FD {row['fd']:.1f}, accuracy "
                    f"{100 * row['accuracy']:.1f} %")
    wanted = set(args.datasets.split(","))
    rows = [d for d in done if d["dataset"] in wanted]
    plot_path = Path(args.plot) if args.plot else work / "bench_recipes.png"
    if rows:
        plot(rows, plot_path)
    json.dump({"machine": machine_info(["cpu"]), "command": " ".join(sys.argv), "budget_clock": "process CPU time, "
               "one thread", "judges": judges, "presets_after": sorted(
                   {r["preset"] for r in rows if r["recipe"].startswith("after")} & set(PRESETS)),
               "rows": rows, "plot": str(plot_path)}, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
