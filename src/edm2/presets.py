"""Training presets: network shapes and training hyper-parameters as plain data.

The twelve `edm2-img*` presets are the official ones (EDM2 Table 2/3 and Appendix); the `cpu-*`
presets are small enough to train on a laptop CPU. Durations are in training images.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

__all__ = ["NetworkConfig", "TrainingConfig", "Preset", "PRESETS", "get_preset"]

Ki, Mi = 1 << 10, 1 << 20


@dataclass(frozen=True)
class NetworkConfig:
    """Arguments of `edm2.networks.Precond` (official names)."""

    img_resolution: int
    img_channels: int
    label_dim: int
    model_channels: int = 192
    channel_mult: tuple[int, ...] = (1, 2, 3, 4)
    channel_mult_noise: int | None = None
    channel_mult_emb: int | None = None
    num_blocks: int = 3
    attn_resolutions: tuple[int, ...] = (16, 8)
    label_balance: float = 0.5
    concat_balance: float = 0.5
    resample_filter: tuple[float, ...] = (1, 1)
    channels_per_head: int = 64
    dropout: float = 0.0
    res_balance: float = 0.3
    attn_balance: float = 0.3
    clip_act: float | None = 256
    use_fp16: bool = True
    sigma_data: float = 0.5
    logvar_channels: int = 128

    def to_dict(self) -> dict:
        """Plain JSON-able dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> NetworkConfig:
        """Inverse of `to_dict`; unknown keys raise ValueError."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown network option(s) {unknown}; known: {sorted(names)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


@dataclass(frozen=True)
class TrainingConfig:
    """Training hyper-parameters (official option names in comments)."""

    batch_size: int = 2048  # --batch, total over all GPUs
    duration: int = 2048 * Mi  # --duration, images
    lr: float = 0.0100  # --lr, alpha_ref
    decay: float = 70000  # --decay, t_ref in batches
    rampup_Mimg: float = 10  # linear learning-rate warm-up, millions of images
    P_mean: float = -0.4  # ln(sigma) ~ N(P_mean, P_std^2)
    P_std: float = 1.0
    ema_stds: tuple[float, ...] = (0.050, 0.100)  # power EMAs tracked during training
    status: int = 128 * Ki  # status line interval, images
    snapshot: int = 8 * Mi  # EMA snapshot interval, images
    checkpoint: int = 128 * Mi  # training-state checkpoint interval, images

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class Preset:
    """A named network shape plus training hyper-parameters and the data they are meant for."""

    name: str
    description: str
    network: NetworkConfig
    training: TrainingConfig = field(default_factory=TrainingConfig)


# The two official families: (description, image channels, t_ref in batches, P_mean, P_std).
_FAMILIES = {
    "img512": ("ImageNet-512 latent (64x64x4, SD VAE)", 4, 70000, -0.4, 1.0),
    "img64": ("ImageNet-64 pixels (64x64x3)", 3, 35000, -0.8, 1.6),
}


def _official(family: str, size: str, channels: int, lr: float, dropout: float, duration_Mi: int) -> Preset:
    description, img_channels, decay, P_mean, P_std = _FAMILIES[family]
    return Preset(
        name=f"edm2-{family}-{size}",
        description=f"{description}, EDM2-{size.upper()}, C={channels}",
        network=NetworkConfig(img_resolution=64, img_channels=img_channels, label_dim=1000,
                              model_channels=channels, dropout=dropout),
        training=TrainingConfig(batch_size=2048, duration=duration_Mi * Mi, lr=lr, decay=decay,
                                P_mean=P_mean, P_std=P_std),
    )


def _cpu(name: str, description: str, network: NetworkConfig, **training) -> Preset:
    defaults = dict(batch_size=128, duration=2 * Mi, lr=0.0100, decay=5000, rampup_Mimg=0.05, P_mean=-0.8,
                    P_std=1.6, status=16 * Ki, snapshot=128 * Ki, checkpoint=256 * Ki)
    return Preset(name, description, network, TrainingConfig(**{**defaults, **training}))


# The re-tuned CPU recipe: 48 Ki images in batches of 64, decay start and warm-up in the official proportions
# of that duration (6.68 % and 0.466 %, `edm2.recipes`), 32 snapshots of the official EMA lengths.
_CPU_RECIPE = dict(batch_size=64, duration=48 * Ki, lr=0.0100, decay=51.2695, rampup_Mimg=0.000229, P_mean=-0.8,
                   P_std=1.6, ema_stds=(0.05, 0.10), status=768, snapshot=1536, checkpoint=6144)

_PRESET_LIST = [
    # XXS is the small guide model of the autoguidance follow-up work (same recipe, C=64).
    _official("img512", "xxs", 64, 0.0170, 0.00, 2048),
    _official("img512", "xs", 128, 0.0120, 0.00, 2048),
    _official("img512", "s", 192, 0.0100, 0.00, 2048),
    _official("img512", "m", 256, 0.0090, 0.10, 2048),
    _official("img512", "l", 320, 0.0080, 0.10, 1792),
    _official("img512", "xl", 384, 0.0070, 0.10, 1280),
    _official("img512", "xxl", 448, 0.0065, 0.10, 896),
    _official("img64", "xs", 128, 0.0120, 0.00, 1024),
    _official("img64", "s", 192, 0.0100, 0.00, 1024),
    _official("img64", "m", 256, 0.0090, 0.10, 2048),
    _official("img64", "l", 320, 0.0080, 0.10, 1024),
    _official("img64", "xl", 384, 0.0070, 0.10, 640),
    _cpu("cpu-digits8", "8x8 grayscale digits (the built-in demo), 10 classes, laptop CPU",
         NetworkConfig(img_resolution=8, img_channels=1, label_dim=10, model_channels=32, channel_mult=(1, 2),
                       num_blocks=2, attn_resolutions=(4,), channels_per_head=32, use_fp16=False),
         batch_size=128, duration=128 * Ki, lr=0.0100, decay=1000, rampup_Mimg=0.02, status=8 * Ki,
         snapshot=16 * Ki, checkpoint=32 * Ki),
    _cpu("cpu-tiny8", "8x8 grayscale, minimal network for smoke tests and CI (not for quality)",
         NetworkConfig(img_resolution=8, img_channels=1, label_dim=10, model_channels=16, channel_mult=(1, 2),
                       num_blocks=1, attn_resolutions=(4,), channels_per_head=16, use_fp16=False),
         batch_size=32, duration=64 * Ki, decay=1000, rampup_Mimg=0.01),
    # Re-tuned for runs of minutes to hours on a CPU (docs/recipes.md): narrow networks, one block per level, no
    # attention (at 48 channels a 64-channel head does not fit), batch 64, schedule in the official proportions
    # of their duration (about 15 single-thread CPU-minutes).
    _cpu("cpu-gray28", "28x28 grayscale (MNIST-like), 10 classes, minutes to hours on a CPU",
         NetworkConfig(img_resolution=28, img_channels=1, label_dim=10, model_channels=24, channel_mult=(1, 2, 2),
                       num_blocks=1, attn_resolutions=(), use_fp16=False), **_CPU_RECIPE),
    _cpu("cpu-gray32", "32x32 grayscale, 10 classes, minutes to hours on a CPU",
         NetworkConfig(img_resolution=32, img_channels=1, label_dim=10, model_channels=24, channel_mult=(1, 2, 2),
                       num_blocks=1, attn_resolutions=(), use_fp16=False), **_CPU_RECIPE),
    _cpu("cpu-rgb32", "32x32 colour (CIFAR-like), 10 classes, minutes to hours on a CPU",
         NetworkConfig(img_resolution=32, img_channels=3, label_dim=10, model_channels=24, channel_mult=(1, 2, 2),
                       num_blocks=1, attn_resolutions=(), use_fp16=False), **_CPU_RECIPE),
    _cpu("cpu-rgb64", "64x64 colour, 10 classes, hours on a CPU",
         NetworkConfig(img_resolution=64, img_channels=3, label_dim=10, model_channels=24,
                       channel_mult=(1, 2, 2, 2), num_blocks=1, attn_resolutions=(), use_fp16=False),
         **_CPU_RECIPE),
]
PRESETS: dict[str, Preset] = {p.name: p for p in _PRESET_LIST}


def get_preset(name: str) -> Preset:
    """The preset called `name`; ValueError listing the known names otherwise."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]
