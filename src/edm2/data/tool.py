"""The dataset tool (the official `dataset_tool.py`): `convert_dataset` (images of any size -> a dataset in the
official layout, cropped and resized), `encode_dataset` (pixels -> Stable Diffusion VAE latents, the posterior mean
and std of each image as `.npy`), `decode_dataset` (latents -> PNGs) and `dataset_stats` (per-channel statistics
of the latents, for standardising another VAE's latents).

Reading runs in DataLoader worker processes; encoding and decoding split the work over torchrun processes (rank 0
writes). Outputs go through `DatasetWriter`: a zip appears complete or not at all, a folder resumes.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edm2.data.archive import entry_shape
from edm2.data.datasets import open_dataset
from edm2.data.encoders import SD_VAE, StabilityVAEEncoder, encoder_from_dict
from edm2.data.latent_stats import LatentStats, latent_statistics
from edm2.data.loader import LoadError, read_in_order
from edm2.data.sources import ConvertItems, ImageSource
from edm2.data.transforms import make_transform, skips
from edm2.data.writer import DatasetWriter, check_dest, image_name, latent_name, write_file
from edm2.runtime import world_info

__all__ = ["Summary", "convert_dataset", "encode_dataset", "decode_dataset", "dataset_stats"]

Progress = Callable[[int, int], None] | None  # (done, total), called on rank 0


@dataclass
class Summary:
    """What a dataset command wrote."""

    dest: str
    images: int
    classes: int
    shape: tuple[int, int, int]  # [C, H, W] of one item
    bytes: int
    skipped: int = 0

    def line(self) -> str:
        c, h, w = self.shape
        skipped = f"; skipped {self.skipped} image(s) the transform cannot use" if self.skipped else ""
        return (f"wrote {self.images} images ({self.classes or 'no'} classes, {w}x{h}x{c}, "
                f"{self.bytes / 1e6:.1f} MB) to {self.dest}{skipped}")


def _fingerprint(names: list[str]) -> str:
    return hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]


def _labels_json(names: list[str], labels: list[int] | None, extra: dict | None = None) -> dict:
    meta = {"labels": None if labels is None else [[n, int(v)] for n, v in zip(names, labels)]}
    return {**meta, **(extra or {})}


def _check_headers(source: ImageSource, resolution: tuple[int, int] | None, transform: str | None) -> None:
    """Every image's header is readable; without --resolution all images have one square size; the transform
    does not skip every image: checked before anything is written. Damage beyond the headers shows when the
    images are decoded."""
    if source.array is not None:
        shapes = ((name, source.array.shape[1:3]) for name in source.names)
    else:
        shapes = ((name, entry_shape(source.archive, name)[1:]) for name in source.names)
    first, kept = None, 0
    for name, (h, w) in shapes:
        kept += not skips(transform, resolution, w, h)
        if resolution is not None:
            continue
        if h != w:
            raise ValueError(f"--source {source.path}: {name} is {w}x{h}, not square; pass --resolution N "
                             "(and --transform)")
        first = first or (name, h)
        if h != first[1]:
            raise ValueError(f"--source {source.path}: {first[0]} is {first[1]}x{first[1]} but {name} {w}x{h}; "
                             "pass --resolution N to give them one size")
    if not kept:
        width, height = resolution
        raise ValueError(f"--source {source.path}: --transform {transform} skips every image (each is narrower than "
                         f"{width} or too short for {height} rows at that width); nothing to write")


def _check_counts(batch_size: int | None = None, workers: int | None = None) -> None:
    """The counts a command takes from Python callers too (the command line checks its own)."""
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"--batch must be positive, got {batch_size}")
    if workers is not None and workers < 0:
        raise ValueError(f"--workers must be 0 or more, got {workers}")


def convert_dataset(source: str | Path, dest: str | Path, resolution: tuple[int, int] | None = None,
                    transform: str | None = None, max_images: int | None = None, channels: int = 3,
                    workers: int = 4, progress: Progress = None) -> Summary:
    """Convert images to the official layout (see `edm2.data.transforms` for the crops; `channels` 3 = RGB,
    1 = grayscale). Everything is checked before anything is written; a folder `dest` resumes."""
    _check_counts(workers=workers)
    src = ImageSource(source, max_images)
    items = ConvertItems(src, make_transform(transform, resolution), channels)
    _check_headers(src, resolution, transform)
    job = {"command": "convert", "source": str(Path(source).resolve()), "images": _fingerprint(src.names),
           "resolution": resolution, "transform": transform, "channels": channels}
    writer = DatasetWriter(dest, job, source)
    with writer:
        todo = [i for i in range(len(src)) if image_name(i) not in writer.done]
        loader = torch.utils.data.DataLoader(items, batch_size=None, sampler=todo, num_workers=workers,
                                             collate_fn=_as_is)
        shape, written, skipped = None, 0, 0
        for item in loader:
            if isinstance(item, LoadError):
                raise ValueError(item.message)
            index, data, item_shape = item
            if data is None:
                skipped += 1
                continue
            shape = shape or (item_shape, index)
            if item_shape != shape[0]:  # only without --resolution, from images whose headers lied
                raise ValueError(f"{src.names[index]} is {item_shape[2]}x{item_shape[1]}x{item_shape[0]} after the "
                                 f"transform, {src.names[shape[1]]} {shape[0][2]}x{shape[0][1]}x{shape[0][0]}")
            writer.write(image_name(index), data)
            written += 1
            if progress is not None:
                progress(written + skipped, len(todo))
        kept = [i for i in range(len(src)) if image_name(i) in writer.done]
        if not kept:
            raise ValueError(f"--source {source}: the transform skipped every image; nothing to write")
        labels = None if src.labels is None else [src.labels[i] for i in kept]
        extra = {"classes": src.classes} if src.classes else {}
        writer.finish(_labels_json([image_name(i) for i in kept], labels, extra))
    return _summary(dest, writer.bytes, skipped)


def _summary(dest, num_bytes: int, skipped: int = 0) -> Summary:
    """The summary of a finished dataset, read back from `dest` (which checks every file's header)."""
    written = open_dataset(dest)
    return Summary(str(dest), len(written), written.num_classes, written.shape, num_bytes, skipped)


def _as_is(item):
    return item


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _split_map(dataset, todo: list[int], batch_size: int, workers: int,
               fn: Callable[[torch.Tensor], list[bytes]]) -> Iterator[tuple[list[int], list[bytes]]]:
    """`fn` over batches of `todo`, the batches dealt out to the torchrun processes in turn; yields (indices,
    results) in order on rank 0 (nothing elsewhere)."""
    rank, world = world_info()
    chunks = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
    mine = iter(read_in_order(dataset, batch_size, workers, [i for c in chunks[rank::world] for i in c]))
    for start in range(0, len(chunks), world):
        got = next(mine, None) if start + rank < len(chunks) else None
        result = ([], []) if got is None else (got[0], fn(got[1]))
        parts = [result]
        if world > 1:
            parts = [None] * world if rank == 0 else None
            torch.distributed.gather_object(result, parts, dst=0)
        if rank == 0:
            for indices, outputs in parts:
                if indices:
                    yield indices, outputs


def _resume_list(writer: DatasetWriter | None, names: list[str]) -> list[int]:
    """The indices still to write (rank 0 decides, every process gets its list)."""
    todo = [[i for i, n in enumerate(names) if writer is None or n not in writer.done]]
    if world_info()[1] > 1:
        torch.distributed.broadcast_object_list(todo, src=0)
    return todo[0]


def _write_all(dataset, dest, job: dict, names: list[str], fn, batch_size: int, workers: int,
               extra: dict, progress: Progress) -> Summary | None:
    """Write `fn`'s output for the first len(names) items of `dataset` to `dest` under `names` (rank 0), labels
    carried over. Returns the summary on rank 0, None elsewhere."""
    writer = DatasetWriter(dest, job, job["source"]) if world_info()[0] == 0 else None
    with writer if writer is not None else contextlib.nullcontext():
        todo = _resume_list(writer, names)
        done = 0
        for indices, outputs in _split_map(dataset, todo, batch_size, workers, fn):
            for i, data in zip(indices, outputs):
                writer.write(names[i], data)
            done += len(indices)
            if progress is not None:
                progress(done, len(todo))
        if writer is None:
            return None
        labels = None if dataset.labels is None else dataset.labels[:len(names)].tolist()
        writer.finish(_labels_json(names, labels, extra))
    return _summary(dest, writer.bytes)


def _open(source, dest, max_images: int | None, latents: bool, batch_size: int, workers: int):
    """The source dataset and the number of its items to use; the counts and the destination checked (the
    destination again, fully, by `DatasetWriter` before anything is written)."""
    _check_counts(batch_size, workers)
    check_dest(dest, source)
    dataset = open_dataset(source)
    if dataset.latents != latents:
        want = "latents (written by `edm2 dataset encode`)" if latents else "images"
        raise ValueError(f"--source {source} holds {'latents' if dataset.latents else 'images'}; expected {want}")
    n = len(dataset) if max_images is None else min(max_images, len(dataset))
    if max_images is not None and max_images < 1:
        raise ValueError(f"--max-images must be positive, got {max_images}")
    return dataset, n


def encode_dataset(source: str | Path, dest: str | Path, vae: str = SD_VAE, device: torch.device | str = "cpu",
                   batch_size: int = 8, precision: str = "fp32", max_images: int | None = None, workers: int = 2,
                   progress: Progress = None) -> Summary | None:
    """Encode a pixel dataset (RGB, one size) into VAE latents: per image the posterior mean and std, 8 channels
    [2C, H/8, W/8] float32, named `img-mean-std-<index>.npy` as the official tool; labels carried over and the
    encoder recorded in `dataset.json`. Returns the summary on rank 0, None elsewhere."""
    dataset, n = _open(source, dest, max_images, False, batch_size, workers)
    if dataset.channels != 3:
        raise ValueError(f"--source {source} has {dataset.channels}-channel images; the VAE takes RGB "
                         "(convert with `edm2 dataset convert --channels 3`)")
    encoder = StabilityVAEEncoder(_recorded_name(vae), batch_size=batch_size, precision=precision)
    encoder.init(device)
    names = [latent_name(i) for i in range(n)]
    job = {"command": "encode", "source": str(Path(source).resolve()), "images": n, "vae": encoder.vae_name}

    def fn(pixels: torch.Tensor) -> list[bytes]:
        latents = encoder.encode_pixels(pixels.to(device)).cpu().numpy()
        return [_npy(x) for x in latents]

    extra = {"encoder": encoder.to_dict()}
    return _write_all(dataset, dest, job, names, fn, batch_size, workers, extra, progress)


def _recorded_name(vae: str) -> str:
    """A local VAE folder is recorded by its absolute path, so that generation finds it from anywhere."""
    path = Path(vae).expanduser()
    return str(path.resolve()) if path.is_dir() else vae


def decode_dataset(source: str | Path, dest: str | Path, vae: str | None = None, device: torch.device | str = "cpu",
                   batch_size: int = 8, precision: str = "fp32", max_images: int | None = None, workers: int = 2,
                   progress: Progress = None) -> Summary | None:
    """Decode a latent dataset to PNGs: the posterior mean of each image through the VAE decoder (the dataset's
    recorded VAE unless `vae` is given), labels carried over."""
    dataset, n = _open(source, dest, max_images, True, batch_size, workers)
    encoder = encoder_from_dict(dataset.encoder, vae_name=None if vae is None else _recorded_name(vae),
                                batch_size=batch_size, precision=precision)
    encoder.network_channels(dataset.channels)  # the statistics fit the latents
    encoder.init(device)
    names = [image_name(i) for i in range(n)]
    job = {"command": "decode", "source": str(Path(source).resolve()), "images": n, "vae": encoder.vae_name}

    def fn(latents: torch.Tensor) -> list[bytes]:
        from PIL import Image

        latents = latents.to(device)
        mean = encoder.encode_latents(latents, noise=torch.zeros_like(latents[:, :latents.shape[1] // 2]))
        out = []
        for img in encoder.decode(mean).permute(0, 2, 3, 1).cpu().numpy():
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG", compress_level=0)
            out.append(buf.getvalue())
        return out

    return _write_all(dataset, dest, job, names, fn, batch_size, workers, {}, progress)


def dataset_stats(source: str | Path, dest: str | Path, batch_size: int = 64, workers: int = 2,
                  progress: Progress = None) -> LatentStats:
    """Measure the per-channel raw mean/std of a latent dataset and write them as JSON to `dest` (the file
    `edm2 train --latent-stats` reads)."""
    _check_counts(batch_size, workers)
    check_dest(dest, source)
    if Path(dest).is_dir():
        raise ValueError(f"--dest {dest} is a folder; name the JSON file to write")
    dataset = open_dataset(source)
    stats = latent_statistics(dataset, batch_size, workers, progress)
    write_file(dest, json.dumps(stats.to_dict(str(source)), indent=2) + "\n", source)
    return stats
