"""Generate images from a network: per-seed noise and classes, guidance, decoding to pixels with the snapshot's
encoder (the VAE for latent models), PNG output and grids.

Each image depends on its seed only, drawn in the official `generate_images.py` order: from the seed's own
generator, first the noise, then (for a class-conditional network) a class, drawn even when the class is
given so that the churn noise that follows is the official one, then the sampler's churn noise.
"""

from __future__ import annotations

import glob
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from edm2.data import Encoder, StandardRGBEncoder, encoder_from_dict, to_model_space, to_uint8
from edm2.files import atomic_output, remove_stale_temps
from edm2.runtime import fast_paths_for, prepare_for_sampling, rank_batches, set_cuda_math, world_info
from edm2.sampling import DesignSteps, SamplerSettings, StackedRandomGenerator

__all__ = ["SamplingSession", "SampledBatch", "sample_batch", "generate_images", "generate_with", "write_batches",
           "save_png", "save_seed_pngs", "seed_png_path", "make_grid", "check_same_space", "remove_stale_png_temps",
           "GRID_SIZE", "MAX_BATCH"]

GRID_SIZE = 64  # a grid shows the first images of a request, at most this many
MAX_BATCH = 1 << 16  # images per batch: more is a typo (the published models sample 64 at a time on one GPU)


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
    """ValueError for a class outside 0..label_dim-1 (a conditional network), a class for an unconditional
    network, or a list not one class per seed."""
    if class_idx is None:
        return
    if not label_dim:
        shown = class_idx if np.ndim(class_idx) == 0 else f"{list(class_idx)[:3]}..."
        raise ValueError(f"class {shown} given, but the network is unconditional (it has no classes); leave out "
                         "the class (--class)")
    if not all(0 <= int(c) < label_dim for c in np.atleast_1d(class_idx)):
        raise ValueError(f"class {class_idx} outside 0..{label_dim - 1}")
    if np.ndim(class_idx) > 0 and len(class_idx) != num_seeds:
        raise ValueError(f"{len(class_idx)} classes for {num_seeds} seeds")


def save_png(path: str | Path, image: torch.Tensor) -> None:
    """Write one image [C, H, W] (uint8 pixels, or floats in [-1, 1]) as PNG, atomically."""
    from PIL import Image

    arr = (image if image.dtype == torch.uint8 else to_uint8(image)).permute(1, 2, 0).cpu().numpy()
    img = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr[:, :, :3])
    with atomic_output(path, clean_stale=False) as tmp:
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
        if self.batch_size > MAX_BATCH:
            raise ValueError(f"--batch {self.batch_size} is absurd: at most {MAX_BATCH} images per batch")
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
            if not positions:  # fewer seeds than batches: this process has nothing to do here
                continue
            chunk = [seeds[i] for i in positions]
            classes = [class_idx[i] for i in positions] if per_seed else class_idx
            with fast_paths_for(self.precision, self.compile):  # on while sampling only, not between batches
                images, drawn = sample_batch(net, chunk, classes, gnet, self.settings, self.device, steps)
            yield SampledBatch(positions, chunk, drawn, images, self.decoder.decode(images))
            del images, drawn  # not kept while the next batch is sampled


def seed_png_path(outdir: str | Path, seed: int, subdirs: bool = False) -> Path:
    """`<outdir>/<seed:06d>.png`, or with `subdirs` (the official `--subdirs`) `<outdir>/<thousands:06d>/...`."""
    folder = Path(outdir) / f"{seed - seed % 1000:06d}" if subdirs else Path(outdir)
    return folder / f"{seed:06d}.png"


def save_seed_pngs(outdir: str | Path, seeds: Sequence[int], pixels: torch.Tensor, subdirs: bool = False) -> None:
    """Write the PNG of each seed (`seed_png_path`) with its image of `pixels` (uint8 [N, C, H, W])."""
    for seed, image in zip(seeds, pixels.cpu()):
        path = seed_png_path(outdir, seed, subdirs)
        if subdirs:
            path.parent.mkdir(parents=True, exist_ok=True)
        save_png(path, image)


def remove_stale_png_temps(outdir: str | Path, subdirs: bool = False) -> list[Path]:
    """Remove the PNG temporaries a killed run left in `outdir` (and with `subdirs` in its seed folders); those
    of live writers (another process of this request) are kept. Returns what was removed."""
    folders = [Path(outdir)]
    if subdirs:
        folders += sorted(p for p in Path(outdir).glob("[0-9]" * 6) if p.is_dir())
    return [p for folder in folders for p in remove_stale_temps(folder, "*.png")]


def write_batches(session: SamplingSession, seeds: Sequence[int], outdir: str | Path | None,
                  class_idx: int | Sequence[int] | None = None, subdirs: bool = False) -> Iterator[SampledBatch]:
    """This process's batches of `session.batches(seeds, class_idx)`, each written as PNGs to `outdir` (None:
    not written) before it is handed on; nothing is kept, so memory does not grow with the number of seeds (drop
    each batch before asking for the next, and one batch is alive at a time). The request is checked (and a
    latent model's VAE loaded) at the call, before the folder is made."""
    batches = session.batches(seeds, class_idx)
    if outdir is not None:
        Path(outdir).mkdir(parents=True, exist_ok=True)
        remove_stale_png_temps(outdir, subdirs)

    def written() -> Iterator[SampledBatch]:
        for batch in batches:
            if outdir is not None:
                save_seed_pngs(outdir, batch.seeds, batch.pixels, subdirs)
            yield batch
            del batch  # not kept while the next batch is sampled

    return written()


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
    return_images: bool = True,
    gather: bool = False,
    grid_size: int = GRID_SIZE,
    subdirs: bool = False,
) -> torch.Tensor | None:
    """Sample `seeds` in batches, decode them to pixels with `encoder` (None: standard RGB; the snapshot's
    encoder, `edm2.data.encoder_from_dict(snapshot.encoder)`, for latent models), write `<outdir>/<seed:06d>.png`
    per seed (`subdirs`: in a folder per 1000 seeds, as the official `--subdirs`) and an optional grid PNG of the
    first `grid_size` seeds. Each batch is written and dropped; with `return_images` (the default) the samples
    [N, C, H, W] as the network made them (in [-1, 1] for pixel models) are kept and returned in the order of
    `seeds`, else None is returned and memory does not grow with the number of seeds (to go through a large
    request batch by batch, use `SamplingSession.batches` or `write_batches`).

    In a torch.distributed process group the batches are dealt out to the processes in turn; each writes its
    own PNGs and returns the images it sampled (in the order of `seeds`), or with `gather=True` all images (an
    all-gather of every image: memory grows with the request). Rank 0 writes the grid, from the few first images
    gathered from where they were sampled. Images depend on their seeds only, so they equal those of a single
    process. `precision`, `compile` and `allow_tf32` select the runtime (`edm2.runtime`); anything but plain
    float32 eager also switches on the fast attention and norm paths, which change results by rounding only.
    """
    session = SamplingSession(net, gnet, settings, encoder, batch_size, device, precision, compile, allow_tf32)
    return generate_with(session, seeds, outdir, grid, progress, class_idx, return_images, gather, grid_size, subdirs)


def generate_with(session: SamplingSession, seeds: Sequence[int], outdir: str | Path | None,
                  grid: str | Path | None = None, progress: Callable[[int, int], None] | None = None,
                  class_idx: int | Sequence[int] | None = None, return_images: bool = True, gather: bool = False,
                  grid_size: int = GRID_SIZE, subdirs: bool = False) -> torch.Tensor | None:
    """`generate_images` with the model and runtime of `session`: PNGs per seed in `outdir`, an optional grid of
    the first `grid_size` seeds, `progress(images done, total)`; returns the samples when `return_images`
    (all of them with `gather` under torch.distributed, else this process's), else None. Under
    torch.distributed only the images count and the grid's few images travel between processes."""
    if grid is not None and grid_size < 1:
        raise ValueError(f"a grid needs at least one image, got grid_size {grid_size}")
    batches = write_batches(session, seeds, outdir, class_idx, subdirs)  # checked before anything is written
    if grid is not None and Path(grid).parent.is_dir():  # the grid's temporaries of a killed run
        remove_stale_temps(Path(grid).parent, glob.escape(Path(grid).name))
    rank, world = world_info()
    kept: dict[int, torch.Tensor] = {}  # first position of a batch -> its samples (only when returned)
    first: dict[int, torch.Tensor] = {}  # position -> pixels, of the first `grid_size` seeds (only for a grid)
    done = 0
    for batch in batches:
        if return_images:
            kept[batch.positions[0]] = batch.images.cpu()
        if grid is not None:
            first.update(_first_pixels(batch, grid_size))
        done += len(batch.seeds)
        if progress is not None:
            progress(min(done * world, len(seeds)), len(seeds))
        del batch  # one batch alive at a time: dropped before the next is sampled
    if world > 1:  # every process, whether or not it shows progress: a collective call
        done = _count_all(done, session.device)
        if progress is not None:
            progress(done, len(seeds))
    if grid is not None:
        _write_grid(grid, first, rank, world)
    if not return_images:
        return None
    if gather and world > 1:
        kept = _gather_all(kept)
    if not kept:  # a process without a batch (fewer seeds than batches)
        net = session.net
        return torch.empty([0, net.img_channels, net.img_resolution, net.img_resolution])
    return torch.cat([kept[k] for k in sorted(kept)])


def _first_pixels(batch: SampledBatch, grid_size: int) -> dict[int, torch.Tensor]:
    """The pixels of the batch's images among the first `grid_size` of the request, by position."""
    return {p: image.clone() for p, image in zip(batch.positions, batch.pixels.cpu()) if p < grid_size}  # not views


def _count_all(done: int, device: torch.device | str) -> int:
    """The images done by all processes of the torch.distributed group: one integer all-reduced."""
    count = torch.tensor([done], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(count)
    return int(count.item())


def _gather_all(parts: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Every process's `parts` in every process (an all-gather of all of them)."""
    gathered: list = [None] * world_info()[1]
    torch.distributed.all_gather_object(gathered, parts)
    return {k: v for part in gathered for k, v in part.items()}


def _write_grid(path: str | Path, first: dict[int, torch.Tensor], rank: int, world: int) -> None:
    """Rank 0 writes the grid of the first images; under torch.distributed they are gathered to it first (only
    those few images travel)."""
    if world > 1:
        gathered: list | None = [None] * world if rank == 0 else None
        torch.distributed.gather_object(first, gathered, dst=0)
        first = {k: v for part in gathered or [] for k, v in part.items()}
    if rank == 0:
        _save_grid(path, torch.stack([first[k] for k in sorted(first)]))


def _save_grid(path: str | Path, pixels: torch.Tensor) -> None:
    """The images in one PNG, small ones enlarged to about 64 pixels."""
    images = to_model_space(pixels)  # exact: uint8 -> [-1, 1] -> uint8
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_png(path, make_grid(images, scale=max(1, 64 // images.shape[-1]), gap=2))
