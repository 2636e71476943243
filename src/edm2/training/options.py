"""The run a user's options resolve to (`RunConfig`): options (`TrainOptions`, declared once with their
command-line spelling in `edm2.training.option_table`) combined with the preset and built for the dataset, before
any file is touched."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from edm2 import runtime
from edm2.data.encoders import Encoder, encoder_from_dict
from edm2.data.folder import ImageFolderDataset
from edm2.data.latent_stats import load_latent_stats
from edm2.files.snapshot import snapshot_filename
from edm2.networks.spec import EDMNetworkConfig, NetworkConfig, NetworkSpec
from edm2.presets import PRESETS, SNAPSHOT_DTYPES, EDMRecipe, Preset, edm_train_preset, get_preset, network_at
from edm2.training import recipes
from edm2.training.ladder import config_preset
from edm2.training.option_table import Option, TrainOptions, check_options, check_value, option_fields
from edm2.training.transfer import transfer_network

__all__ = ["Option", "option_fields", "TrainOptions", "RunConfig", "resolve_run", "resolve_encoder"]


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
    loss_scaling: float = 1.0  # constant factor on the loss (official --ls)
    dynamic_loss_scaling: bool = False  # fp16: torch.amp.GradScaler instead of the official constant factor
    snapshot_dtype: str = "float32"  # what the EMA snapshot files hold
    provenance: dict = field(default_factory=dict)  # name -> {value, source, rule}: see edm2.training.recipes
    budget: dict | None = None  # the BudgetPlan of a run given a time budget
    edm: EDMRecipe | None = None  # EDM-release runs (edm-* presets): loss, augment, EMA, Adam betas, loss scaling
    encoder: Encoder | None = None  # how data maps to the network's space; None: StandardRGBEncoder (pixels)
    workers: int = 0  # DataLoader worker processes per training process
    transfer: str | None = None  # --transfer: the network the run started from (fine-tuning)
    config: str = "G"  # --config: the EDM2 Table 1 configuration (training.ladder); G: the preset as published

    # Fields that may change between a run and its resumption: the options marked `mutable`, the number of processes
    # (the data stream, the noise and the optimizer state do not depend on it) and the provenance.
    MUTABLE = (*(f.name for f in option_fields() if f.metadata["option"].mutable), "processes", "provenance")
    # Fields that runs of earlier releases did not record: such a run resumes with the values it implied.
    ADDED = {"loss_scaling": 1.0, "dynamic_loss_scaling": False, "snapshot_dtype": "float32", "transfer": None,
             "config": "G"}

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
    """The preset the run starts from, and its provenance: the user's, EDM's train.py defaults for --arch and
    --precond, or the `--preset auto` choice."""
    if opts.arch is not None or opts.precond is not None:
        if opts.preset is not None:
            raise ValueError("give --preset or --arch/--precond (the EDM (2022) train.py's options), not both")
        arch, precond = opts.arch or "ddpmpp", opts.precond or "edm"
        preset = edm_train_preset(arch, precond)
        return preset, recipes.Setting(preset.name, "user", f"EDM train.py --arch {arch} --precond {precond}")
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
    batch = preset_batch if opts.batch is None else opts.batch  # 0 is the user's value (refused), not "unset"
    batch_gpu = batch // world if opts.batch_gpu is None else opts.batch_gpu
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
    (the training_options.json of the run being resumed) keeps the schedule that run derived. Every numeric value
    is checked (finite, in range: `option_table.RANGES`), the user's before anything else."""
    check_options(opts)
    device = runtime.resolve_device(opts.device)
    raw_encoder = encoder_from_dict(dataset.encoder)
    preset, preset_setting = _preset(opts, dataset, raw_encoder.network_channels(dataset.channels), device)
    if opts.config is not None:
        preset = config_preset(preset, opts.config)
    encoder = resolve_encoder(opts, dataset, preset)
    if opts.cond and not dataset.has_labels:
        raise ValueError(f"--cond needs labels but dataset {dataset.name} has none; add dataset.json labels "
                         "or train with --uncond")
    world = runtime.world_info()[1] if world is None else world
    batch, batch_gpu = _batches(opts, preset.training.batch_size, world)
    edm = _resolve_edm(preset, opts)
    net = _network(preset, edm, opts, dataset, encoder.network_channels(dataset.channels))
    if opts.transfer is not None:
        own = (opts.preset, opts.channels, opts.channel_mult, opts.arch, opts.precond) == (None,) * 5
        net = transfer_network(opts.transfer, net, encoder.to_dict(), opts.dropout, opts.fp16, take_from_source=own)
    precision = runtime.resolve_precision(opts.precision, device, net.use_fp16)
    duration = _duration(opts, preset, plan, previous)
    if duration.value <= 0:
        raise ValueError(f"--duration must be a positive number of images, got {duration.value}")
    rule = recipes.schedule_rule(opts.schedule, preset.official, opts.budget is not None,
                                 preset_setting.source == "auto")
    provenance = {"preset": preset_setting, "duration": duration, **_plain(opts, preset, preset_setting),
                  **_schedule(opts, preset, rule, duration, batch, previous)}
    value = {k: s.value for k, s in provenance.items()}
    run = RunConfig(
        data=opts.data, dataset=_describe(opts, dataset), preset=preset.name, network=net, batch=batch,
        batch_gpu=batch_gpu, lr=value["lr"], decay=value["decay"], rampup_Mimg=value["rampup"] / 1e6,
        P_mean=value["P_mean"], P_std=value["P_std"], ema_stds=tuple(value["ema_stds"]), seed=opts.seed,
        duration=int(duration.value), status=value["status"], snapshot=value["snapshot"],
        checkpoint=value["checkpoint"], precision=precision, compile=bool(opts.compile), processes=world,
        allow_tf32=bool(opts.allow_tf32), loss_scaling=float(value["loss_scaling"]),
        dynamic_loss_scaling=bool(opts.dynamic_ls), snapshot_dtype=value["snapshot_dtype"],
        provenance={k: s.to_dict() for k, s in provenance.items()}, budget=None if plan is None else plan.to_dict(),
        edm=edm, encoder=encoder if preset.latents else None, workers=_workers(opts, dataset),
        transfer=opts.transfer, config=opts.config or "G",
    )
    _check(run, provenance)
    return run


def _network(preset: Preset, edm: EDMRecipe | None, opts: TrainOptions, dataset, channels: int) -> NetworkSpec:
    """The preset's network built for the data, as the official code builds it: the dataset's resolution, its
    `channels` (in the network's space) and label dimension; the options' dropout, width (--channels, --cres) and
    use_fp16 (--fp16); and (EDM recipe) augment labels (augment_dim 9) exactly when augmenting, as the official
    train.py. ValueError when the network's levels cannot halve the data's resolution."""
    net = preset.network
    changes = {"label_dim": dataset.num_classes if opts.cond else 0,
               "dropout": net.dropout if opts.dropout is None else opts.dropout}
    if opts.channels is not None:
        if opts.channels < 1:
            raise ValueError(f"--channels must be a positive number of channels, got {opts.channels}")
        changes["model_channels"] = int(opts.channels)
    if opts.channel_mult is not None:
        if not opts.channel_mult or min(opts.channel_mult) < 1:
            raise ValueError(f"--cres must be positive channel multipliers, got {list(opts.channel_mult)}")
        mult = [int(m) for m in opts.channel_mult]
        changes["channel_mult"] = mult if isinstance(net, EDMNetworkConfig) else tuple(mult)
    if opts.fp16 is not None:
        changes["use_fp16"] = bool(opts.fp16)
    if edm is not None:
        changes["augment_dim"] = 9 if edm.augment else 0
    return network_at(net.replace(**changes), dataset.resolution, channels, f"preset {preset.name}'s network")


def _plain(opts: TrainOptions, preset: Preset, preset_setting: recipes.Setting) -> dict[str, recipes.Setting]:
    """The settings that are the user's or the preset's: batch, learning rate, noise distribution, dropout."""
    tr = preset.training
    pick = lambda v, d: recipes.Setting(d, "preset") if v is None else recipes.Setting(v, "user")  # noqa: E731
    plain = {"batch": pick(opts.batch, tr.batch_size), "lr": pick(opts.lr, tr.lr),
             "P_mean": pick(opts.P_mean, tr.P_mean), "P_std": pick(opts.P_std, tr.P_std),
             "dropout": pick(opts.dropout, preset.network.dropout), "loss_scaling": pick(opts.ls, tr.loss_scaling),
             "snapshot_dtype": pick(opts.snapshot_dtype, tr.snapshot_dtype)}
    if opts.dropout is None and preset_setting.source == "auto":
        plain["dropout"] = recipes.Setting(preset.network.dropout, "auto", "the table's choice for the data")
    return plain


def _schedule(opts: TrainOptions, preset: Preset, rule: recipes.Setting, duration: recipes.Setting, batch: int,
              previous: dict | None) -> dict[str, recipes.Setting]:
    """The schedule rule (`rule`: follow the run or keep the preset's), then the decay start, warm-up, tracked EMA
    lengths and the intervals (`recipes.resolve_schedule`). The EDM (2022) recipe keeps the official warm-up
    (10 Mimg), no decay and its own EMA: only its intervals may follow the run."""
    tr = preset.training
    values = {"decay": tr.decay, "rampup": round(tr.rampup_Mimg * 1e6), "ema_stds": tuple(tr.ema_stds),
              "status": tr.status, "snapshot": tr.snapshot, "checkpoint": tr.checkpoint}
    user = {"decay": opts.decay, "rampup": opts.rampup, "ema_stds": opts.ema_stds, "status": opts.status,
            "snapshot": opts.snapshot, "checkpoint": opts.checkpoint}
    schedule = recipes.resolve_schedule(values, tr.duration, duration, batch, user, (previous or {}).get("provenance"),
                                        follow=rule.value == "follow")
    # The official EDM recipe: fixed warm-up, no decay, its own EMA (the ladder's A follows the run as B to G do).
    if preset.edm is not None and opts.config != "A":
        for name in ("decay", "rampup", "ema_stds"):
            schedule[name] = recipes.Setting(values[name], "preset") if user[name] is None else schedule[name]
    return {"schedule": rule, **schedule}


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


def check_memory(run: RunConfig, device) -> None:
    """ValueError when training the run's network on `device` would need more memory than the device has (host
    memory for the CPU, the GPU's own for CUDA): its parameters (counted on the meta device, nothing allocated)
    times weights, gradients, Adam's two moments and the EMA copies (kept on the host)."""
    import os

    import torch

    from edm2.networks.spec import build_network

    with torch.device("meta"):
        count = sum(p.numel() for p in build_network(run.network).parameters())
    averages = len(run.ema_stds) + (run.edm is not None)
    needed = count * 4 * (4 + (averages if torch.device(device).type == "cpu" else 0))
    try:
        memory = torch.cuda.get_device_properties(device).total_memory if torch.device(device).type == "cuda" \
            else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError, RuntimeError):
        return
    if needed > memory:
        raise ValueError(f"the network has {count:.3g} parameters: training it needs about {needed / 2**30:.3g} GiB "
                         f"(weights, gradients, Adam{f', {averages} average(s)' if averages else ''}), more than "
                         f"the {memory / 2**30:.3g} GiB of {device}; choose a smaller --channels or --preset")


def _check(run: RunConfig, provenance: dict) -> None:
    """The resolved values (the user's, the preset's or the resumed run's) in range, as the options are."""
    for name in ("status", "snapshot", "checkpoint", "lr", "decay", "P_mean", "P_std", "dropout"):
        check_value(name, provenance[name].value)
    check_value("ls", run.loss_scaling)
    check_value("rampup", provenance["rampup"].value)
    if run.snapshot_dtype not in SNAPSHOT_DTYPES:
        raise ValueError(f"--snapshot-dtype is one of {', '.join(SNAPSHOT_DTYPES)}, got {run.snapshot_dtype!r}")
    rampup = provenance["rampup"]
    # A user's explicit --rampup stands (with a note), and so does the EDM (2022) recipe's fixed 10 Mimg warm-up, as
    # in the official code; a warm-up this code derived or kept must fit.
    if rampup.value > run.duration and rampup.source not in ("user", "preset"):
        raise ValueError(f"the learning-rate warm-up ({rampup.value} images, {rampup.source}) is longer than the run "
                         f"({run.duration} images), so the learning rate would never reach --lr; give a shorter "
                         "--rampup or a longer --duration")
    if run.edm is None and not run.ema_stds:
        raise ValueError("--ema-stds is empty; an EDM2 run tracks at least one power-function EMA (e.g. 0.05,0.10)")
    check_value("ema_stds", run.ema_stds)
    if len({snapshot_filename(0, s) for s in run.ema_stds}) != len(run.ema_stds):
        raise ValueError(f"--ema-stds {','.join(map(str, run.ema_stds))} has lengths equal at 3 decimals (their "
                         "snapshot files would collide); give each length once")


def _resolve_edm(preset: Preset, opts: TrainOptions) -> EDMRecipe | None:
    """The EDM recipe of an edm-* preset with the --augment/--ema/--ls overrides; None for EDM2 presets."""
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
    if opts.ls is not None:  # the run's loss scaling (RunConfig.loss_scaling), recorded in the recipe too
        edm = dataclasses.replace(edm, loss_scaling=float(opts.ls))
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
