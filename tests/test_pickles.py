"""Official network pickles read without running code: conversion reproduces the official networks' outputs (EDM2
and EDM), the records of EDM pickles have the official layout, and hostile or damaged pickles are refused with one
line.

`tests/data/official_pickles/` holds pickles written by the official code (their embedded module source replaced by
a placeholder line) and `expected.npz`, the outputs of the official networks after unpickling (README of the golden
data). The hostile pickles are made here."""

from __future__ import annotations

import io
import json
import os
import pickle
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from edm2.checkpoint import load_network, load_snapshot
from edm2.pickle_convert import convert_network_pickle, kimg_to_nimg
from edm2.pickles import Record, read_pickle

from edm2.cli import main
from edm2.networks import Precond

PICKLES = Path(__file__).parent / "data" / "official_pickles"
EXPECTED = dict(np.load(PICKLES / "expected.npz"))


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, *fragments: str) -> str:
    assert result.exit_code == 2, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edm2: error: "), result.stderr
    assert "Traceback" not in result.output and result.stdout == ""
    for f in fragments:
        assert f in lines[0], f"{f!r} not in {lines[0]!r}"
    return lines[0]


def kwargs_of(name: str) -> dict:
    return json.loads(str(EXPECTED[f"{name}/kwargs_json"]))


# ----------------------------------------------------------------------------------------------------
# EDM2 pickles: converted networks give the official outputs.


@pytest.mark.parametrize("name", ["edm2_latent", "edm2_pixel"])
def test_converted_network_reproduces_official_outputs(name, tmp_path):
    result = invoke("convert", PICKLES / f"{name}.pkl", tmp_path / "net.safetensors")
    assert result.exit_code == 0, result.output
    net, snap = load_network(tmp_path / "net.safetensors")
    kwargs = kwargs_of(name)
    assert {k: getattr(snap.network, k) for k in kwargs} == {k: tuple(v) if isinstance(v, list) else v
                                                            for k, v in kwargs.items()}
    assert all(v.dtype == torch.float32 for v in snap.state_dict.values())
    x, sigma = torch.from_numpy(EXPECTED[f"{name}/x"]), torch.from_numpy(EXPECTED[f"{name}/sigma"])
    labels = torch.from_numpy(EXPECTED[f"{name}/labels"]) if f"{name}/labels" in EXPECTED else None
    with torch.no_grad():
        D_x, logvar = net(x, sigma, labels, return_logvar=True)
    np.testing.assert_allclose(D_x.numpy(), EXPECTED[f"{name}/D_x"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(logvar.numpy(), EXPECTED[f"{name}/logvar"], atol=1e-4, rtol=0)


def test_encoder_and_loss_are_carried_in_official_terms():
    latent = convert_network_pickle(PICKLES / "edm2_latent.pkl")
    assert latent.encoder == {"class": "StabilityVAEEncoder", "kwargs": {
        "vae_name": "stabilityai/sd-vae-ft-mse", "raw_mean": [5.81, 3.25, 0.12, -2.15],
        "raw_std": [4.17, 4.62, 3.71, 3.28], "final_mean": 0, "final_std": 0.5}}
    assert latent.info["loss"] == {"class": "EDM2Loss", "kwargs": {"P_mean": -0.4, "P_std": 1.0, "sigma_data": 0.5}}
    assert latent.info["dataset_kwargs"]["use_labels"] is True
    pixel = convert_network_pickle(PICKLES / "edm2_pixel.pkl")
    assert pixel.encoder == {"class": "StandardRGBEncoder", "kwargs": {}}
    # The official EMA averages parameters and copies buffers (the Fourier features).
    buffers = {n for n, _ in Precond(**pixel.network.to_dict()).named_buffers()}
    assert set(pixel.parameter_names) == set(pixel.state_dict) - buffers and buffers


def test_load_network_converts_a_pickle_on_the_fly_with_a_warning(tmp_path):
    with pytest.warns(UserWarning, match="converted on the fly"):
        net_pkl, snap_pkl = load_network(PICKLES / "edm2_pixel.pkl")
    assert invoke("convert", PICKLES / "edm2_pixel.pkl", tmp_path / "n.safetensors").exit_code == 0
    net, snap = load_network(tmp_path / "n.safetensors")
    assert snap.encoder == snap_pkl.encoder and snap.network == snap_pkl.network
    for (k, a), (k2, b) in zip(net.state_dict().items(), net_pkl.state_dict().items()):
        assert k == k2 and torch.equal(a, b)


def test_converted_snapshots_feed_reconstruct_and_generate(tmp_path):
    """Official snapshot names give time and EMA length; a reconstruction from identical weights is those weights,
    and generating from the converted file equals generating from the pickle."""
    src, conv = tmp_path / "pkl", tmp_path / "conv"
    src.mkdir()
    for kimg in (16777,):
        for std in (0.05, 0.10):
            name = f"network-snapshot-{kimg:07d}-{std:.3f}"
            (src / f"{name}.pkl").write_bytes((PICKLES / "edm2_pixel.pkl").read_bytes())
            assert invoke("convert", src / f"{name}.pkl", conv / f"{name}.safetensors").exit_code == 0
    snap = load_snapshot(conv / "network-snapshot-0016777-0.050.safetensors")
    assert (snap.nimg, snap.sigma_rel) == (kimg_to_nimg(16777), 0.05) == (16 << 20, 0.05)
    result = invoke("reconstruct", "--indir", conv, "--outdir", tmp_path / "ph", "--std", "0.08")
    assert result.exit_code == 0, result.output
    (out,) = sorted((tmp_path / "ph").glob("*.safetensors"))
    recon = load_snapshot(out)
    assert recon.encoder == {"class": "StandardRGBEncoder", "kwargs": {}}
    for k, v in snap.state_dict.items():
        torch.testing.assert_close(recon.state_dict[k], v, rtol=1e-5, atol=1e-6)

    gen = ["--seeds", "0-1", "--steps", "2", "--device", "cpu"]
    assert invoke("generate", "--net", conv / "network-snapshot-0016777-0.100.safetensors", "--outdir",
                  tmp_path / "a", *gen).exit_code == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert invoke("generate", "--net", PICKLES / "edm2_pixel.pkl", "--outdir", tmp_path / "b", *gen).exit_code == 0
    for png in ("000000.png", "000001.png"):
        assert (tmp_path / "a" / png).read_bytes() == (tmp_path / "b" / png).read_bytes()


# ----------------------------------------------------------------------------------------------------
# EDM (2022) pickles: read generically, converted to edm2's EDM networks.


@pytest.mark.parametrize("name,loss", [("edm_vp", "VPLoss"), ("edm_edm_adm", "EDMLoss")])
def test_edm_pickles_are_read_as_records(name, loss):
    data = read_pickle(PICKLES / f"{name}.pkl")
    assert set(data) == {"ema", "loss_fn", "augment_pipe", "dataset_kwargs"}
    kwargs = kwargs_of(name)
    ema = data["ema"]
    assert ema.class_name == kwargs.pop("precond") and ema.persistent
    assert ema.init_kwargs == kwargs
    model = ema.modules["model"]
    assert model.class_name == kwargs["model_type"]
    assert data["loss_fn"].class_name == loss
    if name == "edm_vp":
        assert data["augment_pipe"].class_name == "AugmentPipe" and data["augment_pipe"].init_kwargs["p"] == 0.12
    else:
        assert data["augment_pipe"] is None
    assert all(v.dtype == torch.float32 for v in ema.state_dict().values())


@pytest.mark.parametrize("name", ["edm_vp", "edm_edm_adm"])
def test_converted_edm_network_reproduces_official_outputs(name, tmp_path):
    """EDM (2022) pickles convert to edm2's EDM networks (built from the recorded flat arguments) with the
    official outputs; tolerance of the golden EDM networks: atol 2e-5 + 1e-4 max|D_x| (VP outputs reach ~300)."""
    assert invoke("convert", PICKLES / f"{name}.pkl", tmp_path / "net.safetensors").exit_code == 0
    net, snap = load_network(tmp_path / "net.safetensors")
    kwargs = kwargs_of(name)
    assert snap.network.class_name == kwargs.pop("precond") == type(net).__name__
    assert {k: snap.network.kwargs[k] for k in kwargs} == kwargs
    assert snap.encoder == {"class": "StandardRGBEncoder", "kwargs": {}} and snap.sigma_rel is None
    x, sigma = torch.from_numpy(EXPECTED[f"{name}/x"]), torch.from_numpy(EXPECTED[f"{name}/sigma"])
    with torch.no_grad():
        D_x = net(x, sigma, torch.from_numpy(EXPECTED[f"{name}/labels"]))
    expected = EXPECTED[f"{name}/D_x"]
    np.testing.assert_allclose(D_x.numpy(), expected, rtol=0, atol=2e-5 + 1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("name,case", [("edm_vp", "vp_ddpmpp"), ("edm_edm_adm", "edm_adm")])
def test_edm_records_have_the_official_state_dict_layout(name, case):
    """Names and shapes of the tensors read from the pickle equal the state dict of the official constructor with
    the same architecture arguments (golden edm_nets.npz; its ADM case also has the 9-dim augment mapping, which
    this pickle's network was built without)."""
    layout = {k: tuple(s) for k, s in json.loads((PICKLES / "edm_state_layouts.json").read_text())[case]}
    if "augment_dim" not in kwargs_of(name):
        del layout["model.map_augment.weight"]
    sd = read_pickle(PICKLES / f"{name}.pkl")["ema"].state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == layout


# ----------------------------------------------------------------------------------------------------
# Hostile pickles: refused with one line, nothing written or run.


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def persistence(monkeypatch):
    """A stand-in `torch_utils.persistence` module, so that the test can write pickles in the official layout:
    `Persistent(meta)` pickles as a call to `torch_utils.persistence._reconstruct_persistent_obj(meta)`."""
    pkg, mod = types.ModuleType("torch_utils"), types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):  # never called: the tests only write pickles
        raise AssertionError("the test stand-in must not be called")

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    mod._reconstruct_persistent_obj = _reconstruct_persistent_obj
    pkg.persistence = mod
    monkeypatch.setitem(sys.modules, "torch_utils", pkg)
    monkeypatch.setitem(sys.modules, "torch_utils.persistence", mod)

    class Persistent:
        def __init__(self, meta: dict) -> None:
            self.meta = meta

        def __reduce__(self):
            return _reconstruct_persistent_obj, (self.meta,)

    def record(module: torch.nn.Module, class_name: str, src: str, init_kwargs: dict | None = None) -> Persistent:
        state = {"training": False, "_parameters": dict(module._parameters), "_buffers": dict(module._buffers),
                 "_non_persistent_buffers_set": set(), "_init_args": (), "_init_kwargs": init_kwargs or {},
                 "_modules": {n: None if m is None else record(m, type(m).__name__, src)
                              for n, m in module._modules.items()}}
        return Persistent({"type": "class", "version": 6, "module_src": src, "class_name": class_name,
                           "state": state})

    return record


# ----------------------------------------------------------------------------------------------------
# A folder of official raw snapshots (`network-snapshot-<kimg>-<std>.pkl`, float16) reconstructed directly.

_RAW_KWARGS = dict(img_resolution=8, img_channels=1, label_dim=0, model_channels=16, channel_mult=[1, 2],
                   num_blocks=1, attn_resolutions=[], use_fp16=False)


def _raw_snapshot(persistence, path: Path, seed: int, kwargs: dict = _RAW_KWARGS) -> None:
    """One raw snapshot as the official training writes it: the EMA network in float16 under 'ema'."""
    torch.manual_seed(0)
    net = Precond(**kwargs).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 + 0.1 * torch.randn(p.shape, generator=gen))
    data = {"ema": persistence(net.half(), "Precond", "class Precond: pass\n", kwargs), "encoder": None,
            "loss_fn": None, "dataset_kwargs": {"path": "digits"}}
    path.write_bytes(pickle.dumps(data))


@pytest.fixture
def raw_folder(persistence, tmp_path) -> Path:
    """Eight snapshot times (every 1024 images, named by kimg as the official training names them), two averages
    each, and the snapshot at time 0 that the official script leaves out."""
    folder = tmp_path / "raw"
    folder.mkdir()
    for k in range(9):
        for j, std in enumerate((0.05, 0.10)):
            _raw_snapshot(persistence, folder / f"network-snapshot-{k * 1024 // 1000:07d}-{std:.3f}.pkl", 10 * k + j)
    return folder


def test_raw_pickle_snapshots_reconstruct_like_their_converted_snapshots(raw_folder, tmp_path):
    """`reconstruct_phema.py`'s command line on the official raw snapshots gives float16 outputs equal to the
    reconstruction from the converted snapshots, rounded to float16: the same float32 sums of the same values."""
    conv = tmp_path / "conv"
    for path in sorted(raw_folder.glob("*.pkl"))[2:]:  # time 0 left out, as the official script does
        assert invoke("convert", path, conv / f"{path.stem}.safetensors").exit_code == 0
    result = invoke("reconstruct", f"--indir={raw_folder}", f"--outdir={tmp_path / 'from_pkl'}",
                    "--outstd=0.070,0.080,...,0.100", "--outkimg=8")
    assert result.exit_code == 0, result.output
    assert invoke("reconstruct", "--indir", conv, "--outdir", tmp_path / "from_conv", "--std", "0.07:0.10:0.01",
                  "--nimg", "8Ki").exit_code == 0
    names = sorted(p.name for p in (tmp_path / "from_pkl").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "from_conv").iterdir()) and len(names) == 4
    assert "from 16 snapshots" in result.output
    for name in names:
        ours, theirs = load_snapshot(tmp_path / "from_pkl" / name), load_snapshot(tmp_path / "from_conv" / name)
        assert ours.nimg == theirs.nimg == 8192 and ours.network == theirs.network
        assert ours.encoder == theirs.encoder == {"class": "StandardRGBEncoder", "kwargs": {}}
        assert set(ours.averaged_names) == set(theirs.averaged_names)
        for k, v in theirs.state_dict.items():
            assert ours.state_dict[k].dtype == torch.float16 and torch.equal(ours.state_dict[k], v.half()), k
        net, _ = load_network(tmp_path / "from_pkl" / name)  # a float16 snapshot builds the float32 network
        assert all(torch.equal(net.state_dict()[k], v.float()) for k, v in ours.state_dict.items())


def test_unreadable_raw_snapshot_is_one_line_and_nothing_is_written(persistence, raw_folder, tmp_path):
    out = tmp_path / "out"
    args = ("reconstruct", "--indir", raw_folder, "--outdir", out, "--outstd", "0.08")
    later = raw_folder / "network-snapshot-0000005-0.100.pkl"
    data = later.read_bytes()
    later.write_bytes(data[: len(data) // 2])  # read while streaming, after the first one was converted
    assert_one_line_error(invoke(*args), later.name, "not a readable official pickle")
    assert not out.exists()
    _raw_snapshot(persistence, later, 0, {**_RAW_KWARGS, "model_channels": 8})  # another network
    assert_one_line_error(invoke(*args), later.name, "another network")
    assert not out.exists()
    first = raw_folder / "network-snapshot-0000001-0.050.pkl"
    later.write_bytes(data)
    first.write_bytes(pickle.dumps({"ema": _RunsCode(tmp_path / "pwned")}))  # read by the scan
    assert_one_line_error(invoke(*args), first.name, "refused")
    assert not out.exists() and not (tmp_path / "pwned").exists()


def test_module_src_is_never_run(persistence, tmp_path):
    """A valid network whose recorded source would write a file converts, and the file never appears; an unknown
    class with such source is refused."""
    marker = tmp_path / "pwned"
    src = f"open({str(marker)!r}, 'w').write('ran')\nclass Precond: pass\n"
    kwargs = dict(img_resolution=8, img_channels=1, label_dim=0, model_channels=16, channel_mult=[1, 2],
                  num_blocks=1, attn_resolutions=[], use_fp16=False)
    torch.manual_seed(0)
    ours = Precond(**kwargs).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.3)  # gains away from zero so that the whole network shows in the output
    (tmp_path / "ok.pkl").write_bytes(pickle.dumps({"ema": persistence(ours, "Precond", src, kwargs)}))
    evil = persistence(torch.nn.Module(), "Pwn", src)
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"ema": evil, "encoder": evil}))

    assert invoke("convert", tmp_path / "ok.pkl", tmp_path / "ok.safetensors").exit_code == 0
    net, _ = load_network(tmp_path / "ok.safetensors")
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(net(x, torch.tensor([0.5, 2.0])), ours(x, torch.tensor([0.5, 2.0])))
    assert_one_line_error(invoke("convert", tmp_path / "evil.pkl", tmp_path / "evil.safetensors"), "Pwn")
    assert not marker.exists() and not (tmp_path / "evil.safetensors").exists()


def _refused(tmp_path: Path, data: bytes, *fragments: str) -> None:
    (tmp_path / "in.pkl").write_bytes(data)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert_one_line_error(invoke("convert", tmp_path / "in.pkl", tmp_path / "out" / "x.safetensors"), *fragments)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, not even the folder


def test_code_in_the_network_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    _refused(tmp_path, pickle.dumps({"ema": _RunsCode(marker)}), "refused", "system")
    assert not marker.exists()


def test_unknown_global_is_refused(tmp_path):
    import datetime

    _refused(tmp_path, pickle.dumps({"ema": datetime.date(2024, 1, 1)}), "refused", "datetime.date")


def test_damaged_and_foreign_pickles(tmp_path):
    data = (PICKLES / "edm2_pixel.pkl").read_bytes()
    _refused(tmp_path, data[: len(data) // 2], "not a readable official pickle")
    _refused(tmp_path, pickle.dumps([1, 2, 3]), "not an official network snapshot", "list")
    _refused(tmp_path, pickle.dumps({"net": 1}), "not an official network snapshot", "no 'ema'")
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buf)
    _refused(tmp_path, buf.getvalue(), "zip archive")
    assert_one_line_error(invoke("convert", tmp_path / "absent.pkl", tmp_path / "x.safetensors"), "no such file")
    assert_one_line_error(invoke("convert", PICKLES / "edm2_pixel.pkl", tmp_path / "x.pt"), ".safetensors")


def test_record_state_dict_follows_torch_naming():
    """`Record.state_dict` names tensors as torch does (nested modules, persistent buffers only)."""
    r = Record("A", True, parameters={"w": torch.ones(1)}, buffers={"b": torch.zeros(1), "tmp": torch.ones(2)},
               attributes={"_non_persistent_buffers_set": {"tmp"}},
               modules={"sub": Record("B", True, parameters={"v": torch.ones(3)}), "none": None})
    assert {k: tuple(v.shape) for k, v in r.state_dict().items()} == {"w": (1,), "b": (1,), "sub.v": (3,)}
