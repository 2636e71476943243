"""EDM samplers (EDM paper, Algorithms 1 and 2) over any denoiser callable `D(x, sigma, labels)`.

The sampler knows nothing of networks or files: pass a `Precond`, an analytic denoiser, or a guided
combination. `edm_sampler` is EDM2's sampler; `ablation_sampler` is the general sampler of the EDM paper (any
time-step discretization, noise schedule, signal scaling, Euler or the generalized 2nd-order step), of which
`edm_sampler` is the special case. `SamplerSettings` carries the sampler's options as one object from the
command line down to the sampler. `StackedRandomGenerator` makes every image depend on its own seed only.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from edm2.guidance import check_guidance, check_interval, guided
from edm2.schedules import (
    DISCRETIZATIONS,
    IDDPM_C_1,
    IDDPM_C_2,
    IDDPM_M,
    SCALINGS,
    SCHEDULES,
    VP_EPSILON_S,
    NoiseSchedule,
    SignalScaling,
    check_choice,
    default_sigma_range,
    edm_sigma_steps,
    noise_schedule,
    sigma_steps,
    signal_scaling,
)

__all__ = ["edm_sigma_steps", "edm_sampler", "edm_solve", "ablation_sampler", "design_steps", "DesignSteps",
           "ablation_solve", "SamplerSettings", "SOLVERS", "StackedRandomGenerator", "Denoiser", "EDM2_STEPS",
           "EDM_RELEASE_STEPS", "is_edm_release", "official_steps"]

Denoiser = Callable[..., torch.Tensor]
SOLVERS = ("heun", "euler")
EDM2_STEPS = 32  # the default of EDM2's generate_images.py
EDM_RELEASE_STEPS = 18  # the default of the EDM (2022) release's generate.py, both of its samplers


def is_edm_release(net: Denoiser) -> bool:
    """Whether `net` is a network of the EDM (2022) release (`VPPrecond`, `VEPrecond`, `iDDPMPrecond`,
    `EDMPrecond`): those have `round_sigma`, EDM2's `Precond` has not."""
    return hasattr(net, "round_sigma")


def official_steps(net: Denoiser) -> int:
    """The number of sampler steps the official code of the network's family samples with by default: 18 for a
    network of the EDM release (its generate.py), 32 for anything else (EDM2's generate_images.py)."""
    return EDM_RELEASE_STEPS if is_edm_release(net) else EDM2_STEPS


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
    guidance_interval: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Solve the probability-flow ODE from `noise * sigma_max` to sigma = 0.

    Heun's 2nd-order method with an Euler last step (2N-1 evaluations), or plain Euler (N evaluations)
    with `solver='euler'`. S_churn > 0 adds the stochastic churn of EDM Algorithm 2 on steps with
    S_min <= sigma <= S_max. With guidance w != 1 every evaluation is gnet + w (net - gnet), or only those with
    sigma_lo < sigma <= sigma_hi given `guidance_interval=(sigma_lo, sigma_hi)` (`edm2.guidance`).
    """
    check_choice("solver", solver, SOLVERS)
    t_steps = edm_sigma_steps(num_steps, sigma_min, sigma_max, rho, dtype=dtype, device=noise.device)
    denoise = guided(net, gnet, guidance, labels, dtype, guidance_interval)
    return edm_solve(denoise, noise.to(dtype), t_steps, S_churn, S_min, S_max, S_noise, randn_like, solver)


def edm_solve(denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], noise: torch.Tensor,
              t_steps: torch.Tensor, S_churn: float = 0.0, S_min: float = 0.0, S_max: float = float("inf"),
              S_noise: float = 1.0, randn_like: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like,
              solver: str = "heun") -> torch.Tensor:
    """EDM Algorithm 2 over the noise levels `t_steps` (sigma_0 > ... > sigma_N = 0, made once by
    `edm_sigma_steps`): Heun with an Euler last step, or Euler; `denoise(x, sigma)` is D(x; sigma)."""
    num_steps = len(t_steps) - 1
    x_next = noise * t_steps[0]
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


def _supported_range(net: Denoiser, discretization: str, sigma_min: float | None, sigma_max: float | None,
                     epsilon_s: float) -> tuple[float, float]:
    """The requested noise range (None: the discretization's default) clipped to the network's."""
    lo, hi = default_sigma_range(discretization, epsilon_s)
    lo, hi = lo if sigma_min is None else sigma_min, hi if sigma_max is None else sigma_max
    net_lo, net_hi = getattr(net, "sigma_min", 0), getattr(net, "sigma_max", math.inf)
    if lo < hi and not max(lo, net_lo) < min(hi, net_hi):
        raise ValueError(f"noise range [{lo:g}, {hi:g}] lies outside the range [{net_lo:g}, {net_hi:g}] the network "
                         "supports; choose --sigma-min/--sigma-max that overlap it")
    return max(lo, net_lo), min(hi, net_hi)


def ablation_sampler(
    net: Denoiser,
    latents: torch.Tensor,
    class_labels: torch.Tensor | None = None,
    randn_like: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like,
    num_steps: int = 18,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    rho: float = 7.0,
    solver: str = "heun",
    discretization: str = "edm",
    schedule: str = "linear",
    scaling: str = "none",
    epsilon_s: float = VP_EPSILON_S,
    C_1: float = IDDPM_C_1,
    C_2: float = IDDPM_C_2,
    M: int = IDDPM_M,
    alpha: float = 1.0,
    S_churn: float = 0.0,
    S_min: float = 0.0,
    S_max: float = float("inf"),
    S_noise: float = 1.0,
    gnet: Denoiser | None = None,
    guidance: float = 1.0,
    dtype: torch.dtype = torch.float64,
    randn_every_step: bool = True,
    guidance_interval: tuple[float, float] | None = None,
) -> torch.Tensor:
    """The general sampler of EDM Algorithm 1 (the official `ablation_sampler`): solve the ODE of EDM Eq. 4
    for the schedule sigma(t) and scaling s(t), over the time steps of `discretization`, from `latents`
    (unit noise) to t = 0. See `edm2.schedules` for the choices.

    `solver='heun'` takes the generalized 2nd-order step with parameter `alpha` (1: Heun's trapezoid, 0.5:
    midpoint) except on the last step; 'euler' is 1st order. The sigma range defaults to the discretization's
    (`default_sigma_range`) and is clipped to a network's `sigma_min`/`sigma_max`; a network's `round_sigma`
    snaps the noise levels to those it supports (iDDPM). S_churn > 0 adds the churn of EDM Algorithm 2.
    With `randn_every_step` (the official EDM samplers) `randn_like` is called on every step when S_churn > 0,
    also where the noise is not used; False calls it only on steps that churn (EDM2's `edm_sampler`). With
    discretization 'edm', schedule 'linear', scaling 'none', alpha 1 it gives the images of `edm_sampler`.
    """
    check_choice("solver", solver, SOLVERS)
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha must lie in (0, 1], got {alpha}")
    denoise = guided(net, gnet, guidance, class_labels, dtype, guidance_interval)
    steps = design_steps(net, num_steps, sigma_min, sigma_max, rho, discretization, schedule, scaling, epsilon_s,
                         C_1, C_2, M, dtype, latents.device)
    return ablation_solve(denoise, latents.to(dtype), steps, solver, alpha, S_churn, S_min, S_max, S_noise,
                          randn_like, randn_every_step)


@dataclass(frozen=True)
class DesignSteps:
    """The time steps t_0 > ... > t_N = 0 of one point of the EDM design space, with the noise schedule sigma(t)
    and signal scaling s(t) they are taken in, and the network's rounding of noise levels."""

    t: torch.Tensor
    schedule: NoiseSchedule
    scaling: SignalScaling
    round_sigma: Callable[[torch.Tensor], torch.Tensor]


def design_steps(net: Denoiser, num_steps: int = 18, sigma_min: float | None = None, sigma_max: float | None = None,
                 rho: float = 7.0, discretization: str = "edm", schedule: str = "linear", scaling: str = "none",
                 epsilon_s: float = VP_EPSILON_S, C_1: float = IDDPM_C_1, C_2: float = IDDPM_C_2, M: int = IDDPM_M,
                 dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu") -> DesignSteps:
    """The time steps `ablation_sampler` takes for a network (its noise range and `round_sigma` respected), made
    once for any number of batches."""
    round_sigma = getattr(net, "round_sigma", lambda sigma: sigma)
    sigma_min, sigma_max = _supported_range(net, discretization, sigma_min, sigma_max, epsilon_s)
    sched = noise_schedule(schedule, sigma_min, sigma_max, epsilon_s)
    steps = sigma_steps(discretization, num_steps, sigma_min, sigma_max, rho, epsilon_s, C_1, C_2, M, dtype, device)
    t_steps = sched.sigma_inv(round_sigma(steps).to(dtype))
    t_steps = torch.cat([t_steps, torch.zeros_like(t_steps[:1])])  # t_N = 0
    return DesignSteps(t_steps, sched, signal_scaling(scaling, sched), round_sigma)


def ablation_solve(denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], latents: torch.Tensor,
                   steps: DesignSteps, solver: str = "heun", alpha: float = 1.0, S_churn: float = 0.0,
                   S_min: float = 0.0, S_max: float = float("inf"), S_noise: float = 1.0,
                   randn_like: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like,
                   randn_every_step: bool = True) -> torch.Tensor:
    """EDM Algorithm 1 (with Algorithm 2's churn) over `steps`: the ODE of EDM Eq. 4 from unit noise `latents`."""
    sched, scale, round_sigma, t_steps = steps.schedule, steps.scaling, steps.round_sigma, steps.t
    num_steps = len(t_steps) - 1

    def derivative(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # dx/dt of EDM Eq. 4
        D = denoise(x / scale.s(t), sched.sigma(t))
        return sched.sigma_deriv(t) * (x - scale.s(t) * D) / sched.sigma(t) + scale.s_deriv(t) / scale.s(t) * x

    x_next = latents * (sched.sigma(t_steps[0]) * scale.s(t_steps[0]))
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        churn = S_churn > 0 and S_min <= sched.sigma(t_cur) <= S_max
        if churn:  # raise the noise level temporarily (EDM Algorithm 2)
            sigma_cur = sched.sigma(t_cur)
            t_hat = sched.sigma_inv(round_sigma(sigma_cur + min(S_churn / num_steps, np.sqrt(2) - 1) * sigma_cur))
            x_hat = scale.s(t_hat) / scale.s(t_cur) * x_cur + (sched.sigma(t_hat) ** 2 - sigma_cur**2).clip(
                min=0).sqrt() * scale.s(t_hat) * S_noise * randn_like(x_cur)
        else:
            if randn_every_step and S_churn > 0:
                randn_like(x_cur)  # drawn and unused, as the official EDM samplers do
            t_hat, x_hat = t_cur, x_cur
        h = t_next - t_hat
        d_cur = derivative(x_hat, t_hat)
        if solver == "euler" or i == num_steps - 1:
            x_next = x_hat + h * d_cur
        else:
            t_prime = t_next if alpha == 1 else t_hat + alpha * h
            d_prime = derivative(x_hat + alpha * h * d_cur, t_prime)
            x_next = x_hat + h * ((1 - 1 / (2 * alpha)) * d_cur + 1 / (2 * alpha) * d_prime)
    return x_next


@dataclass(frozen=True)
class SamplerSettings:
    """Every option of the samplers but their inputs, as one value (defaults: the EDM2 paper's sampling).

    `num_steps` None takes the official default of the network's family (`official_steps`: 18 for a network of
    the EDM release, 32 otherwise), resolved by `for_network` (`time_steps` resolves it too). `discretization`,
    `schedule`, `scaling`, `alpha` (and the table parameters epsilon_s, C_1, C_2, M) choose a point of the EDM
    design space (`ablation_sampler`); the defaults are `edm_sampler`'s. `sigma_min` and `sigma_max` left at
    None take the discretization's official range (`default_sigma_range`). `guidance_interval` (sigma_lo,
    sigma_hi) limits guidance to the noise levels inside it (`edm2.guidance`).
    """

    num_steps: int | None = EDM2_STEPS  # None: `official_steps(net)`, see `for_network`
    sigma_min: float | None = None  # None: 0.002 for 'edm' (the discretization's default), set at construction
    sigma_max: float | None = None  # None: 80 for 'edm'
    rho: float = 7.0
    guidance: float = 1.0
    S_churn: float = 0.0
    S_min: float = 0.0
    S_max: float = float("inf")
    S_noise: float = 1.0
    solver: str = "heun"
    discretization: str = "edm"
    schedule: str = "linear"
    scaling: str = "none"
    alpha: float = 1.0
    epsilon_s: float = VP_EPSILON_S
    C_1: float = IDDPM_C_1
    C_2: float = IDDPM_C_2
    M: int = IDDPM_M
    guidance_interval: tuple[float, float] | None = None  # guide only where sigma_lo < sigma <= sigma_hi

    def __post_init__(self) -> None:
        check_guidance(self.guidance)
        object.__setattr__(self, "guidance_interval", check_interval(self.guidance_interval))
        for option, value, choices in (("--solver", self.solver, SOLVERS), ("--disc", self.discretization,
                                       DISCRETIZATIONS), ("--schedule", self.schedule, SCHEDULES),
                                       ("--scaling", self.scaling, SCALINGS)):
            check_choice(option, value, choices)
        lo, hi = default_sigma_range(self.discretization, self.epsilon_s)
        object.__setattr__(self, "sigma_min", lo if self.sigma_min is None else self.sigma_min)
        object.__setattr__(self, "sigma_max", hi if self.sigma_max is None else self.sigma_max)
        if self.num_steps is not None and self.num_steps < 1:
            raise ValueError(f"--steps must be at least 1, got {self.num_steps}")
        if not 0 < self.sigma_min < self.sigma_max < math.inf:
            raise ValueError(f"need 0 < --sigma-min < --sigma-max, got {self.sigma_min} and {self.sigma_max}")
        if not self.rho > 0:
            raise ValueError(f"--rho must be positive, got {self.rho}")
        if self.S_churn < 0 or self.S_noise < 0 or self.S_min > self.S_max:
            raise ValueError(f"need --S-churn >= 0, --S-noise >= 0 and --S-min <= --S-max, got {self.S_churn}, "
                             f"{self.S_noise}, {self.S_min}, {self.S_max}")
        if not 0 < self.alpha <= 1:
            raise ValueError(f"--alpha must lie in (0, 1], got {self.alpha}")
        if not (0 < self.epsilon_s < 1 and self.C_1 > 0 and self.M >= 1):
            raise ValueError(f"need 0 < epsilon_s < 1, C_1 > 0 and M >= 1, got {self.epsilon_s}, {self.C_1}, "
                             f"{self.M}")

    def for_network(self, net: Denoiser) -> SamplerSettings:
        """These settings with `num_steps` None replaced by the official default for `net` (`official_steps`); the
        settings themselves when the number of steps is given."""
        if self.num_steps is not None:
            return self
        return dataclasses.replace(self, num_steps=official_steps(net))

    @property
    def evaluations(self) -> int:
        """Network evaluations per image (times two with guidance); ValueError while `num_steps` is None."""
        if self.num_steps is None:
            raise ValueError("num_steps None depends on the network: count the evaluations of for_network(net)")
        return 2 * self.num_steps - 1 if self.solver == "heun" else self.num_steps

    @property
    def is_edm_sampler(self) -> bool:
        """Whether these settings are those of `edm_sampler` (EDM discretization, linear schedule, no
        scaling, Heun with alpha 1 or Euler)."""
        return (self.discretization, self.schedule, self.scaling, self.alpha) == ("edm", "linear", "none", 1)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def dtype_for(self, net: Denoiser) -> torch.dtype:
        """The sampler's dtype for `net`: float64 for a network of the EDM (2022) release (one with `round_sigma`),
        as its official `generate.py`; float32 for anything else (EDM2 networks, analytic denoisers)."""
        return torch.float64 if hasattr(net, "round_sigma") else torch.float32

    def time_steps(self, net: Denoiser, device: torch.device | str = "cpu") -> torch.Tensor | DesignSteps:
        """The steps these settings take with `net`, made once for any number of batches: the noise levels of
        `edm_sampler`, or the `DesignSteps` of `ablation_sampler` (EDM-release networks, other design points).
        `num_steps` None: the official default for `net` (`for_network`)."""
        num_steps = self.for_network(net).num_steps
        if self.is_edm_sampler and not is_edm_release(net):
            return edm_sigma_steps(num_steps, self.sigma_min, self.sigma_max, self.rho, dtype=torch.float32,
                                   device=device)
        return design_steps(net, num_steps, self.sigma_min, self.sigma_max, self.rho, self.discretization,
                            self.schedule, self.scaling, self.epsilon_s, self.C_1, self.C_2, self.M,
                            self.dtype_for(net), device)

    def sample(self, net: Denoiser, noise: torch.Tensor, labels: torch.Tensor | None = None,
               gnet: Denoiser | None = None, randn_like: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like,
               steps: torch.Tensor | DesignSteps | None = None) -> torch.Tensor:
        """Sample with these settings as the official code of the network's family does, over `steps` (made by
        `time_steps` when not given). A network of the EDM (2022) release goes through `ablation_solve` as in
        its official `generate.py`: float64, noise range clipped to the network's, churn noise drawn on every
        step. Anything else through `edm_solve` in float32, or `ablation_solve` in float32 with EDM2's churn
        draws when the settings leave the EDM point of the design space."""
        dtype = self.dtype_for(net)
        denoise = guided(net, gnet, self.guidance, labels, dtype, self.guidance_interval)
        steps = self.time_steps(net, noise.device) if steps is None else steps
        if isinstance(steps, torch.Tensor):
            return edm_solve(denoise, noise.to(dtype), steps, self.S_churn, self.S_min, self.S_max, self.S_noise,
                             randn_like, self.solver)
        return ablation_solve(denoise, noise.to(dtype), steps, self.solver, self.alpha, self.S_churn, self.S_min,
                              self.S_max, self.S_noise, randn_like, randn_every_step=hasattr(net, "round_sigma"))


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
