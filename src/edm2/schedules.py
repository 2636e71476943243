"""The design space of the EDM paper (Table 1, Section 3), as math the networks, losses and samplers share: the VP
SDE's noise level and its inverse, the iDDPM table of noise levels, their constants; time-step discretizations,
noise schedules sigma(t) and signal scalings s(t), which the general sampler (`edm2.sampling.ablation_sampler`)
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

__all__ = ["DISCRETIZATIONS", "SCHEDULES", "SCALINGS", "VP_BETA_D", "VP_BETA_MIN", "VP_EPSILON_T", "VP_EPSILON_S",
           "VE_SIGMA_MIN", "VE_SIGMA_MAX", "IDDPM_C_1", "IDDPM_C_2", "IDDPM_M", "vp_sigma", "vp_sigma_inv",
           "iddpm_u_table", "edm_sigma_steps", "default_sigma_range", "sigma_steps", "NoiseSchedule",
           "noise_schedule", "SignalScaling", "signal_scaling", "check_choice"]

DISCRETIZATIONS = ("vp", "ve", "iddpm", "edm")
SCHEDULES = ("vp", "ve", "linear")
SCALINGS = ("vp", "none")
VP_BETA_D, VP_BETA_MIN = 19.9, 0.1  # the VP SDE of Song et al. (EDM Table 1)
VP_EPSILON_T = 1e-5  # smallest training time of the VP loss and preconditioning
VP_EPSILON_S = 1e-3  # smallest sampling time of the VP discretization
VE_SIGMA_MIN, VE_SIGMA_MAX = 0.02, 100.0  # the VE range
IDDPM_C_1, IDDPM_C_2, IDDPM_M = 0.001, 0.008, 1000  # the iDDPM cosine table (EDM Table 1, footnote)


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


def vp_sigma(t: torch.Tensor | float, beta_d: float = VP_BETA_D, beta_min: float = VP_BETA_MIN) -> torch.Tensor:
    """Noise level of the VP SDE at time t: sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1) (EDM Table 1). A plain
    number is taken in float64; a tensor keeps its dtype (float32 in the networks, as officially)."""
    t = t if isinstance(t, torch.Tensor) else torch.as_tensor(t, dtype=torch.float64)
    return ((0.5 * beta_d * (t**2) + beta_min * t).exp() - 1).sqrt()


def vp_sigma_inv(sigma: torch.Tensor | float, beta_d: float = VP_BETA_D,
                 beta_min: float = VP_BETA_MIN) -> torch.Tensor:
    """Inverse of `vp_sigma`: the time t at which the VP SDE reaches noise level sigma."""
    sigma = sigma if isinstance(sigma, torch.Tensor) else torch.as_tensor(sigma, dtype=torch.float64)
    return ((beta_min**2 + 2 * beta_d * (1 + sigma**2).log()).sqrt() - beta_min) / beta_d


def iddpm_u_table(M: int = IDDPM_M, C_1: float = IDDPM_C_1, C_2: float = IDDPM_C_2,
                  dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """The M+1 noise levels u_0 > ... > u_M = 0 of the iDDPM cosine schedule (EDM Table 1, footnote):
    u_{j-1} = sqrt((u_j^2 + 1) / max(alpha_bar(j-1) / alpha_bar(j), C_1) - 1).

    alpha_bar(j) = sin^2(pi/2 j / (M (C_2 + 1))) is evaluated in float32 and the recursion in `dtype`, as in the
    official network (float32) and sampler (float64), so that both tables match theirs bit for bit.
    """
    if M < 1 or not C_1 > 0:
        raise ValueError(f"the iDDPM table needs M >= 1 and C_1 > 0, got M={M}, C_1={C_1}")

    def alpha_bar(j: int) -> torch.Tensor:  # a 0-d integer tensor times a float: float32, as officially
        return (0.5 * math.pi * torch.tensor(j, device=device) / M / (C_2 + 1)).sin() ** 2

    u = torch.zeros(M + 1, dtype=dtype, device=device)
    for j in range(M, 0, -1):
        u[j - 1] = ((u[j] ** 2 + 1) / (alpha_bar(j - 1) / alpha_bar(j)).clip(min=C_1) - 1).sqrt()
    return u


def default_sigma_range(discretization: str, epsilon_s: float = VP_EPSILON_S) -> tuple[float, float]:
    """(sigma_min, sigma_max) the official sampler uses for a discretization when none is given:
    VP: sigma_VP(epsilon_s) .. sigma_VP(1) (about 0.0064 .. 152); VE: 0.02 .. 100; iDDPM: 0.002 .. 81;
    EDM: 0.002 .. 80."""
    check_choice("discretization", discretization, DISCRETIZATIONS)
    if discretization == "vp":
        return float(vp_sigma(epsilon_s)), float(vp_sigma(1.0))
    return {"ve": (VE_SIGMA_MIN, VE_SIGMA_MAX), "iddpm": (0.002, 81.0), "edm": (0.002, 80.0)}[discretization]


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
                   epsilon_s: float = VP_EPSILON_S) -> NoiseSchedule:
    """The noise schedule `name` ('vp', 've', 'linear'); the VP one is fitted to [sigma_min, sigma_max]."""
    check_choice("schedule", name, SCHEDULES)
    if name == "vp":
        beta_d, beta_min = _vp_betas(sigma_min, sigma_max, epsilon_s)

        def sigma(t):
            return vp_sigma(t, beta_d, beta_min)

        return NoiseSchedule(
            name, sigma,
            lambda t: 0.5 * (beta_min + beta_d * t) * (sigma(t) + 1 / sigma(t)),
            lambda s: vp_sigma_inv(s, beta_d, beta_min))
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
                epsilon_s: float = VP_EPSILON_S, C_1: float = IDDPM_C_1, C_2: float = IDDPM_C_2, M: int = IDDPM_M,
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
