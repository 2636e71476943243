"""The digits demo: train a class-conditional EDM2 model on 8x8 digits on a CPU, choose its EMA length
post hoc, and report sample quality with a classifier trained on the real digits."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from edm2.checkpoint import atomic_write_text, load_network
from edm2.generate import make_grid, sample_batch, save_png
from edm2.metrics import DigitsJudge
from edm2.posthoc import posthoc_reconstruct
from edm2.training import TrainOptions, train

__all__ = ["DEMO_STDS", "run_demo", "sweep_quality", "plot_quality"]

DEMO_STDS = (0.030, 0.050, 0.070, 0.100, 0.130, 0.170, 0.220)


def sweep_quality(paths: Sequence[Path], judge: DigitsJudge, num_samples: int, num_steps: int,
                  device: str = "cpu") -> list[dict]:
    """Sample `num_samples` digits (seed i has class i % 10) from each snapshot and judge them."""
    seeds = list(range(num_samples))
    classes = [s % 10 for s in seeds]
    rows = []
    for path in paths:
        net, snap = load_network(path, device)
        images, _ = sample_batch(net, seeds, class_idx=classes, num_steps=num_steps, device=device)
        report = judge.evaluate(images.cpu(), np.array(classes))
        rows.append({"sigma_rel": snap.sigma_rel, "path": str(path), **report.to_dict()})
    return rows


def plot_quality(rows: list[dict], path: Path, title: str) -> None:
    """Frechet distance and accuracy against EMA length (the paper's Figure 5a, for digits)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stds = [r["sigma_rel"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot(stds, [r["fd"] for r in rows], "o-", color="tab:blue", label="Frechet distance (lower is better)")
    best = min(rows, key=lambda r: r["fd"])
    ax.plot([best["sigma_rel"]], [best["fd"]], "*", ms=14, color="tab:red",
            label=f"best sigma_rel {best['sigma_rel']:.3f}")
    ax.set_xlabel("EMA length sigma_rel")
    ax.set_ylabel("Frechet distance (classifier features)")
    ax2 = ax.twinx()
    ax2.plot(stds, [100 * r["accuracy"] for r in rows], "s--", color="tab:green", label="class accuracy %")
    ax2.set_ylabel("samples recognised as their class (%)")
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(lines, [h.get_label() for h in lines], loc="upper center", fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def run_demo(outdir: str | Path, duration: int | None = None, num_samples: int = 500, num_steps: int = 32,
             stds: Sequence[float] = DEMO_STDS, progress: bool = True,
             echo: Callable[[str], None] = print) -> dict:
    """Train (or resume) the digits model in `outdir/run`, reconstruct EMAs, judge them, write
    `grid.png`, `ema_quality.png` and `report.json` into `outdir`. Returns the report."""
    outdir = Path(outdir)
    t0 = time.time()
    echo(f"[1/4] training on the 8x8 digits (cpu-digits8) in {outdir / 'run'} ...")
    result = train(TrainOptions(outdir=str(outdir / "run"), data="digits", preset="cpu-digits8", cond=True,
                                duration=duration), progress=progress)
    if result["status"] != "finished":
        echo(f"training {result['status']} at {result['nimg']} images; run the demo again to resume")
        return {"status": result["status"]}
    t_train = time.time() - t0

    echo(f"[2/4] post-hoc EMA reconstruction for sigma_rel {', '.join(f'{s:.3f}' for s in stds)} ...")
    recon = posthoc_reconstruct(outdir / "run", outdir / "posthoc", stds)

    echo(f"[3/4] judging {num_samples} samples per EMA length with a classifier trained on real digits ...")
    judge = DigitsJudge()
    rows = sweep_quality([Path(r["path"]) for r in recon], judge, num_samples, num_steps)
    for r, rec in zip(rows, recon):
        r["profile_error"] = rec["profile_error"]
    best = min(rows, key=lambda r: r["fd"])
    title = f"digits demo: quality vs EMA length ({result['nimg'] // 1000} kimg)"
    plot_quality(rows, outdir / "ema_quality.png", title)

    echo("[4/4] writing a 10x10 grid, one row per class, from the best EMA ...")
    net, _ = load_network(best["path"])
    seeds = list(range(100))
    images, _ = sample_batch(net, seeds, class_idx=[s // 10 for s in seeds], num_steps=num_steps)
    save_png(outdir / "grid.png", make_grid(images, cols=10, scale=4))

    report = {
        "status": "finished",
        "training_images": result["nimg"],
        "training_seconds": round(t_train, 1),
        "real_digit_accuracy": judge.real_accuracy,
        "best_sigma_rel": best["sigma_rel"],
        "best_accuracy": best["accuracy"],
        "best_fd": best["fd"],
        "sweep": rows,
        "pass_generated_accuracy_90": best["accuracy"] >= 0.90,
        "pass_real_accuracy_95": judge.real_accuracy >= 0.95,
        "files": {"grid": str(outdir / "grid.png"), "plot": str(outdir / "ema_quality.png"),
                  "run": str(outdir / "run")},
    }
    atomic_write_text(outdir / "report.json", json.dumps(report, indent=2) + "\n")
    echo("")
    echo("EMA length  class accuracy  Frechet distance")
    for r in rows:
        mark = "  <- best" if r is best else ""
        echo(f"  {r['sigma_rel']:.3f}      {100 * r['accuracy']:5.1f} %       {r['fd']:8.3f}{mark}")
    echo(f"real held-out digits recognised: {100 * judge.real_accuracy:.1f} % (must be >= 95 %)")
    echo(f"generated digits recognised as their class: {100 * best['accuracy']:.1f} % (must be >= 90 %)")
    echo(f"results in {outdir}: grid.png, ema_quality.png, report.json")
    return report
