"""Generate images from a network: per-seed noise and classes, guidance, decoding to pixels with the snapshot's
encoder (the VAE for latent models), PNG output and grids.

Each image depends on its seed only, drawn in the official `generate_images.py` order: from the seed's own
generator, first the noise, then (for a class-conditional network) a class, drawn even when the class is
given so that the churn noise that follows is the official one, then the sampler's churn noise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from edm2.data import Encoder, StandardRGBEncoder, encoder_from_dict, to_model_space, to_uint8
from edm2.files import atomic_output
from edm2.runtime import fast_paths_for, prepare_for_sampling, rank_batches, set_cuda_math, world_info
from edm2.sampling import DesignSteps, SamplerSettings, StackedRandomGenerator

__all__ = ["SamplingSession", "SampledBatch", "sample_batch", "generate_images", "generate_with", "save_png",
           "save_seed_pngs", "make_grid", "check_same_space"]


def sample_batch(
    net: torch.nn.Module,
    seeds: Sequence[int],
    class_idx: int | Sequence[int] | None = None,
    gnet: torch.nn.Module | None = None,
    settings: SamplerSettings = SamplerSettings(),
    device: torch.device | str = "cpu",
    steps: torch.Tensor | DesignSteps | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Images in [-1, 1] for `seeds` (each depends only on its seed) and their class indices.

    `class_idx`: one class for all, one per seed, or None for the class drawn from each seed. `steps`: the
    sampler's steps made once (`settings.time_steps(net, device)`); None makes them for this batch.
    """
    _check_classes(net.label_dim, len(seeds), class_idx)
    rnd = StackedRandomGenerator(device, seeds)
    n = len(seeds)
    noise = rnd.randn([n, net.img_channels, net.img_resolution, net.img_resolution])
    classes = labels = None
    if net.label_dim:
        classes = rnd.randint(net.label_dim, [n])  # drawn in any case: it moves each seed's stream
        if class_idx is not None:
            classes = torch.as_tensor(class_idx, device=device).expand(n)
        labels = torch.nn.functional.one_hot(classes, net.label_dim).to(torch.float32)
    with torch.no_grad():
        images = settings.sample(net, noise, labels, gnet=gnet, randn_like=rnd.randn_like, steps=steps)
    return images, classes


def _check_classes(label_dim: int, num_seeds: int, class_idx: int | Sequence[int] | None) -> None:
    """ValueError for a class outside 0..label_dim-1 (a conditional network), or a list not one class per seed."""
    if class_idx is None:
        return
    if label_dim and not all(0 <= int(c) < label_dim for c in np.atleast_1d(class_idx)):
        raise ValueError(f"class {class_idx} outside 0..{label_dim - 1}")
    if np.ndim(class_idx) > 0 and len(class_idx) != num_seeds:
        raise ValueError(f"{len(class_idx)} classes for {num_seeds} seeds")


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


@dataclass(frozen=True)
class SampledBatch:
    """One batch of a sampling session, on the session's device."""

    positions: list[int]  # where its seeds stand in the request
    seeds: list[int]
    classes: torch.Tensor | None  # class per image (None: unconditional network)
    images: torch.Tensor  # [N, C, H, W] as the network made them (in [-1, 1] for pixel models)
    pixels: torch.Tensor  # uint8 [N, C', H', W'], decoded by the session's encoder


@dataclass
class SamplingSession:
    """How to sample a model: main network, optional guide, sampler settings, the encoder that decodes to pixels
    (None: standard RGB; `edm2.data.encoder_from_dict(snapshot.encoder)` for latent models), batch, device and
    runtime (`edm2.runtime`). `snapshot_encoders`: the `snapshot.encoder` of the network and of the guide, to
    check that they work in the same space; None: not known, not checked.

    `batches(seeds)` checks the request, prepares the networks (once per session) and samples this process's
    share of the batches; `generate_with` writes them as PNGs, `edm2.metrics.measure` feeds them to the feature
    networks."""

    net: torch.nn.Module
    gnet: torch.nn.Module | None = None
    settings: SamplerSettings = SamplerSettings()
    encoder: Encoder | None = None
    batch_size: int = 64
    device: torch.device | str = "cpu"
    precision: str = "fp32"
    compile: bool = False
    allow_tf32: bool = False
    snapshot_encoders: tuple[dict | None, dict | None] | None = None
    _prepared: tuple[torch.nn.Module, torch.nn.Module | None] | None = field(default=None, init=False, repr=False)

    def check(self, seeds: Sequence[int], class_idx: int | Sequence[int] | None = None) -> None:
        """ValueError, as one line, for a request this session cannot sample."""
        if len(seeds) == 0:
            raise ValueError("no seeds given")
        if self.batch_size <= 0:
            raise ValueError(f"--batch must be positive, got {self.batch_size}")
        if self.settings.guidance != 1 and self.gnet is None:
            raise ValueError(f"--guidance {self.settings.guidance} needs a guide model: pass --gnet SNAPSHOT")
        if self.gnet is not None and self.snapshot_encoders is not None:
            check_same_space(*self.snapshot_encoders)
        _check_classes(getattr(self.net, "label_dim", 0), len(seeds), class_idx)

    def prepare(self) -> tuple[torch.nn.Module, torch.nn.Module | None]:
        """The network and guide set up for sampling (CUDA math flags, precision, compile) and the encoder's VAE
        loaded, once per session."""
        if self._prepared is None:
            self.decoder.init(self.device)
            set_cuda_math(torch.device(self.device), self.allow_tf32)
            gnet = None if self.gnet is None else prepare_for_sampling(self.gnet, self.precision, self.compile)
            self._prepared = prepare_for_sampling(self.net, self.precision, self.compile), gnet
        return self._prepared

    @property
    def decoder(self) -> Encoder:
        """The encoder that turns samples into pixels."""
        return self.encoder or StandardRGBEncoder()

    def batches(self, seeds: Sequence[int], class_idx: int | Sequence[int] | None = None) -> Iterator[SampledBatch]:
        """This process's batches of `seeds` (all of them without torch.distributed): the official split, equal-sized
        batches dealt out to the processes in turn. Checks and prepares first, before the first batch is asked for.
        `class_idx`: one class for all, one per seed, or None for the class drawn from each seed."""
        self.check(seeds, class_idx)
        net, gnet = self.prepare()
        return self._sample(net, gnet, [int(s) for s in seeds], class_idx)

    def _sample(self, net: torch.nn.Module, gnet: torch.nn.Module | None, seeds: list[int],
                class_idx: int | Sequence[int] | None) -> Iterator[SampledBatch]:
        per_seed = class_idx is not None and np.ndim(class_idx) > 0
        steps = self.settings.time_steps(net, self.device)  # once for every batch
        for batch in rank_batches(len(seeds), self.batch_size):
            positions = batch.tolist()
            chunk = [seeds[i] for i in positions]
            classes = [class_idx[i] for i in positions] if per_seed else class_idx
            with fast_paths_for(self.precision, self.compile):  # on while sampling only, not between batches
                images, drawn = sample_batch(net, chunk, classes, gnet, self.settings, self.device, steps)
            yield SampledBatch(positions, chunk, drawn, images, self.decoder.decode(images))


def save_seed_pngs(outdir: str | Path, seeds: Sequence[int], pixels: torch.Tensor) -> None:
    """Write `<outdir>/<seed:06d>.png` for each seed and its image of `pixels` (uint8 [N, C, H, W])."""
    for seed, image in zip(seeds, pixels.cpu()):
        save_png(Path(outdir) / f"{seed:06d}.png", image)


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
    session = SamplingSession(net, gnet, settings, encoder, batch_size, device, precision, compile, allow_tf32)
    return generate_with(session, seeds, outdir, grid, progress, class_idx)


def generate_with(session: SamplingSession, seeds: Sequence[int], outdir: str | Path | None,
                  grid: str | Path | None = None, progress: Callable[[int, int], None] | None = None,
                  class_idx: int | Sequence[int] | None = None) -> torch.Tensor:
    """`generate_images` with the model and runtime of `session`: PNGs per seed in `outdir`, an optional grid,
    `progress(images done, total)`; returns all samples as the network made them, in the order of `seeds`."""
    batches = session.batches(seeds, class_idx)  # the request is checked before anything is written
    if outdir is not None:
        Path(outdir).mkdir(parents=True, exist_ok=True)
    rank, world = world_info()
    mine: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    done = 0
    for batch in batches:
        pixels = batch.pixels.cpu()
        if outdir is not None:
            save_seed_pngs(outdir, batch.seeds, pixels)
        mine[batch.positions[0]] = batch.images.cpu(), pixels
        done += len(batch.seeds)
        if progress is not None:
            progress(min(done * world, len(seeds)), len(seeds))
    if world > 1:
        parts: list = [None] * world
        torch.distributed.all_gather_object(parts, mine)
        mine = {k: v for part in parts for k, v in part.items()}
        if progress is not None:
            progress(len(seeds), len(seeds))
    if grid is not None and rank == 0:
        _save_grid(grid, torch.cat([mine[k][1] for k in sorted(mine)]))
    return torch.cat([mine[k][0] for k in sorted(mine)])


def _save_grid(path: str | Path, pixels: torch.Tensor) -> None:
    """All images in one PNG, small ones enlarged to about 64 pixels."""
    images = to_model_space(pixels)  # exact: uint8 -> [-1, 1] -> uint8
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_png(path, make_grid(images, scale=max(1, 64 // images.shape[-1]), gap=2))
