"""`--transfer`: fine-tune from an existing network (as the EDM release's train.py --transfer). The source is a
snapshot, an official network pickle, a URL of either, or a published model by name (`edm2 info --generation`);
its network must be the one the run trains, and its weights are where the run starts.
"""

from __future__ import annotations

import warnings

import torch

from edm2.files import Snapshot, load_network
from edm2.networks.spec import NetworkSpec
from edm2.published import GENERATION_PRESETS

__all__ = ["transfer_location", "open_transfer", "transfer_network", "load_transfer_weights"]

# Training choices, not shape: a fine-tuning run may change them.
_FREE = ("dropout", "use_fp16")


def transfer_location(source: str) -> str:
    """The file or URL of a --transfer source: a published model's name stands for its main network's URL."""
    preset = GENERATION_PRESETS.get(source)
    return preset.net_url if preset is not None else source


def open_transfer(source: str) -> tuple[torch.nn.Module, Snapshot]:
    """The network of a --transfer source and its snapshot (an official pickle converted without running code)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "converted on the fly": expected here, the run records the source
        net, snap = load_network(transfer_location(source), "cpu")
    if snap.network is None:
        raise ValueError(f"--transfer {source}: the file holds no edm2 network (a generic model)")
    return net, snap


def _shape(spec: NetworkSpec) -> dict:
    """The arguments that fix the network's shape, with its official class."""
    return {"class": spec.class_name, **{k: v for k, v in spec.to_dict().items() if k not in _FREE}}


def transfer_network(source: str, built: NetworkSpec, encoder: dict, dropout: float | None,
                     use_fp16: bool | None, take_from_source: bool) -> NetworkSpec:
    """The network a fine-tuning run trains: the source's own (`take_from_source`: no --preset or network option
    was given) with the run's dropout, or `built` (the preset's network for the data), which must then have the
    source's shape. In both cases the source must work in the data's space (`encoder`: the run's, as a dict) and
    fit the data's resolution, channels and labels; `dropout` and `use_fp16` (None: the source's) may change.
    ValueError naming what differs otherwise."""
    _, snap = open_transfer(source)
    theirs = snap.network
    their_space = (snap.encoder or {"class": "StandardRGBEncoder"})["class"]
    if their_space != encoder["class"]:
        raise ValueError(f"--transfer {source} works on {their_space} data, this dataset on {encoder['class']}; "
                         "fine-tune on data of the same kind (pixels or VAE latents)")
    if take_from_source:
        net = theirs.replace(dropout=theirs.dropout if dropout is None else dropout,
                             use_fp16=theirs.use_fp16 if use_fp16 is None else use_fp16)
        data_shape = {k: getattr(built, k) for k in ("img_resolution", "img_channels", "label_dim")}
        wrong = {k: (getattr(net, k), v) for k, v in data_shape.items() if getattr(net, k) != v}
    else:
        net = built
        mine, other = _shape(built), _shape(theirs)
        wrong = {k: (other.get(k), mine.get(k)) for k in sorted(set(mine) | set(other)) if mine.get(k) != other.get(k)}
    if wrong:
        diff = ", ".join(f"{k} {a} (source) vs {b} (this run)" for k, (a, b) in wrong.items())
        raise ValueError(f"--transfer {source} is another network than this run trains: {diff}; "
                         + ("leave out --preset and the network options to take the source's network, or "
                            if not take_from_source else "") + "train on data of the source's shape and labels")
    return net


def load_transfer_weights(net: torch.nn.Module, source: str) -> None:
    """Copy the source's weights into the run's freshly built network (same shape, checked by
    `transfer_network`)."""
    theirs, _ = open_transfer(source)
    state = {k: v.to(dtype=net.state_dict()[k].dtype) for k, v in theirs.state_dict().items()}
    net.load_state_dict(state, strict=True)
