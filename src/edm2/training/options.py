"""What a user asks of a training run (`TrainOptions`) and the run it resolves to (`RunConfig`): options
combined with the preset and checked against the dataset, before any file is touched.

Each `TrainOptions` field carries its command-line option (`Option`, in the field's metadata): the library owns
the names, defaults and help texts, and `edm2 train` (edm2.cli.train) builds its options from them."""

from __future__ import annotations

import dataclasses
from dataclasses import MISSING, dataclass, field
from typing import Any

from edm2 import runtime
from edm2.data.encoders import Encoder, encoder_from_dict
from edm2.data.folder import ImageFolderDataset
from edm2.data.latent_stats import load_latent_stats
from edm2.networks import PRECISIONS
from edm2.networks.spec import NetworkConfig, NetworkSpec
from edm2.presets import PRESETS, EDMRecipe, Preset, get_preset
from edm2.training import recipes

__all__ = ["Option", "option_fields", "TrainOptions", "RunConfig", "resolve_run", "resolve_encoder"]


@dataclass(frozen=True)
class Option:
    """How a `TrainOptions` field is given on the command line.

    `kind` is a plain type (str, int, float; bool: a flag), a tuple of choices, or a marker that edm2.cli turns
    into its parameter type: 'nimg' (an image count such as 2Mi), 'budget' (a time such as 15min), 'floats'
    (comma-separated numbers, a tuple), 'dir' / 'file' (a path), 'count' (an integer >= 0).
    `flag` is the spelling when it is not `--` and the field name with dashes (e.g. '--cond/--uncond').
    `mutable`: RunConfig stores the value under the same name and a resumed run may change it (RunConfig.MUTABLE)."""

    help: str
    kind: type | str | tuple[str, ...] = str
    flag: str | None = None
    mutable: bool = False

    def spelling(self, name: str) -> str:
        """The option as typed, for the field `name`."""
        return self.flag or "--" + name.replace("_", "-")


def _option(default: Any, help: str, kind: type | str | tuple[str, ...] = str, flag: str | None = None,
            mutable: bool = False) -> Any:
    """A `TrainOptions` field with its command-line `Option`; `default` MISSING: a required option."""
    return field(default=default, metadata={"option": Option(help, kind, flag, mutable)})


_PRESET = "[default: preset]"
_SCHEDULE = "[default: preset, or {} % of a --duration/--budget]"


@dataclass
class TrainOptions:
    """What the user asks for; None means 'take it from the preset'. Image counts are in images; `preset` may
    also be a Preset (from Python)."""

    outdir: str = _option(MISSING, "Run folder (resumes if it exists).", "dir")
    data: str = _option("digits", "Folder or .zip of images or latents (`edm2 dataset`), .npz, or 'digits'.")
    preset: str | Preset | None = _option(None, "Network and recipe (see `edm2 info`), or 'auto': chosen for the data "
                                                "and the hardware.  [default: cpu-digits8 for the digits, auto for "
                                                "other data]")
    cond: bool = _option(True, "Class-conditional training.", bool, flag="--cond/--uncond")
    duration: int | None = _option(None, f"Training length in images (e.g. 2Mi); the schedule follows it.  {_PRESET}",
                                   "nimg", mutable=True)
    budget: float | None = _option(None, "Train for this long instead (e.g. 15min, 2h): the duration is planned from "
                                         "the throughput of the first steps.", "budget", mutable=True)  # seconds
    budget_clock: str = _option("wall", "What --budget counts: elapsed time or this process's CPU time.",
                                tuple(recipes.CLOCKS))
    rampup: int | None = _option(None, f"Learning-rate warm-up in images.  {_SCHEDULE.format(0.466)}", "nimg")
    batch: int | None = _option(None, f"Total batch size.  {_PRESET}", int)
    batch_gpu: int | None = _option(None, "Micro-batch per process; smaller than the batch accumulates gradients.",
                                    int, mutable=True)
    lr: float | None = _option(None, f"Reference learning rate alpha_ref.  {_PRESET}", float)
    decay: float | None = _option(None, "Learning-rate decay start t_ref, in batches; 0: no decay.  "
                                        + _SCHEDULE.format(6.68), float)
    dropout: float | None = _option(None, f"Dropout probability.  {_PRESET}", float)
    P_mean: float | None = _option(None, f"Mean of ln(sigma) during training.  {_PRESET}", float)
    P_std: float | None = _option(None, f"Std of ln(sigma) during training.  {_PRESET}", float)
    status: int | None = _option(None, f"Status interval in images.  {_PRESET}", "nimg", mutable=True)
    snapshot: int | None = _option(None, f"EMA snapshot interval in images.  {_PRESET}", "nimg", mutable=True)
    checkpoint: int | None = _option(None, f"Checkpoint interval in images.  {_PRESET}", "nimg", mutable=True)
    ema_stds: tuple[float, ...] | None = _option(None, "Comma-separated sigma_rel of the tracked EMAs.  [default: "
                                                       "0.05,0.10; edm-* presets: none]", "floats")
    seed: int = _option(0, "Random seed.", int)
    device: str = _option("auto", "cpu, cuda, or auto.")
    precision: str | None = _option(None, "U-Net precision: fp32, bf16 (autocast, also on CPU) or fp16 (CUDA, "
                                          "dynamic loss scaling).  [default: fp16 on CUDA for presets with use_fp16, "
                                          "else fp32]", tuple(PRECISIONS), mutable=True)
    compile: bool = _option(False, "torch.compile the network (slow start, faster steps).", bool, mutable=True)
    allow_tf32: bool = _option(False, "TF32 in CUDA convolutions and matrix products (off, as the official code "
                                      "trains).", bool, mutable=True)
    augment: float | None = _option(None, f"edm-* presets: augmentation probability, 0 = off.  {_PRESET}", float)
    ema: float | None = _option(None, f"edm-* presets: traditional EMA half-life in Mimg.  {_PRESET}", float)
    xflip: bool = _option(False, "Double the dataset with mirrored images.", bool)
    max_size: int | None = _option(None, "Train on a random subset of this many images.  [default: all]", int)
    latent_stats: str | None = _option(None, "Latent statistics from `edm2 dataset stats` to standardise latents "
                                             "with.  [default: the dataset's, else the official sd-vae-ft-mse values]",
                                       "file")
    workers: int | None = _option(None, "Data loading processes per training process.  [default: 2 for data on "
                                        "disk, 0 in memory]", "count", mutable=True)


def option_fields() -> tuple[dataclasses.Field, ...]:
    """The fields of `TrainOptions` in order, each with its `Option` in `metadata['option']`."""
    return dataclasses.fields(TrainOptions)


@dataclass(frozen=True)
class RunConfig:
    """The fully resolved run, written to training_options.json; a resumed run must match it."""

    data: str
    dataset: dict
    preset: str
    network: NetworkSpec  # EDM2's Precond (NetworkConfig) or an EDM-release network (EDMNetworkConfig)
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
    provenance: dict = field(default_factory=dict)  # name -> {value, source, rule}: see edm2.training.recipes
    budget: dict | None = None  # the BudgetPlan of a run given a time budget
    edm: EDMRecipe | None = None  # EDM-release runs (edm-* presets): loss, augment, EMA, Adam betas, loss scaling
    encoder: Encoder | None = None  # how data maps to the network's space; None: StandardRGBEncoder (pixels)
    workers: int = 0  # DataLoader worker processes per training process

    # Fields that may change between a run and its resumption: the options marked `mutable`, the number of processes
    # (the data stream, the noise and the optimizer state do not depend on it) and the provenance.
    MUTABLE = (*(f.name for f in option_fields() if f.metadata["option"].mutable), "processes", "provenance")

    @property
    def network_class(self) -> str | None:
        """The official class of an EDM-release network; None for EDM2's Precond (as `training_options.json`)."""
        return None if isinstance(self.network, NetworkConfig) else self.network.class_name

    def to_dict(self) -> dict:
        """Plain JSON data, as `training_options.json` stores it."""
        d = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "edm":
                d["network_class"] = self.network_class
            if f.name in ("network", "edm", "encoder") and value is not None:
                value = value.to_dict()
            d[f.name] = list(value) if isinstance(value, tuple) else value
        return d

    def identity(self) -> dict:
        return {k: v for k, v in self.to_dict().items() if k not in self.MUTABLE}

    def network_config(self) -> NetworkSpec:
        """The network this run trains."""
        return self.network


def _preset(opts: TrainOptions, dataset, channels: int, device) -> tuple[Preset, recipes.Setting]:
    """The preset the run starts from, and its provenance."""
    if isinstance(opts.preset, Preset):
        return opts.preset, recipes.Setting(opts.preset.name, "user")
    name = opts.preset or ("cpu-digits8" if str(opts.data) == "digits" else "auto")
    if name != "auto":
        return get_preset(name), recipes.Setting(name, "user" if opts.preset else "preset")
    preset, reason = recipes.choose_preset(dataset.resolution, channels, len(dataset), device.type)
    return preset, recipes.Setting(preset.name, "auto", reason)


def _duration(opts: TrainOptions, preset: Preset, plan: recipes.BudgetPlan | None,
              previous: dict | None) -> recipes.Setting:
    if opts.budget is not None and opts.duration is not None:
        raise ValueError("give --duration or --budget, not both")
    if opts.budget is not None and not opts.budget > 0:
        raise ValueError(f"--budget must be a positive time, got {opts.budget}")
    if plan is not None:
        return recipes.Setting(plan.duration, "budget", f"{plan.seconds:g} s of {plan.clock} time at "
                               f"{1 / plan.seconds_per_image:.4g} images/s")
    if opts.duration is not None:
        return recipes.Setting(opts.duration, "user")
    if (previous or {}).get("budget") and opts.budget is None:  # a budget run resumed without its --budget
        return recipes.Setting(previous["duration"], "resumed", "planned from the run's --budget")
    return recipes.Setting(preset.training.duration, "preset")


def _batches(opts: TrainOptions, preset_batch: int, world: int) -> tuple[int, int]:
    """(global batch, micro-batch per process)."""
    batch = opts.batch or preset_batch
    batch_gpu = opts.batch_gpu or batch // world
    if batch > 0 and batch % world != 0:
        raise ValueError(f"--batch {batch} cannot be split over {world} processes; use a number of processes that "
                         "divides it")
    if batch <= 0 or batch_gpu <= 0 or batch % (world * batch_gpu) != 0:
        raise ValueError(f"--batch {batch} must be a positive multiple of processes ({world}) x --batch-gpu "
                         f"({batch_gpu})")
    return batch, batch_gpu


def resolve_run(opts: TrainOptions, dataset, world: int | None = None, plan: recipes.BudgetPlan | None = None,
                previous: dict | None = None) -> RunConfig:
    """Combine options, preset and dataset into a RunConfig; ValueError for inconsistent requests.
    `world` is the number of processes (default: that of the current process group). With a `--budget`, `plan`
    fixes the duration (without one, the preset's duration stands in, for measuring the throughput); `previous`
    (the training_options.json of the run being resumed) keeps the schedule that run derived."""
    device = runtime.resolve_device(opts.device)
    raw_encoder = encoder_from_dict(dataset.encoder)
    preset, preset_setting = _preset(opts, dataset, raw_encoder.network_channels(dataset.channels), device)
    encoder = resolve_encoder(opts, dataset, preset)
    _check_data(opts, dataset, preset, encoder.network_channels(dataset.channels))
    world = runtime.world_info()[1] if world is None else world
    tr = preset.training
    batch, batch_gpu = _batches(opts, tr.batch_size, world)
    precision = runtime.resolve_precision(opts.precision, device, preset.network.use_fp16)
    edm = _resolve_edm(preset, opts)
    net = _network(preset, edm, dataset.num_classes if opts.cond else 0, opts.dropout)
    duration = _duration(opts, preset, plan, previous)
    if duration.value <= 0:
        raise ValueError(f"--duration must be a positive number of images, got {duration.value}")
    provenance = {"preset": preset_setting, "duration": duration,
                  **_plain(opts, preset, preset_setting), **_schedule(opts, preset, duration, batch, previous)}
    value = {k: s.value for k, s in provenance.items()}
    run = RunConfig(
        data=opts.data, dataset=_describe(opts, dataset), preset=preset.name, network=net, batch=batch,
        batch_gpu=batch_gpu, lr=value["lr"], decay=value["decay"], rampup_Mimg=value["rampup"] / 1e6,
        P_mean=value["P_mean"], P_std=value["P_std"], ema_stds=tuple(value["ema_stds"]), seed=opts.seed,
        duration=int(duration.value), status=value["status"], snapshot=value["snapshot"],
        checkpoint=value["checkpoint"], precision=precision, compile=bool(opts.compile), processes=world,
        allow_tf32=bool(opts.allow_tf32), provenance={k: s.to_dict() for k, s in provenance.items()},
        budget=None if plan is None else plan.to_dict(), edm=edm,
        encoder=encoder if preset.latents else None, workers=_workers(opts, dataset),
    )
    _check(run, provenance)
    return run


def _check_data(opts: TrainOptions, dataset, preset: Preset, channels: int) -> None:
    """The data fits the preset's network: resolution, channels (of the network's space), labels."""
    net = preset.network
    if dataset.resolution != net.img_resolution or channels != net.img_channels:
        kind = " latents" if dataset.latents else ""
        raise ValueError(f"dataset {dataset.name} is {dataset.resolution}x{dataset.resolution}x{channels}{kind} "
                         f"but preset {preset.name} expects {net.img_resolution}x{net.img_resolution}x"
                         f"{net.img_channels}; choose a preset that matches the data")
    if opts.cond and not dataset.has_labels:
        raise ValueError(f"--cond needs labels but dataset {dataset.name} has none; add dataset.json labels "
                         "or train with --uncond")


def _network(preset: Preset, edm: EDMRecipe | None, label_dim: int, dropout: float | None) -> NetworkSpec:
    """The preset's network for this data: its label dimension, the dropout asked for, and (EDM recipe) augment
    labels (augment_dim 9) exactly when augmenting, as the official train.py."""
    dropout = preset.network.dropout if dropout is None else dropout
    if edm is None:
        return preset.network.replace(label_dim=label_dim, dropout=dropout)
    return preset.network.replace(label_dim=label_dim, dropout=dropout, augment_dim=9 if edm.augment else 0)


def _plain(opts: TrainOptions, preset: Preset, preset_setting: recipes.Setting) -> dict[str, recipes.Setting]:
    """The settings that are the user's or the preset's: batch, learning rate, noise distribution, dropout."""
    tr = preset.training
    pick = lambda v, d: recipes.Setting(d, "preset") if v is None else recipes.Setting(v, "user")  # noqa: E731
    plain = {"batch": pick(opts.batch, tr.batch_size), "lr": pick(opts.lr, tr.lr),
             "P_mean": pick(opts.P_mean, tr.P_mean), "P_std": pick(opts.P_std, tr.P_std),
             "dropout": pick(opts.dropout, preset.network.dropout)}
    if opts.dropout is None and preset_setting.source == "auto":
        plain["dropout"] = recipes.Setting(preset.network.dropout, "auto", "the table's choice for the data")
    return plain


def _schedule(opts: TrainOptions, preset: Preset, duration: recipes.Setting, batch: int,
              previous: dict | None) -> dict[str, recipes.Setting]:
    """Decay start, warm-up, tracked EMA lengths and the intervals (`recipes.resolve_schedule`). The EDM (2022)
    recipe keeps the official warm-up (10 Mimg), no decay and its own EMA: only its intervals follow the run."""
    tr = preset.training
    values = {"decay": tr.decay, "rampup": round(tr.rampup_Mimg * 1e6), "ema_stds": tuple(tr.ema_stds),
              "status": tr.status, "snapshot": tr.snapshot, "checkpoint": tr.checkpoint}
    user = {"decay": opts.decay, "rampup": opts.rampup, "ema_stds": opts.ema_stds, "status": opts.status,
            "snapshot": opts.snapshot, "checkpoint": opts.checkpoint}
    schedule = recipes.resolve_schedule(values, tr.duration, duration, batch, user, (previous or {}).get("provenance"))
    if preset.edm is not None:  # the official EDM recipe: fixed warm-up, no decay, its own EMA
        for name in ("decay", "rampup", "ema_stds"):
            schedule[name] = recipes.Setting(values[name], "preset") if user[name] is None else schedule[name]
    return schedule


def _describe(opts: TrainOptions, dataset) -> dict:
    if opts.max_size is not None and opts.max_size < 1:
        raise ValueError(f"--max-size must be a positive number of items, got {opts.max_size}")
    return {**dataset.describe(), **({"xflip": True} if opts.xflip else {}),
            **({"max_size": opts.max_size} if opts.max_size is not None else {})}


def _workers(opts: TrainOptions, dataset) -> int:
    workers = opts.workers if opts.workers is not None else 2 if isinstance(dataset, ImageFolderDataset) else 0
    if workers < 0:
        raise ValueError(f"--workers must be 0 or more, got {workers}")
    return workers


def _check(run: RunConfig, provenance: dict) -> None:
    for name in ("status", "snapshot", "checkpoint"):
        if getattr(run, name) <= 0:
            raise ValueError(f"--{name} must be a positive number of images, got {getattr(run, name)}")
    if run.lr <= 0 or run.P_std <= 0:
        raise ValueError(f"--lr and --P-std must be positive, got lr={run.lr}, P_std={run.P_std}")
    if run.decay < 0 or run.rampup_Mimg < 0:
        raise ValueError(f"--decay and --rampup must not be negative, got {run.decay} and {provenance['rampup'].value}")
    rampup = provenance["rampup"]
    # A user's explicit --rampup stands (with a note), and so does the EDM (2022) recipe's fixed 10 Mimg warm-up, as
    # in the official code; a warm-up this code derived or kept must fit.
    if rampup.value > run.duration and rampup.source not in ("user", "preset"):
        raise ValueError(f"the learning-rate warm-up ({rampup.value} images, {rampup.source}) is longer than the run "
                         f"({run.duration} images), so the learning rate would never reach --lr; give a shorter "
                         "--rampup or a longer --duration")
    if run.edm is None and not run.ema_stds:
        raise ValueError("--ema-stds is empty; an EDM2 run tracks at least one power-function EMA (e.g. 0.05,0.10)")


def _resolve_edm(preset: Preset, opts: TrainOptions) -> EDMRecipe | None:
    """The EDM recipe of an edm-* preset with the --augment/--ema overrides; None for EDM2 presets."""
    if preset.edm is None:
        if opts.augment is not None or opts.ema is not None:
            raise ValueError(f"--augment and --ema belong to the EDM (2022) recipe; preset {preset.name} trains with "
                             "EDM2's (power-function EMAs: --ema-stds); choose an edm-* preset")
        return None
    edm = preset.edm
    if opts.augment is not None:
        if not 0 <= opts.augment <= 1:
            raise ValueError(f"--augment is a probability in [0, 1], got {opts.augment}")
        edm = dataclasses.replace(edm, augment=float(opts.augment))
    if opts.ema is not None:
        if not opts.ema >= 0:
            raise ValueError(f"--ema is a half-life in millions of images (>= 0), got {opts.ema}")
        edm = dataclasses.replace(edm, ema_halflife_Mimg=float(opts.ema))
    return edm


def resolve_encoder(opts: TrainOptions, dataset, preset: Preset) -> Encoder:
    """The dataset's encoder, with the statistics of `--latent-stats`; ValueError when the data does not fit
    what the preset trains on (pixels or VAE latents)."""
    latent = [name for name, p in PRESETS.items() if p.latents]
    latents = dataset.latents
    if latents and not preset.latents:
        raise ValueError(f"dataset {dataset.name} holds VAE latents but preset {preset.name} trains on pixels; "
                         f"use a latent preset ({', '.join(latent)}) or the images themselves")
    if preset.latents and not latents:
        raise ValueError(f"preset {preset.name} trains on VAE latents but dataset {dataset.name} holds images; "
                         f"encode them first: edm2 dataset encode --source {dataset.name} --dest latents.zip")
    spec = dataset.encoder
    if opts.latent_stats is not None:
        if not latents:
            raise ValueError(f"--latent-stats applies to latent datasets; {dataset.name} holds images")
        raw_mean, raw_std = load_latent_stats(opts.latent_stats)
        spec = {"class": spec["class"], "kwargs": {**spec["kwargs"], "raw_mean": raw_mean, "raw_std": raw_std}}
    return encoder_from_dict(spec)
