"""EMA trackers besides `PosthocEMA` for the training loop: the traditional EMA of the EDM release
(`TraditionalEMATracker`, snapshots `snapshot-<nimg>-ema.safetensors`) and `EMATrackers`, several trackers
behind the one interface the loop uses (`update`, `save_snapshots`, `state_dict`, `load_state_dict`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from edm2.checkpoint import Snapshot, ema_snapshot_filename, save_snapshot
from edm2.ema import TraditionalEMA
from edm2.presets import EDMNetworkConfig, NetworkConfig
from edm2.runtime import world_info

__all__ = ["TraditionalEMATracker", "EMATrackers"]


class TraditionalEMATracker:
    """The EMA of the EDM release: beta = 0.5^(batch / half-life), the half-life at most `rampup_ratio` times the
    images seen before the step (as the official loop updates it before counting the step's images). Every
    `snapshot_every` images (and on `save_snapshots`) rank 0 writes the average as a snapshot."""

    def __init__(self, model: torch.nn.Module, outdir: str | Path, halflife_Mimg: float,
                 rampup_ratio: float | None = 0.05, snapshot_every: int | None = None,
                 network: NetworkConfig | EDMNetworkConfig | None = None, info: Mapping | None = None,
                 rank: int | None = None, encoder: dict | None = None) -> None:
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
        save_snapshot(path, Snapshot(self.state_dicts()[0][1], self.network, None, self.t, self.info,
                                     tuple(self.names), self.encoder))
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
