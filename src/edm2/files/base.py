"""The ground floor of every file edm2 writes: the atomic writer, stale-temporary cleanup, scratch folders, and
safetensors files with JSON metadata (the format name and version).

Every file is written through `atomic_output`: a temporary `.<name>.<random>.tmp` beside the target, synced,
then renamed over it, so a reader sees the old or the complete new file, never a torn one. Loading a tensor file
never executes code.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

__all__ = ["FORMAT", "VERSION", "TEMP_SUFFIX", "atomic_output", "atomic_write_text", "remove_stale_temps",
           "scratch_folder", "save_tensors", "load_tensors", "read_metadata"]

FORMAT = "edm2"
VERSION = 1
TEMP_SUFFIX = ".tmp"


# ----------------------------------------------------------------------------------------------------
# Atomic writes: the one way every file of a run (tensors, JSON, PNG, plots) reaches the disk.


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write to; when the block ends without error the file is synced
    and renamed over `path`, otherwise removed. Readers see either the old or the complete new file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file atomically (`atomic_output`)."""
    with atomic_output(path) as tmp:
        tmp.write_text(text)


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Delete the temporaries `atomic_output` leaves when its process is killed mid-write. Call it only while
    holding the folder (`RunLock`), so that no live writer loses its file. Returns what was removed."""
    stale = sorted(Path(folder).glob(f".*{TEMP_SUFFIX}"))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


@contextlib.contextmanager
def scratch_folder(beside: str | Path) -> Iterator[Path]:
    """A temporary folder on the file system of `beside` (in its nearest existing parent), removed on leaving:
    for writes that are only timed or tried."""
    parent = Path(beside).absolute().parent
    while not parent.exists():
        parent = parent.parent
    with tempfile.TemporaryDirectory(prefix=".edm2-scratch-", dir=parent) as folder:
        yield Path(folder)


# ----------------------------------------------------------------------------------------------------
# Tensor files.


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict) -> None:
    """Atomically write `tensors` and JSON `metadata` (must include 'kind') as a safetensors file."""
    meta = {"format": FORMAT, "version": VERSION, **metadata}
    tensors = {k: v.detach().contiguous().cpu().clone() for k, v in tensors.items()}
    with atomic_output(path) as tmp:
        save_file(tensors, str(tmp), metadata={FORMAT: json.dumps(meta)})


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
