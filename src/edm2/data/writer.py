"""The dataset tool's output: a dataset in the official layout (`00000/img00000000.png`, ..., `dataset.json`) as an
uncompressed zip or a folder.

A zip is written to a temporary file beside it and renamed into place when complete (`files.atomic_output`): a
killed conversion leaves no zip, only a hidden temporary that the next run removes, and the next run starts over.
A folder is filled file by file (each one atomically) and marked unfinished by `.edm2-incomplete.json` until its
`dataset.json` is written: readers refuse it meanwhile, and the same command run again removes the temporaries of
killed writers and skips what is done. One process at a time may write a destination (a file lock beside it); a
destination inside the source is refused. A run that fails before writing any item removes what it made (the
destination is as it was), and a full disk is one line (`NoSpaceError`) saying what was kept.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from pathlib import Path

import filelock

from edm2.data.folder import DATASET_JSON, INCOMPLETE_MARKER
from edm2.files import atomic_output, atomic_write_text, remove_stale_temps

__all__ = ["DatasetWriter", "NoSpaceError", "check_dest", "image_name", "is_disk_full", "latent_name", "write_file"]

_FULL = (errno.ENOSPC, errno.EDQUOT)  # a full disk, a full quota


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


class NoSpaceError(OSError):
    """A write that found the disk (or the quota) full, told in one line: `strerror` says what was written and
    kept, `str()` adds what to do (the command line adds its own advice to `strerror`). Made as
    `NoSpaceError(errno.ENOSPC, message)`."""

    def __str__(self) -> str:
        return f"{self.strerror}; free some space or write elsewhere, then run the same command again"


def is_disk_full(error: BaseException | None) -> bool:
    """Whether `error` (or the error it was raised from) is an OSError for a full disk or quota."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in _FULL:
            return True
        error = error.__cause__ or error.__context__
    return False


def check_dest(dest: str | Path, source: str | Path | None) -> None:
    """ValueError when `dest` is the source or lies inside the source folder (writing it would change the data
    being read, and a later run would read the output as input)."""
    if source is None or str(source) == "digits":
        return
    dest, source = Path(dest).absolute().resolve(), Path(source).absolute().resolve()
    if dest == source or source in dest.parents:
        raise ValueError(f"--dest {dest} is {'the source' if dest == source else 'inside --source ' + str(source)}; "
                         "write the output elsewhere")


def _missing_dirs(folder: Path) -> list[Path]:
    """`folder` and its ancestors that do not exist yet, deepest first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


class DatasetWriter:
    """Context manager writing a dataset to `dest` (a `.zip` or a folder). `job` (JSON-able) identifies the work:
    an unfinished folder is resumed only by the same job. Call `finish(meta)` last, inside the block.

    When the block fails before any item was written, what the writer made is removed again (the temporary, the
    folders it created, the unfinished marker): `dest` is left as it was. A full disk is one line
    (`NoSpaceError`), with nothing torn or temporary left behind."""

    def __init__(self, dest: str | Path, job: dict, source: str | Path | None = None) -> None:
        self.dest = Path(dest)
        if not self.dest.name:
            raise ValueError("--dest must name a .zip file or a folder")
        check_dest(self.dest, source)
        self.is_zip = self.dest.suffix.lower() == ".zip"
        self.job = json.loads(json.dumps(job))  # as it reads back from the marker (tuples become lists)
        self.done: set[str] = set()  # names written (by an earlier run too, for an unfinished folder)
        self.bytes = 0
        self._finished = False
        self._written = 0  # items written by this run
        self._created: list[Path] = []  # folders this run created, deepest first
        self._new_folder = False  # this run started the folder (wrote its marker)
        self._stack = contextlib.ExitStack()
        self.check()

    def check(self) -> bool:
        """ValueError when `dest` may not be written; True when it is an unfinished folder of this job. Reads
        only, so that a refused command leaves no trace."""
        marker = self.dest / INCOMPLETE_MARKER
        if self.is_zip or not self.dest.exists():
            if self.dest.exists() and _zip_job(self.dest) != self.job:
                raise ValueError(f"--dest {self.dest} exists; remove it or choose another name")
            return False  # new, or this command's complete zip (run again: written again, the same content)
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
        if _job_of(self.dest / COMPLETE_MARKER) == self.job:
            return True  # this command's complete folder, run again: nothing left to write
        if any(not _marker_temp(p.name) for p in self.dest.iterdir()):
            raise ValueError(f"--dest {self.dest} is not empty; choose a new or empty folder")
        return False

    def __enter__(self) -> DatasetWriter:
        parent = self.dest.parent
        self._created = _missing_dirs(parent) if self.is_zip else _missing_dirs(self.dest)
        parent.mkdir(parents=True, exist_ok=True)
        lock = filelock.FileLock(str(parent / f".{self.dest.name}.lock"), timeout=0)
        try:
            lock.acquire()
        except filelock.Timeout:
            self._remove_created()
            raise ValueError(f"--dest {self.dest} is being written by another process; wait for it or stop "
                             "it") from None
        self._stack.callback(self._unlock, lock)
        try:
            self._start(parent)
        except BaseException as e:
            self.__exit__(type(e), e, e.__traceback__)  # undoes the start; a full disk becomes one line
            raise
        return self

    def _start(self, parent: Path) -> None:
        """Open the output (the lock held): the zip's temporary, or the folder (new, or resumed)."""
        resuming = self.check()  # again: it may have changed before the lock
        if self.is_zip:
            remove_stale_temps(parent, self.dest.name)  # left by a killed run of this destination
            import zipfile

            tmp = self._stack.enter_context(atomic_output(self.dest))
            _readable(tmp)
            self._zip = zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED)
            self._stack.push(self._close_zip)
        elif resuming:
            self._scan_folder()
        else:
            self.dest.mkdir(parents=True, exist_ok=True)
            remove_stale_temps(self.dest, INCOMPLETE_MARKER)  # left by a run killed while starting
            self._new_folder = True
            atomic_write_text(self.dest / INCOMPLETE_MARKER, json.dumps({"job": self.job}, indent=2) + "\n")

    def _close_zip(self, exc_type, exc, tb) -> bool:
        """Close the zip; after an error (a full disk, say) its own complaints on closing are dropped, so that the
        first error is the one reported (the temporary is removed next)."""
        try:
            self._zip.close()
        except Exception:
            if exc_type is None:
                raise
        return False

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
            with atomic_output(path, clean_stale=False) as tmp:
                tmp.write_bytes(data)
                _readable(tmp)
        self.done.add(name)
        self.bytes += len(data)
        self._written += 1

    def finish(self, meta: dict) -> None:
        """Write `dataset.json` (the last file): the dataset is complete when the block ends."""
        text = json.dumps(meta)
        if self.is_zip:
            self._zip.writestr(DATASET_JSON, text)
            self._zip.comment = json.dumps({"job": self.job}).encode()  # what made it (readers ignore it)
        else:
            with atomic_output(self.dest / DATASET_JSON) as tmp:
                tmp.write_text(text)
                _readable(tmp)
            atomic_write_text(self.dest / COMPLETE_MARKER, json.dumps({"job": self.job}, indent=2) + "\n")
            (self.dest / INCOMPLETE_MARKER).unlink(missing_ok=True)
        self.bytes += len(text)
        self._finished = True

    def __exit__(self, exc_type, exc, tb) -> bool:
        error = exc
        if exc_type is None and not self._finished:
            error = ValueError(f"internal error: {self.dest} written without dataset.json")
        try:
            self._stack.__exit__(type(error) if error else None, error, error.__traceback__ if error else None)
        except BaseException as e:  # an error of closing (a full disk while the zip's directory is written, ...)
            error = e
        if error is None:
            return False
        if self.is_zip or not self._written:
            self._remove_created()
        if is_disk_full(error):
            kept = (f"the {len(self.done)} files written are kept: the same command continues" if self.done and
                    not self.is_zip else "nothing was kept")
            raise NoSpaceError(_FULL[0], f"no space left on device while writing {self.dest} after "
                               f"{self.bytes / 1e6:.1f} MB ({kept})") from None
        if error is not exc:
            raise error
        return False

    def _remove_created(self) -> None:
        """Undo a start that wrote no item: the marker of a new folder, the (empty) folders this run created."""
        if self._new_folder:
            (self.dest / INCOMPLETE_MARKER).unlink(missing_ok=True)
            for root, _, _ in os.walk(self.dest, topdown=False):
                if Path(root) != self.dest:
                    with contextlib.suppress(OSError):
                        Path(root).rmdir()
        for folder in self._created:
            with contextlib.suppress(OSError):
                folder.rmdir()


COMPLETE_MARKER = ".edm2-complete.json"  # a finished folder's record of the job that wrote it (hidden: not read)


def _job_of(path: Path) -> dict | None:
    """The job recorded in a marker file, or None."""
    try:
        return json.loads(path.read_text()).get("job")
    except (OSError, ValueError, AttributeError):
        return None


def _zip_job(path: Path) -> dict | None:
    """The job recorded in the comment of a zip this tool wrote, or None."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return json.loads(z.comment.decode() or "null").get("job")
    except (OSError, ValueError, AttributeError, zipfile.BadZipFile):
        return None


def _marker_temp(name: str) -> bool:
    """The temporary of the unfinished marker, which a run killed while starting a new folder leaves."""
    return name.startswith(f".{INCOMPLETE_MARKER}.") and name.endswith(".tmp")


def write_file(dest: str | Path, text: str, source: str | Path | None = None) -> None:
    """Write one small output file atomically (`dataset stats`): checked against `source` (`check_dest`); the
    temporaries a killed earlier run left for `dest` are removed first (under a lock beside it); a full disk is
    one line (`NoSpaceError`) and leaves no temporary, nor a folder this call created."""
    dest = Path(dest)
    check_dest(dest, source)
    if dest.is_dir():
        raise ValueError(f"{dest} is a folder; name a file to write")
    created = _missing_dirs(dest.parent)
    dest.parent.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(str(dest.parent / f".{dest.name}.lock"), timeout=0)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise ValueError(f"{dest} is being written by another process; wait for it or stop it") from None
    try:
        remove_stale_temps(dest.parent, dest.name)
        atomic_write_text(dest, text)
    except OSError as e:
        error = e
    else:
        error = None
    finally:
        DatasetWriter._unlock(lock)
    if error is None:
        return
    for folder in created:
        with contextlib.suppress(OSError):
            folder.rmdir()
    if is_disk_full(error):
        raise NoSpaceError(_FULL[0], f"no space left on device while writing {dest} (nothing was kept)") from None
    raise error
