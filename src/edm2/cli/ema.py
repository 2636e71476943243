"""`edm2 reconstruct` and `edm2 ema-sweep`: post-hoc EMA from a run's snapshots.

`edm2 reconstruct` also answers the command line of the official `reconstruct_phema.py`: `--indir`, `--outdir`,
`--outstd` (= `--std`, with the official list syntax `0.010,0.015,...,0.250`), `--outkimg` (the target time in
the thousands of the official file names), `--instd` (= `--from-std`), `--skip` and `--batch`.
"""

from __future__ import annotations

import click

from edm2.cli.app import friendly_errors, main
from edm2.cli.params import NIMG, parse_std_for, parse_std_list


def _posthoc_options(fn):
    """Options shared by `reconstruct` and `ema-sweep`: which snapshots to use and how strictly."""
    fn = click.option("--allow-gaps", is_flag=True, help="Accept irregular snapshot series (missing snapshots).")(fn)
    fn = click.option("--max-error", type=float, default=0.1, show_default=True,
                      help="Largest accepted relative squared L2 error of a reconstructed weighting profile.")(fn)
    fn = click.option("--from-std", "--instd", "from_stds",
                      help="Use only the snapshots of these tracked sigma_rel (e.g. 0.10: one average per "
                           "snapshot; --instd: the official name).  [default: all]")(fn)
    fn = click.option("--nimg", type=NIMG, help="Target training time in images.  [default: last snapshot]")(fn)
    return fn


def _note_dropped(dropped: list[float]) -> None:
    if dropped:
        click.echo(f"note: skipping sigma_rel {', '.join(f'{s:g}' for s in dropped)} of the range: power-function "
                   "EMAs span (0, 0.2887)")


@main.command()
@click.option("--indir", required=True, type=click.Path(),
              help="Training run folder or folder of snapshots: edm2's, or the official raw snapshots "
                   "(network-snapshot-<kimg>-<std>.pkl).")
@click.option("--outdir", required=True, type=click.Path(file_okay=False), help="Where to write the results.")
@click.option("--std", "--outstd", "stds", required=True,
              help="EMA lengths sigma_rel: a comma list (0.10,0.15), start:stop:step (0.05:0.20:0.05), or the "
                   "official list with '...' (0.010,0.015,...,0.250).")
@click.option("--std-for", "std_for", multiple=True,
              help="PATTERN=SIGMA_REL: another length for tensors whose name matches the fnmatch PATTERN "
                   "(repeatable; the first match wins), e.g. 'unet.enc.*=0.05'.")
@click.option("--outkimg", type=click.IntRange(min=1),
              help="Target time in thousands of images, as in the official file names (instead of --nimg).")
@click.option("--skip", "skip_existing", is_flag=True, help="Skip the outputs whose file exists already.")
@click.option("--batch", type=click.IntRange(min=1), default=8, show_default=True,
              help="Most outputs reconstructed per pass over the snapshots (more: one pass per batch).")
@_posthoc_options
@friendly_errors
def reconstruct(indir, outdir, stds, std_for, outkimg, skip_existing, batch, nimg, from_stds, max_error,
                allow_gaps) -> None:
    """Post-hoc EMA: synthesize EMA lengths at any time from a run's snapshots."""
    from edm2.ema.reconstruct import EMATarget, posthoc_reconstruct
    from edm2.files.pickle_convert import kimg_to_nimg

    values, dropped = parse_std_list(stds, "--std")
    per_tensor = parse_std_for(std_for)
    inputs = None if from_stds is None else parse_std_list(from_stds, "--from-std")[0]
    if outkimg is not None and nimg is not None:
        raise ValueError("give the target time once: --nimg or --outkimg")
    nimg = kimg_to_nimg(outkimg) if outkimg is not None else nimg
    _note_dropped(dropped)
    results = posthoc_reconstruct(indir, outdir, [EMATarget(s, per_tensor) for s in values], nimg, inputs,
                                  max_error, allow_gaps, batch=batch, skip_existing=skip_existing)
    if len(results) < len(values):
        click.echo(f"note: skipped {len(values) - len(results)} output(s) that exist already (--skip)")
    for r in results:
        detail = ""
        if len(r.profile_errors) > 1:
            detail = " (" + ", ".join(f"{s:.3f}: {e:.2e}" for s, e in r.profile_errors.items()) + ")"
        extra = "".join(f", {p}={s:.3f}" for p, s in r.per_tensor)
        click.echo(f"sigma_rel {r.sigma_rel:.3f}{extra} at {r.nimg} images from {r.num_snapshots} snapshots: "
                   f"profile error {r.profile_error:.2e}{detail} -> {r.path}")


@main.command("ema-sweep")
@click.option("--run", "run_dir", required=True, type=click.Path(),
              help="Training run folder or folder of snapshots of a class-conditional model.")
@click.option("--outdir", type=click.Path(file_okay=False), help="Output folder.  [default: RUN/ema-sweep]")
@click.option("--std", "stds", default="0.02:0.28:0.01", show_default=True,
              help="EMA lengths: start:stop:step (inclusive; lengths the snapshots do not support are "
                   "skipped) or a comma list (all must be supported).")
@click.option("--samples", type=int, default=500, show_default=True, help="Samples judged per EMA length.")
@click.option("--steps", type=int, default=16, show_default=True, help="Heun sampler steps per sample.")
@click.option("--judge", "judge_path", type=click.Path(dir_okay=False),
              help="Judge file (`edm2 judge train`).  [default: the digits judge for digits models, else "
                   "RUN/judge.safetensors, trained on the run's dataset on first use]")
@click.option("--data", help="Dataset to train the judge on.  [default: the run's]")
@click.option("--judge-images", type=int, default=60_000, show_default=True,
              help="Training images of a judge trained here.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, or auto.")
@click.option("--per-tensor", "per_tensor", multiple=True,
              help="Then vary only the EMA length of the tensors this name or fnmatch pattern matches, the others "
                   "at the best length (EDM2 Figure 5b): one curve per pattern (repeatable), e.g. "
                   "'unet.enc.8x8_block0.conv_res0.weight'.")
@click.option("--base-std", type=float, help="With --per-tensor: the others' length, instead of the best of a "
              "sweep over every tensor.")
@_posthoc_options
@friendly_errors
def ema_sweep(run_dir, outdir, stds, samples, steps, judge_path, data, judge_images, device, per_tensor, base_std,
              nimg, from_stds, max_error, allow_gaps) -> None:
    """Quality against EMA length: reconstruct each length, judge class-conditional samples (class accuracy and
    Frechet distance in the judge's feature space), plot, pick the best. With --per-tensor, then one tensor at a
    time."""
    from pathlib import Path

    from edm2.ema.sweep import check_tensor_patterns
    from edm2.ema.sweep import ema_sweep as sweep
    from edm2.metrics.judge import quality_for_run
    from edm2.runtime import resolve_device

    values, dropped = parse_std_list(stds, "--std")
    inputs = None if from_stds is None else parse_std_list(from_stds, "--from-std")[0]
    if samples < 2 or steps < 1:
        raise ValueError(f"--samples must be >= 2 and --steps >= 1, got {samples} and {steps}")
    if base_std is not None and not per_tensor:
        raise ValueError("--base-std goes with --per-tensor (the length of the tensors not swept)")
    if per_tensor:  # before anything is written
        check_tensor_patterns(run_dir, per_tensor, base_std or values[0], nimg, inputs, allow_gaps)
    _note_dropped(dropped)
    device = str(resolve_device(device))
    outdir = Path(outdir) if outdir else Path(run_dir) / "ema-sweep"
    metric, name = quality_for_run(run_dir, samples, steps, device, judge_path, data, judge_images, click.echo)
    if per_tensor and base_std is not None:
        _per_tensor(run_dir, outdir, values, per_tensor, base_std, metric, name, samples, nimg, inputs, max_error,
                    allow_gaps, ":" in stds)
        return
    result = sweep(run_dir, outdir, values, metric, key="fd",
                   nimg=nimg, input_stds=inputs, max_error=max_error, allow_gaps=allow_gaps,
                   skip_unsupported=":" in stds, secondary="accuracy",
                   title=f"{name}: Frechet distance vs EMA length ({samples} samples)", echo=click.echo)
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
    if per_tensor:
        _per_tensor(run_dir, outdir, [r["sigma_rel"] for r in result.rows], per_tensor, b["sigma_rel"], metric, name,
                    samples, nimg, inputs, max_error, allow_gaps, False)


def _per_tensor(run_dir, outdir, values, patterns, base_std, metric, name, samples, nimg, inputs, max_error,
                allow_gaps, skip_unsupported) -> None:
    """The per-tensor sweeps of `ema-sweep --per-tensor`, and their table."""
    from edm2.ema.sweep import per_tensor_sweep

    click.echo(f"per-tensor sweeps, the other tensors at sigma_rel {base_std:.3f}:")
    result = per_tensor_sweep(run_dir, outdir, values, patterns, base_std, metric, key="fd", nimg=nimg,
                              input_stds=inputs, max_error=max_error, allow_gaps=allow_gaps,
                              skip_unsupported=skip_unsupported, echo=click.echo,
                              title=f"{name}: Frechet distance, one tensor's EMA length varied ({samples} samples)")
    click.echo(f"all tensors at {base_std:.3f}: Frechet distance {result.base['fd']:.4f}")
    for pattern, rows in result.curves.items():
        best = min(rows, key=lambda r: r["fd"])
        click.echo(f"  {pattern}: best sigma_rel {best['sigma_rel']:.3f}, Frechet distance {best['fd']:.4f} "
                   f"({100 * (best['fd'] / result.base['fd'] - 1):+.1f} %)")
    click.echo(f"table {result.json_path}, plot {result.plot_path}")
