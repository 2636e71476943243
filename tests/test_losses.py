"""EDM2 uncertainty-weighted loss (EDM2 Eq. 21 / SPEC section 3) and EDM noise-level sampling."""

from __future__ import annotations

import math

import pytest
import torch

from edm2.losses import EDM2Loss, edm_loss_weight, sample_sigma
from edm2.networks import Precond


class _FakeNet:
    """Analytic stand-in for Precond: D = 0.5 x + 0.1 sigma, u = 0.3 ln(sigma) - 0.2. Records its calls."""

    def __init__(self) -> None:
        self.calls = []

    def __call__(self, x, sigma, labels, return_logvar=False):
        assert return_logvar
        self.calls.append((x.clone(), sigma.clone(), labels))
        return 0.5 * x + 0.1 * sigma, 0.3 * sigma.log() - 0.2


def _draw(images, P_mean, P_std, seed):
    """sigma ([N,1,1,1], drawn first) and the noisy input, from a generator seeded like the loss's."""
    gen = torch.Generator().manual_seed(seed)
    sigma = torch.exp(torch.randn([images.shape[0], 1, 1, 1], generator=gen).double() * P_std + P_mean)
    sigma = sigma.to(images.dtype)
    noise = torch.randn(images.shape, generator=gen, dtype=images.dtype) * sigma
    return sigma, images + noise


def _formula(images, x, sigma, sigma_data, D, u):
    """Per-element lambda(sigma) / e^u (D - y)^2 + u, written independently of the library."""
    lam = 1 / sigma**2 + 1 / sigma_data**2  # = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2
    return lam * torch.exp(-u) * (D - images) ** 2 + u


def _fake_D(x, sigma):
    return 0.5 * x + 0.1 * sigma


def _fake_u(sigma):
    return 0.3 * sigma.log() - 0.2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_edm2_loss_matches_formula(dtype):
    P_mean, P_std, sigma_data, seed = -0.4, 1.0, 0.5, 1234
    images = torch.randn([6, 3, 4, 5], generator=torch.Generator().manual_seed(0), dtype=dtype) * 0.5
    labels = torch.eye(6)[:, :4]
    net = _FakeNet()
    loss_fn = EDM2Loss(P_mean=P_mean, P_std=P_std, sigma_data=sigma_data)
    loss = loss_fn(net, images, labels, generator=torch.Generator().manual_seed(seed))
    assert loss.shape == images.shape
    assert loss.dtype == dtype

    # The network saw the noisy images, one sigma per image shaped [N,1,1,1], and the labels. sigma is
    # recovered from the generator up to float32 rounding of the draw.
    sigma, x = _draw(images, P_mean, P_std, seed)
    assert len(net.calls) == 1
    seen_x, seen_sigma, seen_labels = net.calls[0]
    assert seen_sigma.shape == (6, 1, 1, 1)
    torch.testing.assert_close(seen_sigma, sigma, rtol=1e-6, atol=0)
    torch.testing.assert_close(seen_x, x, rtol=1e-5, atol=1e-6)
    assert seen_labels is labels
    assert seen_sigma.unique().numel() == 6  # one draw per image, not one per batch
    # Given what the network saw, the loss is exactly the formula.
    expected = _formula(images, seen_x, seen_sigma, sigma_data, _fake_D(seen_x, seen_sigma), _fake_u(seen_sigma))
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss, expected, **tol)
    # And from the independent draw.
    expected = _formula(images, x, sigma, sigma_data, _fake_D(x, sigma), _fake_u(sigma))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)


def test_edm2_loss_uses_P_mean_P_std_and_sigma_data():
    images = torch.randn([4, 2, 3, 3], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    P_mean, P_std, sigma_data = 0.7, 0.3, 1.3
    loss = EDM2Loss(P_mean, P_std, sigma_data)(_FakeNet(), images, generator=torch.Generator().manual_seed(9))
    sigma, x = _draw(images, P_mean, P_std, 9)
    expected = _formula(images, x, sigma, sigma_data, _fake_D(x, sigma), _fake_u(sigma))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_edm2_loss_with_given_sigma_and_noise():
    # The training loop draws sigma and unit noise per global batch and passes them in.
    gen = torch.Generator().manual_seed(5)
    images = torch.randn([3, 2, 4, 4], generator=gen, dtype=torch.float64)
    sigma = torch.tensor([0.01, 0.7, 20.0], dtype=torch.float64)
    noise = torch.randn(images.shape, generator=gen, dtype=torch.float64)
    net = _FakeNet()
    loss = EDM2Loss(sigma_data=0.5)(net, images, sigma=sigma, noise=noise)
    s = sigma.reshape(-1, 1, 1, 1)
    x = images + noise * s
    expected = _formula(images, x, s, 0.5, _fake_D(x, s), _fake_u(s))
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(net.calls[0][1], s, rtol=0, atol=0)


def test_sample_sigma_distribution():
    n, P_mean, P_std = 100_000, -0.8, 1.6
    sigma = sample_sigma(n, P_mean, P_std, generator=torch.Generator().manual_seed(0))
    assert sigma.shape == (n, 1, 1, 1)
    assert bool((sigma > 0).all())
    log_sigma = sigma.double().log().flatten()
    # Sampling error of the mean: P_std / sqrt(n) = 0.005; of the std: P_std / sqrt(2n) = 0.0036.
    assert abs(log_sigma.mean().item() - P_mean) < 5 * P_std / math.sqrt(n)
    assert abs(log_sigma.std().item() - P_std) < 5 * P_std / math.sqrt(2 * n)
    # Same generator state, same draws; the draw is ln(sigma) = randn * P_std + P_mean.
    again = sample_sigma(n, P_mean, P_std, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(sigma, again, rtol=0, atol=0)
    rnd = torch.randn([n, 1, 1, 1], generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(sigma, torch.exp(rnd * P_std + P_mean))


def test_edm_loss_weight_formula():
    sigma = torch.tensor([0.002, 0.1, 0.5, 1.0, 3.0, 80.0], dtype=torch.float64)
    for sigma_data in (0.5, 1.0):
        w = edm_loss_weight(sigma, sigma_data)
        torch.testing.assert_close(w, 1 / sigma**2 + 1 / sigma_data**2, rtol=1e-14, atol=0)
        # lambda = 1 / c_out^2: the EDM weighting gives the zero network unit loss at every sigma.
        c_out = sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()
        torch.testing.assert_close(w * c_out**2, torch.ones_like(sigma), rtol=1e-14, atol=0)


@pytest.mark.parametrize("P_std", [0.0, -1.0])
def test_edm2_loss_rejects_nonpositive_P_std(P_std):
    with pytest.raises(ValueError):
        EDM2Loss(P_mean=-0.4, P_std=P_std)


def _small_precond() -> Precond:
    torch.manual_seed(0)
    return Precond(img_resolution=8, img_channels=3, label_dim=4, model_channels=16, channel_mult=[1, 2],
                   num_blocks=1, attn_resolutions=[4], channels_per_head=16, use_fp16=False)


def test_edm2_loss_with_real_precond_zero_network():
    # At initialization the output gain is 0, so D = c_skip x exactly and the loss is known in closed
    # form given u(sigma). For y ~ N(0, sigma_data^2) the error D - y is Gaussian with variance c_out^2,
    # so lambda (D - y)^2 = (loss - u) e^u averages to 1 at every noise level (EDM weighting).
    net = _small_precond().train()
    assert net.unet.out_gain.item() == 0.0
    sigma_data, seed = 0.5, 7
    images = torch.randn([64, 3, 8, 8], generator=torch.Generator().manual_seed(2)) * sigma_data
    labels = torch.nn.functional.one_hot(torch.arange(64) % 4, 4).float()
    loss_fn = EDM2Loss(P_mean=-0.4, P_std=1.0, sigma_data=sigma_data)
    loss = loss_fn(net, images, labels, generator=torch.Generator().manual_seed(seed))
    assert loss.shape == images.shape
    assert bool(torch.isfinite(loss).all())

    # The objective backpropagates to the uncertainty head (the U-Net output is gated by out_gain = 0).
    (loss.sum() / images.shape[0]).backward()
    grads = {n: p.grad for n, p in net.named_parameters()}
    assert grads["logvar_linear.weight"] is not None
    assert bool(torch.isfinite(grads["logvar_linear.weight"]).all())
    assert grads["logvar_linear.weight"].abs().sum() > 0
    assert grads["unet.out_gain"] is not None and grads["unet.out_gain"].abs() > 0

    # u(sigma) as the loss saw it: the train-mode call stored normalize(w) and used normalize of that,
    # which is what an eval-mode call now uses.
    sigma, x = _draw(images, -0.4, 1.0, seed)
    with torch.no_grad():
        u = net.eval()(images, sigma, labels, return_logvar=True)[1]
    assert u.shape == (64, 1, 1, 1)
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    expected = _formula(images, x, sigma, sigma_data, c_skip * x, u)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-5)

    normalized = ((loss.detach() - u) * u.exp()).mean().item()
    # Mean of 12288 chi^2_1 variables: 1 +- 0.013.
    assert abs(normalized - 1) < 0.07, normalized


def test_edm2_loss_with_trained_looking_precond_is_finite():
    net = _small_precond().train()
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim == 0:
                p.fill_(0.7)  # out_gain and emb_gains: make the U-Net visible
    images = torch.randn([4, 3, 8, 8], generator=torch.Generator().manual_seed(3)) * 0.5
    loss = EDM2Loss()(net, images, None, generator=torch.Generator().manual_seed(4))
    assert loss.shape == images.shape
    assert bool(torch.isfinite(loss).all())
    loss.sum().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        assert bool(torch.isfinite(p.grad).all()), name
