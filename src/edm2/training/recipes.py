"""Recipes that follow the run: the schedule derived from the duration in the official proportions, the
`--preset auto` table, and the planning of a time budget. Every value a run uses is recorded with where it came
from (its provenance): `preset`, `user`, `derived` (from the duration), `budget` (planned from the measured
throughput), `auto` (the table) or `resumed` (kept from the run being resumed).

The official proportions are those of the EDM2 reference runs (ImageNet-512 XS/S/M: 2048 Mi images in batches of
2048, decay start t_ref = 70000 batches, warm-up over 10 million images):

- decay start:  t_ref x batch = 70000 x 2048 / 2048 Mi = 6.68 % of the duration;
- warm-up:      10^7 / 2048 Mi = 0.466 % of the duration.

The ImageNet-64 presets agree on the decay (35000 batches of 2048 over 1024 Mi images is the same 6.68 %).

Which runs follow their duration (`schedule_rule`): those of the CPU presets, of `--preset auto` and of a
`--budget`, and any run asked to with `--schedule follow`. The official presets (`edm2-img*`, `edm-*`) keep their
published schedule whatever the duration, as the official code does, unless asked otherwise.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from edm2.presets import PRESETS, Preset

__all__ = ["DECAY_FRACTION", "RAMPUP_FRACTION", "SNAPSHOTS_PER_RUN", "STATUS_PER_RUN", "CHECKPOINTS_PER_RUN",
           "SOURCES", "Setting", "derive_schedule", "resolve_schedule", "schedule_rule", "AutoRow", "AUTO_TABLE",
           "choose_preset", "RunCosts", "BudgetPlan", "CLOCKS", "budget_clock", "plan_duration", "describe"]

Ki, Mi = 1 << 10, 1 << 20

REFERENCE_DURATION = 2048 * Mi
DECAY_FRACTION = 70000 * 2048 / REFERENCE_DURATION  # 0.0668
RAMPUP_FRACTION = 10_000_000 / REFERENCE_DURATION  # 0.00466
SNAPSHOTS_PER_RUN = 32  # post-hoc EMA: profile error < 1e-4 for sigma_rel 0.05..0.20 (docs/posthoc_ema.md)
STATUS_PER_RUN = 64
CHECKPOINTS_PER_RUN = 8
EMA_STDS = (0.05, 0.10)  # the official lengths; SNAPSHOTS_PER_RUN snapshots reconstruct 0.03..0.28 from them
SOURCES = ("preset", "user", "derived", "budget", "auto", "resumed")


@dataclass(frozen=True)
class Setting:
    """One value of a run and where it came from."""

    value: object
    source: str  # one of SOURCES
    rule: str = ""  # how it was derived or chosen, for the user to read

    def to_dict(self) -> dict:
        value = list(self.value) if isinstance(self.value, tuple) else self.value
        return {"value": value, "source": self.source, **({"rule": self.rule} if self.rule else {})}


# ----------------------------------------------------------------------------------------------------
# The schedule.


def _multiple(nimg: float, batch: int) -> int:
    """`nimg` rounded down to a multiple of the batch, at least one batch."""
    return max(batch, int(nimg // batch) * batch)


def derive_schedule(duration: int, batch: int, caps: Mapping[str, int] | None = None) -> dict[str, Setting]:
    """The schedule of a run of `duration` images in batches of `batch`, in the official proportions: decay start
    (t_ref, batches), warm-up (`rampup`, images), tracked EMA lengths and the status, snapshot and checkpoint
    intervals (images, multiples of the batch). `caps` bounds the status and checkpoint intervals (the preset's:
    a long run still reports and checkpoints as often as its preset)."""
    if duration <= 0 or batch <= 0:
        raise ValueError(f"duration and batch must be positive, got {duration} and {batch}")
    caps = caps or {}
    cap = {k: min(caps.get(k, duration), duration / n) for k, n in (("status", STATUS_PER_RUN),
                                                                     ("checkpoint", CHECKPOINTS_PER_RUN))}
    return {
        "decay": Setting(float(f"{DECAY_FRACTION * duration / batch:.6g}"), "derived",
                         f"{100 * DECAY_FRACTION:.2f} % of the duration, in batches (official proportion)"),
        "rampup": Setting(round(RAMPUP_FRACTION * duration), "derived",
                          f"{100 * RAMPUP_FRACTION:.3f} % of the duration (official proportion)"),
        "ema_stds": Setting(EMA_STDS, "derived", f"the official lengths, reconstructed post hoc from "
                            f"{SNAPSHOTS_PER_RUN} snapshots"),
        "status": Setting(_multiple(cap["status"], batch), "derived",
                          f"duration / {STATUS_PER_RUN}" + (", at most the preset's" if caps else "")),
        "snapshot": Setting(_multiple(duration / SNAPSHOTS_PER_RUN, batch), "derived",
                            f"duration / {SNAPSHOTS_PER_RUN}"),
        "checkpoint": Setting(_multiple(cap["checkpoint"], batch), "derived",
                              f"duration / {CHECKPOINTS_PER_RUN}" + (", at most the preset's" if caps else "")),
    }


def schedule_rule(requested: str | None, official: bool, budget: bool, auto: bool) -> Setting:
    """Whether the schedule follows the run's duration ('follow') or stays the preset's ('preset'): the user's
    `--schedule` when `requested`; else 'follow' for a `budget` run or an `auto` preset, 'preset' for an
    `official` preset (as the official code), 'follow' for the others."""
    if requested is not None:
        if requested not in ("follow", "preset"):
            raise ValueError(f"--schedule is follow or preset, got {requested!r}")
        return Setting(requested, "user")
    if budget:
        return Setting("follow", "budget", "a --budget run's schedule follows its planned duration")
    if auto:
        return Setting("follow", "auto", "the schedule of --preset auto follows the run's duration")
    if official:
        return Setting("preset", "preset", "an official preset keeps its published schedule whatever the "
                       "duration, as the official code")
    return Setting("follow", "preset", "the schedule follows the run's duration in the official proportions")


def resolve_schedule(preset_values: Mapping[str, object], preset_duration: int, duration: Setting, batch: int,
                     user: Mapping[str, object | None], previous: Mapping[str, Mapping] | None = None,
                     follow: bool = True) -> dict[str, Setting]:
    """Each schedule knob (`decay`, `rampup`, `ema_stds`, `status`, `snapshot`, `checkpoint`): the user's value
    when given; else, when a run is resumed, the value it derived; else, when the schedule may `follow` the run,
    derived from `duration` when that is not the preset's own (set by the user or planned from a budget), but for a
    preset without decay (0), which keeps none; else the preset's value."""
    scaled = follow and duration.source != "preset" and duration.value != preset_duration
    caps = {k: int(preset_values[k]) for k in ("status", "checkpoint") if k in preset_values}
    derived = derive_schedule(int(duration.value), batch, caps) if scaled else {}
    out = {}
    for name, preset_value in preset_values.items():
        old = (previous or {}).get(name)
        if user.get(name) is not None:
            out[name] = Setting(user[name], "user")
        elif old is not None and old.get("source") in ("derived", "resumed"):
            value = old["value"]
            out[name] = Setting(tuple(value) if isinstance(value, list) else value, "resumed",
                                "kept from the run being resumed")
        elif name in derived and not (name == "decay" and preset_value == 0):  # no decay stays none
            out[name] = derived[name]
        else:
            out[name] = Setting(preset_value, "preset")
    return out


# ----------------------------------------------------------------------------------------------------
# `--preset auto`.


@dataclass(frozen=True)
class AutoRow:
    """A row of the `--preset auto` table: data of `channels` with a resolution in [min_res, max_res] on `hardware`
    ('cpu', 'cuda' or 'any') trains `preset`'s network shape (resolution and attention adapted) and recipe."""

    hardware: str
    channels: tuple[int, ...]
    min_res: int
    max_res: int
    preset: Preset

    def levels(self) -> int:
        return len(self.preset.network.channel_mult)

    def fits(self, resolution: int, channels: int, hardware: str) -> bool:
        """Whether data of this shape fits the row: every level but the last halves an even resolution."""
        return (self.hardware in ("any", hardware) and channels in self.channels
                and self.min_res <= resolution <= self.max_res and resolution % (1 << (self.levels() - 1)) == 0)


AUTO_TABLE: tuple[AutoRow, ...] = (
    AutoRow("cuda", (3,), 64, 64, PRESETS["edm2-img64-xs"]),
    AutoRow("cuda", (4,), 64, 64, PRESETS["edm2-img512-xs"]),
    AutoRow("any", (1, 3), 8, 15, PRESETS["cpu-digits8"]),
    AutoRow("any", (1, 3), 16, 31, PRESETS["cpu-gray28"]),
    AutoRow("any", (1,), 32, 63, PRESETS["cpu-gray32"]),
    AutoRow("any", (3,), 32, 63, PRESETS["cpu-rgb32"]),
    AutoRow("any", (1, 3), 64, 128, PRESETS["cpu-rgb64"]),
    AutoRow("any", (4,), 16, 16, PRESETS["cpu-latent16"]),  # 4 channels: VAE latents
)
SMALL_DATASET = 5000  # images; below this, dropout 0.10 (many epochs even in short runs)


def choose_preset(resolution: int, channels: int, num_images: int, hardware: str) -> tuple[Preset, str]:
    """The preset `--preset auto` trains for data of this shape on this hardware ('cpu' or 'cuda'), with its
    network adapted to the data (resolution, attention at the lowest resolution, dropout for small datasets),
    and the reason, one line. ValueError when no row of `AUTO_TABLE` fits."""
    hardware = "cuda" if hardware == "cuda" else "cpu"
    row = next((r for r in AUTO_TABLE if r.fits(resolution, channels, hardware)), None)
    if row is None:
        raise ValueError(f"--preset auto has no network for {resolution}x{resolution}x{channels} data on {hardware} "
                         "(the table takes 1 or 3 channels at 8..128 pixels, divisible by 2 per level, and 16x16x4 "
                         "latents (64x64x4 on CUDA); see docs/recipes.md); resize the images or choose a --preset")
    net = row.preset.network
    if (resolution, channels) != (net.img_resolution, net.img_channels):
        lowest = resolution >> (row.levels() - 1)
        net = net.replace(img_resolution=resolution, img_channels=channels,
                          attn_resolutions=(lowest,) if net.attn_resolutions else ())
    note = ""
    if num_images < SMALL_DATASET and net.dropout == 0:
        net = net.replace(dropout=0.10)
        note = f", dropout 0.10 (fewer than {SMALL_DATASET} images)"
    reason = f"{resolution}x{resolution}x{channels}, {num_images} images, {hardware}: {row.preset.name}{note}"
    return dataclasses.replace(row.preset, network=net), reason


# ----------------------------------------------------------------------------------------------------
# Time budgets.

CLOCKS: dict[str, Callable[[], float]] = {"wall": time.monotonic, "cpu": time.process_time}


def budget_clock(name: str) -> Callable[[], float]:
    """The clock a budget is measured on: 'wall' (elapsed time) or 'cpu' (this process's CPU time, all threads)."""
    if name not in CLOCKS:
        raise ValueError(f"unknown budget clock {name!r}; use wall or cpu")
    return CLOCKS[name]


@dataclass(frozen=True)
class RunCosts:
    """What the time of a run goes to, measured on the budget's clock on a throw-away copy of it: seconds per
    image of training steps (EMA updates included), the first step, building the run (network, optimizer, data),
    one snapshot (every tracked EMA) and one checkpoint."""

    seconds_per_image: float
    first_step: float
    setup: float = 0.0
    snapshot: float = 0.0
    checkpoint: float = 0.0

    def overhead(self, snapshots: int, checkpoints: int) -> float:
        """Seconds spent outside the steps by a run that writes `snapshots` and `checkpoints` times."""
        return self.setup + snapshots * self.snapshot + checkpoints * self.checkpoint


@dataclass(frozen=True)
class BudgetPlan:
    """A time budget turned into a duration: the throughput measured in the first steps, the time spent before
    training, the time the run's setup and writes will take, and the number of images that fit in what is left
    (less a reserve)."""

    seconds: float
    clock: str
    seconds_per_image: float
    elapsed: float  # budget time used before the first real step (loading, calibration)
    duration: int
    overhead: float = 0.0  # budget time set aside for building the run and writing snapshots and checkpoints

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> BudgetPlan:
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


BUDGET_RESERVE = 0.05  # fraction of the budget kept for logging and the noise of the measurement


def plan_duration(seconds: float, clock: str, elapsed: float, costs: RunCosts, batch: int,
                  writes: Callable[[int], tuple[int, int]] = lambda duration: (0, 0)) -> BudgetPlan:
    """The most images (whole batches) whose steps, setup and writes (`costs`; `writes(duration)` gives the
    number of snapshots and checkpoints a run of that duration makes) fit in the `seconds` left after `elapsed`,
    less a reserve. ValueError when not one step fits."""
    usable = (seconds - elapsed) * (1 - BUDGET_RESERVE)
    step = costs.seconds_per_image * batch

    def overhead(steps: int) -> float:
        return costs.overhead(*writes(steps * batch))

    low, high = 0, max(0, math.floor((usable - costs.setup) / step))  # the writes only take steps away
    while low < high:  # the most steps that fit: what fits grows with the steps, the writes hardly change
        mid = (low + high + 1) // 2
        low, high = (mid, high) if mid * step + overhead(mid) <= usable else (low, mid - 1)
    if low < 1:
        raise ValueError(f"--budget {seconds:g}s is too short: one training step of {batch} images takes "
                         f"{max(costs.first_step, step):.2g} s on this machine ({elapsed:.2g} s went to loading and "
                         f"measuring, {overhead(1):.2g} s would go to setup and writes); give a longer --budget or "
                         "a smaller --batch")
    return BudgetPlan(float(seconds), clock, float(costs.seconds_per_image), float(elapsed), low * batch,
                      float(overhead(low)))


def describe(provenance: Mapping[str, Mapping]) -> list[str]:
    """The lines training prints: the preset, then each value neither the preset nor the user gave, as
    `name value (source: rule)`, and a note when the warm-up is longer than the run."""
    lines = []
    rampup, duration = provenance.get("rampup", {}), provenance.get("duration", {})
    if rampup.get("value", 0) > duration.get("value", float("inf")):
        lines.append(f"note: the warm-up ({rampup['value']} images) is longer than the run ({duration['value']} "
                     "images): the learning rate never reaches lr")
    for name, s in provenance.items():
        if s["source"] in ("preset", "user") and name != "preset":
            continue
        rule = f": {s['rule']}" if s.get("rule") else ""
        lines.append(f"{name} {s['value']} ({s['source']}{rule})")
    return lines
