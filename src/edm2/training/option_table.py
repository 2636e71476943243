"""What a user asks of a training run (`TrainOptions`), declared once: each field carries its command-line option
(`Option`, in the field's metadata), so the library owns the names, defaults, help texts and the official
spellings, and `edm2 train` (edm2.cli.train) builds its options from them."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field
from typing import Any

from edm2.ema.power import MAX_SIGMA_REL
from edm2.networks import PRECISIONS
from edm2.presets import EDM_ARCHS, EDM_PRECONDS, SNAPSHOT_DTYPES, Preset
from edm2.training import recipes
from edm2.training.ladder import CONFIGS

__all__ = ["Option", "option_fields", "TrainOptions", "SCHEDULE_RULES", "RANGES", "check_value", "check_options"]

SCHEDULE_RULES = ("follow", "preset")  # --schedule: the schedule follows the run's duration, or stays the preset's


@dataclass(frozen=True)
class Option:
    """How a `TrainOptions` field is given on the command line.

    `kind` is a plain type (str, int, float; bool: a flag), a tuple of choices, or a marker that edm2.cli turns
    into its parameter type: 'nimg' (an image count such as 2Mi), 'budget' (a time such as 15min), 'floats'
    (comma-separated numbers, a tuple), 'ints' (comma-separated integers, a tuple), 'dir' / 'file' (a path),
    'count' (an integer >= 0).
    `flag` is the spelling when it is not `--` and the field name with dashes (e.g. '--cond/--uncond').
    `aliases`: the official code's other spellings of the same option (e.g. '--P_mean'), taking the same value;
    a flag's spellings also take the official BOOL value (`--cond=0`).
    `mutable`: RunConfig stores the value under the same name and a resumed run may change it (RunConfig.MUTABLE)."""

    help: str
    kind: type | str | tuple[str, ...] = str
    flag: str | None = None
    mutable: bool = False
    aliases: tuple[str, ...] = ()

    def spelling(self, name: str) -> str:
        """The option as typed, for the field `name`."""
        return self.flag or "--" + name.replace("_", "-")


def _option(default: Any, help: str, kind: type | str | tuple[str, ...] = str, flag: str | None = None,
            mutable: bool = False, aliases: tuple[str, ...] = ()) -> Any:
    """A `TrainOptions` field with its command-line `Option`; `default` MISSING: a required option."""
    return field(default=default, metadata={"option": Option(help, kind, flag, mutable, aliases)})


_PRESET = "[default: preset]"
_SCHEDULE = "[default: preset, or {} % of the duration when the schedule follows the run (--schedule)]"


@dataclass
class TrainOptions:
    """What the user asks for; None means 'take it from the preset'. Image counts are in images; `preset` may
    also be a Preset (from Python)."""

    outdir: str = _option(MISSING, "Run folder (resumes if it exists).", "dir")
    data: str = _option("digits", "Folder or .zip of images or latents (`edm2 dataset`), .npz, or 'digits'.")
    preset: str | Preset | None = _option(None, "Network and recipe (see `edm2 info`), or 'auto': chosen for the data "
                                                "and the hardware.  [default: cpu-digits8 for the digits, auto for "
                                                "other data]")
    config: str | None = _option(None, "EDM2 Table 1 ablation configuration of the preset (A: EDM's baseline ... G: "
                                       "EDM2; docs/ablation.md).  [default: G, the preset itself]", CONFIGS)
    transfer: str | None = _option(None, "Fine-tune: start from this network's weights (a snapshot, an official .pkl, "
                                         "a URL, or a published model such as edm2-img512-xs-fid). Its network is "
                                         "trained (with --preset or network options: they must build the same).")
    arch: str | None = _option(None, "EDM (2022) train.py's network, instead of --preset: its defaults (the CIFAR-10 "
                                     "recipe) with this architecture.  [default: ddpmpp with --precond]",
                               tuple(EDM_ARCHS))
    precond: str | None = _option(None, "EDM (2022) train.py's preconditioning and loss, instead of --preset.  "
                                        "[default: edm with --arch]", tuple(EDM_PRECONDS))
    cond: bool = _option(True, "Class-conditional training.", bool, flag="--cond/--uncond")
    duration: int | None = _option(None, f"Training length in images (e.g. 2Mi).  {_PRESET}", "nimg", mutable=True)
    budget: float | None = _option(None, "Train for this long instead (e.g. 15min, 2h): the duration is planned from "
                                         "the throughput of the first steps.", "budget", mutable=True)  # seconds
    budget_clock: str = _option("wall", "What --budget counts: elapsed time or this process's CPU time.",
                                tuple(recipes.CLOCKS))
    schedule: str | None = _option(None, "Decay start, warm-up and intervals under a --duration other than the "
                                         "preset's: follow (the official proportions of the run) or preset (the "
                                         "preset's published values, as the official code).  [default: preset for "
                                         "the official edm2-img*/edm-* presets; follow for cpu-*, --preset auto and "
                                         "--budget]", SCHEDULE_RULES)
    rampup: int | None = _option(None, f"Learning-rate warm-up in images.  {_SCHEDULE.format(0.466)}", "nimg")
    batch: int | None = _option(None, f"Total batch size (e.g. 2048 or 2Ki).  {_PRESET}", "nimg")
    batch_gpu: int | None = _option(None, "Micro-batch per process; smaller than the batch accumulates gradients.",
                                    "nimg", mutable=True)
    channels: int | None = _option(None, f"Channel multiplier of the network (model_channels).  {_PRESET}", int,
                                   aliases=("--cbase",))
    channel_mult: tuple[int, ...] | None = _option(None, f"Channels per resolution, comma-separated (e.g. 1,2,2,2).  "
                                                         f"{_PRESET}", "ints", aliases=("--cres",))
    lr: float | None = _option(None, f"Reference learning rate alpha_ref.  {_PRESET}", float)
    decay: float | None = _option(None, "Learning-rate decay start t_ref, in batches; 0: no decay.  "
                                        + _SCHEDULE.format(6.68), float)
    dropout: float | None = _option(None, f"Dropout probability.  {_PRESET}", float)
    P_mean: float | None = _option(None, f"Mean of ln(sigma) during training.  {_PRESET}", float,
                                   aliases=("--P_mean",))
    P_std: float | None = _option(None, f"Std of ln(sigma) during training.  {_PRESET}", float, aliases=("--P_std",))
    status: int | None = _option(None, f"Status interval in images.  {_PRESET}", "nimg", mutable=True)
    snapshot: int | None = _option(None, f"EMA snapshot interval in images.  {_PRESET}", "nimg", mutable=True)
    checkpoint: int | None = _option(None, f"Checkpoint interval in images.  {_PRESET}", "nimg", mutable=True)
    ema_stds: tuple[float, ...] | None = _option(None, "Comma-separated sigma_rel of the tracked EMAs.  [default: "
                                                       "0.05,0.10; edm-* presets: none]", "floats")
    snapshot_dtype: str | None = _option(None, "What the EMA snapshot files hold (the averages stay float32).  "
                                               "[default: float16 for the edm2-img* presets, as the official code; "
                                               "else float32]", SNAPSHOT_DTYPES)
    seed: int = _option(0, "Random seed.", int)
    device: str = _option("auto", "cpu, cuda, or auto.")
    precision: str | None = _option(None, "U-Net precision: fp32, bf16 (autocast, also on CPU) or fp16 (CUDA).  "
                                          "[default: fp16 on CUDA for networks with use_fp16, else fp32]",
                                    tuple(PRECISIONS), mutable=True)
    fp16: bool | None = _option(None, f"The network's use_fp16 (the official --fp16): float16 on CUDA unless "
                                      f"--precision says otherwise.  {_PRESET}", bool, flag="--fp16/--no-fp16")
    ls: float | None = _option(None, "Loss scaling: a constant factor on the loss, as the official code (non-finite "
                                     "gradients are replaced and every step is taken).  [default: preset: 1; "
                                     "edm-imagenet64-adm: 100]", float)
    dynamic_ls: bool = _option(False, "fp16: dynamic loss scaling instead (torch.amp.GradScaler, starting at 1 and "
                                      "skipping the steps whose gradients overflow).", bool)
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


# ----------------------------------------------------------------------------------------------------
# What each numeric option takes: checked (finite, in range) before a run touches its folder. Resolved values
# (from the preset or the run being resumed) go through the same checks under the same names.

_Range = tuple[Callable[[float], bool], str]
_POSITIVE_NIMG: _Range = (lambda v: v > 0, "a positive number of images (e.g. 2Ki)")
RANGES: dict[str, _Range] = {
    "duration": _POSITIVE_NIMG, "batch": _POSITIVE_NIMG, "batch_gpu": _POSITIVE_NIMG, "status": _POSITIVE_NIMG,
    "snapshot": _POSITIVE_NIMG, "checkpoint": _POSITIVE_NIMG,
    "budget": (lambda v: v > 0, "a positive time (e.g. 15min)"),
    "rampup": (lambda v: v >= 0, "0 (no warm-up) or a positive number of images"),
    "channels": (lambda v: v >= 1, "a positive number of channels"),
    "channel_mult": (lambda v: v >= 1, "positive channel multipliers (e.g. 1,2,2,2)"),
    "lr": (lambda v: v > 0, "positive (a learning rate such as 0.01)"),
    "decay": (lambda v: v >= 0, "0 (no decay) or a positive number of batches"),
    "dropout": (lambda v: 0 <= v < 1, "a probability in [0, 1)"),
    "P_mean": (lambda v: True, "a finite number"),
    "P_std": (lambda v: v > 0, "positive (a standard deviation of ln(sigma))"),
    "ema_stds": (lambda v: 0 < v < MAX_SIGMA_REL, f"EMA lengths in (0, {MAX_SIGMA_REL:.4f}) (e.g. 0.05,0.10)"),
    "seed": (lambda v: 0 <= v < 2**63, "a whole number in [0, 2^63)"),
    "ls": (lambda v: v > 0, "a positive loss scale"),
    "augment": (lambda v: 0 <= v <= 1, "a probability in [0, 1]"),
    "ema": (lambda v: v >= 0, "a half-life in Mimg, 0 or more"),
    "max_size": (lambda v: v >= 1, "a positive number of items"),
    "workers": (lambda v: v >= 0, "0 or more processes"),
}


def check_value(name: str, value: Any) -> None:
    """ValueError, one line naming the option and what it takes, when `value` (a number, or for the list options
    a sequence of numbers) is not finite, not whole for an option of whole numbers, or outside what the option
    `name` (a `TrainOptions` field) takes."""
    good, takes = RANGES[name]
    kind = {f.name: f.metadata["option"].kind for f in option_fields()}[name]
    whole = kind in (int, "nimg", "ints", "count")
    values = list(value) if isinstance(value, (tuple, list)) else [value]
    for v in values:
        number = isinstance(v, (int, float)) and not isinstance(v, bool)
        if not (number and math.isfinite(v) and (not whole or v == int(v)) and good(v)):
            shown = ",".join(map(str, values)) if isinstance(value, (tuple, list)) else str(value)
            raise ValueError(f"{Option('').spelling(name)} must be {takes}, got {shown}")


def check_options(opts: TrainOptions) -> None:
    """Check every numeric option the user gave (`RANGES`); ValueError naming the first one out of range."""
    for f in option_fields():
        value = getattr(opts, f.name)
        if value is not None and f.name in RANGES:
            check_value(f.name, value)
