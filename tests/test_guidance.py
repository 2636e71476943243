"""Guidance and the guidance interval (Kynkaenniemi et al. 2024): analytic denoisers, so every expectation is
exact: a band covering every step is plain guidance, a band covering none is the unguided sampler, and the
guide is evaluated exactly for the noise levels sigma_lo < sigma <= sigma_hi."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from edm2.cli import main
from edm2.guidance import guided, in_interval, parse_interval
from edm2.sampling import SamplerSettings, ablation_sampler, edm_sampler, edm_sigma_steps


def gaussian(mu: float, std: float):
    """Ideal denoiser of N(mu, std^2 I): mu + std^2 / (std^2 + sigma^2) (x - mu)."""

    def D(x, sigma, labels=None):
        s2 = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *[1] * (x.ndim - 1)) ** 2
        return mu + std**2 / (std**2 + s2) * (x - mu)

    return D


class Recorder:
    """A denoiser that records the noise levels it is called with."""

    def __init__(self, denoiser) -> None:
        self.denoiser, self.sigmas = denoiser, []

    def __call__(self, x, sigma, labels=None):
        self.sigmas.append(float(torch.as_tensor(sigma).reshape(-1)[0]))
        return self.denoiser(x, sigma, labels)


NET, GNET = gaussian(1.0, 0.5), gaussian(-0.5, 1.5)
NOISE = torch.randn(8, 2, 4, 4, generator=torch.Generator().manual_seed(0))


def test_band_over_every_step_is_plain_guidance():
    plain = edm_sampler(NET, NOISE, gnet=GNET, guidance=2.0, num_steps=12)
    banded = edm_sampler(NET, NOISE, gnet=GNET, guidance=2.0, num_steps=12, guidance_interval=(0.0, 81.0))
    assert torch.equal(plain, banded)
    assert not torch.allclose(plain, edm_sampler(NET, NOISE, num_steps=12))  # guidance does change the result


def test_band_over_no_step_is_the_unguided_sampler():
    gnet = Recorder(GNET)
    unguided = edm_sampler(NET, NOISE, num_steps=12)
    banded = edm_sampler(NET, NOISE, gnet=gnet, guidance=2.0, num_steps=12, guidance_interval=(100.0, 200.0))
    assert torch.equal(unguided, banded)
    assert gnet.sigmas == []  # the guide is not even evaluated outside the band


@pytest.mark.parametrize("k_lo, k_hi", [(9, 3), (11, 0), (5, 4)])
def test_guide_switches_exactly_at_the_edges(k_lo, k_hi):
    steps = edm_sigma_steps(12, 0.002, 80.0, 7.0, dtype=torch.float32)  # as the sampler makes them
    lo, hi = float(steps[k_lo]), float(steps[k_hi])  # edges exactly on noise levels the sampler visits
    net, gnet = Recorder(NET), Recorder(GNET)
    edm_sampler(net, NOISE, gnet=gnet, guidance=1.7, num_steps=12, guidance_interval=(lo, hi))
    expected = [s for s in net.sigmas if lo < s <= hi]
    assert gnet.sigmas == expected and expected  # sigma_hi itself guided, sigma_lo itself not
    assert hi in gnet.sigmas and lo not in gnet.sigmas and lo in net.sigmas


def test_banded_result_follows_the_band_step_by_step():
    """Euler with the band covering only the first step: step 1 guided, the rest unguided, by hand."""
    steps = edm_sigma_steps(4, 0.002, 80.0, 7.0, dtype=torch.float32)
    banded = edm_sampler(NET, NOISE, gnet=GNET, guidance=3.0, num_steps=4, solver="euler",
                         guidance_interval=(float(steps[1]), 80.0))
    x = NOISE * steps[0]
    for i, (t, t_next) in enumerate(zip(steps[:-1], steps[1:])):
        D = GNET(x, t) + 3.0 * (NET(x, t) - GNET(x, t)) if i == 0 else NET(x, t)
        x = x + (t_next - t) * (x - D) / t
    torch.testing.assert_close(banded, x)


def test_the_general_sampler_and_settings_take_the_band():
    a = ablation_sampler(NET, NOISE, gnet=GNET, guidance=2.0, num_steps=10, dtype=torch.float32,
                         randn_every_step=False, guidance_interval=(0.3, 5.0))
    b = SamplerSettings(num_steps=10, guidance=2.0, guidance_interval=(0.3, 5.0)).sample(NET, NOISE, gnet=GNET)
    c = edm_sampler(NET, NOISE, gnet=GNET, guidance=2.0, num_steps=10, guidance_interval=(0.3, 5.0))
    torch.testing.assert_close(a, c)
    torch.testing.assert_close(b, c)


def test_per_image_noise_levels_mix_guided_and_unguided():
    x = NOISE[:3]
    sigma = torch.tensor([0.1, 1.0, 10.0])
    out = guided(NET, GNET, 2.0, None, torch.float32, (0.5, 5.0))(x, sigma)
    full = guided(NET, GNET, 2.0, None, torch.float32)(x, sigma)
    torch.testing.assert_close(out[1], full[1])
    torch.testing.assert_close(out[[0, 2]], NET(x, sigma)[[0, 2]])
    assert in_interval(sigma, (0.5, 5.0)).tolist() == [False, True, False]


@pytest.mark.parametrize("text", ["5,1", "1,1", "-1,2", "nan,2", "1", "a,b", "1,2,3"])
def test_bad_intervals_are_refused(text):
    with pytest.raises(ValueError, match="guidance-interval"):
        parse_interval(text)


def test_open_band_and_bad_weight():
    assert parse_interval("0.28,inf") == (0.28, float("inf"))
    with pytest.raises(ValueError, match="finite"):
        SamplerSettings(guidance=float("nan"))


def test_cli_refuses_a_bad_interval_with_one_line(tmp_path):
    result = CliRunner().invoke(main, ["generate", "--net", str(tmp_path / "missing.safetensors"),
                                       "--guidance-interval", "5.42,0.28", "--outdir", str(tmp_path / "out")])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "SIGMA_LO < SIGMA_HI" in lines[0]
    assert list(tmp_path.iterdir()) == []
