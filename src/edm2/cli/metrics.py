"""`edm2 metrics ref|calc|gen`: reference statistics, and FID / FD_DINOv2 of image files or of a model."""

from __future__ import annotations

import json
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import click

from edm2.cli.app import friendly_errors, main, one_voice
from edm2.cli.params import MAX_SEEDS, parse_seeds, sampler_options

OFFICIAL_NUM = 50_000  # edm2.metrics.measure.OFFICIAL_NUM (not imported here: the command line loads lazily)


def _common(fn):
    """Options of every metrics command: which metrics, where the detector weights are, device, batch."""
    fn = click.option("--batch", "batch_size", type=int, default=64, show_default=True, help="Images per batch.")(fn)
    fn = click.option("--device", default="auto", show_default=True, help="cpu, cuda, or auto.")(fn)
    fn = click.option("--detector-dir", type=click.Path(file_okay=False),
                      help="Folder of the feature networks' weight files.  [default: $EDM2_DETECTOR_DIR]")(fn)
    fn = click.option("--metrics", "metric_list",
                      help="Comma list of fid, fd_dinov2.  [default: ref: both; calc/gen: those in --ref]")(fn)
    return fn


def parse_metric_list(text: str | None, default: list[str]) -> list[str]:
    """'fid,fd_dinov2' -> the metric names (`default` when not given); ValueError for unknown ones."""
    from edm2.metrics.detectors import METRICS

    metrics = [m.strip() for m in text.split(",") if m.strip()] if text else list(default)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise ValueError(f"unknown metric {', '.join(unknown) or '(none)'}; choose from {', '.join(METRICS)}")
    return metrics


@contextmanager
def _bar(rank: int, total: int | None = None):
    """A progress callback (images of this step, total) -> tqdm bar on rank 0 with images/s and ETA, made at the
    first batch (so that an early error stays one line). `total` overrides the callback's (repeats)."""
    from tqdm import tqdm

    bar, start = None, time.time()

    def progress(step: int, step_total: int) -> None:
        nonlocal bar
        if rank == 0:
            if bar is None:
                bar = tqdm(total=total or step_total, unit="img", dynamic_ncols=True)
                bar.start_t = bar.last_print_t = start  # the rate and ETA count the first batch too
            bar.update(min(step, bar.total - bar.n))

    try:
        yield progress
    finally:
        if bar is not None:
            bar.close()


def load_detectors(metrics: list[str], detector_dir: str | None, device: str):
    """(the device, {metric: its feature network}) from `detector_dir` or the download cache."""
    from edm2.metrics.detectors import load_detector
    from edm2.runtime import resolve_device

    device = resolve_device(device)
    return device, {m: load_detector(m, detector_dir, device) for m in metrics}


def _report(results: dict, results_path: str | None) -> None:
    from edm2.files import atomic_write_text

    for name, value in results.items():
        if isinstance(value, dict):
            values = ", ".join(f"{v:.4f}" for v in value["values"])
            click.echo(f"{name} {value['min']:.4f} (min of {len(value['values'])}: {values}; spread "
                       f"{value['spread']:.4f})")
        else:
            click.echo(f"{name} {value:.4f}")
    if results_path:
        Path(results_path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(results_path, json.dumps(results, indent=2) + "\n")


def _flatten(result: dict[str, dict[str, float]]) -> dict[str, float]:
    return {(m if k == "fd" else f"{m}/{k}"): v for m, values in result.items() for k, v in values.items()}


def _gen_seeds(seeds: str | None, first: int | None, num: int | None) -> list[int]:
    """The seeds of one evaluation: `--seeds`, or the official `--seed`/`--num` (seeds first .. first + num - 1;
    first 0 and num 50000 by default, as calculate_metrics.py gen), not both."""
    if seeds is not None and (first is not None or num is not None):
        raise ValueError("give --seeds, or the official --seed/--num, not both")
    if seeds is not None:
        return parse_seeds(seeds)
    first, num = (0 if first is None else first), (OFFICIAL_NUM if num is None else num)
    if first < 0 or num < 2:
        raise ValueError(f"need --seed >= 0 and --num >= 2 (statistics need two images), got {first} and {num}")
    if num > MAX_SEEDS:
        raise ValueError(f"--num {num} is more than {MAX_SEEDS} images in one command; split the evaluation")
    return list(range(first, first + num))


@main.group()
def metrics() -> None:
    """FID and FD_DINOv2 as in the EDM2 paper (docs/metrics.md): reference statistics of a dataset ('ref'), the
    metrics of image files ('calc') or of a model's samples ('gen'). Under torchrun the work is split over the
    processes."""


@metrics.command()
@click.option("--data", "data_path", required=True, help="Dataset: image folder, .zip, .npz or 'digits'.")
@click.option("--dest", required=True, type=click.Path(dir_okay=False), help="Statistics file to write (.npz or "
              "the official .pkl layout).")
@click.option("--keep-features", type=int, default=0, show_default=True,
              help="Also store the features of this many images (for precision/recall; .npz only).")
@click.option("--workers", type=int, default=2, show_default=True, help="Image-decoding processes.")
@_common
@friendly_errors
def ref(data_path, dest, keep_features, workers, metric_list, detector_dir, device, batch_size) -> None:
    """Reference statistics (mean and covariance per metric) of a dataset."""
    from edm2.metrics.images import open_images
    from edm2.metrics.measure import measure_images
    from edm2.metrics.stats import save_reference
    from edm2.runtime import distributed

    if not dest.endswith((".npz", ".pkl")):
        raise ValueError(f"--dest {dest}: write .npz (edm2) or .pkl (the official layout)")
    if keep_features and not dest.endswith(".npz"):
        raise ValueError("--keep-features needs an .npz --dest (the official .pkl layout has no place for features)")
    metric_names = parse_metric_list(metric_list, ["fid", "fd_dinov2"])
    with one_voice(), distributed(device) as (rank, _):
        images = open_images(data_path)
        device, detectors = load_detectors(metric_names, detector_dir, device)
        with _bar(rank) as progress:
            stats, resolution = measure_images(images, detectors, batch_size, keep=keep_features,
                                               num_workers=workers, progress=progress)
        if rank == 0:
            Path(dest).parent.mkdir(parents=True, exist_ok=True)
            save_reference(dest, stats, resolution)
            num = next(iter(stats.values())).num_images
            click.echo(f"wrote {dest}: {', '.join(stats)} of {num} images at {resolution[0]}x{resolution[1]}")


@metrics.command()
@click.option("--images", "image_path", required=True, help="Image folder, .zip, .npz or 'digits'.")
@click.option("--ref", "ref_path", required=True, help="Reference statistics (.npz, or the official .pkl/.npz).")
@click.option("--num", "num_images", type=int, default=OFFICIAL_NUM, show_default=True,
              help="Images to measure: a random subset drawn as the official calculate_metrics.py draws it (all "
                   "when there are exactly this many; fewer is an error).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random subset.")
@click.option("--workers", type=int, default=2, show_default=True, help="Image-decoding processes.")
@click.option("--results", "results_path", type=click.Path(dir_okay=False), help="Also write the results as JSON.")
@_common
@friendly_errors
def calc(image_path, ref_path, num_images, seed, workers, results_path, metric_list, detector_dir, device,
         batch_size) -> None:
    """FID / FD_DINOv2 (and precision/recall when the reference keeps features) of a set of images."""
    from edm2.metrics.images import open_images
    from edm2.metrics.measure import compare, draw_subset, measure_images
    from edm2.metrics.stats import load_reference
    from edm2.runtime import distributed

    with one_voice(), distributed(device) as (rank, _):
        reference = load_reference(ref_path)
        metric_names = parse_metric_list(metric_list, list(reference.stats))
        images = open_images(image_path)
        reference.check(metric_names, images.resolution)
        draw_subset(len(images), num_images, seed, image_path)  # too few images: one line, before the detectors
        device, detectors = load_detectors(metric_names, detector_dir, device)
        reference.check(metric_names, images.resolution, {m: d.feature_dim for m, d in detectors.items()})
        keep = min((len(reference.stats[m].features) for m in metric_names
                    if reference.stats[m].features is not None), default=0)
        with _bar(rank) as progress:
            stats, _ = measure_images(images, detectors, batch_size, num_images, seed, keep, workers, progress)
        if rank == 0:
            _report(_flatten(compare(stats, reference)), results_path)


@metrics.command()
@click.option("--net", "net_path", type=click.Path(), help="Snapshot (.safetensors or official .pkl), or a URL.")
@click.option("--preset", help="A published model by name ('edm2 info --generation'), as the official "
                               "generate_images.py --preset; --ref defaults to its dataset's reference statistics.")
@click.option("--gnet", "gnet_path", type=click.Path(), help="Guide snapshot (for --guidance).")
@click.option("--ref", "ref_path", help="Reference statistics (.npz, or the official .pkl/.npz), or a URL.  "
                                       "[default with --preset: the official ones of its dataset]")
@click.option("--seeds", help="Seeds of one evaluation, e.g. 0-49999.  [default: 0-49999]")
@click.option("--seed", "first_seed", type=int, help="The official spelling: the first seed of --num consecutive "
                                                     "seeds (instead of --seeds).  [default: 0]")
@click.option("--num", "num_images", type=int, help="The official spelling: images of one evaluation, seeds --seed "
                                                    "to --seed + --num - 1.  [default: 50000]")
@click.option("--repeats", type=int, default=1, show_default=True,
              help="Evaluations on disjoint seed ranges (the paper reports the minimum of 3).")
@click.option("--seed-stride", type=int, help="Offset between the seeds of repeats.  [default: the seed span]")
@click.option("--outdir", type=click.Path(file_okay=False), help="Also write the images as PNG.")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]),
              help="U-Net precision.  [default: fp16 on CUDA for networks with use_fp16, else fp32]")
@click.option("--vae", help="For latent models: the VAE to decode with (a local folder or hub name).  "
                           "[default: the snapshot's]")
@click.option("--results", "results_path", type=click.Path(dir_okay=False), help="Also write the results as JSON.")
@_common
@friendly_errors
@sampler_options()
def gen(net_path, preset, gnet_path, ref_path, seeds, first_seed, num_images, repeats, seed_stride, outdir, precision,
        vae, results_path, metric_list, detector_dir, device, batch_size, settings) -> None:
    """FID / FD_DINOv2 of a model's samples, generated in batches straight into the feature networks (each batch
    measured and dropped). Networks of the EDM (2022) release sample with the defaults of its generate.py (18
    steps) unless --steps is given."""
    from edm2.cli.generate import published_models
    from edm2.data import encoder_from_dict
    from edm2.files import load_network
    from edm2.metrics.measure import ModelUnderTest, evaluate_model, seed_repeats
    from edm2.metrics.stats import load_reference
    from edm2.runtime import distributed, resolve_device, resolve_precision

    net_path, gnet_path, settings, published = published_models(preset, net_path, gnet_path, settings)
    ref_path = ref_path or (published.ref_url if published is not None else None)
    if ref_path is None:
        raise ValueError("give --ref REFERENCE (the dataset's statistics, 'edm2 metrics ref')")
    runs = seed_repeats(_gen_seeds(seeds, first_seed, num_images), repeats, seed_stride)
    with one_voice(), distributed(device) as (rank, _):
        reference = load_reference(ref_path)
        metric_names = parse_metric_list(metric_list, list(reference.stats))
        device = resolve_device(device)
        with warnings.catch_warnings(record=True) as caught:  # an official .pkl converted on the fly: one line
            warnings.simplefilter("always")
            net, snap = load_network(net_path, device)
            gnet, gsnap = load_network(gnet_path, device) if gnet_path else (None, None)
        for w in caught:
            click.echo(f"edm2: warning: {w.message}", err=True)
        encoder = encoder_from_dict(snap.encoder, vae_name=vae)
        model = ModelUnderTest(net, gnet, settings.for_network(net), encoder, batch_size, device,
                               resolve_precision(precision, device, net.use_fp16),
                               (snap.encoder, gsnap.encoder) if gsnap is not None else None)
        model.session().check(runs[0])  # the request as `edm2 generate` checks it, before anything is loaded
        encoder.init(device)  # a latent model's VAE: loaded (and its resolution known) before the detectors
        resolution = encoder.pixel_resolution(net.img_resolution)
        reference.check(metric_names, (resolution, resolution))
        device, detectors = load_detectors(metric_names, detector_dir, str(device))
        reference.check(metric_names, dims={m: d.feature_dim for m, d in detectors.items()})
        keep = min((len(reference.stats[m].features) for m in metric_names
                    if reference.stats[m].features is not None), default=0)
        with _bar(rank, sum(map(len, runs))) as progress:
            results, summary = evaluate_model(model, runs, detectors, reference, keep, outdir, progress)
        if rank == 0:
            _report(_flatten(results[0]) if repeats == 1 else {k: s.to_dict() for k, s in summary.items()},
                    results_path)
