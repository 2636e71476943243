"""Files by URL (networks, reference statistics, feature-network weights), downloaded once into a cache.

A URL's file lives at `cache_dir()/<host>/<url path>`; the first download records its SHA-256 beside it
(`<file>.sha256`) and every later use checks the file against it, so a damaged or changed file is refused
instead of read. A download goes to `<file>.part` and is moved into place only when complete and checked; a
dropped connection leaves the part, which the next call resumes with an HTTP range request. A lock file
(`<file>.lock`) keeps two processes from writing the same file; a lock whose process is gone (or that has not
been refreshed for `STALE_LOCK_SECONDS`) is taken over.

Environment: `EDM2_CACHE` (the cache folder), `EDM2_MIRROR` (a base URL that serves the same paths: the files
are fetched from there, but cached under the original URL), `EDM2_OFFLINE=1` (never touch the network: only
cached files are used). Errors are one-line ValueErrors that name the URL and where to put the file by hand.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import re
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

from tqdm import tqdm

from edm2.files.base import atomic_write_text, move_into_place

__all__ = ["CACHE_ENV", "MIRROR_ENV", "OFFLINE_ENV", "cache_dir", "is_url", "mirror_url", "cached_path",
           "download"]

CACHE_ENV = "EDM2_CACHE"
MIRROR_ENV = "EDM2_MIRROR"
OFFLINE_ENV = "EDM2_OFFLINE"
TIMEOUT_SECONDS = 60.0  # per connection attempt and per read, not for the whole file
STALE_LOCK_SECONDS = 300.0  # a lock not refreshed for this long belongs to a hung or vanished process
_CHUNK = 1 << 20
_REFRESH_SECONDS = 10.0


def cache_dir() -> Path:
    """The download cache: $EDM2_CACHE, else $XDG_CACHE_HOME/edm2, else ~/.cache/edm2."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "edm2"


def is_url(s: object) -> bool:
    """Whether `s` is an http:// or https:// URL (a `Path` never is)."""
    return isinstance(s, str) and s.lower().startswith(("http://", "https://"))


def mirror_url(url: str) -> str:
    """Where `url` is fetched from: with $EDM2_MIRROR set, the URL's path (and query) under that base URL
    (https://host/edm2/x.pkl -> $EDM2_MIRROR/edm2/x.pkl), otherwise `url` itself."""
    base = os.environ.get(MIRROR_ENV, "").strip()
    if not base:
        return url
    parts = urllib.parse.urlsplit(url)
    return base.rstrip("/") + parts.path + (f"?{parts.query}" if parts.query else "")


def cached_path(url: str) -> Path:
    """Where the file of `url` lives in the cache: cache_dir()/<host>/<url path>, keyed on the original URL (not
    the mirror); a query string adds a folder named by its digest. ValueError for a URL that names no file."""
    if not is_url(url):
        raise ValueError(f"{url!r} is not an http:// or https:// URL")
    parts = urllib.parse.urlsplit(url)
    names = [urllib.parse.unquote(p) for p in parts.path.split("/") if p]
    host = (parts.hostname or "").lower() + (f"_{parts.port}" if parts.port else "")
    if not host or not names or parts.path.endswith("/") or any(n in (".", "..") or "\\" in n for n in names):
        raise ValueError(f"{url}: names no file to download (expected https://host/.../name)")
    if parts.query:
        names.insert(-1, "query-" + hashlib.sha256(parts.query.encode()).hexdigest()[:12])
    return cache_dir().joinpath(host, *names)


def download(url: str, sha256: str | None = None, progress: bool = True) -> Path:
    """The cached file of `url`, downloaded first when it is not in the cache.

    A cached file is checked against the SHA-256 recorded when it was downloaded (a file put into the cache by
    hand gets its digest recorded on first use). `sha256`, when given, is the digest the file must have; a
    download that does not match is deleted. `progress` shows a progress bar on stderr. Every failure (offline,
    network, HTTP, wrong digest) is a one-line ValueError; a connection dropped mid-file leaves `<file>.part`
    so that the next call resumes it."""
    expected = _expected_digest(sha256, url)
    dest = cached_path(url)
    if dest.is_file():
        return _verified(dest, expected)
    if _offline():
        raise _cannot(url, dest, f"{OFFLINE_ENV} is set")
    created = _missing_parents(dest)
    part = _with_suffix(dest, ".part")
    try:
        with _lock(dest, progress) as refresh:
            if dest.is_file():  # another process finished it while we waited
                return _verified(dest, expected)
            _fetch(url, dest, part, progress, refresh)
            digest = _file_digest(part)
            if expected is not None and digest != expected:
                part.unlink()
                raise ValueError(f"{url}: the downloaded file has SHA-256 {digest}, expected {expected}; it was "
                                 "deleted (a wrong URL, a wrong digest, or a damaged mirror?)")
            atomic_write_text(_with_suffix(dest, ".sha256"), digest + "\n")
            move_into_place(part, dest)
    except BaseException:
        if not part.exists():
            _remove_empty(created)
        raise
    return dest


# ----------------------------------------------------------------------------------------------------
# Checks of cached files.


def _expected_digest(sha256: str | None, url: str) -> str | None:
    if sha256 is None:
        return None
    digest = sha256.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise ValueError(f"{url}: expected SHA-256 {sha256!r} is not 64 hexadecimal digits")
    return digest


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _verified(path: Path, expected: str | None) -> Path:
    """`path` after checking it against its recorded digest (recorded now for a file put there by hand)."""
    sidecar = _with_suffix(path, ".sha256")
    digest = _file_digest(path)
    words = sidecar.read_text().split() if sidecar.is_file() else []
    recorded = words[0].lower() if words else None
    for want, what in ((recorded, "recorded at download"), (expected, "expected")):
        if want is not None and digest != want:
            raise ValueError(f"{path}: SHA-256 {digest} differs from the {what} {want}; the file is damaged or "
                             "was changed: delete it to download it again")
    if recorded is None:
        with contextlib.suppress(OSError):  # a read-only cache still serves the file
            atomic_write_text(sidecar, digest + "\n")
    return path


# ----------------------------------------------------------------------------------------------------
# The transfer: one GET (resuming a part with a range request), the body streamed into the part file.


def _fetch(url: str, dest: Path, part: Path, progress: bool, refresh: Callable[[], None]) -> None:
    """Fill `part` with the whole file of `url`, resuming what it holds; ValueError (one line) on failure."""
    source = mirror_url(url)
    via = f" via {source}" if source != url else ""
    for _ in range(2):  # a second try from scratch when the part cannot be resumed
        have = part.stat().st_size if part.is_file() else 0
        headers = {"User-Agent": "edm2", "Accept-Encoding": "identity"}
        if have:
            headers["Range"] = f"bytes={have}-"
        try:
            response = urllib.request.urlopen(urllib.request.Request(source, headers=headers),
                                              timeout=TIMEOUT_SECONDS)
        except urllib.error.HTTPError as e:
            e.close()
            if e.code == 416 and have:  # nothing left to send: complete, or not this file
                if _range_total(e.headers.get("Content-Range")) == have:
                    return
                part.unlink()
                continue
            raise _cannot(url, dest, f"HTTP {e.code}: {e.reason}{via}") from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
            reason = e.reason if isinstance(e, urllib.error.URLError) else e
            raise _cannot(url, dest, f"{_describe(reason)}{via}") from None
        with response:
            start, total = _resume_point(response, have)
            if start is None:
                part.unlink()
                continue
            _copy_body(response, part, start, total, progress, refresh, lambda why: _cannot(url, dest, why + via))
            return
    raise _cannot(url, dest, f"the server answers a resumed download wrongly{via}")


def _resume_point(response: http.client.HTTPResponse, have: int) -> tuple[int | None, int | None]:
    """(where the body starts in the file, the file's size if known); start None: an unusable partial answer."""
    length = response.headers.get("Content-Length")
    if response.status == 206:
        m = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", (response.headers.get("Content-Range") or "").strip())
        if not m or int(m.group(1)) != have:
            return None, None
        return have, int(m.group(2)) if m.group(2) != "*" else None
    return 0, int(length) if length and length.isdigit() else None  # 200: the whole file, from the start


def _range_total(content_range: str | None) -> int | None:
    m = re.fullmatch(r"bytes \*/(\d+)", (content_range or "").strip())
    return int(m.group(1)) if m else None


def _copy_body(response: http.client.HTTPResponse, part: Path, start: int, total: int | None, progress: bool,
               refresh: Callable[[], None], error: Callable[[str], ValueError]) -> None:
    """Stream the body into `part` from byte `start` (truncating what follows); `error(why)` makes the error."""
    with open(part, "r+b" if start else "wb") as f, \
            tqdm(total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                 desc=part.name[:-len(".part")], disable=not progress, leave=False) as bar:
        f.seek(start)
        f.truncate()
        try:
            while chunk := response.read(_CHUNK):
                f.write(chunk)
                bar.update(len(chunk))
                refresh()
        except (http.client.HTTPException, OSError) as e:
            f.flush()
            raise error(f"connection lost after {f.tell()} bytes: {_describe(e)}; run again to resume") from None
        f.flush()
        os.fsync(f.fileno())
        if total is not None and f.tell() != total:
            raise error(f"connection lost after {f.tell()} of {total} bytes; run again to resume")


def _describe(reason: object) -> str:
    if isinstance(reason, (TimeoutError, socket.timeout)):
        return "timed out"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return " ".join(str(reason).split()) or type(reason).__name__


def _cannot(url: str, dest: Path, why: str) -> ValueError:
    return ValueError(f"cannot download {url} ({why}); put the file at {dest} by hand, or set {MIRROR_ENV}")


def _offline() -> bool:
    return os.environ.get(OFFLINE_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def _with_suffix(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


# ----------------------------------------------------------------------------------------------------
# Folders and the lock.


def _missing_parents(path: Path) -> list[Path]:
    """The folders above `path` that do not exist yet, deepest first (to remove them again on failure)."""
    missing, folder = [], path.parent
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    return missing


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:  # deepest first; a folder someone else filled meanwhile stays
        with contextlib.suppress(OSError):
            folder.rmdir()


@contextlib.contextmanager
def _lock(dest: Path, progress: bool) -> Iterator[Callable[[], None]]:
    """Hold `<dest>.lock` (created exclusively) while downloading `dest`; yields a function that refreshes the
    lock's time stamp (so that waiters see it is alive). A stale lock is taken over."""
    lock = _with_suffix(dest, ".lock")
    owner = f"{socket.gethostname()} {os.getpid()}\n"
    told = False
    while True:
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            if _stale(lock):
                with contextlib.suppress(FileNotFoundError):
                    lock.unlink()
                continue
            if progress and not told:
                print(f"edm2: waiting for another process downloading {dest}", file=sys.stderr)
                told = True
            time.sleep(0.2)
        except FileNotFoundError:  # the folder was removed by a process that gave up: make it again
            continue
    with os.fdopen(fd, "w") as f:
        f.write(owner)
    last = [time.monotonic()]

    def refresh() -> None:
        if time.monotonic() - last[0] > _REFRESH_SECONDS:
            last[0] = time.monotonic()
            with contextlib.suppress(OSError):
                os.utime(lock)

    try:
        yield refresh
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()


def _stale(lock: Path) -> bool:
    """Whether `lock` belongs to a process of this machine that is gone, or has not been refreshed for long."""
    try:
        age = time.time() - lock.stat().st_mtime
        host, pid = lock.read_text().split()
    except (OSError, ValueError):  # vanished, or not written yet: stale only when old
        return lock.exists() and time.time() - _mtime(lock) > STALE_LOCK_SECONDS
    if host == socket.gethostname() and pid.isdigit():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except OSError:  # alive, owned by someone else
            pass
    return age > STALE_LOCK_SECONDS


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return time.time()
