"""`edm2 dataset convert | encode | decode | stats`: the dataset tool."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import click

from edm2.cli.app import friendly_errors, main, one_voice

_VAE_HELP = ("Stable Diffusion VAE: a local folder holding a diffusers AutoencoderKL, or a Hugging Face hub name "
             "(needs `pip install 'edm2[vae]'`).")


@main.group()
def dataset() -> None:
    """Prepare datasets: convert images, encode them to VAE latents, decode latents, measure latent statistics."""


@contextlib.contextmanager
def _progress(enabled: bool = True, unit: str = "img"):
    """A progress callback (done, total) drawing a tqdm bar on stderr, created at the first report so that an early
    error stays one line."""
    from tqdm import tqdm

    bar = None

    def report(done: int, total: int) -> None:
        nonlocal bar
        if enabled:
            bar = bar or tqdm(total=total, unit=unit)
            bar.update(done - bar.n)

    try:
        yield report
    finally:
        if bar is not None:
            bar.close()


def _single_process(command: str) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(f"`edm2 dataset {command}` runs in one process (--workers decode in parallel); run it "
                         "without torchrun")


def _workers_option(most: int):
    default = min(most, os.cpu_count() or 1)
    return click.option("--workers", type=click.IntRange(min=0), default=default,
                        help=f"Processes reading and decoding in parallel (0: none).  [default: CPUs, at most {most}]")


@dataset.command()
@click.option("--source", required=True, type=click.Path(), help="Image folder (recursive), .zip or .npz.")
@click.option("--dest", required=True, type=click.Path(), help="Output: an uncompressed .zip or a folder.")
@click.option("--resolution", help="Output size: N (NxN), or WxH for center-crop-wide.  [default: keep]")
@click.option("--transform", type=click.Choice(["center-crop", "center-crop-wide", "center-crop-dhariwal", "resize"]),
              help="Crop/resize mode (as the official dataset tool).  [default: resize with --resolution]")
@click.option("--max-images", type=click.IntRange(min=1), help="Convert only the first N images (sorted by name).")
@click.option("--channels", type=click.Choice(["3", "1"]), default="3", show_default=True,
              help="3: RGB, 1: grayscale.")
@_workers_option(4)
@friendly_errors
def convert(source, dest, resolution, transform, max_images, channels, workers) -> None:
    """Convert images (labels from dataset.json or class subfolders) to a dataset in the official layout. A zip
    appears only when complete; a folder resumes when the command is run again."""
    from edm2.data.tool import convert_dataset
    from edm2.data.transforms import parse_resolution

    _single_process("convert")
    with _progress() as report:
        summary = convert_dataset(source, dest, parse_resolution(resolution), transform, max_images, int(channels),
                                  workers, report)
    click.echo(summary.line())


def _vae_options(fn):
    fn = click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True,
                      help="VAE precision (fp16 needs CUDA).")(fn)
    fn = click.option("--batch", "batch_size", type=click.IntRange(min=1), default=8, show_default=True,
                      help="Images per VAE batch.")(fn)
    fn = click.option("--device", default="auto", show_default=True, help="cpu, cuda, or auto.")(fn)
    fn = click.option("--max-images", type=click.IntRange(min=1), help="Only the first N images.")(fn)
    return fn


def _run_vae_job(job, source, dest, vae, device, batch_size, precision, max_images, workers) -> None:
    """Encode or decode under torchrun or alone; rank 0 reports."""
    from edm2.runtime import distributed, resolve_device, resolve_precision

    with one_voice(), distributed(device) as (rank, _):
        device = resolve_device(device)
        precision = resolve_precision(precision, device)
        with _progress(rank == 0) as report:
            summary = job(source, dest, vae, device, batch_size, precision, max_images, workers, report)
    if summary is not None:
        click.echo(summary.line())


@dataset.command()
@click.option("--source", required=True, type=click.Path(), help="Pixel dataset: folder or .zip of RGB images.")
@click.option("--dest", required=True, type=click.Path(), help="Output: an uncompressed .zip or a folder.")
@click.option("--vae", "--model-url", "vae", default="stabilityai/sd-vae-ft-mse", show_default=True, help=_VAE_HELP)
@_vae_options
@_workers_option(2)
@friendly_errors
def encode(source, dest, vae, device, batch_size, precision, max_images, workers) -> None:
    """Encode images to VAE latents (posterior mean and std per image, `.npy`); labels are carried over. Under
    torchrun the batches are split over the processes."""
    from edm2.data.tool import encode_dataset

    _run_vae_job(encode_dataset, source, dest, vae, device, batch_size, precision, max_images, workers)


@dataset.command()
@click.option("--source", required=True, type=click.Path(), help="Latent dataset (from `edm2 dataset encode`).")
@click.option("--dest", required=True, type=click.Path(), help="Output: an uncompressed .zip or a folder.")
@click.option("--vae", "--model-url", "vae", help=_VAE_HELP + "  [default: the one the dataset records]")
@_vae_options
@_workers_option(2)
@friendly_errors
def decode(source, dest, vae, device, batch_size, precision, max_images, workers) -> None:
    """Decode latents back to PNG images (the posterior mean of each image)."""
    from edm2.data.tool import decode_dataset

    _run_vae_job(decode_dataset, source, dest, vae, device, batch_size, precision, max_images, workers)


@dataset.command()
@click.option("--source", required=True, type=click.Path(), help="Latent dataset (from `edm2 dataset encode`).")
@click.option("--dest", type=click.Path(dir_okay=False), help="JSON output.  [default: SOURCE-stats.json beside it]")
@_workers_option(2)
@friendly_errors
def stats(source, dest, workers) -> None:
    """Measure the per-channel mean and std of a dataset's raw latents, for training on another VAE's latents
    (`edm2 train --latent-stats FILE`)."""
    from edm2.data.tool import dataset_stats

    _single_process("stats")
    path = Path(source)
    dest = dest or str(path.parent / f"{path.stem}-stats.json")
    with _progress() as report:
        result = dataset_stats(source, dest, workers=workers, progress=report)
    fmt = lambda v: "[" + ", ".join(f"{x:.4f}" for x in v) + "]"  # noqa: E731
    click.echo(f"raw_mean {fmt(result.raw_mean)}, raw_std {fmt(result.raw_std)} over {result.num_images} images "
               f"-> {dest} (train with --latent-stats {dest})")
