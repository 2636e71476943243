"""The dataset tool's output: a dataset in the official layout (`00000/img00000000.png`, ..., `dataset.json`) as an
uncompressed zip or a folder.

A zip is written to a temporary file beside it and renamed into place when complete (`checkpoint.atomic_output`):
a killed conversion leaves no zip, only a hidden temporary that the next run removes, and the next run starts over.
A folder is filled file by file (each one atomically) and marked unfinished by `.edm2-incomplete.json` until its
`dataset.json` is written: readers refuse it meanwhile, and the same command run again skips what is done. One
process at a time may write a destination (a file lock beside it).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import filelock

from edm2.data.folder import DATASET_JSON, INCOMPLETE_MARKER
from edm2.files import atomic_output, atomic_write_text, remove_stale_temps

__all__ = ["DatasetWriter", "image_name", "latent_name"]


def image_name(index: int) -> str:
    """The official archive name of image `index`."""
    return f"{index // 1000:05d}/img{index:08d}.png"


def latent_name(index: int) -> str:
    """The official archive name of the latents (posterior mean and std) of image `index`."""
    return f"{index // 1000:05d}/img-mean-std-{index:08d}.npy"


def _readable(path: Path) -> None:
    """The permissions of a plain new file (temporaries are private to their writer): datasets are shared."""
    mask = os.umask(0)
    os.umask(mask)
    path.chmod(0o666 & ~mask)


class DatasetWriter:
    """Context manager writing a dataset to `dest` (a `.zip` or a folder). `job` (JSON-able) identifies the work:
    an unfinished folder is resumed only by the same job. Call `finish(meta)` last, inside the block."""

    def __init__(self, dest: str | Path, job: dict) -> None:
        self.dest = Path(dest)
        if not self.dest.name:
            raise ValueError("--dest must name a .zip file or a folder")
        self.is_zip = self.dest.suffix.lower() == ".zip"
        self.job = json.loads(json.dumps(job))  # as it reads back from the marker (tuples become lists)
        self.done: set[str] = set()  # names written (by an earlier run too, for an unfinished folder)
        self.bytes = 0
        self._finished = False
        self._stack = contextlib.ExitStack()
        self.check()

    def check(self) -> bool:
        """ValueError when `dest` may not be written; True when it is an unfinished folder of this job. Reads
        only, so that a refused command leaves no trace."""
        marker = self.dest / INCOMPLETE_MARKER
        if self.is_zip or not self.dest.exists():
            if self.dest.exists():
                raise ValueError(f"--dest {self.dest} exists; remove it or choose another name")
            return False
        if not self.dest.is_dir():
            raise ValueError(f"--dest {self.dest} is a file; a folder or a .zip is expected")
        if marker.is_file():
            try:
                job = json.loads(marker.read_text()).get("job")
            except (ValueError, AttributeError):
                job = None
            if job != self.job:
                raise ValueError(f"--dest {self.dest} holds an unfinished conversion of another source or with other "
                                 "options; run that command again, or remove the folder")
            return True
        if any(self.dest.iterdir()):
            raise ValueError(f"--dest {self.dest} is not empty; choose a new or empty folder")
        return False

    def __enter__(self) -> DatasetWriter:
        parent = self.dest.parent
        parent.mkdir(parents=True, exist_ok=True)
        lock = filelock.FileLock(str(parent / f".{self.dest.name}.lock"), timeout=0)
        try:
            lock.acquire()
        except filelock.Timeout:
            raise ValueError(f"--dest {self.dest} is being written by another process; wait for it or stop "
                             "it") from None
        self._stack.callback(self._unlock, lock)
        try:
            resuming = self.check()  # again: it may have changed before the lock
            if self.is_zip:
                for stale in parent.glob(f".{self.dest.name}.*.tmp"):  # left by a killed run of this destination
                    stale.unlink(missing_ok=True)
                import zipfile

                tmp = self._stack.enter_context(atomic_output(self.dest))
                _readable(tmp)
                self._zip = self._stack.enter_context(zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED))
            elif resuming:
                self._scan_folder()
            else:
                self.dest.mkdir(parents=True, exist_ok=True)
                atomic_write_text(self.dest / INCOMPLETE_MARKER, json.dumps({"job": self.job}, indent=2) + "\n")
        except BaseException:
            self._stack.close()
            raise
        return self

    def _scan_folder(self) -> None:
        """What an earlier run wrote (each file complete, written atomically); its temporaries are removed."""
        for root, _, files in os.walk(self.dest):
            remove_stale_temps(root)
            for name in files:
                if not name.startswith("."):
                    path = Path(root) / name
                    self.done.add(path.relative_to(self.dest).as_posix())
                    self.bytes += path.stat().st_size

    @staticmethod
    def _unlock(lock: filelock.FileLock) -> None:
        Path(lock.lock_file).unlink(missing_ok=True)  # while still held, as checkpoint.RunLock
        lock.release()

    def write(self, name: str, data: bytes) -> None:
        """Add one file (a name relative to the dataset root)."""
        if self.is_zip:
            self._zip.writestr(name, data)
        else:
            path = self.dest / name
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_output(path) as tmp:
                tmp.write_bytes(data)
                _readable(tmp)
        self.done.add(name)
        self.bytes += len(data)

    def finish(self, meta: dict) -> None:
        """Write `dataset.json` (the last file): the dataset is complete when the block ends."""
        text = json.dumps(meta)
        if self.is_zip:
            self._zip.writestr(DATASET_JSON, text)
        else:
            with atomic_output(self.dest / DATASET_JSON) as tmp:
                tmp.write_text(text)
                _readable(tmp)
            (self.dest / INCOMPLETE_MARKER).unlink()
        self.bytes += len(text)
        self._finished = True

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None and not self._finished:
            exc = ValueError(f"internal error: {self.dest} written without dataset.json")
            self._stack.__exit__(ValueError, exc, None)
            raise exc
        return self._stack.__exit__(exc_type, exc, tb)
