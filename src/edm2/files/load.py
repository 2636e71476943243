"""Opening a network file, whatever its kind: an edm2 snapshot, or an official network pickle converted on the
fly by the code-free reader; a URL is downloaded into the cache first (`edm2.files.download`). One floor above the
snapshot and the converter, so neither imports the other back.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from edm2.files.download import download, is_url
from edm2.files.pickle_convert import snapshot_from_pickle
from edm2.files.snapshot import Snapshot, load_snapshot, save_snapshot

__all__ = ["load_network"]


def load_network(path: str | Path, device: str | torch.device = "cpu",
                 allow_nonfinite: bool = False) -> tuple[torch.nn.Module, Snapshot]:
    """Rebuild the network stored in a snapshot file, in eval mode. An official network pickle (`.pkl`) is
    converted on the fly, without running its code (`edm2.files.pickle_convert`), with a warning. A URL is
    downloaded once into the cache (`edm2.files.download`); an official pickle from a URL is converted once, its
    snapshot cached beside it (`<name>.safetensors`) and read from there afterwards. Weights with NaN or Inf
    values are refused (ValueError naming the first), unless `allow_nonfinite` (then a `NonFiniteWarning`); a
    network config that does not fit the stored weights is refused before anything is allocated."""
    if is_url(path):
        path = _cached_snapshot(download(str(path)), allow_nonfinite)
    elif Path(path).is_dir():
        raise ValueError(_folder_message(Path(path)))
    elif Path(path).suffix.lower() == ".pkl":
        snap = snapshot_from_pickle(path, allow_nonfinite)
        warnings.warn(f"{path}: an official pickle, converted on the fly (no code is run); convert it once with "
                      "'edm2 convert' to skip this", stacklevel=2)
        return snap.build(device), snap
    snap = load_snapshot(path, allow_nonfinite)
    try:
        return snap.build(device), snap
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def _folder_message(folder: Path) -> str:
    """What to say when a folder is given for a network file: which file is expected, one from the folder."""
    files: list[Path] = []
    for pattern in ("posthoc-*.safetensors", "snapshot-*.safetensors", "*.safetensors", "*.pkl"):
        files = files or sorted(folder.glob(pattern))
    example = f", e.g. {files[-1]}" if files else ""  # the latest reconstruction or snapshot
    return (f"{folder}: is a folder, not a network file; give a snapshot file (.safetensors, e.g. from "
            f"'edm2 reconstruct') or an official network pickle (.pkl){example}")


def _cached_snapshot(file: Path, allow_nonfinite: bool = False) -> Path:
    """The snapshot of a downloaded network file: the file itself, or for an official pickle its conversion
    beside it in the cache (made now when absent or older than the pickle)."""
    if file.suffix.lower() != ".pkl":
        return file
    converted = file.with_suffix(".safetensors")
    if not converted.is_file() or converted.stat().st_mtime < file.stat().st_mtime:
        save_snapshot(converted, snapshot_from_pickle(file, allow_nonfinite))
        warnings.warn(f"{file}: an official pickle, converted once (no code is run) into {converted}", stacklevel=3)
    return converted
