"""`ImageFolderDataset`: a folder or zip of PNG/JPEG images or `.npy` raw latents, read from disk item by item.

Opening lists the entries, reads `dataset.json` (labels, and the encoder when `edm2 dataset encode` wrote it) and
checks every entry's header, so that mixed sizes or channels and unreadable files are reported before training
starts. Afterwards the dataset keeps a compact table of its entries (`archive.Entries`: names, offsets and labels in
numpy arrays), so that its memory stays small however large the dataset; worker processes of a
`torch.utils.data.DataLoader` each open the file themselves.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edm2.data.archive import (
    Archive,
    Entries,
    check_item_shape,
    decode_image,
    decode_npy,
    entry_shape,
    is_image,
    is_latent,
    parse_labels,
)
from edm2.data.encoders import default_encoder, encoder_from_dict
from edm2.data.image_read import image_header

__all__ = ["ImageFolderDataset", "DATASET_JSON", "INCOMPLETE_MARKER"]

DATASET_JSON = "dataset.json"
INCOMPLETE_MARKER = ".edm2-incomplete.json"  # written by the dataset tool while it fills a folder


class ImageFolderDataset:
    """Images or raw latents of one shape in a folder (recursively) or a zip, in sorted name order, with the
    integer labels of its `dataset.json` (official name and `path`, `resolution`, `use_labels` arguments)."""

    def __init__(self, path: str | Path, resolution: int | None = None, use_labels: bool = True,
                 progress: bool = False) -> None:
        self.name = str(path)
        archive = Archive(path)
        try:
            names = self._open(archive, resolution, use_labels, progress)
            self.entries = Entries(archive, names)  # all that reading items needs, for the rest of the run
        finally:
            archive.close()

    def _open(self, archive: Archive, resolution: int | None, use_labels: bool, progress: bool) -> list[str]:
        """Check the files and read the labels and the encoder; returns the names of the items."""
        if not archive.is_zip and (archive.path / INCOMPLETE_MARKER).exists():
            raise ValueError(f"{self.name}: an unfinished `edm2 dataset` conversion; run the same command again "
                             "to finish it")
        images = [n for n in archive.names if is_image(n)]
        latents = [n for n in archive.names if is_latent(n)]
        if images and latents:
            raise ValueError(f"{self.name}: holds both images ({images[0]}) and .npy latents ({latents[0]}); keep "
                             "one kind")
        if not images and not latents:
            raise ValueError(f"{self.name}: no PNG or JPEG images (or .npy latents) found")
        self.latents = bool(latents)
        names = latents or images
        self.shape = self._check_shapes(archive, names, progress)
        check_item_shape(self.shape, self.latents, self.name)
        if resolution is not None and self.shape[1] != resolution:
            raise ValueError(f"{self.name}: items are {self.shape[1]}x{self.shape[2]}, expected "
                             f"{resolution}x{resolution}")
        meta = archive.read(DATASET_JSON) if DATASET_JSON in archive.names else None
        self.labels = parse_labels(meta, names, self.name) if meta is not None and use_labels else None
        self.num_classes = 0 if self.labels is None else int(self.labels.max()) + 1
        self.encoder = self._encoder(meta)
        return names

    def _encoder(self, meta: bytes | None) -> dict:
        spec = None
        if meta is not None:
            try:
                spec = json.loads(meta).get("encoder")
            except (ValueError, AttributeError):
                spec = None  # parse_labels has reported malformed JSON already, when labels are used
        if spec is None:
            return default_encoder(self.latents)
        try:
            encoder = encoder_from_dict(spec)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{self.name}/{DATASET_JSON}: bad \"encoder\" entry ({e})") from None
        if (encoder.to_dict()["class"] == "StabilityVAEEncoder") != self.latents:
            raise ValueError(f"{self.name}/{DATASET_JSON}: its encoder {spec.get('class')} does not fit the "
                             f"{'latents' if self.latents else 'images'} it holds")
        return encoder.to_dict()

    def _check_shapes(self, archive: Archive, names: list[str], progress: bool) -> tuple[int, int, int]:
        """The common [C, H, W] of all entries, from their headers; ValueError naming two that differ."""
        from tqdm import tqdm

        first = None
        quiet = not progress or len(names) < 10000
        bar = tqdm(names, desc="checking dataset", unit="file", disable=quiet, leave=False)
        for name in bar:
            shape = entry_shape(archive, name)
            if first is None:
                first = (shape, name)
            elif shape != first[0]:
                self._mixed(archive, first[1], first[0], name, shape)
        return first[0]

    def _mixed(self, archive: Archive, first: str, first_shape: tuple, name: str, shape: tuple) -> None:
        """The one-line error for two entries of different shapes (for images of one size but different channel
        counts, their modes too: a folder of grey and colour images is refused, not silently converted)."""
        (c0, h0, w0), (c1, h1, w1) = first_shape, shape
        kind = "latent shapes" if self.latents else "image sizes"
        if self.latents or (h0, w0) != (h1, w1):
            raise ValueError(f"{self.name}: mixed {kind} ({first} is {w0}x{h0}x{c0}, {name} is {w1}x{h1}x{c1}); "
                             "resize all images to one size (`edm2 dataset convert --resolution N`)")
        modes = []
        for n in (first, name):
            with archive.open(n) as f:
                modes.append(image_header(f, archive.where(n)).mode)
        raise ValueError(f"{self.name}: mixed image sizes ({first} is {w0}x{h0}x{c0}, mode {modes[0]}; {name} is "
                         f"{w1}x{h1}x{c1}, mode {modes[1]}); give all images one channel count (`edm2 dataset "
                         "convert --channels 3`, or 1 for grey)")

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def resolution(self) -> int:
        return self.shape[1]

    @property
    def channels(self) -> int:
        return self.shape[0]

    @property
    def has_labels(self) -> bool:
        return self.labels is not None

    def describe(self) -> dict:
        """JSON-able summary stored with checkpoints and snapshots."""
        return {"name": self.name, "num_images": len(self), "resolution": self.resolution,
                "channels": self.channels, "num_classes": self.num_classes}

    def read(self, index: int) -> np.ndarray:
        """Item `index`: uint8 pixels or float32 raw latents [C, H, W]."""
        data = self.entries.read(index)
        where = f"{self.name}/{self.entries.name(index)}"
        item = decode_npy(data, where) if self.latents else decode_image(data, where).transpose(2, 0, 1)
        if item.shape != self.shape:
            raise ValueError(f"{where}: is {list(item.shape)}, the dataset {list(self.shape)} (changed since it was "
                             "opened?)")
        return item

    def read_raw(self, indices: np.ndarray) -> np.ndarray:
        """Items [len(indices), C, H, W]."""
        return np.stack([self.read(int(i)) for i in indices])

    def read_all(self) -> tuple[np.ndarray, np.ndarray | None]:
        """Every item in memory, and the labels."""
        return self.read_raw(np.arange(len(self))), self.labels
