"""Guidance: one denoiser made of a network and its guide, D_w = D_g + w (D - D_g) (EDM2 paper, section 5).

The guide is an unconditional model (classifier-free guidance) or a smaller, shorter-trained version of the
main model (autoguidance, Karras et al. 2024). With a guidance interval (Kynkaenniemi et al., NeurIPS 2024) the
guide is evaluated only for noise levels sigma_lo < sigma <= sigma_hi; outside the band D_w is D alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

__all__ = ["check_guidance", "check_interval", "guided", "in_interval", "parse_interval"]

Denoiser = Callable[..., torch.Tensor]
Interval = tuple[float, float]


def check_interval(interval: Interval | None) -> Interval | None:
    """The interval as two floats; ValueError unless 0 <= sigma_lo < sigma_hi (sigma_hi may be infinite)."""
    if interval is None:
        return None
    if len(interval) != 2:
        raise ValueError(f"--guidance-interval takes SIGMA_LO,SIGMA_HI, got {interval!r}")
    lo, hi = float(interval[0]), float(interval[1])
    if math.isnan(lo) or math.isnan(hi) or not 0 <= lo < hi:
        raise ValueError(f"--guidance-interval needs 0 <= SIGMA_LO < SIGMA_HI, got {lo:g},{hi:g}")
    return lo, hi


def parse_interval(text: str) -> Interval:
    """'0.28,5.42' (or '0.28,inf') -> (0.28, 5.42); ValueError with the expected form otherwise."""
    parts = text.split(",")
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise ValueError(f"--guidance-interval takes SIGMA_LO,SIGMA_HI (e.g. 0.28,5.42), got {text!r}") from None
    return check_interval(values)


def check_guidance(guidance: float) -> float:
    """The guidance weight; ValueError for a weight that is not a finite number."""
    if not math.isfinite(guidance):
        raise ValueError(f"--guidance must be a finite number, got {guidance}")
    return guidance


def in_interval(sigma: torch.Tensor, interval: Interval | None) -> torch.Tensor:
    """Where guidance applies: sigma_lo < sigma <= sigma_hi (everywhere without an interval), per element."""
    if interval is None:
        return torch.ones_like(sigma, dtype=torch.bool)
    lo, hi = interval
    return (sigma > lo) & (sigma <= hi)


def guided(net: Denoiser, gnet: Denoiser | None, guidance: float, labels: torch.Tensor | None,
           dtype: torch.dtype, interval: Interval | None = None) -> Callable[[torch.Tensor, torch.Tensor],
                                                                             torch.Tensor]:
    """D(x; sigma) of `net`, or gnet + guidance (net - gnet) when guidance != 1, in `dtype`. With `interval`,
    the guide is evaluated only for the noise levels inside it (one sigma for the batch, as the samplers
    pass; a per-image sigma mixes guided and unguided images)."""
    check_guidance(guidance)
    interval = check_interval(interval)
    if guidance != 1 and gnet is None:
        raise ValueError(f"guidance={guidance} needs a guide network (gnet)")

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        Dx = net(x, sigma, labels).to(dtype)
        if guidance == 1:
            return Dx
        inside = in_interval(torch.as_tensor(sigma), interval)
        if inside.numel() == 1:
            return gnet(x, sigma, labels).to(dtype).lerp(Dx, guidance) if bool(inside) else Dx
        mixed = gnet(x, sigma, labels).to(dtype).lerp(Dx, guidance)
        return torch.where(inside.reshape(-1, *[1] * (Dx.ndim - 1)), mixed, Dx)

    return denoise
