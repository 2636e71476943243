"""`edm2 metrics ref|calc|gen` end to end with small random feature networks in the published layouts: a set
measured against itself is at distance 0, measuring a model's samples on the fly equals measuring its PNGs, two
processes give the results of one, and bad input gets one line with exit code 2 and writes nothing."""

from __future__ import annotations

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
from detector_weights import write_small_dinov2
from PIL import Image

from edm2.cli import main

PICKLES = Path(__file__).parent / "data" / "official_pickles"
GEN = ["--steps", "2", "--device", "cpu"]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def ok(result):
    assert result.exit_code == 0, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    return result


def assert_one_line_error(result, *fragments: str) -> str:
    assert result.exit_code == 2, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edm2: error: "), result.stderr
    for f in fragments:
        assert f in lines[0], f"{f!r} not in {lines[0]!r}"
    return lines[0]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    """A converted official network (16x16 RGB), 12 of its samples as PNGs, small DINOv2 weights, and the
    reference statistics of the PNGs with their features kept."""
    root = tmp_path_factory.mktemp("metrics")
    det = root / "det"
    write_small_dinov2(det)
    net = root / "net.safetensors"
    ok(invoke("convert", PICKLES / "edm2_pixel.pkl", net))
    ok(invoke("generate", "--net", net, "--seeds", "0-11", "--outdir", root / "images", *GEN))
    ok(invoke("metrics", "ref", "--data", root / "images", "--dest", root / "ref.npz", "--metrics", "fd_dinov2",
              "--keep-features", "12", "--detector-dir", det, "--device", "cpu", "--workers", "0"))
    return {"root": root, "det": det, "net": net, "images": root / "images", "ref": root / "ref.npz"}


def test_a_set_against_its_own_reference(setup):
    root = setup["root"]
    out = ok(invoke("metrics", "calc", "--images", setup["images"], "--ref", setup["ref"], "--detector-dir",
                    setup["det"], "--device", "cpu", "--batch", "5", "--results", root / "calc.json",
                    "--num", "12")).stdout
    res = json.loads((root / "calc.json").read_text())
    assert res == {"fd_dinov2": pytest.approx(0, abs=1e-6), "fd_dinov2/precision": 1.0, "fd_dinov2/recall": 1.0}
    assert out.splitlines()[0].startswith("fd_dinov2 0.0000")


def test_generate_and_measure_equals_measuring_the_pngs(setup):
    """Samples go straight into the feature network; they equal the PNGs `generate` writes (so the distance to the
    PNGs' statistics is 0), the optional PNGs are those files, and repeats use the next disjoint seed range."""
    root = setup["root"]
    ok(invoke("metrics", "gen", "--net", setup["net"], "--ref", setup["ref"], "--seeds", "0-11", "--repeats", "2",
              "--outdir", root / "gen", "--detector-dir", setup["det"], "--batch", "5", "--results",
              root / "gen.json", *GEN))
    res = json.loads((root / "gen.json").read_text())
    fd = res["fd_dinov2"]
    assert fd["values"][0] == pytest.approx(0, abs=1e-6) and fd["values"][1] > 1e-3
    assert fd["min"] == fd["values"][0] and fd["spread"] == pytest.approx(fd["values"][1] - fd["values"][0])
    assert res["fd_dinov2/precision"]["values"][0] == 1.0
    for seed in (0, 11):
        name = f"{seed:06d}.png"
        assert (root / "gen" / name).read_bytes() == (setup["images"] / name).read_bytes()
    assert sorted(p.name for p in (root / "gen").iterdir())[-1] == "000023.png"  # the second range, 12-23


def png_pixels(path: Path) -> torch.Tensor:
    with Image.open(path) as img:
        return torch.from_numpy(np.array(img))


def test_gen_pngs_are_the_pixels_generate_writes_for_every_seed(setup, tmp_path):
    """`metrics gen --outdir` writes (and measures) the pixels `edm2 generate` writes for the same seeds, whatever
    the batches of either (generate made the reference PNGs in one batch of 12)."""
    ok(invoke("metrics", "gen", "--net", setup["net"], "--ref", setup["ref"], "--seeds", "0-11", "--outdir",
              tmp_path / "gen", "--detector-dir", setup["det"], "--batch", "5", *GEN))
    names = [f"{s:06d}.png" for s in range(12)]
    assert sorted(p.name for p in (tmp_path / "gen").iterdir()) == names
    for name in names:
        assert torch.equal(png_pixels(tmp_path / "gen" / name), png_pixels(setup["images"] / name)), name


def test_gen_refuses_a_guide_of_another_space_as_generate_does(setup, tmp_path):
    """A latent guide for a pixel model: `metrics gen --gnet` stops with the one-line error of `edm2 generate`
    before loading anything else, and writes nothing."""
    latent = tmp_path / "latent.safetensors"
    ok(invoke("convert", PICKLES / "edm2_latent.pkl", latent))
    guide = ["--net", setup["net"], "--gnet", latent, "--guidance", "2", "--seeds", "0-3", "--outdir", tmp_path / "out"]
    gen = assert_one_line_error(invoke("metrics", "gen", *guide, "--ref", setup["ref"], "--detector-dir",
                                       tmp_path / "no-detectors", *GEN), "--gnet works in another space")
    generate = assert_one_line_error(invoke("generate", *guide, *GEN))
    assert gen == generate
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latent.safetensors"]


def test_reference_in_the_official_layout(setup, tmp_path):
    """`ref --dest *.pkl` writes the official EDM2 layout ({'num_images', metric: {'mu', 'sigma'}}), which `calc`
    reads back through the code-free reader (no resolution recorded there, so none is checked)."""
    ok(invoke("metrics", "ref", "--data", setup["images"], "--dest", tmp_path / "ref.pkl", "--metrics", "fd_dinov2",
              "--detector-dir", setup["det"], "--device", "cpu", "--workers", "0"))
    out = ok(invoke("metrics", "calc", "--images", setup["images"], "--ref", tmp_path / "ref.pkl", "--detector-dir",
                    setup["det"], "--device", "cpu", "--num", "10", "--seed", "1")).stdout
    name, value = out.split()[:2]
    assert name == "fd_dinov2" and 0 < float(value) < 1  # 10 of the 12 images: close to, not at, the reference


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed in this build")
def test_two_processes_give_the_results_of_one(setup):
    root = setup["root"]
    args = ["metrics", "gen", "--net", setup["net"], "--ref", setup["ref"], "--seeds", "3-12", "--detector-dir",
            setup["det"], "--batch", "3", *GEN]
    ok(invoke(*args, "--results", root / "one.json"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "edm2.cli", *map(str, args), "--results", str(root / "two.json")]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    one, two = (json.loads((root / f"{n}.json").read_text()) for n in ("one", "two"))
    assert one.keys() == two.keys()
    # float32 features from other thread counts and batch splits differ by rounding; the FD is a difference of
    # traces of order 10 here, so it agrees to about 1e-6 of them.
    assert two["fd_dinov2"] == pytest.approx(one["fd_dinov2"], abs=2e-5)
    assert (two["fd_dinov2/precision"], two["fd_dinov2/recall"]) == (one["fd_dinov2/precision"],
                                                                    one["fd_dinov2/recall"])


def test_latent_model_is_measured_through_its_vae(setup, tmp_path, tiny_vae):
    """An official latent model (SD VAE encoder) is decoded by the VAE before the feature networks: measured on
    the fly it equals measuring the PNGs that `generate` decodes (distance 0 to their statistics)."""
    latent = tmp_path / "latent.safetensors"
    ok(invoke("convert", PICKLES / "edm2_latent.pkl", latent))
    ok(invoke("generate", "--net", latent, "--vae", tiny_vae, "--seeds", "0-5", "--outdir", tmp_path / "png", *GEN))
    ok(invoke("metrics", "ref", "--data", tmp_path / "png", "--dest", tmp_path / "ref.npz", "--metrics", "fd_dinov2",
              "--detector-dir", setup["det"], "--device", "cpu", "--workers", "0"))
    ok(invoke("metrics", "gen", "--net", latent, "--vae", tiny_vae, "--ref", tmp_path / "ref.npz", "--seeds", "0-5",
              "--detector-dir", setup["det"], "--batch", "4", "--results", tmp_path / "gen.json", *GEN))
    res = json.loads((tmp_path / "gen.json").read_text())
    assert res["fd_dinov2"] == pytest.approx(0, abs=1e-6)
    # and a reference of the wrong resolution is refused before any sampling
    assert_one_line_error(invoke("metrics", "gen", "--net", latent, "--vae", tiny_vae, "--ref", setup["ref"],
                                 "--seeds", "0-5", "--detector-dir", setup["det"], *GEN), "16x16")


# ----------------------------------------------------------------------------------------------------
# Bad input.


def test_bad_input_is_one_line_and_writes_nothing(setup, tmp_path):
    det, ref, net = setup["det"], setup["ref"], setup["net"]
    out = tmp_path / "out"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(invoke("metrics", "calc", "--images", setup["images"], "--ref", ref, "--detector-dir",
                                 empty, "--device", "cpu", "--num", "12"), "dinov2_vitl14_pretrain.pth",
                          "published at https://")
    assert_one_line_error(invoke("metrics", "calc", "--images", "digits", "--ref", ref, "--detector-dir", det,
                                 "--device", "cpu"), "16x16", "8x8")
    assert_one_line_error(invoke("metrics", "calc", "--images", setup["images"], "--ref", ref, "--metrics", "fid",
                                 "--detector-dir", det, "--device", "cpu"), "no statistics for fid")
    assert_one_line_error(invoke("metrics", "gen", "--net", net, "--ref", ref, "--seeds", "0-9", "--repeats", "2",
                                 "--seed-stride", "5", "--detector-dir", det, "--outdir", out, *GEN), "overlap")
    latent = tmp_path / "latent.safetensors"
    ok(invoke("convert", PICKLES / "edm2_latent.pkl", latent))
    assert_one_line_error(invoke("metrics", "gen", "--net", latent, "--ref", ref, "--seeds", "0-3", "--detector-dir",
                                 det, "--outdir", out, "--vae", tmp_path / "no-vae", *GEN),
                          "VAE folder", "does not exist", "huggingface-cli download")
    (tmp_path / "cut.pkl").write_bytes((PICKLES / "edm2_pixel.pkl").read_bytes()[:1000])
    assert_one_line_error(invoke("metrics", "gen", "--net", tmp_path / "cut.pkl", "--ref", ref, "--detector-dir", det,
                                 "--outdir", out, *GEN), "not a readable official pickle")
    assert_one_line_error(invoke("metrics", "calc", "--images", setup["images"], "--ref", tmp_path / "cut.pkl",
                                 "--detector-dir", det, "--device", "cpu"), "not a readable official pickle")
    assert_one_line_error(invoke("metrics", "ref", "--data", setup["images"], "--dest", out / "r.txt",
                                 "--detector-dir", det), ".npz")
    assert_one_line_error(invoke("metrics", "ref", "--data", tmp_path / "absent", "--dest", out / "r.npz",
                                 "--detector-dir", det, "--device", "cpu"), "does not exist")
    assert_one_line_error(invoke("metrics", "ref", "--data", "digits", "--dest", out / "r.npz", "--metrics",
                                 "is50k", "--detector-dir", det), "unknown metric")
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.pkl", "empty", "latent.safetensors"]
