"""The sampling design space of the EDM paper (Table 1, Section 3): time-step discretizations, noise schedules
sigma(t) and signal scalings s(t), as separate helpers that the general sampler (`edm2.sampling.ablation_sampler`)
combines.

- Discretization (the noise levels sigma_0 > ... > sigma_{N-1} visited): 'vp' (uniform in t of the VP SDE),
  've' (geometric in sigma^2), 'iddpm' (a subset of the iDDPM cosine table u_j), 'edm' (EDM Eq. 5, rho = 7).
- Schedule sigma(t): 'vp' (the VP SDE's, fitted to the sigma range), 've' (sqrt t), 'linear' (sigma = t).
- Scaling s(t): 'vp' (1 / sqrt(1 + sigma(t)^2)) or 'none' (s = 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from edm2.networks.precond import iddpm_u_table

__all__ = ["DISCRETIZATIONS", "SCHEDULES", "SCALINGS", "VP_BETA_D", "VP_BETA_MIN", "edm_sigma_steps",
           "default_sigma_range", "sigma_steps", "NoiseSchedule", "noise_schedule", "SignalScaling",
           "signal_scaling", "check_choice"]

DISCRETIZATIONS = ("vp", "ve", "iddpm", "edm")
SCHEDULES = ("vp", "ve", "linear")
SCALINGS = ("vp", "none")
VP_BETA_D, VP_BETA_MIN = 19.9, 0.1  # the VP SDE of Song et al. (EDM Table 1)


def check_choice(option: str, value: str, choices: tuple[str, ...]) -> None:
    """ValueError naming `option` unless `value` is one of `choices`."""
    if value not in choices:
        raise ValueError(f"unknown {option} {value!r}; choose one of {', '.join(choices)}")


def edm_sigma_steps(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                    dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu") -> torch.Tensor:
    """The EDM time steps sigma_0 > ... > sigma_{N-1} (EDM Eq. 5) followed by sigma_N = 0."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    i = torch.arange(num_steps, dtype=dtype, device=device)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    t = (hi + i / max(num_steps - 1, 1) * (lo - hi)) ** rho
    return torch.cat([t, torch.zeros_like(t[:1])])


def _vp_sigma_float(t: float) -> float:
    return (math.e ** (0.5 * VP_BETA_D * t**2 + VP_BETA_MIN * t) - 1) ** 0.5


def default_sigma_range(discretization: str, epsilon_s: float = 1e-3) -> tuple[float, float]:
    """(sigma_min, sigma_max) the official sampler uses for a discretization when none is given:
    VP: sigma_VP(epsilon_s) .. sigma_VP(1) (about 0.0064 .. 152); VE: 0.02 .. 100; iDDPM: 0.002 .. 81;
    EDM: 0.002 .. 80."""
    check_choice("discretization", discretization, DISCRETIZATIONS)
    if discretization == "vp":
        return _vp_sigma_float(epsilon_s), _vp_sigma_float(1.0)
    return {"ve": (0.02, 100.0), "iddpm": (0.002, 81.0), "edm": (0.002, 80.0)}[discretization]


def _vp_betas(sigma_min: float, sigma_max: float, epsilon_s: float) -> tuple[float, float]:
    """(beta_d, beta_min) of the VP SDE whose sigma(epsilon_s) = sigma_min and sigma(1) = sigma_max."""
    beta_d = 2 * (math.log(sigma_min**2 + 1) / epsilon_s - math.log(sigma_max**2 + 1)) / (epsilon_s - 1)
    return beta_d, math.log(sigma_max**2 + 1) - 0.5 * beta_d


@dataclass(frozen=True)
class NoiseSchedule:
    """sigma(t), its derivative, and its inverse (EDM Eq. 4)."""

    name: str
    sigma: Callable[[torch.Tensor], torch.Tensor]
    sigma_deriv: Callable[[torch.Tensor], torch.Tensor]
    sigma_inv: Callable[[torch.Tensor], torch.Tensor]


def noise_schedule(name: str, sigma_min: float = 0.002, sigma_max: float = 80.0,
                   epsilon_s: float = 1e-3) -> NoiseSchedule:
    """The noise schedule `name` ('vp', 've', 'linear'); the VP one is fitted to [sigma_min, sigma_max]."""
    check_choice("schedule", name, SCHEDULES)
    if name == "vp":
        beta_d, beta_min = _vp_betas(sigma_min, sigma_max, epsilon_s)

        def sigma(t):
            return (math.e ** (0.5 * beta_d * (t**2) + beta_min * t) - 1) ** 0.5

        return NoiseSchedule(
            name, sigma,
            lambda t: 0.5 * (beta_min + beta_d * t) * (sigma(t) + 1 / sigma(t)),
            lambda s: ((beta_min**2 + 2 * beta_d * (s**2 + 1).log()).sqrt() - beta_min) / beta_d)
    if name == "ve":
        return NoiseSchedule(name, lambda t: t.sqrt(), lambda t: 0.5 / t.sqrt(), lambda s: s**2)
    return NoiseSchedule(name, lambda t: t, lambda t: 1, lambda s: s)


@dataclass(frozen=True)
class SignalScaling:
    """s(t) and its derivative (EDM Eq. 4)."""

    name: str
    s: Callable[[torch.Tensor], torch.Tensor | float]
    s_deriv: Callable[[torch.Tensor], torch.Tensor | float]


def signal_scaling(name: str, schedule: NoiseSchedule) -> SignalScaling:
    """The signal scaling `name` ('vp': s = 1/sqrt(1 + sigma(t)^2), 'none': s = 1) over `schedule`."""
    check_choice("scaling", name, SCALINGS)
    if name == "vp":
        def s(t):
            return 1 / (1 + schedule.sigma(t) ** 2).sqrt()

        return SignalScaling(name, s, lambda t: -schedule.sigma(t) * schedule.sigma_deriv(t) * (s(t) ** 3))
    return SignalScaling(name, lambda t: 1, lambda t: 0)


def sigma_steps(discretization: str, num_steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0,
                epsilon_s: float = 1e-3, C_1: float = 0.001, C_2: float = 0.008, M: int = 1000,
                dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu") -> torch.Tensor:
    """The N noise levels sigma_0 > ... > sigma_{N-1} of a discretization (without the final 0).

    'iddpm' takes N levels spread evenly over the entries of the iDDPM table (M, C_1, C_2) that lie in
    [sigma_min, sigma_max]; ValueError when none does."""
    check_choice("discretization", discretization, DISCRETIZATIONS)
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    i = torch.arange(num_steps, dtype=dtype, device=device)
    frac = i / max(num_steps - 1, 1)
    if discretization == "edm":
        return edm_sigma_steps(num_steps, sigma_min, sigma_max, rho, dtype, device)[:-1]
    if discretization == "vp":
        vp = noise_schedule("vp", sigma_min, sigma_max, epsilon_s)
        return vp.sigma(1 + frac * (epsilon_s - 1))
    if discretization == "ve":
        return (sigma_max**2 * ((sigma_min**2 / sigma_max**2) ** frac)).sqrt()
    u = iddpm_u_table(M, C_1, C_2, dtype=dtype, device=device)
    u = u[(u >= sigma_min) & (u <= sigma_max)]
    if len(u) == 0:
        raise ValueError(f"the iDDPM discretization needs noise levels of the iDDPM table (M={M}, C_1={C_1}, "
                         f"C_2={C_2}) within [{sigma_min}, {sigma_max}] and there are none; widen --sigma-min/"
                         "--sigma-max or choose another discretization")
    return u[((len(u) - 1) / max(num_steps - 1, 1) * i).round().to(torch.int64)]
