"""Training with the EDM (2022) recipe: the edm-* presets hold the official train.py hyper-parameters; a run uses
the preset's preconditioning, loss, non-leaky augmentation, traditional EMA (power EMAs beside it when asked),
Adam betas and constant learning rate after the warm-up; it resumes exactly; its snapshots rebuild for
generation and reconstruction."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from edm2.checkpoint import find_checkpoints, load_network, load_snapshot, load_tensors, read_metadata
from edm2.cli import main
from edm2.data import open_dataset
from edm2.edm_losses import EDMLoss, VELoss, VPLoss
from edm2.ema_trackers import TraditionalEMATracker
from edm2.networks import EDMPrecond
from edm2.options import TrainOptions, resolve_run
from edm2.presets import PRESETS, EDMNetworkConfig, get_preset
from edm2.training import learning_rate_schedule, setup, train, train_step

# SPEC section 7, from the official train.py and README (durations and half-lives in decimal Mimg).
CIFAR = dict(batch=512, lr=1e-3, ema=0.5, dropout=0.13, augment=0.12, duration=200e6, fp16=False, cm=[2, 2, 2])
FFHQ = dict(CIFAR, batch=256, lr=2e-4, dropout=0.05, augment=0.15, cm=[1, 2, 2, 2])
AFHQ = dict(FFHQ, dropout=0.25)
ARCHS = {
    "ddpmpp": dict(model_type="SongUNet", embedding_type="positional", encoder_type="standard",
                   decoder_type="standard", channel_mult_noise=1, resample_filter=[1, 1], model_channels=128),
    "ncsnpp": dict(model_type="SongUNet", embedding_type="fourier", encoder_type="residual", decoder_type="standard",
                   channel_mult_noise=2, resample_filter=[1, 3, 3, 1], model_channels=128),
}
PAIRS = {"vp": ("VPPrecond", "VPLoss"), "ve": ("VEPrecond", "VELoss"), "edm": ("EDMPrecond", "EDMLoss")}
EXPECTED = {f"edm-{data}-{arch}-{precond}": (hp, res, arch, precond)
            for data, hp, res in (("cifar10", CIFAR, 32), ("ffhq64", FFHQ, 64), ("afhqv2-64", AFHQ, 64))
            for arch in ARCHS for precond in PAIRS}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_edm_presets_hold_the_official_hyperparameters(name):
    hp, res, arch, precond = EXPECTED[name]
    p = get_preset(name)
    kw = p.network.kwargs
    assert (p.network.class_name, p.edm.loss) == PAIRS[precond]
    assert {k: kw[k] for k in ARCHS[arch]} == ARCHS[arch] and kw["channel_mult"] == hp["cm"]
    assert (kw["img_resolution"], kw["img_channels"], kw["dropout"], kw["use_fp16"]) == (res, 3, hp["dropout"],
                                                                                         hp["fp16"])
    assert kw["augment_dim"] == 9 and p.edm.augment == hp["augment"]
    tr = p.training
    assert (tr.batch_size, tr.lr, tr.duration, p.edm.ema_halflife_Mimg) == (hp["batch"], hp["lr"], hp["duration"],
                                                                           hp["ema"])
    assert (tr.decay, tr.rampup_Mimg, p.edm.ema_rampup_ratio, p.edm.adam_betas) == (0, 10, 0.05, (0.9, 0.999))
    assert (tr.P_mean, tr.P_std, p.edm.loss_scaling) == (-1.2, 1.2, 1)


def test_imagenet_preset_is_the_official_adm_setup():
    p = get_preset("edm-imagenet64-adm")
    kw = p.network.kwargs
    assert p.network.class_name == "EDMPrecond" and p.edm.loss == "EDMLoss"
    assert (kw["model_type"], kw["model_channels"], kw["channel_mult"], kw["dropout"]) == ("DhariwalUNet", 192,
                                                                                          [1, 2, 3, 4], 0.10)
    assert kw["use_fp16"] and "augment_dim" not in kw and p.edm.augment == 0
    assert (p.training.duration, p.training.batch_size, p.training.lr) == (2500e6, 4096, 1e-4)
    assert (p.edm.ema_halflife_Mimg, p.edm.loss_scaling) == (50, 100)
    assert len([n for n in PRESETS if n.startswith("edm-")]) == 19


def test_learning_rate_warms_up_then_stays_constant():
    # The official EDM loop: lr * min(images / 10 Mimg, 1), no decay (decay 0).
    for nimg in (0, 2_500_000, 10_000_000, 150_000_000):
        assert learning_rate_schedule(nimg, 512, 1e-3, 0, 10) == pytest.approx(1e-3 * min(nimg / 1e7, 1), rel=1e-12)


def test_traditional_ema_follows_the_official_update():
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    tracker = TraditionalEMATracker(net, "unused", halflife_Mimg=0.0005, rampup_ratio=0.05)
    expected = [p.detach().clone() for p in net.parameters()]
    batch, nimg = 64, 0
    for _ in range(30):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        # The official loop: half-life min(h, images seen before this step * ratio), beta = 0.5^(batch / h).
        halflife = min(0.0005 * 1e6, nimg * 0.05)
        beta = 0.5 ** (batch / max(halflife, 1e-8))
        expected = [p.detach().lerp(e, beta) for p, e in zip(net.parameters(), expected)]
        nimg += batch
        tracker.update(nimg)
    for e, t in zip(expected, tracker.ema.ema):
        torch.testing.assert_close(t, e, rtol=1e-6, atol=1e-7)


def test_resolve_run_takes_the_recipe_and_its_overrides():
    data = open_dataset("digits")
    run = resolve_run(TrainOptions(outdir="x", preset="cpu-edm-tiny8", device="cpu"), data, world=1)
    assert run.network_class == "EDMPrecond" and run.network["augment_dim"] == 9 and run.network["label_dim"] == 10
    assert run.edm["loss"] == "EDMLoss" and run.edm["augment"] == 0.12 and run.ema_stds == ()
    off = resolve_run(TrainOptions(outdir="x", preset="cpu-edm-tiny8", device="cpu", augment=0, ema=0.01,
                                   cond=False), data, world=1)
    assert off.network["augment_dim"] == 0 and off.network["label_dim"] == 0 and off.edm["ema_halflife_Mimg"] == 0.01
    edm2_run = resolve_run(TrainOptions(outdir="x", preset="cpu-tiny8", device="cpu"), data, world=1)
    assert edm2_run.network_class is None and edm2_run.edm is None  # EDM2 runs as before
    for opts, fragment in ((dict(preset="cpu-tiny8", augment=0.1), "edm-\\* preset"),
                           (dict(preset="cpu-edm-tiny8", augment=1.5), "--augment"),
                           (dict(preset="cpu-edm-tiny8", ema=-1), "--ema")):
        with pytest.raises(ValueError, match=fragment):
            resolve_run(TrainOptions(outdir="x", device="cpu", **opts), data, world=1)


@pytest.mark.parametrize("name, loss", [("edm-cifar10-ddpmpp-vp", VPLoss), ("edm-cifar10-ncsnpp-ve", VELoss),
                                        ("cpu-edm-tiny8", EDMLoss)])
def test_setup_builds_the_recipe(name, loss):
    data = open_dataset("digits")
    run = resolve_run(TrainOptions(outdir="x", preset="cpu-edm-tiny8", device="cpu"), data, world=1)
    if name != "cpu-edm-tiny8":  # the same tiny network, with the preconditioning and loss of `name`
        preset = get_preset(name)
        run = dataclasses.replace(run, network=EDMNetworkConfig(preset.network.class_name, run.network.kwargs),
                                  edm=dataclasses.replace(run.edm, loss=preset.edm.loss, augment=0))
    t = setup(run, data, torch.device("cpu"))
    assert type(t.net).__name__ == run.network_class and isinstance(t.loss_fn, loss)
    assert t.optimizer.param_groups[0]["betas"] == (0.9, 0.999)
    assert (t.augment_pipe is not None) == bool(run.edm["augment"])
    if t.augment_pipe is not None:
        assert t.augment_pipe.label_dim == t.net.augment_dim == 9 and t.augment_pipe.p == 0.12


# 8 steps of 32 images; checkpoints every 2 steps, snapshots every 4.
BASE = dict(data="digits", preset="cpu-edm-tiny8", duration=32 * 8, status=32 * 4, snapshot=32 * 4,
            checkpoint=32 * 2, seed=5, device="cpu", ema_stds=(0.05, 0.10))


@pytest.fixture(scope="module")
def edm_run(tmp_path_factory) -> Path:
    outdir = tmp_path_factory.mktemp("edm") / "run"
    result = train(TrainOptions(outdir=str(outdir), **BASE), progress=False)
    assert result["status"] == "finished" and result["nimg"] == 256
    return outdir


def _final(outdir: Path) -> dict[str, torch.Tensor]:
    return load_tensors(find_checkpoints(outdir)[-1], kind="checkpoint")[0]


def test_pause_and_resume_is_exact(edm_run, tmp_path):
    outdir = tmp_path / "run"
    assert train(TrainOptions(outdir=str(outdir), **BASE), progress=False, max_steps=3)["status"] == "paused"
    assert train(TrainOptions(outdir=str(outdir), **BASE), progress=False)["steps"] == 5
    a, b = _final(outdir), _final(edm_run)
    assert a.keys() == b.keys() and any(k.startswith("ema/traditional/") for k in a)
    assert any(k.startswith("ema/power/") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_accumulation_rounds_see_the_same_augmented_batch(edm_run, tmp_path):
    # Noise levels, noise and augmentation are drawn for the whole global batch: splitting it into
    # accumulation rounds changes the result by float summation order only.
    outdir = tmp_path / "accum"
    train(TrainOptions(outdir=str(outdir), **{**BASE, "batch_gpu": 8}), progress=False)
    a, b = _final(outdir), _final(edm_run)
    for k in a:
        if k.startswith("net/"):
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-4, msg=k)


def test_train_step_feeds_augmented_images_and_their_labels_to_the_loss():
    data = open_dataset("digits")
    run = resolve_run(TrainOptions(outdir="x", preset="cpu-edm-tiny8", device="cpu", augment=1.0), data, world=1)
    t = setup(run, data, torch.device("cpu"))
    seen = []
    t.net.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs.get("augment_labels")),
                                    with_kwargs=True)
    train_step(t, 0, t.data.micro_batches(0))
    assert seen[0] is not None and seen[0].shape == (32, 9) and seen[0].abs().sum() > 0


def test_snapshots_rebuild_for_generation_and_reconstruction(edm_run, tmp_path):
    names = sorted(p.name for p in edm_run.glob("snapshot-*.safetensors"))
    assert names == [f"snapshot-{n:010d}-{s}.safetensors" for n in (128, 256) for s in ("0.050", "0.100", "ema")]
    meta = read_metadata(edm_run / "snapshot-0000000256-ema.safetensors")
    assert meta["network_class"] == "EDMPrecond" and meta["network"]["augment_dim"] == 9
    assert meta["sigma_rel"] is None and meta["info"]["ema"] == "traditional"
    net, snap = load_network(edm_run / "snapshot-0000000256-ema.safetensors")
    assert isinstance(net, EDMPrecond) and snap.network.class_name == "EDMPrecond"
    runner = CliRunner()
    out = runner.invoke(main, ["generate", "--net", str(edm_run / "snapshot-0000000256-ema.safetensors"),
                               "--outdir", str(tmp_path / "png"), "--seeds", "0-2", "--steps", "3", "--device", "cpu"])
    assert out.exit_code == 0, out.output
    assert len(list((tmp_path / "png").glob("*.png"))) == 3
    out = runner.invoke(main, ["reconstruct", "--indir", str(edm_run), "--outdir", str(tmp_path / "rec"),
                               "--std", "0.07"])
    assert out.exit_code == 0, out.output
    rec = load_snapshot(next((tmp_path / "rec").glob("*.safetensors")))
    assert rec.network.class_name == "EDMPrecond" and isinstance(rec.build(), EDMPrecond)


def test_cli_dry_run_and_info_show_the_edm_recipe(tmp_path):
    out = CliRunner().invoke(main, ["train", "--outdir", str(tmp_path / "r"), "--preset", "cpu-edm-tiny8",
                                    "--augment", "0", "--device", "cpu", "--dry-run"])
    assert out.exit_code == 0, out.output
    run = json.loads(out.output)
    assert run["network_class"] == "EDMPrecond" and run["edm"]["augment"] == 0 and run["network"]["augment_dim"] == 0
    assert run["parameters"] > 0 and not (tmp_path / "r").exists()
    info = CliRunner().invoke(main, ["info", "--preset", "edm-cifar10-ddpmpp-vp"])
    assert "55.74 M" in info.output and "edm.loss" in info.output and "VPLoss" in info.output
    bad = CliRunner().invoke(main, ["train", "--outdir", str(tmp_path / "r2"), "--preset", "cpu-tiny8",
                                    "--ema", "0.5", "--device", "cpu"])
    assert bad.exit_code == 2 and "edm2: error:" in bad.output and not (tmp_path / "r2").exists()
