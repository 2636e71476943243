"""Deterministic random weights for the feature networks, in the layout of the published weight files.

The tests and `tests/data/metrics/make_golden.py` (which ran the independent implementations) draw the same
weights from a seed and a layout (names and shapes, in file order): `tests/data/metrics/*_layout.json`.
Scales keep activations of order one through every layer, so each layer matters to the features.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

LAYOUTS = Path(__file__).parent / "data" / "metrics"


def load_layout(name: str) -> list[tuple[str, tuple[int, ...]]]:
    """[(tensor name, shape), ...] of a published weight file ('inception' or 'dinov2_vitl14')."""
    return [(k, tuple(s)) for k, s in json.loads((LAYOUTS / f"{name}_layout.json").read_text())]


def _draw(name: str, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    n = torch.randn(shape, generator=g)
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "num_batches_tracked":
        return torch.zeros(shape, dtype=torch.int64)
    if leaf == "running_var":
        return 0.5 + torch.rand(shape, generator=g)
    if leaf == "gamma":  # DINOv2 layer scale
        return 0.1 + 0.4 * torch.rand(shape, generator=g)
    if len(shape) >= 2 and name not in ("pos_embed", "cls_token", "mask_token"):
        fan_in = math.prod(shape[1:])
        return n * math.sqrt((2.0 if ".conv." in name else 1.0) / fan_in)
    if ".norm" in name or name.startswith("norm.") or leaf == "weight":
        return 1 + 0.1 * n if leaf == "weight" else 0.1 * n
    return 0.1 * n  # biases, BN shifts and means, tokens, positional embedding


def random_weights(layout: list[tuple[str, tuple[int, ...]]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Weights for every (name, shape) of `layout`, drawn in layout order from one generator."""
    g = torch.Generator().manual_seed(seed)
    return {name: _draw(name, shape, g) for name, shape in layout}


def shrink_dinov2(layout: list[tuple[str, tuple[int, ...]]], dim: int, depth: int, grid: int = 37,
                  patch: int = 14) -> list[tuple[str, tuple[int, ...]]]:
    """The DINOv2 layout at another width/depth/positional grid (same names): for cheap tests."""
    scale = {1024: dim, 3072: 3 * dim, 4096: 4 * dim, 1370: grid * grid + 1, 14: patch}
    out = []
    for name, shape in layout:
        if name.startswith("blocks.") and int(name.split(".")[1]) >= depth:
            continue
        out.append((name, tuple(scale.get(s, s) for s in shape)))
    return out


def write_small_dinov2(folder: Path, dim: int = 64, depth: int = 1, seed: int = 0) -> Path:
    """A DINOv2 weight file in the published layout at a small width and depth, named as the published one."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "dinov2_vitl14_pretrain.pth"
    torch.save(random_weights(shrink_dinov2(load_layout("dinov2_vitl14"), dim, depth), seed), path)
    return path
