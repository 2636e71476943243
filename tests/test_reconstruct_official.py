"""Post-hoc reconstruction as the official `reconstruct_phema.py` runs it: float16 snapshots (float16 out, equal to
the float32 reconstruction within float16 rounding), outputs in batches (`--batch`) and skipped when present
(`--skip`), and the official command line (`--outstd` with '...', `--outkimg`, `--instd`) parsed to the same
settings as our spelling. Official raw `.pkl` snapshots are tested in tests/test_pickles.py."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import edm2.ema.reconstruct as reconstruct
from edm2.cli import main
from edm2.cli.params import parse_official_std_list
from edm2.ema.trackers import PosthocEMA
from edm2.files import load_tensors, save_tensors
from edm2.files.pickle_convert import kimg_to_nimg

TARGETS = [0.07, 0.13]
FP16_UNIT_ROUNDOFF = 2.0**-11
SIGNATURE = inspect.signature(reconstruct.posthoc_reconstruct)


def _run(folder: Path, steps: int = 120, every: int = 10) -> None:
    """Snapshots of a small network with buffers (0.05 and 0.10 every `every` steps) along a random walk."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    ema = PosthocEMA(model, folder, stds=(0.05, 0.10), snapshot_every=every)
    gen = torch.Generator().manual_seed(1)
    for step in range(1, steps + 1):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 + 0.1 * torch.randn(p.shape, generator=gen))
            model[1].running_mean.fill_(0.1 * step)
        ema.update(step)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    """The same snapshots in float32 and in float16 (every floating tensor rounded, the header kept)."""
    root = tmp_path_factory.mktemp("fp16")
    f32, f16 = root / "f32", root / "f16"
    _run(f32)
    f16.mkdir()
    for path in sorted(f32.glob("*.safetensors")):
        tensors, meta = load_tensors(path)
        save_tensors(f16 / path.name, {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()},
                     meta)
    return f32, f16


def test_float16_snapshots_reconstruct_to_float16_within_float16_rounding(folders, tmp_path):
    f32, f16 = folders
    plan = reconstruct.plan_reconstruction(f32, [reconstruct.EMATarget(s) for s in TARGETS], None, None, 0.1, False)
    inputs = [load_tensors(i.path)[0] for i in plan.used]
    for j, std in enumerate(TARGETS):
        (r32,) = reconstruct.posthoc_reconstruct(f32, tmp_path / "o32", [std])
        (r16,) = reconstruct.posthoc_reconstruct(f16, tmp_path / "o16", [std])
        a32, a16 = load_tensors(r32.path)[0], load_tensors(r16.path)[0]
        for name in plan.averaged:
            assert a16[name].dtype == torch.float16 and a32[name].dtype == torch.float32
            # Rounding bound: each input rounded to float16, the float32 sum, the result rounded to float16.
            weight = sum(abs(float(plan.coefs[k, j])) * x[name].abs() for k, x in enumerate(inputs))
            bound = FP16_UNIT_ROUNDOFF * (a32[name].abs() + weight) * 1.01 + 1e-7
            assert bool(((a16[name].float() - a32[name]).abs() <= bound).all()), name
        assert not torch.equal(a16["0.weight"].float(), a32["0.weight"])  # really rounded
        assert a16["1.running_mean"].dtype == torch.float16  # buffers: copied in their stored dtype
        assert torch.equal(a16["1.running_mean"], a32["1.running_mean"].half())


def test_batches_stream_the_snapshots_once_per_batch_with_the_same_result(folders, tmp_path, monkeypatch):
    f32, _ = folders
    stds = [0.06, 0.07, 0.09, 0.11, 0.13]
    whole = reconstruct.posthoc_reconstruct(f32, tmp_path / "whole", stds)
    loads = []
    real = reconstruct.load_tensors
    monkeypatch.setattr(reconstruct, "load_tensors", lambda *a, **k: loads.append(a[0]) or real(*a, **k))
    seen = []
    batched = reconstruct.posthoc_reconstruct(f32, tmp_path / "batched", stds, batch=2,
                                              progress=lambda done, total: seen.append((done, total)))
    used = whole[0].num_snapshots
    assert len(loads) == 3 * used  # 5 outputs in batches of at most 2: 2, 2, 1 (the official split)
    assert seen[-1] == (3 * used, 3 * used) and [d for d, _ in seen] == list(range(1, 3 * used + 1))
    for a, b in zip(whole, batched):
        assert a.path.name == b.path.name
        for name, value in load_tensors(a.path)[0].items():
            assert torch.equal(load_tensors(b.path)[0][name], value)


def test_skip_leaves_existing_outputs_alone(folders, tmp_path):
    f32, _ = folders
    out = tmp_path / "out"
    first = reconstruct.posthoc_reconstruct(f32, out, [0.07, 0.13])
    first[0].path.write_bytes(b"kept")  # an existing output is not rewritten, whatever it holds
    first[1].path.unlink()
    again = reconstruct.posthoc_reconstruct(f32, out, [0.07, 0.13], skip_existing=True)
    assert [r.path for r in again] == [first[1].path] and first[1].path.is_file()
    assert first[0].path.read_bytes() == b"kept"
    result = CliRunner().invoke(main, ["reconstruct", f"--indir={f32}", f"--outdir={out}", "--outstd=0.070,0.130",
                                       "--skip"])
    assert result.exit_code == 0, result.output
    assert "skipped 2 output(s)" in result.output and first[0].path.read_bytes() == b"kept"


# ----------------------------------------------------------------------------------------------------
# The official command line.

OFFICIAL_COMMAND_LINES = [
    # python reconstruct_phema.py --indir=raw-snapshots/edm2-img512-xs --outdir=out --outstd=0.150
    (["--indir=raw", "--outdir=out", "--outstd=0.150"], ["--indir", "raw", "--outdir", "out", "--std", "0.15"]),
    # ... --outstd=0.010,0.015,...,0.250 --batch=8
    (["--indir=raw", "--outdir=out", "--outstd=0.010,0.015,...,0.250", "--batch=8"],
     ["--indir", "raw", "--outdir", "out", "--std", "0.010:0.250:0.005"]),
    (["--indir=run", "--outdir=out", "--outstd=0.150", "--outkimg=2147"],
     ["--indir", "run", "--outdir", "out", "--std", "0.15", "--nimg", "2097Ki"]),
    (["--indir=raw", "--outdir=out", "--instd=0.050,0.100", "--outstd=0.05,0.06,...,0.10", "--skip", "--batch=2"],
     ["--indir", "raw", "--outdir", "out", "--from-std", "0.05,0.10", "--std", "0.05:0.10:0.01", "--skip",
      "--batch", "2"]),
    (["--indir", "raw", "--outdir", "out", "--instd", "0.100", "--outstd", "0.100,0.090,...,0.070"],
     ["--indir", "raw", "--outdir", "out", "--from-std", "0.1", "--std", "0.07,0.08,0.09,0.1"]),
]


def _settings(monkeypatch, args: list[str]) -> dict:
    """The arguments `edm2 reconstruct ARGS` hands to `posthoc_reconstruct`, by name."""
    calls = []
    monkeypatch.setattr(reconstruct, "posthoc_reconstruct", lambda *a, **k: calls.append(SIGNATURE.bind(*a, **k)) or [])
    result = CliRunner().invoke(main, ["reconstruct", *args])
    assert result.exit_code == 0 and len(calls) == 1, result.output
    bound = calls[0]
    bound.apply_defaults()
    settings = dict(bound.arguments)
    settings["per_tensor"] = [t.per_tensor for t in settings["stds"]]
    settings["stds"] = [t.sigma_rel for t in settings["stds"]]
    return settings


@pytest.mark.parametrize("official, ours", OFFICIAL_COMMAND_LINES, ids=range(len(OFFICIAL_COMMAND_LINES)))
def test_official_command_line_parses_to_our_settings(official, ours, monkeypatch):
    a, b = _settings(monkeypatch, official), _settings(monkeypatch, ours)
    assert a.keys() == b.keys()
    for key in a:
        if key in ("stds", "input_stds") and a[key] is not None:  # '...' steps and start:stop:step: same numbers
            assert a[key] == pytest.approx(b[key], abs=1e-12), key
        else:
            assert a[key] == b[key], key


def test_official_settings_in_detail(monkeypatch):
    s = _settings(monkeypatch, OFFICIAL_COMMAND_LINES[1][0])
    assert len(s["stds"]) == 49 and s["batch"] == 8 and s["nimg"] is None and s["skip_existing"] is False
    s = _settings(monkeypatch, OFFICIAL_COMMAND_LINES[2][0])
    assert s["nimg"] == kimg_to_nimg(2147) == 2097 * 1024 and s["batch"] == 8  # the official default batch
    s = _settings(monkeypatch, OFFICIAL_COMMAND_LINES[3][0])
    assert s["input_stds"] == [0.05, 0.1] and s["skip_existing"] is True and s["batch"] == 2


def test_official_list_syntax():
    assert parse_official_std_list("0.010,0.015,...,0.030") == pytest.approx([0.010, 0.015, 0.020, 0.025, 0.030])
    assert parse_official_std_list("0.05,0.04,...,0.01,0.2") == pytest.approx([0.01, 0.02, 0.03, 0.04, 0.05, 0.2])
    assert parse_official_std_list("0.1,0.05,0.1") == [0.05, 0.1]  # sorted, each once
    for bad, fragment in [("0.01,...,0.05", "follow at least two"), ("0.01,0.02,...", "followed by"),
                          ("0.01,0.01,...,0.05", "differ"), ("0.01,0.02,...,0.045", "evenly"),
                          ("0.02,0.03,...,0.01", "at least one"), ("0.1,0.3", "(0, 0.289)"), ("0.1,x", "numbers")]:
        with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
            parse_official_std_list(bad)


def test_official_command_line_errors_are_one_line(folders, tmp_path):
    f32, _ = folders
    for args, fragment in [(["--outstd=0.01,0.02,...,0.045"], "evenly"),
                           (["--outstd=0.1", "--outkimg=1", "--nimg=100"], "--nimg or --outkimg")]:
        result = CliRunner().invoke(main, ["reconstruct", f"--indir={f32}", f"--outdir={tmp_path / 'o'}", *args])
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and fragment in lines[0], result.stderr
    assert not (tmp_path / "o").exists()
