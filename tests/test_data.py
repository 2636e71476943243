"""Datasets: image folders, uncompressed zips, NPZ arrays, the built-in digits, pixel mapping, sampler,
and a one-line ValueError naming the file for every kind of bad input."""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edm2.data import ImageDataset, InfiniteSampler, load_dataset, to_model_space, to_uint8


def png_bytes(array: np.ndarray, fmt: str = "PNG") -> bytes:
    """Encode a uint8 [H, W] or [H, W, C] array as an image file."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


def write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(array))
    return path


def gray(value: int, size: int = 8, height: int | None = None) -> np.ndarray:
    return np.full([height or size, size], value, dtype=np.uint8)


# Four images in the official layout; dataset.json lists them in reverse order on purpose.
OFFICIAL = {"00000/img00000000.png": (10, 2), "00000/img00000001.png": (20, 0),
            "00000/img00000002.png": (30, 1), "00001/img00000003.png": (40, 3)}


def labels_json(entries: dict[str, int]) -> str:
    return json.dumps({"labels": [[name, label] for name, label in reversed(list(entries.items()))]})


def make_official_folder(root: Path) -> Path:
    for name, (value, _) in OFFICIAL.items():
        write_png(root / name, gray(value))
    (root / "dataset.json").write_text(labels_json({n: lab for n, (_, lab) in OFFICIAL.items()}))
    return root


def check_official(ds: ImageDataset) -> None:
    assert ds.images.shape == (4, 1, 8, 8) and ds.images.dtype == np.uint8
    names = sorted(OFFICIAL)
    # Images and labels both follow the sorted file names, whatever the order in dataset.json.
    assert [int(ds.images[i].min()) for i in range(4)] == [OFFICIAL[n][0] for n in names]
    assert [int(ds.images[i].max()) for i in range(4)] == [OFFICIAL[n][0] for n in names]
    assert ds.labels.tolist() == [OFFICIAL[n][1] for n in names]
    assert ds.has_labels and ds.num_classes == 4
    assert ds.resolution == 8 and ds.channels == 1 and len(ds) == 4
    assert ds.describe() == {"name": ds.name, "num_images": 4, "resolution": 8, "channels": 1, "num_classes": 4}


# ----------------------------------------------------------------------------------------------------
# Formats.


def test_folder_with_dataset_json(tmp_path):
    check_official(load_dataset(make_official_folder(tmp_path / "imgs")))


def test_folder_without_labels(tmp_path):
    for i in range(3):
        write_png(tmp_path / f"{i}.png", gray(i * 50))
    ds = load_dataset(tmp_path)
    assert ds.labels is None and not ds.has_labels
    assert ds.images.shape == (3, 1, 8, 8)
    assert ds.describe()["num_classes"] == 0
    x, y = ds.batch(np.array([2, 0]), label_dim=0)
    assert y is None and x.shape == (2, 1, 8, 8)
    assert torch.allclose(x[0], torch.full([1, 8, 8], 100 / 127.5 - 1))


def test_folder_rgb_channel_order(tmp_path):
    rgb = np.zeros([8, 8, 3], dtype=np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 7
    write_png(tmp_path / "a.png", rgb)
    write_png(tmp_path / "b.png", rgb[..., ::-1].copy())
    ds = load_dataset(tmp_path)
    assert ds.images.shape == (2, 3, 8, 8) and ds.channels == 3
    assert ds.images[0, :, 3, 3].tolist() == [200, 100, 7]
    assert ds.images[1, :, 3, 3].tolist() == [7, 100, 200]


def test_folder_jpeg(tmp_path):
    (tmp_path / "a.jpg").write_bytes(png_bytes(gray(128), "JPEG"))
    (tmp_path / "b.JPEG").write_bytes(png_bytes(gray(128), "JPEG"))
    ds = load_dataset(tmp_path)
    assert ds.images.shape == (2, 1, 8, 8)
    assert abs(int(ds.images[0, 0, 4, 4]) - 128) <= 2


def test_uncompressed_zip_matches_folder(tmp_path):
    zpath = tmp_path / "data.zip"
    with zipfile.ZipFile(zpath, "w", compression=zipfile.ZIP_STORED) as z:
        for name, (value, _) in OFFICIAL.items():
            z.writestr(name, png_bytes(gray(value)))
        z.writestr("dataset.json", labels_json({n: lab for n, (_, lab) in OFFICIAL.items()}))
    with zipfile.ZipFile(zpath) as z:
        assert all(i.compress_type == zipfile.ZIP_STORED for i in z.infolist())
    ds = load_dataset(zpath)
    check_official(ds)
    folder = load_dataset(make_official_folder(tmp_path / "folder"))
    assert np.array_equal(ds.images, folder.images) and np.array_equal(ds.labels, folder.labels)


def test_npz_with_labels(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, [5, 8, 8, 3], dtype=np.uint8)
    y = np.array([0, 4, 1, 1, 2])
    np.savez(tmp_path / "d.npz", x=x, y=y)
    ds = load_dataset(tmp_path / "d.npz")
    assert ds.images.shape == (5, 3, 8, 8)
    assert np.array_equal(ds.images, x.transpose(0, 3, 1, 2))  # NHWC -> NCHW
    assert ds.labels.tolist() == y.tolist() and ds.num_classes == 5
    images, onehot = ds.batch(np.array([1, 3]), label_dim=5)
    assert onehot.tolist() == [[0, 0, 0, 0, 1], [0, 1, 0, 0, 0]]
    assert torch.equal(images, to_model_space(torch.from_numpy(x[[1, 3]].transpose(0, 3, 1, 2).copy())))


def test_npz_without_labels_and_gray_nhw(tmp_path):
    x = np.arange(3 * 8 * 8, dtype=np.uint8).reshape(3, 8, 8)
    np.savez(tmp_path / "d.npz", x=x)
    ds = load_dataset(str(tmp_path / "d.npz"))
    assert ds.labels is None and ds.images.shape == (3, 1, 8, 8)
    assert np.array_equal(ds.images[:, 0], x)


def test_digits():
    ds = load_dataset("digits")
    assert len(ds) == 1797 and ds.images.shape == (1797, 1, 8, 8) and ds.images.dtype == np.uint8
    assert ds.num_classes == 10 and sorted(set(ds.labels.tolist())) == list(range(10))
    assert ds.images.min() == 0 and ds.images.max() == 255
    assert ds.describe() == {"name": "digits", "num_images": 1797, "resolution": 8, "channels": 1,
                             "num_classes": 10}


# ----------------------------------------------------------------------------------------------------
# Pixel mapping.


def test_to_model_space_range():
    x = to_model_space(torch.tensor([0, 255, 128], dtype=torch.uint8))
    assert x.dtype == torch.float32
    assert x[0].item() == -1.0 and x[1].item() == 1.0
    assert x[2].item() == pytest.approx(128 / 127.5 - 1, abs=1e-6)


def test_to_uint8_round_trip_and_clipping():
    all_values = torch.arange(256, dtype=torch.uint8)
    back = to_uint8(to_model_space(all_values))
    assert back.dtype == torch.uint8 and torch.equal(back, all_values)
    assert to_uint8(torch.tensor([-3.0, -1.0, 0.0, 1.0, 3.0])).tolist() == [0, 0, 128, 255, 255]


# ----------------------------------------------------------------------------------------------------
# Sampler.


def test_sampler_deterministic():
    a, b = InfiniteSampler(50, seed=3), InfiniteSampler(50, seed=3)
    assert np.array_equal(a.indices(17, 40), b.indices(17, 40))
    assert np.array_equal(a.indices(17, 40), a.indices(17, 40))
    assert not np.array_equal(InfiniteSampler(50, seed=4).indices(0, 50), a.indices(0, 50))


def test_sampler_epochs_are_permutations():
    n = 37
    s = InfiniteSampler(n, seed=0)
    epochs = [s.indices(e * n, n) for e in range(4)]
    for e in epochs:
        assert sorted(e.tolist()) == list(range(n))
    assert not all(np.array_equal(epochs[0], e) for e in epochs[1:])


def test_sampler_slices_of_one_stream():
    """Any (start, count) window, read in any order by a fresh sampler, is a slice of the same stream,
    so a resumed run sees the same batches."""
    n = 23
    stream = InfiniteSampler(n, seed=7).indices(0, 6 * n)
    rng = np.random.default_rng(1)
    for _ in range(20):
        start, count = int(rng.integers(0, 4 * n)), int(rng.integers(1, 2 * n))
        assert np.array_equal(InfiniteSampler(n, seed=7).indices(start, count), stream[start:start + count])


# ----------------------------------------------------------------------------------------------------
# Bad input: ValueError naming the file and the problem.


def expect_error(path, *fragments: str) -> str:
    with pytest.raises(ValueError) as info:
        load_dataset(path)
    msg = str(info.value)
    for f in fragments:
        assert f in msg, f"{f!r} not in {msg!r}"
    assert "\n" not in msg
    return msg


def test_missing_path(tmp_path):
    expect_error(tmp_path / "nowhere", "nowhere", "does not exist")


def test_unsupported_file(tmp_path):
    (tmp_path / "data.tar").write_bytes(b"x" * 100)
    expect_error(tmp_path / "data.tar", "data.tar", "unsupported")


def test_empty_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    expect_error(tmp_path, str(tmp_path), "no PNG or JPEG")


def test_unreadable_image(tmp_path):
    write_png(tmp_path / "good.png", gray(0))
    (tmp_path / "broken.png").write_bytes(png_bytes(gray(0))[:20])
    expect_error(tmp_path, "broken.png", "not a readable image")


def test_unreadable_zip(tmp_path):
    (tmp_path / "data.zip").write_bytes(np.random.default_rng(0).bytes(300))
    expect_error(tmp_path / "data.zip", "data.zip", "not a readable zip")


@pytest.mark.parametrize("content", ["random", "npy", "pickle"])
def test_unreadable_npz(tmp_path, content):
    path = tmp_path / "data.npz"
    if content == "random":
        path.write_bytes(np.random.default_rng(0).bytes(300))
    elif content == "npy":
        with open(path, "wb") as f:
            np.save(f, np.zeros([2, 8, 8], dtype=np.uint8))
    else:
        np.savez(path, x=np.array([None, 1], dtype=object))
    expect_error(path, "data.npz")


def test_mixed_sizes(tmp_path):
    write_png(tmp_path / "a.png", gray(0, 8))
    write_png(tmp_path / "b.png", gray(0, 16))
    expect_error(tmp_path, "mixed image sizes", "a.png", "b.png")


def test_mixed_gray_and_rgb(tmp_path):
    write_png(tmp_path / "a.png", gray(0, 8))
    write_png(tmp_path / "b.png", np.zeros([8, 8, 3], dtype=np.uint8))
    expect_error(tmp_path, "mixed image sizes", "b.png")


def test_non_square(tmp_path):
    write_png(tmp_path / "a.png", gray(0, 8, height=6))
    expect_error(tmp_path, "8x6", "square")


def test_unsupported_channel_count(tmp_path):
    np.savez(tmp_path / "two.npz", x=np.zeros([3, 8, 8, 2], dtype=np.uint8))
    expect_error(tmp_path / "two.npz", "two.npz", "2 channels")


def test_npz_bad_arrays(tmp_path):
    np.savez(tmp_path / "float.npz", x=np.zeros([3, 8, 8, 1], dtype=np.float32))
    expect_error(tmp_path / "float.npz", "float.npz", "uint8")
    np.savez(tmp_path / "nox.npz", images=np.zeros([3, 8, 8, 1], dtype=np.uint8))
    expect_error(tmp_path / "nox.npz", "nox.npz", "'x'")
    np.savez(tmp_path / "shorty.npz", x=np.zeros([3, 8, 8, 1], dtype=np.uint8), y=np.array([0, 1]))
    expect_error(tmp_path / "shorty.npz", "shorty.npz", "2 labels for 3 images")
    np.savez(tmp_path / "neg.npz", x=np.zeros([3, 8, 8, 1], dtype=np.uint8), y=np.array([0, -1, 2]))
    expect_error(tmp_path / "neg.npz", "neg.npz", "non-negative")


def test_dataset_json_names_missing_file(tmp_path):
    write_png(tmp_path / "00000/img00000000.png", gray(0))
    (tmp_path / "dataset.json").write_text(json.dumps(
        {"labels": [["00000/img00000000.png", 0], ["00000/img00000001.png", 1]]}))
    expect_error(tmp_path, "dataset.json", "missing", "00000/img00000001.png")


def test_dataset_json_misses_an_image(tmp_path):
    write_png(tmp_path / "00000/img00000000.png", gray(0))
    write_png(tmp_path / "00000/img00000001.png", gray(0))
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": [["00000/img00000000.png", 0]]}))
    expect_error(tmp_path, "dataset.json", "no label", "00000/img00000001.png")


def test_dataset_json_in_zip_disagrees(tmp_path):
    zpath = tmp_path / "d.zip"
    with zipfile.ZipFile(zpath, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr("img0.png", png_bytes(gray(0)))
        z.writestr("dataset.json", json.dumps({"labels": [["img0.png", 0], ["img9.png", 1]]}))
    expect_error(zpath, "d.zip", "dataset.json", "img9.png")


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"labels": [["a.png", "cat"]]}',
                                  '{"labels": [[5, 1]]}', '{"labels": [["a.png"]]}'])
def test_dataset_json_malformed(tmp_path, text):
    write_png(tmp_path / "a.png", gray(0))
    (tmp_path / "dataset.json").write_text(text)
    expect_error(tmp_path, "dataset.json")


def test_dataset_json_null_labels_means_unlabeled(tmp_path):
    write_png(tmp_path / "a.png", gray(0))
    (tmp_path / "dataset.json").write_text('{"labels": null}')
    assert load_dataset(tmp_path).labels is None


def test_permission_denied(tmp_path, monkeypatch):
    write_png(tmp_path / "a.png", gray(0))
    locked = write_png(tmp_path / "b.png", gray(0))
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        locked.chmod(0)  # a real unreadable file
    else:  # root reads any file: the read fails as it would for another user
        real = Path.read_bytes

        def read_bytes(self: Path) -> bytes:
            if self == locked:
                raise PermissionError(13, "Permission denied", str(self))
            return real(self)

        monkeypatch.setattr(Path, "read_bytes", read_bytes)
    try:
        expect_error(tmp_path, "cannot read", "b.png")
    finally:
        locked.chmod(0o644)
