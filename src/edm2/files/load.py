"""Opening a network file, whatever its kind: an edm2 snapshot, or an official network pickle converted on the
fly by the code-free reader. One floor above the snapshot and the converter, so neither imports the other back.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from edm2.files.pickle_convert import snapshot_from_pickle
from edm2.files.snapshot import Snapshot, load_snapshot

__all__ = ["load_network"]


def load_network(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Snapshot]:
    """Rebuild the network stored in a snapshot file, in eval mode. An official network pickle (`.pkl`) is
    converted on the fly, without running its code (`edm2.files.pickle_convert`), with a warning."""
    if Path(path).suffix.lower() == ".pkl":
        snap = snapshot_from_pickle(path)
        warnings.warn(f"{path}: an official pickle, converted on the fly (no code is run); convert it once with "
                      "'edm2 convert' to skip this", stacklevel=2)
        return snap.build(device), snap
    snap = load_snapshot(path)
    try:
        return snap.build(device), snap
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
