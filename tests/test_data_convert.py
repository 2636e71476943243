"""`edm2 dataset convert`: every transform on synthetic images with a known answer, labels from class subfolders
and from dataset.json, the official output layout (zip and folder alike, with or without worker processes), a
conversion killed by SIGKILL that leaves no complete-looking output and finishes when run again, and one-line
errors that write nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from edm2.dataset_tool import convert_dataset
from PIL import Image

from edm2.cli import main
from edm2.data import open_dataset
from edm2.data.transforms import make_transform, parse_resolution

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def canvas(height: int, width: int, color) -> np.ndarray:
    return np.full([height, width, 3], color, dtype=np.uint8)


def blocks(rows: int, cols: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """An image made of size x size blocks of random colours, and the block colours."""
    colors = np.random.default_rng(seed).integers(0, 256, [rows, cols, 3], dtype=np.uint8)
    return colors.repeat(size, 0).repeat(size, 1), colors


# ----------------------------------------------------------------------------------------------------
# Transforms.


def test_center_crop_keeps_the_centred_square():
    wide = canvas(40, 60, BLUE)
    wide[:, 10:50] = RED  # the centred 40x40 square; blue strips left and right
    out = make_transform("center-crop", (20, 20))(wide)
    assert out.shape == (20, 20, 3) and (out == RED).all()  # the strips are cut off, red stays red
    tall = np.random.default_rng(0).integers(0, 256, [61, 40, 3], dtype=np.uint8)
    assert np.array_equal(make_transform("center-crop", (40, 40))(tall), tall[10:50])  # (61 - 40) // 2 = 10


def test_off_centre_rectangle_moves_by_the_crop_offset():
    img = canvas(80, 40, GREEN)  # 40 wide, 80 tall: center-crop keeps rows 20..59
    img[30:40, 5:15] = RED
    out = make_transform("center-crop", (40, 40))(img)
    expected = canvas(40, 40, GREEN)
    expected[10:20, 5:15] = RED
    assert np.array_equal(out, expected)


def test_center_crop_wide_letterboxes_the_band():
    img = canvas(60, 80, RED)  # 80 wide, 60 tall; the band of 40 * 60 / 80 = 30 rows at 40 wide
    img[15:45] = GREEN
    out = make_transform("center-crop-wide", (40, 30))(img)
    assert out.shape == (40, 40, 3)
    assert (out[5:35] == GREEN).all() and (out[:5] == 0).all() and (out[35:] == 0).all()
    assert make_transform("center-crop-wide", (40, 30))(canvas(60, 39, RED)) is None  # narrower than 40: skipped


def test_resize_stretches_the_whole_image():
    img = canvas(40, 60, BLUE)
    img[:, :30] = RED
    out = make_transform("resize", (32, 32))(img)
    assert out.shape == (32, 32, 3)
    assert (out[:, :11] == RED).all() and (out[:, 22:] == BLUE).all()  # away from the Lanczos boundary
    assert make_transform(None, (32, 32))(img).tolist() == out.tolist()  # --resolution alone resizes


def test_center_crop_dhariwal_is_box_halving_then_the_centre():
    # 64x64 from 2x2 blocks, output 32: the short side (64) >= 2 * 32, one box halving gives the block colours
    # exactly, and the bicubic step is a no-op (scale 1). Lanczos (center-crop) does not give the blocks.
    img, colors = blocks(32, 32, 2)
    assert np.array_equal(make_transform("center-crop-dhariwal", (32, 32))(img), colors)
    assert not np.array_equal(make_transform("center-crop", (32, 32))(img), colors)
    # 256 wide x 128 tall from 4x4 blocks: halved twice (128 -> 64 >= 64 -> 32), then the centred 32 columns.
    img, colors = blocks(32, 64, 4, seed=1)
    assert np.array_equal(make_transform("center-crop-dhariwal", (32, 32))(img), colors[:, 16:48])
    # A short side below 2N: no halving, bicubic to a short side of N, centred crop.
    out = make_transform("center-crop-dhariwal", (32, 32))(canvas(50, 100, GREEN))
    assert out.shape == (32, 32, 3) and (out == GREEN).all()


def test_gray_images_pass_through():
    gray = np.random.default_rng(2).integers(0, 256, [8, 8, 1], dtype=np.uint8)
    assert make_transform("center-crop", (8, 8))(gray).shape == (8, 8, 1)


@pytest.mark.parametrize("transform, resolution, fragment", [
    ("center-crop", "32x16", "cannot produce square"),
    ("center-crop-dhariwal", "64x32", "cannot produce square"),
    ("center-crop-wide", "16x32", "H <= W"),
    ("center-crop", None, "needs --resolution"),
])
def test_resolutions_a_transform_cannot_produce(transform, resolution, fragment):
    with pytest.raises(ValueError, match=fragment):
        make_transform(transform, parse_resolution(resolution))


@pytest.mark.parametrize("text", ["0", "abc", "4x", "2x3x4", "-8"])
def test_bad_resolution_text(text):
    with pytest.raises(ValueError, match="--resolution"):
        parse_resolution(text)


# ----------------------------------------------------------------------------------------------------
# Sources, labels and the output layout.


def save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def class_folders(root: Path) -> Path:
    """Two classes in subfolders (named so that sorting matters), images of different sizes."""
    rng = np.random.default_rng(5)
    for cls, n in (("b_dogs", 3), ("a_cats", 2)):
        for i in range(n):
            save(root / cls / f"{i}.png", rng.integers(0, 256, [20 + 3 * i, 24, 3], dtype=np.uint8))
    return root


def read_entries(dest: Path) -> dict[str, bytes]:
    if dest.suffix == ".zip":
        with zipfile.ZipFile(dest) as z:
            assert all(i.compress_type == zipfile.ZIP_STORED for i in z.infolist())
            return {n: z.read(n) for n in z.namelist()}
    return {p.relative_to(dest).as_posix(): p.read_bytes() for p in sorted(dest.rglob("*"))
            if p.is_file() and not p.name.startswith(".")}  # hidden files are the tool's records, not data


def test_labels_from_class_subfolders_and_the_official_layout(tmp_path):
    src = class_folders(tmp_path / "src")
    summary = convert_dataset(src, tmp_path / "out.zip", (16, 16), "center-crop", workers=0)
    entries = read_entries(tmp_path / "out.zip")
    names = [f"00000/img{i:08d}.png" for i in range(5)]
    assert sorted(entries) == sorted([*names, "dataset.json"])
    meta = json.loads(entries["dataset.json"])
    # Sorted paths: a_cats/0, a_cats/1, b_dogs/0, b_dogs/1, b_dogs/2; classes numbered by sorted folder name.
    assert meta["labels"] == [[n, lab] for n, lab in zip(names, [0, 0, 1, 1, 1])]
    assert meta["classes"] == ["a_cats", "b_dogs"]
    ds = open_dataset(tmp_path / "out.zip")
    assert (len(ds), ds.resolution, ds.channels, ds.num_classes) == (5, 16, 3, 2)
    expected = make_transform("center-crop", (16, 16))(np.asarray(Image.open(src / "b_dogs" / "2.png")))
    assert np.array_equal(ds.read(4).transpose(1, 2, 0), expected)
    assert (summary.images, summary.classes, summary.shape) == (5, 2, (3, 16, 16))
    assert summary.bytes == sum(len(v) for v in entries.values())


def test_dataset_json_labels_win_and_max_images(tmp_path):
    src = class_folders(tmp_path / "src")
    labels = [["a_cats/0.png", 7], ["a_cats/1.png", 3], ["b_dogs/0.png", 1], ["b_dogs/1.png", 1], ["b_dogs/2.png", 0]]
    (src / "dataset.json").write_text(json.dumps({"labels": labels}))
    convert_dataset(src, tmp_path / "out", (8, 8), "resize", max_images=3, workers=0)
    meta = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert [lab for _, lab in meta["labels"]] == [7, 3, 1] and "classes" not in meta
    assert not (tmp_path / "out" / ".edm2-incomplete.json").exists()


def test_zip_and_folder_and_workers_give_the_same_dataset(tmp_path):
    src = class_folders(tmp_path / "src")
    convert_dataset(src, tmp_path / "a.zip", (16, 16), "center-crop-dhariwal", workers=0)
    convert_dataset(src, tmp_path / "b", (16, 16), "center-crop-dhariwal", workers=2)
    assert read_entries(tmp_path / "a.zip") == read_entries(tmp_path / "b")


def test_npz_source_and_grayscale(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, [4, 8, 8, 3], dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x=x, y=np.array([1, 0, 1, 2]))
    convert_dataset(tmp_path / "d.npz", tmp_path / "g.zip", channels=1, workers=0)
    ds = open_dataset(tmp_path / "g.zip")
    assert ds.channels == 1 and ds.labels.tolist() == [1, 0, 1, 2]
    luma = np.asarray(Image.fromarray(x[2]).convert("L"))  # ITU-R 601-2, as PIL converts
    assert np.array_equal(ds.read(2)[0], luma)


# ----------------------------------------------------------------------------------------------------
# Killed conversions.

KILL_AFTER_WRITES = textwrap.dedent("""
    import os, signal, sys
    import edm2.dataset_writer as W
    real, count = W.DatasetWriter.write, [0]
    def write(self, name, data):
        real(self, name, data)
        count[0] += 1
        if count[0] == 3:
            os.kill(os.getpid(), signal.SIGKILL)
    W.DatasetWriter.write = write
    from edm2.dataset_tool import convert_dataset
    convert_dataset(sys.argv[1], sys.argv[2], (16, 16), "center-crop", workers=int(sys.argv[3]))
""")


@pytest.mark.parametrize("dest_name, workers", [("out.zip", 2), ("out", 0)])
def test_sigkill_leaves_no_complete_dataset_and_rerun_finishes(tmp_path, dest_name, workers):
    src = class_folders(tmp_path / "src")
    dest = tmp_path / "dest" / dest_name
    # Output to a file, not a pipe: orphaned DataLoader workers hold the pipe open until they notice (seconds).
    with open(tmp_path / "stderr.txt", "wb") as err:
        proc = subprocess.run([sys.executable, "-c", KILL_AFTER_WRITES, str(src), str(dest), str(workers)],
                              stdout=subprocess.DEVNULL, stderr=err)
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "stderr.txt").read_text()
    if dest.suffix == ".zip":
        assert not dest.exists()  # only hidden files remain: the temporary (and the lock file)
        left = sorted(p.name for p in dest.parent.iterdir())
        assert all(n.startswith(".out.zip.") for n in left) and sum(n.endswith(".tmp") for n in left) == 1
    else:
        assert (dest / ".edm2-incomplete.json").exists() and not (dest / "dataset.json").exists()
        assert len(list(dest.rglob("img*.png"))) == 3
        with pytest.raises(ValueError, match="unfinished"):
            open_dataset(dest)
    summary = convert_dataset(src, dest, (16, 16), "center-crop", workers=workers)  # the same command again
    assert summary.images == 5
    assert sorted(p.name for p in dest.parent.iterdir()) == [dest_name]  # temporaries and lock gone
    convert_dataset(src, tmp_path / "clean.zip", (16, 16), "center-crop", workers=0)
    assert read_entries(dest) == read_entries(tmp_path / "clean.zip")


def test_unfinished_folder_of_another_job_is_refused(tmp_path):
    src = class_folders(tmp_path / "src")
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / ".edm2-incomplete.json").write_text(json.dumps({"job": {"command": "convert", "other": 1}}))
    with pytest.raises(ValueError, match="unfinished conversion of another source"):
        convert_dataset(src, dest, (16, 16), "center-crop", workers=0)


# ----------------------------------------------------------------------------------------------------
# The command: a summary line; bad input is one line, exit code 2, nothing written.


def invoke(*args):
    return CliRunner().invoke(main, ["dataset", *[str(a) for a in args]])


def test_cli_summary_line(tmp_path):
    src = class_folders(tmp_path / "src")
    result = invoke("convert", "--source", src, "--dest", tmp_path / "d.zip", "--resolution", "16",
                    "--transform", "center-crop", "--workers", "0")
    assert result.exit_code == 0, result.output
    size = (tmp_path / "d.zip").stat().st_size
    assert f"wrote 5 images (2 classes, 16x16x3, {size / 1e6:.1f} MB) to {tmp_path / 'd.zip'}" in result.stdout


def broken_image(src: Path) -> list[str]:
    (src / "b_dogs" / "9.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    return ["--resolution", "16"], ["b_dogs/9.png", "not a readable image"]


def bad_labels(src: Path) -> list[str]:
    (src / "dataset.json").write_text('{"labels": [["a_cats/0.png", "cat"]]}')
    return ["--resolution", "16"], ["dataset.json", "bad entry"]


def not_square(src: Path) -> list[str]:
    return [], ["a_cats/0.png", "24x20", "not square", "--resolution"]


def mixed_sizes(src: Path) -> list[str]:
    for path in src.rglob("*.png"):
        save(path, np.zeros([16 if "dogs" in str(path) else 8] * 2 + [3], dtype=np.uint8))
    return [], ["a_cats/0.png", "8x8", "b_dogs/0.png", "16x16", "--resolution"]


def impossible_resolution(src: Path) -> list[str]:
    return ["--resolution", "32x16", "--transform", "center-crop"], ["cannot produce square"]


def missing_source(src: Path) -> list[str]:
    return ["--source", src / "nowhere", "--resolution", "16"], ["nowhere", "does not exist"]


def no_images(src: Path) -> list[str]:
    empty = src.parent / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    return ["--source", empty, "--resolution", "16"], ["no images"]


@pytest.mark.parametrize("case", [broken_image, bad_labels, not_square, mixed_sizes, impossible_resolution,
                                  missing_source, no_images])
@pytest.mark.parametrize("dest_name", ["out.zip", "out"])
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, case, dest_name):
    src = class_folders(tmp_path / "src")
    args, fragments = case(src)
    dest = tmp_path / "dest" / dest_name
    result = invoke("convert", "--source", src, *args, "--dest", dest, "--workers", "0")
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edm2: error: "), result.stderr
    for f in fragments:
        assert f in lines[0], lines[0]
    assert not (tmp_path / "dest").exists()


def test_existing_zip_is_not_overwritten(tmp_path):
    src = class_folders(tmp_path / "src")
    (tmp_path / "d.zip").write_bytes(b"mine")
    result = invoke("convert", "--source", src, "--dest", tmp_path / "d.zip", "--resolution", "16")
    assert result.exit_code == 2 and "exists" in result.stderr
    assert (tmp_path / "d.zip").read_bytes() == b"mine" and sorted(os.listdir(tmp_path)) == ["d.zip", "src"]


@pytest.mark.parametrize("name", ["d.zip", "folder"])
def test_the_same_command_on_its_finished_output_finishes_again_and_another_is_refused(tmp_path, name):
    """A run killed after its output was complete (before it exited) is run again: the same command on its own
    finished output succeeds with the same content; another command on it is refused."""
    src = class_folders(tmp_path / "src")
    dest = tmp_path / name
    first = invoke("convert", "--source", src, "--dest", dest, "--resolution", "16")
    assert first.exit_code == 0, first.stderr
    before = read_entries(dest)
    again = invoke("convert", "--source", src, "--dest", dest, "--resolution", "16")
    assert again.exit_code == 0, again.stderr
    assert read_entries(dest) == before and len(open_dataset(dest)) == len(list(src.rglob("*.png")))
    other = invoke("convert", "--source", src, "--dest", dest, "--resolution", "8")
    assert other.exit_code == 2 and len(other.stderr.strip().splitlines()) == 1
