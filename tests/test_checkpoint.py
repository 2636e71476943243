"""The files of a run: safetensors + JSON metadata (no pickle), ValueError for damaged or foreign files, one
atomic writer behind every file, and the run-folder lock."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import edm2.files as checkpoint
import edm2.files.base as files_base
from edm2.files import (
    Snapshot,
    load_network,
    load_snapshot,
    load_tensors,
    read_metadata,
    save_snapshot,
    save_tensors,
)
from edm2.networks import Precond
from edm2.presets import NetworkConfig

SMALL = NetworkConfig(img_resolution=8, img_channels=1, label_dim=3, model_channels=16, channel_mult=(1, 2),
                      num_blocks=1, attn_resolutions=(4,), channels_per_head=16, use_fp16=False)
INFO = {"preset": "test", "dataset": {"name": "unit", "num_images": 3}}


@pytest.fixture(scope="module")
def small_net() -> Precond:
    torch.manual_seed(1)
    net = Precond(**SMALL.to_dict())
    with torch.no_grad():  # move the weights away from their initial values
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return net.eval().requires_grad_(False)


def write_snapshot(path, net: Precond, nimg: int = 4096, sigma_rel: float | None = 0.1) -> None:
    save_snapshot(path, Snapshot(net.state_dict(), SMALL, sigma_rel, nimg, INFO))


def outputs(net: Precond) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn([4, 1, 8, 8], generator=g)
    sigma = torch.tensor([0.01, 0.5, 2.0, 40.0])
    labels = torch.nn.functional.one_hot(torch.tensor([0, 2, 1, 2]), 3).float()
    with torch.no_grad():
        return net(x, sigma, labels)


def test_snapshot_round_trip_rebuilds_network(tmp_path, small_net):
    path = tmp_path / "snap.safetensors"
    write_snapshot(path, small_net)
    net, snap = load_network(path)
    assert isinstance(net, Precond) and not net.training
    assert snap.network == SMALL and snap.sigma_rel == 0.1 and snap.nimg == 4096 and snap.info == INFO
    assert set(snap.state_dict) == set(small_net.state_dict())
    for k, v in small_net.state_dict().items():
        assert torch.equal(snap.state_dict[k], v), k
    assert torch.equal(outputs(net), outputs(small_net))
    # load_snapshot + build gives the same network.
    assert torch.equal(outputs(load_snapshot(path).build()), outputs(small_net))


def test_raw_snapshot_has_no_sigma_rel(tmp_path, small_net):
    path = tmp_path / "raw.safetensors"
    write_snapshot(path, small_net, nimg=0, sigma_rel=None)
    snap = load_snapshot(path)
    assert snap.sigma_rel is None and snap.nimg == 0


def test_file_is_plain_safetensors_without_pickle(tmp_path, small_net):
    path = tmp_path / "snap.safetensors"
    write_snapshot(path, small_net)
    data = path.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])  # safetensors: u64 little-endian header size, then JSON
    assert 0 < header_len < len(data)
    header = json.loads(data[8:8 + header_len])
    meta = json.loads(header["__metadata__"]["edm2"])
    assert meta["format"] == "edm2" and meta["kind"] == "snapshot"
    assert meta["network"] == SMALL.to_dict() and meta["sigma_rel"] == 0.1 and meta["nimg"] == 4096
    assert not data.startswith(b"PK") and not data.startswith(b"\x80")  # no torch.save zip, no raw pickle
    assert b"\x80\x02" not in data[:8 + header_len] and b"cPickle" not in data
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == set(small_net.state_dict())
        assert torch.equal(f.get_tensor("logvar_linear.weight"), small_net.state_dict()["logvar_linear.weight"])
    assert read_metadata(path, kind="snapshot")["nimg"] == 4096


def test_truncated_file(tmp_path, small_net):
    path = tmp_path / "snap.safetensors"
    write_snapshot(path, small_net)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    for fn in (read_metadata, load_snapshot, load_network, load_tensors):
        with pytest.raises(ValueError, match="snap.safetensors"):
            fn(path)
    path.write_bytes(data[:5])  # not even a full header length
    with pytest.raises(ValueError, match="snap.safetensors"):
        load_network(path)


def test_foreign_random_bytes(tmp_path):
    path = tmp_path / "random.safetensors"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(ValueError, match="random.safetensors"):
        load_network(path)
    with pytest.raises(ValueError, match="random.safetensors"):
        read_metadata(path)


def test_foreign_safetensors_without_edm2_metadata(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(3)}, str(path))
    with pytest.raises(ValueError, match="without edm2 metadata"):
        load_network(path)
    save_file({"weight": torch.zeros(3)}, str(path), metadata={"author": "someone else"})
    with pytest.raises(ValueError, match="without edm2 metadata"):
        read_metadata(path)


@pytest.mark.parametrize("raw", ["{not json", "[1, 2]", "7"])
def test_damaged_edm2_metadata(tmp_path, raw):
    path = tmp_path / "odd.safetensors"
    save_file({"weight": torch.zeros(3)}, str(path), metadata={"edm2": raw})
    with pytest.raises(ValueError, match="odd.safetensors"):
        load_snapshot(path)


def test_snapshot_metadata_without_network(tmp_path):
    path = tmp_path / "nonet.safetensors"
    save_tensors(path, {"weight": torch.zeros(3)}, {"kind": "snapshot"})
    with pytest.raises(ValueError, match="network config"):
        load_snapshot(path)


def test_kind_mismatch(tmp_path, small_net):
    ckpt = tmp_path / "ckpt.safetensors"
    save_tensors(ckpt, {"net/w": torch.ones(2)}, {"kind": "checkpoint", "nimg": 64})
    assert read_metadata(ckpt)["kind"] == "checkpoint"
    assert read_metadata(ckpt, kind="checkpoint")["nimg"] == 64
    with pytest.raises(ValueError, match="expected a 'snapshot'"):
        read_metadata(ckpt, kind="snapshot")
    with pytest.raises(ValueError, match="ckpt.safetensors"):
        load_network(ckpt)
    snap = tmp_path / "snap.safetensors"
    write_snapshot(snap, small_net)
    with pytest.raises(ValueError, match="expected a 'checkpoint'"):
        load_tensors(snap, kind="checkpoint")


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        load_network(tmp_path / "absent.safetensors")


def test_weights_that_do_not_fit_the_config(tmp_path, small_net):
    path = tmp_path / "misfit.safetensors"
    state = dict(small_net.state_dict())
    state.pop("logvar_linear.weight")
    save_snapshot(path, Snapshot(state, SMALL, 0.1, 0, {}))
    with pytest.raises(ValueError, match="misfit.safetensors.*do not fit"):
        load_network(path)


def test_tensors_round_trip_with_shared_storage(tmp_path):
    base = torch.arange(10, dtype=torch.float32)
    tensors = {"a": base, "view": base[2:5], "int": torch.tensor([1, 2], dtype=torch.int64)}
    save_tensors(tmp_path / "t.safetensors", tensors, {"kind": "test", "extra": [1, 2]})
    back, meta = load_tensors(tmp_path / "t.safetensors", kind="test")
    assert meta["extra"] == [1, 2] and meta["version"] == checkpoint.VERSION
    assert all(torch.equal(back[k], v) for k, v in tensors.items())


def test_atomic_write_keeps_old_file_on_failure(tmp_path, small_net, monkeypatch):
    path = tmp_path / "snap.safetensors"
    write_snapshot(path, small_net, nimg=1)
    before = path.read_bytes()

    def broken_save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial bytes of a big file")
        raise OSError("disk full")

    monkeypatch.setattr(files_base, "save_file", broken_save_file)
    with pytest.raises(OSError, match="disk full"):
        write_snapshot(path, small_net, nimg=2)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["snap.safetensors"]
    with pytest.raises(OSError):  # a new file is not created at all
        write_snapshot(tmp_path / "new.safetensors", small_net)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["snap.safetensors"]
    monkeypatch.undo()
    assert load_snapshot(path).nimg == 1


def test_atomic_write_text(tmp_path, monkeypatch):
    path = tmp_path / "options.json"
    checkpoint.atomic_write_text(path, "old\n")
    checkpoint.atomic_write_text(path, "new\n")
    assert path.read_text() == "new\n"

    def failing_fsync(fd):
        raise OSError("io error")

    monkeypatch.setattr(files_base.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="io error"):
        checkpoint.atomic_write_text(path, "newer\n")
    assert path.read_text() == "new\n"
    assert [p.name for p in tmp_path.iterdir()] == ["options.json"]


# ----------------------------------------------------------------------------------------------------
# Every writer goes through the one atomic helper: a write that dies midway leaves the old file intact.


def _write_json(path):
    checkpoint.atomic_write_text(path, json.dumps({"v": path.stat().st_size if path.exists() else 0}))


def _write_png(path):
    from edm2.generate import save_png

    save_png(path, torch.rand(3, 4, 4) * 2 - 1)


def _write_plot(path):
    from edm2.sweep import plot_sweep

    rows = [{"sigma_rel": s, "fd": 1 + (s - 0.1) ** 2} for s in (0.05, 0.1, 0.15)]
    plot_sweep(rows, path, "fd", "test plot")


def _write_tensors(path):
    save_tensors(path, {"w": torch.randn(3)}, {"kind": "test"})


WRITERS = {"json": (_write_json, "a.json"), "png": (_write_png, "a.png"), "plot": (_write_plot, "a.png"),
           "tensors": (_write_tensors, "a.safetensors")}


@pytest.mark.parametrize("writer", WRITERS)
def test_every_writer_is_atomic(writer, tmp_path, monkeypatch):
    write, name = WRITERS[writer]
    path = tmp_path / name
    write(path)
    before = path.read_bytes()

    def failing_fsync(fd):  # the file is complete but not yet renamed into place: as a crash at that moment
        raise OSError("killed while writing")

    monkeypatch.setattr(files_base.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="killed while writing"):
        write(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [name]  # and no temporary left behind


def test_writers_use_no_other_way_to_the_disk():
    """Only files/base.py renames files into place or makes temporaries, so no writer can bypass it."""
    src = Path(files_base.__file__).parent.parent
    for path in src.rglob("*.py"):
        if path == Path(files_base.__file__):
            continue
        text = path.read_text()
        for pattern in ("os.replace(", "os.rename(", "tempfile.", ".replace(path", "mkstemp"):
            assert pattern not in text, f"{path.relative_to(src)} writes files around atomic_output: {pattern}"


def test_a_killed_write_leaves_the_old_file_and_a_temporary_that_the_cleanup_removes(tmp_path):
    path = tmp_path / "state.json"
    checkpoint.atomic_write_text(path, "old\n")
    code = textwrap.dedent(f"""
        import os, signal
        from edm2.checkpoint import atomic_output
        with atomic_output({str(path)!r}) as tmp:
            tmp.write_text("half of the new")
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    assert path.read_text() == "old\n"
    stale = [p.name for p in tmp_path.iterdir() if p.name != "state.json"]
    assert len(stale) == 1 and stale[0].startswith(".state.json.") and stale[0].endswith(".tmp")
    assert [p.name for p in checkpoint.remove_stale_temps(tmp_path)] == stale
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


# ----------------------------------------------------------------------------------------------------
# The run-folder lock.

TRAIN = ["train", "--data", "digits", "--preset", "cpu-tiny8", "--batch", "16", "--status", "64", "--snapshot",
         "1Ki", "--checkpoint", "32", "--device", "cpu", "--duration", "4Ki"]


def _start_training(outdir: Path) -> subprocess.Popen:
    threads = torch.get_num_threads()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    return subprocess.Popen([sys.executable, "-m", "edm2.cli", *TRAIN, "--outdir", str(outdir)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_for(condition, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"training exited early: {proc.stderr.read().decode()}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.05)


def test_second_trainer_on_a_live_run_is_refused_and_a_killed_one_does_not_block(tmp_path):
    from click.testing import CliRunner

    from edm2.cli import main

    outdir = tmp_path / "run"
    proc = _start_training(outdir)
    try:
        _wait_for(lambda: bool(checkpoint.find_checkpoints(outdir)), proc)
        lock = outdir / checkpoint.LOCK_FILE
        assert f"pid {proc.pid} " in lock.read_text()
        before = {p.name for p in outdir.iterdir()}
        result = CliRunner().invoke(main, [*TRAIN, "--outdir", str(outdir)])
        assert result.exit_code == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("edm2: error:"), result.stderr
        assert str(outdir) in lines[0] and f"pid {proc.pid}" in lines[0] and "another process" in lines[0]
        assert proc.poll() is None  # the first one trains on
        assert {p.name for p in outdir.iterdir()} - before <= {p.name for p in checkpoint.find_checkpoints(outdir)} \
            | {p.name for p in outdir.glob("snapshot-*")} | {p.name for p in outdir.glob(".*.tmp")}
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert (outdir / checkpoint.LOCK_FILE).exists()  # left behind by the killed process, but no longer held
    result = CliRunner().invoke(main, [*TRAIN, "--outdir", str(outdir)])
    assert result.exit_code == 0, result.output
    assert "finished at 4096 images" in result.stdout
    assert not (outdir / checkpoint.LOCK_FILE).exists()  # released and removed at the end
    assert "resuming at" in (outdir / "log.txt").read_text()


def test_lock_in_process(tmp_path):
    with checkpoint.RunLock(tmp_path) as held:
        assert f"pid {os.getpid()} " in held.owner()
        code = f"from edm2.checkpoint import RunLock\nRunLock({str(tmp_path)!r}).acquire()"
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert proc.returncode != 0 and f"being trained by another process (pid {os.getpid()} " in proc.stderr
    assert list(tmp_path.iterdir()) == []
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_scratch_folder_lives_beside_the_target_and_goes_away_even_on_error(tmp_path):
    target = tmp_path / "not" / "yet" / "run"  # its nearest existing parent is tmp_path
    with checkpoint.scratch_folder(target) as folder:
        assert folder.parent == tmp_path and folder.is_dir()
        (folder / "file").write_text("x")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError):
        with checkpoint.scratch_folder(target) as folder:
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_a_run_of_an_earlier_release_resumes_with_the_values_it_implied(tmp_path):
    from edm2.files import OPTIONS_FILE, check_run_folder

    identity = {"preset": "cpu-tiny8", "seed": 0, "loss_scaling": 1.0, "snapshot_dtype": "float32"}
    added = {"loss_scaling": 1.0, "snapshot_dtype": "float32"}
    (tmp_path / OPTIONS_FILE).write_text(json.dumps({"preset": "cpu-tiny8", "seed": 0}))  # written before both keys
    assert check_run_folder(tmp_path, identity, added) is True
    with pytest.raises(ValueError, match="differs in loss_scaling, snapshot_dtype"):
        check_run_folder(tmp_path, identity)  # without the implied values the keys are missing: another run
    with pytest.raises(ValueError, match="differs in snapshot_dtype"):
        check_run_folder(tmp_path, {**identity, "snapshot_dtype": "float16"}, added)
