"""Images to measure, read batch by batch: a folder or uncompressed zip of PNG/JPEG files (decoded on demand,
in worker processes), or an in-memory dataset (`.npz`, `digits`). Batches are split over the processes of a
torch.distributed group as the official metric script splits them."""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from edm2.data import open_dataset
from edm2.runtime import rank_batches

__all__ = ["ImageFiles", "ArrayImages", "open_images", "rank_batches", "iterate_batches"]

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg"}


class ImageFiles(torch.utils.data.Dataset):
    """PNG/JPEG files of a folder (recursively) or an uncompressed zip, in sorted order, all of one size."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._zip: tuple[int, zipfile.ZipFile] | None = None
        if self.path.is_dir():
            self.names = sorted(p.relative_to(self.path).as_posix() for p in self.path.rglob("*")
                                if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        else:
            try:
                with zipfile.ZipFile(self.path) as z:
                    self.names = sorted(n for n in z.namelist() if Path(n).suffix.lower() in IMAGE_EXTENSIONS)
            except (zipfile.BadZipFile, OSError) as e:
                raise ValueError(f"{self.path}: not a readable zip file ({e})") from None
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

    def _bytes(self, name: str) -> bytes:
        if self.path.is_dir():
            return (self.path / name).read_bytes()
        if self._zip is None or self._zip[0] != os.getpid():  # one handle per (worker) process
            self._zip = (os.getpid(), zipfile.ZipFile(self.path))
        return self._zip[1].read(name)

    def _decode(self, i: int) -> np.ndarray | str:
        """uint8 [C, H, W] (C = 1 or 3), or the error as text (worker exceptions would lose the one line)."""
        from PIL import Image

        name = self.names[i]
        try:
            with Image.open(io.BytesIO(self._bytes(name))) as img:
                arr = np.asarray(img.convert("L" if img.mode in ("L", "I;16", "1") else "RGB"))
        except Exception as e:  # noqa: BLE001 - any decoder error is a bad image
            return f"{self.path}/{name}: not a readable image ({type(e).__name__}: {e})"
        return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)

    def __getitem__(self, i: int) -> tuple[np.ndarray | None, str]:
        arr = self._decode(i)
        if isinstance(arr, str):
            return None, arr
        if arr.shape[1:] != self.shape[1:]:
            return None, (f"{self.path}/{self.names[i]} is {arr.shape[2]}x{arr.shape[1]}, the first image "
                          f"{self.shape[2]}x{self.shape[1]}; all images must have one size")
        return (arr if arr.shape[0] == self.shape[0] else np.broadcast_to(arr[:1], self.shape).copy()), ""


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
