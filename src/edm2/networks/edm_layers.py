"""Layers of the EDM (2022) networks: the building blocks shared by DDPM++, NCSN++ (`SongUNet`) and ADM
(`DhariwalUNet`), with the official class, parameter and buffer names so that official state dicts load with
`strict=True`.

These are ordinary (not magnitude-preserving) layers: biases, group norms, learned weights initialized by the
official schemes. Weights are cast to the activation dtype on use, so a model runs in float16 or bfloat16 by
feeding it activations of that dtype; the embedding stays float32 and attention logits are computed in float32.
Parameters are created in the official order with the official random draws, so that a network built after
`torch.manual_seed(s)` starts from the weights the official code would draw.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.nn.functional import silu

__all__ = ["weight_init", "Linear", "Conv2d", "GroupNorm", "UNetBlock", "PositionalEmbedding", "FourierEmbedding",
           "INIT_MODES"]

INIT_MODES = ("xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal")


def weight_init(shape: Sequence[int], mode: str, fan_in: int, fan_out: int) -> torch.Tensor:
    """A weight tensor drawn from the global generator by one of the official schemes (`INIT_MODES`)."""
    if mode == "xavier_uniform":
        return np.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == "xavier_normal":
        return np.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == "kaiming_uniform":
        return np.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1)
    if mode == "kaiming_normal":
        return np.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(f"unknown init_mode {mode!r}; choose one of {', '.join(INIT_MODES)}")


class Linear(torch.nn.Module):
    """Fully connected layer y = x W^T + b, with the weight initialized by `init_mode` times `init_weight`."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, init_mode: str = "kaiming_normal",
                 init_weight: float = 1, init_bias: float = 0) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = torch.nn.Parameter(weight_init([out_features, in_features], **fans) * init_weight)
        self.bias = torch.nn.Parameter(weight_init([out_features], **fans) * init_bias) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x @ self.weight.to(x.dtype).t()
        if self.bias is not None:
            x = x.add_(self.bias.to(x.dtype))
        return x


class Conv2d(torch.nn.Module):
    """2-D convolution with optional 2x up- or downsampling by a separable FIR `resample_filter`.

    `kernel=0` gives a pure resampling layer without weights. `fused_resample` applies the filter on the
    other side of the convolution (as the NCSN++ residual encoder does), which changes the border handling.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, bias: bool = True, up: bool = False,
                 down: bool = False, resample_filter: Sequence[float] = (1, 1), fused_resample: bool = False,
                 init_mode: str = "kaiming_normal", init_weight: float = 1, init_bias: float = 0) -> None:
        if up and down:
            raise ValueError("Conv2d: up and down are exclusive")
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        fans = dict(mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        self.weight = torch.nn.Parameter(
            weight_init([out_channels, in_channels, kernel, kernel], **fans) * init_weight) if kernel else None
        self.bias = torch.nn.Parameter(weight_init([out_channels], **fans) * init_bias) if kernel and bias else None
        f = torch.as_tensor(list(resample_filter), dtype=torch.float32)
        f = f.ger(f).unsqueeze(0).unsqueeze(1) / f.sum().square()  # separable 2-D filter with unit DC gain
        self.register_buffer("resample_filter", f if up or down else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype) if self.weight is not None else None
        b = self.bias.to(x.dtype) if self.bias is not None else None
        f = self.resample_filter.to(x.dtype) if self.resample_filter is not None else None
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0
        conv = torch.nn.functional.conv2d
        if self.fused_resample and self.up and w is not None:
            x = torch.nn.functional.conv_transpose2d(x, f.mul(4).tile([self.in_channels, 1, 1, 1]),
                                                     groups=self.in_channels, stride=2, padding=max(f_pad - w_pad, 0))
            x = conv(x, w, padding=max(w_pad - f_pad, 0))
        elif self.fused_resample and self.down and w is not None:
            x = conv(x, w, padding=w_pad + f_pad)
            x = conv(x, f.tile([self.out_channels, 1, 1, 1]), groups=self.out_channels, stride=2)
        else:
            if self.up:  # zero-stuffing transposed convolution; 4 = the gain that keeps the mean
                x = torch.nn.functional.conv_transpose2d(x, f.mul(4).tile([self.in_channels, 1, 1, 1]),
                                                         groups=self.in_channels, stride=2, padding=f_pad)
            if self.down:
                x = conv(x, f.tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2, padding=f_pad)
            if w is not None:
                x = conv(x, w, padding=w_pad)
        if b is not None:
            x = x.add_(b.reshape(1, -1, 1, 1))
        return x


class GroupNorm(torch.nn.Module):
    """Group normalization with min(num_groups, channels / min_channels_per_group) groups."""

    def __init__(self, num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4,
                 eps: float = 1e-5) -> None:
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(num_channels))
        self.bias = torch.nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.group_norm(x, num_groups=self.num_groups, weight=self.weight.to(x.dtype),
                                              bias=self.bias.to(x.dtype), eps=self.eps)


def attention_weights(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """softmax_k(q^T k / sqrt(channels)) for q, k [n, channels, pixels], computed in float32."""
    w = torch.einsum("ncq,nck->nqk", q.to(torch.float32), (k / np.sqrt(k.shape[1])).to(torch.float32))
    return w.softmax(dim=2).to(q.dtype)


class UNetBlock(torch.nn.Module):
    """The residual block of DDPM++, NCSN++ and ADM: group norm, SiLU, 3x3 convolution, embedding as a bias or
    an adaptive scale and shift, dropout, 3x3 convolution, skip connection (resampled and projected when the
    shape changes), scaled sum; then optional multi-head self-attention with its own scaled residual sum."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, up: bool = False, down: bool = False,
                 attention: bool = False, num_heads: int | None = None, channels_per_head: int = 64,
                 dropout: float = 0, skip_scale: float = 1, eps: float = 1e-5,
                 resample_filter: Sequence[float] = (1, 1), resample_proj: bool = False, adaptive_scale: bool = True,
                 init: dict | None = None, init_zero: dict | None = None, init_attn: dict | None = None) -> None:
        super().__init__()
        init = init or {}
        init_zero = dict(init_weight=0) if init_zero is None else init_zero
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        heads = num_heads if num_heads is not None else out_channels // channels_per_head
        self.num_heads = heads if attention else 0
        self.dropout = dropout
        self.skip_scale = skip_scale
        self.adaptive_scale = adaptive_scale

        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, kernel=3, up=up, down=down, resample_filter=resample_filter,
                            **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, **init_zero)
        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel=kernel, up=up, down=down,
                               resample_filter=resample_filter, **init)
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, kernel=1,
                              **(init_attn if init_attn is not None else init))
            self.proj = Conv2d(out_channels, out_channels, kernel=1, **init_zero)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        orig = x
        x = self.conv0(silu(self.norm0(x)))
        params = self.affine(emb).unsqueeze(2).unsqueeze(3).to(x.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(chunks=2, dim=1)
            x = silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = silu(self.norm1(x.add_(params)))
        x = self.conv1(torch.nn.functional.dropout(x, p=self.dropout, training=self.training))
        x = x.add_(self.skip(orig) if self.skip is not None else orig)
        x = x * self.skip_scale
        if self.num_heads:
            n, c = x.shape[:2]
            q, k, v = self.qkv(self.norm2(x)).reshape(n * self.num_heads, c // self.num_heads, 3, -1).unbind(2)
            a = torch.einsum("nqk,nck->ncq", attention_weights(q, k), v)
            x = self.proj(a.reshape(*x.shape)).add_(x)
            x = x * self.skip_scale
        return x


class PositionalEmbedding(torch.nn.Module):
    """Sinusoidal embedding [cos(x f_i), sin(x f_i)] with frequencies f_i = (1/max_positions)^(i/(C/2 - e)),
    e = 1 with `endpoint` (DDPM++), else 0 (ADM)."""

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        freqs = torch.arange(start=0, end=self.num_channels // 2, dtype=torch.float32, device=x.device)
        freqs = freqs / (self.num_channels // 2 - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** freqs
        x = x.ger(freqs.to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


class FourierEmbedding(torch.nn.Module):
    """Random Fourier features [cos(2 pi x f_i), sin(2 pi x f_i)], f_i ~ N(0, scale^2) fixed at construction
    (NCSN++)."""

    def __init__(self, num_channels: int, scale: float = 16) -> None:
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.ger((2 * np.pi * self.freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)
