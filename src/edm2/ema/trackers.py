"""EMA trackers: they average a model during training and write the averages as snapshots.

`PosthocEMA` (EDM2 Section 3, usable in any PyTorch training loop) tracks power-function profiles, from which
`edm2.ema.reconstruct` later synthesizes any other EMA length; `TraditionalEMATracker` is the EMA of the EDM
release (snapshots `snapshot-<nimg>-ema.safetensors`); `EMATrackers` puts several behind the one interface the
training loop uses (`update`, `save_snapshots`, `state_dict`, `load_state_dict`).

Time is an integer that only has to grow: images (as our trainer counts) or optimizer steps. The profiles
depend only on ratios of times, so both give the same averages.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from edm2.ema.power import MAX_SIGMA_REL, PowerFunctionEMA, TraditionalEMA
from edm2.files.snapshot import Snapshot, ema_snapshot_filename, save_snapshot, snapshot_filename
from edm2.networks.spec import NetworkSpec
from edm2.runtime import world_info

__all__ = ["PosthocEMA", "TraditionalEMATracker", "EMATrackers"]

SNAPSHOT_DTYPES = (torch.float32, torch.float16)  # what snapshot files may hold; the averages stay as they are


def _snapshot_dtype(dtype: torch.dtype) -> torch.dtype:
    """`dtype` when snapshot files may hold it; ValueError otherwise."""
    if dtype not in SNAPSHOT_DTYPES:
        raise ValueError(f"snapshot_dtype must be torch.float32 or torch.float16, got {dtype}")
    return dtype


def _cast(state: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The state dict with its floating-point tensors in `dtype` (as the official EDM2 loop writes its snapshots
    in float16); integer tensors stay."""
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


class PosthocEMA:
    """Power-function EMAs of a model, saved as snapshots for post-hoc reconstruction.

    Call `update(t)` after an optimizer step, or every few steps: `t` is the current time (images or steps
    seen so far) and the update covers everything since the previous one, so that updating every k steps
    gives the power-function average of the parameters sampled at the update times. Averages start from
    the parameters at construction (time 0). Every `snapshot_every` time units, the first update past each
    multiple writes one snapshot per sigma_rel into `outdir` (`snapshot-<t>-<sigma_rel>.safetensors`); only
    rank 0 of a distributed job writes. `network` (edm2 models) makes the snapshots usable by
    `edm2 generate`; `info` is stored in their metadata. Averages are kept in the parameters' dtype; the
    snapshot files hold `snapshot_dtype` (float32, or float16 as the official EDM2 runs write them).
    """

    def __init__(self, model: torch.nn.Module, outdir: str | Path, stds: Sequence[float] = (0.05, 0.10),
                 snapshot_every: int | None = None, network: NetworkSpec | None = None,
                 info: Mapping | None = None, rank: int | None = None, encoder: dict | None = None,
                 snapshot_dtype: torch.dtype = torch.float32) -> None:
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
        self.encoder = encoder
        self.snapshot_dtype = _snapshot_dtype(snapshot_dtype)
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
            save_snapshot(path, Snapshot(_cast(state, self.snapshot_dtype), self.network, std, self.t, self.info,
                                         tuple(self.ema.names), self.encoder))
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


class TraditionalEMATracker:
    """The EMA of the EDM release: beta = 0.5^(batch / half-life), the half-life at most `rampup_ratio` times the
    images seen before the step (as the official loop updates it before counting the step's images). Every
    `snapshot_every` images (and on `save_snapshots`) rank 0 writes the average as a snapshot, in
    `snapshot_dtype` (the official EDM loop writes float32)."""

    def __init__(self, model: torch.nn.Module, outdir: str | Path, halflife_Mimg: float,
                 rampup_ratio: float | None = 0.05, snapshot_every: int | None = None,
                 network: NetworkSpec | None = None, info: Mapping | None = None,
                 rank: int | None = None, encoder: dict | None = None,
                 snapshot_dtype: torch.dtype = torch.float32) -> None:
        if not halflife_Mimg >= 0 or (rampup_ratio is not None and not rampup_ratio > 0):
            raise ValueError(f"need an EMA half-life >= 0 and a ramp-up ratio > 0 (or None), got {halflife_Mimg} "
                             f"and {rampup_ratio}")
        self.ema = TraditionalEMA(model, halflife_Mimg, rampup_ratio)
        self.names = [name for name, _ in self.ema.net.named_parameters()]
        self.outdir = Path(outdir)
        self.snapshot_every = None if snapshot_every is None else int(snapshot_every)
        self.network = network
        self.info = {**dict(info or {}), "ema": "traditional", "ema_halflife_Mimg": halflife_Mimg,
                     "ema_rampup_ratio": rampup_ratio}
        self.encoder = encoder
        self.snapshot_dtype = _snapshot_dtype(snapshot_dtype)
        self.rank = world_info()[0] if rank is None else int(rank)
        self.t = 0

    def update(self, t: int, dt: int | None = None) -> list[Path]:
        """Advance the average over the step that ended at time `t` (`dt` images, default: since the last
        update); returns the snapshot written, if this update crossed a multiple of `snapshot_every`."""
        t = int(t)
        dt = t - self.t if dt is None else int(dt)
        if not 0 < dt <= t or t <= self.t:
            raise ValueError(f"update at {t} (span {dt}) does not follow the previous update at {self.t}")
        self.ema.update(t - dt, dt)
        previous, self.t = self.t, t
        if self.snapshot_every is not None and t // self.snapshot_every > previous // self.snapshot_every:
            return self.save_snapshots()
        return []

    def state_dicts(self) -> list[tuple[None, dict[str, torch.Tensor]]]:
        """[(None, state dict)]: the averaged parameters with the module's live buffers."""
        sd = {k: v.detach().clone() for k, v in self.ema.net.state_dict().items()}
        sd.update(zip(self.names, (t.clone() for t in self.ema.ema)))
        return [(None, sd)]

    def save_snapshots(self) -> list[Path]:
        """Write the average now (rank 0)."""
        if self.rank != 0:
            return []
        self.outdir.mkdir(parents=True, exist_ok=True)
        path = self.outdir / ema_snapshot_filename(self.t)
        save_snapshot(path, Snapshot(_cast(self.state_dicts()[0][1], self.snapshot_dtype), self.network, None,
                                     self.t, self.info, tuple(self.names), self.encoder))
        return [path]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The average and the time, for resuming."""
        return {**dict(zip(self.names, self.ema.ema)), "time": torch.tensor(self.t, dtype=torch.int64)}

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        if set(state) != set(self.names) | {"time"}:
            raise ValueError("traditional EMA state does not match this model")
        for name, tensor in zip(self.names, self.ema.ema):
            tensor.copy_(state[name])
        self.t = int(state["time"])


class EMATrackers:
    """Several EMA trackers updated and saved together; their states are kept under `<key>/`."""

    def __init__(self, trackers: Mapping[str, object]) -> None:
        self.trackers = dict(trackers)

    def update(self, t: int) -> list[Path]:
        return [path for tracker in self.trackers.values() for path in tracker.update(t)]

    def save_snapshots(self) -> list[Path]:
        return [path for tracker in self.trackers.values() for path in tracker.save_snapshots()]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{key}/{k}": v for key, tracker in self.trackers.items() for k, v in tracker.state_dict().items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        for key, tracker in self.trackers.items():
            prefix = f"{key}/"
            tracker.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
