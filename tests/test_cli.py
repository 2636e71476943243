"""The `edm2` command end to end: train -> reconstruct -> generate on the built-in digits, `info`,
`--dry-run`, image-count suffixes, and one-line errors with exit code 2 that leave the out-dir untouched."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from edm2.checkpoint import Snapshot, load_network, load_snapshot, read_metadata, save_snapshot, save_tensors
from PIL import Image

from edm2.cli import main
from edm2.presets import PRESETS, NetworkConfig

TRAIN = ["--data", "digits", "--preset", "cpu-digits8", "--duration", "128", "--batch", "32", "--batch-gpu", "16",
         "--status", "64", "--snapshot", "64", "--checkpoint", "128", "--device", "cpu"]
GEN = ["--steps", "4", "--device", "cpu"]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def ok(result):
    assert result.exit_code == 0, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    return result


def assert_one_line_error(result, *fragments: str) -> str:
    """Exit code 2, a single 'edm2: error: ...' line on stderr, nothing on stdout, no traceback."""
    assert result.exit_code == 2, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    assert isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("edm2: error: "), lines[0]
    assert "Traceback" not in result.output and result.stdout == ""
    for f in fragments:
        assert f in lines[0], f"{f!r} not in {lines[0]!r}"
    return lines[0]


def dir_state(path: Path) -> dict[str, str] | None:
    """Every file and folder under `path` with a digest of its contents (None when `path` is absent)."""
    if not path.exists():
        return None
    state = {}
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path).as_posix()
        state[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return state


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        assert img.format == "PNG"
        return np.asarray(img)


def write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


# ----------------------------------------------------------------------------------------------------
# One small training run shared by the end-to-end tests (a few seconds on a CPU).


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    outdir = tmp_path_factory.mktemp("cli") / "run"
    result = ok(invoke("train", "--outdir", outdir, *TRAIN, "--seed", "0"))
    assert "finished at 128 images" in result.stdout
    return outdir


@pytest.fixture(scope="module")
def posthoc_dir(run_dir) -> Path:
    outdir = run_dir.parent / "posthoc"
    result = ok(invoke("reconstruct", "--indir", run_dir, "--outdir", outdir, "--std", "0.08,0.12"))
    assert result.stdout.count("profile error") == 2
    return outdir


@pytest.fixture(scope="module")
def net_path(posthoc_dir) -> Path:
    return posthoc_dir / "posthoc-0000000128-0.080.safetensors"


@pytest.fixture(scope="module")
def loud_net_path(net_path) -> Path:
    """The reconstructed network with its learned gains (zero at initialization, so still tiny after a few
    steps) set to 1: its output and its class labels then visibly shape the images."""
    snap = load_snapshot(net_path)
    state = {k: torch.ones_like(v) if k.endswith(("emb_gain", "out_gain")) else v for k, v in snap.state_dict.items()}
    path = net_path.parent.parent / "loud.safetensors"
    save_snapshot(path, Snapshot(state, snap.network, snap.sigma_rel, snap.nimg, snap.info))
    return path


def test_train_writes_run(run_dir):
    names = sorted(p.name for p in run_dir.iterdir())
    assert names == ["checkpoint-0000000128.safetensors", "log.txt",
                     "snapshot-0000000064-0.050.safetensors", "snapshot-0000000064-0.100.safetensors",
                     "snapshot-0000000128-0.050.safetensors", "snapshot-0000000128-0.100.safetensors",
                     "stats.jsonl", "training_options.json"]
    opts = json.loads((run_dir / "training_options.json").read_text())
    assert (opts["duration"], opts["batch"], opts["batch_gpu"], opts["status"], opts["snapshot"],
            opts["checkpoint"], opts["seed"]) == (128, 32, 16, 64, 64, 128, 0)
    assert opts["preset"] == "cpu-digits8" and opts["data"] == "digits"
    assert opts["dataset"]["num_images"] == 1797 and opts["network"]["label_dim"] == 10
    stats = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]
    assert [s["nimg"] for s in stats] == [64, 128]
    assert all(np.isfinite(s["loss"]) and s["lr"] > 0 for s in stats)
    assert "finished at 128 images" in (run_dir / "log.txt").read_text()
    assert read_metadata(run_dir / "checkpoint-0000000128.safetensors", kind="checkpoint")["nimg"] == 128
    # A snapshot alone rebuilds the network.
    net, snap = load_network(run_dir / "snapshot-0000000128-0.100.safetensors")
    assert snap.sigma_rel == 0.1 and snap.nimg == 128 and snap.info["preset"] == "cpu-digits8"
    assert net.label_dim == 10 and net.img_resolution == 8 and net.img_channels == 1
    assert not any(p.name.endswith(".tmp") for p in run_dir.iterdir())


def test_reconstruct_writes_snapshots(posthoc_dir, run_dir):
    assert sorted(p.name for p in posthoc_dir.iterdir()) == ["posthoc-0000000128-0.080.safetensors",
                                                             "posthoc-0000000128-0.120.safetensors"]
    for std in (0.08, 0.12):
        meta = read_metadata(posthoc_dir / f"posthoc-0000000128-{std:.3f}.safetensors", kind="snapshot")
        assert meta["sigma_rel"] == std and meta["nimg"] == 128 and meta["info"]["reconstructed"] is True
        assert meta["info"]["num_snapshots"] == 4
    # An earlier target time uses only the snapshots up to it.
    out64 = run_dir.parent / "posthoc64"
    ok(invoke("reconstruct", "--indir", run_dir, "--outdir", out64, "--std", "0.1", "--nimg", "64"))
    meta = read_metadata(out64 / "posthoc-0000000064-0.100.safetensors", kind="snapshot")
    assert meta["nimg"] == 64 and meta["info"]["num_snapshots"] == 2


@pytest.mark.parametrize("which", ["posthoc", "loud"])
def test_generate_same_images_whatever_the_batch(which, request, tmp_path):
    net_path = request.getfixturevalue("net_path" if which == "posthoc" else "loud_net_path")
    ok(invoke("generate", "--net", net_path, "--outdir", tmp_path / "b4", "--seeds", "0-5", "--batch", "4", *GEN))
    ok(invoke("generate", "--net", net_path, "--outdir", tmp_path / "b1", "--seeds", "0-5", "--batch", "1", *GEN))
    expected = [f"{s:06d}.png" for s in range(6)]
    assert sorted(p.name for p in (tmp_path / "b4").iterdir()) == expected
    assert sorted(p.name for p in (tmp_path / "b1").iterdir()) == expected
    images = []
    for name in expected:
        a, b = read_png(tmp_path / "b4" / name), read_png(tmp_path / "b1" / name)
        assert a.shape == (8, 8) and a.dtype == np.uint8
        assert np.array_equal(a, b), name
        images.append(a)
    assert len({img.tobytes() for img in images}) == 6  # different seeds, different images


def test_generate_churn_same_images_whatever_the_batch(loud_net_path, tmp_path):
    net_path = loud_net_path
    churn = ["--S-churn", "20", "--S-min", "0.01", "--S-max", "50", "--S-noise", "1.003", "--seeds", "7,9-10"]
    ok(invoke("generate", "--net", net_path, "--outdir", tmp_path / "b3", "--batch", "3", *churn, *GEN))
    ok(invoke("generate", "--net", net_path, "--outdir", tmp_path / "b2", "--batch", "2", *churn, *GEN))
    ok(invoke("generate", "--net", net_path, "--outdir", tmp_path / "plain", "--batch", "3", "--seeds", "7,9-10",
              *GEN))
    names = ["000007.png", "000009.png", "000010.png"]
    assert sorted(p.name for p in (tmp_path / "b3").iterdir()) == names
    for name in names:
        assert np.array_equal(read_png(tmp_path / "b3" / name), read_png(tmp_path / "b2" / name)), name
    assert any(not np.array_equal(read_png(tmp_path / "b3" / n), read_png(tmp_path / "plain" / n)) for n in names)


def test_generate_grid_and_class(loud_net_path, tmp_path):
    net_path = loud_net_path
    grid = tmp_path / "sub" / "grid.png"
    result = ok(invoke("generate", "--net", net_path, "--grid", grid, "--seeds", "0-3", "--class", "3",
                       "--batch", "4", *GEN))
    assert "wrote 4 images" in result.stdout
    img = read_png(grid)
    assert img.shape == (130, 130)  # 2x2 tiles of 8x8, each pixel repeated 8 times, a 2-pixel gap
    assert (img[64:66] == 128).all() and (img[:, 64:66] == 128).all()  # mid-gray between the tiles
    assert [p.name for p in tmp_path.iterdir()] == ["sub"]
    # The class changes the images (for the same seeds).
    ok(invoke("generate", "--net", net_path, "--grid", tmp_path / "grid5.png", "--seeds", "0-3", "--class", "5",
              "--batch", "4", *GEN))
    assert not np.array_equal(img, read_png(tmp_path / "grid5.png"))


def test_generate_guidance(net_path, posthoc_dir, tmp_path):
    result = invoke("generate", "--net", net_path, "--outdir", tmp_path / "nog", "--seeds", "0-1",
                    "--guidance", "1.5", *GEN)
    assert_one_line_error(result, "--gnet")
    assert not (tmp_path / "nog").exists()
    gnet = posthoc_dir / "posthoc-0000000128-0.120.safetensors"
    ok(invoke("generate", "--net", net_path, "--gnet", gnet, "--guidance", "1.5", "--outdir", tmp_path / "g",
              "--seeds", "0-1", "--class", "2", *GEN))
    guided = [read_png(tmp_path / "g" / f"{s:06d}.png") for s in range(2)]
    assert all(img.shape == (8, 8) for img in guided)
    # The guide with itself as the main model is the same as no guidance: D_g + w (D - D_g) = D.
    ok(invoke("generate", "--net", net_path, "--gnet", net_path, "--guidance", "1.5", "--outdir", tmp_path / "self",
              "--seeds", "0-1", "--class", "2", *GEN))
    ok(invoke("generate", "--net", net_path, "--outdir", tmp_path / "plain", "--seeds", "0-1", "--class", "2", *GEN))
    for s in range(2):
        a = read_png(tmp_path / "self" / f"{s:06d}.png").astype(int)
        b = read_png(tmp_path / "plain" / f"{s:06d}.png").astype(int)
        assert np.abs(a - b).max() <= 1


def test_generate_from_training_snapshot(run_dir, tmp_path):
    ok(invoke("generate", "--net", run_dir / "snapshot-0000000064-0.050.safetensors", "--outdir", tmp_path,
              "--seeds", "3", "--steps", "2", "--device", "cpu"))
    assert read_png(tmp_path / "000003.png").shape == (8, 8)


# ----------------------------------------------------------------------------------------------------
# info, --dry-run, image counts.


def test_info_lists_presets():
    out = ok(invoke("info")).stdout
    for name, preset in PRESETS.items():
        assert name in out and preset.description in out
    assert len(out.strip().splitlines()) == len(PRESETS)


def test_info_preset():
    out = ok(invoke("info", "--preset", "edm2-img64-s")).stdout
    assert out.startswith("edm2-img64-s: ")
    assert "parameters" in out and "GFLOPs" in out
    assert "network.model_channels" in out and "192" in out
    assert "training.lr" in out and "training.P_std" in out


def test_dry_run_prints_options_and_creates_nothing(tmp_path):
    outdir = tmp_path / "dry"
    result = ok(invoke("train", "--outdir", outdir, "--dry-run", "--data", "digits", "--preset", "cpu-digits8",
                       "--uncond", "--duration", "1Ki", "--status", "2Ki", "--snapshot", "1Mi", "--checkpoint",
                       "1.5Ki", "--batch", "64", "--batch-gpu", "32", "--lr", "0.02", "--decay", "500",
                       "--dropout", "0.1", "--P-mean", "-0.5", "--P-std", "1.2", "--seed", "5",
                       "--ema-stds", "0.04,0.09"))
    opts = json.loads(result.stdout)
    assert (opts["duration"], opts["status"], opts["snapshot"], opts["checkpoint"]) == (1024, 2048, 1 << 20, 1536)
    assert (opts["batch"], opts["batch_gpu"], opts["lr"], opts["decay"]) == (64, 32, 0.02, 500)
    assert (opts["P_mean"], opts["P_std"], opts["seed"], opts["ema_stds"]) == (-0.5, 1.2, 5, [0.04, 0.09])
    assert opts["network"]["dropout"] == 0.1 and opts["network"]["label_dim"] == 0
    assert opts["parameters"] > 0 and opts["gflops"] > 0
    assert not outdir.exists()


def test_dry_run_on_own_images_with_labels(tmp_path):
    for i in range(6):
        write_png(tmp_path / "imgs" / f"{i}.png", np.full([8, 8], 40 * i, dtype=np.uint8))
    (tmp_path / "imgs" / "dataset.json").write_text(json.dumps({"labels": [[f"{i}.png", i % 3] for i in range(6)]}))
    result = ok(invoke("train", "--outdir", tmp_path / "out", "--dry-run", "--data", tmp_path / "imgs",
                       "--preset", "cpu-digits8", "--cond", "--duration", "2Gi"))
    opts = json.loads(result.stdout)
    assert opts["duration"] == 2 << 30
    assert opts["dataset"]["num_images"] == 6 and opts["dataset"]["num_classes"] == 3
    assert opts["network"]["label_dim"] == 3
    assert not (tmp_path / "out").exists()


def test_image_count_parsing():
    from edm2.cli import parse_nimg

    assert parse_nimg("2048") == 2048
    assert parse_nimg("1Ki") == 1024 and parse_nimg("8Mi") == 8 << 20 and parse_nimg("1.5Gi") == 3 << 29
    for bad in ("", "Ki", "5Xi", "1.0001Ki", "-3", "1e3"):
        with pytest.raises(ValueError):
            parse_nimg(bad)


# ----------------------------------------------------------------------------------------------------
# Bad input: one line, exit code 2, nothing created or changed.

SMALL = NetworkConfig(img_resolution=8, img_channels=1, label_dim=3, model_channels=16, channel_mult=(1,),
                      num_blocks=1, attn_resolutions=(), use_fp16=False)


def small_snapshot(path: Path) -> Path:
    from edm2.networks import Precond

    torch.manual_seed(0)
    save_snapshot(path, Snapshot(Precond(**SMALL.to_dict()).state_dict(), SMALL, 0.1, 64, {}))
    return path


def gray_folder(root: Path, sizes=((8, 8),) * 3) -> Path:
    for i, (w, h) in enumerate(sizes):
        write_png(root / f"img{i}.png", np.full([h, w], 30 * i, dtype=np.uint8))
    return root


def case_missing_data(tmp):
    return ["train", "--data", tmp / "nowhere"], ["nowhere", "does not exist"]


def case_unreadable_image(tmp):
    gray_folder(tmp / "d")
    (tmp / "d" / "img9.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return ["train", "--data", tmp / "d"], ["img9.png", "not a readable image"]


def case_unreadable_zip(tmp):
    (tmp / "d.zip").write_bytes(b"PK\x03\x04" + bytes(100))
    return ["train", "--data", tmp / "d.zip"], ["d.zip", "not a readable zip"]


def case_mixed_sizes(tmp):
    return ["train", "--data", gray_folder(tmp / "d", [(8, 8), (8, 8), (16, 16)])], ["mixed image sizes", "img2.png"]


def case_non_square(tmp):
    return ["train", "--data", gray_folder(tmp / "d", [(8, 6)] * 2)], ["square"]


def case_channels(tmp):
    np.savez(tmp / "two.npz", x=np.zeros([4, 8, 8, 2], dtype=np.uint8), y=np.zeros(4, dtype=int))
    return ["train", "--data", tmp / "two.npz"], ["two.npz", "2 channels"]


def case_json_missing_files(tmp):
    gray_folder(tmp / "d")
    labels = [[f"img{i}.png", 0] for i in range(3)] + [["img7.png", 1]]
    (tmp / "d" / "dataset.json").write_text(json.dumps({"labels": labels}))
    return ["train", "--data", tmp / "d"], ["dataset.json", "missing", "img7.png"]


def case_json_unlabeled_image(tmp):
    gray_folder(tmp / "d")
    (tmp / "d" / "dataset.json").write_text(json.dumps({"labels": [["img0.png", 0], ["img1.png", 1]]}))
    return ["train", "--data", tmp / "d"], ["dataset.json", "img2.png"]


def case_cond_without_labels(tmp):
    return ["train", "--data", gray_folder(tmp / "d"), "--cond"], ["--cond", "labels", "--uncond"]


def case_unknown_preset(tmp):
    return ["train", "--preset", "edm2-img99-q"], ["unknown preset", "edm2-img99-q"]


def case_preset_mismatch(tmp):
    # Every preset builds its network at the data's resolution and channels (as the official code does): the
    # mismatch left is the kind of data, VAE latents for a pixel dataset.
    return ["train", "--preset", "edm2-img512-xs"], ["edm2-img512-xs", "latents", "edm2 dataset encode"]


def case_bad_image_count(tmp):
    return ["train", "--duration", "5Xi"], ["--duration", "5Xi"]


def case_fractional_image_count(tmp):
    return ["train", "--duration", "1.0001Ki"], ["whole number"]


def case_bad_batch(tmp):
    return ["train", "--batch", "30", "--batch-gpu", "8"], ["--batch 30"]


def case_unknown_option(tmp):
    return ["train", "--bogus", "1"], ["--bogus"]


def case_missing_option(tmp):
    return ["generate", "--seeds", "0-3"], ["--net"]


def case_seed_letters(tmp):
    return ["generate", "--net", small_snapshot(tmp / "s.safetensors"), "--seeds", "0-x"], ["malformed seed", "0-x"]


def case_seed_backwards(tmp):
    return ["generate", "--net", small_snapshot(tmp / "s.safetensors"), "--seeds", "1,9-3"], ["9-3"]


def case_truncated_snapshot(tmp):
    data = small_snapshot(tmp / "s.safetensors").read_bytes()
    (tmp / "s.safetensors").write_bytes(data[: len(data) // 2])
    return ["generate", "--net", tmp / "s.safetensors"], ["s.safetensors", "truncated"]


def case_random_snapshot(tmp):
    (tmp / "junk.safetensors").write_bytes(np.random.default_rng(0).bytes(2000))
    return ["generate", "--net", tmp / "junk.safetensors"], ["junk.safetensors"]


def case_foreign_safetensors(tmp):
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(4)}, str(tmp / "other.safetensors"))
    return ["generate", "--net", tmp / "other.safetensors"], ["other.safetensors", "without edm2 metadata"]


def case_checkpoint_as_net(tmp):
    save_tensors(tmp / "ckpt.safetensors", {"net/w": torch.zeros(2)}, {"kind": "checkpoint", "nimg": 64})
    return ["generate", "--net", tmp / "ckpt.safetensors"], ["ckpt.safetensors", "expected a 'snapshot'"]


def case_missing_snapshot(tmp):
    return ["generate", "--net", tmp / "gone.safetensors"], ["gone.safetensors"]


def case_foreign_guide(tmp):
    (tmp / "g.safetensors").write_bytes(b"\x00" * 64)
    return ["generate", "--net", small_snapshot(tmp / "s.safetensors"), "--gnet", tmp / "g.safetensors",
            "--guidance", "2"], ["g.safetensors"]


def case_class_out_of_range(tmp):
    return ["generate", "--net", small_snapshot(tmp / "s.safetensors"), "--class", "3"], ["class 3", "0..2"]


def case_zero_batch(tmp):
    return ["generate", "--net", small_snapshot(tmp / "s.safetensors"), "--batch", "0"], ["--batch"]


def case_nothing_to_write(tmp):
    return ["generate", "--net", small_snapshot(tmp / "s.safetensors")], ["--outdir", "--grid"]


def case_reconstruct_no_snapshots(tmp):
    (tmp / "empty").mkdir()
    return ["reconstruct", "--indir", tmp / "empty", "--std", "0.1"], ["no EMA snapshots"]


def case_reconstruct_not_a_folder(tmp):
    return ["reconstruct", "--indir", tmp / "none", "--std", "0.1"], ["not a folder"]


def case_reconstruct_bad_std(tmp):
    (tmp / "snaps").mkdir()
    return ["reconstruct", "--indir", tmp / "snaps", "--std", "0.1,abc"], ["--std", "abc"]


def case_info_unknown_preset(tmp):
    return ["info", "--preset", "nope"], ["unknown preset", "nope"]


CASES = [v for k, v in sorted(globals().items()) if k.startswith("case_")]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__[5:] for c in CASES])
def test_bad_input_one_line_exit_2(case, tmp_path):
    args, fragments = case(tmp_path)
    outdir = tmp_path / "out"
    if args[0] in ("train", "generate", "reconstruct") and case is not case_nothing_to_write:
        args = [*args, "--outdir", outdir]
    before = dir_state(tmp_path)
    result = invoke(*args)
    assert_one_line_error(result, *fragments)
    assert not outdir.exists()
    assert dir_state(tmp_path) == before


def test_outdir_with_a_different_run_is_left_alone(run_dir):
    before = dir_state(run_dir)
    result = invoke("train", "--outdir", run_dir, *TRAIN, "--seed", "1")
    assert_one_line_error(result, "different run", "seed")
    assert dir_state(run_dir) == before
    result = invoke("train", "--outdir", run_dir, *TRAIN, "--seed", "0", "--lr", "0.5")
    assert_one_line_error(result, "different run", "lr")
    assert dir_state(run_dir) == before


def test_outdir_with_other_files_is_left_alone(tmp_path):
    outdir = tmp_path / "mine"
    outdir.mkdir()
    (outdir / "notes.txt").write_text("precious\n")
    before = dir_state(outdir)
    result = invoke("train", "--outdir", outdir, *TRAIN)
    assert_one_line_error(result, "not empty")
    assert dir_state(outdir) == before


def test_reconstruct_bad_target_leaves_nothing(run_dir, tmp_path):
    outdir = tmp_path / "ph"
    for args, fragment in ((["--std", "0.5"], "outside"), (["--std", "0.1", "--nimg", "1"], "before the first"),
                           (["--std", "0.1", "--nimg", "1Ki"], "outside"), (["--std", "0.001"], "shorter")):
        result = invoke("reconstruct", "--indir", run_dir, "--outdir", outdir, *args)
        assert_one_line_error(result, fragment)
        assert not outdir.exists()


# ----------------------------------------------------------------------------------------------------
# The installed console script, in a real process.


def edm2_script() -> str:
    name = "edm2.exe" if os.name == "nt" else "edm2"
    script = Path(sysconfig.get_path("scripts")) / name
    return str(script) if script.exists() else shutil.which("edm2")


@pytest.mark.parametrize("args, fragment", [
    (["train", "--data", "{tmp}/missing-folder", "--outdir", "{tmp}/out"], "does not exist"),
    (["train", "--duration", "12Qi", "--outdir", "{tmp}/out"], "bad image count"),
], ids=["missing-data", "usage"])
def test_console_script_errors(args, fragment, tmp_path):
    script = edm2_script()
    assert script, "the edm2 console script is not installed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([script, *[a.format(tmp=tmp_path) for a in args]], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edm2: error:") and fragment in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_sample_batch_classes_depend_on_seed_only(tmp_path):
    from edm2.generate import sample_batch
    from edm2.sampling import SamplerSettings

    net, _ = load_network(small_snapshot(tmp_path / "s.safetensors"))
    _, fixed = sample_batch(net, [4, 5, 6], class_idx=2, settings=SamplerSettings(num_steps=1))
    assert fixed.tolist() == [2, 2, 2]
    _, per_image = sample_batch(net, [4, 5, 6], class_idx=[0, 2, 1], settings=SamplerSettings(num_steps=1))
    assert per_image.tolist() == [0, 2, 1]
    images, drawn = sample_batch(net, list(range(20)), settings=SamplerSettings(num_steps=2))
    assert drawn.min() >= 0 and drawn.max() <= 2 and len(set(drawn.tolist())) > 1
    alone, drawn7 = sample_batch(net, [7], settings=SamplerSettings(num_steps=2))
    assert drawn7.tolist() == [drawn[7].item()] and torch.allclose(alone[0], images[7], atol=1e-5)
    with pytest.raises(ValueError, match="outside 0..2"):
        sample_batch(net, [0], class_idx=-1)
