"""The ground floor of every file edm2 writes: the atomic writer, stale-temporary cleanup, scratch folders, and
safetensors files with JSON metadata (the format name and version).

Every file is written through `atomic_output`: a temporary `.<name>.<random>.tmp` beside the target, synced,
then renamed over it, so a reader sees the old or the complete new file, never a torn one. Loading a tensor file
never executes code.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

try:
    import fcntl
except ImportError:  # not POSIX: temporaries are not locked, and remove_stale_temps takes every one for stale
    fcntl = None  # type: ignore[assignment]

__all__ = ["FORMAT", "VERSION", "TEMP_SUFFIX", "atomic_output", "atomic_write_text", "remove_stale_temps",
           "move_into_place", "save_figure", "scratch_folder", "save_tensors", "load_tensors", "read_metadata",
           "NonFiniteWarning", "nonfinite_tensors", "check_finite"]

FORMAT = "edm2"
VERSION = 1
TEMP_SUFFIX = ".tmp"


# ----------------------------------------------------------------------------------------------------
# Atomic writes: the one way every file of a run (tensors, JSON, PNG, plots) reaches the disk.


_DISK_FULL = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}
_HELD: set[int] = set()  # the descriptors holding the locks of this process's temporaries


def _forget_held_in_child() -> None:
    """A forked child (a DataLoader worker) closes its copies of the temporaries' descriptors, so that a killed
    writer's locks go with it and not with its orphaned children."""
    for fd in list(_HELD):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_held_in_child)


def _write_error(e: OSError, path: Path) -> OSError:
    """An OSError of writing `path` (through its temporary) that names `path`, not the temporary."""
    if e.errno in _DISK_FULL:
        return OSError(e.errno, _DISK_FULL[e.errno], str(path))
    return OSError(e.errno, e.strerror or str(e), str(path)) if e.errno else e


def _locked_temp(path: Path) -> tuple[int, Path]:
    """A new temporary beside `path`, open and locked (flock) while it is written: the kernel drops the lock when
    its process dies, so `remove_stale_temps` tells a killed writer's temporary from a live one."""
    while True:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
        if fcntl is None:
            return fd, Path(tmp)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # a cleaner holds it for an instant only
        except OSError:  # a file system without locks: written unlocked
            return fd, Path(tmp)
        if os.fstat(fd).st_nlink > 0:  # not taken for stale between its creation and its lock
            _HELD.add(fd)
            return fd, Path(tmp)
        os.close(fd)


def _release(fd: int) -> None:
    _HELD.discard(fd)
    os.close(fd)


@contextlib.contextmanager
def atomic_output(path: str | Path, clean_stale: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write to; when the block ends without error the file is synced
    and renamed over `path`, otherwise removed. Readers see either the old or the complete new file. A full disk
    is an OSError naming `path` ("no space left on device"); nothing is left behind. `clean_stale` first removes
    the temporaries a killed writer of `path` left (a scan of the folder: writers of many files in one folder
    pass False and clean once, `remove_stale_temps`)."""
    path = Path(path)
    if clean_stale and path.parent.is_dir():
        remove_stale_temps(path.parent, glob.escape(path.name))
    try:
        fd, tmp = _locked_temp(path)
    except OSError as e:
        raise _write_error(e, path) from None
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in _DISK_FULL:
            raise _write_error(e, path) from None
        raise
    finally:
        _release(fd)


def move_into_place(done: str | Path, path: str | Path) -> None:
    """Rename a complete, checked file written elsewhere (a resumable download's `.part`) over `path`, synced
    first: the other way besides `atomic_output` that a file reaches its final name."""
    with open(done, "rb") as f:
        os.fsync(f.fileno())
    try:
        os.replace(done, path)
    except OSError as e:
        raise _write_error(e, Path(path)) from None


def save_figure(fig, path: str | Path) -> None:
    """Write a matplotlib figure as PNG through `atomic_output`, and close it (also when writing fails)."""
    import matplotlib.pyplot as plt

    try:
        with atomic_output(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file atomically (`atomic_output`)."""
    with atomic_output(path) as tmp:
        tmp.write_text(text)


def remove_stale_temps(folder: str | Path, target: str | None = None) -> list[Path]:
    """Delete the temporaries `atomic_output` leaves when its process is killed mid-write: those of the files
    matching the glob `target` (None: every `.*.tmp`), except those a live writer still holds (locked), so a
    rerun may clean a folder other processes write to. Returns what was removed."""
    pattern = f".*{TEMP_SUFFIX}" if target is None else f".{target}.*{TEMP_SUFFIX}"
    return [p for p in sorted(Path(folder).glob(pattern)) if not p.is_dir() and _remove_unless_held(p)]


def _remove_unless_held(path: Path) -> bool:
    """Remove a temporary unless its writer is alive (holds its lock); whether it was removed."""
    if fcntl is None:
        path.unlink(missing_ok=True)
        return True
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:  # gone meanwhile (renamed by its writer), or not ours to read
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:  # held: a live writer
        os.close(fd)
        return False
    except OSError:  # a file system without locks: nothing tells a live writer, as before locks
        pass
    try:
        path.unlink(missing_ok=True)  # while locked, so that a writer cannot take it in between
    finally:
        os.close(fd)
    return True


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
        try:
            save_file(tensors, str(tmp), metadata={FORMAT: json.dumps(meta)})
        except SafetensorError as e:  # the Rust writer reports a full disk as its own error
            if "No space left" in str(e) or "StorageFull" in str(e):
                raise OSError(errno.ENOSPC, "No space left on device", str(tmp)) from None
            raise


def read_metadata(path: str | Path, kind: str | None = None) -> dict:
    """The JSON metadata of an edm2 file; ValueError for missing, truncated or foreign files."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a folder, not a file; give the edm2 {kind or 'tensor'} file (.safetensors) "
                         "in it")
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


# ----------------------------------------------------------------------------------------------------
# Non-finite weights: a diverged or damaged model samples black images without a word; refused on loading.


class NonFiniteWarning(UserWarning):
    """Weights with NaN or Inf values, loaded because the caller asked to go on (`allow_nonfinite`)."""


def nonfinite_tensors(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors holding a NaN or an infinity, in the order of `tensors`."""
    return [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def check_finite(tensors: Mapping[str, torch.Tensor], what: str, allow_nonfinite: bool = False) -> None:
    """ValueError naming `what` and its first tensor with NaN or Inf values; with `allow_nonfinite` a
    `NonFiniteWarning` instead."""
    bad = nonfinite_tensors(tensors)
    if not bad:
        return
    more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
    message = f"{what}: tensor {bad[0]!r}{more} holds NaN or Inf values (a diverged or damaged model)"
    if not allow_nonfinite:
        raise ValueError(f"{message}; use another file, or pass allow_nonfinite=True (--allow-nonfinite) to load "
                         "it anyway")
    warnings.warn(f"{message}; loaded anyway, as asked (it will likely sample black images)", NonFiniteWarning,
                  stacklevel=3)
