"""The preconditionings of the EDM paper (Table 1) around a DDPM++/NCSN++ (`SongUNet`) or ADM (`DhariwalUNet`)
network: `VPPrecond`, `VEPrecond`, `iDDPMPrecond` and `EDMPrecond`, with the official constructor options,
`round_sigma`, `sigma_min` and `sigma_max`.

D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma)). Each class has the official
signature: its own keyword arguments, `model_type`, and the model's arguments flat (`**model_kwargs`, e.g.
`EDMPrecond(img_resolution=32, img_channels=3, model_type='SongUNet', embedding_type='positional')`); the
earlier spelling, the model's arguments as one `model_kwargs=` dict, is still accepted. `build_network(class_name,
kwargs)` takes the same flat arguments (what an official pickle or an edm2 snapshot records) and is the one
mapping from a class name to a network.

Like the official code, the preconditioning computes in float32; the model runs in float16 on CUDA when built
with `use_fp16` (or at the precision set by `set_precision`).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from edm2.layers import MPConv, MPFourier
from edm2.networks.dhariwal import DhariwalUNet
from edm2.networks.edm2 import LOW_PRECISION_DTYPES, PRECISIONS
from edm2.networks.songunet import SongUNet
from edm2.schedules import (
    IDDPM_C_1,
    IDDPM_C_2,
    IDDPM_M,
    VE_SIGMA_MAX,
    VE_SIGMA_MIN,
    VP_BETA_D,
    VP_BETA_MIN,
    VP_EPSILON_T,
    iddpm_u_table,
    vp_sigma,
    vp_sigma_inv,
)

__all__ = ["VPPrecond", "VEPrecond", "iDDPMPrecond", "EDMPrecond", "MODEL_TYPES"]

MODEL_TYPES: dict[str, type[torch.nn.Module]] = {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet}


class _Preconditioning(torch.nn.Module):
    """What the four preconditionings share: the model, the input checks, precision, and the forward pass."""

    out_channels_factor = 1  # iDDPM: 2 (learned variance; D uses the first half)

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int, use_fp16: bool, model_type: str,
                 model_kwargs: Mapping, own_kwargs: dict) -> None:
        super().__init__()
        if model_type not in MODEL_TYPES:
            raise ValueError(f"unknown model_type {model_type!r}; choose one of {', '.join(MODEL_TYPES)}")
        model_kwargs = _flat_model_kwargs(model_kwargs)
        _check_model_kwargs(model_type, model_kwargs)
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.precision: str | None = None
        self.model = MODEL_TYPES[model_type](img_resolution=img_resolution, in_channels=img_channels,
                                             out_channels=img_channels * self.out_channels_factor,
                                             label_dim=label_dim, **model_kwargs)
        # The official flat constructor arguments (what snapshots record and `build_network` takes).
        self.init_kwargs = _jsonable(dict(img_resolution=img_resolution, img_channels=img_channels,
                                          label_dim=label_dim, use_fp16=use_fp16, **own_kwargs,
                                          model_type=model_type, **model_kwargs))

    @property
    def augment_dim(self) -> int:
        """Width of the augment-label vector the model is conditioned on (0: none)."""
        return self.model.augment_dim

    def set_precision(self, precision: str | None) -> _Preconditioning:
        """Run the model in 'fp32', 'bf16' or 'fp16' (activations of that dtype; the embedding and attention
        logits stay float32). None restores the official rule: float16 on CUDA when built with `use_fp16`."""
        if precision is not None and precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
        self.precision = precision
        return self

    def round_sigma(self, sigma: torch.Tensor | float) -> torch.Tensor:
        """The noise level the network supports closest to `sigma` (itself, but for iDDPM)."""
        return torch.as_tensor(sigma)

    def coefficients(self, sigma: torch.Tensor) -> tuple:
        """(c_skip, c_out, c_in, c_noise) at noise levels sigma [N,1,1,1] (EDM Table 1)."""
        raise NotImplementedError

    def _model_dtype(self, device: torch.device, force_fp32: bool) -> torch.dtype:
        if force_fp32:
            return torch.float32
        if self.precision is None:
            return torch.float16 if self.use_fp16 and device.type == "cuda" else torch.float32
        return LOW_PRECISION_DTYPES.get(self.precision, torch.float32)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, class_labels: torch.Tensor | None = None,
                force_fp32: bool = False, augment_labels: torch.Tensor | None = None) -> torch.Tensor:
        """Denoise `x` [N, C, H, W] at noise level `sigma` (scalar, [N] or [N,1,1,1]); `class_labels` one-hot
        [N, label_dim] (None: the all-zero label); `augment_labels` [N, augment_dim] (None: no augmentation
        conditioning, as at sampling time)."""
        sigma = torch.as_tensor(sigma, device=x.device)
        self._check_inputs(x, sigma, class_labels, augment_labels)
        x = x.to(torch.float32)
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        if self.label_dim == 0:
            class_labels = None
        elif class_labels is None:
            class_labels = torch.zeros([1, self.label_dim], device=x.device)
        else:
            class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        if augment_labels is not None:
            augment_labels = augment_labels.to(torch.float32)
        dtype = self._model_dtype(x.device, force_fp32)
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        F_x = self.model((c_in * x).to(dtype), c_noise.flatten(), class_labels=class_labels,
                         augment_labels=augment_labels)
        return c_skip * x + c_out * F_x[:, :self.img_channels].to(torch.float32)

    def _check_inputs(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None,
                      augment_labels: torch.Tensor | None) -> None:
        shape = (self.img_channels, self.img_resolution, self.img_resolution)
        if x.ndim != 4 or tuple(x.shape[1:]) != shape:
            raise ValueError(f"x has shape {list(x.shape)}; this network expects [N, {', '.join(map(str, shape))}]")
        if sigma.numel() not in (1, x.shape[0]):
            raise ValueError(f"sigma has {sigma.numel()} elements; pass one per image ({x.shape[0]}) or a scalar")
        if sigma.device.type != "meta" and not bool((sigma > 0).all()):
            raise ValueError("sigma must be positive")
        if class_labels is not None and self.label_dim and (
                class_labels.ndim != 2 or class_labels.shape[1] != self.label_dim
                or class_labels.shape[0] not in (1, x.shape[0])):
            raise ValueError(f"class_labels has shape {list(class_labels.shape)}; expected one-hot "
                             f"[{x.shape[0]}, {self.label_dim}]")
        if augment_labels is None:
            return
        if self.augment_dim == 0:
            raise ValueError("augment_labels given to a network built without augmentation conditioning "
                             "(augment_dim=0); build it with augment_dim=9 or train without the augment pipe")
        if tuple(augment_labels.shape) != (x.shape[0], self.augment_dim):
            raise ValueError(f"augment_labels has shape {list(augment_labels.shape)}; this network expects "
                             f"[{x.shape[0]}, {self.augment_dim}] (one augment-label vector per image)")


class VPPrecond(_Preconditioning):
    """Variance preserving (VP) preconditioning: c_skip = 1, c_out = -sigma, c_in = 1/sqrt(sigma^2+1),
    c_noise = (M-1) sigma^-1_VP(sigma)."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 beta_d: float = VP_BETA_D, beta_min: float = VP_BETA_MIN, M: int = 1000,
                 epsilon_t: float = VP_EPSILON_T,
                 model_type: str = "SongUNet", **model_kwargs: Any) -> None:
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, model_kwargs,
                         dict(beta_d=beta_d, beta_min=beta_min, M=M, epsilon_t=epsilon_t))
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.M = M
        self.epsilon_t = epsilon_t
        cpu = dict(device="cpu")  # plain numbers also when the network is built on the meta device
        self.sigma_min = float(self.sigma(torch.tensor(float(epsilon_t), **cpu)))
        self.sigma_max = float(self.sigma(torch.tensor(1.0, **cpu)))

    def sigma(self, t: torch.Tensor | float) -> torch.Tensor:
        return vp_sigma(t, self.beta_d, self.beta_min)

    def sigma_inv(self, sigma: torch.Tensor | float) -> torch.Tensor:
        return vp_sigma_inv(sigma, self.beta_d, self.beta_min)

    def coefficients(self, sigma: torch.Tensor) -> tuple:
        return 1, -sigma, 1 / (sigma**2 + 1).sqrt(), (self.M - 1) * self.sigma_inv(sigma)


class VEPrecond(_Preconditioning):
    """Variance exploding (VE) preconditioning: c_skip = 1, c_out = sigma, c_in = 1, c_noise = ln(sigma/2)."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 sigma_min: float = VE_SIGMA_MIN, sigma_max: float = VE_SIGMA_MAX, model_type: str = "SongUNet",
                 **model_kwargs: Any) -> None:
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, model_kwargs,
                         dict(sigma_min=sigma_min, sigma_max=sigma_max))
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def coefficients(self, sigma: torch.Tensor) -> tuple:
        return 1, sigma, 1, (0.5 * sigma).log()


class iDDPMPrecond(_Preconditioning):  # noqa: N801  (the official name)
    """Improved DDPM preconditioning: c_skip = 1, c_out = -sigma, c_in = 1/sqrt(sigma^2+1),
    c_noise = M-1-j(sigma) with j the index of the nearest level of the table `u`. The model has twice the
    image channels (learned variance); D uses the first half."""

    out_channels_factor = 2

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 C_1: float = IDDPM_C_1, C_2: float = IDDPM_C_2, M: int = IDDPM_M, model_type: str = "DhariwalUNet",
                 **model_kwargs: Any) -> None:
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, model_kwargs,
                         dict(C_1=C_1, C_2=C_2, M=M))
        self.C_1 = C_1
        self.C_2 = C_2
        self.M = M
        self.register_buffer("u", iddpm_u_table(M, C_1, C_2, torch.float32))
        self.sigma_min = float(self.u[M - 1])
        self.sigma_max = float(self.u[0])

    def alpha_bar(self, j: torch.Tensor | int) -> torch.Tensor:
        return (0.5 * np.pi * torch.as_tensor(j) / self.M / (self.C_2 + 1)).sin() ** 2

    def round_sigma(self, sigma: torch.Tensor | float, return_index: bool = False) -> torch.Tensor:
        """The nearest level of the table `u` (or its index), shaped and placed like `sigma`."""
        sigma = torch.as_tensor(sigma)
        # torch.cdist, as the official code: its rounding decides near-ties the same way.
        index = torch.cdist(sigma.to(self.u.device).to(torch.float32).reshape(1, -1, 1),
                            self.u.reshape(1, -1, 1)).argmin(2)
        result = index if return_index else self.u[index.flatten()].to(sigma.dtype)
        return result.reshape(sigma.shape).to(sigma.device)

    def coefficients(self, sigma: torch.Tensor) -> tuple:
        c_noise = self.M - 1 - self.round_sigma(sigma, return_index=True).to(torch.float32)
        return 1, -sigma, 1 / (sigma**2 + 1).sqrt(), c_noise


class EDMPrecond(_Preconditioning):
    """The EDM preconditioning: c_skip = s_d^2/(sigma^2+s_d^2), c_out = sigma s_d/sqrt(sigma^2+s_d^2),
    c_in = 1/sqrt(sigma^2+s_d^2), c_noise = ln(sigma)/4 with s_d = sigma_data."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 sigma_min: float = 0, sigma_max: float = float("inf"), sigma_data: float = 0.5,
                 model_type: str = "DhariwalUNet", logvar_channels: int | None = None, **model_kwargs: Any) -> None:
        """`logvar_channels` (not an official argument): add EDM2's uncertainty head u(sigma), so that the network
        trains with EDM2's loss (configuration B of EDM2's ablation ladder); None: no head, the official network."""
        own = dict(sigma_min=sigma_min, sigma_max=sigma_max, sigma_data=sigma_data)
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, model_kwargs,
                         own if logvar_channels is None else {**own, "logvar_channels": logvar_channels})
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigma_data = sigma_data
        self.logvar_fourier = MPFourier(logvar_channels) if logvar_channels else None
        self.logvar_linear = MPConv(logvar_channels, 1, kernel=[]) if logvar_channels else None

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, class_labels: torch.Tensor | None = None,
                force_fp32: bool = False, augment_labels: torch.Tensor | None = None,
                return_logvar: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """As `_Preconditioning.forward`; with `return_logvar` also the uncertainty u(sigma) [N or 1, 1, 1, 1] of a
        network built with `logvar_channels`."""
        D_x = super().forward(x, sigma, class_labels, force_fp32, augment_labels)
        if not return_logvar:
            return D_x
        if self.logvar_linear is None:
            raise ValueError("this EDMPrecond has no uncertainty head; build it with logvar_channels=128 to train "
                             "it with EDM2's loss")
        c_noise = torch.as_tensor(sigma, device=x.device).to(torch.float32).flatten().log() / 4
        return D_x, self.logvar_linear(self.logvar_fourier(c_noise)).reshape(-1, 1, 1, 1)

    def coefficients(self, sigma: torch.Tensor) -> tuple:
        sd = self.sigma_data
        return (sd**2 / (sigma**2 + sd**2), sigma * sd / (sigma**2 + sd**2).sqrt(), 1 / (sd**2 + sigma**2).sqrt(),
                sigma.log() / 4)


def _flat_model_kwargs(model_kwargs: Mapping) -> dict:
    """The model's arguments, flat: those given flat (the official signature) merged with a `model_kwargs=` dict
    (the earlier spelling); TypeError when both give the same argument."""
    flat = dict(model_kwargs)
    nested = dict(flat.pop("model_kwargs", None) or {})
    twice = sorted(set(flat) & set(nested))
    if twice:
        raise TypeError(f"model argument(s) {twice} given both flat and in model_kwargs; give each once")
    return {**nested, **flat}


def _check_model_kwargs(model_type: str, model_kwargs: Mapping) -> None:
    params = inspect.signature(MODEL_TYPES[model_type].__init__).parameters
    fixed = {"self", "img_resolution", "in_channels", "out_channels", "label_dim"}
    unknown = sorted(set(model_kwargs) - (set(params) - fixed))
    if unknown:
        raise ValueError(f"unknown argument(s) {unknown} for {model_type}; it takes "
                         f"{', '.join(sorted(set(params) - fixed))}")


def _jsonable(d: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
