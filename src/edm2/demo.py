"""The digits demo: train a class-conditional EDM2 model on 8x8 digits on a CPU, choose its EMA length
post hoc, and report sample quality with a classifier trained on the real digits."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from edm2.ema.sweep import ema_sweep
from edm2.files import atomic_write_text, load_network
from edm2.generate import make_grid, sample_batch, save_png
from edm2.metrics import DigitsJudge, DigitsQuality
from edm2.sampling import SamplerSettings
from edm2.training import TrainOptions, train

__all__ = ["DEMO_STDS", "run_demo"]

DEMO_STDS = (0.030, 0.050, 0.070, 0.100, 0.130, 0.170, 0.220)


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

    echo(f"[2-3/4] post-hoc EMA reconstruction for sigma_rel {', '.join(f'{s:.3f}' for s in stds)}, judging "
         f"{num_samples} samples per EMA length with a classifier trained on real digits ...")
    judge = DigitsJudge()
    title = f"digits demo: quality vs EMA length ({result['nimg'] // 1000} kimg)"
    sweep = ema_sweep(outdir / "run", outdir / "posthoc", stds, DigitsQuality(judge, num_samples, num_steps),
                      key="fd", skip_unsupported=True, json_path=None,
                      plot_path=(outdir / "ema_quality.png").absolute(), secondary="accuracy", title=title,
                      echo=echo)
    rows, best = sweep.rows, sweep.best

    echo("[4/4] writing a 10x10 grid, one row per class, from the best EMA ...")
    net, _ = load_network(best["path"])
    seeds = list(range(100))
    images, _ = sample_batch(net, seeds, class_idx=[s // 10 for s in seeds], settings=SamplerSettings(num_steps))
    save_png(outdir / "grid.png", make_grid(images, cols=10, scale=4, gap=2))

    report = {
        "status": "finished",
        "training_images": result["nimg"],
        "training_seconds": round(t_train, 1),
        "real_digit_accuracy": judge.real_accuracy,
        "best_sigma_rel": best["sigma_rel"],
        "best_accuracy": best["accuracy"],
        "best_fd": best["fd"],
        "sweep": rows,
        "skipped_sigma_rel": sorted(sweep.skipped),
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
