"""`edm2 train`, `edm2 info` and `edm2 demo`."""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
from collections.abc import Callable

import click

from edm2.cli.app import friendly_errors, main, one_voice
from edm2.cli.params import BUDGET, FLOATS, NIMG
from edm2.training.options import Option, TrainOptions, option_fields

# The click types of the markers of `edm2.training.options.Option.kind`; plain types (str, int, float) stand as
# they are, tuples are choices and bool is a flag.
_TYPES: dict[str, click.ParamType] = {"nimg": NIMG, "budget": BUDGET, "floats": FLOATS,
                                      "dir": click.Path(file_okay=False), "file": click.Path(dir_okay=False),
                                      "count": click.IntRange(min=0)}


def _click_type(kind: type | str | tuple[str, ...]) -> click.ParamType | type:
    if isinstance(kind, tuple):
        return click.Choice(kind)
    return _TYPES[kind] if isinstance(kind, str) else kind


def _click_option(f: dataclasses.Field) -> Callable:
    """The click option of one `TrainOptions` field: its spelling, type, default (shown unless None or False) and
    help; a field without a default is a required option."""
    spec: Option = f.metadata["option"]
    required = f.default is dataclasses.MISSING
    default = None if required else f.default
    show = default is not None and default is not False
    if spec.kind is bool:
        return click.option(spec.spelling(f.name), f.name, is_flag=True, default=default, show_default=show,
                            help=spec.help)
    return click.option(spec.spelling(f.name), f.name, type=_click_type(spec.kind), required=required,
                        default=default, show_default=show, help=spec.help)


def train_options() -> Callable:
    """Decorator: an option for every `TrainOptions` field (edm2.training.options), in the order of the fields,
    handed to the command as one `opts: TrainOptions` argument."""
    fields = option_fields()

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            opts = TrainOptions(**{f.name: kwargs.pop(f.name) for f in fields})
            return fn(*args, opts=opts, **kwargs)

        for f in reversed(fields):
            wrapper = _click_option(f)(wrapper)
        return wrapper

    return decorate


@main.command()
@train_options()
@click.option("--dry-run", is_flag=True, help="Validate and print the resolved options, then exit.")
@friendly_errors
def train(opts: TrainOptions, dry_run: bool) -> None:
    """Train a model (or resume the run in OUTDIR). Under torchrun, data-parallel over the processes."""
    from edm2.runtime import distributed
    from edm2.training import train as run_training

    with one_voice(), distributed(opts.device) as (rank, _):
        if dry_run:
            _dry_run(opts, rank)
            return
        result = run_training(opts, progress=rank == 0)
    if rank == 0:
        click.echo(f"{result['status']} at {result['nimg']} images in {result['outdir']}")
    if result["status"] == "interrupted":
        sys.exit(130)


def _dry_run(opts: TrainOptions, rank: int) -> None:
    """Resolve the run (planning a --budget from a few measured steps) and print it, with its size, as JSON."""
    from edm2.complexity import count_complexity
    from edm2.data import open_dataset
    from edm2.training import plan_budget
    from edm2.training.options import resolve_run
    from edm2.training.recipes import budget_clock

    dataset = open_dataset(opts.data, progress=rank == 0)
    plan = None if opts.budget is None else plan_budget(opts, dataset, None, budget_clock(opts.budget_clock)())
    run = resolve_run(opts, dataset, plan=plan)
    c = count_complexity(run.network)
    if rank == 0:
        click.echo(json.dumps({**run.to_dict(), "parameters": c.parameters, "gflops": round(c.gflops, 3)}, indent=2))


_DATA = {True: "VAE latents: make them with `edm2 dataset encode`", False: "pixels"}


@main.command()
@click.option("--preset", help="Preset to describe.  [default: list all]")
@friendly_errors
def info(preset) -> None:
    """Parameters, GFLOPs per evaluation and training hyper-parameters of presets."""
    from edm2.complexity import count_complexity
    from edm2.presets import PRESETS, get_preset

    if preset is None:
        for p in PRESETS.values():
            click.echo(f"{p.name:18s} {p.description}{'  [latents]' if p.latents else ''}")
        return
    p = get_preset(preset)
    c = count_complexity(p.network)
    click.echo(f"{p.name}: {p.description}")
    click.echo(f"  data              {_DATA[p.latents]} ({p.encoder})")
    click.echo(f"  parameters        {c.parameters / 1e6:.2f} M")
    click.echo(f"  GFLOPs/eval       {c.gflops:.2f} (multiply-accumulates {c.macs / 1e9:.2f} G + weight norm)")
    for k, v in p.network.to_dict().items():
        click.echo(f"  network.{k:18s} {v}")
    for k, v in p.training.to_dict().items():
        click.echo(f"  training.{k:17s} {v}")
    for k, v in (p.edm.to_dict() if p.edm is not None else {}).items():
        click.echo(f"  edm.{k:22s} {v}")


@main.command()
@click.option("--outdir", default="demo-out", show_default=True, type=click.Path(file_okay=False))
@click.option("--duration", type=NIMG, help="Training images.  [default: preset cpu-digits8]")
@click.option("--samples", type=int, default=500, show_default=True, help="Samples judged per EMA length.")
@friendly_errors
def demo(outdir, duration, samples) -> None:
    """Train on the built-in 8x8 digits, choose the EMA post hoc, and report sample quality."""
    from edm2.demo import run_demo

    report = run_demo(outdir, duration=duration, num_samples=samples, echo=click.echo)
    if report["status"] == "interrupted":
        sys.exit(130)
