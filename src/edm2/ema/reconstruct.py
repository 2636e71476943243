"""Post-hoc EMA reconstruction (EDM2 Section 3): scan a folder of snapshots, plan the least-squares
combination of their weighting profiles, and execute it by streaming the snapshots once.

`posthoc_reconstruct` combines the snapshots of a folder into new averages: any sigma_rel, any time up to the
last snapshot, optionally a different sigma_rel for tensors matched by name patterns. It reads one snapshot at
a time, so memory holds one model per requested output plus the one being read.

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

from edm2.ema.power import MAX_SIGMA_REL, power_function_correlation, solve_posthoc_coefficients
from edm2.files import (
    Snapshot,
    load_tensors,
    network_from_metadata,
    posthoc_filename,
    read_metadata,
    save_snapshot,
)

__all__ = ["DEFAULT_MAX_ERROR", "GAP_RATIO", "SnapshotInfo", "EMATarget", "ReconstructionResult",
           "ReconstructionPlan", "scan_snapshots", "profile_error", "plan_reconstruction", "execute_reconstruction",
           "posthoc_reconstruct", "reconstruction_errors"]

DEFAULT_MAX_ERROR = 0.1  # largest accepted relative squared L2 error of a reconstructed weighting profile
GAP_RATIO = 1.5  # a gap longer than this times each neighbouring gap means a snapshot is missing


# ----------------------------------------------------------------------------------------------------
# Scan: the headers of a folder of snapshots.

@dataclass(frozen=True)
class SnapshotInfo:
    """Header of one snapshot file."""

    path: Path
    nimg: int  # time of the snapshot (images, or whatever unit the writer counted)
    sigma_rel: float
    network: dict | None  # edm2 network config; None for models edm2 cannot rebuild
    parameter_names: tuple[str, ...]
    averaged_names: tuple[str, ...] | None  # None: not recorded (our trainer); derived from the network
    network_class: str | None = None  # official class of an EDM-release network; None: EDM2's Precond


def _signature(info: SnapshotInfo) -> str:
    return json.dumps([info.network, info.parameter_names, info.network_class], sort_keys=True)


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
                                  None if averaged is None else tuple(averaged), meta.get("network_class")))
    if not infos:
        raise ValueError(f"{source}: holds no EMA snapshots (snapshot-*.safetensors written during training)")
    if stds is not None:
        present = sorted({round(i.sigma_rel, 6) for i in infos})
        wanted = {round(float(s), 6) for s in stds}
        absent = sorted(wanted - set(present))
        if absent:
            raise ValueError(f"{source}: has no snapshots with sigma_rel {absent}; it holds {present}")
        infos = [i for i in infos if round(i.sigma_rel, 6) in wanted]

    _check_one_network(infos)
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


def _check_one_network(infos: Sequence[SnapshotInfo]) -> None:
    by_signature: dict[str, SnapshotInfo] = {}
    for info in infos:
        by_signature.setdefault(_signature(info), info)
    if len(by_signature) > 1:
        a, b = list(by_signature.values())[:2]
        what = "network configs" if (a.network, a.network_class) != (b.network, b.network_class) \
            else "parameter names"
        raise ValueError(f"snapshots from different networks in one folder ({what} differ): {a.path.name} and "
                         f"{b.path.name}; keep one run's snapshots per folder")


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
# Plan (headers and math only) and execute (stream the snapshots once).


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
        return posthoc_filename(nimg, self.sigma_rel, tag)


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
class ReconstructionPlan:
    """A validated request: the snapshots to combine and their coefficients (from the headers only)."""

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


def plan_reconstruction(source: str | Path, targets: Sequence[EMATarget], nimg: int | None,
                        input_stds: Sequence[float] | None, max_error: float,
                        allow_gaps: bool) -> ReconstructionPlan:
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
    coefs = solve_posthoc_coefficients(in_nimg, in_std, nimg, stds)  # columns sum to 1
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
    return ReconstructionPlan(source, nimg, used, stds, coefs, errors, averaged, names)


def _accumulate(outputs: list[dict[str, torch.Tensor]], columns: list[dict[str, int]], name: str,
                tensor: torch.Tensor, coefs: np.ndarray) -> None:
    """Add one stored tensor, weighted by each output's coefficient, into every output."""
    if tensor.dtype not in (torch.float32, torch.float64):
        tensor = tensor.to(torch.float32)
    for out, cols in zip(outputs, columns):
        out[name].add_(tensor, alpha=float(coefs[cols[name]]))


def execute_reconstruction(plan: ReconstructionPlan, targets: Sequence[EMATarget], outdir: str | Path,
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
    first_meta = read_metadata(first.path)
    base_info = dict(first_meta.get("info") or {})
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
        network = None if first.network is None else network_from_metadata(first.network, first.network_class)
        save_snapshot(path, Snapshot(state, network, target.sigma_rel, plan.nimg, info, tuple(plan.averaged),
                                     first_meta.get("encoder")))
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
    plan = plan_reconstruction(source, targets, nimg, input_stds, max_error, allow_gaps)
    return execute_reconstruction(plan, targets, outdir, progress)


def reconstruction_errors(source: str | Path, stds: Sequence[float], nimg: int | None = None,
                          input_stds: Sequence[float] | None = None, allow_gaps: bool = False) -> dict[float, float]:
    """{sigma_rel: profile error} that `posthoc_reconstruct` would reach for each length (headers only, nothing
    written, no length refused), e.g. to keep only the lengths the snapshots support."""
    plan = plan_reconstruction(source, [EMATarget(float(s)) for s in stds], nimg, input_stds, math.inf, allow_gaps)
    return dict(zip(plan.stds, plan.errors))
