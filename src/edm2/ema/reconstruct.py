"""Post-hoc EMA reconstruction (EDM2 Section 3): scan a folder of snapshots, plan the least-squares
combination of their weighting profiles, and execute it by streaming the snapshots once.

`posthoc_reconstruct` combines the snapshots of a folder into new averages: any sigma_rel, any time up to the
last snapshot, optionally a different sigma_rel for tensors matched by name patterns. It reads one snapshot at
a time, so memory holds one model per requested output plus the one being read.

The snapshots are edm2 snapshot files (float32 or float16) or the official raw snapshots
(`network-snapshot-<kimg>-<std>.pkl`, float16), read without running code; `edm2.ema.scan` reads their headers and
checks that they form one series of one network. The arithmetic is the official `reconstruct_phema.py`'s: each
stored tensor is taken to float32 (float64 stays float64), multiplied by its coefficient and added to a float32
accumulator; buffers are copied from the latest snapshot used; each output is written in the dtype of the inputs
(float16 in, float16 out, as the official files). At most `batch` outputs are held at a time (the official
`--batch`): more outputs stream the snapshots once per batch.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from edm2.ema.power import MAX_SIGMA_REL, power_function_correlation, solve_posthoc_coefficients
from edm2.ema.scan import (
    GAP_RATIO,
    SnapshotInfo,
    is_official_snapshot,
    read_official_tensors,
    scan_snapshots,
    snapshot_header,
)
from edm2.files import (
    Snapshot,
    load_tensors,
    network_from_metadata,
    nonfinite_tensors,
    posthoc_filename,
    remove_stale_temps,
    save_snapshot,
)

__all__ = ["DEFAULT_MAX_ERROR", "GAP_RATIO", "SnapshotInfo", "EMATarget", "ReconstructionResult",
           "ReconstructionPlan", "scan_snapshots", "profile_error", "plan_reconstruction", "execute_reconstruction",
           "posthoc_reconstruct", "reconstruction_errors"]

DEFAULT_MAX_ERROR = 0.1  # largest accepted relative squared L2 error of a reconstructed weighting profile


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


def _read_tensors(info: SnapshotInfo) -> dict[str, torch.Tensor]:
    """The tensors of one snapshot as stored (an official raw snapshot checked against the folder's network);
    ValueError naming the snapshot and its first tensor with NaN or Inf values."""
    tensors = read_official_tensors(info) if is_official_snapshot(info) else load_tensors(info.path, "snapshot")[0]
    bad = nonfinite_tensors(tensors)
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise ValueError(f"{info.path}: tensor {bad[0]!r}{more} holds NaN or Inf values (the training diverged, or "
                         "the file is damaged); reconstruct at a time before it (--nimg), or move it out of the "
                         "folder")
    return tensors


def _accumulate(sums: list[dict[str, torch.Tensor]], columns: list[dict[str, int]], name: str,
                tensor: torch.Tensor, coefs: np.ndarray) -> None:
    """Add one stored tensor, times each output's coefficient, into every output's sum: the tensor in float32
    (float64 stays float64), the product rounded, then added, as the official `pj += pi * coefs[i, j]`."""
    if tensor.dtype not in (torch.float32, torch.float64):
        tensor = tensor.to(torch.float32)
    for out, cols in zip(sums, columns):
        out[name].add_(tensor * float(coefs[cols[name]]))


@dataclass
class _Streamed:
    """One pass over the snapshots for a batch of outputs: the weighted sums of the averaged tensors (one dict
    per output), the stored dtypes, and the tensors copied from the latest snapshot used (buffers)."""

    sums: list[dict[str, torch.Tensor]]
    dtypes: dict[str, torch.dtype]
    copied: dict[str, torch.Tensor]


def _zero_sums(plan: ReconstructionPlan, tensors: dict[str, torch.Tensor], count: int) -> list[dict[str, torch.Tensor]]:
    """`count` sets of zero sums shaped as the first snapshot's averaged tensors (float32; float64 for float64)."""
    first = plan.used[0]
    if not plan.averaged <= set(tensors):
        raise ValueError(f"{first.path.name}: lacks averaged tensors {sorted(plan.averaged - set(tensors))[:3]}")
    dtype = {n: torch.float64 if tensors[n].dtype == torch.float64 else torch.float32 for n in plan.averaged}
    return [{n: torch.zeros(tensors[n].shape, dtype=dtype[n]) for n in plan.averaged} for _ in range(count)]


def _stream(plan: ReconstructionPlan, targets: Sequence[EMATarget],
            step: Callable[[int], None] | None) -> _Streamed:
    """Read the snapshots of `plan` once, one at a time, into the weighted sums of `targets`."""
    col = {s: j for j, s in enumerate(plan.stds)}
    columns = [{n: col[t.std_for(n)] for n in plan.averaged} for t in targets]
    streamed = _Streamed([], {}, {})
    shapes: dict[str, tuple[int, ...]] = {}
    for k, info in enumerate(plan.used):
        tensors = _read_tensors(info)
        if k == 0:
            streamed.dtypes = {n: t.dtype for n, t in tensors.items()}
            shapes = {n: tuple(t.shape) for n, t in tensors.items()}
            streamed.sums = _zero_sums(plan, tensors, len(targets))
        elif {n: tuple(t.shape) for n, t in tensors.items()} != shapes:
            raise ValueError(f"{info.path.name} and {plan.used[0].path.name} hold different tensors (names or "
                             "shapes); keep one run's snapshots per folder")
        for n in plan.averaged:
            _accumulate(streamed.sums, columns, n, tensors.pop(n), plan.coefs[k])
        if k == len(plan.used) - 1:  # buffers and other copies: from the latest snapshot used
            streamed.copied = tensors
        del tensors
        if step is not None:
            step(k + 1)
    return streamed


def _write_output(plan: ReconstructionPlan, target: EMATarget, state: dict[str, torch.Tensor], header: dict,
                  outdir: Path) -> ReconstructionResult:
    """Write one reconstruction (in the form of the first snapshot: its network, encoder and info)."""
    col = {s: j for j, s in enumerate(plan.stds)}
    errors = {s: plan.errors[col[s]] for s in sorted(set(target.stds()))}
    info = {**dict(header.get("info") or {}), "reconstructed": True, "profile_error": max(errors.values()),
            "num_snapshots": len(plan.used), "source_sigma_rels": sorted({i.sigma_rel for i in plan.used})}
    if target.per_tensor:
        info["sigma_rel_patterns"] = [list(p) for p in target.per_tensor]
        info["tensor_sigma_rel"] = {n: target.std_for(n) for n in sorted(plan.averaged)
                                    if target.std_for(n) != target.sigma_rel}
        info["profile_errors"] = {f"{s:g}": e for s, e in errors.items()}
    first = plan.used[0]
    network = None if first.network is None else network_from_metadata(first.network, first.network_class)
    path = outdir / target.filename(plan.nimg)
    save_snapshot(path, Snapshot(state, network, target.sigma_rel, plan.nimg, info, tuple(plan.averaged),
                                 header.get("encoder")))
    return ReconstructionResult(path, target.sigma_rel, plan.nimg, max(errors.values()), len(plan.used),
                                target.per_tensor, errors)


def _batches(items: list, size: int | None) -> list[list]:
    """`items` in consecutive batches of at most `size`, as even as possible (the official split); None: one."""
    if not items:
        return []
    count = 1 if size is None else -(-len(items) // max(int(size), 1))
    longer = len(items) % count  # numpy's array_split: the first batches take the remainder
    bounds = [b * (len(items) // count) + min(b, longer) for b in range(count + 1)]
    return [items[bounds[b]:bounds[b + 1]] for b in range(count)]


def execute_reconstruction(plan: ReconstructionPlan, targets: Sequence[EMATarget], outdir: str | Path,
                           progress: Callable[[int, int], None] | None,
                           batch: int | None = None) -> list[ReconstructionResult]:
    """Stream the snapshots of `plan` once per batch of at most `batch` targets (None: all in one pass) and
    write one file per target, each tensor in its dtype in the first snapshot used. `progress(done, total)`
    counts the snapshots read over all passes."""
    groups = _batches(list(targets), batch)
    total = len(plan.used) * len(groups)
    header = snapshot_header(plan.used[0])
    outdir = Path(outdir)
    results = []
    for g, group in enumerate(groups):
        offset = g * len(plan.used)
        step = None if progress is None else (lambda k, offset=offset: progress(offset + k, total))
        streamed = _stream(plan, group, step)
        outdir.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(outdir, "posthoc-*.safetensors")  # of a killed run (live writers' are kept)
        for j, target in enumerate(group):
            sums, streamed.sums[j] = streamed.sums[j], {}
            state = {n: (sums[n] if n in sums else streamed.copied[n]).to(streamed.dtypes[n]) for n in plan.names}
            results.append(_write_output(plan, target, state, header, outdir))
            del state, sums
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
    batch: int | None = None,
    skip_existing: bool = False,
) -> list[ReconstructionResult]:
    """Reconstruct power-function EMAs from the snapshots in `source` and write one snapshot per request
    into `outdir` (`posthoc-<time>-<sigma_rel>.safetensors`, in the same form as the inputs: with the
    network config when they have one, so `edm2 generate` reads them, and in their dtype).

    `source` holds edm2 snapshot files (float32 or float16) or the official raw snapshots
    (`network-snapshot-<kimg>-<std>.pkl`). `stds`: sigma_rel values or `EMATarget`s (per-tensor lengths).
    `nimg`: target time, any time from the first to the last snapshot (default: the last); only snapshots up
    to it are used. `input_stds`: use only the snapshots of these tracked lengths. A request is refused when
    the least-squares fit of its weighting profile has a relative squared L2 error above `max_error` (the
    snapshots do not support that length at that time). Snapshots are read one at a time, once per batch of
    at most `batch` outputs (None: all outputs in one pass); `progress(done, total)` follows them.
    `skip_existing` leaves out the outputs whose file exists in `outdir` (the official `--skip`).
    Everything is validated before `outdir` is created; a snapshot with NaN or Inf values is refused before
    any output is written, and the temporaries a killed reconstruction left in `outdir` are removed.
    """
    targets = [_as_target(s) for s in stds]
    if batch is not None and batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    plan = plan_reconstruction(source, targets, nimg, input_stds, max_error, allow_gaps)
    if skip_existing:
        targets = [t for t in targets if not (Path(outdir) / t.filename(plan.nimg)).is_file()]
    return execute_reconstruction(plan, targets, outdir, progress, batch)


def reconstruction_errors(source: str | Path, stds: Sequence[float], nimg: int | None = None,
                          input_stds: Sequence[float] | None = None, allow_gaps: bool = False) -> dict[float, float]:
    """{sigma_rel: profile error} that `posthoc_reconstruct` would reach for each length (headers only, nothing
    written, no length refused), e.g. to keep only the lengths the snapshots support."""
    plan = plan_reconstruction(source, [EMATarget(float(s)) for s in stds], nimg, input_stds, math.inf, allow_gaps)
    return dict(zip(plan.stds, plan.errors))
