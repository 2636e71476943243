"""`edm2 guidance-sweep`: quality against guidance weight and guide (EMA length, or any guide files)."""

from __future__ import annotations

from pathlib import Path

import click

from edm2.cli.app import friendly_errors, main
from edm2.cli.params import FLOATS, INTERVAL, parse_std_list


@main.command("guidance-sweep")
@click.option("--net", "net_path", required=True, type=click.Path(), help="The model to guide (snapshot, .pkl, URL).")
@click.option("--gnet", "gnet_paths", multiple=True, type=click.Path(),
              help="A guide (repeat for several): an unconditional model (classifier-free guidance) or a smaller, "
                   "shorter-trained one (autoguidance).")
@click.option("--guide-run", type=click.Path(file_okay=False),
              help="The guide's training run: guides are reconstructed from its snapshots at each --guide-std.")
@click.option("--guide-std", default="0.05,0.10,0.15", show_default=True,
              help="EMA lengths of the guide (with --guide-run).")
@click.option("--guidance", "weights", type=FLOATS, default="1,1.5,2,2.5,3", show_default=True,
              help="Guidance weights to try (1: no guidance).")
@click.option("--guidance-interval", "interval", type=INTERVAL,
              help="Guide only for SIGMA_LO < sigma <= SIGMA_HI.  [default: every step]")
@click.option("--outdir", required=True, type=click.Path(file_okay=False), help="Table, plot and guides go here.")
@click.option("--samples", type=int, default=500, show_default=True, help="Samples per point (judge).")
@click.option("--steps", type=int, default=32, show_default=True, help="Heun sampler steps.")
@click.option("--judge", "judge_path", type=click.Path(dir_okay=False),
              help="Judge file (`edm2 judge train`).  [default: the digits judge for digits models, else "
                   "OUTDIR/judge.safetensors, trained on the model's dataset on first use]")
@click.option("--data", help="Dataset to train the judge on.  [default: the model's]")
@click.option("--ref", "ref_path", help="Reference statistics (`edm2 metrics ref`, official .pkl/.npz, or a URL): "
                                       "score by FID / FD_DINOv2 instead of a judge (also unconditional models).")
@click.option("--metrics", "metric_list", help="With --ref: comma list of fid, fd_dinov2; the first is optimized.  "
                                               "[default: those in --ref]")
@click.option("--detector-dir", type=click.Path(file_okay=False),
              help="With --ref: folder of the feature networks' weights.  [default: $EDM2_DETECTOR_DIR, else the "
                   "download cache]")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, or auto.")
@friendly_errors
def guidance_sweep(net_path, gnet_paths, guide_run, guide_std, weights, interval, outdir, samples, steps,
                   judge_path, data, ref_path, metric_list, detector_dir, device) -> None:
    """Sample quality against guidance weight, one curve per guide (the autoguidance study): class accuracy
    and Frechet distance in a judge's features for a class-conditional model, or FID / FD_DINOv2 against
    --ref; table and plot in OUTDIR."""
    from edm2.files import load_network
    from edm2.guidance import check_guidance
    from edm2.metrics.guidance_sweep import Guide, guidance_sweep
    from edm2.runtime import resolve_device
    from edm2.sampling import SamplerSettings

    if not gnet_paths and guide_run is None:
        raise ValueError("no guide: give --gnet GUIDE (repeatable) and/or --guide-run RUN with --guide-std")
    if samples < 2 or steps < 1:
        raise ValueError(f"--samples must be >= 2 and --steps >= 1, got {samples} and {steps}")
    for w in weights:
        check_guidance(w)
    settings = SamplerSettings(num_steps=steps, guidance_interval=interval)
    device = str(resolve_device(device))
    outdir = Path(outdir)
    net, snap = load_network(net_path, device)
    score, key, title = _score(snap, outdir, samples, device, judge_path, data, ref_path, metric_list,
                               detector_dir)
    guides = [Guide(Path(p).stem, *_guide(p, device)) for p in gnet_paths]
    if guide_run is not None:
        guides += _reconstructed_guides(guide_run, parse_std_list(guide_std, "--guide-std")[0], outdir, device)
    click.echo(f"{len(guides)} guide(s) x {len(weights)} weight(s), {samples} samples each ...")
    table = guidance_sweep(net, guides, weights, score, key, settings, outdir,
                           title=f"{title} vs guidance weight ({samples} samples)", echo=click.echo)
    b, base = table.best, table.baseline
    extra = (lambda r: f", accuracy {100 * r['accuracy']:.1f} %") if "accuracy" in b else (lambda r: "")
    click.echo(f"no guidance: {key} {base[key]:.4f}{extra(base)}")
    click.echo(f"best: guide {b['guide']}, w={b['weight']:g}: {key} {b[key]:.4f}{extra(b)}")
    click.echo(f"table {table.json_path}, plot {table.plot_path}")


def _score(snap, outdir: Path, samples: int, device: str, judge_path, data, ref_path, metric_list, detector_dir):
    """(the score callable, the key it optimizes, a title): FID / FD_DINOv2 against --ref, or the judge."""
    from edm2.data import encoder_from_dict
    from edm2.metrics.guidance_sweep import FrechetScore, JudgeScore
    from edm2.metrics.judge import pick_judge

    if ref_path is None:
        if metric_list is not None or detector_dir is not None:
            raise ValueError("--metrics and --detector-dir go with --ref (FID / FD_DINOv2); without it a judge scores")
        judge, name = pick_judge((snap.network.to_dict() if snap.network else {}), snap.info or {}, outdir,
                                 judge_path, data, echo=click.echo)
        return JudgeScore(judge, samples, device), "fd", f"{name}: judge Frechet distance"
    if judge_path is not None or data is not None:
        raise ValueError("--judge and --data choose the judge; with --ref the feature networks score instead")
    from edm2.cli.metrics import load_detectors, parse_metric_list
    from edm2.metrics.stats import load_reference

    reference = load_reference(ref_path)
    names = parse_metric_list(metric_list, list(reference.stats))
    _, detectors = load_detectors(names, detector_dir, device)
    reference.check(names, dims={m: d.feature_dim for m, d in detectors.items()})
    encoder = encoder_from_dict(snap.encoder)
    return FrechetScore(detectors, reference, list(range(samples)), encoder, 64, device), names[0], names[0]


def _guide(path: str, device: str):
    from edm2.files import load_network

    net, snap = load_network(path, device)
    return net, snap.sigma_rel


def _reconstructed_guides(run: str, stds: list[float], outdir: Path, device: str) -> list:
    """The guide at each EMA length, reconstructed post hoc from its run's snapshots into OUTDIR/guides."""
    from edm2.ema.reconstruct import EMATarget, posthoc_reconstruct
    from edm2.files import load_network
    from edm2.metrics.guidance_sweep import Guide

    results = posthoc_reconstruct(run, outdir / "guides", [EMATarget(s) for s in stds])
    return [Guide(f"EMA {r.sigma_rel:.3f}", load_network(r.path, device)[0], r.sigma_rel) for r in results]
