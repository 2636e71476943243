"""The training loop: outputs, exact resume (pause, SIGTERM, SIGKILL, kill during a checkpoint write),
gradient accumulation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from edm2.checkpoint import find_checkpoints, load_snapshot, load_tensors, read_metadata

from edm2.training import TrainOptions, train

# 12 steps of 16 images on the minimal network; checkpoints every 2 steps.
BASE = dict(data="digits", preset="cpu-tiny8", batch=16, duration=16 * 12, status=16 * 4, snapshot=16 * 4,
            checkpoint=16 * 2, seed=3, device="cpu")


def final_state(outdir: Path) -> dict[str, torch.Tensor]:
    tensors, meta = load_tensors(find_checkpoints(outdir)[-1], kind="checkpoint")
    assert meta["nimg"] == BASE["duration"]
    return tensors


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    outdir = tmp_path_factory.mktemp("ref") / "run"
    result = train(TrainOptions(outdir=str(outdir), **BASE), progress=False)
    assert result["status"] == "finished" and result["nimg"] == BASE["duration"]
    return outdir


def test_outputs(reference_run: Path) -> None:
    run = json.loads((reference_run / "training_options.json").read_text())
    assert run["preset"] == "cpu-tiny8" and run["batch"] == 16 and run["network"]["label_dim"] == 10
    stats = [json.loads(line) for line in (reference_run / "stats.jsonl").read_text().splitlines()]
    assert [s["nimg"] for s in stats] == [64, 128, 192]
    assert all(s["loss"] == s["loss"] and s["lr"] > 0 for s in stats)  # finite, positive learning rate
    assert "finished at 192 images" in (reference_run / "log.txt").read_text()
    # Snapshots of both tracked EMAs at every snapshot interval, each rebuildable on its own.
    names = sorted(p.name for p in reference_run.glob("snapshot-*.safetensors"))
    assert names == [f"snapshot-{n:010d}-{s:.3f}.safetensors" for n in (64, 128, 192) for s in (0.05, 0.10)]
    snap = load_snapshot(reference_run / names[-1])
    assert snap.sigma_rel == 0.10 and snap.nimg == 192 and snap.info["dataset"]["name"] == "digits"
    net = snap.build()
    x = torch.randn(2, 1, 8, 8)
    assert net(x, torch.tensor([1.0, 2.0]), torch.eye(10)[:2]).shape == x.shape
    assert len(find_checkpoints(reference_run)) == 2  # the two newest are kept


def test_pause_and_resume_is_exact(reference_run: Path, tmp_path: Path) -> None:
    outdir = tmp_path / "run"
    first = train(TrainOptions(outdir=str(outdir), **BASE), progress=False, max_steps=5)
    assert first["status"] == "paused" and first["nimg"] == 80
    second = train(TrainOptions(outdir=str(outdir), **BASE), progress=False)
    assert second["status"] == "finished" and second["steps"] == 7
    assert_same_state(final_state(outdir), final_state(reference_run))
    # The EMA snapshots written after the resume equal those of the uninterrupted run too.
    for path in reference_run.glob("snapshot-*.safetensors"):
        assert_same_state(load_tensors(outdir / path.name)[0], load_tensors(path)[0])


def test_gradient_accumulation_matches_full_batch(reference_run: Path, tmp_path: Path) -> None:
    outdir = tmp_path / "accum"
    train(TrainOptions(outdir=str(outdir), **{**BASE, "batch_gpu": 4}), progress=False)
    a, b = final_state(outdir), final_state(reference_run)
    for k in a:
        if k.startswith("net/"):
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-4, msg=k)


def _spawn(outdir: Path, extra: str = "") -> subprocess.Popen:
    """Train in a child process (the same options as BASE), optionally patching something first.

    The child uses this process's number of threads: CPU reductions split their work by thread, so float
    results are bit-reproducible only for a fixed thread count (the exact-resume claim is per machine setup).
    """
    threads = torch.get_num_threads()
    code = textwrap.dedent(f"""
        import torch
        torch.set_num_threads({threads})
        {extra}
        from edm2.training import TrainOptions, train
        train(TrainOptions(outdir={str(outdir)!r}, **{BASE!r}), progress=False)
    """)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_for_checkpoint(outdir: Path, proc: subprocess.Popen, min_nimg: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        cps = find_checkpoints(outdir) if outdir.exists() else []
        if cps and read_metadata(cps[-1])["nimg"] >= min_nimg:
            return
        if proc.poll() is not None:
            raise AssertionError(f"child exited early: {proc.stderr.read().decode()}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("no checkpoint appeared in time")


def test_sigkill_then_rerun_matches_uninterrupted(reference_run: Path, tmp_path: Path) -> None:
    outdir = tmp_path / "killed"
    proc = _spawn(outdir)
    _wait_for_checkpoint(outdir, proc, min_nimg=64)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed_from = read_metadata(find_checkpoints(outdir)[-1])["nimg"]
    assert resumed_from < BASE["duration"]
    result = train(TrainOptions(outdir=str(outdir), **BASE), progress=False)
    assert result["status"] == "finished"
    assert_same_state(final_state(outdir), final_state(reference_run))


def test_sigterm_checkpoints_and_exits_cleanly(reference_run: Path, tmp_path: Path) -> None:
    outdir = tmp_path / "term"
    proc = _spawn(outdir)
    _wait_for_checkpoint(outdir, proc, min_nimg=32)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, proc.stderr.read().decode()
    log = (outdir / "log.txt").read_text()
    if "finished at" not in log:  # the signal may land after the last step on a fast machine
        assert "interrupted at" in log
        stopped = read_metadata(find_checkpoints(outdir)[-1])["nimg"]
        assert f"interrupted at {stopped} images" in log  # the checkpoint is written at the stop
    train(TrainOptions(outdir=str(outdir), **BASE), progress=False)
    assert_same_state(final_state(outdir), final_state(reference_run))


def test_kill_during_checkpoint_write_keeps_previous(reference_run: Path, tmp_path: Path) -> None:
    """The child dies (SIGKILL to itself) halfway through writing its third checkpoint."""
    outdir = tmp_path / "torn"
    patch = textwrap.dedent("""
        import os, signal
        import edm2.files.base as ck
        real = ck.save_file
        calls = []
        def torn(tensors, path, metadata=None):
            calls.append(path)
            if sum(os.path.basename(str(p)).startswith('.checkpoint') for p in calls) == 3:
                real(tensors, path, metadata=metadata)
                data = open(path, 'rb').read()
                open(path, 'wb').write(data[: len(data) // 2])
                os.kill(os.getpid(), signal.SIGKILL)
            return real(tensors, path, metadata=metadata)
        ck.save_file = torn
    """).replace("\n", "\n        ")
    proc = _spawn(outdir, extra=patch)
    proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert list(outdir.glob(".checkpoint-*.tmp")), "the torn write should have been left as a temp file"
    newest = find_checkpoints(outdir)[-1]
    assert read_metadata(newest)["nimg"] == 64  # the second checkpoint, intact
    load_tensors(newest, kind="checkpoint")
    train(TrainOptions(outdir=str(outdir), **BASE), progress=False)
    assert not list(outdir.glob(".*.tmp"))
    assert_same_state(final_state(outdir), final_state(reference_run))


def test_unconditional_run(tmp_path: Path) -> None:
    result = train(TrainOptions(outdir=str(tmp_path / "u"), **{**BASE, "cond": False, "duration": 32}),
                   progress=False)
    assert result["run"]["network"]["label_dim"] == 0


@pytest.mark.parametrize(
    "change, message",
    [
        ({"batch": 16, "batch_gpu": 5}, "multiple"),
        ({"duration": 0}, "--duration must be a positive"),
        ({"preset": "cpu-rgb32", "channel_mult": (1, 2, 2, 2, 2)}, "choose a preset that matches the data"),
        ({"preset": "nope"}, "unknown preset"),
        ({"lr": -1.0}, "must be positive"),
    ],
)
def test_bad_options_leave_no_trace(tmp_path: Path, change: dict, message: str) -> None:
    outdir = tmp_path / "bad"
    with pytest.raises(ValueError, match=message):
        train(TrainOptions(outdir=str(outdir), **{**BASE, **change}), progress=False)
    assert not outdir.exists()


def test_snapshots_record_the_encoder_and_reconstructions_keep_it(reference_run: Path, tmp_path: Path) -> None:
    from edm2.reconstruct import posthoc_reconstruct

    rgb = {"class": "StandardRGBEncoder", "kwargs": {}}
    assert load_snapshot(reference_run / "snapshot-0000000192-0.100.safetensors").encoder == rgb
    (result,) = posthoc_reconstruct(reference_run, tmp_path, [0.08])
    assert load_snapshot(result.path).encoder == rgb
