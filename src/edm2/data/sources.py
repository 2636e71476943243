"""What `edm2 dataset convert` reads: a folder (recursively) or zip of images of any size, or an NPZ, with labels
from its `dataset.json` or else from class subfolders (sorted by name), and the per-image work a conversion does
in worker processes (decode, crop/resize, encode as PNG).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from edm2.data.archive import Archive, is_image, parse_labels, read_npz
from edm2.data.folder import DATASET_JSON
from edm2.data.image_read import read_image, to_channels
from edm2.data.loader import LoadError

__all__ = ["ImageSource", "ConvertItems"]


class ImageSource:
    """Images to convert, in sorted name order (the first `max_images`), with integer labels or None, and the
    class names when the labels come from subfolders."""

    def __init__(self, path: str | Path, max_images: int | None = None) -> None:
        path = Path(path)
        if max_images is not None and max_images < 1:
            raise ValueError(f"--max-images must be positive, got {max_images}")
        self.path, self.archive, self.array = path, None, None
        self.classes: list[str] | None = None
        if path.is_file() and path.suffix.lower() == ".npz":
            self.names, labels = self._open_npz(path)
        else:
            if path.is_file() and path.suffix.lower() != ".zip":
                raise ValueError(f"--source {path}: unsupported file; pass an image folder, a .zip or a .npz")
            self.archive = Archive(path)
            self.names = [n for n in self.archive.names if is_image(n)]
            if not self.names:
                raise ValueError(f"--source {path}: no images found")
            labels = self._folder_labels()
        self.names = self.names[:max_images]
        self.labels = None if labels is None else [int(v) for v in labels[:len(self.names)]]

    def _open_npz(self, path: Path) -> tuple[list[str], np.ndarray | None]:
        x, y, _ = read_npz(path)  # labels checked there: class indices, or one-hot rows
        if not len(x):
            raise ValueError(f"--source {path}: 'x' holds no images")
        if x.shape[3] not in (1, 3, 4):
            raise ValueError(f"--source {path}: 'x' has {x.shape[3]} channels; expected 1, 3 or 4")
        self.array = x
        return [f"x[{i}]" for i in range(len(x))], y

    def _folder_labels(self) -> list[int] | None:
        if DATASET_JSON in self.archive.names:
            labels = parse_labels(self.archive.read(DATASET_JSON), self.names, str(self.path))
            if labels is not None:
                return labels.tolist()
        tops = [n.split("/")[0] if "/" in n else "" for n in self.names]
        classes = sorted(set(tops))
        if len(classes) < 2:  # one folder (or none): no classes, as the official tool
            return None
        self.classes = classes
        index = {c: i for i, c in enumerate(classes)}
        return [index[t] for t in tops]

    def __len__(self) -> int:
        return len(self.names)

    def read(self, index: int, channels: int | None = None) -> np.ndarray:
        """Image `index` as uint8 [H, W, C]: C = 1 or 3 as `image_read` reads it, or `channels` (1 or 3)."""
        if self.array is not None:
            return to_channels(self.array[index], channels)
        name = self.names[index]
        return read_image(self.archive.read(name), self.archive.where(name), channels)


class ConvertItems(torch.utils.data.Dataset):
    """Item i: (i, uncompressed PNG bytes or None when the transform skips the image, [C, H, W] of the result),
    or a LoadError naming the file. `channels`: 1 (grayscale) or 3 (RGB) in the output."""

    def __init__(self, source: ImageSource, transform, channels: int = 3) -> None:
        if channels not in (1, 3):
            raise ValueError(f"--channels must be 1 (grayscale) or 3 (RGB), got {channels}")
        self.source, self.transform, self.channels = source, transform, channels

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        from PIL import Image

        try:
            img = self.transform(self.source.read(index, self.channels))
        except ValueError as e:
            return LoadError(str(e))
        if img is None:
            return index, None, None
        buf = io.BytesIO()
        Image.fromarray(img[:, :, 0] if self.channels == 1 else img).save(buf, format="PNG", compress_level=0)
        return index, buf.getvalue(), (img.shape[2], img.shape[0], img.shape[1])
