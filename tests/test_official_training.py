"""The paper's workflow at the paper's scale, as the official code runs it: official presets keep their published
schedule whatever the duration; fp16 trains with a constant loss scale, non-finite gradients replaced and every
step taken; official EDM2 snapshots hold float16; the network is built at the data's resolution and channels;
the official command lines of train_edm2.py and EDM's train.py read as our spellings."""

from __future__ import annotations

import dataclasses
import json
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from edm2.cli import main
from edm2.cli import train as cli_train
from edm2.complexity import count_complexity
from edm2.data import ImageDataset, open_dataset
from edm2.ema.trackers import PosthocEMA
from edm2.files import find_checkpoints, load_tensors
from edm2.networks import build_network
from edm2.presets import PRESETS, Preset, get_preset
from edm2.training import TrainOptions, resolve_run, setup, step, train, train_step
from edm2.training.recipes import BudgetPlan

Ki, Mi = 1 << 10, 1 << 20


def invoke(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edm2: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def fake(resolution: int, channels: int, classes: int = 10, latents: bool = False, n: int = 4) -> ImageDataset:
    """A dataset of this shape (resolve_run reads only its shape, size and labels); `latents`: raw VAE latents
    (mean and std: 2 x `channels` float32 channels)."""
    channels = 2 * channels if latents else channels
    images = np.zeros([2, channels, resolution, resolution], np.float32 if latents else np.uint8)
    ds = ImageDataset(images, np.array([0, classes - 1]), name=f"fake{resolution}x{channels}")
    ds.images = np.broadcast_to(images[:1], [n, channels, resolution, resolution])
    return ds


def data_for(name: str) -> ImageDataset:
    """Data of the shape the preset was published for (ImageNet: 1000 classes)."""
    p = PRESETS[name]
    return fake(p.network.img_resolution, p.network.img_channels, 1000 if name.startswith("edm2-") else 10,
                p.latents)


# ----------------------------------------------------------------------------------------------------
# 1. The official presets keep their published schedule whatever --duration.

# From the official code. train_edm2.py: decay (t_ref) 70000 batches for img512, 35000 for img64;
# learning_rate_schedule's warm-up rampup_Mimg=10 (train_edm2.py does not set it); --status 128Ki,
# --snapshot 8Mi, --checkpoint 128Mi. EDM's train.py / training_loop: lr_rampup_kimg=10000, no decay,
# --tick 50 kimg (ImageNet: 200), --snap 50 ticks, --dump 500 ticks.
EDM2_OFFICIAL = {"img512": 70000, "img64": 35000}


def official_schedule(name: str) -> tuple[float, float, int, int, int]:
    """(decay in batches, warm-up in Mimg, status, snapshot, checkpoint in images) of the official code."""
    if name.startswith("edm2-"):
        return EDM2_OFFICIAL[name.split("-")[1]], 10, 128 * Ki, 8 * Mi, 128 * Mi
    tick = (200 if name == "edm-imagenet64-adm" else 50) * 1000
    return 0, 10, tick, 50 * tick, 500 * tick


OFFICIAL = sorted(n for n in PRESETS if n.startswith(("edm2-", "edm-")))


def test_the_official_presets_are_the_twelve_and_the_edm_release():
    assert len([n for n in OFFICIAL if n.startswith("edm2-")]) == 12 and len(OFFICIAL) == 31
    assert all(PRESETS[n].official for n in OFFICIAL) and not any(p.official for n, p in PRESETS.items()
                                                                  if n.startswith("cpu-"))


@pytest.mark.parametrize("name", OFFICIAL)
@pytest.mark.parametrize("duration", [64 * Mi, 4 << 30])
def test_official_presets_keep_their_schedule_under_another_duration(name, duration):
    run = resolve_run(TrainOptions(outdir="x", preset=name, duration=duration, device="cpu"), data_for(name), world=1)
    assert run.duration == duration != PRESETS[name].training.duration
    assert (run.decay, run.rampup_Mimg, run.status, run.snapshot, run.checkpoint) == official_schedule(name)
    assert run.provenance["schedule"]["value"] == "preset" and run.provenance["schedule"]["source"] == "preset"
    assert "official" in run.provenance["schedule"]["rule"]
    assert {run.provenance[k]["source"] for k in ("decay", "rampup", "status", "snapshot", "checkpoint")} == {"preset"}


def test_the_schedule_follows_the_run_when_asked_or_with_a_budget():
    data = data_for("edm2-img64-xs")
    follow = resolve_run(TrainOptions(outdir="x", preset="edm2-img64-xs", duration=64 * Mi, device="cpu",
                                      schedule="follow"), data, world=1)
    assert follow.provenance["schedule"] == {"value": "follow", "source": "user"}
    assert follow.provenance["decay"]["source"] == "derived" and follow.snapshot == 2 * Mi  # duration / 32
    plan = BudgetPlan(seconds=3600, clock="wall", seconds_per_image=1e-4, elapsed=0, duration=64 * Mi)
    budget = resolve_run(TrainOptions(outdir="x", preset="edm2-img64-xs", budget=3600, device="cpu"), data, world=1,
                         plan=plan)
    assert budget.provenance["schedule"]["value"] == "follow" and budget.provenance["schedule"]["source"] == "budget"
    assert (budget.decay, budget.snapshot) == (follow.decay, follow.snapshot)
    # An EDM preset asked to follow: its intervals follow, its recipe (warm-up, no decay, its EMA) stays.
    edm = resolve_run(TrainOptions(outdir="x", preset="edm-cifar10-ddpmpp-edm", duration=64 * Mi, device="cpu",
                                   schedule="follow"), data_for("edm-cifar10-ddpmpp-edm"), world=1)
    assert (edm.decay, edm.rampup_Mimg, edm.snapshot) == (0, 10, 2 * Mi)
    # The CPU presets follow by default and keep theirs when asked.
    cpu = dict(outdir="x", preset="cpu-gray32", duration=12 * Ki, device="cpu")
    assert resolve_run(TrainOptions(**cpu), fake(32, 1), world=1).provenance["decay"]["source"] == "derived"
    kept = resolve_run(TrainOptions(**cpu, schedule="preset"), fake(32, 1), world=1)
    assert kept.decay == PRESETS["cpu-gray32"].training.decay and kept.provenance["schedule"]["source"] == "user"


def test_bad_schedule_rule_is_one_line(tmp_path):
    one_line_error(invoke("train", "--outdir", tmp_path / "r", "--schedule", "scaled"), "--schedule")
    assert not (tmp_path / "r").exists()


# ----------------------------------------------------------------------------------------------------
# 2. float16 training as the official code: a constant loss scale, non-finite gradients replaced, every step.


def _params(grads: list[torch.Tensor]) -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(g.shape)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    return params


BAD_GRADS = [torch.tensor([1.0, float("nan"), float("inf"), -2.0]), torch.tensor([[float("-inf"), 3.0]])]


@pytest.mark.parametrize("inf, betas", [(step.NONFINITE_EDM2, (0.9, 0.99)), (step.NONFINITE_EDM, (0.9, 0.999))])
def test_the_optimizer_step_is_the_official_one(inf, betas):
    # The reference, written from the official loops: EDM2's nan_to_num(nan=0, posinf=0, neginf=0), EDM's
    # nan_to_num(nan=0, posinf=1e5, neginf=-1e5), then Adam steps (no skipping, no unscaling).
    ref = _params(BAD_GRADS)
    for p in ref:
        torch.nan_to_num(p.grad, nan=0, posinf=inf, neginf=-inf, out=p.grad)
    torch.optim.Adam(ref, lr=0.01, betas=betas, eps=1e-8).step()
    ours = _params(BAD_GRADS)
    opt = step.make_adam(ours, lr=0.01, betas=betas)
    step.optimizer_step(opt, ours, torch.amp.GradScaler("cpu", enabled=False), inf)
    for a, b in zip(ours, ref):
        assert torch.equal(a.detach(), b.detach())
    assert all(torch.isfinite(p.grad).all() for p in ours)
    assert inf == 0 or ours[0].grad[2] == 1e5 and ours[1].grad[0, 0] == -1e5


def test_dynamic_loss_scaling_skips_an_overflowing_step():
    ours = _params(BAD_GRADS)
    before = [p.detach().clone() for p in ours]
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0, enabled=True)
    scaler.scale(torch.ones([]))  # the loss went through the scaler
    step.optimizer_step(step.make_adam(ours, lr=0.01), ours, scaler)
    assert all(torch.equal(a.detach(), b) for a, b in zip(ours, before)) and scaler.get_scale() == 0.5


def _first_gradients(monkeypatch, ls: float | None, preset: str = "cpu-tiny8") -> list[torch.Tensor]:
    """The gradients the optimizer receives in the first step of a run with loss scaling `ls`."""
    data = open_dataset("digits")
    run = resolve_run(TrainOptions(outdir="x", preset=preset, device="cpu", ls=ls, batch=16), data, world=1)
    t = setup(run, data, torch.device("cpu"))
    seen = []
    monkeypatch.setattr(step, "optimizer_step", lambda opt, params, scaler, inf: seen.append(
        [p.grad.clone() for p in params]))
    train_step(t, 0, t.data.micro_batches(0))
    return seen[0]


def test_the_loss_scale_stays_in_the_gradients_as_in_the_official_loop(monkeypatch):
    # loss.sum().mul(loss_scaling / batch_gpu_total).backward(), gradients not divided back.
    plain, scaled = _first_gradients(monkeypatch, None), _first_gradients(monkeypatch, 8.0)
    for a, b in zip(plain, scaled):
        torch.testing.assert_close(b, 8 * a, rtol=1e-5, atol=1e-12)


def _fp16_run(monkeypatch, outdir: Path, **extra) -> tuple[dict, list[tuple[int, dict[str, torch.Tensor]]]]:
    """A short fp16 run of 3 steps on the CPU (the CUDA-only check lifted) with an Inf injected into one gradient
    of each step; returns the run and the kept checkpoints (images seen, tensors)."""
    import edm2.runtime

    monkeypatch.setattr(edm2.runtime, "resolve_precision", lambda precision, device, use_fp16=False: precision)
    hooked = {}
    real_setup = step.setup

    def setup_with_overflow(*args, **kwargs):
        t = real_setup(*args, **kwargs)
        weight = t.net.unet.out_conv.weight  # every step's gradient of this weight overflows
        hooked["hook"] = weight.register_hook(lambda g: torch.full_like(g, float("inf")))
        return t

    import edm2.training.loop

    monkeypatch.setattr(edm2.training.loop, "setup", setup_with_overflow)
    opts = TrainOptions(outdir=str(outdir), data="digits", preset="cpu-tiny8", batch=16, duration=48, checkpoint=16,
                        status=16, snapshot=48, device="cpu", precision="fp16", **extra)
    result = train(opts, progress=False)
    files = [load_tensors(p, kind="checkpoint") for p in find_checkpoints(outdir)]
    return result["run"], [(meta["nimg"], tensors) for tensors, meta in files]


def _largest_change(a: tuple[int, dict], b: tuple[int, dict]) -> float:
    """The largest change of a weight between two checkpoints."""
    return max((a[1][k] - b[1][k]).abs().max().item() for k in a[1] if k.startswith("net/") and k.endswith("weight"))


def test_fp16_run_takes_every_step_with_a_constant_scale(monkeypatch, tmp_path):
    run, states = _fp16_run(monkeypatch, tmp_path / "fixed", ls=4.0)
    assert run["precision"] == "fp16" and run["loss_scaling"] == 4 and not run["dynamic_loss_scaling"]
    assert len(states) >= 2 and all(float(s["scaler/scale"]) == 4.0 for _, s in states)  # the constant scale
    assert all(int(s["adam/0/step"]) == nimg // 16 for nimg, s in states)  # every step taken, overflow or not
    assert _largest_change(*states[-2:]) > 1e-5  # the weights moved


def test_fp16_dynamic_loss_scaling_is_behind_its_option(monkeypatch, tmp_path):
    run, states = _fp16_run(monkeypatch, tmp_path / "dynamic", dynamic_ls=True)
    assert run["dynamic_loss_scaling"] and len(states) >= 2
    assert all(float(s["scaler/scale"]) == 0.5 ** (nimg // 16) for nimg, s in states)  # halved at every overflow
    # Every step skipped: Adam counts none and the weights stay (up to the forced weight normalization's rounding).
    assert all(int(s.get("adam/0/step", 0)) == 0 for _, s in states) and _largest_change(*states[-2:]) < 1e-6


@pytest.mark.parametrize("value", ["0", "-1"])
def test_bad_loss_scale_is_one_line(tmp_path, value):
    result = invoke("train", "--outdir", tmp_path / "r", "--preset", "cpu-tiny8", "--device", "cpu", "--ls", value)
    one_line_error(result, "--ls")
    assert not (tmp_path / "r").exists()


def test_loss_scale_defaults_per_preset():
    assert all(PRESETS[n].training.loss_scaling == 1 for n in PRESETS if n != "edm-imagenet64-adm")
    run = resolve_run(TrainOptions(outdir="x", preset="edm-imagenet64-adm", device="cpu"),
                      data_for("edm-imagenet64-adm"), world=1)
    assert run.loss_scaling == run.edm.loss_scaling == 100
    run = resolve_run(TrainOptions(outdir="x", preset="edm-imagenet64-adm", device="cpu", ls=10),
                      data_for("edm-imagenet64-adm"), world=1)
    assert run.loss_scaling == run.edm.loss_scaling == 10 and run.provenance["loss_scaling"]["source"] == "user"


# ----------------------------------------------------------------------------------------------------
# 3. EMA snapshots in float16 for the official EDM2 presets.


def test_snapshot_dtype_per_preset():
    for name in OFFICIAL + ["cpu-tiny8", "cpu-edm-tiny8"]:
        run = resolve_run(TrainOptions(outdir="x", preset=name, device="cpu"), data_for(name) if name in OFFICIAL
                          else open_dataset("digits"), world=1)
        assert run.snapshot_dtype == ("float16" if name.startswith("edm2-") else "float32"), name


def _snapshot_dtypes(outdir: Path) -> set[torch.dtype]:
    dtypes = set()
    for path in outdir.glob("snapshot-*.safetensors"):
        tensors, _ = load_tensors(path, kind="snapshot")
        dtypes |= {v.dtype for v in tensors.values() if v.is_floating_point()}
    return dtypes


def test_an_official_style_run_writes_float16_snapshots_and_float32_averages(tmp_path):
    tiny = get_preset("cpu-tiny8")
    official = dataclasses.replace(tiny, name="tiny-official",
                                   training=dataclasses.replace(tiny.training, snapshot_dtype="float16"))
    base = dict(data="digits", batch=16, duration=32, snapshot=16, checkpoint=32, device="cpu")
    train(TrainOptions(outdir=str(tmp_path / "f16"), preset=official, **base), progress=False)
    assert _snapshot_dtypes(tmp_path / "f16") == {torch.float16}
    state, meta = load_tensors(find_checkpoints(tmp_path / "f16")[-1], kind="checkpoint")
    assert meta["run"]["snapshot_dtype"] == "float16"
    assert {v.dtype for k, v in state.items() if k.startswith("ema/") and v.is_floating_point()} == {torch.float32}
    train(TrainOptions(outdir=str(tmp_path / "f32"), preset="cpu-tiny8", **base), progress=False)
    assert _snapshot_dtypes(tmp_path / "f32") == {torch.float32}
    # The EDM recipe's traditional EMA too, when asked.
    train(TrainOptions(outdir=str(tmp_path / "edm"), preset="cpu-edm-tiny8", snapshot_dtype="float16", **base),
          progress=False)
    assert _snapshot_dtypes(tmp_path / "edm") == {torch.float16}
    assert sorted(p.name for p in (tmp_path / "edm").glob("*-ema.safetensors"))


def test_posthoc_ema_casts_only_the_files(tmp_path):
    net = torch.nn.Linear(3, 2)
    ema = PosthocEMA(net, tmp_path, (0.05,), snapshot_dtype=torch.float16)
    ema.update(10)
    (path,) = ema.save_snapshots()
    tensors, _ = load_tensors(path, kind="snapshot")
    assert {v.dtype for v in tensors.values()} == {torch.float16}
    assert all(v.dtype == torch.float32 for v in ema.state_dict().values() if v.is_floating_point())
    with pytest.raises(ValueError, match="snapshot_dtype"):
        PosthocEMA(net, tmp_path, (0.05,), snapshot_dtype=torch.bfloat16)


def test_bad_snapshot_dtype_is_one_line(tmp_path):
    one_line_error(invoke("train", "--outdir", tmp_path / "r", "--snapshot-dtype", "bfloat16"), "--snapshot-dtype")
    assert not (tmp_path / "r").exists()
    with pytest.raises(ValueError, match="--snapshot-dtype"):  # from Python, before any file is written
        train(TrainOptions(outdir=str(tmp_path / "p"), preset="cpu-tiny8", device="cpu", snapshot_dtype="bfloat16"))
    assert not (tmp_path / "p").exists()


# ----------------------------------------------------------------------------------------------------
# 4. The network is built at the data's resolution and channels, for every preset.


def test_official_networks_build_at_the_data_resolution():
    pixels = resolve_run(TrainOptions(outdir="x", preset="edm2-img64-xs", device="cpu"), fake(32, 3, 1000), world=1)
    latents = resolve_run(TrainOptions(outdir="x", preset="edm2-img512-xs", device="cpu"),
                          fake(32, 4, 1000, latents=True), world=1)  # ImageNet-256 latents
    for run, channels, name in ((pixels, 3, "edm2-img64-xs"), (latents, 4, "edm2-img512-xs")):
        net = run.network
        assert (net.img_resolution, net.img_channels, net.label_dim) == (32, channels, 1000)
        assert net.replace(img_resolution=64) == PRESETS[name].network  # nothing else changed
        at32, at64 = count_complexity(net), count_complexity(PRESETS[name].network)
        with torch.device("meta"):
            assert at32.parameters == sum(p.numel() for p in build_network(net).parameters())
        assert at32.parameters != at64.parameters  # attention at 16x16 and 8x8 sits on other levels
        assert 0.2 < at32.gflops / at64.gflops < 0.3  # about a quarter of the pixels
    edm = resolve_run(TrainOptions(outdir="x", preset="edm-cifar10-ddpmpp-edm", device="cpu"), fake(64, 3), world=1)
    assert edm.network.img_resolution == 64 and count_complexity(edm.network).parameters > 0
    cpu = resolve_run(TrainOptions(outdir="x", preset="cpu-rgb32", device="cpu"), open_dataset("digits"), world=1)
    assert (cpu.network.img_resolution, cpu.network.img_channels) == (8, 1)


def test_what_cannot_work_is_still_refused():
    with pytest.raises(ValueError, match="halves the resolution 3 times, so it needs a multiple of 8"):
        resolve_run(TrainOptions(outdir="x", preset="edm2-img64-xs", device="cpu"), fake(36, 3, 1000), world=1)
    with pytest.raises(ValueError, match="holds VAE latents but preset edm2-img64-xs trains on pixels"):
        resolve_run(TrainOptions(outdir="x", preset="edm2-img64-xs", device="cpu"), fake(32, 4, latents=True), world=1)
    with pytest.raises(ValueError, match="trains on VAE latents"):
        resolve_run(TrainOptions(outdir="x", preset="edm2-img512-xs", device="cpu"), fake(32, 3), world=1)


def test_info_and_dry_run_count_at_the_data_resolution(tmp_path):
    out = invoke("info", "--preset", "edm2-img512-xs", "--resolution", "32", "--channels", "4")
    assert out.exit_code == 0, out.output
    c = count_complexity(PRESETS["edm2-img512-xs"].network.replace(img_resolution=32))
    assert "built for         32x32x4" in out.output and f"GFLOPs/eval       {c.gflops:.2f}" in out.output
    one_line_error(invoke("info", "--preset", "edm2-img64-xs", "--resolution", "20"), "multiple of 8")
    np.savez(tmp_path / "d.npz", x=np.zeros([8, 32, 32, 3], np.uint8), y=np.arange(8) % 4)
    dry = invoke("train", "--outdir", tmp_path / "r", "--data", tmp_path / "d.npz", "--preset", "edm2-img64-xs",
                 "--device", "cpu", "-n")
    assert dry.exit_code == 0, dry.output
    printed = json.loads(dry.stdout)
    c = count_complexity(PRESETS["edm2-img64-xs"].network.replace(img_resolution=32, label_dim=4))
    assert printed["network"]["img_resolution"] == 32 and printed["gflops"] == round(c.gflops, 3)
    assert printed["parameters"] == c.parameters and not (tmp_path / "r").exists()


# ----------------------------------------------------------------------------------------------------
# 5. The official command lines (READMEs of NVlabs/edm2 and NVlabs/edm; URLs replaced by local files).

IGNORED = ("preset", "provenance")  # the official line names no preset, or EDM's train.py defaults
EDM_README = "--outdir=training-runs --data=datasets/cifar10-32x32.zip"
COMMANDS = [  # (official arguments, ours, data)
    ("--outdir=training-runs/00000-edm2-img512-xs --data=datasets/img512-sd.zip --preset=edm2-img512-xs "
     "--batch-gpu=32", "--outdir training-runs/00000-edm2-img512-xs --data datasets/img512-sd.zip --preset "
     "edm2-img512-xs --batch-gpu 32", ("latents", 64, 4, 1000)),
    ("--outdir=o --data=d.zip --preset=edm2-img64-s --cond=0 --duration=512Mi --batch=2Ki --P_mean=-0.9 "
     "--P_std=1.5 --lr=0.01 --decay=30000 --dropout=0.1 --fp16=1 --ls=1 --status=256Ki --snapshot=16Mi "
     "--checkpoint=64Mi --seed=7 -n", "--outdir o --data d.zip --preset edm2-img64-s --uncond --duration 512Mi "
     "--batch 2048 --P-mean -0.9 --P-std 1.5 --lr 0.01 --decay 30000 --dropout 0.1 --seed 7 --status 256Ki "
     "--snapshot 16Mi --checkpoint 64Mi", ("pixels", 64, 3, 1000)),
    (f"{EDM_README} --cond=1 --arch=ddpmpp", "--outdir training-runs --data datasets/cifar10-32x32.zip --preset "
     "edm-cifar10-ddpmpp-edm --cond", ("pixels", 32, 3, 10)),
    (f"{EDM_README} --cond=1 --arch=ncsnpp", "--outdir training-runs --data datasets/cifar10-32x32.zip --preset "
     "edm-cifar10-ncsnpp-edm --cond", ("pixels", 32, 3, 10)),
    (f"{EDM_README} --cond=0 --arch=ddpmpp", "--outdir training-runs --data datasets/cifar10-32x32.zip --preset "
     "edm-cifar10-ddpmpp-edm --uncond", ("pixels", 32, 3, 10)),
    (f"{EDM_README} --cond=0 --arch=ncsnpp --precond=vp", "--outdir training-runs --data "
     "datasets/cifar10-32x32.zip --preset edm-cifar10-ncsnpp-vp --uncond", ("pixels", 32, 3, 10)),
    (f"{EDM_README} --arch ddpmpp --precond ve", "--outdir training-runs --data datasets/cifar10-32x32.zip --preset "
     "edm-cifar10-ddpmpp-ve --uncond", ("pixels", 32, 3, 10)),
    (f"{EDM_README} --cond=0 --arch=ddpmpp --batch=256 --cres=1,2,2,2 --lr=2e-4 --dropout=0.05 --augment=0.15",
     "--outdir training-runs --data datasets/cifar10-32x32.zip --preset edm-ffhq64-ddpmpp-edm --uncond",
     ("pixels", 64, 3, 10)),
    (f"{EDM_README} --cond=0 --arch=ncsnpp --batch=256 --cres=1,2,2,2 --lr=2e-4 --dropout=0.05 --augment=0.15",
     "--outdir training-runs --data datasets/cifar10-32x32.zip --preset edm-ffhq64-ncsnpp-edm --uncond",
     ("pixels", 64, 3, 10)),
    (f"{EDM_README} --cond=0 --arch=ddpmpp --batch=256 --cres=1,2,2,2 --lr=2e-4 --dropout=0.25 --augment=0.15",
     "--outdir training-runs --data datasets/cifar10-32x32.zip --preset edm-afhqv2-64-ddpmpp-edm --uncond",
     ("pixels", 64, 3, 10)),
    (f"{EDM_README} --cond=0 --arch=ncsnpp --batch=256 --cres=1,2,2,2 --lr=2e-4 --dropout=0.25 --augment=0.15",
     "--outdir training-runs --data datasets/cifar10-32x32.zip --preset edm-afhqv2-64-ncsnpp-edm --uncond",
     ("pixels", 64, 3, 10)),
    (f"{EDM_README} --cond=1 --arch=adm --duration=2500 --batch=4096 --lr=1e-4 --ema=50 --dropout=0.10 --augment=0 "
     "--fp16=1 --ls=100 --tick=200", "--outdir training-runs --data datasets/cifar10-32x32.zip --preset "
     "edm-imagenet64-adm --cond", ("pixels", 64, 3, 1000)),
    (f"{EDM_README} --arch=ddpmpp --duration 0.5 --tick 10 --snap=5 --dump 20 --xflip=1 --cbase=64 --seed=1",
     "--outdir training-runs --data datasets/cifar10-32x32.zip --preset edm-cifar10-ddpmpp-edm --uncond --duration "
     "500000 --status 10000 --snapshot 50000 --checkpoint 200000 --xflip --channels 64 --seed 1",
     ("pixels", 32, 3, 10)),
]


def _parsed(args: str, monkeypatch) -> TrainOptions:
    seen = []
    monkeypatch.setattr(cli_train, "_dry_run", lambda opts, rank: seen.append(opts))
    result = CliRunner().invoke(main, ["train", *shlex.split(args), *([] if " -n" in args else ["--dry-run"])])
    assert result.exit_code == 0, result.output
    return seen[0]


@pytest.mark.parametrize("official, ours, data", COMMANDS, ids=[c[0].split("--cond")[-1][:40] for c in COMMANDS])
def test_official_command_lines_read_as_our_spelling(official, ours, data, monkeypatch):
    kind, resolution, channels, classes = data
    dataset = fake(resolution, channels, classes, latents=kind == "latents")
    theirs, mine = _parsed(official, monkeypatch), _parsed(ours, monkeypatch)
    a = resolve_run(dataclasses.replace(theirs, device="cpu"), dataset, world=1).to_dict()
    b = resolve_run(dataclasses.replace(mine, device="cpu"), dataset, world=1).to_dict()
    assert {k: v for k, v in a.items() if k not in IGNORED} == {k: v for k, v in b.items() if k not in IGNORED}


def test_official_spellings_translate_to_ours():
    assert cli_train.official_args(["--P_mean=-0.4", "--P_std", "1.0", "--cond=0", "--fp16", "1", "--xflip=0",
                                    "--cres=1,2", "--cbase", "64"]) == [
        "--P-mean=-0.4", "--P-std", "1.0", "--uncond", "--fp16", "--channel-mult=1,2", "--channels", "64"]
    assert cli_train.official_args(["--arch=adm", "--duration=2500", "--tick=200"]) == [
        "--arch=adm", "--duration=2500000000", "--status=200000", "--snapshot=10000000", "--checkpoint=100000000",
        "--uncond"]
    assert cli_train.official_args(["--precond", "vp", "--duration", "2Mi", "--cond"]) == [
        "--precond", "vp", "--duration=2Mi", "--cond"]  # an image count stays one


def test_arch_and_preset_together_is_one_line(tmp_path):
    one_line_error(invoke("train", "--outdir", tmp_path / "r", "--preset", "cpu-tiny8", "--arch", "ddpmpp"),
                   "--preset or --arch/--precond")
    assert not (tmp_path / "r").exists()
    text = " ".join(invoke("train", "--help").output.split())
    assert "--P_mean" in text and "--cres" in text and "--tick in kimg" in text and "-n, --dry-run" in text


def test_the_custom_preset_follows_when_it_is_not_official():
    tiny = Preset("mine", "a custom preset", get_preset("cpu-tiny8").network, get_preset("cpu-tiny8").training)
    run = resolve_run(TrainOptions(outdir="x", preset=tiny, duration=8 * Ki, device="cpu"), open_dataset("digits"),
                      world=1)
    assert run.provenance["schedule"]["value"] == "follow" and run.provenance["decay"]["source"] == "derived"
