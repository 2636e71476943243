"""`edm2 plot dynamics`: the training-dynamics panels of EDM2's Figure 3 from the `stats.jsonl` of runs."""

from __future__ import annotations

import json
from pathlib import Path

import click

from edm2.cli.app import friendly_errors, main


@main.group()
def plot() -> None:
    """Figures from training runs."""


@plot.command("dynamics")
@click.argument("runs", nargs=-1, type=click.Path(file_okay=False))
@click.option("--out", "out_png", type=click.Path(dir_okay=False), default="dynamics.png", show_default=True,
              help="The figure (PNG).")
@click.option("--label", "labels", multiple=True, help="A row title per run, in order.  [default: the run's "
              "--config, or its folder name]")
@click.option("--kinds", default="act,weight,elr", show_default=True,
              help="The panels, comma-separated: act (activation magnitudes), weight (weight magnitudes), elr "
                   "(effective learning rate).")
@friendly_errors
def plot_dynamics_cmd(runs, out_png, labels, kinds) -> None:
    """Activation and weight magnitudes and the effective learning rate per U-Net block over training, one row
    per RUN (EDM2 Figure 3); prints how much each grew (median over blocks of last / first value) as JSON."""
    from edm2.training.dynamics import KINDS, plot_dynamics

    if not runs:
        raise ValueError("give one or more run folders (edm2 train --outdir), e.g. edm2 plot dynamics runs/c runs/e")
    if labels and len(labels) != len(runs):
        raise ValueError(f"--label is given {len(labels)} times for {len(runs)} runs; give one per run or none")
    chosen = tuple(k.strip() for k in kinds.split(",") if k.strip())
    unknown = [k for k in chosen if k not in KINDS]
    if unknown or not chosen:
        raise ValueError(f"--kinds takes {', '.join(KINDS)}, got {kinds!r}")
    names = list(labels) or [_label(Path(r)) for r in runs]
    if len(set(names)) != len(names):
        names = [f"{n} ({Path(r).name})" for n, r in zip(names, runs)]
    summary = plot_dynamics(dict(zip(names, runs)), out_png, chosen)
    click.echo(json.dumps({"figure": str(out_png), "growth": summary}, indent=2))


def _label(run: Path) -> str:
    """A run's configuration from its training_options.json ('config C'), else its folder name."""
    try:
        config = json.loads((run / "training_options.json").read_text()).get("config")
    except (OSError, ValueError, AttributeError):
        config = None
    return f"config {config}" if config else run.name
