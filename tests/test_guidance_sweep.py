"""`edm2 guidance-sweep`: quality against guidance weight per guide. Checked with facts that need no trained
model: guiding a model with itself is no guidance at any weight (D + w (D - D) = D), weight 1 is the unguided
baseline, and every (guide, weight) pair is scored and plotted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from edm2.cli import main
from edm2.files import load_network
from edm2.metrics.digits import DigitsJudge
from edm2.metrics.guidance_sweep import Guide, JudgeScore, guidance_sweep
from edm2.sampling import SamplerSettings
from edm2.training import TrainOptions, train

TINY = dict(data="digits", preset="cpu-tiny8", batch=16, status=64, snapshot=64, checkpoint=64, seed=0)


def invoke(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny digits model (192 images) and a shorter-trained guide (64 images) of the same recipe."""
    root = tmp_path_factory.mktemp("guidance")
    train(TrainOptions(outdir=str(root / "main"), duration=192, **TINY), progress=False)
    train(TrainOptions(outdir=str(root / "guide"), duration=128, **TINY), progress=False)
    return root / "main", root / "guide"


def last_snapshot(run: Path) -> Path:
    return sorted(run.glob("snapshot-*-0.100.safetensors"))[-1]


def test_a_model_guiding_itself_is_the_baseline_at_every_weight(runs):
    net, _ = load_network(last_snapshot(runs[0]))
    score = JudgeScore(DigitsJudge(), num_samples=20)
    table = guidance_sweep(net, [Guide("itself", net)], [1, 2, 3.5], score, "fd", SamplerSettings(num_steps=4))
    assert [r["weight"] for r in table.rows] == [1, 2, 3.5]
    for r in table.rows:
        assert r["fd"] == pytest.approx(table.baseline["fd"], rel=1e-5)
        assert r["accuracy"] == table.baseline["accuracy"]


def test_a_weaker_guide_changes_the_samples_and_the_table_is_complete(runs, tmp_path):
    net, _ = load_network(last_snapshot(runs[0]))
    guide, _ = load_network(last_snapshot(runs[1]))
    table = guidance_sweep(net, [Guide("short", guide), Guide("itself", net)], [1, 3], JudgeScore(DigitsJudge(), 20),
                           "fd", SamplerSettings(num_steps=4), tmp_path)
    rows = {(r["guide"], r["weight"]): r for r in table.rows}
    assert set(rows) == {("short", 1), ("short", 3), ("itself", 1), ("itself", 3)}
    assert rows[("short", 3)]["fd"] != pytest.approx(table.baseline["fd"], rel=1e-3)
    saved = json.loads(table.json_path.read_text())
    assert saved["best"] == min(saved["rows"], key=lambda r: r["fd"])
    assert table.plot_path.stat().st_size > 0


def test_cli_sweeps_reconstructed_guides(runs, tmp_path):
    out = tmp_path / "sweep"
    result = invoke("guidance-sweep", "--net", last_snapshot(runs[0]), "--guide-run", runs[1], "--guide-std",
                    "0.05,0.10", "--guidance", "1,2", "--samples", 10, "--steps", 3, "--outdir", out,
                    "--guidance-interval", "0.1,5", "--device", "cpu")
    assert result.exit_code == 0, result.output
    table = json.loads((out / "guidance_sweep.json").read_text())
    assert {r["guide"] for r in table["rows"]} == {"EMA 0.050", "EMA 0.100"}
    assert table["settings"]["guidance_interval"] == [0.1, 5.0]
    assert len(list((out / "guides").glob("*.safetensors"))) == 2 and (out / "guidance_sweep.png").exists()


@pytest.mark.parametrize("extra, needle", [((), "no guide"), (("--gnet", "x.safetensors", "--guidance",
                                                                "1,nan"), "finite")])
def test_cli_bad_requests_are_one_line(runs, tmp_path, extra, needle):
    result = invoke("guidance-sweep", "--net", last_snapshot(runs[0]), "--outdir", tmp_path / "o",
                    "--samples", 4, "--steps", 2, *extra)
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1 and needle in result.output


def test_frechet_scores_against_a_reference_for_an_unconditional_model(tmp_path):
    """--ref: FD_DINOv2 (small random DINOv2 weights) of an unconditional model; a model guiding itself is the
    baseline at every weight, another guide moves the distance."""
    from detector_weights import write_small_dinov2

    pickles = Path(__file__).parent / "data" / "official_pickles"
    det = tmp_path / "det"
    write_small_dinov2(det)
    net = tmp_path / "net.safetensors"
    assert invoke("convert", pickles / "edm2_pixel.pkl", net).exit_code == 0
    assert invoke("generate", "--net", net, "--seeds", "100-111", "--steps", 4, "--outdir", tmp_path / "img",
                  "--device", "cpu").exit_code == 0
    assert invoke("metrics", "ref", "--data", tmp_path / "img", "--dest", tmp_path / "ref.npz", "--metrics",
                  "fd_dinov2", "--detector-dir", det, "--device", "cpu", "--workers", 0).exit_code == 0
    result = invoke("guidance-sweep", "--net", net, "--gnet", net, "--gnet", pickles / "edm_vp.pkl", "--guidance",
                    "1,2", "--samples", 8, "--steps", 3, "--ref", tmp_path / "ref.npz", "--detector-dir", det,
                    "--outdir", tmp_path / "sweep", "--device", "cpu")
    assert result.exit_code == 0, result.output
    table = json.loads((tmp_path / "sweep" / "guidance_sweep.json").read_text())
    assert table["key"] == "fd_dinov2"
    rows = {(r["guide"], r["weight"]): r["fd_dinov2"] for r in table["rows"]}
    base = table["baseline"]["fd_dinov2"]
    assert rows[("net", 2.0)] == pytest.approx(base, rel=1e-5) and rows[("net", 1.0)] == base
    assert rows[("edm_vp", 2.0)] != pytest.approx(base, rel=1e-3)
    mixed = invoke("guidance-sweep", "--net", net, "--gnet", net, "--ref", tmp_path / "ref.npz", "--judge", "j",
                   "--outdir", tmp_path / "x")
    assert mixed.exit_code == 2 and "--judge and --data" in mixed.output
