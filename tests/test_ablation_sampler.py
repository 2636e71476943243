"""The general sampler of EDM Algorithm 1 (`ablation_sampler`): golden trajectories of the official sampler on the
golden networks (tests/data/edm_sampler.npz), `edm_sampler` as its special case, the exact probability-flow ODE
solution for Gaussian data under every discretization/schedule/scaling, the EDM Figure 2 ordering with the ideal
denoiser of a point set (benchmarks/edm_figure2.py), `SamplerSettings` and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from edm2.cli import main
from edm2.networks import build_network
from edm2.networks.precond import iddpm_u_table
from edm2.sampling import SamplerSettings, ablation_sampler, edm_sampler
from edm2.schedules import DISCRETIZATIONS, SCALINGS, SCHEDULES, default_sigma_range, sigma_steps

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"


def _load(name: str) -> tuple[dict, dict]:
    with np.load(DATA / name) as d:
        arrays = {k: d[k] for k in d.files}
    return arrays, json.loads(str(arrays.pop("meta_json")))


SAMPLER, SAMPLER_META = _load("edm_sampler.npz")
NETS, NET_META = _load("edm_nets.npz")


def golden_network(name: str) -> torch.nn.Module:
    """A network of edm_nets.npz; 'edm_ddpmpp' is the vp_ddpmpp weights under EDMPrecond."""
    case = "vp_ddpmpp" if name == "edm_ddpmpp" else name
    cls = "EDMPrecond" if name == "edm_ddpmpp" else NET_META["cases"][case]["precond"]
    net = build_network(cls, NET_META["cases"][case]["kwargs"])
    prefix = f"{case}/state/"
    net.load_state_dict({k[len(prefix):]: torch.from_numpy(v) for k, v in NETS.items() if k.startswith(prefix)})
    return net.eval()


@pytest.mark.parametrize("case", sorted(SAMPLER_META["cases"]))
def test_general_sampler_reproduces_the_official_trajectories(case):
    spec = SAMPLER_META["cases"][case]
    draws = iter(torch.from_numpy(SAMPLER[f"{case}/churn{j}"]) for j in range(spec["churn_draws"]))
    net = golden_network(spec["net"])
    with torch.no_grad():
        out = ablation_sampler(net, torch.from_numpy(SAMPLER["latents"]), torch.from_numpy(SAMPLER["labels"]),
                               randn_like=lambda x: next(draws), **spec["params"])
    expected = torch.from_numpy(SAMPLER[f"{case}/out"])
    # atol 1e-4 (golden README) plus float32 rounding of the network at this output scale (up to 460): two
    # runs of the same code with 1 and 2 threads differ by 4e-4 on the iDDPM case.
    tol = 1e-4 + 2e-6 * expected.abs().max().item()
    assert (out - expected).abs().max().item() <= tol


# ---------------------------------------------------------------------------------------------------------
# Analytic denoisers.


def gaussian_denoiser(mu: float, std: float):
    """Ideal denoiser of data N(mu, std^2 I): D(x; sigma) = mu + std^2 / (std^2 + sigma^2) (x - mu)."""

    def D(x, sigma, labels=None):
        s2 = torch.as_tensor(sigma, dtype=x.dtype) ** 2
        return mu + std**2 / (std**2 + s2) * (x - mu)

    return D


def point_denoiser(points: torch.Tensor):
    """Ideal denoiser of a finite point set [P, d] (inputs [N, 1, 1, d])."""

    def D(x, sigma, labels=None):
        d2 = ((x.reshape(x.shape[0], 1, -1) - points.to(x.dtype)[None]) ** 2).sum(-1)
        w = (-d2 / (2 * torch.as_tensor(sigma, dtype=x.dtype) ** 2)).softmax(dim=1)
        return (w @ points.to(x.dtype)).reshape(x.shape)

    return D


POINTS = torch.randn(6, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("solver, churn", [("heun", 0), ("euler", 0), ("heun", 20)])
def test_edm_sampler_is_the_special_case_bit_for_bit(dtype, solver, churn):
    noise = torch.randn(16, 1, 1, 3, generator=torch.Generator().manual_seed(1), dtype=dtype)
    D, guide = point_denoiser(POINTS), point_denoiser(POINTS[:3])
    kw = dict(num_steps=9, sigma_min=0.01, sigma_max=50, rho=5, S_churn=churn, S_min=0.1, S_max=10, S_noise=1.01,
              dtype=dtype, solver=solver)
    def seeded_randn_like():
        gen = torch.Generator().manual_seed(2)
        return lambda x: torch.randn(x.shape, generator=gen, dtype=x.dtype)

    for guidance in (1.0, 1.7):
        a = edm_sampler(D, noise, gnet=guide, guidance=guidance, randn_like=seeded_randn_like(), **kw)
        b = ablation_sampler(D, noise, gnet=guide, guidance=guidance, randn_every_step=False,
                             randn_like=seeded_randn_like(), **kw)
        assert torch.equal(a, b)  # same images for the same settings


def test_churn_noise_is_drawn_on_every_step_or_on_churned_steps_only():
    calls = []

    def counting(x):
        calls.append(1)
        return torch.zeros_like(x)

    D, noise = point_denoiser(POINTS), torch.randn(4, 1, 1, 3, dtype=torch.float64)
    churned = int(((sigma_steps("edm", 10, 0.002, 80) >= 0.05) & (sigma_steps("edm", 10, 0.002, 80) <= 50)).sum())
    for every, expected in ((True, 10), (False, churned)):
        calls.clear()
        ablation_sampler(D, noise, num_steps=10, S_churn=40, S_min=0.05, S_max=50, randn_like=counting,
                         randn_every_step=every)
        assert len(calls) == expected
    calls.clear()
    ablation_sampler(D, noise, num_steps=10, randn_like=counting)  # deterministic: no draws at all
    assert calls == [] and 0 < churned < 10


@pytest.mark.parametrize("discretization", DISCRETIZATIONS)
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("scaling", SCALINGS)
def test_every_design_choice_solves_the_same_probability_flow_ode(discretization, schedule, scaling):
    # Gaussian data N(mu, s^2): the probability-flow ODE moves x - mu by sqrt(s^2 + sigma^2) / sqrt(s^2 +
    # sigma_0^2) (EDM Eq. 1 with the Gaussian score) whatever sigma(t) and s(t). With sigma_min = 1e-4 the last
    # step into sigma = 0 changes x by about (sigma_min / s)^2 only (the iDDPM table ends at 0.006 instead).
    mu, s = 0.3, 0.5
    noise = torch.randn(8, 1, 1, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    lo, hi = default_sigma_range(discretization)
    lo = lo if discretization == "iddpm" else 1e-4
    errors = []
    for n in (64, 256):
        levels = sigma_steps(discretization, n, lo, hi)
        sigma_0, sigma_min = levels[0].item(), levels[-1].item()
        exact = mu + np.sqrt((s**2 + sigma_min**2) / (s**2 + sigma_0**2)) * (sigma_0 * noise - mu)
        out = ablation_sampler(gaussian_denoiser(mu, s), noise, num_steps=n, sigma_min=lo,
                               discretization=discretization, schedule=schedule, scaling=scaling)
        errors.append((out - exact).abs().max().item() / exact.abs().max().item())
    # Second order: 4x the steps divide the error by about 16 (at least by 5 here), down to the floor that the
    # last step leaves; a wrong schedule, scaling or derivative would not converge at all.
    assert errors[1] <= max(errors[0] / 5, 1e-3) and errors[1] < 0.1, errors


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_generalized_second_order_step_converges_at_least_at_second_order(alpha):
    mu, s = 0.3, 0.5
    noise = torch.randn(8, 1, 1, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    D = gaussian_denoiser(mu, s)
    ref = ablation_sampler(D, noise, num_steps=1024, alpha=alpha)
    ns = [8, 16, 32]
    errors = [(ablation_sampler(D, noise, num_steps=n, alpha=alpha) - ref).abs().max().item() for n in ns]
    slope = np.polyfit(np.log(ns), np.log(errors), 1)[0]
    assert slope < -1.6, (errors, slope)  # Euler: about -1 (tests/test_sampling.py)


def test_iddpm_discretization_takes_levels_of_the_table():
    levels = sigma_steps("iddpm", 12, 0.002, 81)
    table = iddpm_u_table(dtype=torch.float64)
    assert all(bool((table == v).any()) for v in levels)
    assert levels[0] == table[table <= 81].max() and levels[-1] == table[table >= 0.002].min()
    assert bool((levels[:-1] > levels[1:]).all())


def test_default_noise_ranges_of_the_discretizations():
    vp = lambda t: np.sqrt(np.exp(0.5 * 19.9 * t**2 + 0.1 * t) - 1)  # noqa: E731  (EDM Table 1, VP)
    np.testing.assert_allclose(default_sigma_range("vp", 1e-3), [vp(1e-3), vp(1.0)], rtol=1e-12)
    assert default_sigma_range("ve") == (0.02, 100.0)
    assert default_sigma_range("iddpm") == (0.002, 81.0) and default_sigma_range("edm") == (0.002, 80.0)
    settings = SamplerSettings(discretization="ve")
    assert (settings.sigma_min, settings.sigma_max) == (0.02, 100.0)
    assert (SamplerSettings().sigma_min, SamplerSettings().sigma_max) == (0.002, 80.0)


def test_edm_release_networks_are_sampled_as_their_official_code_does():
    # A network with round_sigma (the EDM release): float64, noise range clipped to the network's, its levels
    # rounded to those it supports, churn noise drawn on every step.
    net = golden_network("iddpm_adm")
    seen = []
    net.register_forward_pre_hook(lambda m, args: seen.append(float(torch.as_tensor(args[1]).reshape(-1)[0])))
    noise = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.nn.functional.one_hot(torch.tensor([3]), 10).float()
    settings = SamplerSettings(num_steps=4, sigma_max=500)  # beyond the network's range: clipped
    with torch.no_grad():
        out = settings.sample(net, noise, labels)
        direct = ablation_sampler(net, noise, labels, num_steps=4, sigma_min=0.002, sigma_max=500)
    assert out.dtype == torch.float64 and torch.equal(out, direct)
    table = net.u.double()
    assert net.sigma_max > 500 and seen[0] == table[(table - 500).abs().argmin()].item()  # 500, rounded
    assert all(bool(((table - v).abs() < 1e-12 * v).any()) for v in seen)  # every level from the table


def test_sampler_settings_route_edm2_style_denoisers_to_edm_sampler():
    D = point_denoiser(POINTS)
    noise = torch.randn(5, 1, 1, 3, generator=torch.Generator().manual_seed(6))
    settings = SamplerSettings(num_steps=7)
    torch.testing.assert_close(settings.sample(D, noise), edm_sampler(D, noise, num_steps=7), rtol=0, atol=0)
    vp = SamplerSettings(num_steps=7, discretization="vp", schedule="vp", scaling="vp", solver="euler")
    assert not vp.is_edm_sampler and vp.evaluations == 7
    torch.testing.assert_close(vp.sample(D, noise), ablation_sampler(
        D, noise, num_steps=7, discretization="vp", schedule="vp", scaling="vp", solver="euler", sigma_min=vp.sigma_min,
        sigma_max=vp.sigma_max, dtype=torch.float32, randn_every_step=False), rtol=0, atol=0)


def test_edm_figure2_ordering_with_the_ideal_denoiser(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "edm_figure2.py"), "--out", str(tmp_path),
                           "--samples", "64"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "edm_figure2.json").read_text())
    heun = result["errors"]["EDM time steps, Heun"]
    for name in ("VP, original", "VE, original", "EDM time steps, Euler"):
        assert all(h < e for h, e in zip(heun, result["errors"][name])), (name, result["errors"])
    assert result["heun_edm_closest_at_every_nfe"] and result["nfe"] == [9, 17, 33, 65]
    assert (tmp_path / "edm_figure2.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(discretization="cosine"), "unknown discretization 'cosine'"),
    (dict(schedule="exp"), "unknown schedule 'exp'"),
    (dict(scaling="ve"), "unknown scaling 've'"),
    (dict(solver="rk4"), "unknown solver 'rk4'"),
    (dict(alpha=0.0), "alpha"),
    (dict(discretization="iddpm", sigma_min=0.0001, sigma_max=0.0015), "iDDPM table"),
])
def test_bad_sampler_choices_are_clear_errors(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        ablation_sampler(point_denoiser(POINTS), torch.randn(2, 1, 1, 3), num_steps=4, **kwargs)


def test_a_noise_range_outside_the_networks_is_a_clear_error():
    net = golden_network("vp_ddpmpp")  # supports sigma in [0.00098, 152]
    with pytest.raises(ValueError, match=r"outside the range .* the network supports"):
        ablation_sampler(net, torch.randn(1, 3, 16, 16), num_steps=2, sigma_min=200, sigma_max=300)


@pytest.mark.parametrize("args, fragment", [
    (["--disc", "cosine"], "--disc"), (["--schedule", "exp"], "--schedule"), (["--scaling", "ve"], "--scaling"),
    (["--alpha", "0"], "--alpha"), (["--disc", "iddpm", "--sigma-min", "0.0001", "--sigma-max", "0.0015"], "iDDPM"),
])
def test_cli_bad_design_choices_are_one_line_errors(args, fragment, tmp_path):
    net = build_network("EDMPrecond", dict(img_resolution=8, img_channels=1, model_channels=8, channel_mult=[1],
                                           num_blocks=1, attn_resolutions=[]))
    from edm2.checkpoint import Snapshot, save_snapshot
    from edm2.presets import EDMNetworkConfig

    path = tmp_path / "net.safetensors"
    save_snapshot(path, Snapshot(net.state_dict(), EDMNetworkConfig("EDMPrecond", net.init_kwargs), None, 1, {}))
    result = CliRunner().invoke(main, ["generate", "--net", str(path), "--outdir", str(tmp_path / "out"),
                                       "--seeds", "0", "--steps", "2", "--device", "cpu", *args])
    assert result.exit_code == 2, result.output
    assert fragment in result.output and len(result.output.strip().splitlines()) <= 3
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
