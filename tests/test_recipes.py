"""Recipes that follow the run (issue 12): the schedule derived from the duration in the official proportions,
provenance in training_options.json, `--preset auto`, time budgets, and their bad input."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from edm2.options import TrainOptions, resolve_run
from edm2.recipes import RunCosts, choose_preset, derive_schedule, plan_duration

import edm2.ema.trackers
import edm2.training.budget
import edm2.training.loop
from edm2.cli import main
from edm2.cli.params import parse_budget
from edm2.data import ImageDataset
from edm2.networks import Precond
from edm2.presets import PRESETS
from edm2.training import train

Ki, Mi = 1 << 10, 1 << 20
# The official proportions, from the EDM2 reference runs (img512 XS/S/M: 2048 Mi images in batches of 2048,
# t_ref = 70000 batches, warm-up 10 million images): decay start 6.68 %, warm-up 0.466 % of the duration.
DECAY_SHARE = 70000 * 2048 / (2048 * Mi)
RAMPUP_SHARE = 10e6 / (2048 * Mi)


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def dir_state(path: Path) -> dict | None:
    if not path.exists():
        return None
    return {p.relative_to(path).as_posix(): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*"))}


def one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edm2: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def fake(resolution: int, channels: int, num_images: int = 4, classes: int = 10, latents: bool = False) -> ImageDataset:
    """A dataset description of the given shape (resolve_run reads only its shape, size and labels); `latents`:
    raw VAE latents (mean and std: 2 x `channels` float32 channels) instead of uint8 pixels."""
    n = max(num_images, 2)
    if latents:
        channels *= 2
    images = np.zeros([2, channels, resolution, resolution], np.float32 if latents else np.uint8)
    ds = ImageDataset(images, np.array([0, classes - 1]), name=f"fake{resolution}x{channels}")
    ds.images = np.broadcast_to(images[:1], [n, channels, resolution, resolution])  # len() == n without memory
    return ds


def npz(path: Path, resolution: int, channels: int, n: int = 40) -> Path:
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.integers(0, 256, [n, resolution, resolution, channels], dtype=np.uint8),
             y=np.arange(n) % 4)
    return path


# ----------------------------------------------------------------------------------------------------
# The schedule.


def test_derived_schedule_equals_the_official_proportions():
    assert DECAY_SHARE == pytest.approx(0.06676, abs=1e-5) and RAMPUP_SHARE == pytest.approx(0.004657, abs=1e-6)
    # At the reference length the rule gives back the published img512 values ...
    s = derive_schedule(2048 * Mi, 2048)
    assert s["decay"].value == 70000 and s["rampup"].value == 10_000_000
    # ... and at 1024 Mi the published t_ref of the img64 presets (35000 batches).
    assert derive_schedule(1024 * Mi, 2048)["decay"].value == 35000
    # The MNIST run: 54 Ki images in batches of 128.
    s = derive_schedule(54 * Ki, 128)
    assert s["decay"].value == pytest.approx(DECAY_SHARE * 54 * Ki / 128, rel=1e-5)  # 28.8 batches
    assert s["rampup"].value == round(RAMPUP_SHARE * 54 * Ki) == 257
    assert all(v.source == "derived" for v in s.values())
    for name, count in (("status", 64), ("snapshot", 32), ("checkpoint", 8)):
        assert s[name].value % 128 == 0 and abs(s[name].value - 54 * Ki / count) < 128


@pytest.mark.parametrize("name", sorted(n for n in PRESETS if n.startswith("edm2-")))
def test_official_presets_keep_their_published_values(name):
    preset = PRESETS[name]
    net = preset.network
    run = resolve_run(TrainOptions(outdir="x", data="fake", preset=name, device="cpu"),
                      fake(net.img_resolution, net.img_channels, classes=1000, latents=PRESETS[name].latents),
                      world=1)
    tr = preset.training
    assert (run.decay, run.rampup_Mimg, run.duration, run.batch, run.lr) == (tr.decay, 10, tr.duration, 2048, tr.lr)
    assert (run.P_mean, run.P_std, run.ema_stds) == (tr.P_mean, tr.P_std, (0.05, 0.10))
    assert (run.status, run.snapshot, run.checkpoint) == (128 * Ki, 8 * Mi, 128 * Mi)
    assert {run.provenance[k]["source"] for k in ("decay", "rampup", "duration", "ema_stds")} == {"preset"}


def test_cpu_presets_are_in_the_official_proportions():
    for name in ("cpu-gray28", "cpu-gray32", "cpu-rgb32", "cpu-rgb64"):
        tr = PRESETS[name].training
        s = derive_schedule(tr.duration, tr.batch_size)
        assert tr.decay == pytest.approx(s["decay"].value, rel=1e-5)
        assert round(tr.rampup_Mimg * 1e6) == s["rampup"].value
        assert (tr.status, tr.snapshot, tr.checkpoint, tr.ema_stds) == tuple(
            s[k].value for k in ("status", "snapshot", "checkpoint", "ema_stds"))


def test_a_duration_scales_the_schedule_and_user_values_win():
    ds = fake(32, 1)
    run = resolve_run(TrainOptions(outdir="x", data="fake", preset="cpu-gray32", duration=12 * Ki, device="cpu"),
                      ds, world=1)
    assert run.decay == pytest.approx(DECAY_SHARE * 12 * Ki / 32, rel=1e-5)
    assert run.rampup_Mimg * 1e6 == pytest.approx(round(RAMPUP_SHARE * 12 * Ki))
    assert run.provenance["decay"]["source"] == "derived" and run.provenance["duration"]["source"] == "user"
    run = resolve_run(TrainOptions(outdir="x", data="fake", preset="cpu-gray32", duration=12 * Ki, decay=30,
                                   rampup=1000, device="cpu"), ds, world=1)
    assert (run.decay, run.rampup_Mimg) == (30, 0.001)
    assert run.provenance["decay"]["source"] == run.provenance["rampup"]["source"] == "user"
    # A longer run reports and checkpoints no less often than its preset; its snapshots stay 32 per run. (An official
    # preset keeps its published schedule unless asked: --schedule follow.)
    run = resolve_run(TrainOptions(outdir="x", data="fake", preset="edm2-img64-s", duration=4 << 30, device="cpu",
                                   schedule="follow"), fake(64, 3, classes=1000), world=1)
    assert (run.status, run.checkpoint, run.snapshot) == (128 * Ki, 128 * Mi, (4 << 30) // 32)
    assert run.decay == pytest.approx(DECAY_SHARE * (4 << 30) / 2048) and run.rampup_Mimg == pytest.approx(20, 1e-3)
    # The preset's own duration keeps the preset's schedule.
    run = resolve_run(TrainOptions(outdir="x", data="fake", preset="cpu-tiny8", duration=64 * Ki, device="cpu"),
                      fake(8, 1), world=1)
    assert (run.decay, run.rampup_Mimg) == (1000, 0.01) and run.provenance["decay"]["source"] == "preset"


# ----------------------------------------------------------------------------------------------------
# --preset auto.

AUTO = [  # (resolution, channels, images, hardware) -> (preset, attention resolutions, dropout)
    ((8, 1, 1797, "cpu"), ("cpu-digits8", (4,), 0.10)),
    ((8, 3, 50000, "cpu"), ("cpu-digits8", (4,), 0.0)),
    ((16, 1, 60000, "cpu"), ("cpu-gray28", (), 0.0)),
    ((24, 3, 60000, "cpu"), ("cpu-gray28", (), 0.0)),
    ((28, 1, 60000, "cpu"), ("cpu-gray28", (), 0.0)),
    ((32, 1, 20000, "cpu"), ("cpu-gray32", (), 0.0)),
    ((48, 1, 20000, "cpu"), ("cpu-gray32", (), 0.0)),
    ((32, 3, 50000, "cpu"), ("cpu-rgb32", (), 0.0)),
    ((32, 3, 50000, "cuda"), ("cpu-rgb32", (), 0.0)),
    ((64, 3, 100000, "cpu"), ("cpu-rgb64", (), 0.0)),
    ((128, 1, 100000, "cpu"), ("cpu-rgb64", (), 0.0)),
    ((64, 3, 1281167, "cuda"), ("edm2-img64-xs", (16, 8), 0.0)),
    ((64, 4, 1281167, "cuda"), ("edm2-img512-xs", (16, 8), 0.0)),
]


@pytest.mark.parametrize("shape, expected", AUTO, ids=[f"{r}x{r}x{c}-{n}-{h}" for (r, c, n, h), _ in AUTO])
def test_preset_auto_table(shape, expected):
    resolution, channels, images, hardware = shape
    preset, reason = choose_preset(resolution, channels, images, hardware)
    name, attention, dropout = expected
    assert preset.name == name and name in reason and f"{resolution}x{resolution}x{channels}" in reason
    net = preset.network
    assert (net.img_resolution, net.img_channels, tuple(net.attn_resolutions), net.dropout) == (
        resolution, channels, attention, dropout)
    assert preset.training == PRESETS[name].training
    own = PRESETS[name].network
    if (resolution, channels) != (own.img_resolution, own.img_channels) and resolution <= 32:  # adapted: valid?
        x = torch.zeros([1, channels, resolution, resolution])
        out = Precond(**net.to_dict()).eval()(x, torch.ones([1]), torch.eye(10)[:1])
        assert out.shape == x.shape


@pytest.mark.parametrize("shape", [(30, 1), (200, 3), (4, 1), (32, 4), (64, 4), (12, 2)])
def test_preset_auto_refuses_data_no_row_fits(shape):
    with pytest.raises(ValueError, match=f"no network for {shape[0]}x{shape[0]}x{shape[1]}"):
        choose_preset(*shape, 1000, "cpu")


def test_cli_preset_auto_is_the_default_for_other_data_and_rampup_is_settable(tmp_path):
    result = invoke("train", "--outdir", tmp_path / "out", "--dry-run", "--data", npz(tmp_path / "d.npz", 32, 1),
                    "--duration", "8Ki", "--rampup", "2Ki", "--device", "cpu")
    assert result.exit_code == 0, result.output
    opts = json.loads(result.stdout)
    assert opts["preset"] == "cpu-gray32" and opts["provenance"]["preset"]["source"] == "auto"
    assert opts["rampup_Mimg"] == 2048 / 1e6 and opts["provenance"]["rampup"] == {"value": 2048, "source": "user"}
    assert opts["decay"] == pytest.approx(DECAY_SHARE * 8 * Ki / 32, rel=1e-5)
    assert not (tmp_path / "out").exists()


def test_cli_train_prints_each_derived_value_once_and_stores_provenance(tmp_path):
    result = invoke("train", "--outdir", tmp_path / "run", "--data", "digits", "--preset", "cpu-tiny8", "--duration",
                    "64", "--batch", "16", "--device", "cpu")
    assert result.exit_code == 0, result.output
    for name in ("decay", "rampup", "snapshot", "checkpoint", "status", "ema_stds"):
        assert result.output.count(f"recipe: {name} ") == 1, result.output
    opts = json.loads((tmp_path / "run" / "training_options.json").read_text())
    assert opts["provenance"]["duration"] == {"value": 64, "source": "user"}
    assert opts["provenance"]["decay"]["source"] == "derived" and "6.68 %" in opts["provenance"]["decay"]["rule"]
    assert opts["provenance"]["lr"] == {"value": 0.01, "source": "preset"}
    assert "recipe: decay" in (tmp_path / "run" / "log.txt").read_text()


# ----------------------------------------------------------------------------------------------------
# Time budgets.


def test_parse_budget():
    assert [parse_budget(t) for t in ("90s", "15min", "1.5h", "1h30min", "20", "2m30s")] == [
        90, 900, 5400, 5400, 20, 150]
    for bad in ("", "abc", "0s", "1h30", "-5s", "5 parsecs"):
        with pytest.raises(ValueError):
            parse_budget(bad)


def test_plan_pays_for_setup_and_writes_before_steps():
    # 100 s budget, 10 s gone, 5 % kept back: 85.5 s for setup (5 s), 10 snapshots of 1 s, 5 checkpoints of 2 s
    # and steps of 32 x 0.01 s = 0.32 s: (85.5 - 25) / 0.32 = 189.06, so 189 whole steps.
    costs = RunCosts(seconds_per_image=0.01, first_step=0.5, setup=5, snapshot=1, checkpoint=2)
    plan = plan_duration(100, "cpu", 10, costs, 32, lambda duration: (10, 5))
    assert (plan.duration, plan.overhead) == (189 * 32, 25)
    assert plan_duration(100, "cpu", 10, costs, 32).duration == int((85.5 - 5) / 0.32) * 32

    # Writes that grow with the run (a snapshot every 20 steps and at the end): the most steps that fit, found
    # by trying every count.
    def writes(duration):
        return duration // (20 * 32) + 1, 1

    def fits(n):
        return 5 + n * 0.32 + writes(n * 32)[0] * 1 + 2 <= 85.5
    best = max(n for n in range(1, 400) if fits(n))
    assert plan_duration(100, "cpu", 10, costs, 32, writes).duration == best * 32
    with pytest.raises(ValueError, match="too short"):
        plan_duration(30, "cpu", 10, costs, 32, lambda duration: (10, 5))


def burn_cpu(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def slowed(fn, seconds: float):
    def slow(*args, **kwargs):
        burn_cpu(seconds)
        return fn(*args, **kwargs)
    return slow


@pytest.mark.parametrize("write_cost", [0.0, 0.05])
def test_budget_run_ends_within_its_margin_and_resumes(tmp_path, monkeypatch, write_cost):
    # 6 s of single-thread CPU time on the minimal network: the whole call (loading, measuring, training,
    # snapshots and checkpoints) must end within -20 % / +15 % of the budget; also when every snapshot and
    # checkpoint costs 50 ms more (as on a slow file system: some 2 s in all, a third of the budget).
    if write_cost:
        monkeypatch.setattr(edm2.ema.trackers, "save_snapshot", slowed(edm2.ema.trackers.save_snapshot, write_cost))
        for module in (edm2.training.loop, edm2.training.budget):  # the run's writes and the measured ones
            monkeypatch.setattr(module, "save_training_state", slowed(module.save_training_state, write_cost))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        opts = TrainOptions(outdir=str(tmp_path / "run"), data="digits", preset="cpu-tiny8", budget=6.0,
                            budget_clock="cpu", device="cpu")
        start = time.process_time()
        result = train(opts, progress=False)
        used = time.process_time() - start
        assert result["status"] == "finished"
        run = json.loads((tmp_path / "run" / "training_options.json").read_text())
        assert 0.8 * 6 <= used <= 1.15 * 6, (used, result["steps"], run["budget"])
        assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # the timed writes left nothing behind
        plan = run["budget"]
        assert plan["seconds"] == 6 and plan["clock"] == "cpu"
        writes = 2 * (run["duration"] // run["snapshot"] + 1) + run["duration"] // run["checkpoint"] + 1
        assert plan["overhead"] > writes * write_cost  # two EMAs a snapshot, each interval and the end
        assert run["duration"] == plan["duration"] == result["nimg"]
        assert run["provenance"]["duration"]["source"] == "budget"
        assert run["decay"] == pytest.approx(DECAY_SHARE * run["duration"] / run["batch"], rel=1e-5)
        assert (tmp_path / "run" / f"snapshot-{run['duration']:010d}-0.100.safetensors").exists()
        # The same command again resumes the planned run (finished: no step, no new measurement).
        start = time.process_time()
        again = train(opts, progress=False)
        assert again["steps"] == 0 and again["nimg"] == result["nimg"] and time.process_time() - start < 5
        # Without --budget too: the planned duration stays.
        plain = train(TrainOptions(outdir=opts.outdir, data="digits", preset="cpu-tiny8", device="cpu"),
                      progress=False)
        assert plain["steps"] == 0 and plain["run"]["duration"] == result["nimg"]
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written.


def test_budget_too_short_for_one_step(tmp_path):
    result = invoke("train", "--outdir", tmp_path / "out", "--data", "digits", "--preset", "cpu-tiny8", "--budget",
                    "0.01s", "--budget-clock", "cpu", "--device", "cpu")
    one_line_error(result, "--budget", "too short")
    assert not (tmp_path / "out").exists()


def test_budget_and_duration_together(tmp_path):
    result = invoke("train", "--outdir", tmp_path / "out", "--budget", "1min", "--duration", "1Ki")
    one_line_error(result, "--duration or --budget")
    assert not (tmp_path / "out").exists()


def test_derived_warmup_longer_than_the_duration(tmp_path):
    outdir = tmp_path / "run"
    paused = train(TrainOptions(outdir=str(outdir), data="digits", preset="cpu-tiny8", duration=8 * Ki, batch=16,
                                device="cpu"), progress=False, max_steps=1)
    assert paused["status"] == "paused" and paused["run"]["provenance"]["rampup"]["value"] == 38
    before = dir_state(outdir)
    # Resumed with a shorter duration, the warm-up the run derived (38 images) no longer fits.
    result = invoke("train", "--outdir", outdir, "--data", "digits", "--preset", "cpu-tiny8", "--duration", "32",
                    "--batch", "16", "--device", "cpu")
    one_line_error(result, "warm-up (38 images, resumed) is longer than the run (32 images)")
    assert dir_state(outdir) == before


def test_preset_auto_on_data_no_row_fits(tmp_path):
    data = npz(tmp_path / "odd.npz", 30, 1)
    result = invoke("train", "--outdir", tmp_path / "out", "--data", data, "--device", "cpu")
    one_line_error(result, "--preset auto has no network for 30x30x1")
    assert not (tmp_path / "out").exists()
