"""The judge of any labelled pixel dataset (`edm2.metrics.judge`, `edm2 judge train`) and `edm2 ema-sweep` on
a class-conditional model that is not the 8x8 digits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from edm2.checkpoint import save_tensors
from edm2.cli import main
from edm2.data import load_digits_dataset, open_dataset, to_model_space
from edm2.metrics.judge import Judge, train_judge


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def digits_npz(tmp_path_factory) -> Path:
    """The 8x8 digits as an .npz file: a labelled dataset of its own name, so that ema-sweep does not take the
    built-in digits judge for it."""
    d = load_digits_dataset()
    path = tmp_path_factory.mktemp("data") / "mydigits.npz"
    np.savez(path, x=d.images.transpose(0, 2, 3, 1), y=d.labels)
    return path


@pytest.fixture(scope="module")
def judge(digits_npz) -> Judge:
    return train_judge(open_dataset(digits_npz), images=8000)


def test_judge_recognises_real_images_and_tells_them_from_noise(judge, digits_npz):
    ds = open_dataset(digits_npz)
    assert judge.real_accuracy >= 0.9 and len(judge.real_features) == len(ds) // 5
    real = to_model_space(torch.from_numpy(ds.images[:500]))
    good = judge.evaluate(real, ds.labels[:500])
    assert good.accuracy >= 0.9
    shuffled = judge.evaluate(real, np.random.default_rng(0).permutation(ds.labels[:500]))
    assert shuffled.accuracy < 0.3  # chance is 0.1
    noise = judge.evaluate(torch.rand_like(real) * 2 - 1, ds.labels[:500])
    assert noise.fd > 20 * good.fd > 0
    with pytest.raises(ValueError, match=r"shape \[1, 8, 8\]"):
        judge.evaluate(torch.zeros([4, 3, 8, 8]), np.zeros(4))


def test_judge_file_round_trip(judge, tmp_path):
    judge.save(tmp_path / "j.safetensors")
    again = Judge.load(tmp_path / "j.safetensors")
    x = torch.rand([8, 1, 8, 8]) * 2 - 1
    np.testing.assert_array_equal(judge.run(x)[0], again.run(x)[0])
    np.testing.assert_allclose(again.real_features, judge.real_features, rtol=1e-6)
    assert again.real_accuracy == judge.real_accuracy and again.info["dataset"]["num_images"] == 1797
    save_tensors(tmp_path / "other.safetensors", {"w": torch.zeros(2)}, {"kind": "snapshot"})
    with pytest.raises(ValueError, match="expected a 'judge'"):
        Judge.load(tmp_path / "other.safetensors")


def test_judge_needs_labels():
    from edm2.data import ImageDataset

    with pytest.raises(ValueError, match="labelled data"):
        train_judge(ImageDataset(np.zeros([100, 1, 8, 8], np.uint8), None, "unlabelled"))


@pytest.fixture(scope="module")
def digits_run(digits_npz, tmp_path_factory) -> Path:
    outdir = tmp_path_factory.mktemp("run") / "run"
    result = invoke("train", "--outdir", outdir, "--data", digits_npz, "--duration", "64", "--batch", "16",
                    "--snapshot", "16", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert json.loads((outdir / "training_options.json").read_text())["preset"] == "cpu-digits8"  # --preset auto
    return outdir


def test_cli_judge_train_and_ema_sweep_with_it(digits_run, digits_npz, tmp_path):
    result = invoke("judge", "train", "--data", digits_npz, "--out", tmp_path / "j.safetensors", "--images", "2000")
    assert result.exit_code == 0, result.output
    assert "held-out accuracy" in result.stdout and Judge.load(tmp_path / "j.safetensors").real_accuracy > 0.5
    again = invoke("judge", "train", "--data", digits_npz, "--out", tmp_path / "j.safetensors")
    assert again.exit_code == 2 and "exists" in again.stderr
    out = tmp_path / "sweep"
    result = invoke("ema-sweep", "--run", digits_run, "--judge", tmp_path / "j.safetensors", "--std", "0.05,0.10",
                    "--samples", "20", "--steps", "2", "--device", "cpu", "--outdir", out)
    assert result.exit_code == 0, result.output
    table = json.loads((out / "ema_sweep.json").read_text())
    assert [r["sigma_rel"] for r in table["rows"]] == [0.05, 0.10]
    assert all(0 <= r["accuracy"] <= 1 and r["fd"] > 0 for r in table["rows"])
    assert table["best"] == min(table["rows"], key=lambda r: r["fd"])
    assert (out / "ema_sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_ema_sweep_trains_the_judge_once_on_the_runs_data(digits_run, tmp_path):
    args = ["ema-sweep", "--run", digits_run, "--std", "0.1", "--samples", "10", "--steps", "1", "--device", "cpu",
            "--judge-images", "1000"]
    first = invoke(*args, "--outdir", tmp_path / "a")
    assert first.exit_code == 0, first.output
    assert "training a judge on" in first.stdout and (digits_run / "judge.safetensors").exists()
    stamp = (digits_run / "judge.safetensors").stat().st_mtime_ns
    second = invoke(*args, "--outdir", tmp_path / "b")
    assert second.exit_code == 0, second.output
    assert "training a judge" not in second.stdout and (digits_run / "judge.safetensors").stat().st_mtime_ns == stamp
    # The same table both times: the judge and the samples are the same.
    rows = [json.loads((tmp_path / d / "ema_sweep.json").read_text())["rows"] for d in "ab"]
    assert rows[0][0]["fd"] == rows[1][0]["fd"]


def test_cli_ema_sweep_refuses_unconditional_models(digits_npz, tmp_path):
    outdir = tmp_path / "uncond"
    result = invoke("train", "--outdir", outdir, "--data", digits_npz, "--uncond", "--duration", "32", "--batch", "16",
                    "--snapshot", "16", "--device", "cpu")
    assert result.exit_code == 0, result.output
    result = invoke("ema-sweep", "--run", outdir, "--std", "0.1", "--device", "cpu", "--outdir", tmp_path / "s")
    assert result.exit_code == 2 and "unconditional" in result.stderr and len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "s").exists()
