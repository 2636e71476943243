"""Sampling and its files against what a user, a damaged file or a full disk can do: non-finite weights are
refused (or loaded with a warning when asked), network sizes that do not fit the stored tensors and absurd
requests are refused before anything is allocated, a killed `generate` or `reconstruct` is finished by its rerun
without leftovers, and a full disk is one line naming the file, with nothing left behind."""

from __future__ import annotations

import errno
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from edm2.cli import main
from edm2.files import (
    NonFiniteWarning,
    Snapshot,
    atomic_output,
    load_network,
    load_snapshot,
    load_tensors,
    read_metadata,
    remove_stale_temps,
    save_snapshot,
    save_tensors,
)
from edm2.networks.spec import NetworkConfig, build_network

PICKLES = Path(__file__).parent / "data" / "official_pickles"
GEN = ["--steps", "2", "--device", "cpu"]
NAN_TENSOR = "unet.enc.8x8_conv.weight"
STDS = "0.05,0.06,0.07,0.08,0.09,0.1"


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def ok(result):
    assert result.exit_code == 0, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    return result


def one_line_error(result, *fragments: str, after_progress: bool = False) -> str:
    """Exit code 2 and a single 'edm2: error: ...' line on stderr holding every fragment (with `after_progress`:
    the last line, after the progress bar of the images made before the error)."""
    assert result.exit_code == 2, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if "error" in line]
    assert (lines[-1:] if after_progress else lines) == errors and len(errors) == 1, result.stderr
    assert errors[0].startswith("edm2: error: ") and "Traceback" not in result.output
    for f in fragments:
        assert f in errors[0], f"{f!r} not in {errors[0]!r}"
    return errors[0]


def temps(*folders: Path) -> list[str]:
    return sorted(p.name for folder in folders if folder.is_dir() for p in folder.glob(".*.tmp"))


@pytest.fixture(autouse=True)
def one_thread():
    """These networks are tiny: one thread samples them faster than two fighting for a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny class-conditional 8x8 model trained for 64 images: snapshots at 32 and 64 of two EMA lengths."""
    from edm2.training import TrainOptions, train

    outdir = tmp_path_factory.mktemp("hardening") / "run"
    train(TrainOptions(outdir=str(outdir), data="digits", preset="cpu-tiny8", batch=16, duration=64, status=32,
                       snapshot=32, checkpoint=32), progress=False)
    return outdir


@pytest.fixture
def net(run) -> Path:
    return run / "snapshot-0000000064-0.100.safetensors"


def with_nan(src: Path, dest: Path, name: str = NAN_TENSOR) -> Path:
    """A copy of the snapshot `src` whose tensor `name` holds a NaN."""
    tensors, meta = load_tensors(src)
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = float("nan")
    save_tensors(dest, tensors, meta)
    return dest


def with_network(src: Path, dest: Path, **changes) -> Path:
    """A copy of the snapshot `src` whose metadata claims other network sizes."""
    tensors, meta = load_tensors(src)
    save_tensors(dest, tensors, {**meta, "network": {**meta["network"], **changes}})
    return dest


def nan_pickle(dest: Path) -> Path:
    """The official test pickle with one weight of `unet.emb_noise.weight` (float16) made NaN in its bytes."""
    from edm2.files.pickles import read_pickle

    raw = (PICKLES / "edm2_pixel.pkl").read_bytes()
    stored = read_pickle(PICKLES / "edm2_pixel.pkl")["ema"].state_dict()["unet.emb_noise.weight"]
    at = raw.find(stored.numpy().tobytes())
    assert at > 0
    dest.write_bytes(raw[:at] + np.float16(np.nan).tobytes() + raw[at + 2:])
    return dest


# ----------------------------------------------------------------------------------------------------
# 1. Non-finite weights.


def test_a_snapshot_with_nan_weights_is_refused_naming_the_tensor(net, tmp_path):
    bad = with_nan(net, tmp_path / "nan.safetensors")
    with pytest.raises(ValueError, match=f"nan.safetensors: tensor '{NAN_TENSOR}' holds NaN"):
        load_snapshot(bad)
    with pytest.raises(ValueError, match=f"tensor '{NAN_TENSOR}'.*allow_nonfinite"):
        load_network(bad)
    good = load_snapshot(net)
    state = {**good.state_dict, NAN_TENSOR: torch.full_like(good.state_dict[NAN_TENSOR], float("inf"))}
    in_memory = Snapshot(state, good.network, 0.1, 64, {})
    with pytest.raises(ValueError, match=NAN_TENSOR):
        in_memory.build()
    with pytest.warns(NonFiniteWarning, match=NAN_TENSOR):
        built, _ = load_network(bad, allow_nonfinite=True)
    assert torch.isnan(built.state_dict()[NAN_TENSOR]).any()

    out = tmp_path / "out"
    one_line_error(invoke("generate", "--net", bad, "--outdir", out, "--seeds", "0-1", *GEN),
                   "nan.safetensors", NAN_TENSOR, "--allow-nonfinite")
    assert not out.exists()
    result = ok(invoke("generate", "--net", bad, "--outdir", out, "--seeds", "0-1", "--allow-nonfinite", *GEN))
    warned = [line for line in result.stderr.splitlines() if line.startswith("edm2: warning: ")]
    assert len(warned) == 1 and NAN_TENSOR in warned[0], result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["000000.png", "000001.png"]


def test_an_official_pickle_with_nan_weights_is_refused_by_convert_and_loading(tmp_path):
    bad = nan_pickle(tmp_path / "nan.pkl")
    dest = tmp_path / "net.safetensors"
    one_line_error(invoke("convert", bad, dest), "nan.pkl", "unet.emb_noise.weight", "--allow-nonfinite")
    assert not dest.exists() and temps(tmp_path) == []
    with pytest.raises(ValueError, match="unet.emb_noise.weight"):
        load_network(bad)
    result = ok(invoke("convert", bad, dest, "--allow-nonfinite"))
    assert "edm2: warning: " in result.stderr and "unet.emb_noise.weight" in result.stderr
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonFiniteWarning)
        assert torch.isnan(load_snapshot(dest, allow_nonfinite=True).state_dict["unet.emb_noise.weight"]).any()


def test_reconstruction_refuses_a_nan_snapshot_before_writing(run, tmp_path):
    from edm2.ema.reconstruct import posthoc_reconstruct

    folder = tmp_path / "snaps"
    folder.mkdir()
    for path in run.glob("snapshot-*.safetensors"):
        shutil.copy(path, folder / path.name)
    with_nan(run / "snapshot-0000000064-0.050.safetensors", folder / "snapshot-0000000064-0.050.safetensors")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=f"snapshot-0000000064-0.050.safetensors: tensor '{NAN_TENSOR}'"):
        posthoc_reconstruct(folder, out, [0.06, 0.08], batch=1)
    assert not out.exists()
    one_line_error(invoke("reconstruct", "--indir", folder, "--outdir", out, "--std", "0.07"),
                   "snapshot-0000000064-0.050.safetensors", NAN_TENSOR)
    assert not out.exists()


# ----------------------------------------------------------------------------------------------------
# 2. Huge values: refused at once, before anything is allocated.


@pytest.fixture
def no_real_build(monkeypatch, net):
    """Building any network but the trained one for real (not on the meta device) fails the test at once, instead
    of trying to allocate what damaged sizes ask for."""
    import edm2.files.pickle_convert as pickle_convert
    import edm2.files.snapshot as snapshot

    known = [load_snapshot(net).network]

    def guarded(spec, *args, **kwargs):
        meta = torch.empty(0).device.type == "meta"
        if not meta and spec not in known:
            raise AssertionError(f"a network was built for real from damaged sizes: {spec}")
        return build_network(spec, *args, **kwargs)

    monkeypatch.setattr(snapshot, "build_network", guarded)
    monkeypatch.setattr(pickle_convert, "build_network", guarded)
    return known


@pytest.mark.parametrize("changes, fragment", [
    ({"model_channels": 10**7}, "describes about"),
    ({"img_resolution": 10**6}, "img_resolution 1000000"),
    ({"num_blocks": 10**6}, "describes about"),
    ({"label_dim": 10**9}, "describes about"),
    ({"model_channels": 32}, "do not fit"),
    ({"channel_mult": [1, 2, 2]}, "do not fit"),
])
def test_network_sizes_that_do_not_fit_the_stored_tensors_are_refused(net, tmp_path, no_real_build, changes,
                                                                       fragment):
    bad = with_network(net, tmp_path / "bad.safetensors", **changes)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=fragment) as caught:
        load_network(bad)
    assert time.perf_counter() - start < 10
    assert "bad.safetensors" in str(caught.value) and "\n" not in str(caught.value)
    one_line_error(invoke("generate", "--net", bad, "--outdir", tmp_path / "out", *GEN), "bad.safetensors", fragment)


def test_an_official_pickle_with_damaged_sizes_is_refused_before_building(no_real_build):
    from edm2.files.pickle_convert import network_from_record
    from edm2.files.pickles import read_pickle

    record = read_pickle(PICKLES / "edm2_pixel.pkl")["ema"]
    record.init_kwargs["model_channels"] = 10**7
    with pytest.raises(ValueError, match="Precond: its network config .* describes about"):
        network_from_record(record)


@pytest.fixture
def no_giant_lists(monkeypatch):
    """`range` in the seed parser refuses giant ranges, so that materializing one fails at once."""
    import edm2.cli.params as params

    def guarded(*args):
        r = range(*args)
        if len(r) > 10**8:
            raise AssertionError(f"a list of {len(r)} seeds was about to be made")
        return r

    monkeypatch.setattr(params, "range", guarded, raising=False)


def test_huge_requests_are_refused_in_one_line(net, tmp_path, no_giant_lists):
    from edm2.cli.params import MAX_SEEDS, parse_seeds

    out = tmp_path / "out"
    base = ["generate", "--net", net, "--outdir", out, *GEN]
    one_line_error(invoke(*base, "--seeds", "0-10000000000000"), "10000000000001", str(MAX_SEEDS))
    one_line_error(invoke(*base, "--seeds", f"5,0-{MAX_SEEDS}"), "more than")
    assert parse_seeds("0-2,7,10-11") == [0, 1, 2, 7, 10, 11]
    one_line_error(invoke(*base, "--seeds", "0", "--class", str(10**20)), f"class {10**20}", "0..9")
    for batch in ("0", "-3", str(10**12)):
        one_line_error(invoke(*base, "--seeds", "0", "--batch", batch), "--batch", batch)
    assert not out.exists()


# ----------------------------------------------------------------------------------------------------
# 3. Leftovers of a killed run: removed by its rerun, whose files equal those of an uninterrupted run.

# The command, with every write of an output slowed down (a torn file in place for a while), so that a kill at a
# random moment of the writing phase lands inside a write.
KILLABLE = textwrap.dedent("""
    import sys, time
    import safetensors.torch
    from PIL import Image

    real_png, real_tensors = Image.Image.save, safetensors.torch.save_file

    def slow_png(self, fp, *args, **kwargs):
        if str(fp).endswith(".tmp"):
            with open(fp, "wb") as f:
                f.write(b"torn")
            time.sleep(0.02)
        return real_png(self, fp, *args, **kwargs)

    def slow_tensors(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"torn")
        time.sleep(0.3)
        return real_tensors(tensors, filename, metadata=metadata)

    Image.Image.save, safetensors.torch.save_file = slow_png, slow_tensors
    from edm2.cli import main
    main(sys.argv[1:])
""")


def kill_while_writing(args: list, folder: Path, seed: int, log: Path) -> None:
    """Run `edm2 ARGS` in a subprocess and SIGKILL it at a random moment (seeded) of its writing phase, while a
    temporary is in `folder`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-c", KILLABLE, *map(str, args)], stdout=subprocess.DEVNULL,
                                stderr=err, env=env)
    try:
        deadline = time.monotonic() + 120
        while not (folder.is_dir() and any(folder.iterdir())):  # the writing has started
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.005)
        time.sleep(random.Random(seed).uniform(0, 0.8))
        while not temps(folder):
            assert proc.poll() is None and time.monotonic() < deadline, "finished before it could be killed"
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_killed_generate_is_finished_by_its_rerun(net, tmp_path):
    out, grids = tmp_path / "out", tmp_path / "grids"
    args = ["generate", "--net", net, "--outdir", out, "--grid", grids / "grid.png", "--seeds", "0-199",
            "--batch", "8", *GEN]
    kill_while_writing(args, out, seed=1, log=tmp_path / "killed.log")
    assert temps(out) and all(".png." in n for n in temps(out))  # killed inside a write
    assert len(list(out.glob("*.png"))) < 200
    grids.mkdir()
    (grids / ".grid.png.k1ll3d00.tmp").write_bytes(b"torn")  # as if killed while writing the grid
    (grids / ".notes.tmp").write_text("not ours")
    ok(invoke(*args))
    assert temps(out) == [] and temps(grids) == [".notes.tmp"]
    reference = tmp_path / "reference"
    ok(invoke("generate", "--net", net, "--outdir", reference, "--grid", reference / "grid.png", "--seeds",
              "0-199", "--batch", "8", *GEN))
    assert files_of(out) | {"grid.png": (grids / "grid.png").read_bytes()} == files_of(reference)
    assert len(files_of(out)) == 200


def test_a_killed_reconstruct_is_finished_by_its_rerun(run, tmp_path):
    out = tmp_path / "rec"
    args = ["reconstruct", "--indir", run, "--outdir", out, "--std", STDS, "--batch", "2"]
    kill_while_writing(args, out, seed=2, log=tmp_path / "killed.log")
    assert temps(out) and all(n.startswith(".posthoc-") for n in temps(out))
    ok(invoke(*args))
    assert temps(out) == []
    reference = tmp_path / "reference"
    ok(invoke("reconstruct", "--indir", run, "--outdir", reference, "--std", STDS, "--batch", "2"))
    assert files_of(out) == files_of(reference) and len(files_of(out)) == 6


def test_the_cleanup_spares_live_writers_and_other_files(tmp_path):
    (tmp_path / ".notes.tmp").write_text("not ours")
    with atomic_output(tmp_path / "a.png") as tmp:
        tmp.write_bytes(b"half")
        assert remove_stale_temps(tmp_path, "*.png") == []  # a live writer's temporary stays
        assert remove_stale_temps(tmp_path) == [tmp_path / ".notes.tmp"]
        assert tmp.exists()
    assert (tmp_path / "a.png").read_bytes() == b"half" and temps(tmp_path) == []


def test_a_rerun_with_subdirs_cleans_the_seed_folders(tmp_path):
    from edm2.generate import remove_stale_png_temps

    for folder in (tmp_path, tmp_path / "001000"):
        folder.mkdir(exist_ok=True)
        (folder / ".001234.png.k1ll3d00.tmp").write_bytes(b"torn")
        (folder / ".notes.tmp").write_text("not ours")
    assert len(remove_stale_png_temps(tmp_path, subdirs=True)) == 2
    assert temps(tmp_path) == temps(tmp_path / "001000") == [".notes.tmp"]


# ----------------------------------------------------------------------------------------------------
# 4. Messages.


def unconditional(path: Path) -> Path:
    config = NetworkConfig(img_resolution=8, img_channels=1, label_dim=0, model_channels=16, channel_mult=(1, 2),
                           num_blocks=1, attn_resolutions=(), use_fp16=False)
    torch.manual_seed(0)
    save_snapshot(path, Snapshot(build_network(config).state_dict(), config, 0.1, 64, {}))
    return path


def test_messages_tell_what_is_wrong(run, net, tmp_path):
    out = tmp_path / "out"
    one_line_error(invoke("generate", "--net", net, "--outdir", out, "--seeds", "1,1,2", *GEN), "seed 1", "twice")
    one_line_error(invoke("generate", "--net", net, "--outdir", out, "--seeds", "0-5,3-9", *GEN), "seed 3", "twice")
    uncond = unconditional(tmp_path / "uncond.safetensors")
    one_line_error(invoke("generate", "--net", uncond, "--outdir", out, "--seeds", "0", "--class", "3", *GEN),
                   "class 3", "unconditional", "--class")
    assert not out.exists()
    ok(invoke("generate", "--net", uncond, "--outdir", out, "--seeds", "0-1", *GEN))
    line = one_line_error(invoke("generate", "--net", run, "--outdir", out, *GEN), "is a folder", "snapshot file")
    assert "no such file" not in line and "snapshot-0000000064-0.100.safetensors" in line
    with pytest.raises(ValueError, match="is a folder"):
        read_metadata(run)


# ----------------------------------------------------------------------------------------------------
# 5. A full disk: one line naming the file, exit code 2, no temporary left.


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_while_writing_pngs_or_a_grid(net, tmp_path, monkeypatch):
    from PIL import Image

    real = Image.Image.save

    def full_for(part: str):
        def save(self, fp, *args, **kwargs):
            if part in str(fp):
                Path(fp).write_bytes(b"torn")
                disk_full()
            return real(self, fp, *args, **kwargs)
        return save

    out, grids = tmp_path / "out", tmp_path / "grids"
    monkeypatch.setattr(Image.Image, "save", full_for(".000000.png."))
    one_line_error(invoke("generate", "--net", net, "--outdir", out, "--seeds", "0-3", *GEN),
                   "no space left on device", str(out / "000000.png"))
    assert temps(out) == []
    monkeypatch.setattr(Image.Image, "save", full_for(".grid.png."))
    one_line_error(invoke("generate", "--net", net, "--grid", grids / "grid.png", "--seeds", "0-3", *GEN),
                   "no space left on device", str(grids / "grid.png"), after_progress=True)
    assert temps(grids) == [] and not (grids / "grid.png").exists()


def test_a_full_disk_while_writing_a_snapshot(run, tmp_path, monkeypatch):
    from safetensors import SafetensorError

    import edm2.files.base as base

    def torn_then_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"torn")
        disk_full()

    monkeypatch.setattr(base, "save_file", torn_then_full)
    dest = tmp_path / "net.safetensors"
    one_line_error(invoke("convert", PICKLES / "edm2_pixel.pkl", dest), "no space left on device", str(dest))
    assert not dest.exists() and temps(tmp_path) == []
    out = tmp_path / "rec"
    one_line_error(invoke("reconstruct", "--indir", run, "--outdir", out, "--std", "0.07"),
                   "no space left on device", str(out / "posthoc-0000000064-0.070.safetensors"))
    assert temps(out) == [] and list(out.iterdir()) == []

    def rust_full(tensors, filename, metadata=None):  # how safetensors' own writer reports a full disk
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No '
                              'space left on device" })')

    monkeypatch.setattr(base, "save_file", rust_full)
    one_line_error(invoke("convert", PICKLES / "edm2_pixel.pkl", dest), "no space left on device", str(dest))
    assert temps(tmp_path) == []


def test_a_full_disk_while_writing_metrics_results(tmp_path, monkeypatch, capsys):
    from edm2.cli.app import friendly_errors
    from edm2.cli.metrics import _report

    real = Path.write_text

    def write_text(self, *args, **kwargs):
        if self.name.endswith(".tmp"):
            real(self, "{")
            disk_full()
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    results = tmp_path / "results" / "fid.json"
    with pytest.raises(SystemExit) as caught:
        friendly_errors(_report)({"fid": 1.5}, str(results))
    assert caught.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "no space left on device" in lines[0] and str(results) in lines[0], lines
    assert temps(results.parent) == [] and not results.exists()
