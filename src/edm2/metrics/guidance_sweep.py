"""Quality against guidance weight and guide (the autoguidance study, Karras et al. 2024): sample a model with
each guide at each weight, score the samples (a judge's Frechet distance and class accuracy, or FID /
FD_DINOv2), and write a table and a plot of the metric against the weight, one curve per guide."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from edm2.files import atomic_write_text, save_figure
from edm2.sampling import SamplerSettings

__all__ = ["Guide", "JudgeScore", "FrechetScore", "guidance_sweep", "plot_guidance_sweep"]

Score = Callable[[torch.nn.Module, torch.nn.Module | None, SamplerSettings], Mapping[str, float]]


@dataclass(frozen=True)
class Guide:
    """One guide of the sweep: a label for the table and plot (e.g. 'EMA 0.100'), its network, and its EMA
    length when known."""

    label: str
    net: torch.nn.Module
    sigma_rel: float | None = None


@dataclass
class JudgeScore:
    """Samples of seeds 0..num_samples-1 (seed i of class i mod the number of classes) judged by a classifier
    (`Judge` or `DigitsJudge`): Frechet distance `fd` in its features and class `accuracy`."""

    judge: object
    num_samples: int = 500
    device: str = "cpu"
    batch: int = 250

    def __call__(self, net: torch.nn.Module, gnet: torch.nn.Module | None,
                 settings: SamplerSettings) -> dict[str, float]:
        from edm2.metrics.digits import class_samples

        if not net.label_dim:
            raise ValueError("the judge scores class-conditional models by class; give --ref for FID/FD_DINOv2")
        images, classes = class_samples(net, self.num_samples, settings.num_steps, self.device, self.batch, gnet,
                                        settings)
        report = self.judge.evaluate(images, np.asarray(classes))
        return {"fd": float(report.fd), "accuracy": float(report.accuracy)}


@dataclass
class FrechetScore:
    """FID / FD_DINOv2 of the samples of `seeds` (class drawn from each seed, as `edm2 metrics gen`) against a
    reference: `detectors` ({metric: feature network}), `reference` (`edm2.metrics.stats.load_reference`), the
    model's `encoder` (decoding latents to pixels; None: pixels)."""

    detectors: dict
    reference: object
    seeds: Sequence[int]
    encoder: object | None = None
    batch: int = 64
    device: str = "cpu"

    def __call__(self, net: torch.nn.Module, gnet: torch.nn.Module | None,
                 settings: SamplerSettings) -> dict[str, float]:
        from edm2.metrics.measure import ModelUnderTest, compare, measure_model

        model = ModelUnderTest(net, gnet, settings, self.encoder, self.batch, self.device)
        results = compare(measure_model(model, self.seeds, self.detectors), self.reference)
        return {m: float(v["fd"]) for m, v in results.items()}


@dataclass
class SweepTable:
    """The rows (guide, weight, metric values), the best row, the key and the files written."""

    rows: list[dict]
    best: dict
    key: str
    json_path: Path | None = None
    plot_path: Path | None = None
    baseline: dict = field(default_factory=dict)


def guidance_sweep(net: torch.nn.Module, guides: Sequence[Guide], weights: Sequence[float], score: Score,
                   key: str, settings: SamplerSettings = SamplerSettings(), outdir: str | Path | None = None,
                   minimize: bool = True, title: str | None = None,
                   echo: Callable[[str], None] | None = None) -> SweepTable:
    """Score `net` guided by each of `guides` at each weight (`settings` carries the sampler, its steps and any
    guidance interval); weight 1 (no guidance) is scored once, as the baseline. Writes
    `outdir/guidance_sweep.json` and `.png` when `outdir` is given. ValueError for an empty or bad request
    before any sampling."""
    weights = sorted({float(w) for w in weights})
    if not guides or not weights:
        raise ValueError("a guidance sweep needs at least one guide and one weight")
    if not all(math.isfinite(w) for w in weights):
        raise ValueError(f"guidance weights must be finite numbers, got {weights}")
    for g in guides:
        if (g.net.img_resolution, g.net.img_channels) != (net.img_resolution, net.img_channels):
            raise ValueError(f"guide {g.label} makes {g.net.img_resolution}x{g.net.img_resolution}x"
                             f"{g.net.img_channels} images, the model {net.img_resolution}x{net.img_resolution}x"
                             f"{net.img_channels}; guide with a model of the same data")
    baseline = {"guide": None, "weight": 1.0, **score(net, None, replace(settings, guidance=1.0))}
    rows = []
    for g in guides:
        for w in weights:
            values = baseline if w == 1 else score(net, g.net, replace(settings, guidance=w))
            rows.append({"guide": g.label, "guide_sigma_rel": g.sigma_rel, "weight": w,
                         **{k: v for k, v in values.items() if k not in ("guide", "weight")}})
            if echo is not None:
                echo(f"  {g.label:>14s}  w={w:<5g} " + "  ".join(f"{k} {v:.4g}" for k, v in values.items()
                                                             if isinstance(v, float) and k != "weight"))
    finite = [r for r in rows if math.isfinite(r[key])]
    if not finite:
        raise ValueError(f"metric {key!r} is not finite for any guide and weight")
    best = (min if minimize else max)(finite, key=lambda r: r[key])
    table = SweepTable(rows, best, key, baseline=baseline)
    if outdir is not None:
        outdir = Path(outdir)
        outdir.mkdir(parents=True, exist_ok=True)
        table.json_path, table.plot_path = outdir / "guidance_sweep.json", outdir / "guidance_sweep.png"
        atomic_write_text(table.json_path, json.dumps({"key": key, "minimize": minimize, "settings":
                                                       settings.to_dict(), "baseline": baseline, "best": best,
                                                       "rows": rows}, indent=2) + "\n")
        plot_guidance_sweep(rows, table.plot_path, key, title or f"{key} vs guidance weight", minimize)
    return table


def plot_guidance_sweep(rows: Sequence[Mapping], path: str | Path, key: str, title: str,
                        minimize: bool = True) -> None:
    """`key` (and class accuracy, when measured) against the guidance weight, one curve per guide; PNG, atomic."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [key] + (["accuracy"] if "accuracy" in rows[0] and key != "accuracy" else [])
    fig, axes = plt.subplots(1, len(keys), figsize=(5.2 * len(keys), 3.8), dpi=120, squeeze=False)
    best = (min if minimize else max)(rows, key=lambda r: r[key])
    for ax, k in zip(axes[0], keys):
        for label in dict.fromkeys(r["guide"] for r in rows):
            mine = [r for r in rows if r["guide"] == label]
            ax.plot([r["weight"] for r in mine], [r[k] for r in mine], "o-", ms=4, label=f"guide {label}")
        if k == key:
            ax.plot([best["weight"]], [best[key]], "*", ms=14, color="tab:red",
                    label=f"best: {best['guide']}, w={best['weight']:g}")
        ax.set_xlabel("guidance weight w")
        ax.set_ylabel(k)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
