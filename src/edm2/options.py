"""What a user asks of a training run (`TrainOptions`) and the run it resolves to (`RunConfig`): options
combined with the preset and checked against the dataset, before any file is touched."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from edm2 import recipes, runtime
from edm2.presets import Preset, get_preset

__all__ = ["TrainOptions", "RunConfig", "resolve_run"]


@dataclass
class TrainOptions:
    """What the user asks for; None means 'take it from the preset'. Image counts are in images."""

    outdir: str
    data: str = "digits"
    preset: str | Preset | None = None  # a name, 'auto' (the table in edm2.recipes) or a Preset; None: 'cpu-digits8'
    # for the digits, 'auto' for other data
    cond: bool = True
    duration: int | None = None
    budget: float | None = None  # seconds: plan the duration from the throughput measured in the first steps
    budget_clock: str = "wall"  # the budget's clock: wall (elapsed) or cpu (this process's CPU time)
    rampup: int | None = None  # learning-rate warm-up, images
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
    provenance: dict = field(default_factory=dict)  # name -> {value, source, rule}: see edm2.recipes
    budget: dict | None = None  # the BudgetPlan of a run given a time budget

    # Fields that may change between a run and its resumption (the number of processes too: the data
    # stream, the noise and the optimizer state do not depend on it).
    MUTABLE = ("duration", "status", "snapshot", "checkpoint", "batch_gpu", "precision", "compile", "processes",
               "allow_tf32", "provenance", "budget")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def identity(self) -> dict:
        return {k: v for k, v in self.to_dict().items() if k not in self.MUTABLE}


def _preset(opts: TrainOptions, dataset, device) -> tuple[Preset, recipes.Setting]:
    """The preset the run starts from, and its provenance."""
    if isinstance(opts.preset, Preset):
        return opts.preset, recipes.Setting(opts.preset.name, "user")
    name = opts.preset or ("cpu-digits8" if str(opts.data) == "digits" else "auto")
    if name != "auto":
        return get_preset(name), recipes.Setting(name, "user" if opts.preset else "preset")
    preset, reason = recipes.choose_preset(dataset.resolution, dataset.channels, len(dataset), device.type)
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
    preset, preset_setting = _preset(opts, dataset, device)
    net, tr = preset.network, preset.training
    if dataset.resolution != net.img_resolution or dataset.channels != net.img_channels:
        raise ValueError(f"dataset {dataset.name} is {dataset.resolution}x{dataset.resolution}x{dataset.channels} "
                         f"but preset {preset.name} expects {net.img_resolution}x{net.img_resolution}x"
                         f"{net.img_channels}; choose a preset that matches the data")
    if opts.cond and not dataset.has_labels:
        raise ValueError(f"--cond needs labels but dataset {dataset.name} has none; add dataset.json labels "
                         "or train with --uncond")
    world = runtime.world_info()[1] if world is None else world
    batch, batch_gpu = _batches(opts, tr.batch_size, world)
    precision = runtime.resolve_precision(opts.precision, device, net.use_fp16)
    net = dataclasses.replace(net, label_dim=dataset.num_classes if opts.cond else 0,
                              dropout=net.dropout if opts.dropout is None else opts.dropout)
    duration = _duration(opts, preset, plan, previous)
    if duration.value <= 0:
        raise ValueError(f"--duration must be a positive number of images, got {duration.value}")
    schedule = recipes.resolve_schedule(
        {"decay": tr.decay, "rampup": round(tr.rampup_Mimg * 1e6), "ema_stds": tuple(tr.ema_stds),
         "status": tr.status, "snapshot": tr.snapshot, "checkpoint": tr.checkpoint},
        tr.duration, duration, batch,
        {"decay": opts.decay, "rampup": opts.rampup, "ema_stds": opts.ema_stds, "status": opts.status,
         "snapshot": opts.snapshot, "checkpoint": opts.checkpoint},
        (previous or {}).get("provenance"))
    pick = lambda v, d: recipes.Setting(d, "preset") if v is None else recipes.Setting(v, "user")  # noqa: E731
    plain = {"batch": pick(opts.batch, tr.batch_size), "lr": pick(opts.lr, tr.lr),
             "P_mean": pick(opts.P_mean, tr.P_mean), "P_std": pick(opts.P_std, tr.P_std),
             "dropout": pick(opts.dropout, preset.network.dropout)}
    if opts.dropout is None and preset_setting.source == "auto":
        plain["dropout"] = recipes.Setting(preset.network.dropout, "auto", "the table's choice for the data")
    provenance = {"preset": preset_setting, "duration": duration, **plain, **schedule}
    value = {k: s.value for k, s in provenance.items()}
    run = RunConfig(
        data=opts.data, dataset=dataset.describe(), preset=preset.name, network=net.to_dict(), batch=batch,
        batch_gpu=batch_gpu, lr=value["lr"], decay=value["decay"], rampup_Mimg=value["rampup"] / 1e6,
        P_mean=value["P_mean"], P_std=value["P_std"], ema_stds=tuple(value["ema_stds"]), seed=opts.seed,
        duration=int(duration.value), status=value["status"], snapshot=value["snapshot"],
        checkpoint=value["checkpoint"], precision=precision, compile=bool(opts.compile), processes=world,
        allow_tf32=bool(opts.allow_tf32), provenance={k: s.to_dict() for k, s in provenance.items()},
        budget=None if plan is None else plan.to_dict(),
    )
    _check(run, provenance)
    return run


def _check(run: RunConfig, provenance: dict) -> None:
    for name in ("status", "snapshot", "checkpoint"):
        if getattr(run, name) <= 0:
            raise ValueError(f"--{name} must be a positive number of images, got {getattr(run, name)}")
    if run.lr <= 0 or run.P_std <= 0:
        raise ValueError(f"--lr and --P-std must be positive, got lr={run.lr}, P_std={run.P_std}")
    if run.decay < 0 or run.rampup_Mimg < 0:
        raise ValueError(f"--decay and --rampup must not be negative, got {run.decay} and {provenance['rampup'].value}")
    rampup = provenance["rampup"]
    if rampup.value > run.duration and rampup.source != "user":  # a user's explicit --rampup stands, with a note
        raise ValueError(f"the learning-rate warm-up ({rampup.value} images, {rampup.source}) is longer than the run "
                         f"({run.duration} images), so the learning rate would never reach --lr; give a shorter "
                         "--rampup or a longer --duration")
