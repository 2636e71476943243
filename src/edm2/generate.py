"""Generate images from a network: per-seed noise and classes, guidance, decoding to pixels with the snapshot's
encoder (the VAE for latent models), PNG output and grids.

Each image depends on its seed only, drawn in the official `generate_images.py` order: from the seed's own
generator, first the noise, then (for a class-conditional network) a class, drawn even when the class is
given so that the churn noise that follows is the official one, then the sampler's churn noise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from edm2.data import Encoder, StandardRGBEncoder, encoder_from_dict, to_model_space, to_uint8
from edm2.files import atomic_output
from edm2.runtime import fast_paths_for, prepare_for_sampling, set_cuda_math, world_info
from edm2.sampling import SamplerSettings, StackedRandomGenerator

__all__ = ["sample_batch", "generate_images", "save_png", "make_grid", "check_same_space"]


def sample_batch(
    net: torch.nn.Module,
    seeds: Sequence[int],
    class_idx: int | Sequence[int] | None = None,
    gnet: torch.nn.Module | None = None,
    settings: SamplerSettings = SamplerSettings(),
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Images in [-1, 1] for `seeds` (each depends only on its seed) and their class indices.

    `class_idx`: one class for all, one per seed, or None for the class drawn from each seed.
    """
    rnd = StackedRandomGenerator(device, seeds)
    n = len(seeds)
    noise = rnd.randn([n, net.img_channels, net.img_resolution, net.img_resolution])
    classes = labels = None
    if net.label_dim:
        classes = rnd.randint(net.label_dim, [n])  # drawn in any case: it moves each seed's stream
        if class_idx is not None:
            classes = torch.as_tensor(class_idx, device=device).expand(n) if np.ndim(class_idx) == 0 \
                else torch.as_tensor(class_idx, device=device)
            if int(classes.min()) < 0 or int(classes.max()) >= net.label_dim:
                raise ValueError(f"class {class_idx} outside 0..{net.label_dim - 1}")
        labels = torch.nn.functional.one_hot(classes, net.label_dim).to(torch.float32)
    with torch.no_grad():
        images = settings.sample(net, noise, labels, gnet=gnet, randn_like=rnd.randn_like)
    return images, classes


def save_png(path: str | Path, image: torch.Tensor) -> None:
    """Write one image [C, H, W] (uint8 pixels, or floats in [-1, 1]) as PNG, atomically."""
    from PIL import Image

    arr = (image if image.dtype == torch.uint8 else to_uint8(image)).permute(1, 2, 0).cpu().numpy()
    img = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr[:, :, :3])
    with atomic_output(path) as tmp:
        img.save(tmp, format="PNG")


def make_grid(images: torch.Tensor, cols: int | None = None, scale: int = 1, gap: int = 0,
              gap_value: float = 0.0) -> torch.Tensor:
    """Tile [N, C, H, W] images row by row into one [C, rows*(H*scale+gap)-gap, cols*(W*scale+gap)-gap]
    image: pixels repeated `scale` times, `gap` pixels of `gap_value` (0: mid-gray in [-1, 1]) between
    tiles, empty tiles filled with the gap value."""
    n, c = images.shape[:2]
    cols = cols or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    tiles = images.repeat_interleave(scale, 2).repeat_interleave(scale, 3)
    tiles = torch.cat([tiles, tiles.new_full([rows * cols - n, *tiles.shape[1:]], gap_value)])
    tiles = torch.nn.functional.pad(tiles, (0, gap, 0, gap), value=gap_value)
    h, w = tiles.shape[2:]
    grid = tiles.reshape(rows, cols, c, h, w).permute(2, 0, 3, 1, 4).reshape(c, rows * h, cols * w)
    return grid[:, :rows * h - gap, :cols * w - gap]


def check_same_space(net_encoder: dict | None, gnet_encoder: dict | None) -> None:
    """ValueError unless a model and its guide work in the same space: the same encoder (snapshot metadata) up to
    where its VAE is stored."""
    def space(spec: dict | None) -> dict:
        d = encoder_from_dict(spec).to_dict()
        d["kwargs"].pop("vae_name", None)
        return d

    if space(net_encoder) != space(gnet_encoder):
        raise ValueError(f"--gnet works in another space than --net (encoder {space(gnet_encoder)} vs "
                         f"{space(net_encoder)}); guide with a model trained on the same kind of data")


def _check_request(net: torch.nn.Module, seeds: Sequence[int], batch_size: int, settings: SamplerSettings,
                   gnet: torch.nn.Module | None, class_idx) -> None:
    if not seeds:
        raise ValueError("no seeds given")
    if batch_size <= 0:
        raise ValueError(f"--batch must be positive, got {batch_size}")
    if settings.guidance != 1 and gnet is None:
        raise ValueError(f"--guidance {settings.guidance} needs a guide model: pass --gnet SNAPSHOT")
    _check_classes(net, seeds, class_idx)


def _check_classes(net: torch.nn.Module, seeds: Sequence[int], class_idx) -> None:
    label_dim = getattr(net, "label_dim", 0)
    if class_idx is not None and label_dim and not all(0 <= int(c) < label_dim for c in np.atleast_1d(class_idx)):
        raise ValueError(f"class {class_idx} outside 0..{label_dim - 1}")
    if class_idx is not None and np.ndim(class_idx) > 0 and len(class_idx) != len(seeds):
        raise ValueError(f"{len(class_idx)} classes for {len(seeds)} seeds")


def generate_images(
    net: torch.nn.Module,
    seeds: Sequence[int],
    outdir: str | Path | None,
    settings: SamplerSettings = SamplerSettings(),
    batch_size: int = 64,
    grid: str | Path | None = None,
    progress: Callable[[int, int], None] | None = None,
    class_idx: int | Sequence[int] | None = None,
    gnet: torch.nn.Module | None = None,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    compile: bool = False,
    allow_tf32: bool = False,
    encoder: Encoder | None = None,
) -> torch.Tensor:
    """Sample `seeds` in batches, decode them to pixels with `encoder` (None: standard RGB; the snapshot's
    encoder, `edm2.data.encoder_from_dict(snapshot.encoder)`, for latent models), write `<outdir>/<seed:06d>.png`
    per seed and an optional grid PNG. Returns all samples [N, C, H, W] as the network made them (in [-1, 1] for
    pixel models), in the order of `seeds`.

    In a torch.distributed process group the batches are dealt out to the processes in turn; each writes
    its own PNGs, and every process returns all images (rank 0 writes the grid). Images depend on their
    seeds only, so they equal those of a single process. `precision`, `compile` and `allow_tf32` select
    the runtime (`edm2.runtime`); anything but plain float32 eager also switches on the fast attention and
    norm paths, which change results by rounding only.
    """
    _check_request(net, seeds, batch_size, settings, gnet, class_idx)
    encoder = encoder or StandardRGBEncoder()
    per_seed = class_idx is not None and np.ndim(class_idx) > 0
    set_cuda_math(torch.device(device), allow_tf32)
    net = prepare_for_sampling(net, precision, compile)
    gnet = None if gnet is None else prepare_for_sampling(gnet, precision, compile)
    if outdir is not None:
        Path(outdir).mkdir(parents=True, exist_ok=True)
    rank, world = world_info()
    starts = list(range(0, len(seeds), batch_size))[rank::world]
    mine: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    with fast_paths_for(precision, compile):
        for done, start in enumerate(starts, 1):
            chunk = list(seeds[start:start + batch_size])
            classes = list(class_idx[start:start + batch_size]) if per_seed else class_idx
            images, _ = sample_batch(net, chunk, class_idx=classes, gnet=gnet, settings=settings, device=device)
            pixels = encoder.decode(images).cpu()
            if outdir is not None:
                for seed, image in zip(chunk, pixels):
                    save_png(Path(outdir) / f"{seed:06d}.png", image)
            mine[start] = images.cpu(), pixels
            if progress is not None:
                progress(min(done * batch_size * world, len(seeds)), len(seeds))
    if world > 1:
        parts: list = [None] * world
        torch.distributed.all_gather_object(parts, mine)
        mine = {k: v for part in parts for k, v in part.items()}
        if progress is not None:
            progress(len(seeds), len(seeds))
    images = torch.cat([mine[k][0] for k in sorted(mine)])
    if grid is not None and rank == 0:
        _save_grid(grid, torch.cat([mine[k][1] for k in sorted(mine)]))
    return images


def _save_grid(path: str | Path, pixels: torch.Tensor) -> None:
    """All images in one PNG, small ones enlarged to about 64 pixels."""
    images = to_model_space(pixels)  # exact: uint8 -> [-1, 1] -> uint8
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_png(path, make_grid(images, scale=max(1, 64 // images.shape[-1]), gap=2))
