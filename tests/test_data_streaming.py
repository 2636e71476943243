"""Datasets read from disk: folders and zips of PNG/JPEG/.npy read item by item, the official max_size/xflip view,
DataLoader workers that give exactly the batches of the main process, exact resume with workers, and one-line
errors (naming the entry) for bad datasets."""

from __future__ import annotations

import io
import json
import os
import signal
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edm2.checkpoint import find_checkpoints, load_tensors
from edm2.data import BatchStream, ImageFolderDataset, TrainingSet, load_digits_dataset, open_dataset
from edm2.training import TrainOptions, train


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def write_zip(path: Path, entries: dict[str, bytes], labels: dict[str, int] | None = None) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        for name, data in entries.items():
            z.writestr(name, data)
        if labels is not None:
            z.writestr("dataset.json", json.dumps({"labels": [[k, v] for k, v in labels.items()]}))
    return path


def official_name(i: int, latent: bool = False) -> str:
    return f"{i // 1000:05d}/img-mean-std-{i:08d}.npy" if latent else f"{i // 1000:05d}/img{i:08d}.png"


@pytest.fixture(scope="module")
def digits_zip(tmp_path_factory) -> Path:
    """The built-in digits as a zip of PNGs in the official layout, in the same order, with their labels."""
    digits = load_digits_dataset()
    names = [official_name(i) for i in range(len(digits))]
    entries = {n: png(digits.images[i, 0]) for i, n in enumerate(names)}
    labels = {n: int(digits.labels[i]) for i, n in enumerate(names)}
    return write_zip(tmp_path_factory.mktemp("digits") / "digits.zip", entries, labels)


def test_zip_items_equal_the_images(digits_zip):
    digits = load_digits_dataset()
    ds = open_dataset(digits_zip)
    assert isinstance(ds, ImageFolderDataset) and not ds.latents
    assert (len(ds), ds.resolution, ds.channels, ds.num_classes) == (1797, 8, 1, 10)
    idx = np.array([0, 5, 1796, 5])
    assert np.array_equal(ds.read_raw(idx), digits.images[idx])
    assert np.array_equal(ds.labels, digits.labels)
    assert ds.encoder == {"class": "StandardRGBEncoder", "kwargs": {}}


def test_deflated_zip_reads_the_same(digits_zip, tmp_path):
    deflated = tmp_path / "deflated.zip"
    with zipfile.ZipFile(digits_zip) as src, zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as dst:
        for name in src.namelist()[:50]:
            dst.writestr(name, src.read(name))
    a, b = open_dataset(deflated), open_dataset(digits_zip)
    assert np.array_equal(a.read_raw(np.arange(50)), b.read_raw(np.arange(50)))


def test_npy_latents_folder(tmp_path):
    rng = np.random.default_rng(0)
    latents = rng.standard_normal([3, 8, 4, 4]).astype(np.float32)
    for i in range(3):
        path = tmp_path / official_name(i, latent=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(npy(latents[i]))
    ds = open_dataset(tmp_path)
    assert ds.latents and (ds.channels, ds.resolution) == (8, 4)
    assert np.array_equal(ds.read_raw(np.array([2, 0])), latents[[2, 0]])
    # Without an "encoder" in dataset.json: the official choice for 8-channel latents.
    assert ds.encoder == {"class": "StabilityVAEEncoder", "kwargs": {
        "vae_name": "stabilityai/sd-vae-ft-mse", "raw_mean": [5.81, 3.25, 0.12, -2.15],
        "raw_std": [4.17, 4.62, 3.71, 3.28], "final_mean": 0.0, "final_std": 0.5}}


def test_xflip_and_max_size_follow_the_official_view():
    n = 10
    images = np.arange(n * 2 * 3, dtype=np.uint8).reshape(n, 1, 2, 3) * 4
    from edm2.data import ImageDataset

    ds = ImageDataset(images.repeat(3, axis=2)[:, :, :3], np.arange(n) % 4, name="toy")
    view = TrainingSet(ds, label_dim=4, xflip=True)
    assert len(view) == 2 * n
    x, y = view.batch([1, n + 1])
    assert torch.equal(x[0], torch.from_numpy(ds.images[1]))
    assert torch.equal(x[1], torch.from_numpy(ds.images[1][:, :, ::-1].copy()))  # mirrored left to right
    assert torch.equal(y[0], y[1]) and y[0].tolist() == [0, 1, 0, 0]
    # max_size: the subset numpy.random.RandomState(0) picks by shuffling the indices, kept in index order.
    sub = TrainingSet(ds, label_dim=0, max_size=4)
    expected = np.arange(n)
    np.random.RandomState(0).shuffle(expected)
    assert sub.raw_idx.tolist() == sorted(expected[:4].tolist()) and len(sub) == 4
    both = TrainingSet(ds, label_dim=0, max_size=4, xflip=True)
    assert both.raw_idx.tolist() == sub.raw_idx.tolist() * 2 and both.flip.tolist() == [False] * 4 + [True] * 4


def test_workers_give_the_same_batches_as_the_main_process(digits_zip):
    ds = open_dataset(digits_zip)
    direct = BatchStream(ds, seed=1, batch=24, batch_gpu=8, label_dim=10, xflip=True)
    ahead = BatchStream(ds, seed=1, batch=24, batch_gpu=8, label_dim=10, xflip=True, workers=2)
    with ahead.steps(48) as steps:
        for k in range(4):
            got, want = next(steps), direct.micro_batches(48 + 24 * k)
            assert len(got) == len(want) == 3
            for (a, la), (b, lb) in zip(got, want):
                assert a.dtype == torch.uint8 and torch.equal(a, b) and torch.equal(la, lb)


BASE = dict(preset="cpu-tiny8", batch=16, duration=16 * 6, status=32, snapshot=48, checkpoint=32, seed=3,
            device="cpu")


def final_state(outdir: Path) -> dict[str, torch.Tensor]:
    tensors, meta = load_tensors(find_checkpoints(outdir)[-1], kind="checkpoint")
    assert meta["nimg"] == BASE["duration"]
    return tensors


def test_streamed_training_with_workers_equals_in_memory_and_resumes_exactly(digits_zip, tmp_path):
    """The digits read from a zip by two worker processes train bit for bit like the digits in memory, and a
    run paused and resumed (new workers, restored stream position) ends in the same state."""
    memory = train(TrainOptions(outdir=str(tmp_path / "memory"), data="digits", **BASE), progress=False)
    assert memory["run"]["workers"] == 0
    paused = train(TrainOptions(outdir=str(tmp_path / "zip"), data=str(digits_zip), workers=2, **BASE),
                   progress=False, max_steps=2)
    assert paused["status"] == "paused" and paused["run"]["workers"] == 2
    resumed = train(TrainOptions(outdir=str(tmp_path / "zip"), data=str(digits_zip), workers=2, **BASE),
                    progress=False)
    assert resumed["status"] == "finished" and resumed["steps"] == 4
    a, b = final_state(tmp_path / "zip"), final_state(tmp_path / "memory")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_xflip_and_max_size_reach_the_trainer_and_the_run_identity(digits_zip):
    from edm2.options import resolve_run
    from edm2.training import setup

    ds = open_dataset(digits_zip)
    opts = TrainOptions(outdir="unused", data=str(digits_zip), xflip=True, max_size=100, workers=0, **BASE)
    run = resolve_run(opts, ds, world=1)
    assert run.dataset["xflip"] is True and run.dataset["max_size"] == 100 and "xflip" in run.identity()["dataset"]
    t = setup(run, ds, torch.device("cpu"))
    assert len(t.data.data) == 200 and t.data.data.flip.sum() == 100
    plain = resolve_run(TrainOptions(outdir="unused", data=str(digits_zip), **BASE), ds, world=1)
    assert "xflip" not in plain.dataset and plain.workers == 2  # data on disk: two workers by default


def test_workers_survive_the_signals_the_trainer_handles(digits_zip):
    """Ctrl-C and batch schedulers signal the whole process group. The trainer turns SIGINT/SIGTERM into a clean
    stop after the current step; its workers must keep serving the batches that step still needs."""
    stream = BatchStream(open_dataset(digits_zip), seed=0, batch=8, batch_gpu=8, label_dim=10, workers=1)
    with stream.steps(0) as steps:
        next(steps)
        (worker,) = [int(p) for p in Path(f"/proc/self/task/{os.getpid()}/children").read_text().split()]
        os.kill(worker, signal.SIGINT)
        os.kill(worker, signal.SIGTERM)
        time.sleep(0.5)
        for k in range(1, 9):  # well beyond what was read ahead before the signals
            assert torch.equal(next(steps)[0][0], stream.micro_batches(8 * k)[0][0])


# ----------------------------------------------------------------------------------------------------
# Bad datasets: a one-line ValueError naming the entry.


def expect_error(path, *fragments: str) -> None:
    with pytest.raises(ValueError) as info:
        open_dataset(path)
    msg = str(info.value)
    assert "\n" not in msg
    for f in fragments:
        assert f in msg, f"{f!r} not in {msg!r}"


def test_mixed_channels_in_a_zip(tmp_path):
    entries = {official_name(0): png(np.zeros([8, 8], np.uint8)), official_name(1): png(np.zeros([8, 8, 3], np.uint8))}
    expect_error(write_zip(tmp_path / "d.zip", entries), "mixed image sizes", official_name(1), "8x8x3")


def test_mixed_latent_shapes(tmp_path):
    entries = {official_name(0, True): npy(np.zeros([8, 4, 4], np.float32)),
               official_name(1, True): npy(np.zeros([8, 2, 2], np.float32))}
    expect_error(write_zip(tmp_path / "d.zip", entries), "mixed latent shapes", official_name(1, True))


def test_images_and_latents_together(tmp_path):
    entries = {"a.png": png(np.zeros([4, 4], np.uint8)), "b.npy": npy(np.zeros([8, 4, 4], np.float32))}
    expect_error(write_zip(tmp_path / "d.zip", entries), "a.png", "b.npy")


def test_corrupt_entry_is_named(tmp_path):
    good = png(np.full([8, 8], 7, np.uint8))
    entries = {official_name(i): good for i in range(3)}
    entries[official_name(1)] = b"\x89PNG\r\n\x1a\n" + bytes(40)  # a PNG signature, then garbage
    expect_error(write_zip(tmp_path / "d.zip", entries), official_name(1), "not a readable image")


def test_damaged_zip_data_is_named_when_read(tmp_path):
    """An entry whose header is intact but whose data is damaged passes the opening check and fails, naming the
    entry, when it is read (here: by a DataLoader worker)."""
    # Large enough (48 KB) that reading the header does not reach the end of the entry, where zip checks its CRC.
    entries = {official_name(i): png(np.random.default_rng(i).integers(0, 255, [128, 128, 3], dtype=np.uint8))
               for i in range(4)}
    path = write_zip(tmp_path / "d.zip", entries)
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(official_name(2))
    data[info.header_offset + 30 + len(info.filename) + info.file_size - 20] ^= 0xFF  # inside the PNG's pixels
    path.write_bytes(bytes(data))
    ds = open_dataset(path)
    stream = BatchStream(ds, seed=0, batch=4, batch_gpu=4, label_dim=0, workers=1)
    with pytest.raises(ValueError) as info, stream.steps(0) as steps:
        next(steps)
    assert official_name(2) in str(info.value) and "damaged" in str(info.value) and "\n" not in str(info.value)


def test_unreadable_labels(tmp_path):
    entries = {"a.png": png(np.zeros([4, 4], np.uint8))}
    with zipfile.ZipFile(tmp_path / "d.zip", "w") as z:
        z.writestr("a.png", entries["a.png"])
        z.writestr("dataset.json", '{"labels": [["a.png", 0.5]]}')
    expect_error(tmp_path / "d.zip", "dataset.json", "bad entry")


def test_unfinished_conversion_is_refused(tmp_path):
    (tmp_path / "a.png").write_bytes(png(np.zeros([4, 4], np.uint8)))
    (tmp_path / ".edm2-incomplete.json").write_text("{}")
    expect_error(tmp_path, "unfinished", "again")
