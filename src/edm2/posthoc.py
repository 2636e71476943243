"""Post-hoc EMA reconstruction from snapshot files (EDM2 Section 3.2).

Snapshots are read one at a time and accumulated into the outputs, so memory holds one network per
requested output plus the one being read, whatever the number of snapshots.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edm2.checkpoint import Snapshot, load_tensors, read_metadata, save_snapshot
from edm2.ema import exp_to_std, power_function_correlation, solve_posthoc_coefficients, std_to_exp
from edm2.presets import NetworkConfig

__all__ = ["SnapshotInfo", "scan_snapshots", "profile_error", "posthoc_reconstruct", "posthoc_name"]


@dataclass(frozen=True)
class SnapshotInfo:
    path: Path
    nimg: int
    sigma_rel: float
    network: dict


def posthoc_name(nimg: int, sigma_rel: float) -> str:
    return f"posthoc-{nimg:010d}-{sigma_rel:.3f}.safetensors"


def scan_snapshots(source: str | Path) -> list[SnapshotInfo]:
    """EMA snapshots in a run folder or a folder of snapshots (headers only), sorted by (time, sigma_rel).

    ValueError when there are none, when they come from different networks, or when a (time, sigma_rel)
    pair appears twice.
    """
    source = Path(source)
    if not source.is_dir():
        raise ValueError(f"{source}: not a folder; pass a training run folder or a folder of snapshots")
    infos = []
    for path in sorted(source.glob("*.safetensors")):
        meta = read_metadata(path)
        if meta.get("kind") != "snapshot" or meta.get("sigma_rel") is None or meta.get("reconstructed"):
            continue  # checkpoints, raw weights and earlier reconstructions are not inputs
        infos.append(SnapshotInfo(path, int(meta["nimg"]), float(meta["sigma_rel"]), meta["network"]))
    if not infos:
        raise ValueError(f"{source}: holds no EMA snapshots (snapshot-*.safetensors written during training)")
    first = infos[0]
    for info in infos[1:]:
        if info.network != first.network:
            raise ValueError(f"snapshots from different networks in one folder: {first.path.name} and "
                             f"{info.path.name}; keep one run's snapshots per folder")
    seen: dict[tuple[int, float], Path] = {}
    for info in infos:
        key = (info.nimg, round(info.sigma_rel, 6))
        if key in seen:
            raise ValueError(f"duplicate snapshot time {info.nimg} with sigma_rel {info.sigma_rel}: "
                             f"{seen[key].name} and {info.path.name}; remove one")
        seen[key] = info.path
    return sorted(infos, key=lambda i: (i.nimg, i.sigma_rel))


def profile_error(in_nimg: np.ndarray, in_std: np.ndarray, coefs: np.ndarray, out_nimg: float,
                  out_std: float) -> float:
    """Relative squared L2 error of the reconstructed weighting profile sum_i c_i p_i against the target."""
    a = power_function_correlation(in_nimg[:, None], in_std[:, None], in_nimg[None, :], in_std[None, :])
    b = power_function_correlation(in_nimg, in_std, out_nimg, out_std)
    c = float(power_function_correlation(out_nimg, out_std, out_nimg, out_std))
    return float(max(coefs @ a @ coefs - 2 * coefs @ b + c, 0.0) / c)


def posthoc_reconstruct(
    source: str | Path,
    outdir: str | Path,
    stds: Sequence[float],
    nimg: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[dict]:
    """Reconstruct power-function EMAs of length `stds` at time `nimg` (default: the last snapshot) from the
    snapshots in `source`, writing one snapshot file per output into `outdir`. Returns a report per output
    (path, sigma_rel, nimg, profile_error, number of snapshots used)."""
    infos = scan_snapshots(source)
    last = infos[-1].nimg
    nimg = last if nimg is None else int(nimg)
    if nimg <= 0 or nimg > last:
        raise ValueError(f"target time {nimg} images lies outside the snapshots (last at {last}); "
                         f"choose a time up to {last}")
    stds = [float(s) for s in stds]
    max_std = float(exp_to_std(0.0))
    bad = [s for s in stds if not 0 < s < max_std]
    if bad:
        raise ValueError(f"sigma_rel {bad} outside (0, {max_std:.4f}), the range of power-function EMAs")
    used = [i for i in infos if i.nimg <= nimg]
    if not used:
        raise ValueError(f"target time {nimg} images lies before the first snapshot (at {infos[0].nimg}); "
                         f"choose a time from {infos[0].nimg} to {last}")
    in_nimg = np.array([i.nimg for i in used], dtype=np.float64)
    in_std = np.array([i.sigma_rel for i in used], dtype=np.float64)
    narrowest = float(in_std.min())
    too_short = [s for s in stds if s < narrowest / 2]
    if too_short:
        raise ValueError(f"sigma_rel {too_short} is far shorter than the shortest tracked EMA ({narrowest}); "
                         "the snapshots cannot represent it")
    std_to_exp(stds)
    coefs = solve_posthoc_coefficients(in_nimg, in_std, nimg, stds)
    coefs = coefs / coefs.sum(axis=0, keepdims=True)

    # Stream: read each snapshot once, add its weighted tensors to every output.
    outputs: list[dict[str, torch.Tensor]] | None = None
    meta_info: dict = {}
    for k, info in enumerate(used):
        tensors, meta = load_tensors(info.path, kind="snapshot")
        if outputs is None:
            outputs = [{n: torch.zeros_like(t, dtype=torch.float64) if t.is_floating_point() else t.clone()
                        for n, t in tensors.items()} for _ in stds]
            meta_info = meta.get("info", {})
        for j, out in enumerate(outputs):
            for n, t in tensors.items():
                if t.is_floating_point() and n in out and out[n].dtype == torch.float64:
                    out[n].add_(t.to(torch.float64), alpha=float(coefs[k, j]))
        if progress is not None:
            progress(k + 1, len(used))
    # Buffers (Fourier features) are the same in every snapshot: take them from the last one.
    for out in outputs:
        for n, t in tensors.items():
            if n.endswith(("freqs", "phases")):
                out[n] = t.clone()

    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    network = NetworkConfig.from_dict(used[0].network)
    reports = []
    for j, (std, out) in enumerate(zip(stds, outputs)):
        state = {n: t.to(torch.float32) if t.is_floating_point() else t for n, t in out.items()}
        err = profile_error(in_nimg, in_std, coefs[:, j], nimg, std)
        info = {**meta_info, "reconstructed": True, "profile_error": err, "num_snapshots": len(used)}
        path = outdir / posthoc_name(nimg, std)
        save_snapshot(path, Snapshot(state, network, std, nimg, info))
        reports.append({"path": str(path), "sigma_rel": std, "nimg": nimg, "profile_error": err,
                        "num_snapshots": len(used)})
    return reports
