"""Datasets: the built-in `digits` and NPZ arrays held in memory (`ImageDataset`), image or latent folders and zips
read from disk (`ImageFolderDataset`, in `folder.py`), and `open_dataset`, which picks the right one.

A dataset yields raw items: uint8 pixels [C, H, W], or float32 raw latents (the mean and std of a VAE's posterior,
[2C, H, W]), with integer labels or none. Its `encoder` ({"class": ..., "kwargs": ...}, the official terms) says
how raw items map to the network's space (`edm2.data.encoders`). Labels follow the official `dataset.json` layout:
{"labels": [["00000/img00000000.png", 6], ...]}. Problems are reported as ValueError naming the file and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edm2.data.archive import check_item_shape, check_labels, read_npz
from edm2.data.encoders import default_encoder
from edm2.data.folder import ImageFolderDataset

__all__ = ["ImageDataset", "open_dataset", "load_dataset", "to_model_space", "to_uint8", "load_digits_dataset"]


def to_model_space(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return images.to(torch.float32) / 127.5 - 1


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255] (clipped, rounded)."""
    return (images * 127.5 + 128).clip(0, 255).to(torch.uint8)


@dataclass
class ImageDataset:
    """A dataset held in memory: uint8 pixels or float32 raw latents [N, C, H, W], optional integer labels."""

    images: np.ndarray
    labels: np.ndarray | None
    name: str
    num_classes: int = 0
    encoder: dict | None = None  # None: the default for the data (`default_encoder`)

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.dtype not in (np.uint8, np.float32):
            raise ValueError(f"{self.name}: images must be uint8 pixels or float32 latents [N, C, H, W], got "
                             f"{self.images.dtype} {list(self.images.shape)}")
        n = self.images.shape[0]
        if n == 0:
            raise ValueError(f"{self.name}: the dataset holds no images")
        check_item_shape(self.images.shape[1:], self.latents, self.name)
        if self.labels is not None:
            self.labels, classes = check_labels(self.labels, n, self.name)
            self.num_classes = max(self.num_classes, classes)
        self.encoder = self.encoder or default_encoder(self.latents)

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def latents(self) -> bool:
        """Whether the items are raw latents (float) rather than uint8 pixels."""
        return self.images.dtype != np.uint8

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

    def read_raw(self, indices: np.ndarray) -> np.ndarray:
        """Raw items [len(indices), C, H, W] (uint8 pixels or float32 raw latents)."""
        return self.images[indices]

    def batch(self, indices: np.ndarray, label_dim: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Pixels in [-1, 1] and one-hot labels [N, label_dim] (None when label_dim is 0)."""
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


def _load_npz(path: Path) -> ImageDataset:
    x, y, classes = read_npz(path)
    return ImageDataset(x.transpose(0, 3, 1, 2).copy(), y, name=str(path), num_classes=classes)


def open_dataset(path: str | Path, progress: bool = False) -> ImageDataset | ImageFolderDataset:
    """`digits` or an `.npz` (in memory), or a folder or zip of PNG/JPEG images or `.npy` latents (read from disk
    as needed; opening checks every file's header, with a progress bar if `progress`)."""
    if str(path) == "digits":
        return load_digits_dataset()
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".npz":
        return _load_npz(path)
    if path.is_file() and path.suffix.lower() != ".zip":
        raise ValueError(f"{path}: unsupported data file; pass an image folder, a .zip, a .npz or 'digits'")
    return ImageFolderDataset(path, progress=progress)


def load_dataset(path: str | Path) -> ImageDataset:
    """`open_dataset`, with every item read into memory (for small datasets)."""
    dataset = open_dataset(path)
    if isinstance(dataset, ImageDataset):
        return dataset
    images, labels = dataset.read_all()
    return ImageDataset(images, labels, name=dataset.name, num_classes=dataset.num_classes, encoder=dataset.encoder)
