"""Magnitude-preserving primitives of the EDM2 network (EDM2 paper, Section 2 and Appendix B.2).

Every function here maps unit-variance input to unit-variance output on expectation. All math that
sets magnitudes (norms, weight normalization) runs in at least float32, whatever the activation dtype.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np
import torch

__all__ = ["normalize", "resample", "mp_silu", "mp_sum", "mp_cat", "MPFourier", "MPConv", "compute_dtype",
           "FastPaths", "FAST_PATHS", "fast_paths", "no_autocast", "force_weight_normalization_"]


@dataclasses.dataclass
class FastPaths:
    """Process-wide switches for the fast paths. The defaults keep float32 results bit-identical to the
    plain code (the path the golden tests check); `sdpa` changes results by float rounding only.

    - `weight_cache`: in eval mode, when no gradient is needed, MPConv reuses its normalized, scaled
      weight until the weight (or a Parameter gain) changes in place, moves, or the module is put back
      in training mode. Same numbers, one weight normalization per sampling run instead of one per step.
    - `sdpa`: the cosine attention of `Block` uses torch.nn.functional.scaled_dot_product_attention
      instead of the explicit einsum/softmax form.
    - `strided_norm`: `normalize` over axes that exclude the innermost one (the pixel norm over
      channels, the per-head norm of attention) as a float32 sum of squares instead of
      torch.linalg.vector_norm, which is slow for strided reductions on CPU.
    """

    weight_cache: bool = True
    sdpa: bool = False
    strided_norm: bool = False


FAST_PATHS = FastPaths()


@contextlib.contextmanager
def fast_paths(weight_cache: bool | None = None, sdpa: bool | None = None,
               strided_norm: bool | None = None) -> Iterator[FastPaths]:
    """Temporarily change FAST_PATHS (None leaves a switch as it is); restores the old values on exit."""
    old = dataclasses.replace(FAST_PATHS)
    new = {"weight_cache": weight_cache, "sdpa": sdpa, "strided_norm": strided_norm}
    for name, value in new.items():
        if value is not None:
            setattr(FAST_PATHS, name, bool(value))
    try:
        yield FAST_PATHS
    finally:
        for name in new:
            setattr(FAST_PATHS, name, getattr(old, name))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype for magnitude-critical math: float32, or float64 when the data already is."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """A context that switches autocast off on `device` when it is on (it keeps float32 math float32)."""
    if device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def normalize(x: torch.Tensor, dim: int | Sequence[int] | None = None, eps: float = 1e-4) -> torch.Tensor:
    """Scale `x` to unit RMS over `dim` (default: all but the first), i.e. x / (eps + ||x|| / sqrt(n))."""
    if dim is None:
        dim = list(range(1, x.ndim))
    dims = [d % x.ndim for d in ([dim] if isinstance(dim, int) else dim)]
    if FAST_PATHS.strided_norm and x.ndim - 1 not in dims:
        # Reductions over a non-innermost axis (pixel norm over channels, attention heads) are many times
        # faster as a sum of squares than through vector_norm on CPU; the clamp keeps the gradient of an
        # all-zero slice at 0 (as vector_norm's) instead of NaN, and is far below eps otherwise.
        sum_sq = x.to(compute_dtype(x.dtype)).square().sum(dim=dims, keepdim=True)
        norm = sum_sq.clamp_min(1e-30).sqrt()
    else:
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

    def __init__(self, num_channels: int, bandwidth: float = 1.0, amplitude: float = float(np.sqrt(2))) -> None:
        super().__init__()
        self.amplitude = amplitude  # sqrt(2): unit variance; 1: the plain Fourier features of configurations C-F
        self.register_buffer("freqs", 2 * np.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer("phases", 2 * np.pi * torch.rand(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(x.dtype)
        with no_autocast(x.device):  # phases of cos() need float32 or better
            y = x.to(dtype).ger(self.freqs.to(dtype)) + self.phases.to(dtype)
            return (y.cos() * self.amplitude).to(x.dtype)


class MPConv(torch.nn.Module):
    """Convolution (or linear layer when `kernel` is empty) with magnitude-preserving weights.

    In training mode the stored weight is first overwritten by its normalized self (forced weight
    normalization, EDM2 Section 2.3); the weight used is normalized again, so gradients stay tangent to
    the unit sphere. Output is scaled by gain / sqrt(fan_in).

    Code compiled by torch.compile does not write the stored weight (inductor would drop the write):
    call `force_weight_normalization_` on the module before each training-mode forward of a compiled
    network, which gives the eager results.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: Sequence[int], weight_norm: bool = True,
                 forced: bool = True) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.weight_norm = weight_norm  # False (ablation configuration C): He-uniform weights, used as they are
        self.forced = forced and weight_norm  # False (configuration D): normalized on use only
        self.weight = torch.nn.Parameter(torch.randn(out_channels, in_channels, *kernel))
        if not weight_norm:
            bound = float(np.sqrt(6 / self.weight[0].numel()))
            self.weight.data.uniform_(-bound, bound)
        self._weight_cache: tuple[tuple, torch.Tensor] | None = None  # (key, effective weight); not state

    def forward(self, x: torch.Tensor, gain: float | torch.Tensor = 1.0) -> torch.Tensor:
        key = self._cache_key(x.dtype, gain)
        if key is None:
            w = self._effective_weight(x.dtype, gain)
        elif self._weight_cache is not None and self._weight_cache[0] == key:
            w = self._weight_cache[1]
        else:
            w = self._effective_weight(x.dtype, gain)
            self._weight_cache = (key, w)
        if w.ndim == 2:
            return x @ w.t()
        return torch.nn.functional.conv2d(x, w, padding=(w.shape[-1] // 2,))

    def _effective_weight(self, dtype: torch.dtype, gain: float | torch.Tensor) -> torch.Tensor:
        w = self.weight.to(compute_dtype(self.weight.dtype))
        if not self.weight_norm:
            return (w * gain).to(dtype)
        if self.training and self.forced and not torch.compiler.is_compiling():
            self.force_normalize_()  # w aliases the weight, so it is normalized too
        w = normalize(w)
        return (w * (gain / np.sqrt(w[0].numel()))).to(dtype)

    @torch.no_grad()
    def force_normalize_(self) -> None:
        """Forced weight normalization: overwrite the stored weight by its normalized self."""
        w = self.weight.to(compute_dtype(self.weight.dtype))
        self.weight.copy_(normalize(w))

    def _cache_key(self, dtype: torch.dtype, gain: float | torch.Tensor) -> tuple | None:
        """What the effective weight depends on, or None when it must not be cached: training mode, a
        gradient needed, torch.compile tracing, a gain that is neither a number nor a Parameter."""
        weight = self.weight
        if self.training or not FAST_PATHS.weight_cache or torch.compiler.is_compiling() or weight.is_inference():
            return None
        grad = torch.is_grad_enabled()
        if grad and weight.requires_grad:
            return None
        if isinstance(gain, torch.nn.Parameter):
            if (grad and gain.requires_grad) or gain.is_inference():
                return None
            gain_key = ("param", id(gain), gain.data_ptr(), gain._version)
        elif isinstance(gain, (int, float)):
            gain_key = ("number", float(gain))
        else:
            return None
        return (weight.data_ptr(), weight._version, weight.dtype, weight.device, tuple(weight.shape), dtype,
                gain_key)

    def train(self, mode: bool = True) -> MPConv:
        self._weight_cache = None
        return super().train(mode)


def force_weight_normalization_(module: torch.nn.Module) -> None:
    """Forced weight normalization of every MPConv in `module` that is in training mode, as each does at the
    start of an eager training-mode forward. Needed before every training forward of a compiled network."""
    for m in module.modules():
        if isinstance(m, MPConv) and m.training and m.forced:
            m.force_normalize_()
