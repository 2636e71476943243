"""Measuring: images (files or a model's samples) -> feature statistics -> FID / FD_DINOv2 (+ precision/recall).

Generated images go from the sampler straight through the feature networks in batches, without PNGs (they can
be written too); under torch.distributed each process takes its share of the batches and the sums are added.
`evaluate_model` follows the paper's protocol: the same model measured on disjoint seed ranges, reporting
every value, the minimum and the spread.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edm2.data import Encoder, StandardRGBEncoder
from edm2.generate import SamplingSession, write_batches
from edm2.metrics.detectors import Detector
from edm2.metrics.frechet import frechet_distance_from_stats
from edm2.metrics.images import ArrayImages, ImageFiles, iterate_batches, open_images
from edm2.metrics.precision_recall import precision_recall
from edm2.metrics.stats import FeatureStats, MetricStats, Reference
from edm2.runtime import set_cuda_math, world_info
from edm2.sampling import SamplerSettings

__all__ = ["decode_to_uint8", "draw_subset", "OFFICIAL_NUM", "measure_images", "ModelUnderTest", "measure_model",
           "compare", "seed_repeats", "evaluate_model", "RepeatSummary"]

Progress = Callable[[int, int], None]  # (images measured in this step by all processes, total)
OFFICIAL_NUM = 50_000  # the images of one evaluation in the paper (calculate_metrics.py --num)


def decode_to_uint8(x: torch.Tensor, encoder: Encoder | None) -> torch.Tensor:
    """Network outputs [N, C, H, W] -> uint8 pixels, as the snapshot's encoder decodes them (None: standard RGB,
    [-1, 1] -> [0, 255]; the Stable Diffusion VAE for latent models)."""
    return (encoder or StandardRGBEncoder()).decode(x)


def _new_stats(detectors: dict[str, Detector], keep: int) -> dict[str, FeatureStats]:
    return {m: FeatureStats(d.feature_dim, keep, d.device) for m, d in detectors.items()}


def _finish(stats: dict[str, FeatureStats]) -> dict[str, MetricStats]:
    for s in stats.values():
        s.reduce()
    return {m: s.result() for m, s in stats.items()}


def draw_subset(count: int, num: int | None, seed: int = 0, source: str | Path = "the images") -> np.ndarray:
    """The indices (sorted) of the images to measure among `count`, drawn as the official `calculate_metrics.py`
    draws them (the `max_size` of its dataset): all when `num` is None or equals `count`, else the first `num` of
    0..count-1 shuffled by `np.random.RandomState(seed % 2**31)`. ValueError when `count` is less than `num`."""
    indices = np.arange(count, dtype=np.int64)
    if num is None:
        return indices
    if num > count:
        raise ValueError(f"{source}: holds {count} images, fewer than the {num} asked for; pass --num {count} "
                         "(or fewer) to measure a smaller set")
    if num < count:
        np.random.RandomState(seed % (1 << 31)).shuffle(indices)
        indices = np.sort(indices[:num])
    return indices


def measure_images(source: str | Path | ImageFiles | ArrayImages, detectors: dict[str, Detector],
                   batch_size: int = 64, num: int | None = None, seed: int = 0, keep: int = 0, num_workers: int = 2,
                   progress: Progress | None = None) -> tuple[dict[str, MetricStats], tuple[int, int]]:
    """Statistics of the images of a folder, zip, `.npz` or `digits` (or of `open_images`' result; a random
    subset of `num` when given, drawn as the official script draws it: `draw_subset`). Returns them and the
    resolution."""
    if batch_size <= 0:
        raise ValueError(f"--batch must be positive, got {batch_size}")
    images = source if isinstance(source, (ImageFiles, ArrayImages)) else open_images(source)
    for d in detectors.values():
        set_cuda_math(d.device)  # float32 means float32 on CUDA too (no TF32)
    path = getattr(images, "path", source)
    indices = draw_subset(len(images), num, seed, path)
    if len(indices) < 2:
        raise ValueError(f"{path}: statistics need at least 2 images, found {len(indices)}")
    stats = _new_stats(detectors, keep)
    world = world_info()[1]
    for batch, positions in iterate_batches(images, indices, batch_size, num_workers):
        for m, d in detectors.items():
            stats[m].update(d(batch), positions)
        if progress is not None:
            progress(len(batch) * world, len(indices))
    return _finish(stats), images.resolution


@dataclass
class ModelUnderTest:
    """A model and how to sample it: guide, sampler settings, encoder (from the snapshot), batch, device, and the
    `snapshot.encoder` of the network and the guide (None: not known; known, a guide of another space is refused)."""

    net: torch.nn.Module
    gnet: torch.nn.Module | None = None
    settings: SamplerSettings = SamplerSettings()
    encoder: Encoder | None = None  # `edm2.data.encoder_from_dict(snapshot.encoder)`; None: standard RGB
    batch_size: int = 32
    device: torch.device | str = "cpu"
    precision: str = "fp32"
    snapshot_encoders: tuple[dict | None, dict | None] | None = None

    def session(self) -> SamplingSession:
        """The sampling session of `edm2.generate` for this model: request checks, preparation, batches."""
        return SamplingSession(self.net, self.gnet, self.settings, self.encoder, self.batch_size, self.device,
                               self.precision, snapshot_encoders=self.snapshot_encoders)


def measure_model(model: ModelUnderTest, seeds: Sequence[int], detectors: dict[str, Detector], keep: int = 0,
                  outdir: str | Path | None = None, progress: Progress | None = None) -> dict[str, MetricStats]:
    """Statistics of the images `model` generates for `seeds` (class drawn from each seed, as in
    `edm2.generate`; the same pixels as `generate_images` makes), measured batch by batch; `outdir` also writes
    `<seed:06d>.png`. Each batch is measured and dropped: memory does not grow with the number of seeds."""
    batches = write_batches(model.session(), seeds, outdir)  # checks the request, loads the VAE, then writes
    stats = _new_stats(detectors, keep)
    world = world_info()[1]
    for batch in batches:
        for m, d in detectors.items():
            stats[m].update(d(batch.pixels), batch.positions)
        if progress is not None:
            progress(len(batch.seeds) * world, len(seeds))
        del batch  # one batch alive at a time: dropped before the next is sampled
    return _finish(stats)


def compare(stats: dict[str, MetricStats], reference: Reference, k: int = 3) -> dict[str, dict[str, float]]:
    """Per metric: the Frechet distance `fd` to the reference, and `precision`/`recall` (k-NN, k=3) when both
    sides kept features."""
    out: dict[str, dict[str, float]] = {}
    for m, s in stats.items():
        ref = reference.stats[m]
        out[m] = {"fd": frechet_distance_from_stats(s.mu, s.sigma, ref.mu, ref.sigma)}
        if s.features is not None and ref.features is not None:
            n = min(len(s.features), len(ref.features))
            out[m]["precision"], out[m]["recall"] = precision_recall(ref.features[:n], s.features[:n], k)
    return out


MAX_IMAGES = 10**7  # images of one evaluation command (the paper's 3 x 50,000 is far below)


def seed_repeats(seeds: Sequence[int], repeats: int, stride: int | None = None) -> list[list[int]]:
    """Seed lists of `repeats` evaluations: `seeds`, then `seeds` shifted by `stride`, 2 `stride`, ... (default:
    the span of `seeds`, so that the ranges are disjoint). ValueError when seeds repeat within or across them."""
    seeds = list(seeds)
    if repeats < 1:
        raise ValueError(f"--repeats must be at least 1, got {repeats}")
    if repeats * len(seeds) > MAX_IMAGES:
        raise ValueError(f"--repeats {repeats} x {len(seeds)} seeds is more than {MAX_IMAGES} images in one "
                         "command; split the evaluation")
    if len(set(seeds)) != len(seeds):
        raise ValueError("--seeds lists a seed twice; every image of an evaluation needs its own seed")
    stride = (max(seeds) - min(seeds) + 1) if stride is None else stride
    runs = [[s + r * stride for s in seeds] for r in range(repeats)]
    seen: set[int] = set()
    for r, run in enumerate(runs):
        if seen.intersection(run):
            raise ValueError(f"the seeds of repeat {r} overlap those of an earlier repeat (stride {stride} is less "
                             f"than the seed span {max(seeds) - min(seeds) + 1}); repeats must use disjoint seeds")
        seen.update(run)
    return runs


@dataclass
class RepeatSummary:
    """One metric over repeated evaluations: every value, their minimum (the paper's number) and spread."""

    values: list[float]

    @property
    def min(self) -> float:
        return float(np.min(self.values))

    @property
    def spread(self) -> float:
        return float(np.max(self.values) - np.min(self.values))

    def to_dict(self) -> dict:
        return {"min": self.min, "max": float(np.max(self.values)), "mean": float(np.mean(self.values)),
                "spread": self.spread, "values": list(self.values)}


def evaluate_model(model: ModelUnderTest, runs: list[list[int]], detectors: dict[str, Detector],
                   reference: Reference, keep: int = 0, outdir: str | Path | None = None,
                   progress: Progress | None = None) -> tuple[list[dict[str, dict[str, float]]],
                                                              dict[str, RepeatSummary]]:
    """Measure the model once per seed list of `runs`; returns the per-run results and, per result name
    ('fid', 'fid/precision', ...), the summary over runs."""
    results = [compare(measure_model(model, seeds, detectors, keep, outdir, progress), reference) for seeds in runs]
    keys = [(m, k) for m, values in results[0].items() for k in values]
    summary = {(m if k == "fd" else f"{m}/{k}"): RepeatSummary([res[m][k] for res in results]) for m, k in keys}
    return results, summary
