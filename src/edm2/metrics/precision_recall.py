"""Improved precision and recall (Kynkaanniemi et al., NeurIPS 2019) in a feature space.

Each set's manifold is the union of balls around its features, each ball reaching the k-th nearest other
feature of the same set (k = 3). Precision: the fraction of generated features inside the real manifold;
recall: the fraction of real features inside the generated manifold. Distances are computed in row blocks, so
memory grows with the block size, not with the square of the number of features.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["knn_radii", "manifold_coverage", "precision_recall"]


def _block_rows(n_cols: int, budget: int = 1 << 24) -> int:
    return max(1, budget // max(1, n_cols))


def knn_radii(features: torch.Tensor, k: int = 3) -> torch.Tensor:
    """Distance from each feature to its k-th nearest neighbour among the others [N] (float64)."""
    x = features.to(torch.float64)
    if x.shape[0] <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} features per set, got {x.shape[0]}")
    rows = _block_rows(x.shape[0])
    # The k+1 smallest distances include the feature itself (distance 0).
    return torch.cat([torch.cdist(x[i:i + rows], x).kthvalue(k + 1, dim=1).values
                      for i in range(0, x.shape[0], rows)])


def manifold_coverage(manifold: torch.Tensor, radii: torch.Tensor, queries: torch.Tensor) -> float:
    """Fraction of `queries` within radii[j] of some manifold[j]."""
    m, q = manifold.to(torch.float64), queries.to(torch.float64)
    rows = _block_rows(m.shape[0])
    inside = [(torch.cdist(q[i:i + rows], m) <= radii[None]).any(dim=1) for i in range(0, q.shape[0], rows)]
    return float(torch.cat(inside).to(torch.float64).mean())


def precision_recall(real: np.ndarray | torch.Tensor, fake: np.ndarray | torch.Tensor,
                     k: int = 3, device: torch.device | str = "cpu") -> tuple[float, float]:
    """(precision, recall) of generated features `fake` [M, D] against real features `real` [N, D]."""
    real, fake = torch.as_tensor(real, device=device), torch.as_tensor(fake, device=device)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature sets of shapes {list(real.shape)} and {list(fake.shape)} are not comparable")
    precision = manifold_coverage(real, knn_radii(real, k), fake)
    recall = manifold_coverage(fake, knn_radii(fake, k), real)
    return precision, recall
