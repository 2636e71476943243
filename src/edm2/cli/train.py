"""`edm2 train`, `edm2 info` and `edm2 demo`."""

from __future__ import annotations

import json
import sys

import click

from edm2.cli.app import friendly_errors, main, one_voice
from edm2.cli.params import BUDGET, NIMG, parse_floats


@main.command()
@click.option("--outdir", required=True, type=click.Path(file_okay=False), help="Run folder (resumes if it exists).")
@click.option("--data", default="digits", show_default=True,
              help="Folder or .zip of images or latents (`edm2 dataset`), .npz, or 'digits'.")
@click.option("--preset", help="Network and recipe (see `edm2 info`), or 'auto': chosen for the data and the "
                                "hardware.  [default: cpu-digits8 for the digits, auto for other data]")
@click.option("--cond/--uncond", default=True, show_default=True, help="Class-conditional training.")
@click.option("--duration", type=NIMG, help="Training length in images (e.g. 2Mi); the schedule follows it.  "
                                            "[default: preset]")
@click.option("--budget", type=BUDGET, help="Train for this long instead (e.g. 15min, 2h): the duration is planned "
                                            "from the throughput of the first steps.")
@click.option("--budget-clock", type=click.Choice(["wall", "cpu"]), default="wall", show_default=True,
              help="What --budget counts: elapsed time or this process's CPU time.")
@click.option("--rampup", type=NIMG, help="Learning-rate warm-up in images.  [default: preset, or 0.466 % of a "
                                          "--duration/--budget]")
@click.option("--batch", type=int, help="Total batch size.  [default: preset]")
@click.option("--batch-gpu", type=int, help="Micro-batch per process; smaller than the batch accumulates gradients.")
@click.option("--lr", type=float, help="Reference learning rate alpha_ref.  [default: preset]")
@click.option("--decay", type=float, help="Learning-rate decay start t_ref, in batches; 0: no decay.  [default: "
                                          "preset, or 6.68 % of a --duration/--budget]")
@click.option("--dropout", type=float, help="Dropout probability.  [default: preset]")
@click.option("--P-mean", "P_mean", type=float, help="Mean of ln(sigma) during training.  [default: preset]")
@click.option("--P-std", "P_std", type=float, help="Std of ln(sigma) during training.  [default: preset]")
@click.option("--status", type=NIMG, help="Status interval in images.  [default: preset]")
@click.option("--snapshot", type=NIMG, help="EMA snapshot interval in images.  [default: preset]")
@click.option("--checkpoint", type=NIMG, help="Checkpoint interval in images.  [default: preset]")
@click.option("--ema-stds", help="Comma-separated sigma_rel of the tracked EMAs.  [default: 0.05,0.10; edm-* "
                                "presets: none]")
@click.option("--augment", type=float, help="edm-* presets: augmentation probability, 0 = off.  [default: preset]")
@click.option("--ema", type=float, help="edm-* presets: traditional EMA half-life in Mimg.  [default: preset]")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, or auto.")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]),
              help="U-Net precision: fp32, bf16 (autocast, also on CPU) or fp16 (CUDA, dynamic loss scaling).  "
                   "[default: fp16 on CUDA for presets with use_fp16, else fp32]")
@click.option("--compile", "compile_net", is_flag=True, help="torch.compile the network (slow start, faster steps).")
@click.option("--allow-tf32", is_flag=True, help="TF32 in CUDA convolutions and matrix products (off, as the "
                                                  "official code trains).")
@click.option("--xflip", is_flag=True, help="Double the dataset with mirrored images.")
@click.option("--max-size", type=int, help="Train on a random subset of this many images.  [default: all]")
@click.option("--latent-stats", type=click.Path(dir_okay=False),
              help="Latent statistics from `edm2 dataset stats` to standardise latents with.  "
                   "[default: the dataset's, else the official sd-vae-ft-mse values]")
@click.option("--workers", type=click.IntRange(min=0),
              help="Data loading processes per training process.  [default: 2 for data on disk, 0 in memory]")
@click.option("--dry-run", is_flag=True, help="Validate and print the resolved options, then exit.")
@friendly_errors
def train(outdir, data, preset, cond, duration, budget, budget_clock, rampup, batch, batch_gpu, lr, decay, dropout,
          P_mean, P_std, status, snapshot, checkpoint, ema_stds, augment, ema, seed, device, precision, compile_net,
          allow_tf32, xflip, max_size, latent_stats, workers, dry_run) -> None:
    """Train a model (or resume the run in OUTDIR). Under torchrun, data-parallel over the processes."""
    from edm2.complexity import count_complexity
    from edm2.data import open_dataset
    from edm2.runtime import distributed
    from edm2.training import plan_budget
    from edm2.training import train as run_training
    from edm2.training.options import TrainOptions, resolve_run
    from edm2.training.recipes import budget_clock as budget_clock_fn

    stds = None if ema_stds is None else tuple(parse_floats(ema_stds, "--ema-stds"))
    opts = TrainOptions(outdir=outdir, data=data, preset=preset, cond=cond, duration=duration, budget=budget,
                        budget_clock=budget_clock, rampup=rampup, batch=batch, batch_gpu=batch_gpu, lr=lr, decay=decay,
                        dropout=dropout, P_mean=P_mean, P_std=P_std, status=status, snapshot=snapshot,
                        checkpoint=checkpoint, ema_stds=stds, seed=seed, device=device, precision=precision,
                        compile=compile_net, allow_tf32=allow_tf32, augment=augment, ema=ema, xflip=xflip,
                        max_size=max_size, latent_stats=latent_stats, workers=workers)
    with one_voice(), distributed(device) as (rank, _):
        if dry_run:
            dataset = open_dataset(data, progress=rank == 0)
            plan = None if budget is None else plan_budget(opts, dataset, None, budget_clock_fn(budget_clock)())
            run = resolve_run(opts, dataset, plan=plan)
            c = count_complexity(run.network)
            if rank == 0:
                click.echo(json.dumps({**run.to_dict(), "parameters": c.parameters, "gflops": round(c.gflops, 3)},
                                      indent=2))
            return
        result = run_training(opts, progress=rank == 0)
    if rank == 0:
        click.echo(f"{result['status']} at {result['nimg']} images in {result['outdir']}")
    if result["status"] == "interrupted":
        sys.exit(130)


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
