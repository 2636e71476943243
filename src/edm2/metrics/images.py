"""Images to measure, read batch by batch: a folder or zip of PNG/JPEG files (decoded on demand, in worker
processes), or an in-memory dataset (`.npz`, `digits`). Batches are split over the processes of a torch.distributed
group as the official metric script splits them.

Files are listed and decoded as every edm2 reader does (`edm2.data.archive.Archive`, `edm2.data.image_read`: 16-bit
PNGs scaled to 8 bits, alpha dropped, palettes looked up) and measured as RGB: a grey image has three equal channels,
which is what the feature networks make of a grey image anyway, so a folder mixing grey and colour images is
measured consistently, each image by all its channels."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from edm2.data import open_dataset
from edm2.data.archive import Archive, is_image
from edm2.data.image_read import read_image
from edm2.runtime import rank_batches

__all__ = ["ImageFiles", "ArrayImages", "open_images", "rank_batches", "iterate_batches"]


class ImageFiles(torch.utils.data.Dataset):
    """The images of a folder (recursively, hidden files left out) or a zip, in sorted order, all of one size,
    read as RGB uint8 [3, H, W]."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.archive = Archive(self.path)
        self.names = [n for n in self.archive.names if is_image(n)]
        if not self.names:
            raise ValueError(f"{self.path}: no PNG or JPEG images found")
        first = self._decode(0)
        if isinstance(first, str):
            raise ValueError(first)
        self.shape = tuple(first.shape)

    @property
    def resolution(self) -> tuple[int, int]:
        return self.shape[1], self.shape[2]

    def __len__(self) -> int:
        return len(self.names)

    def _decode(self, i: int) -> np.ndarray | str:
        """uint8 [3, H, W], or the error as text (worker exceptions would lose the one line)."""
        name = self.names[i]
        try:
            return read_image(self.archive.read(name), self.archive.where(name), channels=3).transpose(2, 0, 1)
        except ValueError as e:
            return str(e)

    def __getitem__(self, i: int) -> tuple[np.ndarray | None, str]:
        arr = self._decode(i)
        if isinstance(arr, str):
            return None, arr
        if arr.shape != self.shape:
            return None, (f"{self.path}/{self.names[i]} is {arr.shape[2]}x{arr.shape[1]}, the first image "
                          f"{self.shape[2]}x{self.shape[1]}; all images must have one size")
        return arr, ""


class ArrayImages(torch.utils.data.Dataset):
    """An in-memory dataset (`.npz` or `digits`, see edm2.data.open_dataset)."""

    def __init__(self, path: str | Path) -> None:
        self.data = open_dataset(path)
        if self.data.channels not in (1, 3):
            raise ValueError(f"{path}: images with {self.data.channels} channels cannot be measured (latents?)")
        self.resolution = (self.data.resolution, self.data.resolution)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[np.ndarray, str]:
        return self.data.images[i], ""


def open_images(path: str | Path) -> ImageFiles | ArrayImages:
    """The images of a folder, zip, `.npz` or `digits`, ready to be read batch by batch."""
    p = Path(path)
    if str(path) != "digits" and not p.exists():
        raise ValueError(f"{path}: does not exist; pass an image folder, a .zip, a .npz or 'digits'")
    if p.is_dir() or p.suffix.lower() == ".zip":
        return ImageFiles(p)
    return ArrayImages(path)


def _collate(items: list[tuple[np.ndarray | None, str]]) -> tuple[torch.Tensor | None, str]:
    errors = [e for _, e in items if e]
    if errors:
        return None, errors[0]
    return torch.from_numpy(np.stack([a for a, _ in items])), ""


def iterate_batches(images: ImageFiles | ArrayImages, indices: np.ndarray, batch_size: int,
                    num_workers: int = 2) -> Iterator[tuple[torch.Tensor, list[int]]]:
    """(uint8 images [N, C, H, W], their global indices) for this process's share of `indices`."""
    batches = [indices[b].tolist() for b in rank_batches(len(indices), batch_size)]
    workers = num_workers if isinstance(images, ImageFiles) else 0
    loader = torch.utils.data.DataLoader(images, batch_sampler=batches, num_workers=workers,
                                         collate_fn=_collate, prefetch_factor=2 if workers else None)
    for (batch, error), positions in zip(loader, (rank_batches(len(indices), batch_size))):
        if error:
            raise ValueError(error)
        yield batch, positions.tolist()
