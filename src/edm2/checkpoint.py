"""Model files: safetensors tensors plus JSON metadata in the file header. The only module that reads or
writes them. Loading never executes code; writes are atomic (temporary file, then rename).

Two kinds of file:
- snapshot (`kind: "snapshot"`): one model's state dict + sigma_rel, training time, the names of the
  averaged tensors, a free-form `info` dict, and the edm2 network config (None for models edm2 did not
  build). With the config it is enough to rebuild the network (`load_network`).
- checkpoint (`kind: "checkpoint"`): the full training state for resuming (network, Adam, EMAs).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from edm2.networks import Precond
from edm2.presets import NetworkConfig

__all__ = ["FORMAT", "save_tensors", "load_tensors", "read_metadata", "Snapshot", "save_snapshot",
           "load_snapshot", "load_network", "atomic_write_text"]

FORMAT = "edm2"
VERSION = 1


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file so that readers see either the old or the complete new content."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict) -> None:
    """Atomically write `tensors` and JSON `metadata` (must include 'kind') as a safetensors file."""
    path = Path(path)
    meta = {"format": FORMAT, "version": VERSION, **metadata}
    tensors = {k: v.detach().contiguous().cpu().clone() for k, v in tensors.items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={FORMAT: json.dumps(meta)})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_metadata(path: str | Path, kind: str | None = None) -> dict:
    """The JSON metadata of an edm2 file; ValueError for missing, truncated or foreign files."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(FORMAT)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable safetensors file (truncated or foreign?): {e}") from None
    if raw is None:
        raise ValueError(f"{path}: a safetensors file without edm2 metadata; it was not written by edm2")
    try:
        meta = json.loads(raw)
    except ValueError:
        meta = None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: damaged edm2 metadata (not a JSON object); the file was not written by edm2")
    if kind is not None and meta.get("kind") != kind:
        raise ValueError(f"{path}: is an edm2 {meta.get('kind')!r} file, expected a {kind!r}")
    return meta


def load_tensors(path: str | Path, kind: str | None = None,
                 device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and metadata of an edm2 file (no code is executed)."""
    meta = read_metadata(path, kind)
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path}: truncated or damaged tensor data: {e}") from None
    return tensors, meta


@dataclass
class Snapshot:
    """A model's weights with what is needed to rebuild and describe it."""

    state_dict: dict[str, torch.Tensor]
    network: NetworkConfig | None  # None: not an edm2 network (a generic model tracked by PosthocEMA)
    sigma_rel: float | None  # EMA length, None for raw training weights
    nimg: int  # training time in images (or any growing count, for generic models)
    info: dict  # preset, dataset description, anything else JSON-able
    averaged_names: tuple[str, ...] | None = None  # tensors that are EMAs (the rest are copies, e.g. buffers)

    def build(self, device: str | torch.device = "cpu") -> Precond:
        """The network with these weights, in eval mode."""
        if self.network is None:
            raise ValueError("snapshot holds no edm2 network config (a generic model); read its tensors with "
                             "edm2.checkpoint.load_tensors")
        net = Precond(**self.network.to_dict())
        try:
            net.load_state_dict(self.state_dict, strict=True)
        except RuntimeError as e:
            raise ValueError(f"snapshot weights do not fit its network config: {str(e).splitlines()[0]}") from None
        return net.eval().requires_grad_(False).to(device)


def save_snapshot(path: str | Path, snapshot: Snapshot) -> None:
    """Atomically write a snapshot file (the one writer of snapshots: training, PosthocEMA, reconstruction)."""
    meta = {"kind": "snapshot", "network": None if snapshot.network is None else snapshot.network.to_dict(),
            "sigma_rel": snapshot.sigma_rel, "nimg": int(snapshot.nimg), "info": snapshot.info,
            "parameter_names": sorted(snapshot.state_dict)}
    if snapshot.averaged_names is not None:
        missing = sorted(set(snapshot.averaged_names) - set(snapshot.state_dict))
        if missing:
            raise ValueError(f"averaged tensors {missing[:3]} are not in the state dict to write to {path}")
        meta["averaged_names"] = sorted(snapshot.averaged_names)
    save_tensors(path, snapshot.state_dict, meta)


def load_snapshot(path: str | Path) -> Snapshot:
    """Read a snapshot file of an edm2 network (ValueError when it has no network config)."""
    tensors, meta = load_tensors(path, kind="snapshot")
    try:
        network = NetworkConfig.from_dict(meta["network"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: snapshot metadata has no valid network config ({e})") from None
    averaged = meta.get("averaged_names")
    return Snapshot(tensors, network, meta.get("sigma_rel"), int(meta.get("nimg", 0)), meta.get("info", {}),
                    None if averaged is None else tuple(averaged))


def load_network(path: str | Path, device: str | torch.device = "cpu") -> tuple[Precond, Snapshot]:
    """Rebuild the network stored in a snapshot file, in eval mode."""
    snap = load_snapshot(path)
    try:
        return snap.build(device), snap
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
