"""What a user asks of a training run (`TrainOptions`) and the run it resolves to (`RunConfig`): options
combined with the preset and checked against the dataset, before any file is touched."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from edm2 import runtime
from edm2.data.encoders import encoder_from_dict
from edm2.data.folder import ImageFolderDataset
from edm2.data.latent_stats import load_latent_stats
from edm2.presets import PRESETS, EDMNetworkConfig, NetworkConfig, get_preset

__all__ = ["TrainOptions", "RunConfig", "resolve_run", "resolve_encoder"]


@dataclass
class TrainOptions:
    """What the user asks for; None means 'take it from the preset'. Image counts are in images."""

    outdir: str
    data: str = "digits"
    preset: str = "cpu-digits8"
    cond: bool = True
    duration: int | None = None
    batch: int | None = None
    batch_gpu: int | None = None  # micro-batch per process; gradient accumulation when smaller
    lr: float | None = None
    decay: float | None = None
    dropout: float | None = None
    P_mean: float | None = None
    P_std: float | None = None
    status: int | None = None
    snapshot: int | None = None
    checkpoint: int | None = None
    ema_stds: tuple[float, ...] | None = None
    seed: int = 0
    device: str = "auto"
    precision: str | None = None  # fp32, bf16 or fp16; None: fp16 on CUDA for use_fp16 presets, else fp32
    compile: bool = False  # torch.compile the network
    allow_tf32: bool = False  # TF32 in CUDA convolutions and matrix products (the official code keeps it off)
    augment: float | None = None  # edm-* presets: augmentation probability (0: off)
    ema: float | None = None  # edm-* presets: half-life of the traditional EMA, millions of images
    xflip: bool = False  # double the dataset with mirrored images (official --xflip)
    max_size: int | None = None  # train on a random subset of this many items
    latent_stats: str | None = None  # JSON of `edm2 dataset stats`: the raw mean/std to standardise latents with
    workers: int | None = None  # DataLoader processes; None: 2 for datasets on disk, 0 for those in memory


@dataclass(frozen=True)
class RunConfig:
    """The fully resolved run, written to training_options.json; a resumed run must match it."""

    data: str
    dataset: dict
    preset: str
    network: dict
    batch: int
    batch_gpu: int
    lr: float
    decay: float
    rampup_Mimg: float
    P_mean: float
    P_std: float
    ema_stds: tuple[float, ...]
    seed: int
    duration: int
    status: int
    snapshot: int
    checkpoint: int
    precision: str = "fp32"
    compile: bool = False
    processes: int = 1
    allow_tf32: bool = False
    # EDM-release runs (edm-* presets): the official class of `network` (None: EDM2's Precond) and the recipe
    # (`EDMRecipe.to_dict()`: loss, augment, EMA half-life and ramp-up, Adam betas, loss scaling).
    network_class: str | None = None
    edm: dict | None = None
    encoder: dict | None = None  # how data maps to the network's space (official terms); None: StandardRGBEncoder
    workers: int = 0  # DataLoader worker processes per training process

    # Fields that may change between a run and its resumption (the number of processes too: the data
    # stream, the noise and the optimizer state do not depend on it).
    MUTABLE = ("duration", "status", "snapshot", "checkpoint", "batch_gpu", "precision", "compile", "processes",
               "allow_tf32", "workers")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def identity(self) -> dict:
        return {k: v for k, v in self.to_dict().items() if k not in self.MUTABLE}

    def network_config(self) -> NetworkConfig | EDMNetworkConfig:
        """The network this run trains."""
        if self.network_class is None:
            return NetworkConfig.from_dict(self.network)
        return EDMNetworkConfig(self.network_class, dict(self.network))


def resolve_run(opts: TrainOptions, dataset, world: int | None = None) -> RunConfig:
    """Combine options, preset and dataset into a RunConfig; ValueError for inconsistent requests.
    `world` is the number of processes (default: that of the current process group)."""
    preset = get_preset(opts.preset)
    net, tr = preset.network, preset.training
    encoder = resolve_encoder(opts, dataset, preset)
    channels = encoder.network_channels(dataset.channels)
    if dataset.resolution != net.img_resolution or channels != net.img_channels:
        kind = " latents" if dataset.latents else ""
        raise ValueError(f"dataset {dataset.name} is {dataset.resolution}x{dataset.resolution}x{channels}{kind} "
                         f"but preset {preset.name} expects {net.img_resolution}x{net.img_resolution}x"
                         f"{net.img_channels}; choose a preset that matches the data")
    if opts.cond and not dataset.has_labels:
        raise ValueError(f"--cond needs labels but dataset {dataset.name} has none; add dataset.json labels "
                         "or train with --uncond")
    world = runtime.world_info()[1] if world is None else world
    batch = opts.batch or tr.batch_size
    batch_gpu = opts.batch_gpu or batch // world
    if batch > 0 and batch % world != 0:
        raise ValueError(f"--batch {batch} cannot be split over {world} processes; use a number of processes that "
                         "divides it")
    if batch <= 0 or batch_gpu <= 0 or batch % (world * batch_gpu) != 0:
        raise ValueError(f"--batch {batch} must be a positive multiple of processes ({world}) x --batch-gpu "
                         f"({batch_gpu})")
    precision = runtime.resolve_precision(opts.precision, runtime.resolve_device(opts.device), net.use_fp16)
    label_dim = dataset.num_classes if opts.cond else 0
    dropout = net.dropout if opts.dropout is None else opts.dropout
    edm = _resolve_edm(preset, opts)
    if edm is None:
        net = dataclasses.replace(net, label_dim=label_dim, dropout=dropout)
    else:  # the official train.py: augment labels (augment_dim 9) exactly when augmenting
        net = net.replace(label_dim=label_dim, dropout=dropout, augment_dim=9 if edm["augment"] else 0)
    pick = lambda v, d: d if v is None else v  # noqa: E731
    if opts.max_size is not None and opts.max_size < 1:
        raise ValueError(f"--max-size must be a positive number of items, got {opts.max_size}")
    described = {**dataset.describe(), **({"xflip": True} if opts.xflip else {}),
                 **({"max_size": opts.max_size} if opts.max_size is not None else {})}
    workers = pick(opts.workers, 2 if isinstance(dataset, ImageFolderDataset) else 0)  # in memory: no reading
    if workers < 0:
        raise ValueError(f"--workers must be 0 or more, got {workers}")
    run = RunConfig(
        data=opts.data, dataset=described, preset=preset.name, network=net.to_dict(), batch=batch,
        batch_gpu=batch_gpu, lr=pick(opts.lr, tr.lr), decay=pick(opts.decay, tr.decay), rampup_Mimg=tr.rampup_Mimg,
        P_mean=pick(opts.P_mean, tr.P_mean), P_std=pick(opts.P_std, tr.P_std),
        ema_stds=tuple(pick(opts.ema_stds, tr.ema_stds)), seed=opts.seed, duration=pick(opts.duration, tr.duration),
        status=pick(opts.status, tr.status), snapshot=pick(opts.snapshot, tr.snapshot),
        checkpoint=pick(opts.checkpoint, tr.checkpoint), precision=precision, compile=bool(opts.compile),
        processes=world, allow_tf32=bool(opts.allow_tf32),
        network_class=net.class_name if edm is not None else None, edm=edm,
        encoder=None if not preset.latents else encoder.to_dict(), workers=workers,
    )
    for name in ("duration", "status", "snapshot", "checkpoint"):
        if getattr(run, name) <= 0:
            raise ValueError(f"--{name} must be a positive number of images, got {getattr(run, name)}")
    if edm is None and not run.ema_stds:
        raise ValueError("--ema-stds is empty; an EDM2 run tracks at least one power-function EMA (e.g. 0.05,0.10)")
    if run.lr <= 0 or run.P_std <= 0:
        raise ValueError(f"--lr and --P-std must be positive, got lr={run.lr}, P_std={run.P_std}")
    return run


def _resolve_edm(preset, opts: TrainOptions) -> dict | None:
    """The EDM recipe of an edm-* preset with the --augment/--ema overrides; None for EDM2 presets."""
    if preset.edm is None:
        if opts.augment is not None or opts.ema is not None:
            raise ValueError(f"--augment and --ema belong to the EDM (2022) recipe; preset {preset.name} trains with "
                             "EDM2's (power-function EMAs: --ema-stds); choose an edm-* preset")
        return None
    edm = preset.edm.to_dict()
    if opts.augment is not None:
        if not 0 <= opts.augment <= 1:
            raise ValueError(f"--augment is a probability in [0, 1], got {opts.augment}")
        edm["augment"] = float(opts.augment)
    if opts.ema is not None:
        if not opts.ema >= 0:
            raise ValueError(f"--ema is a half-life in millions of images (>= 0), got {opts.ema}")
        edm["ema_halflife_Mimg"] = float(opts.ema)
    return edm


def resolve_encoder(opts: TrainOptions, dataset, preset):
    """The dataset's encoder, with the statistics of `--latent-stats`; ValueError when the data does not fit
    what the preset trains on (pixels or VAE latents)."""
    latent = [name for name, p in PRESETS.items() if p.latents]
    if dataset.latents and not preset.latents:
        raise ValueError(f"dataset {dataset.name} holds VAE latents but preset {preset.name} trains on pixels; "
                         f"use a latent preset ({', '.join(latent)}) or the images themselves")
    if preset.latents and not dataset.latents:
        raise ValueError(f"preset {preset.name} trains on VAE latents but dataset {dataset.name} holds images; "
                         f"encode them first: edm2 dataset encode --source {dataset.name} --dest latents.zip")
    spec = dataset.encoder
    if opts.latent_stats is not None:
        if not dataset.latents:
            raise ValueError(f"--latent-stats applies to latent datasets; {dataset.name} holds images")
        raw_mean, raw_std = load_latent_stats(opts.latent_stats)
        spec = {"class": spec["class"], "kwargs": {**spec["kwargs"], "raw_mean": raw_mean, "raw_std": raw_std}}
    return encoder_from_dict(spec)
