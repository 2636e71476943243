"""The official command lines, as the official scripts spell them, run through edm2: each parses to the settings of
our spelling (EDM2's generate_images.py and calculate_metrics.py gen, EDM's generate.py, with local files in place
of URLs); networks of the EDM release sample with the defaults of their generate.py (18 steps); `metrics calc`
measures 50,000 images by default, drawn as calculate_metrics.py draws them, and refuses fewer in one line."""

from __future__ import annotations

import shlex
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from detector_weights import write_small_dinov2
from PIL import Image

import edm2.generate
import edm2.metrics.measure
from edm2.cli import main
from edm2.cli.metrics import OFFICIAL_NUM
from edm2.metrics.measure import RepeatSummary, draw_subset
from edm2.metrics.stats import MetricStats, save_reference
from edm2.sampling import SamplerSettings

PICKLES = Path(__file__).parent / "data" / "official_pickles"


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def ok(result):
    assert result.exit_code == 0, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    return result


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Converted official networks (EDM2 pixels, EDM VP and EDM ADM, all 16x16 RGB), small DINOv2 weights, a
    reference of 16x16 images, 12 PNGs."""
    root = tmp_path_factory.mktemp("official")
    paths = {"root": root, "det": root / "det", "ref": root / "ref.npz", "out": root / "out", "images": root / "png"}
    write_small_dinov2(paths["det"])
    for name in ("edm2_pixel", "edm_vp", "edm_edm_adm"):
        paths[name] = root / f"{name}.safetensors"
        ok(invoke("convert", PICKLES / f"{name}.pkl", paths[name]))
    rng = np.random.default_rng(0)
    sigma = np.cov(rng.normal(size=[64, 100]))
    save_reference(paths["ref"], {"fd_dinov2": MetricStats(np.zeros(64), sigma, 100)}, (16, 16))
    paths["images"].mkdir()
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, [16, 16, 3], dtype=np.uint8)).save(paths["images"] / f"{i:06d}.png")
    return paths


@pytest.fixture
def captured(monkeypatch, files) -> list[dict]:
    """What `edm2 generate` and `edm2 metrics gen` would run, recorded instead of run: the sampler settings, the
    seeds, and what else the command hands on."""
    calls: list[dict] = []

    def generate_with(session, seeds, outdir, grid, progress, class_idx, return_images=True, subdirs=False):
        calls.append({"settings": session.settings, "seeds": list(seeds), "outdir": outdir, "grid": grid,
                      "class": class_idx, "batch": session.batch_size, "guided": session.gnet is not None,
                      "subdirs": subdirs, "returned": return_images})

    def evaluate_model(model, runs, detectors, reference, keep, outdir, progress):
        calls.append({"settings": model.settings, "runs": runs, "batch": model.batch_size,
                      "metrics": sorted(detectors), "outdir": outdir})
        return [{"fd_dinov2": {"fd": 0.0}}], {"fd_dinov2": RepeatSummary([0.0])}

    monkeypatch.setattr(edm2.generate, "generate_with", generate_with)
    monkeypatch.setattr(edm2.metrics.measure, "evaluate_model", evaluate_model)
    monkeypatch.setenv("EDM2_DETECTOR_DIR", str(files["det"]))
    return calls


SCRIPTS = {"generate_images.py": ["generate"], "generate.py": ["generate"],
           "calculate_metrics.py": ["metrics"]}

# (official command line, the same in our spelling); {net} an EDM2 network (unconditional), {edm} and {adm}
# EDM-release networks ({edm} class-conditional: line 1 fixes a class).
SPELLINGS = [
    ("python generate_images.py --net={net} --outdir={out} --subdirs --seeds=0-49999",
     "generate --net {net} --outdir {out} --subdirs --seeds 0-49999 --steps 32"),
    ("python generate_images.py --net={edm} --gnet={edm} --guidance=1.4 --outdir={out} --seeds=16-19 --class=3 "
     "--batch=8 --steps=24 --sigma_min=0.003 --sigma_max=70 --rho=5 --S_churn=10 --S_min=0.05 --S_max=50 "
     "--S_noise=1.003",
     "generate --net {edm} --gnet {edm} --guidance 1.4 --outdir {out} --seeds 16-19 --class 3 --batch 8 --steps 24 "
     "--sigma-min 0.003 --sigma-max 70 --rho 5 --S-churn 10 --S-min 0.05 --S-max 50 --S-noise 1.003"),
    ("python generate.py --outdir={out} --seeds=0-63 --batch=64 --network={edm}",
     "generate --net {edm} --outdir {out} --seeds 0-63 --batch 64 --steps 18"),
    ("python generate.py --outdir={out} --seeds=0-3 --network={adm} --steps=256 --S_churn=40 --S_min=0.05 "
     "--S_max=50 --S_noise=1.003",
     "generate --net {adm} --outdir {out} --seeds 0-3 --steps 256 --S-churn 40 --S-min 0.05 --S-max 50 "
     "--S-noise 1.003"),
    ("python generate.py --outdir={out} --network={edm} --solver=euler --disc=vp --schedule=vp --scaling=vp",
     "generate --net {edm} --outdir {out} --solver euler --disc vp --schedule vp --scaling vp --steps 18"),
    ("python calculate_metrics.py gen --net={net} --ref={ref} --seed=123456789",
     "metrics gen --net {net} --ref {ref} --seeds 123456789-123506788 --steps 32"),
    ("python calculate_metrics.py gen --net={edm} --ref={ref} --num=100 --seed=5 --batch=16 --metrics=fd_dinov2",
     "metrics gen --net {edm} --ref {ref} --seeds 5-104 --batch 16 --metrics fd_dinov2 --steps 18"),
    ("python calculate_metrics.py gen --net={net} --ref={ref} --num=1000",
     "metrics gen --net {net} --ref {ref} --seeds 0-999"),
]


def run_line(text: str, files: dict[str, Path]) -> list[str]:
    """The arguments of a command line with the local files in place; an official script name becomes ours."""
    words = shlex.split(text.format(net=files["edm2_pixel"], edm=files["edm_vp"], adm=files["edm_edm_adm"],
                                    ref=files["ref"], out=files["out"]))
    if words[0] == "python":
        words = SCRIPTS[words[1]] + words[2:]
    return [*words, "--device", "cpu"]


@pytest.mark.parametrize("official, ours", SPELLINGS, ids=[f"line{i}" for i in range(len(SPELLINGS))])
def test_an_official_command_line_parses_to_the_settings_of_ours(official, ours, files, captured):
    ok(CliRunner().invoke(main, run_line(official, files)))
    ok(CliRunner().invoke(main, run_line(ours, files)))
    assert len(captured) == 2
    assert captured[0] == captured[1]
    assert captured[0]["settings"].num_steps is not None


def test_edm_release_networks_sample_with_their_official_defaults(files, captured):
    """No --steps: 18 for networks of the EDM release (as their generate.py), 32 for EDM2's; a given --steps
    wins in both."""
    expected = {"edm_vp": 18, "edm_edm_adm": 18, "edm2_pixel": 32}
    for name, steps in expected.items():
        ok(invoke("generate", "--net", files[name], "--outdir", files["out"], "--device", "cpu"))
        ok(invoke("metrics", "gen", "--net", files[name], "--ref", files["ref"], "--device", "cpu"))
        ok(invoke("generate", "--net", files[name], "--outdir", files["out"], "--device", "cpu", "--steps", "5"))
        assert [c["settings"].num_steps for c in captured[-3:]] == [steps, steps, 5], name
    edm = captured[0]["settings"]
    assert edm == SamplerSettings(num_steps=18)
    # the other defaults of EDM's generate.py (edm_sampler) are those of EDM2's: 0.002, 80, 7, no churn
    official = (18, 0.002, 80, 7, 0, 0, float("inf"), 1)
    assert (edm.num_steps, edm.sigma_min, edm.sigma_max, edm.rho, edm.S_churn, edm.S_min, edm.S_max,
            edm.S_noise) == official
    assert captured[0]["returned"] is False  # the command asks for no images back: constant memory


def test_edm_defaults_give_the_images_of_18_steps(files, tmp_path):
    """The real run: an EDM-release network without --steps writes the images of --steps 18, not of 32."""
    gen = ["generate", "--net", files["edm_vp"], "--seeds", "0-1", "--device", "cpu"]
    for name, extra in (("default", []), ("18", ["--steps", "18"]), ("32", ["--steps", "32"])):
        ok(invoke(*gen, "--outdir", tmp_path / name, *extra))
    pngs = {name: [(tmp_path / name / f"{s:06d}.png").read_bytes() for s in (0, 1)] for name in ("default", "18", "32")}
    assert pngs["default"] == pngs["18"] and pngs["default"] != pngs["32"]


def test_official_seed_and_num_cannot_mix_with_seeds(files, captured):
    result = invoke("metrics", "gen", "--net", files["edm2_pixel"], "--ref", files["ref"], "--seeds", "0-9",
                    "--num", "10", "--outdir", files["root"] / "never")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("edm2: error: give --seeds, or the official --seed/--num, not both")
    result = invoke("metrics", "gen", "--net", files["edm2_pixel"], "--ref", files["ref"], "--num", "1")
    assert result.exit_code == 2 and "--num >= 2" in result.stderr
    assert not captured and not (files["root"] / "never").exists()


# ----------------------------------------------------------------------------------------------------
# metrics calc --num: 50,000 by default, the official draw, too few images refused.


def official_draw(count: int, num: int, seed: int) -> np.ndarray:
    """The subset calculate_metrics.py calc measures, written out from its dataset class: the raw indices shuffled
    by a RandomState of the seed only when there are more images than asked for, the first `num`, sorted."""
    raw_idx = np.arange(count, dtype=np.int64)
    if raw_idx.size > num:
        np.random.RandomState(seed % (1 << 31)).shuffle(raw_idx)
        raw_idx = np.sort(raw_idx[:num])
    return raw_idx


@pytest.mark.parametrize("count, num, seed", [(12, 12, 0), (12, 10, 1), (70000, 50000, 0), (51000, 50000, 2**33 + 7)])
def test_the_subset_is_the_official_draw(count, num, seed):
    assert np.array_equal(draw_subset(count, num, seed), official_draw(count, num, seed))
    assert np.array_equal(draw_subset(count, None, seed), np.arange(count))


def test_calc_measures_50000_images_by_default_and_refuses_fewer(files, tmp_path, monkeypatch):
    assert OFFICIAL_NUM == edm2.metrics.measure.OFFICIAL_NUM == 50_000
    results = tmp_path / "results.json"
    calc = ["metrics", "calc", "--images", files["images"], "--ref", files["ref"], "--detector-dir", files["det"],
            "--device", "cpu", "--workers", "0", "--results", results]
    result = invoke(*calc)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [f"edm2: error: {files['images']}: holds 12 images, fewer than the 50000 asked for; pass "
                     "--num 12 (or fewer) to measure a smaller set"]
    assert not results.exists()
    asked = []
    real = edm2.metrics.measure.measure_images

    def measure_images(images, detectors, batch_size, num, seed, keep, workers, progress):
        asked.append((num, seed))
        return real(images, detectors, batch_size, num, seed, keep, workers, progress)

    monkeypatch.setattr(edm2.metrics.measure, "measure_images", measure_images)
    ok(invoke(*calc, "--num", "12"))
    ok(invoke(*calc, "--num", "10", "--seed", "3"))
    assert asked == [(12, 0), (10, 3)] and results.exists()

