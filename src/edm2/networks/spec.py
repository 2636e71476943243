"""One description of every network: an official class name and its constructor arguments, and one builder.

`NetworkConfig` describes EDM2's `Precond` (typed fields, the official argument names and defaults; a test holds
them to the signatures of `Precond` and `UNet`); `EDMNetworkConfig` describes a network of the EDM release (one of
the four preconditionings and its flat official arguments). Both answer `class_name` and `kwargs`, and
`build_network(spec)` builds either, as an official pickle's `init_kwargs` would.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from edm2.networks.edm2 import Precond, UNet
from edm2.networks.precond import EDMPrecond, VEPrecond, VPPrecond, iDDPMPrecond

__all__ = ["NetworkConfig", "EDMNetworkConfig", "NetworkSpec", "NETWORK_CLASSES", "build_network",
           "network_class_name", "network_spec"]

# The one mapping from an official class name to a network ("Precond" is EDM2's).
NETWORK_CLASSES: dict[str, type[torch.nn.Module]] = {
    "VPPrecond": VPPrecond, "VEPrecond": VEPrecond, "iDDPMPrecond": iDDPMPrecond, "EDMPrecond": EDMPrecond,
    "Precond": Precond,
}


def _plain(d: Mapping) -> dict:
    """JSON-able copy: tuples become lists."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


@dataclass(frozen=True)
class NetworkConfig:
    """Arguments of EDM2's `edm2.networks.Precond` (official names): its own, then those it hands to `UNet`."""

    class_name: ClassVar[str] = "Precond"

    img_resolution: int
    img_channels: int
    label_dim: int
    model_channels: int = 192
    channel_mult: tuple[int, ...] = (1, 2, 3, 4)
    channel_mult_noise: int | None = None
    channel_mult_emb: int | None = None
    num_blocks: int = 3
    attn_resolutions: tuple[int, ...] = (16, 8)
    label_balance: float = 0.5
    concat_balance: float = 0.5
    resample_filter: tuple[float, ...] = (1, 1)
    channels_per_head: int = 64
    dropout: float = 0.0
    res_balance: float = 0.3
    attn_balance: float = 0.3
    clip_act: float | None = 256
    config: str = "G"  # the ablation ladder's configuration (C-G, networks/ladder.py); G: the official network
    use_fp16: bool = True
    sigma_data: float = 0.5
    logvar_channels: int = 128

    @property
    def kwargs(self) -> dict:
        """The constructor arguments of `Precond`."""
        return self.to_dict()

    def __getitem__(self, name: str) -> Any:
        return getattr(self, name)  # read like the stored JSON (run["network"]["label_dim"])

    def to_dict(self) -> dict:
        """Plain JSON-able dict (tuples become lists); `config` only when it is not G, so that the official
        network's arguments stay the official code's."""
        d = _plain(dataclasses.asdict(self))
        if d["config"] == "G":
            del d["config"]
        return d

    def replace(self, **changes) -> NetworkConfig:
        """A copy with some arguments changed."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, d: Mapping) -> NetworkConfig:
        """Inverse of `to_dict`; unknown keys raise ValueError."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown network option(s) {unknown}; known: {sorted(names)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


@dataclass(frozen=True)
class EDMNetworkConfig:
    """A network of the EDM release: the official preconditioning class (`VPPrecond`, `VEPrecond`,
    `iDDPMPrecond`, `EDMPrecond`) and its official flat constructor arguments (those of the official
    train.py's network_kwargs, `model_type` and the model's options included)."""

    class_name: str
    kwargs: dict

    @property
    def img_resolution(self) -> int:
        return self.kwargs["img_resolution"]

    @property
    def img_channels(self) -> int:
        return self.kwargs["img_channels"]

    @property
    def label_dim(self) -> int:
        return self.kwargs.get("label_dim", 0)

    @property
    def use_fp16(self) -> bool:
        return bool(self.kwargs.get("use_fp16", False))

    @property
    def dropout(self) -> float:
        return self.kwargs.get("dropout", 0.10)

    def __getitem__(self, name: str) -> Any:
        return self.kwargs[name]  # read like the stored JSON (run["network"]["augment_dim"])

    def to_dict(self) -> dict:
        """The constructor arguments as plain JSON data (tuples become lists)."""
        return _plain(self.kwargs)

    def replace(self, **changes) -> EDMNetworkConfig:
        """A copy with some constructor arguments changed."""
        return EDMNetworkConfig(self.class_name, {**self.kwargs, **changes})


NetworkSpec = NetworkConfig | EDMNetworkConfig


def network_spec(class_name: str | None, kwargs: Mapping) -> NetworkSpec:
    """The spec of official class `class_name` (None or 'Precond': EDM2's) with arguments `kwargs`."""
    if class_name is None or class_name == NetworkConfig.class_name:
        return NetworkConfig.from_dict(kwargs)
    if class_name not in NETWORK_CLASSES:
        raise ValueError(f"unknown network class {class_name!r}; choose one of {', '.join(NETWORK_CLASSES)}")
    return EDMNetworkConfig(str(class_name), dict(kwargs))


def build_network(spec: NetworkSpec | str, kwargs: Mapping | None = None) -> torch.nn.Module:
    """The network a spec describes (or official class `spec` with the flat arguments `kwargs`, as an official
    pickle's `init_kwargs` or an edm2 snapshot holds them), freshly initialized. For the four EDM
    preconditionings, arguments that are not the class's own go to its `model_type` (flat, as the official
    constructors take them); ValueError names unknown classes and arguments."""
    class_name, kwargs = (spec, kwargs or {}) if isinstance(spec, str) else (spec.class_name, spec.kwargs)
    kwargs = dict(kwargs)
    if class_name not in NETWORK_CLASSES:
        raise ValueError(f"unknown network class {class_name!r}; choose one of {', '.join(NETWORK_CLASSES)}")
    cls = NETWORK_CLASSES[class_name]
    params = set(inspect.signature(cls.__init__).parameters) - {"self"}
    if cls is Precond:
        unknown = sorted(set(kwargs) - params - set(inspect.signature(UNet.__init__).parameters))
        if unknown:
            raise ValueError(f"unknown argument(s) {unknown} for Precond")
        return Precond(**kwargs)
    missing = [k for k in ("img_resolution", "img_channels") if k not in kwargs]
    if missing:
        raise ValueError(f"{class_name} needs {' and '.join(missing)}")
    if "model_kwargs" in kwargs:
        raise ValueError(f"{class_name}: a network spec takes the model's arguments flat, not as model_kwargs")
    return cls(**kwargs)  # the official signature: the model's arguments flat


def network_class_name(net: torch.nn.Module) -> str:
    """The official class name of an edm2 network (the key of `NETWORK_CLASSES`)."""
    for name, cls in NETWORK_CLASSES.items():
        if type(net) is cls:
            return name
    raise ValueError(f"{type(net).__name__} is not one of the networks edm2 can rebuild ({', '.join(NETWORK_CLASSES)})")
