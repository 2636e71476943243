"""Reading a dataset folder or zip entry by entry: listing, bytes, decoding images and `.npy` arrays, shapes from
file headers, and the official `dataset.json` ({"labels": [["00000/img00000000.png", 6], ...]}).

Every problem is a one-line ValueError naming the file or entry and the fix. An `Archive` may be handed to worker
processes: each process opens the zip itself.
"""

from __future__ import annotations

import io
import json
import math
import os
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np

from edm2.data.image_read import image_header, read_image

__all__ = ["IMAGE_EXTENSIONS", "LATENT_EXTENSION", "Archive", "Entries", "decode_image", "decode_npy", "entry_shape",
           "parse_labels", "is_image", "is_latent", "check_item_shape", "read_npz", "check_labels", "MAX_CLASSES"]

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
LATENT_EXTENSION = ".npy"
MAX_CLASSES = 100_000  # class indices above this are a mistake (a label embedding of that many rows, at least)


def is_image(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


def is_latent(name: str) -> bool:
    return Path(name).suffix.lower() == LATENT_EXTENSION


def _hidden(name: str) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in name.split("/"))


class Archive:
    """A folder (read recursively) or a zip file. `names`: every file, as sorted relative POSIX paths, hidden
    files (a part starting with '.') left out."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._zip: zipfile.ZipFile | None = None
        self._zip_pid = -1
        if not self.path.exists():
            raise ValueError(f"data path {str(self.path)!r} does not exist; pass an image folder, a .zip, a .npz "
                             "or 'digits'")
        self.is_zip = self.path.is_file()
        if self.is_zip:
            names = [n for n in self._zipfile().namelist() if not n.endswith("/")]
        else:
            names = []
            try:
                self._walk(self.path, "", names)
            except OSError as e:
                raise ValueError(f"{self.path}: cannot read the folder ({e})") from None
        self.names = sorted(n for n in names if not _hidden(n))

    def _walk(self, folder: Path, prefix: str, out: list[str]) -> None:
        with os.scandir(folder) as it:  # faster than rglob on folders of a million files
            for e in it:
                if e.is_dir():
                    self._walk(Path(e.path), f"{prefix}{e.name}/", out)
                elif e.is_file():
                    out.append(prefix + e.name)

    def _zipfile(self) -> zipfile.ZipFile:
        if self._zip is None or self._zip_pid != os.getpid():  # a forked worker must not share the parent's handle
            try:
                self._zip = zipfile.ZipFile(self.path)
            except (zipfile.BadZipFile, OSError) as e:
                raise ValueError(f"{self.path}: not a readable zip file ({e})") from None
            self._zip_pid = os.getpid()
        return self._zip

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_zip": None, "_zip_pid": -1}

    def where(self, name: str) -> str:
        return f"{self.path}/{name}"

    def open(self, name: str):
        """A binary file object of entry `name` (ValueError when it cannot be read)."""
        try:
            return self._zipfile().open(name) if self.is_zip else open(self.path / name, "rb")
        except (OSError, KeyError, zipfile.BadZipFile, RuntimeError) as e:
            raise ValueError(f"{self.where(name)}: cannot read ({e})") from None

    def read(self, name: str) -> bytes:
        """The bytes of entry `name`; a damaged zip entry (bad CRC, truncated) is a ValueError naming it."""
        try:
            if self.is_zip:
                return self._zipfile().read(name)
            return (self.path / name).read_bytes()
        except (OSError, KeyError, zipfile.BadZipFile, EOFError, RuntimeError) as e:
            raise ValueError(f"{self.where(name)}: cannot read ({e}); the entry is damaged") from None

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
            self._zip = None


class Entries:
    """Selected entries of an archive as a compact table that a training process and its DataLoader workers keep
    for the whole run: names in one bytes array and, for a zip, the entries' offsets, sizes, compression and CRC in
    numpy arrays (no Python object per entry: `zipfile`'s directory costs about 0.6 KB per entry and process, and
    Python objects read by a forked worker are copied into it). Each process opens the file itself."""

    def __init__(self, archive: Archive, names: list[str]) -> None:
        self.path, self.is_zip = archive.path, archive.is_zip
        self._names = np.array([n.encode() for n in names], dtype=np.bytes_)
        if self.is_zip:
            infos = [archive._zipfile().getinfo(n) for n in names]
            self._table = {key: np.array([getattr(i, key) for i in infos], dtype=np.int64) for key in
                           ("header_offset", "compress_size", "file_size", "compress_type", "CRC", "flag_bits")}
        self._file, self._pid = None, -1

    def __len__(self) -> int:
        return len(self._names)

    def name(self, index: int) -> str:
        return self._names[index].decode()

    def names(self) -> list[str]:
        return [n.decode() for n in self._names]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_file": None, "_pid": -1}

    def read(self, index: int) -> bytes:
        """The bytes of entry `index`; a damaged entry (bad CRC, truncated) is a ValueError naming it."""
        where = f"{self.path}/{self.name(index)}"
        try:
            if not self.is_zip:
                return (self.path / self.name(index)).read_bytes()
            return self._read_zip(index, where)
        except (OSError, zlib.error, struct.error) as e:
            raise ValueError(f"{where}: cannot read ({e}); the entry is damaged") from None

    def _read_zip(self, index: int, where: str) -> bytes:
        if self._file is None or self._pid != os.getpid():  # a forked worker must not share the parent's offset
            self._file, self._pid = open(self.path, "rb"), os.getpid()
        t = {key: int(v[index]) for key, v in self._table.items()}
        if t["flag_bits"] & 0x1 or t["compress_type"] not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise ValueError(f"{where}: encrypted or compressed with method {t['compress_type']}; store the zip "
                             "uncompressed (`edm2 dataset convert` writes such zips)")
        f = self._file
        f.seek(t["header_offset"])
        header = f.read(30)
        if header[:4] != b"PK\x03\x04":
            raise OSError("no local file header at its offset")
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        f.seek(t["header_offset"] + 30 + name_len + extra_len)
        data = f.read(t["compress_size"])
        if t["compress_type"] == zipfile.ZIP_DEFLATED:
            data = zlib.decompress(data, -15)
        if len(data) != t["file_size"] or zlib.crc32(data) != t["CRC"]:
            raise OSError("bad CRC-32 or size")
        return data


def decode_image(data: bytes, name: str, channels: int | None = None) -> np.ndarray:
    """PNG/JPEG/... bytes -> uint8 [H, W, C] with C = 1 (grey) or 3 (RGB): `image_read.read_image`, the one way
    every reader decodes an image."""
    return read_image(data, name, channels)


def decode_npy(data: bytes, name: str) -> np.ndarray:
    """`.npy` bytes -> float32 [C, H, W] (the official latent layout; leading axes are folded into C)."""
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:
        raise ValueError(f"{name}: not a readable .npy array ({e.__class__.__name__}: {e})") from None
    if arr.ndim < 2 or arr.dtype.kind != "f":
        raise ValueError(f"{name}: expected a float array [C, H, W] of latents, got {arr.dtype} {list(arr.shape)}")
    return np.ascontiguousarray(arr.reshape(-1, *arr.shape[-2:]), dtype=np.float32)


def entry_shape(archive: Archive, name: str) -> tuple[int, int, int]:
    """[C, H, W] of an image or `.npy` entry after decoding, from its header only."""
    where = archive.where(name)
    with archive.open(name) as f:
        if is_latent(name):
            try:
                version = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                    np.lib.format.read_array_header_2_0
                shape, _, dtype = read(f)
            except Exception as e:
                raise ValueError(f"{where}: not a readable .npy array ({e})") from None
            if len(shape) < 2 or dtype.kind != "f":
                raise ValueError(f"{where}: expected a float array [C, H, W] of latents, got {dtype} {list(shape)}")
            return int(np.prod(shape[:-2], dtype=np.int64)), int(shape[-2]), int(shape[-1])
        header = image_header(f, where)
    return header.channels, header.height, header.width


def read_npz(path: Path) -> tuple[np.ndarray, np.ndarray | None, int]:
    """`x` (uint8 [N, H, W, C]; [N, H, W] gains C = 1), `y` (int64 class indices or None, `check_labels`) and the
    number of classes (0 without labels) of an NPZ file, read without unpickling anything."""
    try:
        d = np.load(path)  # allow_pickle=False: object arrays and pickles are refused
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: not a readable NPZ file ({e})") from None
    if not isinstance(d, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: not an NPZ archive (a single .npy array?); write it with numpy.savez(path, x=, y=)")
    with d:
        if "x" not in d.files:
            raise ValueError(f"{path}: NPZ must hold 'x' (uint8 [N, H, W, C]) and optionally 'y' (int labels)")
        try:
            x, y = d["x"], d["y"] if "y" in d.files else None
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise ValueError(f"{path}: not a readable NPZ file ({e})") from None
    if x.dtype != np.uint8 or x.ndim not in (3, 4):
        raise ValueError(f"{path}: 'x' must be uint8 [N, H, W, C] or [N, H, W], got {x.dtype} {list(x.shape)}")
    labels, classes = (None, 0) if y is None else check_labels(y, len(x), f"{path}: 'y'")
    return x[..., None] if x.ndim == 3 else x, labels, classes


def check_labels(values, count: int, where: str) -> tuple[np.ndarray, int]:
    """Class indices (int64 [count]) and the number of classes from labels of `count` items: integers 0..C-1 (a
    float array of whole numbers too), or exact one-hot rows [count, C] (C classes); C at most `MAX_CLASSES`.
    Anything else is a one-line ValueError starting with `where`."""
    y = np.asarray(values)
    if y.dtype.kind not in "biuf":
        raise ValueError(f"{where}: labels must be integer class indices, got {y.dtype} values")
    if y.ndim == 2 and y.shape[0] == count and y.shape[1] == 1:
        y = y[:, 0]  # a column of indices
    if y.ndim == 2 and y.shape[0] == count:
        return _one_hot_labels(y, where)
    if y.shape != (count,):
        what = f"{len(y)} labels" if y.ndim == 1 else f"labels of shape {list(y.shape)}"
        raise ValueError(f"{where}: {what} for {count} images; give one class index per image ([N]) or one-hot "
                         "rows ([N, C])")
    if y.dtype.kind == "f":
        bad = ~np.isfinite(y) | (y != np.round(y))
        if bad.any():
            i = int(bad.argmax())
            raise ValueError(f"{where}: label {y[i]} of image {i} is not an integer; labels are class indices 0..C-1")
    if count and y.min() < 0:
        i = int(y.argmin())
        raise ValueError(f"{where}: label {y[i]} of image {i} is negative; labels must be non-negative integers, "
                         "class indices 0..C-1")
    if count and y.max() >= MAX_CLASSES:
        i = int(y.argmax())
        raise ValueError(f"{where}: label {y[i]} of image {i} is too large (at most {MAX_CLASSES} classes); number "
                         "the classes 0..C-1")
    labels = y.astype(np.int64)
    return labels, int(labels.max()) + 1 if count else 0


def _one_hot_labels(y: np.ndarray, where: str) -> tuple[np.ndarray, int]:
    """The class indices of one-hot rows [N, C]: exactly one 1 per row, zeros elsewhere."""
    n, classes = y.shape
    if classes > MAX_CLASSES:
        raise ValueError(f"{where}: one-hot labels of {classes} classes (at most {MAX_CLASSES}); give class "
                         "indices 0..C-1")
    exact = ((y == 0) | (y == 1)).all(axis=1) & ((y == 1).sum(axis=1) == 1)
    if not exact.all():
        i = int((~exact).argmax())
        raise ValueError(f"{where}: labels of shape [{n}, {classes}] are not one-hot (row {i} is not exactly one 1 "
                         "and zeros); give class indices 0..C-1 ([N])")
    return (y == 1).argmax(axis=1).astype(np.int64), classes


def check_item_shape(shape: tuple[int, ...], latents: bool, where: str) -> None:
    """ValueError unless [C, H, W] is square with a supported number of channels."""
    c, h, w = shape
    if h != w:
        raise ValueError(f"{where}: {'latents' if latents else 'images'} are {w}x{h}; only square images are "
                         "supported (crop or pad them, e.g. `edm2 dataset convert --transform center-crop`)")
    if latents and (c < 2 or c % 2):
        raise ValueError(f"{where}: latents have {c} channels; expected the mean and std of each latent channel "
                         "(an even number, 8 for the Stable Diffusion VAE)")
    if not latents and c not in (1, 3, 4):
        raise ValueError(f"{where}: images have {c} channels; supported are 1 (gray), 3 (RGB), 4 (RGBA)")


def parse_labels(meta: bytes, names: list[str], source: str) -> np.ndarray | None:
    """Integer labels of `names` from the bytes of a `dataset.json` (None when it says "labels": null)."""
    try:
        entries = json.loads(meta).get("labels")
    except (json.JSONDecodeError, AttributeError, UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"{source}/dataset.json: not valid JSON of the form {{\"labels\": [[file, label], ...]}} "
                         f"({e})") from None
    if entries is None:
        return None
    if not isinstance(entries, list):
        raise ValueError(f"{source}/dataset.json: \"labels\" must be a list of [file, label] pairs")
    table = {}
    for entry in entries:
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)
                and isinstance(entry[1], (int, float)) and not isinstance(entry[1], bool)):
            raise ValueError(f"{source}/dataset.json: bad entry {entry!r}; expected [\"path/to/image.png\", int]")
        table[entry[0].replace("\\", "/")] = _json_label(entry[0], entry[1], source)
    missing = sorted(set(table) - set(names))
    if missing:
        raise ValueError(f"{source}/dataset.json names {len(missing)} missing file(s), e.g. {missing[0]!r}; "
                         "fix dataset.json or add the images")
    unlabeled = [n for n in names if n not in table]
    if unlabeled:
        raise ValueError(f"{source}/dataset.json has no label for {len(unlabeled)} image(s), e.g. "
                         f"{unlabeled[0]!r}; label every image or remove dataset.json")
    return np.array([table[n] for n in names], dtype=np.int64)


def _json_label(name: str, value: int | float, source: str) -> int:
    """A label of `dataset.json` as a class index 0..MAX_CLASSES-1 (a whole float such as 3.0 is accepted)."""
    if isinstance(value, float) and not (math.isfinite(value) and value == round(value)):
        raise ValueError(f"{source}/dataset.json: bad entry [{name!r}, {value!r}]: the label is not an integer; "
                         "labels are class indices 0..C-1")
    if not 0 <= value < MAX_CLASSES:
        text = str(int(value)) if abs(value) < 10**18 else f"{str(int(value))[:12]}..."
        raise ValueError(f"{source}/dataset.json: bad entry [{name!r}, {text}]: the label is out of range; labels "
                         f"are class indices 0..C-1 with at most {MAX_CLASSES} classes")
    return int(value)
