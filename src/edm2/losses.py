"""Training losses: the EDM2 uncertainty-weighted loss (EDM2 Eq. 21) and EDM noise-level sampling."""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["sample_sigma", "edm_loss_weight", "EDM2Loss"]


def sample_sigma(n: int, P_mean: float, P_std: float, device: torch.device | str = "cpu",
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Noise levels with ln(sigma) ~ N(P_mean, P_std^2), shaped [n, 1, 1, 1]."""
    rnd = torch.randn([n, 1, 1, 1], device=device, generator=generator)
    return (rnd * P_std + P_mean).exp()


def edm_loss_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """EDM loss weight lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


class EDM2Loss:
    """Per-element EDM2 loss  lambda(sigma) / e^u(sigma) * (D(y + n; sigma) - y)^2 + u(sigma).

    Calling it returns a tensor shaped like `images`; the training objective is its sum divided by the
    batch size. The network must accept `(x, sigma, labels, return_logvar=True)`.
    """

    def __init__(self, P_mean: float = -0.4, P_std: float = 1.0, sigma_data: float = 0.5) -> None:
        if P_std <= 0 or sigma_data <= 0:
            raise ValueError(f"P_std and sigma_data must be positive, got P_std={P_std}, sigma_data={sigma_data}")
        self.P_mean = P_mean
        self.P_std = P_std
        self.sigma_data = sigma_data

    def sample_sigma(self, n: int, device: torch.device | str = "cpu",
                     generator: torch.Generator | None = None) -> torch.Tensor:
        """n noise levels from the training distribution, shaped [n, 1, 1, 1] (every loss has this method,
        so that a training loop draws them per global batch whatever the loss)."""
        return sample_sigma(n, self.P_mean, self.P_std, device, generator)

    def __call__(self, net: Callable, images: torch.Tensor, labels: torch.Tensor | None = None,
                 generator: torch.Generator | None = None, sigma: torch.Tensor | None = None,
                 noise: torch.Tensor | None = None) -> torch.Tensor:
        """Loss per element. `sigma` [N,1,1,1] and unit `noise` (shaped like images) are drawn from
        `generator` unless given (the training loop draws them per global batch)."""
        images = images.to(torch.float64 if images.dtype == torch.float64 else torch.float32)
        if sigma is None:
            sigma = self.sample_sigma(images.shape[0], images.device, generator)
        if noise is None:
            noise = torch.randn(images.shape, device=images.device, dtype=images.dtype, generator=generator)
        sigma = sigma.to(images.dtype).reshape(-1, 1, 1, 1)
        denoised, logvar = net(images + noise.to(images.dtype) * sigma, sigma, labels, return_logvar=True)
        weight = edm_loss_weight(sigma, self.sigma_data)
        return (weight / logvar.exp()) * (denoised.to(images.dtype) - images) ** 2 + logvar
