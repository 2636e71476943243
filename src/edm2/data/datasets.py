"""Datasets: an image folder, an uncompressed zip, NPZ arrays, or the built-in `digits`.

Every dataset yields uint8 images [C, H, W] and integer labels (or none); `to_model_space` maps pixels to
[-1, 1]. Labels follow the official `dataset.json` layout: {"labels": [["00000/img00000000.png", 6], ...]}.
Problems are reported as ValueError naming the file and the fix.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["ImageDataset", "open_dataset", "to_model_space", "to_uint8", "load_digits_dataset"]

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg"}


def to_model_space(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return images.to(torch.float32) / 127.5 - 1


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255] (clipped, rounded)."""
    return (images * 127.5 + 128).clip(0, 255).to(torch.uint8)


@dataclass
class ImageDataset:
    """Square images of one size, in memory as uint8 [N, C, H, W], with optional integer labels."""

    images: np.ndarray
    labels: np.ndarray | None
    name: str
    num_classes: int = 0

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.dtype != np.uint8:
            raise ValueError(f"{self.name}: images must be uint8 [N, C, H, W], got {self.images.dtype} "
                             f"{list(self.images.shape)}")
        n, c, h, w = self.images.shape
        if n == 0:
            raise ValueError(f"{self.name}: the dataset holds no images")
        if h != w:
            raise ValueError(f"{self.name}: images are {w}x{h}; only square images are supported (crop or pad them)")
        if c not in (1, 3, 4):
            raise ValueError(f"{self.name}: images have {c} channels; supported are 1 (gray), 3 (RGB), 4 (latents)")
        if self.labels is not None:
            self.labels = np.asarray(self.labels, dtype=np.int64)
            if self.labels.shape != (n,):
                raise ValueError(f"{self.name}: {self.labels.shape[0]} labels for {n} images")
            if self.labels.min() < 0:
                raise ValueError(f"{self.name}: labels must be non-negative integers")
            self.num_classes = max(self.num_classes, int(self.labels.max()) + 1)

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def resolution(self) -> int:
        return self.images.shape[2]

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def has_labels(self) -> bool:
        return self.labels is not None

    def describe(self) -> dict:
        """JSON-able summary stored with checkpoints and snapshots."""
        return {"name": self.name, "num_images": len(self), "resolution": self.resolution,
                "channels": self.channels, "num_classes": self.num_classes if self.has_labels else 0}

    def batch(self, indices: np.ndarray, label_dim: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Images in [-1, 1] and one-hot labels [N, label_dim] (None when label_dim is 0)."""
        x = to_model_space(torch.from_numpy(self.images[indices]))
        if label_dim == 0:
            return x, None
        y = torch.nn.functional.one_hot(torch.from_numpy(self.labels[indices]), label_dim).to(torch.float32)
        return x, y


def load_digits_dataset() -> ImageDataset:
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes), scaled 0..16 -> 0..255."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)[:, None]
    return ImageDataset(images, digits.target.astype(np.int64), name="digits", num_classes=10)


def _decode(data: bytes, name: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.mode not in ("L", "RGB", "RGBA"):
                img = img.convert("RGBA" if "A" in img.mode else "RGB")
            arr = np.asarray(img)
    except Exception as e:
        raise ValueError(f"{name}: not a readable image ({e.__class__.__name__}: {e})") from None
    return arr[:, :, None] if arr.ndim == 2 else arr


def _load_files(files: dict[str, bytes], source: str) -> ImageDataset:
    """Images from {relative path: bytes}, plus labels from an optional 'dataset.json'."""
    meta = files.pop("dataset.json", None)
    names = sorted(n for n in files if Path(n).suffix.lower() in IMAGE_EXTENSIONS)
    if not names:
        raise ValueError(f"{source}: no PNG or JPEG images found")
    arrays, shapes = [], {}
    for n in names:
        a = _decode(files[n], f"{source}/{n}")
        shapes.setdefault(a.shape, n)
        if len(shapes) > 1:
            (s0, f0), (s1, f1) = list(shapes.items())[:2]
            raise ValueError(f"{source}: mixed image sizes ({f0} is {s0[1]}x{s0[0]}x{s0[2]}, {f1} is "
                             f"{s1[1]}x{s1[0]}x{s1[2]}); resize all images to one size")
        arrays.append(a)
    images = np.stack(arrays).transpose(0, 3, 1, 2).copy()
    labels = None
    if meta is not None:
        labels = _parse_labels(meta, names, source)
    return ImageDataset(images, labels, name=source)


def _parse_labels(meta: bytes, names: list[str], source: str) -> np.ndarray | None:
    try:
        entries = json.loads(meta).get("labels")
    except (json.JSONDecodeError, AttributeError, UnicodeDecodeError) as e:
        raise ValueError(f"{source}/dataset.json: not valid JSON of the form {{\"labels\": [[file, label], ...]}} "
                         f"({e})") from None
    if entries is None:
        return None
    table = {}
    for entry in entries:
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)
                and isinstance(entry[1], int)):
            raise ValueError(f"{source}/dataset.json: bad entry {entry!r}; expected [\"path/to/image.png\", int]")
        table[entry[0].replace("\\", "/")] = entry[1]
    missing = sorted(set(table) - set(names))
    if missing:
        raise ValueError(f"{source}/dataset.json names {len(missing)} missing file(s), e.g. {missing[0]!r}; "
                         "fix dataset.json or add the images")
    unlabeled = [n for n in names if n not in table]
    if unlabeled:
        raise ValueError(f"{source}/dataset.json has no label for {len(unlabeled)} image(s), e.g. "
                         f"{unlabeled[0]!r}; label every image or remove dataset.json")
    return np.array([table[n] for n in names], dtype=np.int64)


def _load_npz(path: Path) -> ImageDataset:
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
    x = x[..., None] if x.ndim == 3 else x
    return ImageDataset(x.transpose(0, 3, 1, 2).copy(), None if y is None else y.astype(np.int64), name=str(path))


def open_dataset(path: str | Path) -> ImageDataset:
    """Open `digits`, a folder of images, an uncompressed zip of images, or an NPZ file."""
    if str(path) == "digits":
        return load_digits_dataset()
    path = Path(path)
    if not path.exists():
        raise ValueError(f"data path {str(path)!r} does not exist; pass an image folder, a .zip, a .npz or 'digits'")
    if path.is_dir():
        try:
            files = {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*"))
                     if p.is_file() and (p.suffix.lower() in IMAGE_EXTENSIONS or p.name == "dataset.json")}
        except OSError as e:
            raise ValueError(f"{path}: cannot read the folder ({e})") from None
        return _load_files(files, str(path))
    if path.suffix.lower() == ".npz":
        return _load_npz(path)
    if path.suffix.lower() == ".zip":
        try:
            with zipfile.ZipFile(path) as z:
                files = {n: z.read(n) for n in z.namelist()
                         if Path(n).suffix.lower() in IMAGE_EXTENSIONS or n == "dataset.json"}
        except (zipfile.BadZipFile, OSError) as e:
            raise ValueError(f"{path}: not a readable zip file ({e})") from None
        return _load_files(files, str(path))
    raise ValueError(f"{path}: unsupported data file; pass an image folder, a .zip, a .npz or 'digits'")
