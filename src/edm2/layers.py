"""Magnitude-preserving primitives of the EDM2 network (EDM2 paper, Section 2 and Appendix B.2).

Every function here maps unit-variance input to unit-variance output on expectation. All math that
sets magnitudes (norms, weight normalization) runs in at least float32, whatever the activation dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["normalize", "resample", "mp_silu", "mp_sum", "mp_cat", "MPFourier", "MPConv", "compute_dtype"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype for magnitude-critical math: float32, or float64 when the data already is."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def normalize(x: torch.Tensor, dim: int | Sequence[int] | None = None, eps: float = 1e-4) -> torch.Tensor:
    """Scale `x` to unit RMS over `dim` (default: all but the first), i.e. x / (eps + ||x|| / sqrt(n))."""
    if dim is None:
        dim = list(range(1, x.ndim))
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=compute_dtype(x.dtype))
    norm = torch.add(eps, norm, alpha=float(np.sqrt(norm.numel() / x.numel())))
    return x / norm.to(x.dtype)


def resample(x: torch.Tensor, f: Sequence[float] = (1, 1), mode: str = "keep") -> torch.Tensor:
    """Depthwise 2x down- or upsampling with the separable filter `f` (mode 'keep', 'down' or 'up')."""
    if mode == "keep":
        return x
    if mode not in ("down", "up"):
        raise ValueError(f"resample mode must be 'keep', 'down' or 'up', got {mode!r}")
    f = np.asarray(f, dtype=np.float64)
    if f.ndim != 1 or len(f) % 2 != 0:
        raise ValueError(f"resample filter must be 1-D of even length, got {f.tolist()}")
    pad = (len(f) - 1) // 2
    f = f / f.sum()
    kernel = torch.as_tensor(np.outer(f, f), dtype=x.dtype, device=x.device)
    c = x.shape[1]
    if mode == "down":
        return torch.nn.functional.conv2d(x, kernel.tile([c, 1, 1, 1]), groups=c, stride=2, padding=(pad,))
    # Up: transposed filter, scaled by 4 so that a constant image keeps its value (nearest for f=[1,1]).
    weight = (kernel * 4).tile([c, 1, 1, 1])
    return torch.nn.functional.conv_transpose2d(x, weight, groups=c, stride=2, padding=(pad,))


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU divided by its output RMS under unit-normal input (0.596), EDM2 Eq. 81."""
    return torch.nn.functional.silu(x) / 0.596


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """Magnitude-preserving blend ((1-t) a + t b) / sqrt((1-t)^2 + t^2), EDM2 Eq. 88."""
    return a.lerp(b, t) / float(np.sqrt((1 - t) ** 2 + t ** 2))


def mp_cat(a: torch.Tensor, b: torch.Tensor, dim: int = 1, t: float = 0.5) -> torch.Tensor:
    """Magnitude-preserving concatenation with balance `t` between the parts, EDM2 Eq. 103."""
    na, nb = a.shape[dim], b.shape[dim]
    c = np.sqrt((na + nb) / ((1 - t) ** 2 + t ** 2))
    wa = float(c / np.sqrt(na) * (1 - t))
    wb = float(c / np.sqrt(nb) * t)
    return torch.cat([wa * a, wb * b], dim=dim)


class MPFourier(torch.nn.Module):
    """Fourier features sqrt(2) cos(2 pi (f x + phi)) with fixed random f and phi: unit variance out."""

    def __init__(self, num_channels: int, bandwidth: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("freqs", 2 * np.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer("phases", 2 * np.pi * torch.rand(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(x.dtype)
        y = x.to(dtype).ger(self.freqs.to(dtype)) + self.phases.to(dtype)
        return (y.cos() * np.sqrt(2)).to(x.dtype)


class MPConv(torch.nn.Module):
    """Convolution (or linear layer when `kernel` is empty) with magnitude-preserving weights.

    In training mode the stored weight is first overwritten by its normalized self (forced weight
    normalization, EDM2 Section 2.3); the weight used is normalized again, so gradients stay tangent to
    the unit sphere. Output is scaled by gain / sqrt(fan_in).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: Sequence[int]) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.weight = torch.nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    def forward(self, x: torch.Tensor, gain: float | torch.Tensor = 1.0) -> torch.Tensor:
        w = self.weight.to(compute_dtype(self.weight.dtype))
        if self.training:
            with torch.no_grad():
                self.weight.copy_(normalize(w))  # forced weight normalization (w aliases the weight)
        w = normalize(w)
        w = (w * (gain / np.sqrt(w[0].numel()))).to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return torch.nn.functional.conv2d(x, w, padding=(w.shape[-1] // 2,))
