"""The EDM losses (VPLoss, VELoss, EDMLoss): golden per-element losses of the official implementation given its
recorded draws (tests/data/edm_losses.npz), the noise-level distributions and weights of EDM Table 1, draws from
a generator, and augmentation inside the loss."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from edm2.augment import EDM_AUGMENT_KWARGS, AugmentPipe
from edm2.edm_losses import EDM_LOSSES, EDMLoss, VELoss, VPLoss
from edm2.losses import EDM2Loss
from edm2.networks import build_network

DATA = Path(__file__).parent / "data"


def _load(name: str) -> tuple[dict, dict]:
    with np.load(DATA / name) as d:
        arrays = {k: d[k] for k in d.files}
    return arrays, json.loads(str(arrays.pop("meta_json")))


LOSSES, LOSS_META = _load("edm_losses.npz")
NETS, NET_META = _load("edm_nets.npz")


def ddpmpp_as(class_name: str) -> torch.nn.Module:
    """The golden DDPM++ weights (vp_ddpmpp of edm_nets.npz) under the preconditioning `class_name`."""
    prefix = "vp_ddpmpp/state/"
    net = build_network(class_name, NET_META["cases"]["vp_ddpmpp"]["kwargs"])
    net.load_state_dict({k[len(prefix):]: torch.from_numpy(v) for k, v in NETS.items() if k.startswith(prefix)})
    return net.eval()


@pytest.mark.parametrize("case, loss, precond", [("vp", VPLoss(), "VPPrecond"), ("edm", EDMLoss(), "EDMPrecond")])
def test_losses_give_the_official_values_for_the_recorded_draws(case, loss, precond):
    assert LOSS_META["cases"][case]["params"] == {k: getattr(loss, k) for k in LOSS_META["cases"][case]["params"]}
    net = ddpmpp_as(precond)
    draw = torch.from_numpy(LOSSES[f"{case}/draw0_{loss.draw}"])
    with torch.no_grad():
        out = loss(net, torch.from_numpy(LOSSES["images"]), torch.from_numpy(LOSSES["labels"]),
                   sigma=loss.sigma_from_draw(draw), noise=torch.from_numpy(LOSSES[f"{case}/draw1_randn_like"]))
    expected = torch.from_numpy(LOSSES[f"{case}/loss"])
    # Relative 1e-4 (golden README), on the scale of the loss: elements near 0 have no relative precision.
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    assert out.sum().item() == pytest.approx(expected.sum().item(), rel=1e-5)


def test_noise_level_distributions_of_table_1():
    n, gen = 200_000, torch.Generator().manual_seed(0)
    # VE: ln(sigma) uniform on [ln 0.02, ln 100].
    ln_ve = VELoss().sample_sigma(n, generator=gen).log().flatten().numpy()
    assert ln_ve.min() >= np.log(0.02) - 1e-6 and ln_ve.max() <= np.log(100) + 1e-5
    np.testing.assert_allclose(np.quantile(ln_ve, [0.25, 0.5, 0.75]),
                               np.log(0.02) + np.array([0.25, 0.5, 0.75]) * np.log(100 / 0.02), atol=0.02)
    # EDM: ln(sigma) ~ N(-1.2, 1.2^2).
    ln_edm = EDMLoss().sample_sigma(n, generator=gen).log().flatten().numpy()
    assert ln_edm.mean() == pytest.approx(-1.2, abs=0.01) and ln_edm.std() == pytest.approx(1.2, abs=0.01)
    # VP: sigma = sqrt(exp(beta_d t^2/2 + beta_min t) - 1) with t ~ U(epsilon_t, 1), so t is uniform.
    sigma_vp = VPLoss().sample_sigma(n, generator=gen).flatten().double().numpy()
    t = (np.sqrt(0.1**2 + 2 * 19.9 * np.log1p(sigma_vp**2)) - 0.1) / 19.9
    assert t.min() >= 1e-5 * 0.9 and t.max() <= 1 + 1e-6
    np.testing.assert_allclose(np.quantile(t, [0.25, 0.5, 0.75]), [0.25, 0.5, 0.75], atol=0.01)


def test_loss_weights_of_table_1():
    sigma = torch.tensor([0.01, 0.5, 3.0, 80.0]).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(VPLoss().weight(sigma), 1 / sigma**2)
    torch.testing.assert_close(VELoss().weight(sigma), 1 / sigma**2)
    torch.testing.assert_close(EDMLoss(sigma_data=0.5).weight(sigma), (sigma**2 + 0.25) / (sigma * 0.5) ** 2)


class Recorder:
    """A denoiser that returns a fixed multiple of its input and records how it was called."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, x, sigma, labels, augment_labels=None):
        self.calls.append(dict(x=x, sigma=sigma, augment_labels=augment_labels))
        return 0.5 * x


@pytest.mark.parametrize("name", sorted(EDM_LOSSES))
def test_draws_come_from_the_generator_in_the_official_order(name):
    loss = EDM_LOSSES[name]()
    images = torch.rand(6, 3, 8, 8) * 2 - 1
    pipe = AugmentPipe(p=0.5, **EDM_AUGMENT_KWARGS)
    net = Recorder()
    out = loss(net, images, None, augment_pipe=pipe, generator=torch.Generator().manual_seed(5))
    # The same draws taken by hand from a generator with the same seed: sigma, augmentation, noise.
    gen = torch.Generator().manual_seed(5)
    sigma = loss.sample_sigma(6, generator=gen)
    y, augment_labels = pipe(images, generator=gen)
    noise = torch.randn(y.shape, generator=gen)
    call = net.calls[0]
    torch.testing.assert_close(call["sigma"], sigma)
    torch.testing.assert_close(call["augment_labels"], augment_labels)
    torch.testing.assert_close(call["x"], y + noise * sigma)
    torch.testing.assert_close(out, loss.weight(sigma) * (0.5 * (y + noise * sigma) - y) ** 2)
    assert augment_labels.shape == (6, 9)
    # Given sigma, noise and already augmented images, the loss takes no draw at all.
    again = loss(net, y, None, sigma=sigma, noise=noise, augment_labels=augment_labels)
    torch.testing.assert_close(again, out)


def test_every_loss_draws_its_sigma_through_sample_sigma():
    for loss in (EDM2Loss(), VPLoss(), VELoss(), EDMLoss()):
        a = loss.sample_sigma(5, generator=torch.Generator().manual_seed(3))
        b = loss.sample_sigma(5, generator=torch.Generator().manual_seed(3))
        assert a.shape == (5, 1, 1, 1) and torch.equal(a, b) and bool((a > 0).all())


def test_bad_loss_options_are_clear_errors():
    with pytest.raises(ValueError, match="epsilon_t"):
        VPLoss(epsilon_t=0)
    with pytest.raises(ValueError, match="sigma_min"):
        VELoss(sigma_min=10, sigma_max=1)
    with pytest.raises(ValueError, match="P_std"):
        EDMLoss(P_std=0)
    with pytest.raises(ValueError, match="either augment_pipe"):
        EDMLoss()(Recorder(), torch.zeros(2, 3, 8, 8), augment_pipe=AugmentPipe(xflip=1),
                  augment_labels=torch.zeros(2, 1))
