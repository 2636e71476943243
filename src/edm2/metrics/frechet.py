"""Frechet distance between Gaussians fitted to two feature sets (the distance behind FID and FD_DINOv2)."""

from __future__ import annotations

import numpy as np

__all__ = ["frechet_distance", "frechet_distance_from_stats"]


def frechet_distance_from_stats(mu_a: np.ndarray, sigma_a: np.ndarray, mu_b: np.ndarray,
                                sigma_b: np.ndarray) -> float:
    """|mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^1/2 S_b S_a^1/2)^1/2), in float64.

    tr((S_a S_b)^1/2) is computed as the sum of square roots of the eigenvalues of the symmetric matrix
    S_a^1/2 S_b S_a^1/2 (the same eigenvalues), so singular covariances (dead features, fewer images than
    features) need no regularisation and give no complex parts."""
    mu_a, mu_b = np.asarray(mu_a, np.float64), np.asarray(mu_b, np.float64)
    s_a, s_b = np.atleast_2d(np.asarray(sigma_a, np.float64)), np.atleast_2d(np.asarray(sigma_b, np.float64))
    if mu_a.shape != mu_b.shape or s_a.shape != s_b.shape or s_a.shape != (mu_a.size, mu_a.size):
        raise ValueError(f"statistics of different shapes: mu {mu_a.shape} vs {mu_b.shape}, sigma {s_a.shape} vs "
                         f"{s_b.shape}")
    w, v = np.linalg.eigh((s_a + s_a.T) / 2)
    sqrt_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = sqrt_a @ s_b @ sqrt_a
    cross = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    fd = float(np.sum((mu_a - mu_b) ** 2) + np.trace(s_a) + np.trace(s_b) - 2 * cross)
    return max(fd, 0.0)  # a squared distance; rounding can take identical statistics a hair below zero


def frechet_distance(feat_a: np.ndarray, feat_b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets [N, D] (see `frechet_distance_from_stats`)."""
    feat_a, feat_b = np.asarray(feat_a, np.float64), np.asarray(feat_b, np.float64)
    return frechet_distance_from_stats(feat_a.mean(0), np.cov(feat_a, rowvar=False), feat_b.mean(0),
                                       np.cov(feat_b, rowvar=False))
