"""`edm2 train --transfer`: fine-tuning starts from exactly the source network's weights (the golden official
pickle, converted without running code), takes or checks its architecture, resumes like any run, and refuses a
source of another shape or space with one line and nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from edm2.cli import main
from edm2.data import open_dataset
from edm2.files import load_network, load_snapshot
from edm2.training.options import TrainOptions, resolve_run
from edm2.training.step import setup

PICKLES = Path(__file__).parent / "data" / "official_pickles"
PIXEL = PICKLES / "edm2_pixel.pkl"  # EDM2 Precond, 16x16x3, unconditional
LATENT = PICKLES / "edm2_latent.pkl"  # EDM2 Precond on VAE latents, 10 classes


def invoke(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def images16(tmp_path_factory) -> Path:
    """32 random 16x16 RGB images with 10 classes, as an .npz dataset."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "rgb16.npz"
    np.savez(path, x=rng.integers(0, 256, [32, 16, 16, 3], dtype=np.uint8), y=rng.integers(0, 10, 32))
    return path


def source_state(path: Path) -> dict[str, torch.Tensor]:
    with pytest.warns(UserWarning):
        net, _ = load_network(path)
    return net.state_dict()


def test_fine_tuning_starts_from_exactly_the_source_weights(images16, tmp_path):
    opts = TrainOptions(outdir=str(tmp_path / "run"), data=str(images16), transfer=str(PIXEL), cond=False,
                        duration=16, batch=8, dropout=0.0)
    dataset = open_dataset(str(images16), progress=False)
    run = resolve_run(opts, dataset, world=1)
    expected = source_state(PIXEL)
    assert run.network.model_channels == 32 and run.network.channel_mult == (1, 2)  # the source's, not a preset's
    assert run.network.dropout == 0.0  # a training choice the fine-tuning run may change
    t = setup(run, dataset, torch.device("cpu"))
    got = t.net.state_dict()
    assert set(got) == set(expected)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    fresh = setup(run, dataset, torch.device("cpu"), fresh=False)  # a resumed run: the checkpoint supplies weights
    assert not torch.equal(fresh.net.state_dict()["unet.out_conv.weight"], expected["unet.out_conv.weight"])


def test_cli_fine_tunes_records_the_source_and_resumes(images16, tmp_path):
    run = tmp_path / "run"
    args = ["train", "--outdir", run, "--data", images16, "--uncond", "--transfer", PIXEL, "--duration", 16,
            "--batch", 8, "--status", 8, "--snapshot", 16, "--checkpoint", 8, "--workers", 0]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    options = json.loads((run / "training_options.json").read_text())
    assert options["transfer"] == str(PIXEL) and options["network"]["model_channels"] == 32
    snapshots = sorted(run.glob("*.safetensors"))
    assert snapshots and load_snapshot(snapshots[-1]).nimg == 16
    again = invoke(*args[:-10], "--duration", 24, "--batch", 8, "--status", 8, "--snapshot", 16,
                   "--checkpoint", 8, "--workers", 0)
    assert again.exit_code == 0, again.output
    assert "resuming at 16 images" in (run / "log.txt").read_text()


def nothing_written(result, tmp_path: Path, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edm2: error: --transfer"), result.output
    assert all(n in lines[0] for n in needles), lines[0]
    assert not (tmp_path / "run").exists()


def test_a_preset_of_another_shape_is_refused(images16, tmp_path):
    result = invoke("train", "--outdir", tmp_path / "run", "--data", images16, "--uncond", "--transfer", PIXEL,
                    "--preset", "cpu-rgb32", "--duration", 16)
    nothing_written(result, tmp_path, "model_channels")


def test_labels_and_space_must_match_the_source(images16, tmp_path):
    conditional = invoke("train", "--outdir", tmp_path / "run", "--data", images16, "--transfer", PIXEL,
                         "--duration", 16)
    nothing_written(conditional, tmp_path, "label_dim 0 (source) vs 10 (this run)")
    latent = invoke("train", "--outdir", tmp_path / "run", "--data", images16, "--transfer", LATENT,
                    "--duration", 16)
    nothing_written(latent, tmp_path, "StabilityVAEEncoder")


def test_a_missing_source_is_one_line(images16, tmp_path):
    result = invoke("train", "--outdir", tmp_path / "run", "--data", images16, "--uncond", "--transfer",
                    tmp_path / "nope.safetensors", "--duration", 16)
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
