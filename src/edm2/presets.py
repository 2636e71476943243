"""Training presets: network shapes and training hyper-parameters as plain data.

The twelve `edm2-img*` presets are the official ones (EDM2 Table 2/3 and Appendix); the `edm-*` presets are
the setups of the EDM (2022) release (its train.py options); the `cpu-*` presets are small enough to train on
a laptop CPU. Durations are in training images. A preset names the encoder its data needs
(`edm2.data.encoders`, official class names): the `edm2-img512-*` family and `cpu-latent16` train on Stable
Diffusion VAE latents, the others on pixels.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from edm2.networks.spec import EDMNetworkConfig, NetworkConfig, NetworkSpec

__all__ = ["NetworkConfig", "TrainingConfig", "Preset", "PRESETS", "get_preset", "EDMNetworkConfig", "EDMRecipe",
           "EDM_ARCHS", "EDM_PRECONDS", "SNAPSHOT_DTYPES", "edm_train_preset", "network_at"]

Ki, Mi = 1 << 10, 1 << 20
SNAPSHOT_DTYPES = ("float16", "float32")  # what EMA snapshot files may hold (the averages stay float32)


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
    loss_scaling: float = 1.0  # --ls, constant factor on the loss (the official fp16 recipe)
    snapshot_dtype: str = "float32"  # EMA snapshot files: float16 in the official EDM2 runs

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


# ----------------------------------------------------------------------------------------------------
# The EDM (2022) networks and recipe.


@dataclass(frozen=True)
class EDMRecipe:
    """What an EDM (2022) run does differently from an EDM2 run (official train.py options in comments)."""

    loss: str  # VPLoss, VELoss or EDMLoss, matching the preconditioning (--precond)
    augment: float = 0.12  # --augment: probability of the AugmentPipe (0: off; on: augment_dim 9)
    ema_halflife_Mimg: float = 0.5  # --ema: half-life of the traditional EMA, millions of images
    ema_rampup_ratio: float | None = 0.05  # the half-life is at most this times the images seen
    adam_betas: tuple[float, float] = (0.9, 0.999)
    loss_scaling: float = 1.0  # --ls: constant factor on the loss (fp16)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def __getitem__(self, name: str):
        return getattr(self, name)  # read like the stored JSON (run["edm"]["loss"])


@dataclass(frozen=True)
class Preset:
    """A named network shape plus training hyper-parameters and the data they are meant for; `edm` holds the
    EDM (2022) recipe of the `edm-*` presets (None: EDM2's). `official`: a setup of the official code (the
    `edm2-img*` and `edm-*` presets), which keeps its published schedule whatever the run's duration."""

    name: str
    description: str
    network: NetworkConfig | EDMNetworkConfig
    training: TrainingConfig = field(default_factory=TrainingConfig)
    edm: EDMRecipe | None = None
    encoder: str = "StandardRGBEncoder"  # the data it trains on: pixels, or "StabilityVAEEncoder" latents
    official: bool = False

    @property
    def latents(self) -> bool:
        """Whether the preset trains on VAE latents (a dataset made by `edm2 dataset encode`)."""
        return self.encoder == "StabilityVAEEncoder"


# The two official families: (description, image channels, t_ref in batches, P_mean, P_std, encoder).
_FAMILIES = {
    "img512": ("ImageNet-512 latent (64x64x4, SD VAE)", 4, 70000, -0.4, 1.0, "StabilityVAEEncoder"),
    "img64": ("ImageNet-64 pixels (64x64x3)", 3, 35000, -0.8, 1.6, "StandardRGBEncoder"),
}


def _official(family: str, size: str, channels: int, lr: float, dropout: float, duration_Mi: int) -> Preset:
    description, img_channels, decay, P_mean, P_std, encoder = _FAMILIES[family]
    return Preset(
        name=f"edm2-{family}-{size}",
        description=f"{description}, EDM2-{size.upper()}, C={channels}",
        network=NetworkConfig(img_resolution=64, img_channels=img_channels, label_dim=1000,
                              model_channels=channels, dropout=dropout),
        training=TrainingConfig(batch_size=2048, duration=duration_Mi * Mi, lr=lr, decay=decay,
                                P_mean=P_mean, P_std=P_std, snapshot_dtype="float16"),
        encoder=encoder,
        official=True,
    )


def _cpu(name: str, description: str, network: NetworkConfig, encoder: str = "StandardRGBEncoder",
         **training) -> Preset:
    defaults = dict(batch_size=128, duration=2 * Mi, lr=0.0100, decay=5000, rampup_Mimg=0.05, P_mean=-0.8,
                    P_std=1.6, status=16 * Ki, snapshot=128 * Ki, checkpoint=256 * Ki)
    return Preset(name, description, network, TrainingConfig(**{**defaults, **training}), encoder=encoder)


# The re-tuned CPU recipe: 48 Ki images in batches of 32 (the sweep in docs/recipes.md: twice the steps of batch
# 64 won at every budget), decay start and warm-up in the official proportions of that duration (6.68 % and
# 0.466 %, `edm2.training.recipes`), 32 snapshots of the official EMA lengths.
_CPU_RECIPE = dict(batch_size=32, duration=48 * Ki, lr=0.0100, decay=102.539, rampup_Mimg=0.000229, P_mean=-0.8,
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
    # attention (at 48 channels a 64-channel head does not fit), batch 32, schedule in the official proportions
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
    # The img512 recipe (latents, P_mean/P_std) on a CPU-sized network: 128x128 images through the SD VAE.
    _cpu("cpu-latent16", "16x16x4 SD VAE latents (128x128 images), 10 classes, CPU-sized",
         NetworkConfig(img_resolution=16, img_channels=4, label_dim=10, model_channels=32, channel_mult=(1, 2, 2),
                       num_blocks=2, attn_resolutions=(8,), use_fp16=False),
         encoder="StabilityVAEEncoder", P_mean=-0.4, P_std=1.0),
]
# The official train.py's --arch and --precond choices: network arguments, and (class, loss) pairs.
EDM_ARCHS = {
    "ddpmpp": dict(model_type="SongUNet", embedding_type="positional", encoder_type="standard",
                   decoder_type="standard", channel_mult_noise=1, resample_filter=[1, 1], model_channels=128,
                   channel_mult=[2, 2, 2]),
    "ncsnpp": dict(model_type="SongUNet", embedding_type="fourier", encoder_type="residual", decoder_type="standard",
                   channel_mult_noise=2, resample_filter=[1, 3, 3, 1], model_channels=128, channel_mult=[2, 2, 2]),
    "adm": dict(model_type="DhariwalUNet", model_channels=192, channel_mult=[1, 2, 3, 4]),
}
EDM_PRECONDS = {"vp": ("VPPrecond", "VPLoss"), "ve": ("VEPrecond", "VELoss"), "edm": ("EDMPrecond", "EDMLoss")}


def _edm(name: str, description: str, resolution: int, arch: str, precond: str, batch: int = 512,
         lr: float = 10e-4, dropout: float = 0.13, augment: float = 0.12, ema: float = 0.5,
         duration_Mimg: float = 200, fp16: bool = False, ls: float = 1, channel_mult: list[int] | None = None,
         tick_kimg: int = 50) -> Preset:
    """An EDM preset from the official train.py options (durations and intervals in decimal kimg/Mimg)."""
    class_name, loss = EDM_PRECONDS[precond]
    kwargs = dict(img_resolution=resolution, img_channels=3, label_dim=10, use_fp16=fp16, **EDM_ARCHS[arch],
                  dropout=dropout)
    if channel_mult is not None:
        kwargs["channel_mult"] = channel_mult
    if augment:
        kwargs["augment_dim"] = 9
    tick = tick_kimg * 1000
    training = TrainingConfig(batch_size=batch, duration=int(duration_Mimg * 1e6), lr=lr, decay=0, rampup_Mimg=10,
                              P_mean=-1.2, P_std=1.2, ema_stds=(), status=tick, snapshot=50 * tick,
                              checkpoint=500 * tick, loss_scaling=ls)
    return Preset(name, description, EDMNetworkConfig(class_name, kwargs), training,
                  EDMRecipe(loss=loss, augment=augment, ema_halflife_Mimg=ema, loss_scaling=ls), official=True)


def _edm_presets() -> list[Preset]:
    """The EDM release's setups: CIFAR-10, FFHQ and AFHQv2 with DDPM++/NCSN++ x VP/VE/EDM, ImageNet with ADM."""
    presets = []
    for arch, arch_name in (("ddpmpp", "DDPM++"), ("ncsnpp", "NCSN++")):
        for precond in ("vp", "ve", "edm"):
            what = f"{arch_name}, {precond.upper()} preconditioning and loss (EDM Table 2)"
            presets += [
                _edm(f"edm-cifar10-{arch}-{precond}", f"CIFAR-10 32x32 (EDM 2022), {what}", 32, arch, precond),
                _edm(f"edm-ffhq64-{arch}-{precond}", f"FFHQ 64x64 (EDM 2022), {what}", 64, arch, precond,
                     batch=256, lr=2e-4, dropout=0.05, augment=0.15, channel_mult=[1, 2, 2, 2]),
                _edm(f"edm-afhqv2-64-{arch}-{precond}", f"AFHQv2 64x64 (EDM 2022), {what}", 64, arch, precond,
                     batch=256, lr=2e-4, dropout=0.25, augment=0.15, channel_mult=[1, 2, 2, 2]),
            ]
    presets.append(_edm("edm-imagenet64-adm", "ImageNet 64x64 (EDM 2022), ADM with EDM preconditioning, "
                        "class-conditional", 64, "adm", "edm", batch=4096, lr=1e-4, dropout=0.10, augment=0,
                        ema=50, duration_Mimg=2500, fp16=True, ls=100, tick_kimg=200))
    return presets


_PRESET_LIST += _edm_presets()
_PRESET_LIST.append(Preset(  # the EDM recipe at toy size: DDPM++ with EDM preconditioning and augmentation
    "cpu-edm-tiny8", "8x8 grayscale, tiny DDPM++ with the EDM recipe (loss, augmentation, traditional EMA), for "
    "smoke tests and CI", EDMNetworkConfig("EDMPrecond", dict(
        img_resolution=8, img_channels=1, label_dim=10, use_fp16=False, **{**EDM_ARCHS["ddpmpp"],
        "model_channels": 16, "channel_mult": [1, 2]}, num_blocks=1, attn_resolutions=[4], dropout=0.13,
        augment_dim=9)),
    TrainingConfig(batch_size=32, duration=64 * Ki, lr=1e-3, decay=0, rampup_Mimg=0.01, P_mean=-1.2, P_std=1.2,
                   ema_stds=(), status=16 * Ki, snapshot=16 * Ki, checkpoint=32 * Ki),
    EDMRecipe(loss="EDMLoss", augment=0.12, ema_halflife_Mimg=0.005)))
PRESETS: dict[str, Preset] = {p.name: p for p in _PRESET_LIST}


def get_preset(name: str) -> Preset:
    """The preset called `name`; ValueError listing the known names otherwise."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]


def edm_train_preset(arch: str = "ddpmpp", precond: str = "edm") -> Preset:
    """What the EDM (2022) train.py trains with `--arch` and `--precond` and no other option: its defaults, which
    are the CIFAR-10 setup: `edm-cifar10-<arch>-<precond>`, or for ADM (no such preset) `edm-train-adm-<precond>`.
    ValueError for an unknown architecture or preconditioning."""
    if arch not in EDM_ARCHS or precond not in EDM_PRECONDS:
        raise ValueError(f"unknown --arch {arch!r} or --precond {precond!r}; choose --arch from "
                         f"{', '.join(EDM_ARCHS)} and --precond from {', '.join(EDM_PRECONDS)}")
    name = f"edm-cifar10-{arch}-{precond}"
    if name in PRESETS:
        return PRESETS[name]
    return _edm(f"edm-train-{arch}-{precond}", f"EDM (2022) train.py defaults (the CIFAR-10 recipe) with "
                f"{arch.upper()} and {precond.upper()} preconditioning", 32, arch, precond)


def _levels(network: NetworkSpec) -> int:
    """The number of resolution levels of a U-Net: one per channel multiplier."""
    return len(network["channel_mult"])


def network_at(network: NetworkSpec, resolution: int, channels: int, what: str = "the network") -> NetworkSpec:
    """`network` built for data of `resolution` x `resolution` x `channels` (the network's space: latent channels
    for latents), as the official code builds its network from the dataset; the other arguments (attention
    resolutions included) stay. ValueError, naming `what`, when a level could not halve the resolution."""
    halvings = _levels(network) - 1
    if resolution < 1 << halvings or resolution % (1 << halvings) or channels < 1:
        raise ValueError(f"{what} halves the resolution {halvings} times, so it needs a multiple of {1 << halvings} "
                         f"pixels, not {resolution}x{resolution}x{channels}; resize the images or choose a preset "
                         "that matches the data")
    if (resolution, channels) == (network.img_resolution, network.img_channels):
        return network
    return network.replace(img_resolution=resolution, img_channels=channels)
