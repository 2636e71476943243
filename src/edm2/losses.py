"""Training losses, one shared body: EDM2's uncertainty-weighted loss (EDM2 Eq. 21) and the three losses of the EDM
paper (Table 1: `VPLoss`, `VELoss`, `EDMLoss`, with the official parameters).

Each is E[lambda(sigma) ||D(y + n; sigma) - y||^2] with its own noise-level distribution and weight lambda, where y
is the (optionally augmented) image and the augment labels condition the network; EDM2's divides by the learned
uncertainty e^u(sigma) and adds u(sigma). Calling a loss returns the per-element loss (its sum divided by the batch
size is the objective). Every loss draws its noise levels through `sample_sigma(n, device, generator)` and accepts
`sigma`, `noise` and already augmented images from outside, so that a training loop can draw them per global batch
and resume exactly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from edm2.schedules import VE_SIGMA_MAX, VE_SIGMA_MIN, VP_BETA_D, VP_BETA_MIN, VP_EPSILON_T, vp_sigma

__all__ = ["sample_sigma", "edm_loss_weight", "EDM2Loss", "VPLoss", "VELoss", "EDMLoss", "EDM_LOSSES"]

AugmentPipeLike = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def sample_sigma(n: int, P_mean: float, P_std: float, device: torch.device | str = "cpu",
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Noise levels with ln(sigma) ~ N(P_mean, P_std^2), shaped [n, 1, 1, 1]."""
    rnd = torch.randn([n, 1, 1, 1], device=device, generator=generator)
    return (rnd * P_std + P_mean).exp()


def edm_loss_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """EDM loss weight lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


class _DenoisingLoss:
    """The shared body: draw (or take) sigma and noise, augment, denoise, weight."""

    draw = "rand"  # the raw draw that `sigma_from_draw` maps: 'rand' (uniform) or 'randn' (standard normal)

    def sigma_from_draw(self, rnd: torch.Tensor) -> torch.Tensor:
        """Noise levels from the loss's raw random draws `rnd` (uniform or normal, see `draw`)."""
        raise NotImplementedError

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """Loss weight lambda(sigma)."""
        raise NotImplementedError

    def sample_sigma(self, n: int, device: torch.device | str = "cpu",
                     generator: torch.Generator | None = None) -> torch.Tensor:
        """n noise levels from the training distribution, shaped [n, 1, 1, 1]."""
        fn = torch.rand if self.draw == "rand" else torch.randn
        return self.sigma_from_draw(fn([n, 1, 1, 1], device=device, generator=generator))

    def __call__(self, net: Callable, images: torch.Tensor, labels: torch.Tensor | None = None,
                 augment_pipe: AugmentPipeLike | None = None, generator: torch.Generator | None = None,
                 sigma: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                 augment_labels: torch.Tensor | None = None) -> torch.Tensor:
        """Per-element loss, shaped like `images`.

        Draws, in the official order and from `generator` (or the global generator): the noise levels, the
        augmentation (when `augment_pipe` is given), the unit noise. `sigma` [N,1,1,1] and `noise` (unit
        variance, shaped like images) replace their draws. `augment_labels` says that `images` are already
        augmented (by a pipe the caller ran) and conditions the network with them.
        """
        if augment_pipe is not None and augment_labels is not None:
            raise ValueError("pass either augment_pipe or already augmented images with their augment_labels")
        images = images.to(torch.float64 if images.dtype == torch.float64 else torch.float32)
        if sigma is None:
            sigma = self.sample_sigma(images.shape[0], images.device, generator)
        sigma = sigma.to(images.dtype).reshape(-1, 1, 1, 1)
        y = images
        if augment_pipe is not None:
            y, augment_labels = augment_pipe(images, generator=generator)
        if noise is None:
            noise = torch.randn(y.shape, device=y.device, dtype=y.dtype, generator=generator)
        extra = {} if augment_labels is None else {"augment_labels": augment_labels}
        return self.per_element(net, y + noise.to(y.dtype) * sigma, y, sigma, labels, extra)

    def per_element(self, net: Callable, x: torch.Tensor, y: torch.Tensor, sigma: torch.Tensor,
                    labels: torch.Tensor | None, extra: dict) -> torch.Tensor:
        """lambda(sigma) (D(x; sigma) - y)^2 for the noisy images x of clean images y."""
        D_x = net(x, sigma, labels, **extra)
        return self.weight(sigma) * ((D_x.to(y.dtype) - y) ** 2)


class VPLoss(_DenoisingLoss):
    """VP loss: sigma = sigma_VP(t), t ~ U(epsilon_t, 1); lambda = 1 / sigma^2."""

    draw = "rand"

    def __init__(self, beta_d: float = VP_BETA_D, beta_min: float = VP_BETA_MIN,
                 epsilon_t: float = VP_EPSILON_T) -> None:
        if not 0 < epsilon_t < 1:
            raise ValueError(f"epsilon_t must lie in (0, 1), got {epsilon_t}")
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.epsilon_t = epsilon_t

    def sigma(self, t: torch.Tensor | float) -> torch.Tensor:
        """The VP noise level at time t."""
        return vp_sigma(t, self.beta_d, self.beta_min)

    def sigma_from_draw(self, rnd: torch.Tensor) -> torch.Tensor:
        return self.sigma(1 + rnd * (self.epsilon_t - 1))

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        return 1 / sigma**2


class VELoss(_DenoisingLoss):
    """VE loss: ln(sigma) ~ U(ln sigma_min, ln sigma_max); lambda = 1 / sigma^2."""

    draw = "rand"

    def __init__(self, sigma_min: float = VE_SIGMA_MIN, sigma_max: float = VE_SIGMA_MAX) -> None:
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min} and {sigma_max}")
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def sigma_from_draw(self, rnd: torch.Tensor) -> torch.Tensor:
        return self.sigma_min * ((self.sigma_max / self.sigma_min) ** rnd)

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        return 1 / sigma**2


class EDMLoss(_DenoisingLoss):
    """EDM loss: ln(sigma) ~ N(P_mean, P_std^2); lambda = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2."""

    draw = "randn"

    def __init__(self, P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float = 0.5) -> None:
        if P_std <= 0 or sigma_data <= 0:
            raise ValueError(f"P_std and sigma_data must be positive, got P_std={P_std}, sigma_data={sigma_data}")
        self.P_mean = P_mean
        self.P_std = P_std
        self.sigma_data = sigma_data

    def sigma_from_draw(self, rnd: torch.Tensor) -> torch.Tensor:
        return (rnd * self.P_std + self.P_mean).exp()

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        return edm_loss_weight(sigma, self.sigma_data)


class EDM2Loss(EDMLoss):
    """Per-element EDM2 loss  lambda(sigma) / e^u(sigma) * (D(y + n; sigma) - y)^2 + u(sigma), with
    ln(sigma) ~ N(P_mean, P_std^2) and the EDM weight lambda.

    Calling it returns a tensor shaped like `images`; the training objective is its sum divided by the
    batch size. The network must accept `(x, sigma, labels, return_logvar=True)`.
    """

    def __init__(self, P_mean: float = -0.4, P_std: float = 1.0, sigma_data: float = 0.5) -> None:
        super().__init__(P_mean, P_std, sigma_data)  # EDM's noise levels and weight, the EDM2 paper's defaults

    def __call__(self, net: Callable, images: torch.Tensor, labels: torch.Tensor | None = None,
                 generator: torch.Generator | None = None, sigma: torch.Tensor | None = None,
                 noise: torch.Tensor | None = None) -> torch.Tensor:
        """Loss per element. `sigma` [N,1,1,1] and unit `noise` (shaped like images) are drawn from
        `generator` unless given (the training loop draws them per global batch)."""
        return super().__call__(net, images, labels, generator=generator, sigma=sigma, noise=noise)

    def per_element(self, net: Callable, x: torch.Tensor, y: torch.Tensor, sigma: torch.Tensor,
                    labels: torch.Tensor | None, extra: dict) -> torch.Tensor:
        denoised, logvar = net(x, sigma, labels, return_logvar=True, **extra)
        return (self.weight(sigma) / logvar.exp()) * (denoised.to(y.dtype) - y) ** 2 + logvar


# Official class name -> loss (what training options and official pickles record).
EDM_LOSSES: dict[str, type[_DenoisingLoss]] = {"VPLoss": VPLoss, "VELoss": VELoss, "EDMLoss": EDMLoss}
