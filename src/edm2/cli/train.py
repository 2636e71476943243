"""`edm2 train`, `edm2 info` and `edm2 demo`.

`edm2 train` also reads the official command lines (EDM2's train_edm2.py, EDM's train.py): the other spellings
of an option that the table declares (`Option.aliases`, e.g. --P_mean), flags given a BOOL value (--cond=0,
--fp16=1), and in a command line that names --arch or --precond, EDM's units (`official_args`)."""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import sys
from collections.abc import Callable, Sequence

import click

from edm2.cli.app import friendly_errors, main, one_voice
from edm2.cli.params import BUDGET, FLOATS, INTS, NIMG
from edm2.training.ladder import CONFIGS, config_preset
from edm2.training.options import Option, TrainOptions, option_fields

# The click types of the markers of `edm2.training.options.Option.kind`; plain types (str, int, float) stand as
# they are, tuples are choices and bool is a flag.
_TYPES: dict[str, click.ParamType] = {"nimg": NIMG, "budget": BUDGET, "floats": FLOATS, "ints": INTS,
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


# ----------------------------------------------------------------------------------------------------
# The official command lines.

_TRUE, _FALSE = {"1", "true", "t", "yes", "y", "on"}, {"0", "false", "f", "no", "n", "off"}  # click's BOOL
_EDM_TRAIN = ("--arch", "--precond")  # a command line naming one of these is that of EDM's train.py
_EDM_TICKS = {"--tick": 50, "--snap": 50, "--dump": 500}  # EDM's train.py: kimg per tick, ticks per write


def _spellings() -> tuple[dict[str, str], dict[str, tuple[str, str | None]]]:
    """From the option table: every alias -> our spelling, and every flag spelling -> (on, off or None)."""
    aliases, flags = {}, {}
    for f in option_fields():
        spec: Option = f.metadata["option"]
        on, _, off = spec.spelling(f.name).partition("/")
        aliases.update({alias: on for alias in spec.aliases})
        if spec.kind is bool:
            flags.update({name: (on, off or None) for name in (on, *spec.aliases)})
    return aliases, flags


def _edm_number(name: str, value: str) -> float:
    """The number an EDM train.py option was given; a usage error otherwise."""
    try:
        return float(value)
    except ValueError:
        raise click.BadParameter(f"{name} takes a number in EDM's train.py units, got {value!r}") from None


def _edm_intervals(ticks: dict[str, float]) -> list[str]:
    """EDM train.py's --tick (kimg), --snap and --dump (ticks) as our --status, --snapshot and --checkpoint."""
    tick = int(ticks.get("--tick", _EDM_TICKS["--tick"])) * 1000
    given = set(ticks)
    out = [f"--status={tick}"] if "--tick" in given else []
    for ours, theirs in (("--snapshot", "--snap"), ("--checkpoint", "--dump")):
        if {"--tick", theirs} & given:
            out.append(f"{ours}={tick * int(ticks.get(theirs, _EDM_TICKS[theirs]))}")
    return out


def _edm_units(args: list[str]) -> list[str]:
    """An EDM train.py command line in our units: --duration in Mimg (a number without Ki/Mi/Gi), --tick in kimg,
    --snap and --dump in ticks become images; unconditional unless --cond is given, as train.py's default."""
    out, ticks = [], {}
    i = 0
    while i < len(args):
        name, eq, value = args[i].partition("=")
        if name in _EDM_TICKS or name == "--duration":
            if not eq and i + 1 < len(args):
                value, i = args[i + 1], i + 1
            if name in _EDM_TICKS:
                ticks[name] = _edm_number(name, value)
            elif re.search(r"[KMG]i\s*$", value):
                out.append(f"--duration={value}")  # an image count, our unit
            else:  # train.py: total_kimg = max(int(duration * 1000), 1)
                out.append(f"--duration={max(int(_edm_number(name, value) * 1000), 1) * 1000}")
        else:
            out.append(args[i])
        i += 1
    out += _edm_intervals(ticks)
    if not {"--cond", "--uncond"} & {t.partition("=")[0] for t in out}:
        out.append("--uncond")
    return out


def official_args(args: Sequence[str]) -> list[str]:
    """A command line with the official spellings turned into ours: aliases (`Option.aliases`) to our spelling,
    a flag's BOOL value (`--cond=0`, `--fp16 1`) to the flag or its opposite, and (with --arch or --precond)
    EDM's train.py units (`_edm_units`). Anything else stays for click to parse or refuse."""
    aliases, flags = _spellings()
    out: list[str] = []
    args = list(args)
    i = 0
    while i < len(args):
        name, eq, value = args[i].partition("=")
        name = aliases.get(name, name) if name.startswith("--") else name
        if name in flags and not eq and i + 1 < len(args) and args[i + 1].lower() in _TRUE | _FALSE:
            eq, value = "=", args[i + 1]  # the official BOOL given as the next word
            i += 1
        if name in flags and eq and value.lower() in _TRUE | _FALSE:
            on, off = flags[name]
            out += [on] if value.lower() in _TRUE else [off] if off else []
        else:
            out.append(name + eq + value)
        i += 1
    return _edm_units(out) if any(t.partition("=")[0] in _EDM_TRAIN for t in out) else out


def _official_help() -> str:
    """The epilog of `edm2 train --help`: the official spellings it reads."""
    aliases = ", ".join(sorted(_spellings()[0]))
    return ("Official command lines (train_edm2.py, EDM's train.py) are read as well: " + aliases + "; flags "
            "with a BOOL value (e.g. --cond=0, --fp16=1); and with --arch/--precond, EDM's units: --duration in "
            "Mimg, --tick in kimg, --snap and --dump in ticks, unconditional unless --cond is given.")


class _TrainCommand(click.Command):
    """`edm2 train`: parses the official spellings too (`official_args`)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, official_args(args))


@main.command(cls=_TrainCommand, epilog=_official_help())
@train_options()
@click.option("-n", "--dry-run", is_flag=True, help="Validate and print the resolved options, then exit.")
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
@click.option("--resolution", type=click.IntRange(min=1), help="Describe the network built for data of this "
              "resolution (latents: the latent resolution), as training builds it.  [default: the preset's]")
@click.option("--channels", type=click.IntRange(min=1), help="... and of this many channels (latents: 4).  "
              "[default: the preset's]")
@click.option("--generation", is_flag=True, help="List the published models by name (the presets of 'edm2 "
              "generate --preset'), with the FID / FD_DINOv2 the papers report.")
@click.option("--config", type=click.Choice(CONFIGS), help="The preset at this EDM2 Table 1 ablation configuration "
              "(A-G, docs/ablation.md).  [default: G, the preset itself]")
@friendly_errors
def info(preset, resolution, channels, generation, config) -> None:
    """Parameters, GFLOPs per evaluation and training hyper-parameters of presets."""
    from edm2.complexity import count_complexity
    from edm2.presets import PRESETS, get_preset, network_at

    if generation:
        if preset is not None or resolution is not None or channels is not None or config is not None:
            raise ValueError("--generation lists the generation presets; give it alone")
        _list_generation_presets()
        return
    if preset is None:
        if resolution is not None or channels is not None or config is not None:
            raise ValueError("--resolution, --channels and --config describe the network of one --preset; name it")
        for p in PRESETS.values():
            click.echo(f"{p.name:18s} {p.description}{'  [latents]' if p.latents else ''}")
        return
    p = get_preset(preset) if config is None else config_preset(get_preset(preset), config)
    net = network_at(p.network, resolution or p.network.img_resolution, channels or p.network.img_channels,
                     f"preset {p.name}'s network")
    c = count_complexity(net)
    click.echo(f"{p.name}: {p.description}")
    click.echo(f"  data              {_DATA[p.latents]} ({p.encoder})")
    click.echo(f"  built for         {net.img_resolution}x{net.img_resolution}x{net.img_channels}")
    click.echo(f"  parameters        {c.parameters / 1e6:.2f} M")
    click.echo(f"  GFLOPs/eval       {c.gflops:.2f} (multiply-accumulates {c.macs / 1e9:.2f} G + weight norm)")
    for k, v in net.to_dict().items():
        click.echo(f"  network.{k:18s} {v}")
    for k, v in p.training.to_dict().items():
        click.echo(f"  training.{k:17s} {v}")
    for k, v in (p.edm.to_dict() if p.edm is not None else {}).items():
        click.echo(f"  edm.{k:22s} {v}")


def _list_generation_presets() -> None:
    from edm2.published import GENERATION_PRESETS

    click.echo(f"{'preset':34s} {'reported':>16s} {'guidance':>8s} {'EMA':>6s}  guide / interval")
    for p in GENERATION_PRESETS.values():
        metric = "FD_DINOv2" if p.metric == "fd_dinov2" else "FID"
        guide = "-" if p.gnet is None else p.gnet.removesuffix(".pkl")
        band = "" if p.guidance_interval is None else f", sigma in ({p.guidance_interval[0]:g}, " \
            f"{p.guidance_interval[1]:g}]"
        click.echo(f"{p.name:34s} {metric + ' ' + f'{p.reported:.2f}':>16s} {p.guidance:8.2f} {p.ema:6.3f}  "
                   f"{guide}{band}")


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
