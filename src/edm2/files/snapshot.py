"""Model files: names of snapshots, and the snapshot itself (`kind: "snapshot"` in the metadata).

A snapshot is one model's state dict + sigma_rel, training time, the names of the averaged tensors, a free-form
`info` dict, the encoder (how images map to the network's space), and the network it rebuilds: `network` holds
the constructor arguments and `network_class` the official class name (`VPPrecond`, `VEPrecond`,
`iDDPMPrecond`, `EDMPrecond`; absent: EDM2's `Precond`); `network` is None for models edm2 did not build.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from edm2.files.base import load_tensors, save_tensors
from edm2.networks.spec import NetworkConfig, NetworkSpec, build_network, network_spec

__all__ = ["snapshot_filename", "posthoc_filename", "ema_snapshot_filename", "Snapshot", "save_snapshot",
           "load_snapshot", "network_from_metadata"]


def snapshot_filename(t: int, sigma_rel: float) -> str:
    """Name of the snapshot of the EMA `sigma_rel` at time `t` (the trainer's and PosthocEMA's naming)."""
    return f"snapshot-{int(t):010d}-{sigma_rel:.3f}.safetensors"


def ema_snapshot_filename(nimg: int) -> str:
    """Name of the snapshot of the traditional EMA (EDM-release runs) after `nimg` images."""
    return f"snapshot-{int(nimg):010d}-ema.safetensors"


def posthoc_filename(nimg: int, sigma_rel: float, tag: str = "") -> str:
    """Name of a reconstructed snapshot; `tag` distinguishes reconstructions with per-tensor lengths."""
    return f"posthoc-{int(nimg):010d}-{sigma_rel:.3f}{'-' + tag if tag else ''}.safetensors"



@dataclass
class Snapshot:
    """A model's weights with what is needed to rebuild and describe it."""

    state_dict: dict[str, torch.Tensor]
    # EDM2 `Precond` arguments, or an EDM-release network (official class name and arguments); None: not an
    # edm2 network (a generic model tracked by PosthocEMA).
    network: NetworkSpec | None
    sigma_rel: float | None  # EMA length, None for raw training weights
    nimg: int  # training time in images (or any growing count, for generic models)
    info: dict  # preset, dataset description, anything else JSON-able
    averaged_names: tuple[str, ...] | None = None  # tensors that are EMAs (the rest are copies, e.g. buffers)
    # How images map to the network's space and back, in the official encoder's terms: {"class":
    # "StandardRGBEncoder", "kwargs": {}} (uint8 pixels <-> [-1, 1]) or {"class": "StabilityVAEEncoder",
    # "kwargs": {"vae_name": ..., "raw_mean": [...], "raw_std": [...], "final_mean": ..., "final_std": ...}}.
    # None: not recorded (files written before encoders existed: standard RGB).
    encoder: dict | None = None

    def build(self, device: str | torch.device = "cpu") -> torch.nn.Module:
        """The network with these weights, in eval mode (a `Precond`, or an EDM preconditioning)."""
        if self.network is None:
            raise ValueError("snapshot holds no edm2 network config (a generic model); read its tensors with "
                             "edm2.files.load_tensors")
        net = build_network(self.network)
        try:
            net.load_state_dict(self.state_dict, strict=True)
        except RuntimeError as e:
            raise ValueError(f"snapshot weights do not fit its network config: {str(e).splitlines()[0]}") from None
        return net.eval().requires_grad_(False).to(device)


def save_snapshot(path: str | Path, snapshot: Snapshot) -> None:
    """Atomically write a snapshot file (the one writer of snapshots: training, PosthocEMA, reconstruction)."""
    meta = {"kind": "snapshot", "network": None if snapshot.network is None else snapshot.network.to_dict(),
            "sigma_rel": snapshot.sigma_rel, "nimg": int(snapshot.nimg), "info": snapshot.info,
            "parameter_names": sorted(snapshot.state_dict), "encoder": snapshot.encoder}
    if snapshot.network is not None and snapshot.network.class_name != NetworkConfig.class_name:
        meta["network_class"] = snapshot.network.class_name  # absent: EDM2's Precond
    if snapshot.averaged_names is not None:
        missing = sorted(set(snapshot.averaged_names) - set(snapshot.state_dict))
        if missing:
            raise ValueError(f"averaged tensors {missing[:3]} are not in the state dict to write to {path}")
        meta["averaged_names"] = sorted(snapshot.averaged_names)
    save_tensors(path, snapshot.state_dict, meta)


def network_from_metadata(network: dict | None, network_class: str | None) -> NetworkSpec:
    """The network spec a snapshot's metadata describes: `network_class` absent (None) means EDM2's `Precond`
    with arguments `network`, else the official class of the EDM release with arguments `network`."""
    if not isinstance(network, dict):
        raise ValueError(f"no network config (got {type(network).__name__})")
    return network_spec(network_class, network)


def load_snapshot(path: str | Path) -> Snapshot:
    """Read a snapshot file of an edm2 network (ValueError when it has no network config)."""
    tensors, meta = load_tensors(path, kind="snapshot")
    try:
        network = network_from_metadata(meta.get("network"), meta.get("network_class"))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: snapshot metadata has no valid network config ({e})") from None
    averaged = meta.get("averaged_names")
    return Snapshot(tensors, network, meta.get("sigma_rel"), int(meta.get("nimg", 0)), meta.get("info", {}),
                    None if averaged is None else tuple(averaged), meta.get("encoder"))
