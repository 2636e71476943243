"""Sampling the toy with and without guidance, and judging the samples by their exact log-likelihood.

Guidance evaluates two denoisers and extrapolates from the guide D_g past the main model D:
D_w = D_g + w (D - D_g) (`edm2.guidance.guided`, the library's one composition). Classifier-free guidance takes
as guide an unconditional model; autoguidance a weaker version of the conditional model itself (smaller and
trained for less). w = 1 is no guidance. With a guidance interval (sigma_lo, sigma_hi] only those noise levels
are guided; elsewhere D alone is used. Samples come from `edm2.sampling.edm_solve` (EDM's Heun sampler) over the
EDM noise levels of `edm_sigma_steps`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from edm2.guidance import check_interval, guided
from edm2.sampling import edm_solve
from edm2.schedules import edm_sigma_steps
from edm2.toy.mixture import GaussianMixture
from edm2.toy.model import one_thread

__all__ = ["Denoise", "ToySampler", "toy_denoiser", "sample_toy", "mean_log_likelihood"]

Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def toy_denoiser(net: Callable[..., torch.Tensor], gnet: Callable[..., torch.Tensor] | None = None,
                 guidance: float = 1.0, label: int | None = None, interval: tuple[float, float] | None = None,
                 dtype: torch.dtype = torch.float32) -> Denoise:
    """D(x; sigma) of class `label` for the sampler: `net(x, sigma, labels)` alone, or guided by `gnet`
    (D_g + w (D - D_g)) where sigma_lo < sigma <= sigma_hi (every level for `interval` None). Any `net(x, sigma,
    labels)` serves: a `ToyDenoiser` (an unconditional one ignores the label) or `GaussianMixture.ideal_denoiser`.
    ValueError for a negative or non-finite weight or an empty interval."""
    if not 0 <= guidance < float("inf"):
        raise ValueError(f"--guidance must be a non-negative number, got {guidance}")
    labels = None if label is None else torch.tensor([int(label)])
    denoise = guided(net, gnet, guidance, labels, dtype, check_interval(interval))

    def no_grad(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The guided D(x; sigma), without autograd."""
        with torch.no_grad():
            return denoise(x, sigma)

    return no_grad


@dataclass(frozen=True)
class ToySampler:
    """EDM's deterministic Heun sampler for the toy: `num_steps` noise levels from `sigma_max` down to
    `sigma_min` (EDM Eq. 5 with `rho`), then 0; EDM2's defaults. The start is N(0, sigma_max^2 I), not
    p(x; sigma_max): a class whose mean lies off the origin comes out with its mean pulled toward the origin by
    roughly sigma_data / sigma_max of the way (7 % measured with sigma_max = 5, within noise at 80)."""

    num_steps: int = 32
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0

    def __post_init__(self) -> None:
        if self.num_steps < 1 or not 0 < self.sigma_min < self.sigma_max or not self.rho > 0:
            raise ValueError(f"the toy sampler needs steps >= 1, 0 < sigma_min < sigma_max and rho > 0, got "
                             f"{self.num_steps}, {self.sigma_min}, {self.sigma_max}, {self.rho}")

    def steps(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """sigma_0 > ... > sigma_{N-1} > sigma_N = 0."""
        return edm_sigma_steps(self.num_steps, self.sigma_min, self.sigma_max, self.rho, dtype=dtype)


def sample_toy(denoise: Denoise, n: int, generator: torch.Generator | None = None,
               sampler: ToySampler | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """n samples [n, 2] of `denoise` (a D(x; sigma), guided or not) from unit noise drawn (in float64) from
    `generator`, solved by `edm_solve` in `dtype` on one CPU thread (`one_thread`)."""
    if n < 1:
        raise ValueError(f"the number of samples must be positive, got {n}")
    sampler = sampler or ToySampler()
    noise = torch.randn(n, 2, generator=generator, dtype=torch.float64).to(dtype)
    with one_thread():
        return edm_solve(denoise, noise, sampler.steps(dtype))


def mean_log_likelihood(mixture: GaussianMixture, x: torch.Tensor, label: int | None = None) -> float:
    """The mean exact log-density of the samples x under the true mixture of class `label` (all for None)."""
    return float(mixture.log_prob(x.to(torch.float64), 0.0, label).mean())
