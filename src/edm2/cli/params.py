"""Parsers of command-line values (image counts, seeds, number lists, EMA lengths) and the shared option sets.
They turn text into the library's values; the library checks what the values mean."""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Sequence

import click

from edm2.ema.power import MAX_SIGMA_REL
from edm2.guidance import parse_interval
from edm2.sampling import SOLVERS, SamplerSettings
from edm2.schedules import DISCRETIZATIONS, SCALINGS, SCHEDULES

__all__ = ["UNITS", "parse_nimg", "NIMG", "parse_budget", "BUDGET", "MAX_SEEDS", "parse_seeds", "parse_floats",
           "FLOATS", "INTS", "INTERVAL", "parse_std_list", "parse_official_std_list", "parse_std_for",
           "sampler_options"]

UNITS = {"": 1, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}


def parse_nimg(text: str) -> int:
    """'2048', '512Ki', '8Mi', '1.5Gi' -> number of images."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(Ki|Mi|Gi)?\s*", str(text))
    if not m:
        raise ValueError(f"bad image count {text!r}; use a number with optional Ki/Mi/Gi suffix, e.g. 8Mi")
    value = float(m.group(1)) * UNITS[m.group(2) or ""]
    if value != int(value):
        raise ValueError(f"image count {text!r} is not a whole number of images")
    return int(value)


class ImageCount(click.ParamType):
    """An image count with optional Ki/Mi/Gi suffix, as a click parameter type."""

    name = "IMAGES"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        try:
            return parse_nimg(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


NIMG = ImageCount()


_TIME_UNITS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600}


def parse_budget(text: str) -> float:
    """'90s', '15min', '1.5h', '1h30min', or a plain number of seconds -> seconds."""
    text = str(text).strip().lower().replace(" ", "")
    parts = re.findall(r"(\d+(?:\.\d+)?)(sec|min|hr|s|m|h)?", text)
    if not text or "".join(n + u for n, u in parts) != text or (len(parts) > 1 and not all(u for _, u in parts)):
        raise ValueError(f"bad time {text!r}; use e.g. 90s, 15min, 1.5h or 1h30min")
    seconds = sum(float(n) * _TIME_UNITS[u or "s"] for n, u in parts)
    if seconds <= 0:
        raise ValueError(f"a time budget must be positive, got {text!r}")
    return seconds


class TimeBudget(click.ParamType):
    """A time with optional s/min/h units, as a click parameter type."""

    name = "TIME"

    def convert(self, value, param, ctx):
        if isinstance(value, (int, float)):
            return float(value)
        try:
            return parse_budget(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


BUDGET = TimeBudget()


MAX_SEEDS = 10**7  # seeds of one command: more is a typo (or a job for several commands), and would not fit


def parse_seeds(text: str) -> list[int]:
    """'0-63,100,200-201' -> [0, ..., 63, 100, 200, 201]; ValueError for malformed ranges, a seed given twice,
    or more than `MAX_SEEDS` seeds (counted before any list is made)."""
    ranges: list[tuple[int, int]] = []
    for part in str(text).split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise ValueError(f"malformed seed list {text!r}; use e.g. 0-63 or 1,5,10-20")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise ValueError(f"malformed seed range {part.strip()!r}: end before start")
        ranges.append((lo, hi))
    count = sum(hi - lo + 1 for lo, hi in ranges)
    if count > MAX_SEEDS:
        raise ValueError(f"--seeds {str(text).strip()} asks for {count} images, more than {MAX_SEEDS} in one command; "
                         "split the seeds over several commands")
    ordered = sorted(ranges)
    for (_, hi_a), (lo_b, _) in zip(ordered, ordered[1:]):
        if lo_b <= hi_a:
            raise ValueError(f"seed {lo_b} is given twice in --seeds {str(text).strip()}; give each seed once")
    return [seed for lo, hi in ranges for seed in range(lo, hi + 1)]


def parse_floats(text: str, option: str) -> list[float]:
    """'0.05,0.1' -> [0.05, 0.1]."""
    try:
        values = [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{option} takes comma-separated numbers, got {text!r}") from None
    if not values:
        raise ValueError(f"{option} is empty")
    return values


class FloatList(click.ParamType):
    """Comma-separated numbers ('0.05,0.1') as a tuple of floats, as a click parameter type (`parse_floats`)."""

    name = "text"  # shown as TEXT, like a plain string option

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            return tuple(parse_floats(value, param.opts[0] if param is not None else "the list"))
        except ValueError as e:
            self.fail(str(e), param, ctx)


FLOATS = FloatList()


class IntList(click.ParamType):
    """Comma-separated integers ('1,2,2,2') as a tuple of ints, as a click parameter type."""

    name = "ints"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            values = tuple(int(v) for v in str(value).split(",") if v.strip())
        except ValueError:
            values = ()
        if not values:
            self.fail(f"takes comma-separated integers (e.g. 1,2,2,2), got {value!r}", param, ctx)
        return values


INTS = IntList()


class SigmaInterval(click.ParamType):
    """SIGMA_LO,SIGMA_HI: the band of noise levels where guidance applies (`edm2.guidance.parse_interval`)."""

    name = "SIGMA_LO,SIGMA_HI"

    def convert(self, value, param, ctx):
        if value is None or isinstance(value, tuple):
            return value
        try:
            return parse_interval(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


INTERVAL = SigmaInterval()


OFFICIAL_MAX_STD = 0.289  # the official list parser's bound on a relative standard deviation


def _fill_ellipsis(raw: list[float | None], i: int, option: str) -> list[float]:
    """The values an official '...' at `raw[i]` stands for: the step of the two numbers before it, repeated up
    to the number after it (which is not included)."""
    if i < 2 or raw[i - 2] is None or raw[i - 1] is None:
        raise ValueError(f"{option}: '...' must follow at least two numbers")
    if i + 1 >= len(raw) or raw[i + 1] is None:
        raise ValueError(f"{option}: '...' must be followed by a number")
    a, b, end = raw[i - 2], raw[i - 1], raw[i + 1]
    if a == b:
        raise ValueError(f"{option}: the two numbers before '...' must differ")
    steps = (end - b) / (b - a) - 1
    count = round(steps)
    if count <= 0:
        raise ValueError(f"{option}: '...' must stand for at least one value")
    if abs(count - steps) > 1e-4:
        raise ValueError(f"{option}: '...' must stand for evenly spaced values up to {end:g}")
    return [b + (b - a) * (j + 1) for j in range(count)]


def parse_official_std_list(text: str, option: str = "--outstd") -> list[float]:
    """The official `reconstruct_phema.py` list of relative standard deviations: comma-separated numbers where
    '...' continues the step of the two numbers before it up to the one after it ('0.010,0.015,...,0.030' ->
    0.010, 0.015, 0.020, 0.025, 0.030); the values sorted, each once, and in (0, 0.289)."""
    try:
        raw = [None if v.strip() == "..." else float(v) for v in str(text).split(",")]
    except ValueError:
        raise ValueError(f"{option} takes comma-separated numbers and '...', got {text!r}") from None
    values: list[float] = []
    for i, v in enumerate(raw):
        values.extend([v] if v is not None else _fill_ellipsis(raw, i, option))
    values = sorted(set(values))
    if not all(0 < v < OFFICIAL_MAX_STD for v in values):
        raise ValueError(f"{option}: every relative standard deviation must lie in (0, {OFFICIAL_MAX_STD})")
    return values


def parse_std_list(text: str, option: str = "--std") -> tuple[list[float], list[float]]:
    """('0.05,0.1', the inclusive range 'start:stop:step', or the official list '0.010,0.015,...,0.250') ->
    (values, dropped).

    A range is a grid over an interval: its points outside (0, 0.2887), the range of power-function EMAs,
    are returned as `dropped`. Values of a comma list are all returned (and checked when used).
    """
    if "..." in str(text):
        return parse_official_std_list(text, option), []
    text = str(text).strip()
    if ":" in text:
        parts = text.split(":")
        try:
            start, stop, step = (float(p) for p in parts)
        except ValueError:
            raise ValueError(f"{option} range must be start:stop:step with numbers, got {text!r}") from None
        if not step > 0 or stop < start:
            raise ValueError(f"{option} range {text!r} needs step > 0 and stop >= start")
        count = math.floor((stop - start) / step + 1e-9) + 1
        if count > 1000:
            raise ValueError(f"{option} range {text!r} has {count} values; use a coarser step")
        grid = [round(start + i * step, 10) for i in range(count)]
        return [s for s in grid if 0 < s < MAX_SIGMA_REL], [s for s in grid if not 0 < s < MAX_SIGMA_REL]
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{option} takes comma-separated numbers or start:stop:step, got {text!r}") from None
    if not values:
        raise ValueError(f"{option} is empty")
    return values, []


def parse_std_for(items: Sequence[str], option: str = "--std-for") -> tuple[tuple[str, float], ...]:
    """['unet.enc.*=0.05', ...] -> (('unet.enc.*', 0.05), ...), in the given order (first match wins)."""
    pairs = []
    for item in items:
        pattern, eq, value = str(item).rpartition("=")
        try:
            std = float(value)
        except ValueError:
            std = None
        if not eq or not pattern.strip() or std is None:
            raise ValueError(f"{option} takes PATTERN=SIGMA_REL (e.g. 'unet.enc.*=0.05'), got {item!r}")
        pairs.append((pattern.strip(), std))
    return tuple(pairs)


# (option names, SamplerSettings field, type, help): our spelling first, then the official one where it differs
# (EDM2's generate_images.py and EDM's generate.py write --sigma_min, --S_churn, ...).
_SAMPLER_OPTIONS = [
    (("--steps",), "num_steps", int, "Sampler steps (Heun: 2*steps-1 network evaluations).  [default: 32; 18 for "
                                     "networks of the EDM release, as their generate.py]"),
    (("--sigma-min", "--sigma_min"), "sigma_min", float, "Lowest noise level of the time steps.  [default: varies "
                                                         "with --disc, 0.002 for edm]"),
    (("--sigma-max", "--sigma_max"), "sigma_max", float, "Highest noise level (the noise the sampler starts from).  "
                                                         "[default: varies with --disc, 80 for edm]"),
    (("--rho",), "rho", float, "Time-step exponent (EDM Eq. 5)."),
    (("--solver",), "solver", click.Choice(SOLVERS), "ODE solver: heun (2nd order) or euler (1st order)."),
    (("--guidance",), "guidance", float, "Guidance weight w (needs --gnet when not 1)."),
    (("--guidance-interval",), "guidance_interval", INTERVAL, "Guide only for noise levels SIGMA_LO < sigma <= "
                                                             "SIGMA_HI, e.g. 0.28,5.42.  [default: every step]"),
    (("--S-churn", "--S_churn"), "S_churn", float, "Stochasticity (EDM Algorithm 2); 0: deterministic."),
    (("--S-min", "--S_min"), "S_min", float, "Churn only for sigma >= S_min."),
    (("--S-max", "--S_max"), "S_max", float, "... and sigma <= S_max."),
    (("--S-noise", "--S_noise"), "S_noise", float, "Churn noise scale."),
    # The EDM design space (EDM Table 1); the defaults are the EDM point (edm_sampler).
    (("--disc",), "discretization", click.Choice(DISCRETIZATIONS), "Time-step discretization (EDM Table 1)."),
    (("--schedule",), "schedule", click.Choice(SCHEDULES), "Noise schedule sigma(t)."),
    (("--scaling",), "scaling", click.Choice(SCALINGS), "Signal scaling s(t)."),
    (("--alpha",), "alpha", float, "Parameter of the 2nd-order step (1: Heun, 0.5: midpoint)."),
]


# None: resolved later, by SamplerSettings (the discretization's range) or for the network (the official steps)
_VARYING = ("num_steps", "sigma_min", "sigma_max")


def sampler_options(defaults: SamplerSettings = SamplerSettings()) -> Callable:
    """Decorator: the sampler's options, handed to the command as one `settings: SamplerSettings` argument.
    `--steps` left out gives `num_steps` None: the command resolves it for its network
    (`SamplerSettings.for_network`)."""

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            values = {field: kwargs.pop(field) for _, field, _, _ in _SAMPLER_OPTIONS}
            return fn(*args, settings=SamplerSettings(**values), **kwargs)

        for names, field, kind, help in reversed(_SAMPLER_OPTIONS):
            default = None if field in _VARYING else getattr(defaults, field)
            wrapper = click.option(*names, field, type=kind, default=default, show_default=default is not None,
                                   help=help)(wrapper)
        return wrapper

    return decorate
