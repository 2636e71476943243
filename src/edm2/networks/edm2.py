"""The EDM2 network (config G): magnitude-preserving U-Net blocks, the U-Net, and EDM preconditioning.

Module and parameter names follow the official implementation, so an official state dict loads with
`strict=True`. Section numbers refer to the EDM2 paper (Karras et al., CVPR 2024).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from edm2.layers import (
    FAST_PATHS,
    MPConv,
    MPFourier,
    compute_dtype,
    mp_cat,
    mp_silu,
    mp_sum,
    no_autocast,
    normalize,
    resample,
)
from edm2.networks.ladder import group_rms_norm, switches_of

__all__ = ["Block", "UNet", "Precond", "PRECISIONS", "LOW_PRECISION_DTYPES"]


# Precisions of the U-Net's activations (Precond.set_precision); preconditioning, the uncertainty head,
# Fourier features, weight and activation norms stay float32 in every one of them.
PRECISIONS = ("fp32", "bf16", "fp16")
LOW_PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Block(torch.nn.Module):
    """U-Net block (EDM2 Figure 21): resample, residual branch with embedding gain, optional attention."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        flavor: str = "enc",
        resample_mode: str = "keep",
        resample_filter: Sequence[float] = (1, 1),
        attention: bool = False,
        channels_per_head: int = 64,
        dropout: float = 0.0,
        res_balance: float = 0.3,
        attn_balance: float = 0.3,
        clip_act: float | None = 256,
        config: str = "G",
    ) -> None:
        super().__init__()
        if flavor not in ("enc", "dec"):
            raise ValueError(f"Block flavor must be 'enc' or 'dec', got {flavor!r}")
        self.out_channels = out_channels
        self.flavor = flavor
        self.resample_filter = list(resample_filter)
        self.resample_mode = resample_mode
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout = dropout
        self.res_balance = res_balance
        self.attn_balance = attn_balance
        self.clip_act = clip_act
        self.switches = s = switches_of(config)
        conv = s.conv
        self.emb_gain = torch.nn.Parameter(torch.zeros([])) if s.mp_fixed else None
        res0_in = out_channels if flavor == "enc" and s.streamlined else in_channels  # F+: channels change first
        self.conv_res0 = conv(res0_in, out_channels, [3, 3])
        self.emb_linear = conv(emb_channels, out_channels, [])
        self.conv_res1 = conv(out_channels, out_channels, [3, 3])
        self.conv_skip = conv(in_channels, out_channels, [1, 1]) if in_channels != out_channels else None
        self.attn_qkv = conv(out_channels, out_channels * 3, [1, 1]) if self.num_heads else None
        self.attn_proj = conv(out_channels, out_channels, [1, 1]) if self.num_heads else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if not self.switches.streamlined:
            return self._forward_adm(x, emb)
        silu, add = (mp_silu, mp_sum) if self.switches.mp_fixed else (torch.nn.functional.silu, _plain_sum)
        # Main branch: resampling on the main path, then pixel norm in the encoder (config F).
        x = resample(x, f=self.resample_filter, mode=self.resample_mode)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)

        # Residual branch, modulated by the embedding: c = gain * linear(emb) + 1.
        y = self.conv_res0(silu(x))
        c = self.emb_linear(emb, gain=1.0 if self.emb_gain is None else self.emb_gain) + 1
        y = silu(y * c[:, :, None, None].to(y.dtype))
        if self.training and self.dropout != 0:
            y = torch.nn.functional.dropout(y, p=self.dropout)
        y = self.conv_res1(y)

        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = add(x, y, t=self.res_balance)

        if self.num_heads:
            x = add(x, self.attention(x), t=self.attn_balance)
        return self._clip(x)

    def _forward_adm(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """Configurations C-E: ADM's block order, group norms in the residual branch and before attention, the
        resampling inside the residual branch and on the skip path, plain sums."""
        silu = torch.nn.functional.silu
        y = resample(silu(group_rms_norm(x)), f=self.resample_filter, mode=self.resample_mode)
        y = self.conv_res0(y)
        c = self.emb_linear(emb) + 1
        y = silu(group_rms_norm(y) * c[:, :, None, None].to(y.dtype))
        if self.training and self.dropout != 0:
            y = torch.nn.functional.dropout(y, p=self.dropout)
        y = self.conv_res1(y)
        x = resample(x, f=self.resample_filter, mode=self.resample_mode)
        x = (x if self.conv_skip is None else self.conv_skip(x)) + y
        if self.num_heads:
            x = x + self.attention(group_rms_norm(x))
        return self._clip(x)

    def _clip(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.clip_act is None else x.clip_(-self.clip_act, self.clip_act)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """Cosine self-attention: q, k, v pixel-normalized per head; qkv laid out [head][channel][q,k,v]."""
        y = self.attn_qkv(x)
        y = y.reshape(y.shape[0], self.num_heads, -1, 3, y.shape[2] * y.shape[3])
        q, k, v = normalize(y, dim=2).unbind(3)
        if FAST_PATHS.sdpa:  # the same math by the fused kernel, on [n, head, pixel, channel] views
            y = torch.nn.functional.scaled_dot_product_attention(q.mT, k.mT, v.mT).mT
        else:
            w = torch.einsum("nhcq,nhck->nhqk", q, k / np.sqrt(q.shape[2])).softmax(dim=3)
            y = torch.einsum("nhqk,nhck->nhcq", w, v)
        return self.attn_proj(y.reshape(*x.shape))


def _plain_sum(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """The sum of the branches before configuration G (the balance `t` unused)."""
    return a + b


class UNet(torch.nn.Module):
    """The magnitude-preserving U-Net F of EDM2 (config G), EDM2 Figure 21."""

    def __init__(
        self,
        img_resolution: int,
        img_channels: int,
        label_dim: int,
        model_channels: int = 192,
        channel_mult: Sequence[int] = (1, 2, 3, 4),
        channel_mult_noise: int | None = None,
        channel_mult_emb: int | None = None,
        num_blocks: int = 3,
        attn_resolutions: Sequence[int] = (16, 8),
        label_balance: float = 0.5,
        concat_balance: float = 0.5,
        resample_filter: Sequence[float] = (1, 1),
        channels_per_head: int = 64,
        dropout: float = 0.0,
        res_balance: float = 0.3,
        attn_balance: float = 0.3,
        clip_act: float | None = 256,
        config: str = "G",
    ) -> None:
        # One function on purpose (longer than our usual 60 lines): it reads top to bottom like the U-Net of
        # EDM2 Figure 21, level by level, and builds the module names of the official checkpoints.
        super().__init__()
        cblock = [model_channels * m for m in channel_mult]
        cnoise = model_channels * channel_mult_noise if channel_mult_noise is not None else cblock[0]
        cemb = model_channels * channel_mult_emb if channel_mult_emb is not None else max(cblock)
        self.label_balance = label_balance
        self.concat_balance = concat_balance
        self.config = config
        self.switches = s = switches_of(config)  # the ablation ladder: networks/ladder.py
        conv = s.conv
        self.out_gain = torch.nn.Parameter(torch.zeros([])) if s.mp_fixed else None

        def block(cin: int, cout: int, **kwargs) -> Block:
            return Block(cin, cout, cemb, resample_filter=resample_filter, channels_per_head=channels_per_head,
                         dropout=dropout, res_balance=res_balance, attn_balance=attn_balance,
                         clip_act=clip_act, config=config, **kwargs)

        # Embedding: Fourier features of c_noise (C-E: then a second layer), plus the class label.
        self.emb_fourier = MPFourier(cnoise, amplitude=float(np.sqrt(2)) if s.mp_fixed else 1.0)
        self.emb_noise = conv(cnoise, cemb, [])
        self.emb_hidden = None if s.streamlined else conv(cemb, cemb, [])
        self.emb_label = conv(label_dim, cemb, []) if label_dim != 0 else None

        # Encoder; the input gets an extra constant-one channel.
        self.enc = torch.nn.ModuleDict()
        cout = img_channels + 1
        for level, channels in enumerate(cblock):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, channels
                self.enc[f"{res}x{res}_conv"] = conv(cin, cout, [3, 3])
            else:
                self.enc[f"{res}x{res}_down"] = block(cout, cout, flavor="enc", resample_mode="down")
            for idx in range(num_blocks):
                cin, cout = cout, channels
                self.enc[f"{res}x{res}_block{idx}"] = block(cin, cout, flavor="enc",
                                                            attention=res in attn_resolutions)

        # Decoder; each block takes a skip connection from the encoder.
        self.dec = torch.nn.ModuleDict()
        skips = [m.out_channels for m in self.enc.values()]
        for level, channels in reversed(list(enumerate(cblock))):
            res = img_resolution >> level
            if level == len(cblock) - 1:
                self.dec[f"{res}x{res}_in0"] = block(cout, cout, flavor="dec", attention=True)
                self.dec[f"{res}x{res}_in1"] = block(cout, cout, flavor="dec")
            else:
                self.dec[f"{res}x{res}_up"] = block(cout, cout, flavor="dec", resample_mode="up")
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), channels
                self.dec[f"{res}x{res}_block{idx}"] = block(cin, cout, flavor="dec",
                                                            attention=res in attn_resolutions)
        self.out_conv = conv(cout, img_channels, [3, 3])

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        mp = self.switches.mp_fixed
        silu = mp_silu if mp else torch.nn.functional.silu
        emb = self.emb_noise(self.emb_fourier(noise_labels))
        if self.emb_hidden is not None:
            emb = self.emb_hidden(silu(emb))
        if self.emb_label is not None:
            label = self.emb_label(class_labels * np.sqrt(class_labels.shape[1]))
            emb = mp_sum(emb, label, t=self.label_balance) if mp else emb + label
        emb = silu(emb)

        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for name, module in self.enc.items():
            x = module(x) if "conv" in name else module(x, emb)
            skips.append(x)

        for name, module in self.dec.items():
            if "block" in name:
                x = mp_cat(x, skips.pop(), t=self.concat_balance) if mp else torch.cat([x, skips.pop()], dim=1)
            x = module(x, emb)
        if mp:
            return self.out_conv(x, gain=self.out_gain)
        return self.out_conv(x if self.switches.streamlined else silu(group_rms_norm(x)))


class Precond(torch.nn.Module):
    """EDM preconditioning around the U-Net, D(x; sigma) = c_skip x + c_out F(c_in x; c_noise), plus
    the uncertainty head u(sigma) of the EDM2 loss (Section 2 / Eq. 21)."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int, use_fp16: bool = True,
                 sigma_data: float = 0.5, logvar_channels: int = 128, **unet_kwargs) -> None:
        """`unet_kwargs`: the options of `UNet` (model_channels, channel_mult, ..., official names)."""
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.sigma_data = sigma_data
        self.unet = UNet(img_resolution, img_channels, label_dim, **unet_kwargs)
        self.logvar_fourier = MPFourier(logvar_channels)
        self.logvar_linear = MPConv(logvar_channels, 1, kernel=[])
        self.precision: str | None = None

    def set_precision(self, precision: str | None) -> Precond:
        """Run the U-Net in 'fp32', 'bf16' or 'fp16' (under torch.autocast, on activations of that dtype).
        None restores the default: float16 on CUDA when `use_fp16` (as the official code), else float32.
        Whether the device supports the dtype is checked by `edm2.runtime.resolve_precision`."""
        if precision is not None and precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
        self.precision = precision
        return self

    def _unet_dtype(self, device: torch.device, dtype: torch.dtype, force_fp32: bool) -> torch.dtype | None:
        """The low-precision dtype of the U-Net for this call, or None for `dtype` itself."""
        if force_fp32 or dtype != torch.float32:
            return None
        if self.precision is None:
            return torch.float16 if self.use_fp16 and device.type == "cuda" else None
        return LOW_PRECISION_DTYPES.get(self.precision)

    def forward(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor | float,
        class_labels: torch.Tensor | None = None,
        force_fp32: bool = False,
        return_logvar: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Denoise `x` [N, C, H, W] at noise level `sigma` (scalar, [N] or [N,1,1,1]).

        `class_labels` is one-hot [N, label_dim] (None gives the all-zero label). With `return_logvar`,
        also returns the uncertainty u(sigma) as [N or 1, 1, 1, 1].
        """
        dtype = compute_dtype(x.dtype)
        sigma = torch.as_tensor(sigma, device=x.device)
        self._check_inputs(x, sigma, class_labels)
        x = x.to(dtype)
        sigma = sigma.to(dtype).reshape(-1, 1, 1, 1)
        if self.label_dim == 0:
            class_labels = None
        elif class_labels is None:
            class_labels = torch.zeros([1, self.label_dim], device=x.device, dtype=dtype)
        else:
            class_labels = class_labels.to(dtype).reshape(-1, self.label_dim)
        low = self._unet_dtype(x.device, dtype, force_fp32)

        # Preconditioning (EDM Table 1), in `dtype`: elementwise math, which autocast leaves alone.
        c_skip = self.sigma_data**2 / (sigma**2 + self.sigma_data**2)
        c_out = sigma * self.sigma_data / (sigma**2 + self.sigma_data**2).sqrt()
        c_in = 1 / (self.sigma_data**2 + sigma**2).sqrt()
        c_noise = sigma.flatten().log() / 4

        if low is None:
            F_x = self.unet(c_in * x, c_noise, class_labels)
        elif self.precision is None:  # the official use_fp16: float16 activations, no autocast
            F_x = self.unet((c_in * x).to(low), c_noise, class_labels)
        else:
            with torch.autocast(x.device.type, dtype=low):
                F_x = self.unet((c_in * x).to(low), c_noise, class_labels)
        D_x = c_skip * x + c_out * F_x.to(dtype)
        if return_logvar:
            with no_autocast(x.device):  # the uncertainty head stays float32 under any outer autocast
                logvar = self.logvar_linear(self.logvar_fourier(c_noise)).reshape(-1, 1, 1, 1)
            return D_x, logvar
        return D_x

    def _check_inputs(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None) -> None:
        shape = (self.img_channels, self.img_resolution, self.img_resolution)
        if x.ndim != 4 or tuple(x.shape[1:]) != shape:
            raise ValueError(f"x has shape {list(x.shape)}; this network expects [N, {', '.join(map(str, shape))}]")
        if sigma.numel() not in (1, x.shape[0]):
            raise ValueError(f"sigma has {sigma.numel()} elements; pass one per image ({x.shape[0]}) or a scalar")
        if sigma.device.type != "meta" and not torch.compiler.is_compiling() and not bool((sigma > 0).all()):
            raise ValueError("sigma must be positive (the network is conditioned on log(sigma))")
        if class_labels is None or self.label_dim == 0:
            return  # an unconditional network ignores labels, so it can serve as a guide
        if class_labels.ndim != 2 or class_labels.shape[1] != self.label_dim:
            raise ValueError(f"class_labels has shape {list(class_labels.shape)}; expected one-hot "
                             f"[N, {self.label_dim}]")
        if class_labels.shape[0] not in (1, x.shape[0]):
            raise ValueError(f"class_labels has {class_labels.shape[0]} rows for {x.shape[0]} images")
