"""Official network pickles -> edm2 snapshots: the records `edm2.files.pickles` reads, rebuilt as our networks.

A snapshot pickle of the official code is a dict with `ema` (the network), `loss_fn`, `dataset_kwargs` and, in
EDM2, `encoder` (EDM: `augment_pipe`). The network record's class name (EDM2's `Precond`; EDM's `VPPrecond`,
`VEPrecond`, `iDDPMPrecond`, `EDMPrecond`) and its recorded constructor arguments make our network spec
(`network_from_record`), from which our network is built and the recorded state loaded with `strict=True`. The
encoder and loss records are carried into the snapshot metadata in the official terms (class name and constructor
arguments).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edm2.files.pickles import Record, read_pickle
from edm2.files.snapshot import Snapshot, check_network_fits, save_snapshot
from edm2.networks.spec import NetworkSpec, build_network, network_spec
from edm2.schedules import VE_SIGMA_MAX, VE_SIGMA_MIN, VP_BETA_D, VP_BETA_MIN, VP_EPSILON_T

__all__ = ["ConvertedNetwork", "OFFICIAL_POSITIONAL", "network_from_record", "convert_network_pickle",
           "snapshot_from_pickle", "convert_pickle", "constructor_kwargs", "load_strict", "encoder_from_record",
           "loss_from_record", "kimg_to_nimg", "time_from_name", "read_network_state"]


@dataclass
class ConvertedNetwork:
    """What an official pickle holds, in edm2's terms: everything `edm2.files.snapshot.Snapshot` needs."""

    network: NetworkSpec  # EDM2's Precond, or an EDM (2022) preconditioning
    state_dict: dict[str, torch.Tensor]  # float32
    parameter_names: tuple[str, ...]  # the averaged tensors (the official EMA averages parameters, copies buffers)
    encoder: dict  # {"class": ..., "kwargs": {...}}
    info: dict  # the loss, the dataset arguments and where the network came from
    nimg: int  # training time deduced from the official file name, 0 when it has none
    sigma_rel: float | None  # EMA length from the official file name


# ----------------------------------------------------------------------------------------------------
# Networks: the official class name and the recorded arguments make one spec (`edm2.networks.spec`), built and
# loaded with the recorded weights.

# Positional parameters of the official constructors, to name recorded `_init_args`.
_EDM_POSITIONAL = ("img_resolution", "img_channels", "label_dim", "use_fp16")
OFFICIAL_POSITIONAL: dict[str, tuple[str, ...]] = {
    "Precond": (*_EDM_POSITIONAL, "sigma_data", "logvar_channels"),  # EDM2 (training/networks_edm2.py)
    **{name: _EDM_POSITIONAL for name in ("VPPrecond", "VEPrecond", "iDDPMPrecond", "EDMPrecond")},  # EDM
}


def constructor_kwargs(record: Record, positional: tuple[str, ...]) -> dict[str, Any]:
    """The recorded constructor arguments of `record` as keyword arguments (positional ones named)."""
    if len(record.init_args) > len(positional):
        raise ValueError(f"{record.class_name} was built with {len(record.init_args)} positional arguments; "
                         f"expected at most {len(positional)}")
    kwargs = dict(zip(positional, record.init_args))
    kwargs.update(record.init_kwargs)
    return {k: _jsonable(v) for k, v in kwargs.items()}


def load_strict(net: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """Load `state` (any float dtype) into `net` with strict names and shapes; ValueError naming the first
    difference. Returns our network's float32 state dict."""
    ours = net.state_dict()
    missing, unexpected = sorted(set(ours) - set(state)), sorted(set(state) - set(ours))
    if missing or unexpected:
        raise ValueError(f"{what}: the recorded weights do not match the network its arguments describe "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    for name, value in state.items():
        if tuple(value.shape) != tuple(ours[name].shape):
            raise ValueError(f"{what}: {name} has shape {list(value.shape)}, the network expects "
                             f"{list(ours[name].shape)}")
    net.load_state_dict({k: v.to(ours[k].dtype) for k, v in state.items()}, strict=True)
    return {k: v.detach() for k, v in net.state_dict().items()}


def _spec_of(record: Record) -> NetworkSpec:
    """The spec of the network an official pickle records (its class name and constructor arguments)."""
    kwargs = constructor_kwargs(record, OFFICIAL_POSITIONAL[record.class_name])
    try:
        return network_spec(record.class_name, kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{record.class_name} arguments edm2 does not know: {e}") from None


def network_from_record(record: Record) -> tuple[NetworkSpec, dict[str, torch.Tensor]]:
    """The spec of the network an official pickle records, and its weights loaded into our network (float32). The
    recorded arguments are checked against the recorded tensors' shapes before anything is allocated."""
    spec = _spec_of(record)
    state = record.state_dict()
    try:
        check_network_fits(spec, {k: tuple(v.shape) for k, v in state.items()})
    except ValueError as e:
        raise ValueError(f"{record.class_name}: {e}") from None
    return spec, load_strict(build_network(spec), state, record.class_name)


# ----------------------------------------------------------------------------------------------------
# Encoders and losses: official class name + constructor arguments (defaults of the official signatures filled in).

ENCODER_DEFAULTS: dict[str, dict[str, Any]] = {
    "StandardRGBEncoder": {},
    "StabilityVAEEncoder": {"vae_name": "stabilityai/sd-vae-ft-mse", "raw_mean": [5.81, 3.25, 0.12, -2.15],
                            "raw_std": [4.17, 4.62, 3.71, 3.28], "final_mean": 0, "final_std": 0.5},
}
LOSS_DEFAULTS: dict[str, dict[str, Any]] = {
    "EDM2Loss": {"P_mean": -0.4, "P_std": 1.0, "sigma_data": 0.5},
    "EDMLoss": {"P_mean": -1.2, "P_std": 1.2, "sigma_data": 0.5},
    "VPLoss": {"beta_d": VP_BETA_D, "beta_min": VP_BETA_MIN, "epsilon_t": VP_EPSILON_T},
    "VELoss": {"sigma_min": VE_SIGMA_MIN, "sigma_max": VE_SIGMA_MAX},
}


def encoder_from_record(record: Record | None) -> dict:
    """The snapshot's encoder entry; None (EDM pickles have no encoder) means standard RGB."""
    if record is None:
        return {"class": "StandardRGBEncoder", "kwargs": {}}
    if not isinstance(record, Record) or record.class_name not in ENCODER_DEFAULTS:
        name = record.class_name if isinstance(record, Record) else type(record).__name__
        raise ValueError(f"unknown encoder {name}; edm2 knows {', '.join(ENCODER_DEFAULTS)}")
    defaults = ENCODER_DEFAULTS[record.class_name]
    kwargs = {**defaults, **{k: v for k, v in constructor_kwargs(record, tuple(defaults)).items() if k in defaults}}
    if record.class_name == "StabilityVAEEncoder":
        _check_vae_scaling(kwargs, record.attributes)
    return {"class": record.class_name, "kwargs": kwargs}


def _check_vae_scaling(kwargs: dict, attributes: dict) -> None:
    """The recorded scale/bias must follow from the recorded arguments (else the arguments were not recorded)."""
    if "scale" not in attributes or "bias" not in attributes:
        return
    scale = np.float32(kwargs["final_std"]) / np.asarray(kwargs["raw_std"], dtype=np.float32)
    bias = np.float32(kwargs["final_mean"]) - np.asarray(kwargs["raw_mean"], dtype=np.float32) * scale
    if not (np.allclose(attributes["scale"], scale, rtol=1e-5) and np.allclose(attributes["bias"], bias, atol=1e-5)):
        raise ValueError("StabilityVAEEncoder: its recorded scale and bias do not follow from its recorded "
                         "arguments; cannot tell the latent statistics")


def loss_from_record(record: Any) -> dict | None:
    """The loss entry of the snapshot info: {"class": ..., "kwargs": {...}}, None when the pickle has none."""
    if not isinstance(record, Record):
        return None
    defaults = LOSS_DEFAULTS.get(record.class_name, {})
    return {"class": record.class_name, "kwargs": {**defaults, **constructor_kwargs(record, tuple(defaults))}}


# ----------------------------------------------------------------------------------------------------
# The whole pickle.


def kimg_to_nimg(kimg: int) -> int:
    """Training time in images from the thousands in an official file name (snapshots fall on multiples
    of 1024 images; the same deduction as the official post-hoc EMA script)."""
    return (kimg * 1000 + 999) // 1024 * 1024


def time_from_name(path: str | Path) -> tuple[int, float | None]:
    """(nimg, sigma_rel) of an official snapshot name: `network-snapshot-<kimg>-<std>.pkl` (EDM2's raw snapshots),
    `network-snapshot-<kimg>.pkl` (EDM: sigma_rel None); (0, None) for other names."""
    path = Path(path)
    m = re.fullmatch(r".*-(\d+)-(\d+\.\d+)\.pkl", path.name)
    if m:
        return kimg_to_nimg(int(m.group(1))), float(m.group(2))
    m = re.fullmatch(r".*-(\d+)\.pkl", path.name)  # EDM: network-snapshot-<kimg>.pkl
    return (kimg_to_nimg(int(m.group(1))), None) if m else (0, None)


def _network_record(data: Any, source: str) -> Record:
    if not isinstance(data, dict) or "ema" not in data:
        what = f"a dict with keys {sorted(map(str, data))[:6]}" if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{source}: not an official network snapshot (it holds {what}, no 'ema' network)")
    record = data["ema"]
    if not isinstance(record, Record):
        raise ValueError(f"{source}: its 'ema' is a {type(record).__name__}, not a network of the official code")
    if record.class_name not in OFFICIAL_POSITIONAL:
        raise ValueError(f"{source}: its network is a {record.class_name}, which edm2 cannot convert (known: "
                         f"{', '.join(OFFICIAL_POSITIONAL)})")
    return record


def convert_network_pickle(path: str | Path) -> ConvertedNetwork:
    """Read an official network pickle (no code is run) and rebuild its network as edm2's, in float32."""
    path = Path(path)
    data = read_pickle(path)
    record = _network_record(data, str(path))
    try:
        config, state = network_from_record(record)
        encoder = encoder_from_record(data.get("encoder"))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    nimg, sigma_rel = time_from_name(path)
    info = {"converted_from": path.name, "official_class": record.class_name,
            "loss": loss_from_record(data.get("loss_fn")),
            "dataset_kwargs": _jsonable(data.get("dataset_kwargs"))}
    names = tuple(sorted(name for name, _ in _parameter_names(record)))
    return ConvertedNetwork(config, state, names, encoder, info, nimg, sigma_rel)


def read_network_state(path: str | Path) -> tuple[NetworkSpec, dict[str, torch.Tensor]]:
    """The network spec an official pickle records and its recorded tensors (state-dict names, in the recorded
    dtype: float16 in EDM2's snapshots), without building the network: for streaming many snapshots of one network
    whose first one was converted (`convert_network_pickle`). No code is run; ValueError naming the file."""
    path = Path(path)
    record = _network_record(read_pickle(path), str(path))
    try:
        spec = _spec_of(record)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return spec, record.state_dict()


def _parameter_names(record: Record, prefix: str = ""):
    for name, value in record.parameters.items():
        if value is not None:
            yield prefix + name, value
    for name, module in record.modules.items():
        if module is not None:
            yield from _parameter_names(module, f"{prefix}{name}.")


def _jsonable(value: Any) -> Any:
    """Recorded values as JSON: numpy numbers and arrays become Python numbers and lists, tuples lists."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def snapshot_from_pickle(path: str | Path, allow_nonfinite: bool = False) -> Snapshot:
    """An official network pickle as an edm2 `Snapshot` (in memory; nothing is written). ValueError naming the
    first tensor with NaN or Inf values, unless `allow_nonfinite` (then a `NonFiniteWarning`)."""
    c = convert_network_pickle(path)
    snap = Snapshot(c.state_dict, c.network, c.sigma_rel, c.nimg, c.info, c.parameter_names, c.encoder)
    return snap.check_finite(str(path), allow_nonfinite)


def convert_pickle(src: str | Path, dest: str | Path, allow_nonfinite: bool = False) -> Snapshot:
    """Convert an official network pickle into an edm2 snapshot file `dest` (written atomically, only after the
    whole pickle has been read and checked; non-finite weights are refused unless `allow_nonfinite`)."""
    dest = Path(dest)
    if dest.suffix != ".safetensors":
        raise ValueError(f"{dest}: the converted snapshot is a .safetensors file; name it so")
    snap = snapshot_from_pickle(src, allow_nonfinite)
    dest.parent.mkdir(parents=True, exist_ok=True)
    save_snapshot(dest, snap)
    return snap
