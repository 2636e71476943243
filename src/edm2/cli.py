"""The `edm2` command. It only parses arguments and calls the library; errors become one line, exit 2."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import sys
import time

import click

from edm2 import __version__

UNITS = {"": 1, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}


def parse_nimg(text: str) -> int:
    """'2048', '512Ki', '8Mi', '1.5Gi' -> number of images."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(Ki|Mi|Gi)?\s*", str(text))
    if not m:
        raise ValueError(f"bad image count {text!r}; use a number with optional Ki/Mi/Gi suffix, e.g. 8Mi")
    value = float(m.group(1)) * UNITS[m.group(2) or ""]
    if value != int(value):
        raise ValueError(f"image count {text!r} is not a whole number of images")
    return int(value)


class ImageCount(click.ParamType):
    name = "IMAGES"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        try:
            return parse_nimg(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


NIMG = ImageCount()


def friendly_errors(fn):
    """Report ValueError/OSError as one line on stderr with exit code 2, no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, OSError) as e:
            click.echo(f"edm2: error: {e}", err=True)
            sys.exit(2)

    return wrapper


class _UsageError(click.ClickException):
    """A command-line usage error reported like every other error: one line on stderr, exit code 2."""

    exit_code = 2

    def show(self, file=None) -> None:
        click.echo(f"edm2: error: {self.format_message()}", err=True)


class _Group(click.Group):
    """Turns click's multi-line usage errors (unknown option, bad value, missing option) into one line."""

    @staticmethod
    def _one_line(e: click.UsageError) -> _UsageError:
        where = f" (see '{e.ctx.command_path} -h')" if e.ctx is not None else ""
        return _UsageError(" ".join(e.format_message().split()) + where)

    def make_context(self, *args, **kwargs):
        try:
            return super().make_context(*args, **kwargs)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as e:
            raise self._one_line(e) from None

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as e:
            raise self._one_line(e) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edm2")
def main() -> None:
    """Train, sample and evaluate EDM2 diffusion models."""


@main.command()
@click.option("--outdir", required=True, type=click.Path(file_okay=False), help="Run folder (resumes if it exists).")
@click.option("--data", default="digits", show_default=True, help="Image folder, .zip, .npz, or 'digits'.")
@click.option("--preset", default="cpu-digits8", show_default=True, help="Network and recipe; see `edm2 info`.")
@click.option("--cond/--uncond", default=True, show_default=True, help="Class-conditional training.")
@click.option("--duration", type=NIMG, help="Training length in images (e.g. 2Mi).  [default: preset]")
@click.option("--batch", type=int, help="Total batch size.  [default: preset]")
@click.option("--batch-gpu", type=int, help="Micro-batch per process; smaller than the batch accumulates gradients.")
@click.option("--lr", type=float, help="Reference learning rate alpha_ref.  [default: preset]")
@click.option("--decay", type=float, help="Learning-rate decay start t_ref, in batches.  [default: preset]")
@click.option("--dropout", type=float, help="Dropout probability.  [default: preset]")
@click.option("--P-mean", "P_mean", type=float, help="Mean of ln(sigma) during training.  [default: preset]")
@click.option("--P-std", "P_std", type=float, help="Std of ln(sigma) during training.  [default: preset]")
@click.option("--status", type=NIMG, help="Status interval in images.  [default: preset]")
@click.option("--snapshot", type=NIMG, help="EMA snapshot interval in images.  [default: preset]")
@click.option("--checkpoint", type=NIMG, help="Checkpoint interval in images.  [default: preset]")
@click.option("--ema-stds", help="Comma-separated sigma_rel of the tracked EMAs.  [default: 0.05,0.10]")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, or auto.")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]),
              help="U-Net precision: fp32, bf16 (autocast, also on CPU) or fp16 (CUDA, dynamic loss scaling).  "
                   "[default: fp16 on CUDA for presets with use_fp16, else fp32]")
@click.option("--compile", "compile_net", is_flag=True, help="torch.compile the network (slow start, faster steps).")
@click.option("--dry-run", is_flag=True, help="Validate and print the resolved options, then exit.")
@friendly_errors
def train(outdir, data, preset, cond, duration, batch, batch_gpu, lr, decay, dropout, P_mean, P_std, status,
          snapshot, checkpoint, ema_stds, seed, device, precision, compile_net, dry_run) -> None:
    """Train a model (or resume the run in OUTDIR). Under torchrun, data-parallel over the processes."""
    from edm2.complexity import count_complexity
    from edm2.data import open_dataset
    from edm2.distributed import distributed
    from edm2.presets import NetworkConfig
    from edm2.training import TrainOptions, resolve_run
    from edm2.training import train as run_training

    stds = None if ema_stds is None else tuple(_parse_floats(ema_stds, "--ema-stds"))
    opts = TrainOptions(outdir=outdir, data=data, preset=preset, cond=cond, duration=duration, batch=batch,
                        batch_gpu=batch_gpu, lr=lr, decay=decay, dropout=dropout, P_mean=P_mean, P_std=P_std,
                        status=status, snapshot=snapshot, checkpoint=checkpoint, ema_stds=stds, seed=seed,
                        device=device, precision=precision, compile=compile_net)
    with _one_voice(), distributed(device) as (rank, _):
        if dry_run:
            run = resolve_run(opts, open_dataset(data))
            c = count_complexity(NetworkConfig.from_dict(run.network))
            if rank == 0:
                click.echo(json.dumps({**run.to_dict(), "parameters": c.parameters, "gflops": round(c.gflops, 3)},
                                      indent=2))
            return
        result = run_training(opts, progress=rank == 0)
    if rank == 0:
        click.echo(f"{result['status']} at {result['nimg']} images in {result['outdir']}")
    if result["status"] == "interrupted":
        sys.exit(130)


@main.command()
@click.option("--net", "net_path", required=True, type=click.Path(), help="Snapshot file (.safetensors).")
@click.option("--outdir", type=click.Path(file_okay=False), help="Folder for one PNG per seed.")
@click.option("--seeds", default="0-63", show_default=True, help="Seeds, e.g. 0-63 or 1,5,10-20.")
@click.option("--class", "class_idx", type=int, help="Class for all images.  [default: random per seed]")
@click.option("--gnet", "gnet_path", type=click.Path(), help="Guide snapshot (e.g. a small unconditional model).")
@click.option("--guidance", type=float, default=1.0, show_default=True, help="Guidance weight w.")
@click.option("--steps", type=int, default=32, show_default=True, help="Heun steps (2*steps-1 evaluations).")
@click.option("--S-churn", "S_churn", type=float, default=0.0, show_default=True, help="Stochasticity.")
@click.option("--S-min", "S_min", type=float, default=0.0, show_default=True, help="Churn only for sigma >= S_min.")
@click.option("--S-max", "S_max", type=float, default=float("inf"), show_default=True, help="... and <= S_max.")
@click.option("--S-noise", "S_noise", type=float, default=1.0, show_default=True, help="Churn noise scale.")
@click.option("--batch", "batch_size", type=int, default=64, show_default=True, help="Images per batch.")
@click.option("--grid", type=click.Path(dir_okay=False), help="Also write all images as one grid PNG.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, or auto.")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]),
              help="U-Net precision: fp32, bf16 (also on CPU) or fp16 (CUDA).  "
                   "[default: fp16 on CUDA for networks with use_fp16, else fp32]")
@click.option("--compile", "compile_net", is_flag=True, help="torch.compile the network (slow start, faster steps).")
@friendly_errors
def generate(net_path, outdir, seeds, class_idx, gnet_path, guidance, steps, S_churn, S_min, S_max, S_noise,
             batch_size, grid, device, precision, compile_net) -> None:
    """Generate images from a snapshot; an image depends only on its seed. Under torchrun, the seeds are
    split over the processes."""
    from tqdm import tqdm

    from edm2.checkpoint import load_network
    from edm2.distributed import distributed, resolve_device
    from edm2.generate import generate_images, parse_seeds
    from edm2.networks import resolve_precision

    if outdir is None and grid is None:
        raise ValueError("nothing to write: give --outdir and/or --grid")
    seed_list = parse_seeds(seeds)
    with _one_voice(), distributed(device) as (rank, _):
        device = resolve_device(device)
        net, _ = load_network(net_path, device)
        gnet = load_network(gnet_path, device)[0] if gnet_path else None
        if guidance != 1 and gnet is None:
            raise ValueError(f"--guidance {guidance} needs a guide model: pass --gnet SNAPSHOT")
        precision = resolve_precision(precision, device, net.use_fp16)
        bar = None  # created at the first finished batch, so that an early error stays a single line

        def progress(done: int, total: int) -> None:
            nonlocal bar
            if rank == 0:
                bar = bar or tqdm(total=total, unit="img")
                bar.update(done - bar.n)

        try:
            generate_images(net, seed_list, outdir, batch_size=batch_size, grid=grid, progress=progress,
                            class_idx=class_idx, gnet=gnet, guidance=guidance, num_steps=steps, S_churn=S_churn,
                            S_min=S_min, S_max=S_max, S_noise=S_noise, device=device, precision=precision,
                            compile=compile_net)
        finally:
            if bar is not None:
                bar.close()
    where = (f" to {outdir}" if outdir else "") + (f", grid {grid}" if grid else "")
    if rank == 0:
        click.echo(f"wrote {len(seed_list)} images{where}")


@contextlib.contextmanager
def _one_voice():
    """Under torchrun, a configuration error (ValueError) is usually the same in every process. The other
    ranks report it a few seconds after rank 0, by which time torchrun has normally stopped them, so the
    user reads it once; an error of one rank alone is still reported."""
    try:
        yield
    except ValueError:
        if int(os.environ.get("RANK", "0")) != 0:
            time.sleep(3)
        raise


def _posthoc_options(fn):
    """Options shared by `reconstruct` and `ema-sweep`: which snapshots to use and how strictly."""
    fn = click.option("--allow-gaps", is_flag=True, help="Accept irregular snapshot series (missing snapshots).")(fn)
    fn = click.option("--max-error", type=float, default=0.1, show_default=True,
                      help="Largest accepted relative squared L2 error of a reconstructed weighting profile.")(fn)
    fn = click.option("--from-std", "from_stds",
                      help="Use only the snapshots of these tracked sigma_rel (e.g. 0.10: one average per "
                           "snapshot).  [default: all]")(fn)
    fn = click.option("--nimg", type=NIMG, help="Target training time in images.  [default: last snapshot]")(fn)
    return fn


@main.command()
@click.option("--indir", required=True, type=click.Path(), help="Training run folder or folder of snapshots.")
@click.option("--outdir", required=True, type=click.Path(file_okay=False), help="Where to write the results.")
@click.option("--std", "stds", required=True,
              help="EMA lengths sigma_rel: a comma list (0.10,0.15) or start:stop:step (0.05:0.20:0.05).")
@click.option("--std-for", "std_for", multiple=True,
              help="PATTERN=SIGMA_REL: another length for tensors whose name matches the fnmatch PATTERN "
                   "(repeatable; the first match wins), e.g. 'unet.enc.*=0.05'.")
@_posthoc_options
@friendly_errors
def reconstruct(indir, outdir, stds, std_for, nimg, from_stds, max_error, allow_gaps) -> None:
    """Post-hoc EMA: synthesize EMA lengths at any time from a run's snapshots."""
    from edm2.posthoc import EMATarget, parse_std_for, parse_std_list, posthoc_reconstruct

    values, dropped = parse_std_list(stds, "--std")
    per_tensor = parse_std_for(std_for)
    inputs = None if from_stds is None else parse_std_list(from_stds, "--from-std")[0]
    if dropped:
        click.echo(f"note: skipping sigma_rel {', '.join(f'{s:g}' for s in dropped)} of the range: power-function "
                   "EMAs span (0, 0.2887)")
    results = posthoc_reconstruct(indir, outdir, [EMATarget(s, per_tensor) for s in values], nimg, inputs,
                                  max_error, allow_gaps)
    for r in results:
        detail = ""
        if len(r.profile_errors) > 1:
            detail = " (" + ", ".join(f"{s:.3f}: {e:.2e}" for s, e in r.profile_errors.items()) + ")"
        extra = "".join(f", {p}={s:.3f}" for p, s in r.per_tensor)
        click.echo(f"sigma_rel {r.sigma_rel:.3f}{extra} at {r.nimg} images from {r.num_snapshots} snapshots: "
                   f"profile error {r.profile_error:.2e}{detail} -> {r.path}")


@main.command("ema-sweep")
@click.option("--run", "run_dir", required=True, type=click.Path(),
              help="Training run folder or folder of snapshots (a digits model for the built-in metric).")
@click.option("--outdir", type=click.Path(file_okay=False), help="Output folder.  [default: RUN/ema-sweep]")
@click.option("--std", "stds", default="0.02:0.28:0.01", show_default=True,
              help="EMA lengths: start:stop:step (inclusive; lengths the snapshots do not support are "
                   "skipped) or a comma list (all must be supported).")
@click.option("--samples", type=int, default=500, show_default=True, help="Samples judged per EMA length.")
@click.option("--steps", type=int, default=16, show_default=True, help="Heun sampler steps per sample.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, or auto.")
@_posthoc_options
@friendly_errors
def ema_sweep(run_dir, outdir, stds, samples, steps, device, nimg, from_stds, max_error, allow_gaps) -> None:
    """Quality against EMA length: reconstruct each length, judge digit samples, plot, pick the best."""
    from pathlib import Path

    import torch

    from edm2.demo import DigitsQuality
    from edm2.metrics import DigitsJudge
    from edm2.posthoc import ema_sweep as sweep
    from edm2.posthoc import parse_std_list

    values, dropped = parse_std_list(stds, "--std")
    inputs = None if from_stds is None else parse_std_list(from_stds, "--from-std")[0]
    if samples < 2 or steps < 1:
        raise ValueError(f"--samples must be >= 2 and --steps >= 1, got {samples} and {steps}")
    if dropped:
        click.echo(f"note: skipping sigma_rel {', '.join(f'{s:g}' for s in dropped)} of the range: power-function "
                   "EMAs span (0, 0.2887)")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    outdir = Path(outdir) if outdir else Path(run_dir) / "ema-sweep"
    result = sweep(run_dir, outdir, values, DigitsQuality(DigitsJudge(), samples, steps, device), key="fd",
                   nimg=nimg, input_stds=inputs, max_error=max_error, allow_gaps=allow_gaps,
                   skip_unsupported=":" in stds, secondary="accuracy",
                   title=f"digits: Frechet distance vs EMA length ({samples} samples)", echo=click.echo)
    click.echo("sigma_rel  profile error  Frechet distance  class accuracy")
    for r in result.rows:
        mark = "  <- best" if r is result.best else ""
        click.echo(f"  {r['sigma_rel']:.3f}     {r['profile_error']:.1e}      {r['fd']:9.4f}       "
                   f"{100 * r['accuracy']:5.1f} %{mark}")
    b = result.best
    click.echo(f"best sigma_rel {b['sigma_rel']:.3f} (Frechet distance {b['fd']:.4f}, accuracy "
               f"{100 * b['accuracy']:.1f} %) -> {b['path']}")
    if result.best_at_edge:
        click.echo("note: the best length is at the end of the range; the optimum may lie outside it")
    click.echo(f"table {result.json_path}, plot {result.plot_path}")


@main.command()
@click.option("--preset", help="Preset to describe.  [default: list all]")
@friendly_errors
def info(preset) -> None:
    """Parameters, GFLOPs per evaluation and training hyper-parameters of presets."""
    from edm2.complexity import count_complexity
    from edm2.presets import PRESETS, get_preset

    if preset is None:
        for p in PRESETS.values():
            click.echo(f"{p.name:18s} {p.description}")
        return
    p = get_preset(preset)
    c = count_complexity(p.network)
    click.echo(f"{p.name}: {p.description}")
    click.echo(f"  parameters        {c.parameters / 1e6:.2f} M")
    click.echo(f"  GFLOPs/eval       {c.gflops:.2f} (multiply-accumulates {c.macs / 1e9:.2f} G + weight norm)")
    for k, v in p.network.to_dict().items():
        click.echo(f"  network.{k:18s} {v}")
    for k, v in p.training.to_dict().items():
        click.echo(f"  training.{k:17s} {v}")


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


def _parse_floats(text: str, option: str) -> list[float]:
    try:
        values = [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{option} takes comma-separated numbers, got {text!r}") from None
    if not values:
        raise ValueError(f"{option} is empty")
    return values


if __name__ == "__main__":
    main()

