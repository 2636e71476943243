"""`edm2.generate`: grids and PNG files, the official per-seed drawing order (noise, class, churn noise), the
sampler settings from the command line down to the sampler (the sampler itself is tested in test_sampling), and
the sampling session that `generate_images` and the metrics' generate-and-measure share."""

from __future__ import annotations

import weakref

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from edm2.cli import main
from edm2.data import StandardRGBEncoder, to_uint8
from edm2.files import Snapshot, save_snapshot
from edm2.generate import SamplingSession, generate_images, make_grid, sample_batch, save_png
from edm2.metrics.measure import ModelUnderTest, measure_model
from edm2.networks import Precond
from edm2.presets import NetworkConfig
from edm2.sampling import SamplerSettings, edm_sampler


def test_grid_places_tiles_row_by_row_with_gaps():
    images = torch.arange(5, dtype=torch.float32).reshape(5, 1, 1, 1).expand(5, 3, 2, 2) / 10  # tile k = k/10
    grid = make_grid(images, cols=3, scale=2, gap=1, gap_value=-0.5)
    assert grid.shape == (3, 2 * 4 + 1, 3 * 4 + 2)  # 2 rows x 3 cols of 4x4 tiles, 1-pixel gaps
    for k in range(6):
        r, c = divmod(k, 3)
        tile = grid[:, r * 5:r * 5 + 4, c * 5:c * 5 + 4]
        expected = k / 10 if k < 5 else -0.5  # the sixth cell is empty
        assert torch.equal(tile, torch.full_like(tile, expected)), k
    assert (grid[:, 4, :] == -0.5).all() and (grid[:, :, 4] == -0.5).all() and (grid[:, :, 9] == -0.5).all()


def test_grid_without_gap_is_plain_tiling():
    images = torch.randn(4, 1, 3, 3)
    grid = make_grid(images)
    assert torch.equal(grid[0, :3, 3:], images[1, 0]) and torch.equal(grid[0, 3:, :3], images[2, 0])


def test_save_png_round_trip(tmp_path):
    image = torch.tensor([[[-1.0, 0.0], [1.0, 0.5]]])
    save_png(tmp_path / "a.png", image)
    with Image.open(tmp_path / "a.png") as img:
        assert img.mode == "L"
        np.testing.assert_array_equal(np.asarray(img), [[0, 128], [255, 191]])
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]  # no temporary file left


# ----------------------------------------------------------------------------------------------------
# Seeds, classes and sampler settings, from the command line down to the sampler.


def _loud_net(label_dim: int = 3) -> Precond:
    """A small random conditional network with its learned gains (0 at initialization) set to 0.8, so that
    its output, labels and noise all shape the images."""
    torch.manual_seed(0)
    net = Precond(img_resolution=8, img_channels=1, label_dim=label_dim, model_channels=16, channel_mult=[1, 2],
                  num_blocks=1, attn_resolutions=[4], channels_per_head=16, use_fp16=False)
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim == 0:
                p.fill_(0.8)
    return net.eval().requires_grad_(False)


def official_order(net: Precond, seed: int, class_idx: int, settings: SamplerSettings,
                   draw_class: bool = True) -> torch.Tensor:
    """One image as the official generate_images.py draws it, written out independently of edm2.generate:
    a generator seeded with the seed; from it, in this order, the noise [C, H, W], a class (`randint` of
    label_dim, drawn even when --class is given, then replaced by it), then each churn noise the sampler
    asks for. `draw_class=False` is the order without that class draw (what edm2 did before)."""
    g = torch.Generator().manual_seed(seed % (1 << 32))
    noise = torch.randn([net.img_channels, net.img_resolution, net.img_resolution], generator=g)[None]
    if draw_class:
        torch.randint(net.label_dim, [], generator=g)
    labels = torch.nn.functional.one_hot(torch.tensor([class_idx]), net.label_dim).float()
    with torch.no_grad():
        return edm_sampler(net, noise, labels, num_steps=settings.num_steps, sigma_min=settings.sigma_min,
                           sigma_max=settings.sigma_max, rho=settings.rho, S_churn=settings.S_churn,
                           S_min=settings.S_min, S_max=settings.S_max, S_noise=settings.S_noise,
                           solver=settings.solver,
                           randn_like=lambda x: torch.randn(x.shape[1:], generator=g, dtype=x.dtype)[None])[0]


def test_class_and_churn_images_follow_the_official_drawing_order():
    net = _loud_net()
    settings = SamplerSettings(num_steps=6, S_churn=40, S_min=0.05, S_max=50, S_noise=1.003)
    seeds = [3, 11, 2**32 + 5]
    images, classes = sample_batch(net, seeds, class_idx=2, settings=settings)
    assert classes.tolist() == [2, 2, 2]
    for image, seed in zip(images, seeds):
        torch.testing.assert_close(image, official_order(net, seed, 2, settings), rtol=0, atol=1e-5)
        # Skipping the class draw moves the churn noise: visibly different images.
        assert (image - official_order(net, seed, 2, settings, draw_class=False)).abs().max() > 1e-2


def test_cli_sampler_options_reach_the_sampler(tmp_path):
    net = _loud_net()
    path = tmp_path / "net.safetensors"
    save_snapshot(path, Snapshot(net.state_dict(), NetworkConfig(
        img_resolution=8, img_channels=1, label_dim=3, model_channels=16, channel_mult=(1, 2), num_blocks=1,
        attn_resolutions=(4,), channels_per_head=16, use_fp16=False), 0.1, 64, {}))
    args = ["--steps", "5", "--sigma-min", "0.01", "--sigma-max", "20", "--rho", "3", "--solver", "euler",
            "--S-churn", "10", "--S-min", "0.1", "--S-max", "10", "--S-noise", "1.01"]
    settings = SamplerSettings(num_steps=5, sigma_min=0.01, sigma_max=20, rho=3, solver="euler", S_churn=10,
                               S_min=0.1, S_max=10, S_noise=1.01)
    result = CliRunner().invoke(main, ["generate", "--net", str(path), "--outdir", str(tmp_path / "out"),
                                       "--seeds", "4-6", "--class", "1", "--device", "cpu", *args])
    assert result.exit_code == 0, result.output
    for seed in (4, 5, 6):
        with Image.open(tmp_path / "out" / f"{seed:06d}.png") as img:
            png = np.asarray(img).astype(np.int16)
        expected = to_uint8(official_order(net, seed, 1, settings))[0].numpy().astype(np.int16)
        assert np.abs(png - expected).max() <= 1  # rounding of values within 1e-5 of a step
    default = CliRunner().invoke(main, ["generate", "--net", str(path), "--outdir", str(tmp_path / "default"),
                                        "--seeds", "4", "--class", "1", "--device", "cpu"])
    assert default.exit_code == 0
    with Image.open(tmp_path / "default" / "000004.png") as a, Image.open(tmp_path / "out" / "000004.png") as b:
        assert not np.array_equal(np.asarray(a), np.asarray(b))  # the options changed something


@pytest.mark.parametrize("args, fragment", [
    (["--solver", "rk4"], "--solver"),
    (["--sigma-min", "5", "--sigma-max", "1"], "--sigma-min"),
    (["--rho", "0"], "--rho"),
    (["--steps", "0"], "--steps"),
    (["--S-churn", "-1"], "--S-churn"),
])
def test_cli_bad_sampler_options_are_one_line_errors(args, fragment, tmp_path):
    result = CliRunner().invoke(main, ["generate", "--net", str(tmp_path / "missing.safetensors"), "--outdir",
                                       str(tmp_path / "out"), *args])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edm2: error:") and fragment in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------
# The sampling session: one request check, one preparation, one batching for `generate_images` and the metrics.


def read_png(path) -> torch.Tensor:
    """uint8 [C, H, W] of a PNG."""
    with Image.open(path) as img:
        arr = np.array(img)
    return torch.from_numpy(arr[None] if arr.ndim == 2 else np.ascontiguousarray(arr.transpose(2, 0, 1)))


class PixelRecorder:
    """A feature network stand-in for `measure_model`: keeps the uint8 pixels it is fed, returns two features."""

    feature_dim = 2
    device = torch.device("cpu")

    def __init__(self) -> None:
        self.fed: list[torch.Tensor] = []

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        self.fed.append(pixels.clone())
        return pixels.flatten(1)[:, :2].to(torch.float32)


SESSION_SETTINGS = SamplerSettings(num_steps=4, S_churn=20, S_min=0.05, S_max=50)
SESSION_SEEDS = [5, 0, 2**32 + 7, 12, 3, 8, 1]  # unordered, one beyond 32 bits; 7 in batches of 3


def test_generate_and_measure_feed_the_same_pixels_for_the_same_seeds(tmp_path):
    """The pixels `measure_model` feeds the feature networks (and writes with `outdir`) are those `generate_images`
    writes, and the decoding of the samples it returns: one session makes both."""
    net = _loud_net()
    images = generate_images(net, SESSION_SEEDS, tmp_path / "gen", SESSION_SETTINGS, batch_size=3)
    recorder = PixelRecorder()
    model = ModelUnderTest(net, settings=SESSION_SETTINGS, batch_size=3)
    stats = measure_model(model, SESSION_SEEDS, {"rec": recorder}, outdir=tmp_path / "measure")
    assert stats["rec"].num_images == len(SESSION_SEEDS)
    fed = torch.cat(recorder.fed)
    assert [len(b) for b in recorder.fed] == [3, 2, 2]  # the official split: equal-sized batches
    assert torch.equal(fed, StandardRGBEncoder().decode(images))
    assert torch.equal(fed, torch.stack([read_png(tmp_path / "gen" / f"{s:06d}.png") for s in SESSION_SEEDS]))
    for seed in SESSION_SEEDS:
        name = f"{seed:06d}.png"
        assert (tmp_path / "measure" / name).read_bytes() == (tmp_path / "gen" / name).read_bytes()
    assert len({read_png(tmp_path / "gen" / f"{s:06d}.png").numpy().tobytes() for s in SESSION_SEEDS}) == 7


def test_session_batches_carry_positions_seeds_classes_and_decoded_pixels():
    net = _loud_net()
    classes = [2, 0, 1, 1, 0, 2, 2]
    session = SamplingSession(net, settings=SESSION_SETTINGS, batch_size=3)
    batches = list(session.batches(SESSION_SEEDS, class_idx=classes))
    assert [b.positions for b in batches] == [[0, 1, 2], [3, 4], [5, 6]]
    assert [s for b in batches for s in b.seeds] == SESSION_SEEDS
    assert torch.cat([b.classes for b in batches]).tolist() == classes
    for b in batches:
        assert b.pixels.dtype == torch.uint8 and torch.equal(b.pixels, to_uint8(b.images))
    alone, _ = sample_batch(net, SESSION_SEEDS[3:5], class_idx=classes[3:5], settings=SESSION_SETTINGS)
    assert torch.equal(batches[1].images, alone)
    again = generate_images(net, SESSION_SEEDS, None, SESSION_SETTINGS, batch_size=3, class_idx=classes)
    assert torch.equal(torch.cat([b.images for b in batches]), again)


VAE_SPACE = {"class": "StabilityVAEEncoder", "kwargs": {"vae_name": "somewhere"}}


@pytest.mark.parametrize("session, seeds, class_idx, fragment", [
    (dict(), [], None, "no seeds given"),
    (dict(batch_size=0), [1], None, "--batch must be positive"),
    (dict(settings=SamplerSettings(guidance=2.0)), [1], None, "needs a guide model"),
    (dict(), [1, 2], 3, "class 3 outside 0..2"),
    (dict(), [1, 2], [0, -1], "outside 0..2"),
    (dict(), [1, 2, 3], [0, 1], "2 classes for 3 seeds"),
], ids=["no-seeds", "batch", "guidance", "class", "class-list", "class-count"])
def test_session_refuses_a_bad_request_before_anything_happens(session, seeds, class_idx, fragment, tmp_path):
    """The session's checks, at the call (not at the first batch), are those of `generate_images` and of
    `measure_model`: nothing written."""
    net = _loud_net()
    with pytest.raises(ValueError, match=fragment):
        SamplingSession(net, **session).batches(seeds, class_idx)
    with pytest.raises(ValueError, match=fragment):
        generate_images(net, seeds, tmp_path / "out", session.get("settings", SamplerSettings()),
                        batch_size=session.get("batch_size", 64), class_idx=class_idx)
    if class_idx is None:  # the metrics draw each seed's class
        with pytest.raises(ValueError, match=fragment):
            measure_model(ModelUnderTest(net, **session), seeds, {"rec": PixelRecorder()}, outdir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_session_compares_the_spaces_of_known_snapshot_encoders_only():
    net = _loud_net()
    rgb = {"class": "StandardRGBEncoder", "kwargs": {}}
    other_vae = {"class": "StabilityVAEEncoder", "kwargs": {"vae_name": "elsewhere"}}
    for encoders in (None, (None, rgb), (rgb, None), (VAE_SPACE, other_vae)):  # unknown, or one space
        SamplingSession(net, net, snapshot_encoders=encoders).check([1])
    SamplingSession(net, snapshot_encoders=(rgb, VAE_SPACE)).check([1])  # no guide: nothing to compare
    with pytest.raises(ValueError, match="another space"):
        SamplingSession(net, net, snapshot_encoders=(VAE_SPACE, rgb)).check([1])


def test_session_makes_the_sampler_steps_once_for_all_batches(monkeypatch):
    made = []
    real = SamplerSettings.time_steps

    def counting(self, net, device="cpu"):
        made.append(1)
        return real(self, net, device)

    monkeypatch.setattr(SamplerSettings, "time_steps", counting)
    net = _loud_net()
    images = generate_images(net, SESSION_SEEDS, None, SESSION_SETTINGS, batch_size=3)  # 3 batches
    assert len(made) == 1
    chunks = np.array_split(np.array(SESSION_SEEDS, dtype=np.int64), 3)  # the official split: 3, 2 and 2 seeds
    per_batch = torch.cat([sample_batch(net, c.tolist(), settings=SESSION_SETTINGS)[0] for c in chunks])
    assert len(made) == 1 + 3 and torch.equal(images, per_batch)  # steps made per batch: the same images


# ----------------------------------------------------------------------------------------------------
# Constant memory: each batch written and dropped; the grid from the first images only.


class TrackingEncoder(StandardRGBEncoder):
    """Decodes as the standard RGB encoder; at each decode, counts the earlier batches (their samples or their
    pixels) that are still alive."""

    def __init__(self) -> None:
        self.batches: list[tuple[weakref.ref, weakref.ref]] = []
        self.alive: list[int] = []  # at the decode of batch k: earlier batches alive

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        self.alive.append(sum(s() is not None or p() is not None for s, p in self.batches))
        pixels = super().decode(x)
        self.batches.append((weakref.ref(x), weakref.ref(pixels)))
        return pixels


def test_generate_keeps_at_most_one_batch_alive_and_returns_nothing_unless_asked(tmp_path):
    net = _loud_net()
    seeds = list(range(12))
    encoder = TrackingEncoder()
    out = generate_images(net, seeds, tmp_path / "out", SESSION_SETTINGS, batch_size=2, encoder=encoder,
                          return_images=False)
    assert out is None
    assert encoder.alive == [0] * 6  # each batch dropped before the next is sampled
    measured = TrackingEncoder()  # and so in the metrics' generate-and-measure
    model = ModelUnderTest(net, settings=SESSION_SETTINGS, batch_size=2, encoder=measured)
    assert measure_model(model, seeds, {"rec": PixelRecorder()})["rec"].num_images == 12
    assert measured.alive == [0] * 6
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"{s:06d}.png" for s in seeds]
    kept = TrackingEncoder()
    images = generate_images(net, seeds, None, SESSION_SETTINGS, batch_size=2, encoder=kept)
    assert kept.alive == [0, 1, 2, 3, 4, 5]  # the control: returning every image keeps every batch
    assert images.shape == (12, 1, 8, 8)
    for seed in seeds:
        assert torch.equal(read_png(tmp_path / "out" / f"{seed:06d}.png")[0], to_uint8(images[seed])[0])


def test_session_batches_stream_one_batch_at_a_time():
    """The Python iterator: batches are sampled as they are asked for, not ahead."""
    encoder = TrackingEncoder()
    batches = SamplingSession(_loud_net(), settings=SESSION_SETTINGS, batch_size=3, encoder=encoder).batches(
        SESSION_SEEDS)
    assert encoder.alive == []  # checked and prepared, nothing sampled yet
    first = next(batches)
    assert len(encoder.alive) == 1 and first.seeds == SESSION_SEEDS[:3]
    del first
    assert [b.seeds for b in batches] == [SESSION_SEEDS[3:5], SESSION_SEEDS[5:]] and max(encoder.alive) <= 1


def test_grid_shows_the_first_images_of_the_request(tmp_path):
    net = _loud_net()
    seeds = [9, 4, 7, 1, 3, 8, 0, 2, 6, 5]
    generate_images(net, seeds, None, SESSION_SETTINGS, batch_size=3, grid=tmp_path / "first4.png", grid_size=4,
                    return_images=False)
    generate_images(net, seeds[:4], None, SESSION_SETTINGS, batch_size=4, grid=tmp_path / "alone.png")
    assert (tmp_path / "first4.png").read_bytes() == (tmp_path / "alone.png").read_bytes()
    with Image.open(tmp_path / "first4.png") as img:  # 2 x 2 tiles of 8x8 images enlarged 8 times, 2-pixel gaps
        assert img.size == (2 * 64 + 2, 2 * 64 + 2)
    with pytest.raises(ValueError, match="grid_size 0"):
        generate_images(net, seeds, tmp_path / "none", grid=tmp_path / "g.png", grid_size=0)
    assert not (tmp_path / "none").exists()


def test_cli_grid_holds_the_first_64_images_and_subdirs_split_by_thousands(tmp_path):
    net = _loud_net()
    path = tmp_path / "net.safetensors"
    save_snapshot(path, Snapshot(net.state_dict(), NetworkConfig(
        img_resolution=8, img_channels=1, label_dim=3, model_channels=16, channel_mult=(1, 2), num_blocks=1,
        attn_resolutions=(4,), channels_per_head=16, use_fp16=False), 0.1, 64, {}))
    gen = ["generate", "--net", str(path), "--steps", "2", "--device", "cpu", "--batch", "16"]
    many = CliRunner().invoke(main, [*gen, "--seeds", "990-1059", "--grid", str(tmp_path / "many.png"), "--outdir",
                                     str(tmp_path / "out"), "--subdirs"])
    assert many.exit_code == 0, many.output
    assert "wrote 70 images" in many.output
    first = CliRunner().invoke(main, [*gen, "--seeds", "990-1053", "--grid", str(tmp_path / "first.png")])
    assert first.exit_code == 0, first.output
    assert (tmp_path / "many.png").read_bytes() == (tmp_path / "first.png").read_bytes()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["000000", "001000"]
    assert len(list((tmp_path / "out" / "000000").iterdir())) == 10
    assert sorted(p.name for p in (tmp_path / "out" / "001000").iterdir())[-1] == "001059.png"
