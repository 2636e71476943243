"""`edm2 toy train` and `edm2 toy plot`: the 2D demonstration of autoguidance (`edm2.toy`)."""

from __future__ import annotations

import click

from edm2.cli.app import friendly_errors, main
from edm2.cli.params import INTERVAL

# edm2.toy's defaults, written out so that every `edm2` command does not import the toy (tests/test_toy.py checks)
DEFAULT_GUIDANCE, DEFAULT_STEPS, FAST_STEPS = 2.0, 6000, 200


@main.group()
def toy() -> None:
    """The 2D toy of the autoguidance paper: a tree-shaped two-class Gaussian mixture, small MLP denoisers trained
    on the CPU in minutes, and samples without guidance, with classifier-free guidance and with autoguidance."""


def _train(outdir: str, steps: int | None, fast: bool, seed: int) -> dict:
    """Train the three models into `outdir` with one tqdm bar per model."""
    from tqdm import tqdm

    from edm2.toy import train_models

    bars: dict[str, tqdm] = {}

    def progress(name: str, step: int, total: int, loss: float) -> None:
        """Advance the bar of model `name` (closing the previous model's), the loss shown every 50 steps."""
        if name not in bars:
            for done in bars.values():
                done.close()
            bars[name] = tqdm(total=total, unit="step", desc=f"toy {name}")
        bar = bars[name]
        bar.update(step - bar.n)
        if step % 50 == 0 or step == total:
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)

    try:
        return train_models(outdir, steps=steps, fast=fast, seed=seed, progress=progress)
    finally:
        for bar in bars.values():
            bar.close()


def _echo_training(summary: dict) -> None:
    """One line per trained model: steps, seconds, first and last loss, file."""
    for name, m in summary["models"].items():
        click.echo(f"{name}: {m['steps']} steps in {m['seconds']:.1f} s, loss {m['loss_first']:.3f} -> "
                   f"{m['loss_last']:.3f} -> {summary['outdir']}/{m['file']}")


@toy.command("train")
@click.option("--outdir", required=True, type=click.Path(file_okay=False),
              help="Folder for main.safetensors, uncond.safetensors, guide.safetensors and losses.json.")
@click.option("--steps", type=int, help="Training steps of the main and the unconditional model; the guide trains "
                                        f"a quarter of them.  [default: {DEFAULT_STEPS}, with --fast {FAST_STEPS}]")
@click.option("--fast", is_flag=True, help=f"A quick smoke run ({FAST_STEPS} steps of 512 points): files, not a good "
                                           "model.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed (of the main model; +1, +2 for the "
                                                                     "others).")
@friendly_errors
def toy_train(outdir, steps, fast, seed) -> None:
    """Train the main conditional model, the unconditional model (the guide of classifier-free guidance) and the
    autoguidance guide (smaller, shorter-trained) on the tree mixture."""
    if steps is not None and steps < 1:
        raise ValueError(f"--steps must be positive, got {steps}")
    _echo_training(_train(outdir, steps, fast, seed))


@toy.command("plot")
@click.option("--rundir", type=click.Path(file_okay=False), help="Folder written by 'edm2 toy train'.")
@click.option("--train", "train_first", is_flag=True,
              help="Train the models into --rundir first (with --steps/--fast/--seed) instead of loading them.")
@click.option("--steps", type=int, help="With --train: as 'toy train --steps'.")
@click.option("--fast", is_flag=True, help="With --train: as 'toy train --fast'.")
@click.option("--out", "out_png", type=click.Path(dir_okay=False),
              help="The figure.  [default: RUNDIR/toy.png; toy_results.json beside it]")
@click.option("--guidance", type=float, default=DEFAULT_GUIDANCE, show_default=True,
              help="Guidance weight w of CFG and autoguidance (1: none).")
@click.option("--guidance-interval", "interval", type=INTERVAL, default=None,
              help="Guide only for noise levels SIGMA_LO < sigma <= SIGMA_HI, e.g. 0.05,1.  [default: every step]")
@click.option("--class", "label", type=int, help="Only this class.  [default: every class, one row each]")
@click.option("--samples", type=int, default=2000, show_default=True, help="Samples per class and method.")
@click.option("--sampler-steps", type=int, default=32, show_default=True, help="Heun steps of the sampler.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the samples (and of --train).")
@friendly_errors
def toy_plot(rundir, train_first, steps, fast, out_png, guidance, interval, label, samples, sampler_steps,
             seed) -> None:
    """Sample every method from the models of --rundir, write the figure and toy_results.json (the mean exact
    log-likelihood of each method's samples under the true class density)."""
    from pathlib import Path

    from edm2.toy import ToySampler, load_models, plot_run

    if rundir is None:
        raise ValueError("give --rundir (a folder of 'edm2 toy train', or one to train into with --train)")
    if not 0 <= guidance < float("inf"):
        raise ValueError(f"--guidance must be a non-negative number, got {guidance}")
    if (steps is not None or fast) and not train_first:
        raise ValueError("--steps and --fast only go with --train")
    if samples < 1:
        raise ValueError(f"--samples must be positive, got {samples}")
    sampler = ToySampler(num_steps=sampler_steps)
    if train_first:
        _echo_training(_train(rundir, steps, fast, seed))
    models = load_models(rundir)
    out_png = Path(out_png) if out_png is not None else Path(rundir) / "toy.png"
    out_png.parent.mkdir(parents=True, exist_ok=True)
    results = plot_run(models, out_png, guidance, None if label is None else [label], samples, seed, interval,
                       sampler, out_png.with_name("toy_results.json"))
    scores = ", ".join(f"{m} {v:.3f}" for m, v in results["mean_log_likelihood"].items())
    click.echo(f"mean log-likelihood (w={guidance:g}): {scores}")
    click.echo(f"-> {out_png}, {out_png.with_name('toy_results.json')}")
