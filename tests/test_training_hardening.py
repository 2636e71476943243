"""Training refuses what it cannot do before it writes, and keeps its folder sound when something goes wrong
later: options out of range or not finite, a diverging run, a first start that fails, a resume with other or
shorter options, the records of a resumed run, and a full disk."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import edm2.files.base as files_base
import edm2.training.loop as loop
from edm2.cli import main
from edm2.files import find_checkpoints, load_tensors, read_metadata
from edm2.training import TrainOptions, train
from edm2.training.option_table import RANGES, option_fields

# 4 steps of 8 images on the minimal network: a status line every step, snapshots and checkpoints every 2 steps.
BASE = dict(data="digits", preset="cpu-tiny8", batch=8, duration=32, status=8, snapshot=16, checkpoint=16, seed=1,
            device="cpu")
CLI = ["train", "--data", "digits", "--preset", "cpu-tiny8", "--batch", "8", "--duration", "32", "--status", "8",
       "--snapshot", "16", "--checkpoint", "16", "--seed", "1", "--device", "cpu"]


def run(outdir: Path, **change) -> dict:
    return train(TrainOptions(outdir=str(outdir), **{**BASE, **change}), progress=False)


def invoke(outdir: Path, *extra: str):
    return CliRunner().invoke(main, [*CLI, "--outdir", str(outdir), *extra])


def error_line(result) -> str:
    """The one error line of a refused command (exit 2); the progress bar may stand before it."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output, result.output
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("edm2: error: "), result.stderr
    return line.split("\r")[-1]


def dir_state(path: Path) -> dict[str, str] | None:
    """Every file under `path` with a digest of its bytes (None when `path` is absent)."""
    if not path.exists():
        return None
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def stats_nimg(outdir: Path) -> list[int]:
    return [json.loads(line)["nimg"] for line in (outdir / "stats.jsonl").read_text().splitlines()]


def assert_all_saved_finite(outdir: Path) -> None:
    for path in [*find_checkpoints(outdir), *outdir.glob("snapshot-*.safetensors")]:
        tensors, _ = load_tensors(path)
        for name, value in tensors.items():
            assert torch.isfinite(value.float()).all(), f"{path.name}: {name}"


# ----------------------------------------------------------------------------------------------------
# 1. Every numeric option in range and finite, before anything is written.

BAD = [("batch", 0), ("batch", -16), ("batch", 16.5), ("batch_gpu", 0), ("duration", 0), ("status", 0),
       ("snapshot", -32), ("checkpoint", 0), ("lr", math.nan), ("lr", math.inf), ("lr", 0.0), ("P_mean", math.nan),
       ("P_std", math.inf), ("P_std", 0.0), ("dropout", 1.0), ("dropout", -0.1), ("dropout", math.nan),
       ("ema_stds", (0.05, 0.3)), ("ema_stds", (0.0,)), ("ema_stds", (0.05, math.nan)), ("ls", math.inf),
       ("ls", math.nan), ("decay", math.nan), ("decay", -1.0), ("rampup", -16), ("seed", -1), ("max_size", 0),
       ("channels", 0), ("workers", -1), ("budget", math.inf)]


@pytest.mark.parametrize("name, value", BAD, ids=[f"{n}={v}" for n, v in BAD])
def test_out_of_range_options_are_refused_before_any_file(tmp_path, name, value):
    outdir = tmp_path / "run"
    change = {name: value, **({"duration": None} if name == "budget" else {})}
    spelling = "--" + name.replace("_", "-")
    with pytest.raises(ValueError, match=f"^{spelling} must be ") as excinfo:
        run(outdir, **change)
    assert "\n" not in str(excinfo.value)
    assert not outdir.exists()


@pytest.mark.parametrize("name, value", [("augment", math.nan), ("augment", 1.5), ("ema", math.inf), ("ema", -1)])
def test_edm_recipe_options_are_checked_too(tmp_path, name, value):
    with pytest.raises(ValueError, match=f"^--{name} must be "):
        run(tmp_path / "run", preset="cpu-edm-tiny8", **{name: value})
    assert not (tmp_path / "run").exists()


def test_every_numeric_option_has_a_range():
    numeric = {f.name for f in option_fields()
               if f.metadata["option"].kind in (int, float, "nimg", "floats", "ints", "count", "budget")}
    assert numeric <= set(RANGES), numeric - set(RANGES)


def test_batch_zero_on_the_command_line_is_refused_not_replaced(tmp_path):
    line = error_line(invoke(tmp_path / "run", "--batch", "0"))
    assert line == "edm2: error: --batch must be a positive number of images (e.g. 2Ki), got 0"
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------------
# 2. A run whose loss or weights stop being finite stops, and nothing non-finite is saved.


def poison_at(monkeypatch, nimg: int, what: str) -> None:
    """The step that starts at image `nimg` returns a NaN loss (`loss`) or leaves a NaN weight (`weight`)."""
    real = loop.train_step

    def step(t, cur_nimg, batches):
        loss, lr = real(t, cur_nimg, batches)
        if cur_nimg == nimg and what == "loss":
            loss = loss * math.nan
        if cur_nimg == nimg and what == "weight":
            with torch.no_grad():
                next(t.net.parameters()).view(-1)[0] = math.nan
        return loss, lr

    monkeypatch.setattr(loop, "train_step", step)


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    outdir = tmp_path / "run"
    poison_at(monkeypatch, 16, "loss")  # the third step: 16 -> 24, reported at 24
    line = error_line(invoke(outdir))
    assert "training diverged at 24 images" in line and "checkpoint-0000000016.safetensors" in line, line
    assert [read_metadata(p)["nimg"] for p in find_checkpoints(outdir)] == [16]
    assert stats_nimg(outdir) == [8, 16]  # the non-finite report is not written
    assert "training diverged at 24 images" in (outdir / "log.txt").read_text()
    assert_all_saved_finite(outdir)
    monkeypatch.undo()
    result = invoke(outdir)  # the cause gone, the same command resumes from the good state
    assert result.exit_code == 0, result.output
    assert stats_nimg(outdir) == [8, 16, 24, 32]


def test_nan_weight_is_caught_before_a_snapshot_or_checkpoint_holds_it(tmp_path, monkeypatch):
    outdir = tmp_path / "run"
    poison_at(monkeypatch, 24, "weight")  # the last step: 24 -> 32, where a snapshot and a checkpoint are due
    with pytest.raises(ValueError, match="training diverged at 32 images") as excinfo:
        run(outdir, status=32)
    assert "\n" not in str(excinfo.value)
    assert [read_metadata(p)["nimg"] for p in find_checkpoints(outdir)] == [16]
    assert sorted(p.name[:19] for p in outdir.glob("snapshot-*")) == ["snapshot-0000000016"] * 2
    assert_all_saved_finite(outdir)


def test_a_new_run_diverging_before_its_first_checkpoint_leaves_no_folder(tmp_path, monkeypatch):
    outdir = tmp_path / "run"
    poison_at(monkeypatch, 0, "loss")
    with pytest.raises(ValueError, match="training diverged at 8 images.*no checkpoint was written yet"):
        run(outdir)
    assert not outdir.exists()


# ----------------------------------------------------------------------------------------------------
# 3. A first start refused late (here: a damaged image, found when first read) leaves no folder behind.


def png(value: int, damaged: bool = False) -> bytes:
    """An 8x8 gray PNG; `damaged`: its header intact (the dataset opens) but its pixels zeroed (reading fails)."""
    buffer = io.BytesIO()
    Image.fromarray(np.full([8, 8], value, np.uint8)).save(buffer, format="PNG")
    data = buffer.getvalue()
    if damaged:
        at = data.index(b"IDAT") + 4
        size = int.from_bytes(data[at - 8:at - 4], "big")
        data = data[:at] + bytes(size) + data[at + size:]
    return data


def test_a_data_error_found_in_the_first_step_leaves_no_folder_and_the_fixed_run_starts(tmp_path):
    data = tmp_path / "images"
    data.mkdir()
    for i in range(16):
        (data / f"{i:02d}.png").write_bytes(png(16 * i, damaged=i == 5))
    outdir = tmp_path / "out" / "run"
    opts = dict(data=str(data), cond=False, workers=0, duration=16)
    with pytest.raises(ValueError, match="05.png"):
        run(outdir, **opts)
    assert not (tmp_path / "out").exists()  # the folders it made are gone too
    (data / "05.png").write_bytes(png(80))
    assert run(outdir, **opts)["status"] == "finished"


# ----------------------------------------------------------------------------------------------------
# 4. A resume with a shorter duration or other options: one line, and not a byte changed.


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    outdir = tmp_path_factory.mktemp("finished") / "run"
    run(outdir)
    return outdir


def test_a_shorter_duration_than_trained_is_refused_and_an_equal_one_finishes_at_once(finished_run):
    before = dir_state(finished_run)
    line = error_line(invoke(finished_run, "--duration", "16"))
    assert "the run already trained 32 images, more than --duration 16" in line and "--duration 32 or more" in line
    assert dir_state(finished_run) == before
    result = run(finished_run)  # the same duration: nothing left to train
    assert result["status"] == "finished" and result["steps"] == 0
    after = dir_state(finished_run)
    assert {k: v for k, v in after.items() if k != "log.txt"} == {k: v for k, v in before.items() if k != "log.txt"}


@pytest.mark.parametrize("extra, expected", [
    (["--lr", "0.02"], "differs in lr: lr 0.01 in the run, 0.02 now"),
    (["--seed", "7"], "differs in seed: seed 1 in the run, 7 now"),
    (["--channels", "32"], "network.model_channels 16 in the run, 32 now"),
    (["--uncond"], "network.label_dim 10 in the run, 0 now"),
    (["--P-std", "1.5"], "P_std 1.6 in the run, 1.5 now"),
])
def test_other_options_on_resume_are_named_with_both_values(finished_run, extra, expected):
    before = dir_state(finished_run)
    line = error_line(invoke(finished_run, *extra))
    assert expected in line and "use a new --outdir" in line and "--duration" in line, line
    assert dir_state(finished_run) == before


# ----------------------------------------------------------------------------------------------------
# 5. The records of a resumed run: stats.jsonl only grows, the provenance stays the first run's.


def test_a_resume_drops_the_stats_written_after_its_checkpoint_and_keeps_the_provenance(tmp_path, monkeypatch):
    outdir = tmp_path / "run"
    real = loop.train_step

    def crash(t, cur_nimg, batches):  # dies in the step after the report at 24 (checkpoint at 16)
        if cur_nimg == 24:
            raise RuntimeError("killed")
        return real(t, cur_nimg, batches)

    monkeypatch.setattr(loop, "train_step", crash)
    with pytest.raises(RuntimeError):
        run(outdir)
    assert stats_nimg(outdir) == [8, 16, 24]
    options = (outdir / "training_options.json").read_text()
    monkeypatch.undo()
    run(outdir)
    assert stats_nimg(outdir) == [8, 16, 24, 32]
    assert "resuming at 16 images" in (outdir / "log.txt").read_text()
    assert (outdir / "training_options.json").read_text() == options  # the same options: not rewritten
    run(outdir, duration=48)  # a longer run: the duration changes, the rest of the provenance stays the first's
    first, now = json.loads(options), json.loads((outdir / "training_options.json").read_text())
    assert now["duration"] == 48 and now["provenance"]["duration"] == {"value": 48, "source": "user"}
    assert {k: v for k, v in now["provenance"].items() if k != "duration"} == \
        {k: v for k, v in first["provenance"].items() if k != "duration"}
    assert first["provenance"]["decay"]["source"] == "derived"
    assert stats_nimg(outdir) == [8, 16, 24, 32, 40, 48]


# ----------------------------------------------------------------------------------------------------
# 6. A full disk: one line, no torn file or temporary, and the run resumes from its last good checkpoint.


def full_disk_at(monkeypatch, name: str) -> None:
    """Writing a file whose temporary starts with `.{name}` fills the disk: some bytes land, then ENOSPC."""
    real = files_base.save_file

    def save_file(tensors, filename, metadata=None):
        if Path(filename).name.startswith(f".{name}"):
            Path(filename).write_bytes(b"the first bytes of a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(files_base, "save_file", save_file)


def test_a_full_disk_at_a_checkpoint_keeps_the_last_good_one(tmp_path, monkeypatch):
    outdir = tmp_path / "run"
    full_disk_at(monkeypatch, "checkpoint-0000000032")
    line = error_line(invoke(outdir))
    assert "no space left on device" in line and "checkpoint-0000000016.safetensors" in line, line
    assert not list(outdir.glob(".*.tmp"))
    assert [read_metadata(p)["nimg"] for p in find_checkpoints(outdir)] == [16]
    load_tensors(find_checkpoints(outdir)[-1], kind="checkpoint")
    monkeypatch.undo()
    result = invoke(outdir)
    assert result.exit_code == 0, result.output
    assert "resuming at 16 images" in (outdir / "log.txt").read_text()
    assert stats_nimg(outdir) == [8, 16, 24, 32]


def test_a_full_disk_before_the_first_checkpoint_leaves_no_folder(tmp_path, monkeypatch):
    outdir = tmp_path / "run"
    full_disk_at(monkeypatch, "snapshot-0000000016")
    line = error_line(invoke(outdir))
    assert "no space left on device" in line and "starts afresh" in line, line
    assert not outdir.exists()
