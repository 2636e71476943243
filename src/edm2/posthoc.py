"""Post-hoc EMA (EDM2 Section 3) as a general tool: track power-function EMAs in any PyTorch training loop,
save them as snapshots, and synthesize other EMA lengths from the snapshots after training.

- `PosthocEMA` wraps a model (plain, DistributedDataParallel or compiled), averages its parameters with
  power-function profiles and writes one snapshot per tracked sigma_rel at chosen intervals (rank 0 only).
- `posthoc_reconstruct` combines the snapshots of a folder into new averages: any sigma_rel, any time up
  to the last snapshot, optionally a different sigma_rel for tensors matched by name patterns. It reads
  one snapshot at a time, so memory holds one model per requested output plus the one being read.
- `ema_sweep` reconstructs a list of lengths, scores each with a metric callable, and writes a table and
  a plot of the metric against the EMA length.

Time is an integer that only has to grow: images (as our trainer counts) or optimizer steps. The profiles
depend only on ratios of times, so both give the same averages.

A folder of snapshots is valid input when (1) every file comes from the same network, (2) every snapshot
time holds exactly one file per tracked sigma_rel, and (3) no snapshot is missing: a gap between two
consecutive snapshot times (the first one counted from time 0) may not exceed 1.5 times every gap next
to it, since a regular series with one snapshot removed has a gap twice its neighbours. Thinned series
(every other snapshot) and a changed interval stay valid; `allow_gaps=True` accepts irregular series.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from edm2.checkpoint import Snapshot, atomic_write_text, load_tensors, read_metadata, save_snapshot
from edm2.distributed import world_info
from edm2.ema import PowerFunctionEMA, exp_to_std, power_function_correlation, solve_posthoc_coefficients
from edm2.presets import NetworkConfig

__all__ = [
    "DEFAULT_MAX_ERROR", "GAP_RATIO", "MAX_SIGMA_REL", "PosthocEMA", "SnapshotInfo", "EMATarget",
    "ReconstructionResult", "SweepResult", "snapshot_filename", "posthoc_name",
    "scan_snapshots", "profile_error", "posthoc_reconstruct", "reconstruction_errors", "parse_std_list",
    "parse_std_for", "ema_sweep", "plot_sweep",
]

DEFAULT_MAX_ERROR = 0.1  # largest accepted relative squared L2 error of a reconstructed weighting profile
GAP_RATIO = 1.5  # a gap longer than this times each neighbouring gap means a snapshot is missing
MAX_SIGMA_REL = float(exp_to_std(0.0))  # 0.2887: the uniform average, the longest power-function EMA


# ----------------------------------------------------------------------------------------------------
# Files.


def snapshot_filename(t: int, sigma_rel: float) -> str:
    """Name of the snapshot of the EMA `sigma_rel` at time `t` (the trainer's naming)."""
    return f"snapshot-{int(t):010d}-{sigma_rel:.3f}.safetensors"


def posthoc_name(nimg: int, sigma_rel: float, tag: str = "") -> str:
    """Name of a reconstructed snapshot; `tag` distinguishes reconstructions with per-tensor lengths."""
    return f"posthoc-{int(nimg):010d}-{sigma_rel:.3f}{'-' + tag if tag else ''}.safetensors"


# ----------------------------------------------------------------------------------------------------
# Tracking in any training loop.


class PosthocEMA:
    """Power-function EMAs of a model, saved as snapshots for post-hoc reconstruction.

    Call `update(t)` after an optimizer step, or every few steps: `t` is the current time (images or steps
    seen so far) and the update covers everything since the previous one, so that updating every k steps
    gives the power-function average of the parameters sampled at the update times. Averages start from
    the parameters at construction (time 0). Every `snapshot_every` time units, the first update past each
    multiple writes one snapshot per sigma_rel into `outdir` (`snapshot-<t>-<sigma_rel>.safetensors`); only
    rank 0 of a distributed job writes. `network` (edm2 models) makes the snapshots usable by
    `edm2 generate`; `info` is stored in their metadata. Averages are kept in the parameters' dtype.
    """

    def __init__(self, model: torch.nn.Module, outdir: str | Path, stds: Sequence[float] = (0.05, 0.10),
                 snapshot_every: int | None = None, network: NetworkConfig | None = None,
                 info: Mapping | None = None, rank: int | None = None) -> None:
        stds = [float(s) for s in stds]
        bad = [s for s in stds if not 0 < s < MAX_SIGMA_REL]
        if not stds or bad:
            raise ValueError(f"stds {bad or stds} must be non-empty values in (0, {MAX_SIGMA_REL:.4f})")
        names = [snapshot_filename(0, s) for s in stds]
        if len(set(names)) != len(names):
            raise ValueError(f"stds {stds} coincide at 3 decimals, so their snapshot files would collide")
        if snapshot_every is not None and int(snapshot_every) <= 0:
            raise ValueError(f"snapshot_every must be a positive time interval, got {snapshot_every}")
        try:
            json.dumps(dict(info or {}))
        except TypeError as e:
            raise ValueError(f"info must be JSON-serializable: {e}") from None
        self.ema = PowerFunctionEMA(model, stds)
        self.outdir = Path(outdir)
        self.stds = tuple(stds)
        self.snapshot_every = None if snapshot_every is None else int(snapshot_every)
        self.network = network
        self.info = dict(info or {})
        self.rank = world_info()[0] if rank is None else int(rank)
        self.t = 0  # time of the last update

    @property
    def writes(self) -> bool:
        """Whether this process writes snapshots (rank 0)."""
        return self.rank == 0

    def update(self, t: int, dt: int | None = None) -> list[Path]:
        """Advance the averages to time `t`; `dt` (default: `t` minus the previous update's time) is the
        span this update stands for. Returns the snapshot files written (none between intervals and on
        ranks other than 0)."""
        t = int(t)
        if t <= self.t:
            raise ValueError(f"update time {t} is not after the previous update at {self.t}; times must grow")
        dt = t - self.t if dt is None else int(dt)
        if not 0 < dt <= t:
            raise ValueError(f"update span dt={dt} must lie in (0, t={t}]")
        self.ema.update(t, dt)
        previous, self.t = self.t, t
        if self.snapshot_every is not None and t // self.snapshot_every > previous // self.snapshot_every:
            return self.save_snapshots()
        return []

    def state_dicts(self) -> list[tuple[float, dict[str, torch.Tensor]]]:
        """(sigma_rel, state dict) per average: averaged parameters plus the module's live buffers."""
        return self.ema.state_dicts()

    def save_snapshots(self) -> list[Path]:
        """Write one snapshot per sigma_rel at the current time now (rank 0; other ranks write nothing)."""
        if self.t == 0:
            raise ValueError("nothing averaged yet: call update() before saving snapshots")
        if not self.writes:
            return []
        self.outdir.mkdir(parents=True, exist_ok=True)
        paths = []
        for std, state in self.state_dicts():
            path = self.outdir / snapshot_filename(self.t, std)
            save_snapshot(path, Snapshot(state, self.network, std, self.t, self.info, tuple(self.ema.names)))
            paths.append(path)
        return paths

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Averages and time, for resuming (keys `time` and `<sigma_rel index>/<parameter name>`)."""
        return {**self.ema.state_dict(), "time": torch.tensor(self.t, dtype=torch.int64)}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore what `state_dict` returned."""
        expected = set(self.ema.state_dict()) | {"time"}
        if set(state) != expected:
            diff = sorted(set(state) ^ expected)
            raise ValueError(f"EMA state does not match this model and stds (differs in {diff[:3]})")
        self.ema.load_state_dict({k: v for k, v in state.items() if k != "time"})
        self.t = int(state["time"])


# ----------------------------------------------------------------------------------------------------
# Reading a folder of snapshots.


@dataclass(frozen=True)
class SnapshotInfo:
    """Header of one snapshot file."""

    path: Path
    nimg: int  # time of the snapshot (images, or whatever unit the writer counted)
    sigma_rel: float
    network: dict | None  # edm2 network config; None for models edm2 cannot rebuild
    parameter_names: tuple[str, ...]
    averaged_names: tuple[str, ...] | None  # None: not recorded (our trainer); derived from the network


def _signature(info: SnapshotInfo) -> str:
    return json.dumps([info.network, info.parameter_names], sort_keys=True)


def scan_snapshots(source: str | Path, stds: Sequence[float] | None = None,
                   allow_gaps: bool = False) -> list[SnapshotInfo]:
    """The EMA snapshots in a run folder or a folder of snapshots (headers only), sorted by (time, sigma_rel).

    `stds` keeps only the snapshots of those tracked sigma_rels (e.g. one, to reconstruct from a single
    average per snapshot). Checkpoints, raw weights and earlier reconstructions are skipped. ValueError
    when there are none, when files come from different networks, when a (time, sigma_rel) appears twice,
    when a time lacks one of the tracked sigma_rels, or (unless `allow_gaps`) when a snapshot is missing
    from the series (see the module docstring).
    """
    source = Path(source)
    if not source.is_dir():
        raise ValueError(f"{source}: not a folder; pass a training run folder or a folder of snapshots")
    infos = []
    for path in sorted(source.glob("*.safetensors")):
        meta = read_metadata(path)
        if meta.get("kind") != "snapshot" or meta.get("sigma_rel") is None \
                or (meta.get("info") or {}).get("reconstructed"):
            continue
        averaged = meta.get("averaged_names")
        if not isinstance(meta.get("nimg"), int) or meta["nimg"] <= 0 or not meta.get("parameter_names"):
            raise ValueError(f"{path}: snapshot metadata lacks a valid time (nimg) or parameter_names")
        infos.append(SnapshotInfo(path, int(meta["nimg"]), float(meta["sigma_rel"]), meta.get("network"),
                                  tuple(meta.get("parameter_names") or ()),
                                  None if averaged is None else tuple(averaged)))
    if not infos:
        raise ValueError(f"{source}: holds no EMA snapshots (snapshot-*.safetensors written during training)")
    if stds is not None:
        present = sorted({round(i.sigma_rel, 6) for i in infos})
        wanted = {round(float(s), 6) for s in stds}
        absent = sorted(wanted - set(present))
        if absent:
            raise ValueError(f"{source}: has no snapshots with sigma_rel {absent}; it holds {present}")
        infos = [i for i in infos if round(i.sigma_rel, 6) in wanted]

    by_signature: dict[str, SnapshotInfo] = {}
    for info in infos:
        by_signature.setdefault(_signature(info), info)
    if len(by_signature) > 1:
        a, b = list(by_signature.values())[:2]
        what = "network configs" if a.network != b.network else "parameter names"
        raise ValueError(f"snapshots from different networks in one folder ({what} differ): {a.path.name} and "
                         f"{b.path.name}; keep one run's snapshots per folder")

    files: dict[tuple[int, float], Path] = {}
    for info in infos:
        key = (info.nimg, round(info.sigma_rel, 6))
        if key in files:
            raise ValueError(f"duplicate snapshot time {info.nimg} with sigma_rel {info.sigma_rel}: "
                             f"{files[key].name} and {info.path.name}; remove one")
        files[key] = info.path
    tracked = sorted({s for _, s in files})
    times = sorted({t for t, _ in files})
    for t in times:
        lacking = [s for s in tracked if (t, s) not in files]
        if lacking:
            have = [files[(t, s)].name for s in tracked if (t, s) in files]
            raise ValueError(f"snapshot time {t} lacks sigma_rel {lacking} (it has only {', '.join(have)}) while "
                             f"the folder tracks {tracked}; every time needs one file per tracked EMA")
    if not allow_gaps:
        _check_gaps(times, {t: files[(t, tracked[0])] for t in times})
    return sorted(infos, key=lambda i: (i.nimg, i.sigma_rel))


def _check_gaps(times: list[int], file_at: Mapping[int, Path]) -> None:
    gaps = np.diff([0, *times])
    for k, gap in enumerate(gaps):
        neighbours = [gaps[j] for j in (k - 1, k + 1) if 0 <= j < len(gaps)]
        if neighbours and all(gap > GAP_RATIO * n for n in neighbours):
            start = "time 0" if k == 0 else f"{times[k - 1]} ({file_at[times[k - 1]].name})"
            raise ValueError(f"snapshots missing between {start} and {times[k]} ({file_at[times[k]].name}): gap "
                             f"{gap} is over {GAP_RATIO}x the neighbouring gaps {[int(n) for n in neighbours]}; "
                             "restore the missing files or allow irregular gaps (--allow-gaps)")


def _averaged_names(info: SnapshotInfo, names: Sequence[str]) -> set[str]:
    """Tensors of the snapshot that are EMAs: as recorded in its header, else every tensor."""
    return set(names if info.averaged_names is None else info.averaged_names)


# ----------------------------------------------------------------------------------------------------
# Reconstruction.


def profile_error(in_nimg: np.ndarray, in_std: np.ndarray, coefs: np.ndarray, out_nimg: float,
                  out_std: float) -> float:
    """Relative squared L2 error ||sum_i c_i p_i - p||^2 / ||p||^2 of the weighting profile combined from the
    stored profiles p_i (times `in_nimg`, lengths `in_std`) with `coefs`, against the target profile p."""
    in_nimg, in_std = np.float64(in_nimg), np.float64(in_std)
    a = power_function_correlation(in_nimg[:, None], in_std[:, None], in_nimg[None, :], in_std[None, :])
    b = power_function_correlation(in_nimg, in_std, out_nimg, out_std)
    c = float(power_function_correlation(out_nimg, out_std, out_nimg, out_std))
    return float(max(coefs @ a @ coefs - 2 * coefs @ b + c, 0.0) / c)


@dataclass(frozen=True)
class EMATarget:
    """One requested average: `sigma_rel` for every tensor, except tensors whose name matches one of the
    fnmatch patterns in `per_tensor` ((pattern, sigma_rel) pairs; the first match wins)."""

    sigma_rel: float
    per_tensor: tuple[tuple[str, float], ...] = ()

    def std_for(self, name: str) -> float:
        """The EMA length for the tensor called `name`."""
        for pattern, std in self.per_tensor:
            if fnmatch.fnmatchcase(name, pattern):
                return float(std)
        return float(self.sigma_rel)

    def stds(self) -> list[float]:
        """Every sigma_rel this target uses."""
        return [float(self.sigma_rel), *(float(s) for _, s in self.per_tensor)]

    def describe(self) -> str:
        """'0.100' or '0.100 (unet.enc.*=0.050, ...)'."""
        extra = ", ".join(f"{p}={s:.3f}" for p, s in self.per_tensor)
        return f"{self.sigma_rel:.3f}" + (f" ({extra})" if extra else "")

    def filename(self, nimg: int) -> str:
        tag = ""
        if self.per_tensor:
            tag = "pt" + hashlib.sha1(json.dumps(self.per_tensor).encode()).hexdigest()[:8]
        return posthoc_name(nimg, self.sigma_rel, tag)


@dataclass
class ReconstructionResult:
    """What one reconstructed output is and how well its weighting profile was matched."""

    path: Path
    sigma_rel: float
    nimg: int
    profile_error: float  # the worst relative squared L2 profile error over the lengths the output uses
    num_snapshots: int
    per_tensor: tuple[tuple[str, float], ...] = ()
    profile_errors: dict[float, float] = field(default_factory=dict)  # per sigma_rel used

    def to_dict(self) -> dict:
        return {"path": str(self.path), "sigma_rel": self.sigma_rel, "nimg": self.nimg,
                "profile_error": self.profile_error, "num_snapshots": self.num_snapshots,
                "per_tensor": [list(p) for p in self.per_tensor],
                "profile_errors": {f"{s:g}": e for s, e in self.profile_errors.items()}}


@dataclass
class _Plan:
    source: Path
    nimg: int
    used: list[SnapshotInfo]
    stds: list[float]  # distinct lengths needed by the targets
    coefs: np.ndarray  # [len(used), len(stds)], columns sum to 1
    errors: list[float]
    averaged: set[str]
    names: list[str]


def _as_target(t: float | EMATarget) -> EMATarget:
    if isinstance(t, EMATarget):
        return EMATarget(float(t.sigma_rel), tuple((str(p), float(s)) for p, s in t.per_tensor))
    return EMATarget(float(t))


def _plan(source: str | Path, targets: Sequence[EMATarget], nimg: int | None, input_stds: Sequence[float] | None,
          max_error: float, allow_gaps: bool) -> _Plan:
    """Validate a reconstruction request and solve for its coefficients (reads headers only)."""
    if not targets:
        raise ValueError("no EMA length requested")
    stds = sorted({s for t in targets for s in t.stds()})
    bad = [s for s in stds if not 0 < s < MAX_SIGMA_REL]
    if bad:
        raise ValueError(f"sigma_rel {bad} outside (0, {MAX_SIGMA_REL:.4f}), the range of power-function EMAs")
    for t in targets:
        if any(not p for p, _ in t.per_tensor):
            raise ValueError(f"empty tensor-name pattern in {t.describe()}")
    files = [t.filename(0) for t in targets]
    twice = sorted({targets[i].describe() for i, f in enumerate(files) if files.count(f) > 1})
    if twice:
        raise ValueError(f"EMA lengths {twice} requested twice (equal at 3 decimals); give each once")

    source = Path(source)
    infos = scan_snapshots(source, input_stds, allow_gaps)
    first, last = infos[0], infos[-1]
    nimg = last.nimg if nimg is None else int(nimg)
    if nimg > last.nimg:
        raise ValueError(f"target time {nimg} lies outside the snapshots: after the last one ({last.nimg}, "
                         f"{last.path.name}); choose a time up to {last.nimg}")
    if nimg < first.nimg:
        raise ValueError(f"target time {nimg} lies before the first snapshot ({first.nimg}, {first.path.name}); "
                         f"choose a time from {first.nimg} to {last.nimg}")
    used = [i for i in infos if i.nimg <= nimg]
    in_nimg = np.array([i.nimg for i in used], dtype=np.float64)
    in_std = np.array([i.sigma_rel for i in used], dtype=np.float64)
    coefs = solve_posthoc_coefficients(in_nimg, in_std, nimg, stds)
    coefs = coefs / coefs.sum(axis=0, keepdims=True)
    errors = [profile_error(in_nimg, in_std, coefs[:, j], nimg, s) for j, s in enumerate(stds)]
    rejected = [(s, e) for s, e in zip(stds, errors) if not e <= max_error]
    if rejected:
        tracked = sorted(set(in_std.tolist()))

        def what(s: float) -> str:
            if s < min(tracked):
                return "shorter than the snapshots support"
            return "longer than the snapshots support" if s > max(tracked) else "not supported at this time"

        parts = ", ".join(f"{s:g} ({what(s)}: profile error {e:.2g})" for s, e in rejected)
        raise ValueError(f"cannot reconstruct sigma_rel {parts} at time {nimg}: the allowed profile error is "
                         f"{max_error:g}; {source} has {len(used)} snapshots up to that time (tracked sigma_rel "
                         f"{tracked}, last at {int(in_nimg.max())}); choose another length or time, or save "
                         "snapshots more often")
    names = list(used[0].parameter_names)
    averaged = _averaged_names(used[0], names)
    for t in targets:
        for pattern, _ in t.per_tensor:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in averaged):
                example = sorted(averaged)[0] if averaged else "(none)"
                raise ValueError(f"tensor pattern {pattern!r} matches no averaged tensor of {used[0].path.name} "
                                 f"(names look like {example!r})")
    return _Plan(source, nimg, used, stds, coefs, errors, averaged, names)


def _accumulate(outputs: list[dict[str, torch.Tensor]], columns: list[dict[str, int]], name: str,
                tensor: torch.Tensor, coefs: np.ndarray) -> None:
    """Add one stored tensor, weighted by each output's coefficient, into every output."""
    if tensor.dtype not in (torch.float32, torch.float64):
        tensor = tensor.to(torch.float32)
    for out, cols in zip(outputs, columns):
        out[name].add_(tensor, alpha=float(coefs[cols[name]]))


def _execute(plan: _Plan, targets: Sequence[EMATarget], outdir: str | Path,
             progress: Callable[[int, int], None] | None) -> list[ReconstructionResult]:
    """Stream the snapshots of `plan` once and write one file per target."""
    col = {s: j for j, s in enumerate(plan.stds)}
    outputs: list[dict[str, torch.Tensor]] = [{} for _ in targets]
    columns: list[dict[str, int]] = [{} for _ in targets]
    dtypes: dict[str, torch.dtype] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    copied: dict[str, torch.Tensor] = {}
    first = plan.used[0]
    for k, info in enumerate(plan.used):
        tensors, _ = load_tensors(info.path, kind="snapshot")
        if k == 0:
            dtypes = {n: t.dtype for n, t in tensors.items()}
            shapes = {n: tuple(t.shape) for n, t in tensors.items()}
            if not plan.averaged <= set(tensors):
                raise ValueError(f"{info.path.name}: lacks averaged tensors {sorted(plan.averaged - set(tensors))[:3]}")
            for out, cols, target in zip(outputs, columns, targets):
                for n in plan.averaged:
                    acc_dtype = torch.float64 if dtypes[n] == torch.float64 else torch.float32
                    out[n] = torch.zeros(shapes[n], dtype=acc_dtype)
                    cols[n] = col[target.std_for(n)]
        elif {n: tuple(t.shape) for n, t in tensors.items()} != shapes:
            raise ValueError(f"{info.path.name} and {first.path.name} hold different tensors (names or shapes); "
                             "keep one run's snapshots per folder")
        for n in plan.averaged:
            _accumulate(outputs, columns, n, tensors.pop(n), plan.coefs[k])
        if k == len(plan.used) - 1:  # buffers and other copies: from the latest snapshot used
            copied = tensors
        del tensors
        if progress is not None:
            progress(k + 1, len(plan.used))

    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    base_info = dict(read_metadata(first.path).get("info") or {})
    results = []
    for j, target in enumerate(targets):
        out = outputs[j]
        state = {n: out[n].to(dtypes[n]) if n in out else copied[n] for n in plan.names}
        used_stds = sorted(set(target.stds()))
        errors = {s: plan.errors[col[s]] for s in used_stds}
        per_tensor_map = {n: target.std_for(n) for n in sorted(plan.averaged)
                          if target.std_for(n) != target.sigma_rel}
        info = {**base_info, "reconstructed": True, "profile_error": max(errors.values()),
                "num_snapshots": len(plan.used), "source_sigma_rels": sorted({i.sigma_rel for i in plan.used})}
        if target.per_tensor:
            info["sigma_rel_patterns"] = [list(p) for p in target.per_tensor]
            info["tensor_sigma_rel"] = per_tensor_map
            info["profile_errors"] = {f"{s:g}": e for s, e in errors.items()}
        path = outdir / target.filename(plan.nimg)
        network = None if first.network is None else NetworkConfig.from_dict(first.network)
        save_snapshot(path, Snapshot(state, network, target.sigma_rel, plan.nimg, info, tuple(plan.averaged)))
        outputs[j] = {}
        del state, out
        results.append(ReconstructionResult(path, target.sigma_rel, plan.nimg, max(errors.values()),
                                            len(plan.used), target.per_tensor, errors))
    return results


def posthoc_reconstruct(
    source: str | Path,
    outdir: str | Path,
    stds: Sequence[float | EMATarget],
    nimg: int | None = None,
    input_stds: Sequence[float] | None = None,
    max_error: float = DEFAULT_MAX_ERROR,
    allow_gaps: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> list[ReconstructionResult]:
    """Reconstruct power-function EMAs from the snapshots in `source` and write one snapshot per request
    into `outdir` (`posthoc-<time>-<sigma_rel>.safetensors`, in the same form as the inputs: with the
    network config when they have one, so `edm2 generate` reads them).

    `stds`: sigma_rel values or `EMATarget`s (per-tensor lengths). `nimg`: target time, any time from the
    first to the last snapshot (default: the last); only snapshots up to it are used. `input_stds`: use
    only the snapshots of these tracked lengths. A request is refused when the least-squares fit of its
    weighting profile has a relative squared L2 error above `max_error` (the snapshots do not support that
    length at that time). Snapshots are read one at a time; `progress(done, total)` follows them.
    Everything is validated before `outdir` is created.
    """
    targets = [_as_target(s) for s in stds]
    plan = _plan(source, targets, nimg, input_stds, max_error, allow_gaps)
    return _execute(plan, targets, outdir, progress)


def reconstruction_errors(source: str | Path, stds: Sequence[float], nimg: int | None = None,
                          input_stds: Sequence[float] | None = None, allow_gaps: bool = False) -> dict[float, float]:
    """{sigma_rel: profile error} that `posthoc_reconstruct` would reach for each length (headers only, nothing
    written, no length refused), e.g. to keep only the lengths the snapshots support."""
    plan = _plan(source, [EMATarget(float(s)) for s in stds], nimg, input_stds, math.inf, allow_gaps)
    return dict(zip(plan.stds, plan.errors))


# ----------------------------------------------------------------------------------------------------
# Command-line style arguments (parsed here so that the CLI holds no logic).


def parse_std_list(text: str, option: str = "--std") -> tuple[list[float], list[float]]:
    """('0.05,0.1' or the inclusive range 'start:stop:step') -> (values, dropped).

    A range is a grid over an interval: its points outside (0, 0.2887), the range of power-function EMAs,
    are returned as `dropped`. Values of a comma list are all returned (and checked when used).
    """
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


# ----------------------------------------------------------------------------------------------------
# EMA-length sweep (the paper's Figure 5a for any metric).


@dataclass
class SweepResult:
    """Rows (sigma_rel, profile_error, path, metric values) sorted by sigma_rel, the best row, and the
    lengths left out because the snapshots do not support them."""

    rows: list[dict]
    best: dict
    key: str
    minimize: bool
    nimg: int
    json_path: Path | None
    plot_path: Path | None
    skipped: dict[float, float] = field(default_factory=dict)  # sigma_rel -> profile error

    @property
    def best_at_edge(self) -> bool:
        """Whether the best length is the shortest or longest one tried (the optimum may lie outside)."""
        return len(self.rows) > 1 and self.best["sigma_rel"] in (self.rows[0]["sigma_rel"], self.rows[-1]["sigma_rel"])


def ema_sweep(
    source: str | Path,
    outdir: str | Path,
    stds: Sequence[float],
    metric: Callable[[Path], Mapping[str, float]],
    key: str,
    minimize: bool = True,
    nimg: int | None = None,
    input_stds: Sequence[float] | None = None,
    max_error: float = DEFAULT_MAX_ERROR,
    allow_gaps: bool = False,
    per_pass: int = 8,
    skip_unsupported: bool = False,
    json_path: str | Path | None = "ema_sweep.json",
    plot_path: str | Path | None = "ema_sweep.png",
    secondary: str | None = None,
    title: str | None = None,
    echo: Callable[[str], None] | None = None,
) -> SweepResult:
    """Reconstruct each EMA length in `stds` from the snapshots in `source`, score it with
    `metric(path_of_reconstructed_snapshot) -> {name: value}`, and pick the best by `metric[key]`.

    Every length is validated before any work starts: one the snapshots do not support (profile error
    above `max_error`) is an error, or with `skip_unsupported` (a sweep over a grid) left out and listed
    in `SweepResult.skipped`. Reconstruction streams the snapshots once per `per_pass` lengths (memory:
    `per_pass` models plus one). The reconstructed snapshots stay in `outdir`;
    `json_path` / `plot_path` (relative to `outdir` unless absolute; None to skip) receive the table and
    the plot of `key` (and `secondary` on a second axis) against sigma_rel.
    """
    stds = sorted({float(s) for s in stds})
    if per_pass <= 0:
        raise ValueError(f"per_pass must be positive, got {per_pass}")
    skipped = {}
    if skip_unsupported:
        errors = reconstruction_errors(source, stds, nimg, input_stds, allow_gaps)
        skipped = {s: e for s, e in errors.items() if not e <= max_error}
        stds = [s for s in stds if s not in skipped]
        if not stds:
            raise ValueError(f"the snapshots in {source} support none of the EMA lengths {sorted(skipped)} (profile "
                             f"errors above {max_error:g}); save snapshots more often or choose other lengths")
        if skipped and echo is not None:
            echo(f"note: skipping sigma_rel {', '.join(f'{s:.3f}' for s in skipped)}: the snapshots do not support "
                 f"them (profile error above {max_error:g}); save snapshots more often or train longer to include them")
    targets = [EMATarget(s) for s in stds]
    plan = _plan(source, targets, nimg, input_stds, max_error, allow_gaps)
    outdir = Path(outdir)
    rows = []
    for start in range(0, len(targets), per_pass):
        chunk = targets[start:start + per_pass]
        if echo is not None:
            echo(f"reconstructing sigma_rel {', '.join(t.describe() for t in chunk)} ...")
        for result in _execute(plan, chunk, outdir, None):
            values = dict(metric(result.path))
            if key not in values:
                raise ValueError(f"metric returned {sorted(values)} without the key {key!r} to optimize")
            row = {"sigma_rel": result.sigma_rel, "profile_error": result.profile_error, "path": str(result.path),
                   **{k: float(v) for k, v in values.items()}}
            rows.append(row)
            if echo is not None:
                echo(f"  sigma_rel {row['sigma_rel']:.3f}: {key} {row[key]:.4g}")
    finite = [r for r in rows if math.isfinite(r[key])]
    if not finite:
        raise ValueError(f"metric {key!r} is not finite for any EMA length")
    best = (min if minimize else max)(finite, key=lambda r: r[key])
    json_file = None if json_path is None else outdir / json_path
    plot_file = None if plot_path is None else outdir / plot_path
    result = SweepResult(rows, best, key, minimize, plan.nimg, json_file, plot_file, skipped)
    if json_file is not None:
        table = {"source": str(plan.source), "nimg": plan.nimg, "key": key, "minimize": minimize,
                 "num_snapshots": len(plan.used), "source_sigma_rels": sorted({i.sigma_rel for i in plan.used}),
                 "best": best, "best_at_edge": result.best_at_edge, "rows": rows,
                 "skipped": [{"sigma_rel": s, "profile_error": e} for s, e in skipped.items()]}
        atomic_write_text(json_file, json.dumps(table, indent=2) + "\n")
    if plot_file is not None:
        plot_sweep(rows, plot_file, key, title or f"{key} vs EMA length at time {plan.nimg}", secondary, minimize)
    return result


def plot_sweep(rows: Sequence[Mapping], path: str | Path, key: str, title: str, secondary: str | None = None,
               minimize: bool = True) -> None:
    """Plot `key` (and `secondary` on a second axis) against sigma_rel, marking the best point; PNG, atomic."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    stds = [r["sigma_rel"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4), dpi=120)
    ax.plot(stds, [r[key] for r in rows], "o-", color="tab:blue", ms=4,
            label=f"{key} ({'lower' if minimize else 'higher'} is better)")
    best = (min if minimize else max)(rows, key=lambda r: r[key])
    ax.plot([best["sigma_rel"]], [best[key]], "*", ms=14, color="tab:red",
            label=f"best sigma_rel {best['sigma_rel']:.3f}")
    ax.set_xlabel("EMA length sigma_rel")
    ax.set_ylabel(key)
    handles = ax.get_legend_handles_labels()[0]
    if secondary is not None:
        ax2 = ax.twinx()
        ax2.plot(stds, [r[secondary] for r in rows], "s--", color="tab:green", ms=3, label=secondary)
        ax2.set_ylabel(secondary)
        handles += ax2.get_legend_handles_labels()[0]
    values = [r[key] for r in rows if math.isfinite(r[key])]
    if values and min(values) > 0 and max(values) > 2 * min(values):
        ax.set_yscale("log")  # keep the region around the optimum readable next to a steep end
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    fig.legend(handles, [h.get_label() for h in handles], loc="lower center", ncol=3, fontsize=8, frameon=False)
    ax.set_title(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
