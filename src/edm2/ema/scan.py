"""The snapshots of a folder, as post-hoc reconstruction reads them: their headers (time, sigma_rel, network), the
checks that they form one series, and the tensors of one snapshot at a time.

Two kinds of file are snapshots: edm2's snapshot files (`snapshot-<nimg>-<std>.safetensors`, float32 or float16,
with a JSON header) and the raw snapshots of the official EDM2 training (`network-snapshot-<kimg>-<std>.pkl`,
float16, read by the code-free reader `edm2.files.pickles`, no code run). An official snapshot's time and length
come from its name, as the official `reconstruct_phema.py` deduces them (`kimg_to_nimg`; a snapshot at time 0 is
left out, as there); the first one used is converted to learn the network, and every other one is checked against
it when its tensors are read.

A folder of snapshots is valid input when (1) every file comes from the same network, (2) every snapshot
time holds exactly one file per tracked sigma_rel, and (3) no snapshot is missing: a gap between two
consecutive snapshot times (the first one counted from time 0) may not exceed 1.5 times every gap next
to it, since a regular series with one snapshot removed has a gap twice its neighbours. Thinned series
(every other snapshot) and a changed interval stay valid; `allow_gaps=True` accepts irregular series.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from edm2.files import read_metadata
from edm2.files.pickle_convert import convert_network_pickle, read_network_state, time_from_name

__all__ = ["GAP_RATIO", "OFFICIAL_SNAPSHOT_NAME", "SnapshotInfo", "scan_snapshots", "is_official_snapshot",
           "snapshot_header", "read_official_tensors"]

GAP_RATIO = 1.5  # a gap longer than this times each neighbouring gap means a snapshot is missing
# The official raw snapshot names, `<prefix>-<kimg>-<std>.pkl` (the pattern the official script lists).
OFFICIAL_SNAPSHOT_NAME = re.compile(r"(.*)-(\d+)-(\d+\.\d+)\.pkl")


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
    # An official raw snapshot's header, as a converted snapshot would carry it ("info", "encoder"); None: read
    # from the file (edm2 snapshots).
    header: dict | None = field(default=None, compare=False, repr=False)


def is_official_snapshot(info: SnapshotInfo) -> bool:
    """Whether `info` is an official raw snapshot (a pickle) rather than an edm2 snapshot file."""
    return info.path.suffix == ".pkl"


def snapshot_header(info: SnapshotInfo) -> dict:
    """The metadata of a snapshot (its `info` and `encoder` entries above all), for either kind of file."""
    return dict(info.header) if info.header is not None else read_metadata(info.path)


def _signature(info: SnapshotInfo) -> str:
    return json.dumps([info.network, info.parameter_names, info.network_class], sort_keys=True)


def _edm2_snapshots(source: Path) -> list[SnapshotInfo]:
    """The EMA snapshot files of a folder (checkpoints, raw weights and reconstructions skipped)."""
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
    return infos


def _official_snapshots(source: Path) -> list[SnapshotInfo]:
    """The official raw snapshots of a folder, from their names alone (the network is filled in later)."""
    infos = []
    for path in sorted(source.glob("*.pkl")):
        if not OFFICIAL_SNAPSHOT_NAME.fullmatch(path.name) or not path.is_file():
            continue
        nimg, sigma_rel = time_from_name(path)
        if nimg > 0:  # as the official script: the snapshot at time 0 averages nothing
            infos.append(SnapshotInfo(path, nimg, float(sigma_rel), None, (), None))
    return infos


def _with_official_network(infos: list[SnapshotInfo]) -> list[SnapshotInfo]:
    """Every official snapshot with the network of the first one, which is converted (read whole, checked that
    its weights fit the network its arguments describe); the others are checked when their tensors are read."""
    official = sorted((i for i in infos if is_official_snapshot(i)), key=lambda i: (i.nimg, i.sigma_rel))
    if not official:
        return infos
    c = convert_network_pickle(official[0].path)
    known = dict(network=c.network.to_dict(), parameter_names=tuple(sorted(c.state_dict)),
                 averaged_names=tuple(c.parameter_names),
                 network_class=None if c.network.class_name == "Precond" else c.network.class_name,
                 header={"info": c.info, "encoder": c.encoder, "nimg": c.nimg, "sigma_rel": c.sigma_rel})
    return [dataclasses.replace(i, **known) if is_official_snapshot(i) else i for i in infos]


def read_official_tensors(info: SnapshotInfo) -> dict[str, torch.Tensor]:
    """The tensors of an official raw snapshot in their recorded dtype, after checking that it records the
    network `info` names (that of the folder's first official snapshot)."""
    spec, tensors = read_network_state(info.path)
    ours = None if spec.class_name == "Precond" else spec.class_name
    if (spec.to_dict(), ours) != (info.network, info.network_class):
        raise ValueError(f"{info.path}: records another network ({spec.class_name} with other arguments) than the "
                         "first snapshot of the folder; keep one run's snapshots per folder")
    return tensors


def scan_snapshots(source: str | Path, stds: Sequence[float] | None = None,
                   allow_gaps: bool = False) -> list[SnapshotInfo]:
    """The EMA snapshots in a run folder or a folder of snapshots (headers only), sorted by (time, sigma_rel):
    edm2 snapshot files and official raw snapshots (`network-snapshot-<kimg>-<std>.pkl`).

    `stds` keeps only the snapshots of those tracked sigma_rels (e.g. one, to reconstruct from a single
    average per snapshot). Checkpoints, raw weights and earlier reconstructions are skipped. ValueError
    when there are none, when files come from different networks, when a (time, sigma_rel) appears twice,
    when a time lacks one of the tracked sigma_rels, or (unless `allow_gaps`) when a snapshot is missing
    from the series (see the module docstring).
    """
    source = Path(source)
    if not source.is_dir():
        raise ValueError(f"{source}: not a folder; pass a training run folder or a folder of snapshots")
    infos = _edm2_snapshots(source) + _official_snapshots(source)
    if not infos:
        raise ValueError(f"{source}: holds no EMA snapshots (snapshot-*.safetensors written during training, or "
                         "the official network-snapshot-<kimg>-<std>.pkl)")
    if stds is not None:
        infos = _keep_stds(source, infos, stds)
    infos = _with_official_network(infos)
    _check_one_network(infos)
    _check_series(infos, allow_gaps)
    return sorted(infos, key=lambda i: (i.nimg, i.sigma_rel))


def _keep_stds(source: Path, infos: list[SnapshotInfo], stds: Sequence[float]) -> list[SnapshotInfo]:
    present = sorted({round(i.sigma_rel, 6) for i in infos})
    wanted = {round(float(s), 6) for s in stds}
    absent = sorted(wanted - set(present))
    if absent:
        raise ValueError(f"{source}: has no snapshots with sigma_rel {absent}; it holds {present}")
    return [i for i in infos if round(i.sigma_rel, 6) in wanted]


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


def _check_series(infos: Sequence[SnapshotInfo], allow_gaps: bool) -> None:
    """One file per (time, sigma_rel), every time with every tracked sigma_rel, no snapshot missing."""
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


def _check_gaps(times: list[int], file_at: Mapping[int, Path]) -> None:
    gaps = np.diff([0, *times])
    for k, gap in enumerate(gaps):
        neighbours = [gaps[j] for j in (k - 1, k + 1) if 0 <= j < len(gaps)]
        if neighbours and all(gap > GAP_RATIO * n for n in neighbours):
            start = "time 0" if k == 0 else f"{times[k - 1]} ({file_at[times[k - 1]].name})"
            raise ValueError(f"snapshots missing between {start} and {times[k]} ({file_at[times[k]].name}): gap "
                             f"{gap} is over {GAP_RATIO}x the neighbouring gaps {[int(n) for n in neighbours]}; "
                             "restore the missing files or allow irregular gaps (--allow-gaps)")
