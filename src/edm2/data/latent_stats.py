"""Per-channel statistics of a latent dataset's raw latents, for standardising them (`StabilityVAEEncoder`'s
`raw_mean` and `raw_std`). A dataset stores, per latent channel c, the posterior mean m_c and std s_c of every
pixel; training samples z = m + s * eps. Over the dataset, E[z] = E[m] and Var[z] = E[m^2] + E[s^2] - E[m]^2:
exact moments of what training sees, computed in float64 without drawing samples.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edm2.data.loader import read_in_order

__all__ = ["LatentStats", "latent_statistics", "load_latent_stats"]


@dataclass(frozen=True)
class LatentStats:
    """Mean and standard deviation of the raw latents, per channel, over `num_images` items."""

    raw_mean: tuple[float, ...]
    raw_std: tuple[float, ...]
    num_images: int

    def to_dict(self, source: str) -> dict:
        """The JSON document of `edm2 dataset stats` (read back by `load_latent_stats`)."""
        return {"raw_mean": list(self.raw_mean), "raw_std": list(self.raw_std), "num_images": self.num_images,
                "source": str(source)}


def latent_statistics(dataset, batch_size: int = 64, workers: int = 0, progress=None) -> LatentStats:
    """The statistics of a latent dataset (items [2C, H, W]: C means, then C stds). `progress(done, total)` is
    called after each batch."""
    if not getattr(dataset, "latents", False):
        raise ValueError(f"{dataset.name} holds images, not latents; compute statistics of a dataset written by "
                         "`edm2 dataset encode`")
    c = dataset.channels // 2
    s_m, s_m2, s_v, count = np.zeros(c), np.zeros(c), np.zeros(c), 0
    for indices, items in read_in_order(dataset, batch_size, workers):
        x = items.numpy().astype(np.float64)
        mean, std = x[:, :c], x[:, c:]
        s_m += mean.sum(axis=(0, 2, 3))
        s_m2 += np.square(mean).sum(axis=(0, 2, 3))
        s_v += np.square(std).sum(axis=(0, 2, 3))
        count += len(indices)
        if progress is not None:
            progress(count, len(dataset))
    pixels = count * dataset.resolution * dataset.resolution
    m = s_m / pixels
    var = np.maximum(s_m2 / pixels + s_v / pixels - m * m, 0)
    return LatentStats(tuple(float(v) for v in m), tuple(float(v) for v in np.sqrt(var)), count)


def load_latent_stats(path: str | Path) -> tuple[list[float], list[float]]:
    """(raw_mean, raw_std) from a file `edm2 dataset stats` wrote; ValueError naming the file otherwise."""
    try:
        doc = json.loads(Path(path).read_text())
        mean, std = [float(v) for v in doc["raw_mean"]], [float(v) for v in doc["raw_std"]]
    except OSError as e:
        raise ValueError(f"--latent-stats {path}: cannot read ({e.strerror or e})") from None
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ValueError(f"--latent-stats {path}: not a statistics file of `edm2 dataset stats` "
                         "({\"raw_mean\": [...], \"raw_std\": [...]})") from None
    if len(mean) != len(std) or not mean or not all(s > 0 and math.isfinite(s) for s in std) or \
            not all(math.isfinite(v) for v in mean):
        raise ValueError(f"--latent-stats {path}: needs one finite mean and one positive std per channel")
    return mean, std
