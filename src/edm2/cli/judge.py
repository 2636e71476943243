"""`edm2 judge train`: the classifier that judges samples of a class-conditional model of any pixel dataset."""

from __future__ import annotations

import click

from edm2.cli.app import friendly_errors, main


@main.group()
def judge() -> None:
    """A classifier of a labelled dataset that judges generated samples (class accuracy, Frechet distance)."""


@judge.command("train")
@click.option("--data", required=True, help="Labelled image folder, .zip, .npz, or 'digits'.")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False), help="Judge file (.safetensors).")
@click.option("--images", type=int, default=60_000, show_default=True,
              help="Images the judge trains on (several passes over a small dataset).")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed (also of the held-out split).")
@friendly_errors
def judge_train(data, out_path, images, seed) -> None:
    """Train a judge on DATA (all but up to 2000 held-out images) and store it with the held-out features."""
    from pathlib import Path

    from tqdm import tqdm

    from edm2.data import open_dataset
    from edm2.metrics.judge import Judge, train_judge

    if images < 1:
        raise ValueError(f"--images must be positive, got {images}")
    request = {"data": str(data), "images": images, "seed": seed}
    if Path(out_path).exists():
        if Judge.load(out_path).info.get("request") == request:  # a rerun of the same command: done already
            click.echo(f"{out_path} holds the judge of this command already (same data, images and seed)")
            return
        raise ValueError(f"{out_path} exists (another judge); remove it or choose another --out")
    dataset = open_dataset(data)
    bar = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        bar = bar or tqdm(total=total, unit="step", desc="judge")
        bar.update(done - bar.n)

    try:
        result = train_judge(dataset, seed=seed, images=images, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    result.info["request"] = request
    result.save(out_path)
    click.echo(f"judge of {dataset.name} ({len(dataset)} images, {dataset.num_classes} classes): held-out accuracy "
               f"{100 * result.real_accuracy:.1f} % on {len(result.real_features)} images -> {out_path}")
