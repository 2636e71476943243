"""Feature statistics (mean and covariance per metric, accumulated in float64) and reference-statistics files.

Accumulation keeps sums, not features, so memory stays flat in the number of images; under torch.distributed
the sums of all processes are added. A bounded number of features (by image index, so the same images whatever
the batching or the number of processes) can be kept for precision and recall.

Reference files: ours are `.npz` with `<metric>/mu`, `<metric>/sigma`, optionally `<metric>/features`, plus
`num_images` and `resolution`; the official EDM2 `dataset-refs/*.pkl` (a pickled dict {metric: {'mu', 'sigma'}},
read with the code-free reader, numpy arrays only) and EDM's `fid-refs/*.npz` (`mu`, `sigma`: FID) are read too,
from a path or a URL (downloaded once into the cache).
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from edm2.files import atomic_output
from edm2.files.download import download, is_url
from edm2.files.pickles import ALLOW_NUMPY, read_pickle
from edm2.runtime import world_info

__all__ = ["FeatureStats", "MetricStats", "Reference", "save_reference", "load_reference", "REFERENCE_FORMAT"]

REFERENCE_FORMAT = "edm2-reference-statistics"


@dataclass
class MetricStats:
    """Mean and covariance of one metric's features (float64), optionally with kept features [K, D]."""

    mu: np.ndarray
    sigma: np.ndarray
    num_images: int
    features: np.ndarray | None = None


class FeatureStats:
    """Running float64 sums of features, their outer products, and the features of images with index < `keep`."""

    def __init__(self, dim: int, keep: int = 0, device: torch.device | str = "cpu") -> None:
        self.dim, self.keep = dim, keep
        self.count = 0
        self.sum = torch.zeros([dim], dtype=torch.float64, device=device)
        self.sum_outer = torch.zeros([dim, dim], dtype=torch.float64, device=device)
        self.kept: dict[int, np.ndarray] = {}

    def update(self, features: torch.Tensor, indices: list[int] | None = None) -> None:
        """Add features [N, D] of the images with global `indices` (needed only when keeping features)."""
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(f"features of shape {list(features.shape)} for statistics of dimension {self.dim}")
        x = features.to(self.sum.device, torch.float64)
        self.sum += x.sum(0)
        self.sum_outer += x.T @ x
        self.count += x.shape[0]
        if self.keep and indices is not None:
            for i, row in zip(indices, features.cpu().numpy()):
                if i < self.keep:
                    self.kept[int(i)] = row

    def reduce(self) -> None:
        """Sum the statistics of all processes of the torch.distributed group (every process gets the total)."""
        if world_info()[1] == 1:
            return
        count = torch.tensor([self.count], dtype=torch.float64, device=self.sum.device)
        for t in (self.sum, self.sum_outer, count):
            torch.distributed.all_reduce(t)
        self.count = int(count.item())
        if self.keep:
            parts: list = [None] * world_info()[1]
            torch.distributed.all_gather_object(parts, self.kept)
            self.kept = {k: v for part in parts for k, v in part.items()}

    def result(self) -> MetricStats:
        """Mean and unbiased covariance (the official estimator: (sum x x^T - n mu mu^T) / (n - 1))."""
        if self.count < 2:
            raise ValueError(f"statistics need at least 2 images, got {self.count}")
        mu = self.sum / self.count
        sigma = (self.sum_outer - torch.outer(mu, mu) * self.count) / (self.count - 1)
        kept = np.stack([self.kept[k] for k in sorted(self.kept)]) if self.kept else None
        return MetricStats(mu.cpu().numpy(), sigma.cpu().numpy(), self.count, kept)


@dataclass
class Reference:
    """Reference statistics per metric, with the image resolution they were computed at when known."""

    stats: dict[str, MetricStats]
    resolution: tuple[int, int] | None = None
    source: str = ""
    num_images: int = 0
    extra: dict = field(default_factory=dict)

    def check(self, metrics: list[str], resolution: tuple[int, int] | None = None,
              dims: dict[str, int] | None = None) -> None:
        """ValueError unless this reference has every metric, at `resolution` (when both are known), with
        features of the detectors' dimensions (when given)."""
        missing = [m for m in metrics if m not in self.stats]
        if missing:
            raise ValueError(f"{self.source} has no statistics for {', '.join(missing)} (it has "
                             f"{', '.join(self.stats) or 'none'}); compute a reference with these metrics")
        if self.resolution is not None and resolution is not None and tuple(resolution) != tuple(self.resolution):
            raise ValueError(f"{self.source} was computed from {self.resolution[0]}x{self.resolution[1]} images, these "
                             f"are {resolution[0]}x{resolution[1]}; use a reference of this resolution")
        for m in metrics if dims else []:
            if self.stats[m].mu.shape != (dims[m],):
                raise ValueError(f"{self.source}: {m} statistics have {self.stats[m].mu.shape[0]} features, the "
                                 f"{m} detector gives {dims[m]}; the reference was computed with another network")


def save_reference(path: str | Path, stats: dict[str, MetricStats], resolution: tuple[int, int]) -> None:
    """Write reference statistics: `.npz` (ours, with resolution and kept features) or `.pkl` (the official
    EDM2 layout: {'num_images': N, metric: {'mu', 'sigma'}}, readable by the official code)."""
    path = Path(path)
    num = min(s.num_images for s in stats.values())
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        if path.suffix == ".pkl":
            pickle.dump({"num_images": num, **{m: {"mu": s.mu, "sigma": s.sigma} for m, s in stats.items()}}, f)
            return
        arrays = {"format": np.array(REFERENCE_FORMAT), "num_images": np.array(num),
                  "resolution": np.array(resolution, dtype=np.int64)}
        for m, s in stats.items():
            arrays[f"{m}/mu"], arrays[f"{m}/sigma"] = s.mu, s.sigma
            if s.features is not None:
                arrays[f"{m}/features"] = s.features
        np.savez(f, **arrays)


def load_reference(path: str | Path) -> Reference:
    """Read reference statistics (ours, the official EDM2 .pkl, or EDM's .npz); ValueError for anything else. A
    URL is downloaded once into the cache (`edm2.files.download`) and read from there."""
    if is_url(path):
        reference = load_reference(download(str(path)))
        reference.source = str(path)
        return reference
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"reference statistics {path}: no such file")
    if path.suffix == ".pkl":
        return _official_reference(read_pickle(path, ALLOW_NUMPY), str(path))
    try:
        with np.load(path, allow_pickle=False) as d:
            arrays = {k: d[k] for k in d.files}
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"{path}: not a readable .npz of statistics ({e})") from None
    if "mu" in arrays and "sigma" in arrays:  # EDM's fid-refs
        return Reference({"fid": _stats(arrays["mu"], arrays["sigma"], 0, None, path)}, None, str(path))
    if str(arrays.get("format", "")) != REFERENCE_FORMAT:
        raise ValueError(f"{path}: not reference statistics (no mu/sigma arrays); make them with 'edm2 metrics ref'")
    metrics = sorted({k.split("/")[0] for k in arrays if "/" in k})
    num = int(arrays["num_images"])
    stats = {m: _stats(arrays[f"{m}/mu"], arrays[f"{m}/sigma"], num, arrays.get(f"{m}/features"), path)
             for m in metrics}
    resolution = tuple(int(v) for v in arrays["resolution"])
    return Reference(stats, resolution, str(path), num)


def _official_reference(data: object, source: str) -> Reference:
    if not isinstance(data, dict):
        raise ValueError(f"{source}: not reference statistics (a pickled {type(data).__name__})")
    stats = {m: _stats(v.get("mu"), v.get("sigma"), int(data.get("num_images", 0)), None, source)
             for m, v in data.items() if isinstance(v, dict)}
    if not stats:
        raise ValueError(f"{source}: not reference statistics (no metric with mu/sigma)")
    return Reference(stats, None, source, int(data.get("num_images", 0)))


def _stats(mu, sigma, num: int, features, source) -> MetricStats:
    mu, sigma = np.asarray(mu, dtype=np.float64), np.asarray(sigma, dtype=np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{source}: mu/sigma of shapes {list(mu.shape)}/{list(sigma.shape)} are not a mean and "
                         "its covariance")
    return MetricStats(mu, sigma, num, None if features is None else np.asarray(features, dtype=np.float32))
