"""The published models by name (`edm2 generate --preset`, `metrics gen --preset`, `info --generation`,
`train --transfer NAME`): every preset against a table written here from the official generate_images.py, and the
presets used end to end through a local HTTP server standing in for the official host (EDM2_MIRROR)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from test_download import cache, server  # noqa: F401  (fixtures: a local HTTP server, a download cache)

from edm2.cli import main
from edm2.published import GENERATION_PRESETS, MODEL_ROOT, generation_preset

PICKLES = Path(__file__).parent / "data" / "official_pickles"

# The official config_presets of NVlabs/edm2 generate_images.py: net, gnet (None: no guide), guidance, and the
# metric value in the comment beside each.
X = "edm2-img512-xs-uncond-2147483-"
OFFICIAL = {
    "edm2-img512-xs-fid": ("edm2-img512-xs-2147483-0.135", None, 1, 3.53),
    "edm2-img512-xs-dino": ("edm2-img512-xs-2147483-0.200", None, 1, 103.39),
    "edm2-img512-s-fid": ("edm2-img512-s-2147483-0.130", None, 1, 2.56),
    "edm2-img512-s-dino": ("edm2-img512-s-2147483-0.190", None, 1, 68.64),
    "edm2-img512-m-fid": ("edm2-img512-m-2147483-0.100", None, 1, 2.25),
    "edm2-img512-m-dino": ("edm2-img512-m-2147483-0.155", None, 1, 58.44),
    "edm2-img512-l-fid": ("edm2-img512-l-1879048-0.085", None, 1, 2.06),
    "edm2-img512-l-dino": ("edm2-img512-l-1879048-0.155", None, 1, 52.25),
    "edm2-img512-xl-fid": ("edm2-img512-xl-1342177-0.085", None, 1, 1.96),
    "edm2-img512-xl-dino": ("edm2-img512-xl-1342177-0.155", None, 1, 45.96),
    "edm2-img512-xxl-fid": ("edm2-img512-xxl-0939524-0.070", None, 1, 1.91),
    "edm2-img512-xxl-dino": ("edm2-img512-xxl-0939524-0.150", None, 1, 42.84),
    "edm2-img64-s-fid": ("edm2-img64-s-1073741-0.075", None, 1, 1.58),
    "edm2-img64-m-fid": ("edm2-img64-m-2147483-0.060", None, 1, 1.43),
    "edm2-img64-l-fid": ("edm2-img64-l-1073741-0.040", None, 1, 1.33),
    "edm2-img64-xl-fid": ("edm2-img64-xl-0671088-0.040", None, 1, 1.33),
    "edm2-img512-xs-guid-fid": ("edm2-img512-xs-2147483-0.045", X + "0.045", 1.4, 2.91),
    "edm2-img512-xs-guid-dino": ("edm2-img512-xs-2147483-0.150", X + "0.150", 1.7, 79.94),
    "edm2-img512-s-guid-fid": ("edm2-img512-s-2147483-0.025", X + "0.025", 1.4, 2.23),
    "edm2-img512-s-guid-dino": ("edm2-img512-s-2147483-0.085", X + "0.085", 1.9, 52.32),
    "edm2-img512-m-guid-fid": ("edm2-img512-m-2147483-0.030", X + "0.030", 1.2, 2.01),
    "edm2-img512-m-guid-dino": ("edm2-img512-m-2147483-0.015", X + "0.015", 2.0, 41.98),
    "edm2-img512-l-guid-fid": ("edm2-img512-l-1879048-0.015", X + "0.015", 1.2, 1.88),
    "edm2-img512-l-guid-dino": ("edm2-img512-l-1879048-0.035", X + "0.035", 1.7, 38.20),
    "edm2-img512-xl-guid-fid": ("edm2-img512-xl-1342177-0.020", X + "0.020", 1.2, 1.85),
    "edm2-img512-xl-guid-dino": ("edm2-img512-xl-1342177-0.030", X + "0.030", 1.7, 35.67),
    "edm2-img512-xxl-guid-fid": ("edm2-img512-xxl-0939524-0.015", X + "0.015", 1.2, 1.81),
    "edm2-img512-xxl-guid-dino": ("edm2-img512-xxl-0939524-0.015", X + "0.015", 1.7, 33.09),
    "edm2-img512-s-autog-fid": ("edm2-img512-s-2147483-0.070", "edm2-img512-xs-0134217-0.125", 2.1, 1.34),
    "edm2-img512-s-autog-dino": ("edm2-img512-s-2147483-0.120", "edm2-img512-xs-0134217-0.165", 2.45, 36.67),
    "edm2-img512-xxl-autog-fid": ("edm2-img512-xxl-0939524-0.075", "edm2-img512-m-0268435-0.155", 2.05, 1.25),
    "edm2-img512-xxl-autog-dino": ("edm2-img512-xxl-0939524-0.130", "edm2-img512-m-0268435-0.205", 2.3, 24.18),
    "edm2-img512-s-uncond-autog-fid": ("edm2-img512-s-uncond-2147483-0.070", "edm2-img512-xs-uncond-0134217-0.110",
                                       2.85, 3.86),
    "edm2-img512-s-uncond-autog-dino": ("edm2-img512-s-uncond-2147483-0.090",
                                        "edm2-img512-xs-uncond-0134217-0.125", 2.9, 90.39),
    "edm2-img64-s-autog-fid": ("edm2-img64-s-1073741-0.045", "edm2-img64-xs-0134217-0.110", 1.7, 1.01),
    "edm2-img64-s-autog-dino": ("edm2-img64-s-1073741-0.105", "edm2-img64-xs-0134217-0.175", 2.2, 31.85),
}
ROOT = "https://nvlabs-fi-cdn.nvidia.com/edm2/posthoc-reconstructions/"


def invoke(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_every_official_preset_resolves_to_the_official_settings(name):
    net, gnet, guidance, reported = OFFICIAL[name]
    p = generation_preset(name)
    assert p.net_url == ROOT + net + ".pkl"
    assert p.gnet_url == (None if gnet is None else ROOT + gnet + ".pkl")
    assert p.guidance == guidance and p.reported == reported and p.guidance_interval is None
    assert p.metric == ("fd_dinov2" if name.endswith("dino") else "fid")
    assert p.ema == float(net.rsplit("-", 1)[1])
    assert p.ref_url == f"https://nvlabs-fi-cdn.nvidia.com/edm2/dataset-refs/{name.split('-')[1]}.pkl"
    s = p.settings()  # the official edm_sampler's defaults with the preset's guidance
    assert (s.num_steps, s.sigma_min, s.sigma_max, s.rho, s.S_churn, s.guidance) == (32, 0.002, 80, 7, 0, guidance)


def test_the_table_holds_the_official_presets_and_the_interval_ones():
    assert set(OFFICIAL) <= set(GENERATION_PRESETS)
    extra = {n: p for n, p in GENERATION_PRESETS.items() if n not in OFFICIAL}
    assert sorted(extra) == ["edm2-img512-s-guid-interval-fid", "edm2-img512-xxl-guid-interval-fid"]
    assert all(p.guidance_interval == (0.28, 5.42) and p.gnet is not None for p in extra.values())
    listed = invoke("info", "--generation")
    assert listed.exit_code == 0
    assert all(name in listed.output for name in GENERATION_PRESETS)
    assert "FID 1.34" in listed.output and "FD_DINOv2 24.18" in listed.output


def test_unknown_names_get_the_closest_ones(tmp_path):
    with pytest.raises(ValueError, match="closest: edm2-img512-s-autog-fid"):
        generation_preset("edm2-img512-s-autog-fdi")
    result = invoke("generate", "--preset", "edm2-img512-s-autogfid", "--outdir", tmp_path / "out")
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert "closest" in result.output and not (tmp_path / "out").exists()
    both = invoke("generate", "--preset", "edm2-img64-s-fid", "--net", "x.pkl", "--outdir", tmp_path / "out")
    assert both.exit_code == 2 and "not both" in both.output


def serve_preset(server, name: str, net: Path, gnet: Path | None = None) -> None:  # noqa: F811
    """The files of preset `name` on the local server, under the official paths (EDM2_MIRROR points there)."""
    p = generation_preset(name)
    path = "/" + MODEL_ROOT.split("://", 1)[1].split("/", 1)[1]
    server.files[f"{path}/{p.net}"] = net.read_bytes()
    if gnet is not None:
        server.files[f"{path}/{p.gnet}"] = gnet.read_bytes()


def pngs(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))}


def test_generate_with_a_preset_equals_the_same_networks_given_by_hand(server, cache, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("EDM2_MIRROR", server.base)
    net, gnet = PICKLES / "edm2_pixel.pkl", PICKLES / "edm_vp.pkl"  # 16x16 RGB: EDM2's Precond, EDM's VPPrecond
    serve_preset(server, "edm2-img64-s-autog-fid", net, gnet)
    by_name = invoke("generate", "--preset", "edm2-img64-s-autog-fid", "--seeds", "0-2", "--steps", 4,
                     "--outdir", tmp_path / "a", "--device", "cpu")
    assert by_name.exit_code == 0, by_name.output
    by_hand = invoke("generate", "--net", net, "--gnet", gnet, "--guidance", 1.7, "--seeds", "0-2", "--steps", 4,
                     "--outdir", tmp_path / "b", "--device", "cpu")
    assert by_hand.exit_code == 0, by_hand.output
    a, b = pngs(tmp_path / "a"), pngs(tmp_path / "b")
    assert list(a) == ["000000.png", "000001.png", "000002.png"] and all(np.array_equal(a[k], b[k]) for k in a)
    unguided = invoke("generate", "--net", net, "--seeds", "0-2", "--steps", 4, "--outdir", tmp_path / "c",
                      "--device", "cpu")
    assert unguided.exit_code == 0 and not all(np.array_equal(a[k], v) for k, v in pngs(tmp_path / "c").items())
    # The command line's weight wins over the preset's: --guidance 1 is the unguided sampler.
    override = invoke("generate", "--preset", "edm2-img64-s-autog-fid", "--guidance", 1, "--seeds", "0-2",
                      "--steps", 4, "--outdir", tmp_path / "d", "--device", "cpu")
    assert override.exit_code == 0 and all(np.array_equal(v, pngs(tmp_path / "c")[k])
                                           for k, v in pngs(tmp_path / "d").items())
    assert len([r for r in server.requests if r["status"] == 200]) == 2  # each file downloaded once


def test_metrics_gen_takes_the_presets_reference_offline_one_line(tmp_path):
    result = invoke("metrics", "gen", "--preset", "edm2-img512-s-fid", "--num", 10)
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert "dataset-refs/img512.pkl" in result.output and "EDM2_MIRROR" in result.output


def test_transfer_by_published_name(server, cache, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("EDM2_MIRROR", server.base)
    serve_preset(server, "edm2-img64-s-fid", PICKLES / "edm2_pixel.pkl")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.integers(0, 256, [16, 16, 16, 3], dtype=np.uint8))
    result = invoke("train", "--outdir", tmp_path / "run", "--data", tmp_path / "d.npz", "--uncond", "--transfer",
                    "edm2-img64-s-fid", "--duration", 8, "--batch", 8, "--workers", 0, "--dry-run")
    assert result.exit_code == 0, result.output
    run = json.loads(result.output[result.output.index("{"):])
    assert run["transfer"] == "edm2-img64-s-fid" and run["network"]["model_channels"] == 32
