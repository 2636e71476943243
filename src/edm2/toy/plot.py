"""The toy's figure: for each class a row of panels, one per sampling method (ground truth, no guidance,
classifier-free guidance, autoguidance), each with the samples over the contours of the class's true density and
the method's mean exact log-likelihood in its title."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from edm2.files.base import save_figure
from edm2.toy.mixture import GaussianMixture

__all__ = ["plot_toy", "view_box"]

_CONTOUR_RANGE = 10.0  # the density is shaded from its maximum down this far in log-density
_COLORS = ("tab:blue", "tab:red", "tab:green", "tab:purple")


def view_box(mixture: GaussianMixture, margin: float = 0.25) -> tuple[float, float, float, float]:
    """(x0, x1, y0, y1): the box around every component's mean (of a class: `mixture.restrict(label)`), widened
    by `margin` on every side."""
    lo = mixture.means.min(0).values - margin
    hi = mixture.means.max(0).values + margin
    return float(lo[0]), float(hi[0]), float(lo[1]), float(hi[1])


def _density_grid(mixture: GaussianMixture, label: int, box: tuple[float, float, float, float],
                  resolution: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """X, Y and log p(x | label) on a resolution x resolution grid over `box`."""
    xs = torch.linspace(box[0], box[1], resolution, dtype=torch.float64)
    ys = torch.linspace(box[2], box[3], resolution, dtype=torch.float64)
    X, Y = torch.meshgrid(xs, ys, indexing="xy")
    points = torch.stack([X.reshape(-1), Y.reshape(-1)], dim=1)
    logp = torch.cat([mixture.log_prob(chunk, 0.0, label) for chunk in points.split(8192)])
    return X, Y, logp.reshape(X.shape)


def _panel(ax, grid: tuple[torch.Tensor, torch.Tensor, torch.Tensor], x: torch.Tensor, color: str, title: str,
           box: tuple[float, float, float, float]) -> None:
    """One panel: the density (shaded, a few contour lines), the samples, the title, the box."""
    X, Y, logp = grid
    top = float(logp.max())
    shade = logp.clamp(min=top - _CONTOUR_RANGE).numpy()
    ax.contourf(X.numpy(), Y.numpy(), shade, levels=24, cmap="Greys", alpha=0.45)
    ax.contour(X.numpy(), Y.numpy(), logp.numpy(), levels=[top - _CONTOUR_RANGE, top - 6, top - 3], colors="grey",
               linewidths=0.4)
    x = x.detach().to(torch.float64).cpu()
    ax.scatter(x[:, 0].numpy(), x[:, 1].numpy(), s=2.0, color=color, alpha=0.6, linewidths=0)
    ax.set_xlim(box[0], box[1])
    ax.set_ylim(box[2], box[3])
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)


def plot_toy(mixture: GaussianMixture, samples: Mapping[int, Mapping[str, torch.Tensor]],
             scores: Mapping[int, Mapping[str, float]], path: str | Path, titles: Mapping[str, str] | None = None,
             resolution: int = 300) -> None:
    """Write the figure as PNG (atomically): one row per class in `samples` ({class: {method: points [N, 2]}}),
    one column per method (in the order of the first row), titled with `titles[method]` (the method's name when
    absent) and the method's mean log-likelihood `scores[class][method]`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = titles or {}
    labels = list(samples)
    methods = list(samples[labels[0]])
    boxes = {label: view_box(mixture.restrict(label)) for label in labels}
    aspect = max((b[3] - b[2]) / (b[1] - b[0]) for b in boxes.values())
    fig, axes = plt.subplots(len(labels), len(methods), squeeze=False, dpi=130,
                             figsize=(3.0 * len(methods), (3.0 * aspect + 0.6) * len(labels)))
    for row, label in enumerate(labels):
        grid = _density_grid(mixture, label, boxes[label], resolution)
        for col, method in enumerate(methods):
            title = f"class {label}: {titles.get(method, method)}\nmean log p = {scores[label][method]:.2f}"
            _panel(axes[row][col], grid, samples[label][method], _COLORS[col % len(_COLORS)], title, boxes[label])
    fig.tight_layout()
    save_figure(fig, path)
