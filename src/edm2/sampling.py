"""EDM samplers (EDM paper, Algorithms 1 and 2) over any denoiser callable `D(x, sigma, labels)`.

The sampler knows nothing of networks or files: pass a `Precond`, an analytic denoiser, or a guided
combination. `SamplerSettings` carries the sampler's options as one object from the command line down to
`edm_sampler`. `StackedRandomGenerator` makes every image depend on its own seed only.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["edm_sigma_steps", "edm_sampler", "SamplerSettings", "SOLVERS", "StackedRandomGenerator", "Denoiser"]

Denoiser = Callable[..., torch.Tensor]
SOLVERS = ("heun", "euler")


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


def edm_sampler(
    net: Denoiser,
    noise: torch.Tensor,
    labels: torch.Tensor | None = None,
    gnet: Denoiser | None = None,
    num_steps: int = 32,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    guidance: float = 1.0,
    S_churn: float = 0.0,
    S_min: float = 0.0,
    S_max: float = float("inf"),
    S_noise: float = 1.0,
    dtype: torch.dtype = torch.float32,
    randn_like: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like,
    solver: str = "heun",
) -> torch.Tensor:
    """Solve the probability-flow ODE from `noise * sigma_max` to sigma = 0.

    Heun's 2nd-order method with an Euler last step (2N-1 evaluations), or plain Euler (N evaluations)
    with `solver='euler'`. S_churn > 0 adds the stochastic churn of EDM Algorithm 2 on steps with
    S_min <= sigma <= S_max. With guidance w != 1 every evaluation is gnet + w (net - gnet).
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {', '.join(SOLVERS)}, got {solver!r}")
    if guidance != 1 and gnet is None:
        raise ValueError(f"guidance={guidance} needs a guide network (gnet)")

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        Dx = net(x, sigma, labels).to(dtype)
        if guidance == 1:
            return Dx
        return gnet(x, sigma, labels).to(dtype).lerp(Dx, guidance)

    t_steps = edm_sigma_steps(num_steps, sigma_min, sigma_max, rho, dtype=dtype, device=noise.device)
    x_next = noise.to(dtype) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        if S_churn > 0 and S_min <= t_cur <= S_max:
            gamma = min(S_churn / num_steps, np.sqrt(2) - 1)
            t_hat = t_cur + gamma * t_cur
            x_hat = x_cur + (t_hat**2 - t_cur**2).sqrt() * S_noise * randn_like(x_cur)
        else:
            t_hat, x_hat = t_cur, x_cur
        d_cur = (x_hat - denoise(x_hat, t_hat)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if solver == "heun" and i < num_steps - 1:  # trapezoidal correction, except into sigma = 0
            d_prime = (x_next - denoise(x_next, t_next)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


@dataclass(frozen=True)
class SamplerSettings:
    """Every option of `edm_sampler` but its inputs, as one value (defaults: the EDM2 paper's sampling)."""

    num_steps: int = 32
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    guidance: float = 1.0
    S_churn: float = 0.0
    S_min: float = 0.0
    S_max: float = float("inf")
    S_noise: float = 1.0
    solver: str = "heun"

    def __post_init__(self) -> None:
        if self.num_steps < 1:
            raise ValueError(f"--steps must be at least 1, got {self.num_steps}")
        if not 0 < self.sigma_min < self.sigma_max < math.inf:
            raise ValueError(f"need 0 < --sigma-min < --sigma-max, got {self.sigma_min} and {self.sigma_max}")
        if not self.rho > 0:
            raise ValueError(f"--rho must be positive, got {self.rho}")
        if self.solver not in SOLVERS:
            raise ValueError(f"--solver must be one of {', '.join(SOLVERS)}, got {self.solver!r}")
        if self.S_churn < 0 or self.S_noise < 0 or self.S_min > self.S_max:
            raise ValueError(f"need --S-churn >= 0, --S-noise >= 0 and --S-min <= --S-max, got {self.S_churn}, "
                             f"{self.S_noise}, {self.S_min}, {self.S_max}")

    @property
    def evaluations(self) -> int:
        """Network evaluations per image (times two with guidance)."""
        return 2 * self.num_steps - 1 if self.solver == "heun" else self.num_steps

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def sample(self, net: Denoiser, noise: torch.Tensor, labels: torch.Tensor | None = None,
               gnet: Denoiser | None = None,
               randn_like: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like) -> torch.Tensor:
        """`edm_sampler` with these settings."""
        return edm_sampler(net, noise, labels, gnet=gnet, num_steps=self.num_steps, sigma_min=self.sigma_min,
                           sigma_max=self.sigma_max, rho=self.rho, guidance=self.guidance, S_churn=self.S_churn,
                           S_min=self.S_min, S_max=self.S_max, S_noise=self.S_noise, randn_like=randn_like,
                           solver=self.solver)


class StackedRandomGenerator:
    """One torch.Generator per seed; draws are stacked along the batch, so that the noise of an image
    depends only on its seed, never on the batch it is drawn in."""

    def __init__(self, device: torch.device | str, seeds: Sequence[int]) -> None:
        self.device = torch.device(device)
        self.generators = [torch.Generator(self.device).manual_seed(int(s) % (1 << 32)) for s in seeds]

    def randn(self, size: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Normal noise of `size`, whose first dimension must equal the number of seeds."""
        self._check(size)
        return torch.stack([torch.randn(size[1:], generator=g, device=self.device, dtype=dtype)
                            for g in self.generators])

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        """Normal noise shaped like `x` (for the sampler's churn)."""
        return self.randn(x.shape, dtype=x.dtype)

    def randint(self, high: int, size: Sequence[int]) -> torch.Tensor:
        """Integers in [0, high) (for example class labels), one row per seed."""
        self._check(size)
        return torch.stack([torch.randint(high, size[1:], generator=g, device=self.device)
                            for g in self.generators])

    def _check(self, size: Sequence[int]) -> None:
        if size[0] != len(self.generators):
            raise ValueError(f"batch size {size[0]} does not match the {len(self.generators)} seeds")
