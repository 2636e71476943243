"""Hardening of the data readers and the dataset tool: every reader decodes an image file the same way (16-bit,
palette, alpha, grey and colour PNGs), labels are class indices (or exact one-hot rows) within a sane bound, and
the dataset commands check everything before writing, report a full disk in one line without leaving torn or
temporary files, and finish after a SIGKILL exactly as an uninterrupted run."""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from edm2.cli import main
from edm2.data import ImageDataset, open_dataset
from edm2.data.image_read import read_image
from edm2.data.tool import convert_dataset, dataset_stats, decode_dataset
from edm2.metrics.images import ImageFiles

RNG = np.random.default_rng(7)


def png_bytes(values: np.ndarray, bit_depth: int, colour_type: int) -> bytes:
    """A PNG written byte by byte (PIL cannot write 16-bit colour PNGs): colour type 0 grey, 2 RGB, 4 grey and
    alpha, 6 RGBA; `values` [H, W] or [H, W, C]."""
    h, w = values.shape[:2]
    dtype = ">u2" if bit_depth == 16 else "u1"
    rows = b"".join(b"\x00" + values[y].astype(dtype).tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def pil_bytes(img: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kwargs)
    return buf.getvalue()


def palette_image(grey: bool) -> tuple[Image.Image, np.ndarray]:
    """A P image of 6x6 indices into a palette of 4 colours (grey levels when `grey`), and its RGB pixels."""
    colours = np.array([[0, 0, 0], [200, 30, 40], [10, 220, 90], [255, 255, 255]], dtype=np.uint8)
    if grey:
        colours = np.repeat(np.array([[0], [60], [130], [255]], dtype=np.uint8), 3, axis=1)
    index = RNG.integers(0, 4, [6, 6], dtype=np.uint8)
    img = Image.fromarray(index, mode="P")
    img.putpalette(colours.flatten().tolist() + [0] * (768 - colours.size))
    return img, colours[index]


def mode_cases() -> dict[str, tuple[bytes, np.ndarray]]:
    """name -> (file bytes, the intended uint8 [H, W, C] pixels, C = 1 or 3)."""
    g16 = RNG.integers(0, 65536, [6, 6]).astype(np.uint16)
    g16[0, :4] = [0, 255, 65535, 128 * 257]
    rgb16 = RNG.integers(0, 65536, [6, 6, 3]).astype(np.uint16)
    la16 = RNG.integers(0, 65536, [6, 6, 2]).astype(np.uint16)
    rgba16 = RNG.integers(0, 65536, [6, 6, 4]).astype(np.uint16)
    la = RNG.integers(0, 256, [6, 6, 2], dtype=np.uint8)
    rgba = RNG.integers(0, 256, [6, 6, 4], dtype=np.uint8)
    rgba[0, 0, 3] = 0  # a transparent pixel keeps its colour: alpha is dropped
    grey = RNG.integers(0, 256, [6, 6], dtype=np.uint8)
    rgb = RNG.integers(0, 256, [6, 6, 3], dtype=np.uint8)
    bits = RNG.integers(0, 2, [6, 6]).astype(bool)
    colour_p, colour_p_rgb = palette_image(grey=False)
    grey_p, grey_p_rgb = palette_image(grey=True)
    return {
        "I;16": (png_bytes(g16, 16, 0), (g16 >> 8).astype(np.uint8)[:, :, None]),
        "RGB 16-bit": (png_bytes(rgb16, 16, 2), (rgb16 >> 8).astype(np.uint8)),
        "LA 16-bit": (png_bytes(la16, 16, 4), (la16[:, :, :1] >> 8).astype(np.uint8)),
        "RGBA 16-bit": (png_bytes(rgba16, 16, 6), (rgba16[:, :, :3] >> 8).astype(np.uint8)),
        "P": (pil_bytes(colour_p), colour_p_rgb),
        "P transparent": (pil_bytes(colour_p, transparency=bytes([255, 0, 255, 255])), colour_p_rgb),
        "P grey": (pil_bytes(grey_p), grey_p_rgb[:, :, :1]),
        "LA": (pil_bytes(Image.fromarray(la, mode="LA")), la[:, :, :1]),
        "RGBA": (pil_bytes(Image.fromarray(rgba, mode="RGBA")), rgba[:, :, :3]),
        "L": (pil_bytes(Image.fromarray(grey)), grey[:, :, None]),
        "1": (pil_bytes(Image.fromarray(bits)), (bits * 255).astype(np.uint8)[:, :, None]),
        "RGB": (pil_bytes(Image.fromarray(rgb)), rgb),
    }


CASES = mode_cases()


def as_rgb(pixels: np.ndarray) -> np.ndarray:
    return np.repeat(pixels, 3, axis=2) if pixels.shape[2] == 1 else pixels


def as_grey(pixels: np.ndarray) -> np.ndarray:
    if pixels.shape[2] == 1:
        return pixels
    return np.asarray(Image.fromarray(pixels).convert("L"))[:, :, None]  # PIL's luma


# ----------------------------------------------------------------------------------------------------
# 1. One way to read an image, in every reader.


@pytest.mark.parametrize("case", list(CASES))
def test_every_reader_reads_each_mode_as_its_intended_8bit_channels(tmp_path, case):
    data, expected = CASES[case]
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.png").write_bytes(data)
    assert np.array_equal(read_image(data, "a.png"), expected)
    training = open_dataset(src)  # a training folder: the image's own channels
    assert training.channels == expected.shape[2]
    assert np.array_equal(training.read(0), expected.transpose(2, 0, 1))
    measured, _ = ImageFiles(src)[0]  # metrics: RGB
    assert np.array_equal(measured, as_rgb(expected).transpose(2, 0, 1))
    for channels, want in ((3, as_rgb(expected)), (1, as_grey(as_rgb(expected)))):
        dest = tmp_path / f"out{channels}.zip"
        convert_dataset(src, dest, channels=channels, workers=0)  # the dataset tool: --channels
        assert np.array_equal(open_dataset(dest).read(0), want.transpose(2, 0, 1)), channels


def test_sixteen_bit_png_is_not_white_after_dataset_convert(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    ramp = (np.arange(64, dtype=np.uint16) * 1000).reshape(8, 8)
    (src / "ramp.png").write_bytes(pil_bytes(Image.fromarray(ramp)))  # mode I;16
    result = CliRunner().invoke(main, ["dataset", "convert", "--source", str(src), "--dest", str(tmp_path / "d.zip"),
                                       "--workers", "0"])
    assert result.exit_code == 0, result.output
    pixels = open_dataset(tmp_path / "d.zip").read(0)
    assert np.array_equal(pixels[0], (ramp >> 8).astype(np.uint8)) and pixels.min() == 0 and pixels.max() < 255


def test_metrics_measure_a_mixed_folder_by_every_channel(tmp_path):
    """A grey first image no longer makes the colour images count by their red channel: a folder of grey and
    colour images is measured as the same images saved as RGB."""
    from detector_weights import write_small_dinov2

    det = write_small_dinov2(tmp_path / "det").parent
    mixed, rgb = tmp_path / "mixed", tmp_path / "rgb"
    for folder in (mixed, rgb):
        folder.mkdir()
    for i in range(4):
        pixels = RNG.integers(0, 256, [16, 16, 1 if i == 0 else 3], dtype=np.uint8)
        Image.fromarray(pixels[:, :, 0] if i == 0 else pixels).save(mixed / f"{i}.png")
        Image.fromarray(as_rgb(pixels)).save(rgb / f"{i}.png")
    stats = []
    for folder in (mixed, rgb):
        dest = tmp_path / f"{folder.name}.npz"
        result = CliRunner().invoke(main, ["metrics", "ref", "--data", str(folder), "--dest", str(dest), "--metrics",
                                           "fd_dinov2", "--detector-dir", str(det), "--device", "cpu", "--workers",
                                           "0"])
        assert result.exit_code == 0, result.output
        with np.load(dest) as d:
            stats.append({k: d[k] for k in d.files})
    assert stats[0].keys() == stats[1].keys()
    for key in stats[0]:
        assert np.array_equal(stats[0][key], stats[1][key]), key


def test_a_training_folder_of_grey_and_colour_images_is_refused_naming_both_and_their_modes(tmp_path):
    Image.fromarray(np.zeros([8, 8], np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros([8, 8, 4], np.uint8), mode="RGBA").save(tmp_path / "b.png")
    with pytest.raises(ValueError) as info:
        open_dataset(tmp_path)
    message = str(info.value)
    assert "\n" not in message
    for fragment in ("a.png", "mode L", "b.png", "mode RGBA", "--channels 3"):
        assert fragment in message, message


def test_dataset_convert_of_a_mixed_source_gives_every_image_the_asked_channels(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i, case in enumerate(CASES):
        (src / f"{i:02d}.png").write_bytes(CASES[case][0])
    convert_dataset(src, tmp_path / "out", workers=1)
    written = open_dataset(tmp_path / "out")
    assert len(written) == len(CASES) and written.channels == 3
    for i, case in enumerate(CASES):
        assert np.array_equal(written.read(i), as_rgb(CASES[case][1]).transpose(2, 0, 1)), case


# ----------------------------------------------------------------------------------------------------
# 2. and 3. Labels: class indices 0..C-1 (or exact one-hot rows), a sane number of classes.


def npz(tmp_path: Path, y: np.ndarray, name: str = "d.npz") -> Path:
    path = tmp_path / name
    np.savez(path, x=np.zeros([len(y), 4, 4, 1], np.uint8), y=y)
    return path


def refused(path: Path, *fragments: str) -> str:
    with pytest.raises(ValueError) as info:
        open_dataset(path)
    message = str(info.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


@pytest.mark.parametrize("y, fragments", [
    (np.array([0.0, 0.5, 1.0]), ["0.5", "not an integer"]),
    (np.array([0.0, np.nan, 1.0]), ["nan", "not an integer"]),
    (np.array([0.0, np.inf, 1.0]), ["inf", "not an integer"]),
    (np.array([0, -3, 1]), ["non-negative"]),  # refused before too
    (np.array([0, 10**12, 1]), ["1000000000000", "at most 100000 classes"]),
    (np.array([[0.0, 0.7, 0.3], [1, 0, 0], [0, 0, 1]]), ["not one-hot", "row 0", "class indices"]),
    (np.array([[0, 1, 1], [1, 0, 0], [0, 0, 1]]), ["not one-hot", "row 0"]),
    (np.array(["a", "b", "c"]), ["integer class indices"]),
])
def test_npz_labels_that_are_not_class_indices_are_refused(tmp_path, y, fragments):
    path = npz(tmp_path, y)
    refused(path, "d.npz", *fragments)
    result = CliRunner().invoke(main, ["dataset", "convert", "--source", str(path), "--dest",
                                       str(tmp_path / "out" / "d.zip"), "--workers", "0"])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "out").exists()


def labelled_folder(root: Path, labels: list) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(len(labels)):
        Image.fromarray(np.full([4, 4], i, np.uint8)).save(root / f"{i}.png")
    text = json.dumps({"labels": [[f"{i}.png", v] for i, v in enumerate(labels)]})
    (root / "dataset.json").write_text(text.replace('"NAN"', "NaN"))
    return root


def test_whole_float_labels_and_exact_one_hot_rows_are_accepted(tmp_path):
    ds = open_dataset(npz(tmp_path, np.array([0.0, 2.0, 1.0]), "f.npz"))
    assert ds.labels.tolist() == [0, 2, 1] and ds.labels.dtype == np.int64 and ds.num_classes == 3
    one_hot = np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0]], dtype=np.float32)  # class 3 unused
    ds = open_dataset(npz(tmp_path, one_hot, "h.npz"))
    assert ds.labels.tolist() == [1, 0, 1] and ds.num_classes == 4  # the width of the rows
    summary = convert_dataset(tmp_path / "h.npz", tmp_path / "h.zip", workers=0)
    assert open_dataset(tmp_path / "h.zip").labels.tolist() == [1, 0, 1] and summary.images == 3
    assert open_dataset(labelled_folder(tmp_path / "j", [2.0, 0])).labels.tolist() == [2, 0]  # dataset.json
    with pytest.raises(ValueError, match="not an integer"):
        ImageDataset(np.zeros([2, 1, 4, 4], np.uint8), np.array([0.0, 1.5]), name="mine")


@pytest.mark.parametrize("labels, fragments", [
    ([0, 10**12], ["10000000000", "out of range", "at most 100000 classes"]),
    ([0, 10**40], ["out of range"]),  # was an OverflowError with a traceback
    ([0, -1], []),  # refused before too
    ([0, 0.5], ["0.5", "not an integer"]),
    ([0, "NAN"], ["nan", "not an integer"]),
    ([0, True], ["bad entry"]),
])
def test_dataset_json_labels_that_are_not_class_indices_are_refused(tmp_path, labels, fragments):
    src = labelled_folder(tmp_path / "src", labels)
    refused(src, "dataset.json", *fragments)
    result = CliRunner().invoke(main, ["dataset", "convert", "--source", str(src), "--dest",
                                       str(tmp_path / "out" / "d"), "--workers", "0"])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.output
    assert "out of range" in result.stderr or "integer" in result.stderr or "bad entry" in result.stderr
    assert not (tmp_path / "out").exists()



# ----------------------------------------------------------------------------------------------------
# 4. The dataset commands: checked before writing, a full disk in one line, killed runs finished exactly.


def tiny_images(root: Path, count: int, size: int = 8) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(RNG.integers(0, 256, [size, size, 3], dtype=np.uint8)).save(root / f"{i:04d}.png")
    return root


def entries(dest: Path) -> dict[str, bytes]:
    if dest.suffix == ".zip":
        with zipfile.ZipFile(dest) as z:
            return {n: z.read(n) for n in z.namelist()}
    return {p.relative_to(dest).as_posix(): p.read_bytes() for p in sorted(dest.rglob("*"))
            if p.is_file() and not p.name.startswith(".")}  # hidden files are the tool's records, not data


def tree(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


def convert_cli(*args) -> object:
    return CliRunner().invoke(main, ["dataset", "convert", *[str(a) for a in args]])


def one_line_error(result, *fragments: str) -> str:
    """The error line of a failed command (after the progress bar of the images done, if any)."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.strip().splitlines() if "img/s]" not in line]
    assert len(lines) == 1 and lines[0].startswith("edm2: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def truncate_pixels(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])  # the header reads, the pixels do not


@pytest.mark.parametrize("dest_name", ["d.zip", "d"])
def test_refused_commands_leave_the_destination_as_it_was(tmp_path, dest_name):
    src = tiny_images(tmp_path / "src", 3)
    dest = tmp_path / "new" / "deeper" / dest_name
    one_line_error(convert_cli("--source", src, "--dest", dest, "--resolution", "64x32", "--transform",
                               "center-crop-wide", "--workers", "0"), "every image")
    assert not (tmp_path / "new").exists()  # was: the folders of the destination, and the unfinished marker
    truncate_pixels(src / "0000.png")
    one_line_error(convert_cli("--source", src, "--dest", dest, "--workers", "0"), "0000.png")
    with pytest.raises(ValueError, match="--workers"):
        convert_dataset(tiny_images(tmp_path / "ok", 2), dest, workers=-1)
    assert not (tmp_path / "new").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error(convert_cli("--source", src, "--dest", empty, "--workers", "0"), "0000.png")
    assert tree(empty) == []  # the user's empty folder: no marker left in it
    before = tree(src)
    one_line_error(convert_cli("--source", src, "--dest", src / "out", "--workers", "0"), "inside --source")
    assert tree(src) == before


def latent_folder(root: Path, count: int = 3) -> Path:
    for i in range(count):
        path = root / "00000" / f"img-mean-std-{i:08d}.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, RNG.standard_normal([8, 2, 2]).astype(np.float32))
    return root


def test_stats_and_decode_check_the_destination_first(tmp_path):
    src = latent_folder(tmp_path / "lat")
    before = entries(src)
    with pytest.raises(ValueError, match="inside --source"):
        decode_dataset(src, src / "decoded")
    with pytest.raises(ValueError, match="the source"):
        dataset_stats(src, src)
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match="is a folder"):
        dataset_stats(src, tmp_path / "folder")
    assert entries(src) == before and tree(tmp_path / "folder") == []


def no_space_after(calls: int):
    """A check that raises ENOSPC from its `calls`-th call on (the first `calls` - 1 pass)."""
    count = [0]

    def check() -> None:
        count[0] += 1
        if count[0] >= calls:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    return check


def fail_writes(monkeypatch, owner, name: str, full) -> None:
    """`owner.name` (a write method) runs the check `full` first."""
    real = getattr(owner, name)
    monkeypatch.setattr(owner, name, lambda self, *args, **kwargs: (full(), real(self, *args, **kwargs))[1])


def temporaries(root: Path) -> list[str]:
    return [p.name for p in root.rglob("*") if p.name.endswith(".tmp") or p.name.endswith(".lock")]


@pytest.mark.parametrize("dest_name, calls", [("d", 1), ("d", 5), ("d.zip", 3), ("d.zip", 10**6)])
def test_a_full_disk_is_one_line_and_leaves_nothing_torn(tmp_path, monkeypatch, dest_name, calls):
    """ENOSPC from a write: the marker (call 1), an image (call 5), an entry of the zip (call 3), or the zip's
    directory when it is closed (10**6: only the end record fails)."""
    src = tiny_images(tmp_path / "src", 6)
    dest = tmp_path / "out" / dest_name
    full = no_space_after(calls)
    if dest_name == "d":
        fail_writes(monkeypatch, Path, "write_bytes", full)
        fail_writes(monkeypatch, Path, "write_text", full)
    else:  # an entry's bytes, or (call 10**6 never comes) the zip's directory when it is closed
        fail_writes(monkeypatch, zipfile._ZipWriteFile, "write", full)
        fail_writes(monkeypatch, zipfile.ZipFile, "_write_end_record", full if calls < 10**6 else no_space_after(1))
    line = one_line_error(convert_cli("--source", src, "--dest", dest, "--workers", "0"),
                          "no space left on device", str(dest))
    assert temporaries(tmp_path) == [], line
    monkeypatch.undo()
    if calls == 5:  # the marker and three images written: the folder is kept, and the same command finishes it
        assert (dest / ".edm2-incomplete.json").exists() and len(list(dest.rglob("img*.png"))) == 3
    else:
        assert not (tmp_path / "out").exists(), tree(tmp_path / "out")
    assert convert_cli("--source", src, "--dest", dest, "--workers", "0").exit_code == 0
    convert_dataset(src, tmp_path / "clean.zip", workers=0)
    assert entries(dest) == entries(tmp_path / "clean.zip")


def test_stats_on_a_full_disk_and_its_stale_temporaries(tmp_path, monkeypatch):
    src = latent_folder(tmp_path / "lat")
    dest = tmp_path / "stats" / "s.json"
    fail_writes(monkeypatch, Path, "write_text", no_space_after(1))
    result = CliRunner().invoke(main, ["dataset", "stats", "--source", str(src), "--dest", str(dest), "--workers",
                                       "0"])
    one_line_error(result, "no space left on device", str(dest))
    assert not (tmp_path / "stats").exists()
    monkeypatch.undo()
    dest.parent.mkdir()
    (dest.parent / ".s.json.k1ll3d.tmp").write_text("{")  # left by a killed run
    stats = dataset_stats(src, dest, workers=0)
    assert json.loads(dest.read_text())["num_images"] == stats.num_images == 3
    assert tree(dest.parent) == ["s.json"]


def test_stale_temporaries_of_killed_runs_are_removed_by_the_rerun(tmp_path, monkeypatch):
    src = tiny_images(tmp_path / "src", 4)
    convert_dataset(src, tmp_path / "clean.zip", workers=0)
    started = tmp_path / "started"  # killed while writing the unfinished marker: nothing else there
    started.mkdir()
    (started / "..edm2-incomplete.json.x7.tmp").write_text("{")
    convert_dataset(src, started, workers=0)
    assert entries(started) == entries(tmp_path / "clean.zip") and "..edm2-incomplete.json.x7.tmp" not in tree(started)
    halfway = tmp_path / "halfway"  # stopped with two images written (a full disk), then killed writers' leftovers
    with monkeypatch.context() as patch:
        fail_writes(patch, Path, "write_bytes", no_space_after(3))
        with pytest.raises(OSError, match="no space left"):
            convert_dataset(src, halfway, workers=0)
    assert len(list(halfway.rglob("img*.png"))) == 2
    (halfway / ".x.tmp").write_text("torn")
    (halfway / "00000" / ".img00000003.png.a1.tmp").write_bytes(b"torn")
    convert_dataset(src, halfway, workers=0)
    assert entries(halfway) == entries(tmp_path / "clean.zip") and temporaries(halfway) == []
    (tmp_path / ".z.zip.b2.tmp").write_bytes(b"torn")
    convert_dataset(src, tmp_path / "z.zip", workers=0)
    assert not (tmp_path / ".z.zip.b2.tmp").exists()


def written_so_far(dest: Path) -> int:
    """Bytes of output that a running conversion has written (files of a folder, the zip's temporary)."""
    if dest.suffix == ".zip":
        return sum(p.stat().st_size for p in dest.parent.glob(f".{dest.name}.*.tmp") if p.exists())
    return sum(p.stat().st_size for p in dest.rglob("img*.png") if p.exists()) if dest.exists() else 0


def complete(dest: Path) -> bool:
    if dest.suffix == ".zip":
        return dest.exists()
    return (dest / "dataset.json").exists() and not (dest / ".edm2-incomplete.json").exists()


@pytest.mark.parametrize("dest_name, workers", [("d", 1), ("d.zip", 0)])
def test_sigkill_at_a_random_moment_then_rerun_equals_an_uninterrupted_run(tmp_path, dest_name, workers):
    src = tiny_images(tmp_path / "src", 300, size=12)
    reference = tmp_path / "reference.zip"
    convert_dataset(src, reference, (8, 8), "center-crop", workers=0)
    total = sum(len(v) for v in entries(reference).values())
    rng = np.random.default_rng()
    moment = int(rng.integers(0, total))  # bytes of output after which the process is killed
    dest = tmp_path / "out" / dest_name
    command = [sys.executable, "-m", "edm2.cli", "dataset", "convert", "--source", str(src), "--dest", str(dest),
               "--resolution", "8", "--transform", "center-crop", "--workers", str(workers)]
    with open(tmp_path / "stderr.txt", "wb") as err:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        deadline = time.monotonic() + 60
        while proc.poll() is None and written_so_far(dest) < moment and time.monotonic() < deadline:
            time.sleep(0.002)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the process and its DataLoader workers
        proc.wait()
    finished = proc.returncode == 0 or complete(dest)  # killed after the last write: complete already
    assert finished or proc.returncode == -signal.SIGKILL, (tmp_path / "stderr.txt").read_text()
    if not finished:
        result = convert_cli("--source", src, "--dest", dest, "--resolution", "8", "--transform", "center-crop",
                             "--workers", str(workers))
        assert result.exit_code == 0, f"killed after {moment} bytes: {result.output}"
    assert entries(dest) == entries(reference), f"killed after {moment} bytes"
    assert sorted(p.name for p in dest.parent.iterdir()) == [dest_name]  # no temporary, no lock
