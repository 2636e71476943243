"""Latent diffusion end to end with a tiny random AutoencoderKL standing in for the Stable Diffusion VAE: images in
class folders -> `dataset convert` -> `dataset encode` -> `dataset stats` -> `train` (the img512 recipe on the
CPU-sized latent preset) -> `generate` decodes with the snapshot's encoder -> PNGs of the right size; the encoding
split over two torchrun processes; and one-line errors that write nothing."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from edm2.checkpoint import load_network
from edm2.cli import main
from edm2.data import encoder_from_dict, open_dataset
from edm2.generate import generate_images
from edm2.sampling import SamplerSettings


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def ok(result):
    assert result.exit_code == 0, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    return result


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, tiny_vae) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("latent")
    rng = np.random.default_rng(0)
    for cls in ("circles", "squares"):
        for i in range(4):
            path = root / "photos" / cls / f"{i}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, [70 + i, 90, 3], dtype=np.uint8)).save(path)
    p = {"root": root, "vae": tiny_vae, "pixels": root / "pixels.zip", "latents": root / "latents.zip",
         "stats": root / "stats.json", "run": root / "run", "out": root / "out"}
    ok(invoke("dataset", "convert", "--source", root / "photos", "--dest", p["pixels"], "--resolution", "64",
              "--transform", "center-crop-dhariwal", "--workers", "0"))
    p["encode_output"] = ok(invoke("dataset", "encode", "--source", p["pixels"], "--dest", p["latents"], "--vae",
                                   tiny_vae, "--device", "cpu", "--batch", "3", "--workers", "0")).stdout
    p["stats_output"] = ok(invoke("dataset", "stats", "--source", p["latents"], "--dest", p["stats"])).stdout
    p["train_output"] = ok(invoke("train", "--outdir", p["run"], "--data", p["latents"], "--preset", "cpu-latent16",
                                  "--latent-stats", p["stats"], "--batch", "4", "--duration", "8", "--status", "4",
                                  "--snapshot", "8", "--checkpoint", "8", "--device", "cpu")).stdout
    p["snapshot"] = p["run"] / "snapshot-0000000008-0.100.safetensors"
    ok(invoke("generate", "--net", p["snapshot"], "--outdir", p["out"], "--seeds", "0-2", "--steps", "3",
              "--grid", p["root"] / "grid.png", "--device", "cpu"))
    return p


def test_encode_writes_the_official_latent_layout(pipeline):
    latents = open_dataset(pipeline["latents"])
    assert latents.latents and (len(latents), latents.channels, latents.resolution) == (8, 8, 16)
    assert latents.entries.name(0) == "00000/img-mean-std-00000000.npy"
    assert latents.labels.tolist() == [0] * 4 + [1] * 4  # carried over from the class folders
    spec = latents.encoder
    assert spec["class"] == "StabilityVAEEncoder" and spec["kwargs"]["vae_name"] == str(pipeline["vae"].resolve())
    assert "wrote 8 images (2 classes, 16x16x8" in pipeline["encode_output"]
    # The stored mean/std are the VAE's posterior for the pixels in [0, 1].
    from diffusers import AutoencoderKL

    pixels = open_dataset(pipeline["pixels"]).read_raw(np.arange(8))
    with torch.no_grad():
        dist = AutoencoderKL.from_pretrained(pipeline["vae"]).encode(torch.from_numpy(pixels).float() / 255)
    expected = torch.cat([dist["latent_dist"].mean, dist["latent_dist"].std], 1)
    torch.testing.assert_close(torch.from_numpy(latents.read_raw(np.arange(8))), expected, rtol=1e-4, atol=1e-5)


def test_training_uses_the_measured_statistics_and_records_them(pipeline):
    stats = json.loads(pipeline["stats"].read_text())
    assert len(stats["raw_mean"]) == len(stats["raw_std"]) == 4 and stats["num_images"] == 8
    assert f"-> {pipeline['stats']}" in pipeline["stats_output"]
    assert "finished at 8 images" in pipeline["train_output"]
    run = json.loads((pipeline["run"] / "training_options.json").read_text())
    net, snap = load_network(pipeline["snapshot"])
    assert snap.encoder == run["encoder"] == {"class": "StabilityVAEEncoder", "kwargs": {
        "vae_name": str(pipeline["vae"].resolve()), "raw_mean": stats["raw_mean"], "raw_std": stats["raw_std"],
        "final_mean": 0.0, "final_std": 0.5}}
    assert (net.img_channels, net.img_resolution, net.label_dim) == (4, 16, 2)


def test_generate_decodes_with_the_snapshot_encoder(pipeline, tmp_path):
    paths = sorted(pipeline["out"].glob("*.png"))
    assert [p.name for p in paths] == ["000000.png", "000001.png", "000002.png"]
    with Image.open(paths[0]) as img:
        assert img.size == (64, 64) and img.mode == "RGB"  # 16x16 latents, 4x upsampling of the tiny VAE
    with Image.open(pipeline["root"] / "grid.png") as grid:
        assert grid.size == (2 * 64 + 2, 2 * 64 + 2)
    # The PNGs are the VAE decoding of the latents the network made, un-standardised with the recorded statistics
    # (SPEC: raw = (final - final_mean) / final_std * raw_std + raw_mean), clamped to [0, 1] and scaled to 0..255.
    net, snap = load_network(pipeline["snapshot"])
    latents = generate_images(net, [0, 1, 2], None, SamplerSettings(num_steps=3))
    kw = snap.encoder["kwargs"]
    raw = latents.double() / 0.5 * torch.tensor(kw["raw_std"]).view(1, 4, 1, 1).double() + \
        torch.tensor(kw["raw_mean"]).view(1, 4, 1, 1).double()
    from diffusers import AutoencoderKL

    with torch.no_grad():
        out = AutoencoderKL.from_pretrained(pipeline["vae"]).decode(raw.float())["sample"]
    expected = np.floor(out.clamp(0, 1).numpy() * 255).transpose(0, 2, 3, 1)
    got = np.stack([np.asarray(Image.open(p)) for p in paths]).astype(np.float64)
    assert np.abs(got - expected).max() <= 1 and np.mean(got == expected) > 0.99
    assert encoder_from_dict(snap.encoder).to_dict() == snap.encoder


def test_decode_back_to_pngs(pipeline, tmp_path):
    ok(invoke("dataset", "decode", "--source", pipeline["latents"], "--dest", tmp_path / "dec", "--device", "cpu",
              "--workers", "0", "--max-images", "3"))
    dec = open_dataset(tmp_path / "dec")
    assert (len(dec), dec.channels, dec.resolution) == (3, 3, 64) and dec.labels.tolist() == [0, 0, 0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_encode_split_over_two_processes_writes_the_same_dataset(pipeline, tmp_path):
    dest = tmp_path / "ddp.zip"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "edm2.cli", "dataset", "encode", "--source", pipeline["pixels"],
           "--dest", dest, "--vae", pipeline["vae"], "--device", "cpu", "--batch", "3", "--workers", "0"]
    proc = subprocess.run([str(c) for c in cmd], env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("wrote 8 images") == 1  # rank 0 writes and reports
    a, b = open_dataset(dest), open_dataset(pipeline["latents"])
    assert a.entries.names() == b.entries.names() and np.array_equal(a.labels, b.labels)
    # Each image is encoded on its own (GroupNorm is per image), so the batches a process gets do not matter.
    np.testing.assert_allclose(a.read_raw(np.arange(8)), b.read_raw(np.arange(8)), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# Bad input: one line, exit code 2, nothing written.


def tree(path: Path) -> dict[str, str]:
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(path.rglob("*"))}


def latent_to_pixel_preset(p, tmp):
    return ["train", "--data", p["latents"], "--preset", "cpu-rgb32", "--outdir", tmp / "new"], \
        ["holds VAE latents", "cpu-rgb32", "latent preset"]


def pixels_to_latent_preset(p, tmp):
    return ["train", "--data", p["pixels"], "--preset", "edm2-img512-xs", "--outdir", tmp / "new"], \
        ["edm2-img512-xs", "VAE latents", "edm2 dataset encode"]


def stats_of_another_vae(p, tmp):
    (tmp / "s8.json").write_text(json.dumps({"raw_mean": [0.0] * 8, "raw_std": [1.0] * 8}))
    return ["train", "--data", p["latents"], "--preset", "cpu-latent16", "--latent-stats", tmp / "s8.json",
            "--outdir", tmp / "new"], ["8 channels", "--latent-stats"]


def missing_vae_for_encode(p, tmp):
    return ["dataset", "encode", "--source", p["pixels"], "--dest", tmp / "new.zip", "--vae", tmp / "no-vae",
            "--device", "cpu"], ["no-vae", "huggingface-cli download"]


def corrupt_vae_for_encode(p, tmp):
    bad = tmp / "bad-vae"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    return ["dataset", "encode", "--source", p["pixels"], "--dest", tmp / "new", "--vae", bad, "--device", "cpu"], \
        ["cannot load the VAE", "bad-vae"]


def missing_vae_for_generate(p, tmp):
    return ["generate", "--net", p["snapshot"], "--outdir", tmp / "new", "--vae", tmp / "gone", "--device", "cpu"], \
        ["gone", "does not exist"]


def encode_latents_again(p, tmp):
    return ["dataset", "encode", "--source", p["latents"], "--dest", tmp / "new.zip", "--vae", p["vae"],
            "--device", "cpu"], ["holds latents", "expected images"]


def stats_of_pixels(p, tmp):
    return ["dataset", "stats", "--source", p["pixels"], "--dest", tmp / "new.json"], ["holds images"]


def fp16_vae_on_cpu(p, tmp):
    return ["dataset", "encode", "--source", p["pixels"], "--dest", tmp / "new.zip", "--vae", p["vae"],
            "--device", "cpu", "--precision", "fp16"], ["fp16", "CUDA"]


CASES = [latent_to_pixel_preset, pixels_to_latent_preset, stats_of_another_vae, missing_vae_for_encode,
         corrupt_vae_for_encode, missing_vae_for_generate, encode_latents_again, stats_of_pixels, fp16_vae_on_cpu]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_bad_input_one_line_exit_2(pipeline, tmp_path, case):
    args, fragments = case(pipeline, tmp_path)
    before, inputs = tree(tmp_path), tree(pipeline["root"])
    result = invoke(*args)
    assert result.exit_code == 2, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edm2: error: "), result.stderr
    for f in fragments:
        assert f in lines[0], lines[0]
    assert tree(tmp_path) == before and tree(pipeline["root"]) == inputs


def test_diffusers_not_installed(pipeline, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)
    result = invoke("dataset", "encode", "--source", pipeline["pixels"], "--dest", tmp_path / "x.zip", "--vae",
                    pipeline["vae"], "--device", "cpu")
    assert result.exit_code == 2 and "pip install 'edm2[vae]'" in result.stderr
    assert list(tmp_path.iterdir()) == []
