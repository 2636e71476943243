"""Model files: names of snapshots, and the snapshot itself (`kind: "snapshot"` in the metadata).

A snapshot is one model's state dict + sigma_rel, training time, the names of the averaged tensors, a free-form
`info` dict, the encoder (how images map to the network's space), and the network it rebuilds: `network` holds
the constructor arguments and `network_class` the official class name (`VPPrecond`, `VEPrecond`,
`iDDPMPrecond`, `EDMPrecond`; absent: EDM2's `Precond`); `network` is None for models edm2 did not build.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from edm2.files.base import check_finite, load_tensors, save_tensors
from edm2.networks.spec import NetworkConfig, NetworkSpec, build_network, network_spec

__all__ = ["snapshot_filename", "posthoc_filename", "ema_snapshot_filename", "Snapshot", "save_snapshot",
           "load_snapshot", "network_from_metadata", "MAX_RESOLUTION", "estimate_parameters", "check_network_fits"]

MAX_RESOLUTION = 1 << 14  # an img_resolution above this is damaged metadata (the published models: at most 512)


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
    _finite_checked: bool = field(default=False, init=False, repr=False, compare=False)

    def check_finite(self, what: str = "snapshot", allow_nonfinite: bool = False) -> Snapshot:
        """ValueError naming `what` and the first tensor with NaN or Inf values (with `allow_nonfinite`: a
        `NonFiniteWarning`); once checked, `build` does not check again. Returns the snapshot."""
        check_finite(self.state_dict, what, allow_nonfinite)
        self._finite_checked = True
        return self

    def build(self, device: str | torch.device = "cpu", allow_nonfinite: bool = False) -> torch.nn.Module:
        """The network with these weights, in eval mode (a `Precond`, or an EDM preconditioning). Refused before
        anything is allocated when the network config does not fit the weights (`check_network_fits`), and when
        a weight is NaN or Inf unless `allow_nonfinite` (then a warning)."""
        if self.network is None:
            raise ValueError("snapshot holds no edm2 network config (a generic model); read its tensors with "
                             "edm2.files.load_tensors")
        check_network_fits(self.network, {k: tuple(v.shape) for k, v in self.state_dict.items()})
        if not self._finite_checked:
            self.check_finite("snapshot", allow_nonfinite)
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


def load_snapshot(path: str | Path, allow_nonfinite: bool = False) -> Snapshot:
    """Read a snapshot file of an edm2 network (ValueError when it has no network config, and when a tensor holds
    NaN or Inf values unless `allow_nonfinite`: then a `NonFiniteWarning`). `Snapshot.build` checks the config
    against the stored tensors."""
    tensors, meta = load_tensors(path, kind="snapshot")
    try:
        network = network_from_metadata(meta.get("network"), meta.get("network_class"))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: snapshot metadata has no valid network config ({e})") from None
    averaged = meta.get("averaged_names")
    snap = Snapshot(tensors, network, meta.get("sigma_rel"), int(meta.get("nimg", 0)), meta.get("info", {}),
                    None if averaged is None else tuple(averaged), meta.get("encoder"))
    return snap.check_finite(str(path), allow_nonfinite)


# ----------------------------------------------------------------------------------------------------
# Sizes: a network config is checked against the stored tensors before a network is built, so that damaged
# metadata (model_channels 10**7, img_resolution 10**6) is one line, not an attempt at allocating terabytes.


def _whole(value: object, default: int) -> int:
    """A positive size of a config, or `default` when it is not one (the builder then names the problem)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else default


def estimate_parameters(spec: NetworkSpec) -> int:
    """A rough count of the parameters of the network `spec` describes, from its sizes alone (no network is
    built): the widest level's 3x3 convolutions in every block of the encoder and decoder, the class embedding
    and the image convolutions. Within a small factor of the true count, and finite for any config."""
    kwargs = spec.kwargs
    channels = _whole(kwargs.get("model_channels"), 128)
    mult = kwargs.get("channel_mult", (1, 2, 2, 2))
    mult = [_whole(m, 1) for m in mult] if isinstance(mult, Sequence) and mult else [1]
    blocks = _whole(kwargs.get("num_blocks"), 1)
    widest = channels * max(mult)
    convs = len(mult) * (2 * blocks + 1) * 2 * 9 * widest * widest
    labels = _whole(kwargs.get("label_dim"), 0) * channels * 4
    return convs + labels + 2 * 9 * _whole(kwargs.get("img_channels"), 1) * channels


def _describe(spec: NetworkSpec) -> str:
    keys = ("img_resolution", "img_channels", "label_dim", "model_channels", "channel_mult", "num_blocks")
    return ", ".join(f"{k}={spec.kwargs[k]}" for k in keys if k in spec.kwargs)


def check_network_fits(spec: NetworkSpec, stored: Mapping[str, Sequence[int]]) -> None:
    """ValueError (one line) unless the network `spec` describes holds exactly the tensors `stored` (name ->
    shape), checked without allocating anything: an absurd resolution, or a size estimate (`estimate_parameters`)
    far beyond what is stored, is refused at once; else the network is built on the meta device and compared."""
    resolution = spec.kwargs.get("img_resolution")
    if not isinstance(resolution, int) or not 0 < resolution <= MAX_RESOLUTION:
        raise ValueError(f"its network config has img_resolution {resolution!r}, not a whole number in "
                         f"1..{MAX_RESOLUTION}; the metadata is damaged")
    count = sum(math.prod(shape) for shape in stored.values())
    estimate = estimate_parameters(spec)
    if estimate > 16 * count + 10**7:
        raise ValueError(f"its network config ({_describe(spec)}) describes about {estimate:.2g} parameters, but "
                         f"only {count} weights are stored; the weights do not fit its network config (damaged "
                         "metadata)")
    try:
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in build_network(spec).state_dict().items()}
    except (TypeError, ValueError, RuntimeError, ZeroDivisionError, KeyError) as e:
        raise ValueError(f"its network config cannot be built ({_describe(spec)}): "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    missing, unexpected = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
    if missing or unexpected:
        raise ValueError(f"the weights do not fit its network config ({_describe(spec)}): missing "
                         f"{missing[:3]}, unexpected {unexpected[:3]}")
    for name, shape in stored.items():
        if tuple(shape) != expected[name]:
            raise ValueError(f"the weights do not fit its network config ({_describe(spec)}): {name} is stored as "
                             f"{list(shape)}, the config makes {list(expected[name])}")
