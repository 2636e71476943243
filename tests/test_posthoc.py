"""Post-hoc EMA as a general tool: the `PosthocEMA` tracker for any training loop (update intervals, snapshot
files, distributed ranks), reconstruction from a folder of snapshots (against EMAs tracked directly during
training, per-tensor lengths, single averages, streaming), the EMA-length sweep, the accuracy study, and
bad input (API ValueError and CLI one-line errors)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import edm2.reconstruct as reconstruct
from edm2.checkpoint import load_network, load_tensors, read_metadata
from edm2.cli import main, parse_std_list
from edm2.posthoc import PosthocEMA
from edm2.reconstruct import EMATarget, posthoc_reconstruct, scan_snapshots
from edm2.sweep import ema_sweep
from edm2.training import TrainOptions, train

ROOT = Path(__file__).resolve().parents[1]


def _gamma(std: float) -> float:
    """Exponent of the power-function profile with relative width `std`, by bisection on the closed form
    sigma_rel(g) = sqrt(g+1) / ((g+2) sqrt(g+3)), decreasing in g >= 0."""
    lo, hi = 0.0, 1e6
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if np.sqrt(mid + 1) / ((mid + 2) * np.sqrt(mid + 3)) > std else (lo, mid)
    return 0.5 * (lo + hi)


class _Wrapper(torch.nn.Module):
    """Stands in for DistributedDataParallel: the real model sits in `.module`."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module


def _model(dtype: torch.dtype = torch.float32, hidden: int = 6) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, hidden), torch.nn.BatchNorm1d(hidden),
                               torch.nn.Linear(hidden, 2)).to(dtype)


def _walk(model: torch.nn.Module, gen: torch.Generator, step: int) -> None:
    """One synthetic 'training step': a drift plus noise on every parameter, and a buffer change."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 + 0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        model[1].running_mean.fill_(float(step))


def _tracked_run(outdir: Path, steps: int, every: int, stds=(0.05, 0.10), dtype=torch.float32) -> torch.nn.Module:
    model = _model(dtype)
    ema = PosthocEMA(model, outdir, stds=stds, snapshot_every=every, info={"note": "synthetic"})
    gen = torch.Generator().manual_seed(1)
    for step in range(1, steps + 1):
        _walk(model, gen, step)
        ema.update(step)
    return model


def _params(path: Path) -> dict[str, torch.Tensor]:
    return load_tensors(path)[0]


def _dist(a: dict, b: dict, names) -> float:
    return sum(float((a[n].double() - b[n].double()).pow(2).sum()) for n in names) ** 0.5


# ----------------------------------------------------------------------------------------------------
# Tracking: update intervals.


def test_updating_every_4th_step_equals_every_step_when_params_change_every_4th():
    gen = torch.Generator().manual_seed(3)
    traj = torch.randn([30, 5], generator=gen, dtype=torch.float64)
    nets = [torch.nn.Linear(5, 1, bias=False).double() for _ in range(2)]
    for net in nets:
        with torch.no_grad():
            net.weight.fill_(7.0)
    fine, coarse = (PosthocEMA(net, "unused", stds=(0.05, 0.10, 0.2)) for net in nets)
    for step in range(1, 4 * len(traj) + 1):
        with torch.no_grad():  # the parameters change at steps 1, 5, 9, ... and then stay put
            nets[0].weight.copy_(traj[(step - 1) // 4])
            nets[1].weight.copy_(traj[(step - 1) // 4])
        fine.update(step)
        if step % 4 == 0:
            coarse.update(step)  # dt = 4 steps, remembered from the previous update
            for (_, a), (_, b) in zip(fine.state_dicts(), coarse.state_dicts()):
                torch.testing.assert_close(a["weight"], b["weight"], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(fine.state_dicts()[0][1]["weight"], traj[-1], atol=1e-2)  # really an average


def test_sparse_updates_give_the_power_average_of_the_sampled_trajectory():
    # Updates at t_1 < ... < t_K: the average is sum_k theta(t_k) ((t_k/T)^(g+1) - (t_{k-1}/T)^(g+1)),
    # the continuous power-function profile applied to the trajectory held constant between updates.
    gen = torch.Generator().manual_seed(5)
    times = np.cumsum(torch.randint(1, 50, [40], generator=gen).numpy())
    thetas = torch.randn([len(times), 3], generator=gen, dtype=torch.float64)
    net = torch.nn.Linear(3, 1, bias=False).double()
    ema = PosthocEMA(_Wrapper(net), "unused", stds=(0.05, 0.13))
    for t, theta in zip(times, thetas):
        with torch.no_grad():
            net.weight.copy_(theta)
        ema.update(int(t))
    for std, state in ema.state_dicts():
        frac = (times / times[-1]) ** (_gamma(std) + 1)
        weights = torch.from_numpy(np.diff(np.concatenate([[0.0], frac])))
        torch.testing.assert_close(state["weight"][0], (weights[:, None] * thetas).sum(0), rtol=1e-10, atol=1e-12)


def test_update_checks_and_resume():
    net = _model(torch.float64)
    ema = PosthocEMA(net, "unused")
    ema.update(10)
    with pytest.raises(ValueError, match="not after the previous update at 10"):
        ema.update(10)
    with pytest.raises(ValueError, match="dt=0"):
        ema.update(12, dt=0)
    with pytest.raises(ValueError, match="nothing averaged"):
        PosthocEMA(net, "unused").save_snapshots()
    with pytest.raises(ValueError, match="collide"):
        PosthocEMA(net, "unused", stds=(0.1, 0.1001))
    with pytest.raises(ValueError, match="0.3"):
        PosthocEMA(net, "unused", stds=(0.05, 0.3))
    # state_dict / load_state_dict: continuing after a restore equals never stopping.
    gen = torch.Generator().manual_seed(2)
    _walk(net, gen, 1)
    ema.update(15)
    restored = PosthocEMA(_model(torch.float64), "unused")
    restored.load_state_dict(ema.state_dict())
    assert restored.t == 15
    _walk(net, gen, 2)
    ema.update(21)
    restored.ema.net.load_state_dict(net.state_dict())
    restored.update(21)
    for (_, a), (_, b) in zip(ema.state_dicts(), restored.state_dicts()):
        for k in a:
            assert torch.equal(a[k], b[k]), k


# ----------------------------------------------------------------------------------------------------
# Tracking: snapshot files and ranks.


def test_snapshots_at_the_first_update_past_each_interval(tmp_path):
    model = _model()
    ema = PosthocEMA(model, tmp_path / "snaps", stds=(0.05, 0.10), snapshot_every=10, info={"run": "x"})
    gen = torch.Generator().manual_seed(0)
    written = {}
    for step in range(3, 43, 3):  # updates every 3 steps: 3, 6, ..., 42
        _walk(model, gen, step)
        paths = ema.update(step)
        if paths:
            written[step] = (paths, [(s, {k: v.clone() for k, v in sd.items()}) for s, sd in ema.state_dicts()])
    assert sorted(written) == [12, 21, 30, 42]
    names = sorted(p.name for p in (tmp_path / "snaps").iterdir())
    assert names == [f"snapshot-{t:010d}-{s:.3f}.safetensors" for t in (12, 21, 30, 42) for s in (0.05, 0.10)]
    paths, states = written[21]
    for path, (std, state) in zip(paths, states):
        tensors, meta = load_tensors(path, kind="snapshot")
        assert meta["nimg"] == 21 and meta["sigma_rel"] == std and meta["network"] is None
        assert meta["info"] == {"run": "x"}
        assert meta["parameter_names"] == sorted(model.state_dict())  # buffers too
        assert meta["averaged_names"] == sorted(n for n, _ in model.named_parameters())
        assert tensors.keys() == state.keys()
        for k in state:
            assert torch.equal(tensors[k], state[k]), k
    assert float(_params(paths[0])["1.running_mean"][0]) == 21.0  # buffers: the live value at that time


def test_distributed_rank_other_than_0_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    gen = torch.Generator().manual_seed(0)
    for rank in (1, 0):
        monkeypatch.setattr(torch.distributed, "get_rank", lambda rank=rank: rank)
        model = _model()
        ema = PosthocEMA(_Wrapper(model), tmp_path / f"rank{rank}", snapshot_every=2)
        assert ema.rank == rank
        results = []
        for step in range(1, 7):
            _walk(model, gen, step)
            results.append(ema.update(step))
        results.append(ema.save_snapshots())
        if rank == 1:
            assert all(r == [] for r in results) and not (tmp_path / "rank1").exists()
        else:
            names = sorted(p.name for p in (tmp_path / "rank0").iterdir())
            assert names == [f"snapshot-{t:010d}-{s:.3f}.safetensors" for t in (2, 4, 6) for s in (0.05, 0.10)]
            meta = read_metadata(tmp_path / "rank0" / names[0])
            assert not any(n.startswith("module.") for n in meta["parameter_names"])


# ----------------------------------------------------------------------------------------------------
# Reconstruction of generic models.


@pytest.fixture(scope="module")
def generic_run(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    folder = tmp_path_factory.mktemp("generic") / "snaps"
    model = _tracked_run(folder, steps=160, every=10, stds=(0.05, 0.10, 0.13))
    return folder, model


def test_generic_reconstruction_matches_the_directly_tracked_ema(generic_run, tmp_path):
    folder, model = generic_run
    params = [n for n, _ in model.named_parameters()]
    for t in (160, 80):  # the end, and a time in the middle of training
        direct = _params(folder / f"snapshot-{t:010d}-0.130.safetensors")
        (result,) = posthoc_reconstruct(folder, tmp_path / f"at{t}", [0.13], nimg=t, input_stds=(0.05, 0.10))
        assert result.nimg == t and result.num_snapshots == 2 * t // 10 and result.profile_error < 1e-3
        recon = _params(result.path)
        neighbour = _params(folder / f"snapshot-{t:010d}-0.100.safetensors")
        assert _dist(recon, direct, params) < 0.02 * _dist(neighbour, direct, params)
        # Same form as the inputs: no network config, the averaged names, buffers from the latest snapshot.
        meta = read_metadata(result.path, kind="snapshot")
        assert meta["network"] is None and meta["averaged_names"] == sorted(params)
        assert meta["info"]["reconstructed"] is True and meta["info"]["note"] == "synthetic"
        assert float(recon["1.running_mean"][0]) == t
        assert recon["2.weight"].dtype == torch.float32
    # A tracked length at a snapshot time is that snapshot: the least-squares weights are one-hot.
    (same,) = posthoc_reconstruct(folder, tmp_path / "same", [0.05], nimg=120, input_stds=(0.05, 0.10))
    stored = _params(folder / "snapshot-0000000120-0.050.safetensors")
    recon = _params(same.path)
    assert same.profile_error < 1e-9
    for n in params:
        torch.testing.assert_close(recon[n], stored[n], rtol=1e-5, atol=1e-5)
    # The reconstruction never counts as an input snapshot.
    shutil.copy(same.path, folder / "posthoc-copy.safetensors")
    try:
        assert len(scan_snapshots(folder)) == 48
    finally:
        (folder / "posthoc-copy.safetensors").unlink()


def test_single_average_per_snapshot_works_but_is_less_accurate(generic_run, tmp_path):
    folder, model = generic_run
    params = [n for n, _ in model.named_parameters()]
    direct = _params(folder / "snapshot-0000000160-0.130.safetensors")
    (two,) = posthoc_reconstruct(folder, tmp_path / "two", [0.13], input_stds=(0.05, 0.10))
    (one,) = posthoc_reconstruct(folder, tmp_path / "one", [0.13], input_stds=(0.10,))
    assert one.num_snapshots == 16 and two.num_snapshots == 32
    assert one.profile_error > 10 * two.profile_error
    assert _dist(_params(one.path), direct, params) > 3 * _dist(_params(two.path), direct, params)
    # 0.02 is accepted from the 0.05/0.10 pairs (the sweep needs it), refused from 0.10 alone.
    posthoc_reconstruct(folder, tmp_path / "short", [0.02], input_stds=(0.05, 0.10))
    with pytest.raises(ValueError, match=r"0\.02 \(shorter than the snapshots support: profile error"):
        posthoc_reconstruct(folder, tmp_path / "short1", [0.02], input_stds=(0.10,))


def test_per_tensor_lengths_first_match_wins(generic_run, tmp_path):
    folder, _ = generic_run
    uniform = {s: _params(posthoc_reconstruct(folder, tmp_path / f"u{s}", [s], input_stds=(0.05, 0.10))[0].path)
               for s in (0.07, 0.10, 0.15)}
    target = EMATarget(0.10, (("0.*", 0.07), ("0.weight", 0.15), ("2.bias", 0.15)))
    (result,) = posthoc_reconstruct(folder, tmp_path / "pt", [target], input_stds=(0.05, 0.10))
    recon = _params(result.path)
    expected = {"0.weight": 0.07, "0.bias": 0.07, "1.weight": 0.10, "1.bias": 0.10, "2.weight": 0.10, "2.bias": 0.15}
    for name, std in expected.items():
        torch.testing.assert_close(recon[name], uniform[std][name], rtol=1e-6, atol=1e-6)
    meta = read_metadata(result.path)
    assert meta["sigma_rel"] == 0.10
    assert meta["info"]["sigma_rel_patterns"] == [["0.*", 0.07], ["0.weight", 0.15], ["2.bias", 0.15]]
    assert meta["info"]["tensor_sigma_rel"] == {"0.bias": 0.07, "0.weight": 0.07, "2.bias": 0.15}
    assert set(result.profile_errors) == {0.07, 0.10, 0.15}
    assert result.path.name.startswith("posthoc-0000000160-0.100-pt")


def test_reconstruction_reads_one_snapshot_at_a_time(generic_run, tmp_path, monkeypatch):
    folder, _ = generic_run
    alive: list[weakref.ref] = []
    loads = []
    real = reconstruct.load_tensors

    def counting_load(path, kind=None, device="cpu"):
        loads.append(sum(r() is not None for r in alive))  # tensors of earlier files still in memory
        tensors, meta = real(path, kind, device)
        alive.extend(weakref.ref(t) for t in tensors.values())
        return tensors, meta

    monkeypatch.setattr(reconstruct, "load_tensors", counting_load)
    posthoc_reconstruct(folder, tmp_path / "out", [0.07, 0.13, 0.2], input_stds=(0.05, 0.10))
    assert len(loads) == 32 and loads == [0] * 32


# ----------------------------------------------------------------------------------------------------
# Against power EMAs tracked by our trainer.


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    outdir = tmp_path_factory.mktemp("trained") / "run"
    # 32 steps of 16 images; snapshots of 0.05, 0.10 and (for reference) 0.13 every 2 steps.
    result = train(TrainOptions(outdir=str(outdir), data="digits", preset="cpu-tiny8", batch=16, duration=512,
                                snapshot=32, status=512, checkpoint=512, ema_stds=(0.05, 0.10, 0.13), device="cpu"),
                   progress=False)
    assert result["status"] == "finished"
    return outdir


def test_trainer_ema_equals_reconstruction_more_closely_with_denser_snapshots(trained_run, tmp_path):
    sparse = tmp_path / "every8steps"
    sparse.mkdir()
    for t in (128, 256, 384, 512):
        for s in (0.05, 0.10):
            os.link(trained_run / _name(t, s), sparse / _name(t, s))
    (dense_r,) = posthoc_reconstruct(trained_run, tmp_path / "dense", [0.13], input_stds=(0.05, 0.10))
    (sparse_r,) = posthoc_reconstruct(sparse, tmp_path / "sparse", [0.13])
    assert (dense_r.num_snapshots, sparse_r.num_snapshots) == (32, 8)
    direct = _params(trained_run / "snapshot-0000000512-0.130.safetensors")
    start = _params(trained_run / "snapshot-0000000032-0.130.safetensors")
    neighbour = _params(trained_run / "snapshot-0000000512-0.100.safetensors")
    dense, sparse_p = _params(dense_r.path), _params(sparse_r.path)
    names = [n for n in direct if "fourier" not in n]  # the Fourier buffers are constants
    change = _dist(direct, start, names)  # how far the tracked 0.13 EMA moved over training
    err_dense, err_sparse = _dist(dense, direct, names), _dist(sparse_p, direct, names)
    assert err_dense < err_sparse / 10
    assert err_dense < 1e-3 * change and err_dense < 0.01 * _dist(neighbour, direct, names)
    for n in names:  # parameter by parameter
        scale = float((neighbour[n] - direct[n]).norm()) + 1e-6
        assert float((dense[n] - direct[n]).norm()) < 0.05 * scale, n
    # The output is a full edm2 snapshot: `edm2 generate` can rebuild it.
    net, snap = load_network(dense_r.path)
    assert snap.sigma_rel == 0.13 and snap.nimg == 512 and net.label_dim == 10


def test_cli_reconstruct_per_tensor_and_single_average(trained_run, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["reconstruct", "--indir", str(trained_run), "--outdir", str(out), "--std",
                                       "0.08:0.12:0.02", "--std-for", "unet.enc.*=0.05", "--std-for",
                                       "unet.dec.*=0.15", "--from-std", "0.05,0.10"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 3 and all("profile error" in line and "unet.enc.*=0.050" in line for line in lines)
    paths = sorted(out.iterdir())
    assert len(paths) == 3
    net, snap = load_network(paths[1])  # 0.10 with per-tensor lengths: still loadable by `generate`
    assert snap.sigma_rel == 0.10 and snap.info["sigma_rel_patterns"] == [["unet.enc.*", 0.05], ["unet.dec.*", 0.15]]
    assert all(v == 0.05 for k, v in snap.info["tensor_sigma_rel"].items() if k.startswith("unet.enc."))
    assert {v for v in snap.info["tensor_sigma_rel"].values()} == {0.05, 0.15}
    uniform = posthoc_reconstruct(trained_run, tmp_path / "u", [0.05, 0.10, 0.15], input_stds=(0.05, 0.10))
    u05, u10, u15 = (_params(r.path) for r in uniform)
    for name, t in snap.state_dict.items():
        ref = u05 if name.startswith("unet.enc.") else u15 if name.startswith("unet.dec.") else u10
        torch.testing.assert_close(t, ref[name], rtol=1e-6, atol=1e-6)
    # One tracked average per snapshot: works, with a larger profile error.
    single = CliRunner().invoke(main, ["reconstruct", "--indir", str(trained_run), "--outdir", str(tmp_path / "one"),
                                       "--std", "0.13", "--from-std", "0.10"])
    assert single.exit_code == 0, single.output
    assert "from 16 snapshots" in single.stdout


def test_cli_ema_sweep_on_a_digits_run(trained_run, tmp_path):
    out = tmp_path / "sweep"
    result = CliRunner().invoke(main, ["ema-sweep", "--run", str(trained_run), "--outdir", str(out), "--std",
                                       "0.05:0.30:0.08", "--samples", "20", "--steps", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "skipping sigma_rel 0.29" in result.stdout  # beyond the power-function range: dropped with a note
    table = json.loads((out / "ema_sweep.json").read_text())
    assert [r["sigma_rel"] for r in table["rows"]] == [0.05, 0.13, 0.21]
    best = min(table["rows"], key=lambda r: r["fd"])
    assert table["best"] == best and f"best sigma_rel {best['sigma_rel']:.3f}" in result.stdout
    assert all(0 <= r["accuracy"] <= 1 and r["fd"] > 0 for r in table["rows"])
    assert (out / "ema_sweep.png").read_bytes()[:4] == b"\x89PNG"
    # A range point the snapshots cannot support is skipped with a note; the same length listed is an error.
    args = ["ema-sweep", "--run", str(trained_run), "--samples", "20", "--steps", "2", "--device", "cpu"]
    ranged = CliRunner().invoke(main, [*args, "--outdir", str(tmp_path / "r"), "--std", "0.005:0.1:0.095"])
    assert ranged.exit_code == 0, ranged.output
    assert "note: skipping sigma_rel 0.005: the snapshots do not support them" in ranged.stdout
    assert [r["sigma_rel"] for r in json.loads((tmp_path / "r" / "ema_sweep.json").read_text())["rows"]] == [0.1]
    listed = CliRunner().invoke(main, [*args, "--outdir", str(tmp_path / "l"), "--std", "0.005,0.1"])
    assert listed.exit_code == 2 and "shorter than the snapshots support" in listed.stderr
    assert not (tmp_path / "l").exists()


# ----------------------------------------------------------------------------------------------------
# The sweep with any metric.


def test_ema_sweep_any_metric(generic_run, tmp_path):
    folder, _ = generic_run
    calls = []

    def metric(path: Path) -> dict[str, float]:
        calls.append(path)
        w = _params(path)["2.bias"]
        return {"distance": float((w - 3.0).abs().sum()), "norm": float(w.norm())}

    runs = [ema_sweep(folder, tmp_path / f"s{per_pass}", [0.15, 0.05, 0.10, 0.2], metric, "distance",
                      input_stds=(0.05, 0.10), per_pass=per_pass, secondary="norm") for per_pass in (1, 8)]
    for res in runs:
        assert [r["sigma_rel"] for r in res.rows] == [0.05, 0.10, 0.15, 0.2]
        assert res.best == min(res.rows, key=lambda r: r["distance"])
        assert res.best_at_edge == (res.best["sigma_rel"] in (0.05, 0.2))
        assert json.loads(res.json_path.read_text())["best"] == res.best
        assert res.plot_path.read_bytes()[:4] == b"\x89PNG"
    assert len(calls) == 8
    assert [r["distance"] for r in runs[0].rows] == pytest.approx([r["distance"] for r in runs[1].rows], rel=1e-6)
    with pytest.raises(ValueError, match="without the key 'fd'"):
        ema_sweep(folder, tmp_path / "bad", [0.1], metric, "fd", input_stds=(0.05, 0.10))


def test_ema_sweep_skips_unsupported_lengths_only_when_asked(generic_run, tmp_path):
    folder, _ = generic_run
    metric = lambda path: {"norm": float(_params(path)["2.weight"].norm())}  # noqa: E731
    errors = reconstruct.reconstruction_errors(folder, [0.005, 0.1], input_stds=(0.05, 0.10))
    lines = []
    res = ema_sweep(folder, tmp_path / "a", [0.005, 0.1], metric, "norm", input_stds=(0.05, 0.10),
                    skip_unsupported=True, echo=lines.append)
    assert [r["sigma_rel"] for r in res.rows] == [0.1] and res.skipped == {0.005: errors[0.005]}
    assert lines[0].startswith("note: skipping sigma_rel 0.005: the snapshots do not support them")
    assert json.loads(res.json_path.read_text())["skipped"] == [{"sigma_rel": 0.005, "profile_error": errors[0.005]}]
    with pytest.raises(ValueError, match=r"0\.005 \(shorter than the snapshots support"):
        ema_sweep(folder, tmp_path / "b", [0.005, 0.1], metric, "norm", input_stds=(0.05, 0.10))
    with pytest.raises(ValueError, match="support none of the EMA lengths"):
        ema_sweep(folder, tmp_path / "c", [0.004, 0.005], metric, "norm", input_stds=(0.05, 0.10),
                  skip_unsupported=True)
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_parse_std_list():
    assert parse_std_list("0.02:0.30:0.01")[0] == pytest.approx([0.02 + 0.01 * i for i in range(27)])
    assert parse_std_list("0.02:0.30:0.01")[1] == pytest.approx([0.29, 0.30])
    assert parse_std_list("0.1, 0.05") == ([0.1, 0.05], [])
    for bad in ("0.1:0.2", "0.2:0.1:0.01", "a:b:c", "0.1,x", ""):
        with pytest.raises(ValueError, match="--std"):
            parse_std_list(bad)


# ----------------------------------------------------------------------------------------------------
# Bad input: API ValueError and CLI one-line errors; nothing written.


@pytest.fixture()
def snaps(tmp_path) -> Path:
    """Six snapshot times (10..60) of a small generic model, two averages each."""
    folder = tmp_path / "snaps"
    _tracked_run(folder, steps=60, every=10)
    return folder


def _name(t: int, s: float) -> str:
    return f"snapshot-{t:010d}-{s:.3f}.safetensors"


def bad_unsupported_std(folder):
    return {"stds": [0.005]}, ["--std", "0.005"], ["0.005", "shorter than the snapshots support", "profile error"]


def bad_beyond_power_range(folder):
    return {"stds": [0.3]}, ["--std", "0.3"], ["0.3", "outside"]


def bad_time_after_last(folder):
    return {"stds": [0.1], "nimg": 70}, ["--std", "0.1", "--nimg", "70"], ["70", "after the last", _name(60, 0.10)]


def bad_time_before_first(folder):
    return {"stds": [0.1], "nimg": 5}, ["--std", "0.1", "--nimg", "5"], ["5", "before the first"]


def bad_time_between_snapshots(folder):
    # At 35 only the snapshots up to 30 can be used, and they cannot end a profile at 35.
    return {"stds": [0.1], "nimg": 35}, ["--std", "0.1", "--nimg", "35"], ["0.1 (not supported at this time"]


def bad_mixed_networks(folder):
    other = folder.parent / "other"
    model = torch.nn.Linear(2, 2)
    ema = PosthocEMA(model, other, snapshot_every=10)
    ema.update(10)
    shutil.copy(other / _name(10, 0.05), folder / "foreign.safetensors")
    return {"stds": [0.1]}, ["--std", "0.1"], ["different networks", "foreign.safetensors", _name(10, 0.05)]


def bad_duplicate_time(folder):
    shutil.copy(folder / _name(30, 0.10), folder / "copy.safetensors")
    return {"stds": [0.1]}, ["--std", "0.1"], ["duplicate", "30", "copy.safetensors", _name(30, 0.10)]


def bad_time_lacking_one_average(folder):
    (folder / _name(30, 0.10)).unlink()
    return {"stds": [0.1]}, ["--std", "0.1"], ["time 30 lacks sigma_rel [0.1]", _name(30, 0.05)]


def bad_gap_in_the_series(folder):
    for s in (0.05, 0.10):
        (folder / _name(30, s)).unlink()
    return {"stds": [0.1]}, ["--std", "0.1"], ["missing between 20", "and 40", _name(20, 0.05), _name(40, 0.05)]


def bad_first_snapshots_missing(folder):
    for t in (10, 20):
        for s in (0.05, 0.10):
            (folder / _name(t, s)).unlink()
    return {"stds": [0.1]}, ["--std", "0.1"], ["missing between time 0 and 30", _name(30, 0.05)]


def bad_unknown_input_std(folder):
    return {"stds": [0.1], "input_stds": [0.2]}, ["--std", "0.1", "--from-std", "0.2"], ["sigma_rel [0.2]"]


def bad_pattern_matches_nothing(folder):
    return ({"stds": [EMATarget(0.1, (("enc.*", 0.05),))]}, ["--std", "0.1", "--std-for", "enc.*=0.05"],
            ["'enc.*'", "matches no averaged tensor"])


def bad_malformed_std_for(folder):
    return None, ["--std", "0.1", "--std-for", "enc.*"], ["--std-for", "PATTERN=SIGMA_REL"]


def bad_same_length_twice(folder):
    return {"stds": [0.1, 0.1001]}, ["--std", "0.1,0.1001"], ["twice"]


def bad_damaged_snapshot(folder):
    (folder / "junk.safetensors").write_bytes(b"\x00" * 100)
    return {"stds": [0.1]}, ["--std", "0.1"], ["junk.safetensors"]


BAD = [v for k, v in sorted(globals().items()) if k.startswith("bad_")]


@pytest.mark.parametrize("case", BAD, ids=[c.__name__[4:] for c in BAD])
def test_bad_input(case, snaps, tmp_path):
    api, cli, fragments = case(snaps)
    out = tmp_path / "out"
    if api is not None:
        with pytest.raises(ValueError) as info:
            posthoc_reconstruct(snaps, out, **api)
        message = str(info.value)
        assert "\n" not in message
        for f in fragments:
            assert f in message, (f, message)
    result = CliRunner().invoke(main, ["reconstruct", "--indir", str(snaps), "--outdir", str(out), *cli])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edm2: error: ") and result.stdout == "", result.output
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    assert not out.exists()


def test_irregular_series_that_are_not_missing_snapshots(snaps, tmp_path):
    # Thinning (every other snapshot) keeps a regular series; allow_gaps accepts a real hole.
    for t in (10, 30, 50):
        for s in (0.05, 0.10):
            (snaps / _name(t, s)).unlink()
    assert [i.nimg for i in scan_snapshots(snaps)][::2] == [20, 40, 60]
    for s in (0.05, 0.10):
        (snaps / _name(40, s)).unlink()
    with pytest.raises(ValueError, match="missing between 20"):
        scan_snapshots(snaps)
    assert [i.nimg for i in scan_snapshots(snaps, allow_gaps=True)][::2] == [20, 60]
    result = CliRunner().invoke(main, ["reconstruct", "--indir", str(snaps), "--outdir", str(tmp_path / "o"),
                                       "--std", "0.1", "--allow-gaps", "--max-error", "1"])
    assert result.exit_code == 0, result.output


# ----------------------------------------------------------------------------------------------------
# The accuracy study (the paper's Figure 4 claim), from one command.


def test_accuracy_study_command(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "posthoc_accuracy.py"), "--out", str(tmp_path),
                           "--ns", "4,8,16,32,64", "--targets", "0.13"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    study = json.loads((tmp_path / "posthoc_accuracy.json").read_text())
    two = study["slopes"]["two averages (0.05, 0.10)"]["0.13"]["n>=8"]
    one = study["slopes"]["one average (0.10)"]["0.13"]["n>=8"]
    assert -4.5 < two < -3.5 and -2.5 < one < -1.5
    errors = study["errors"]
    assert errors["one average (0.10)"]["0.13"][-1] > 100 * errors["two averages (0.05, 0.10)"]["0.13"][-1]
    assert (tmp_path / "posthoc_accuracy.png").read_bytes()[:4] == b"\x89PNG"


def test_reconstruction_errors_predict_what_is_refused(generic_run, tmp_path):
    folder, _ = generic_run
    before = sorted(folder.iterdir())
    errors = reconstruct.reconstruction_errors(folder, [0.005, 0.13], input_stds=(0.05, 0.10))
    assert sorted(folder.iterdir()) == before  # headers only, nothing written
    assert errors[0.005] > reconstruct.DEFAULT_MAX_ERROR > errors[0.13]
    (result,) = posthoc_reconstruct(folder, tmp_path / "o", [0.13], input_stds=(0.05, 0.10))
    assert result.profile_error == pytest.approx(errors[0.13], rel=1e-9)


def test_demo_uses_the_sweep_and_skips_unsupported_lengths(tmp_path, monkeypatch):
    from edm2.demo import run_demo

    monkeypatch.chdir(tmp_path)  # a relative out-dir, as `edm2 demo` gets by default
    lines = []
    report = run_demo("demo-out", duration=256, num_samples=20, num_steps=2, stds=(0.05, 0.10, 0.25),
                      progress=False, echo=lines.append)
    assert report["status"] == "finished"
    assert any("skipping sigma_rel 0.250: the snapshots do not support them" in line for line in lines)
    assert [r["sigma_rel"] for r in report["sweep"]] == [0.05, 0.10]
    assert report["best_fd"] == min(r["fd"] for r in report["sweep"])
    assert (tmp_path / "demo-out" / "ema_quality.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in (tmp_path / "demo-out" / "posthoc").iterdir()) == [
        "posthoc-0000000256-0.050.safetensors", "posthoc-0000000256-0.100.safetensors"]
