"""Encoders against formulas derived from the specification (SPEC section 5), not from the code under test:
pixels scaled to [-1, 1]; VAE latents standardised per channel with the published ImageNet statistics
(raw mean [5.81, 3.25, 0.12, -2.15], raw std [4.17, 4.62, 3.71, 3.28] -> mean 0, std 0.5), sampled from the stored
posterior mean and std, pixels fed to the VAE in [0, 1] and its output clamped to [0, 1]. Also the latent
statistics, the snapshot metadata format and the one-line errors for a missing VAE or diffusers."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from edm2.data import ImageDataset, StabilityVAEEncoder, StandardRGBEncoder, encoder_from_dict
from edm2.data.encoders import load_stability_vae
from edm2.data.latent_stats import latent_statistics, load_latent_stats

RAW_MEAN = np.array([5.81, 3.25, 0.12, -2.15])
RAW_STD = np.array([4.17, 4.62, 3.71, 3.28])


def standardise(z: np.ndarray) -> np.ndarray:
    """SPEC: (z - raw_mean) / raw_std * final_std + final_mean, per channel, in float64."""
    return (z - RAW_MEAN[None, :, None, None]) / RAW_STD[None, :, None, None] * 0.5 + 0.0


def unstandardise(x: np.ndarray) -> np.ndarray:
    return (x - 0.0) / 0.5 * RAW_STD[None, :, None, None] + RAW_MEAN[None, :, None, None]


def test_standard_rgb_maps_uint8_to_minus_one_one_and_back():
    enc = StandardRGBEncoder()
    pixels = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    x = enc.encode(pixels)
    assert x.dtype == torch.float32
    np.testing.assert_allclose(x.numpy(), pixels.numpy() / 127.5 - 1, rtol=0, atol=1e-7)
    assert torch.equal(enc.decode(x), pixels)  # every level survives the round trip
    assert enc.decode(torch.tensor([[[[-2.0, 2.0]]]])).tolist() == [[[[0, 255]]]]
    assert enc.to_dict() == {"class": "StandardRGBEncoder", "kwargs": {}}


def test_vae_encoder_latent_formula():
    rng = np.random.default_rng(0)
    mean = rng.normal(RAW_MEAN[None, :, None, None], RAW_STD[None, :, None, None], [3, 4, 5, 5])
    std = rng.uniform(0.01, 0.3, [3, 4, 5, 5])
    eps = rng.standard_normal([3, 4, 5, 5])
    raw = torch.from_numpy(np.concatenate([mean, std], axis=1).astype(np.float32))
    enc = StabilityVAEEncoder()
    got = enc.encode_latents(raw, noise=torch.from_numpy(eps.astype(np.float32))).numpy()
    np.testing.assert_allclose(got, standardise(mean + eps * std), rtol=1e-5, atol=2e-6)
    # Without given noise the sample is drawn: pixel 0 has posterior N(raw_mean, raw_std^2), pixel 1
    # N(raw_mean + 1, (2 raw_std)^2); standardised: N(0, 0.5^2) and N(0.5 / raw_std, 1).
    mean = np.stack([RAW_MEAN, RAW_MEAN + 1], axis=-1)[:, None, :]  # [4, 1, 2]
    std = np.stack([RAW_STD, 2 * RAW_STD], axis=-1)[:, None, :]
    big = torch.from_numpy(np.concatenate([mean, std])[None].repeat(40000, 0).astype(np.float32))
    torch.manual_seed(0)
    draws = enc.encode_latents(big).numpy()[:, :, 0, :]  # [N, 4, 2]
    np.testing.assert_allclose(draws[:, :, 0].mean(0), 0, atol=0.01)
    np.testing.assert_allclose(draws[:, :, 1].mean(0), 0.5 / RAW_STD, atol=0.015)
    np.testing.assert_allclose(draws.std(0), np.stack([[0.5] * 4, [1.0] * 4], -1), rtol=0.02)


def test_vae_encoder_matches_the_vae_and_the_spec(tiny_vae):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_vae).eval()
    enc = StabilityVAEEncoder(str(tiny_vae), batch_size=2)
    pixels = torch.from_numpy(np.random.default_rng(1).integers(0, 256, [3, 3, 32, 32], dtype=np.uint8))
    raw = enc.encode_pixels(pixels)
    with torch.no_grad():
        dist = vae.encode(pixels.double().div(255).float())["latent_dist"]  # pixels in [0, 1]
    assert raw.shape == (3, 8, 8, 8) and raw.dtype == torch.float32
    torch.testing.assert_close(raw, torch.cat([dist.mean, dist.std], 1), rtol=1e-5, atol=1e-5)
    # Decoding: undo the standardisation, run the VAE decoder, clamp to [0, 1], scale to 0..255 (truncating).
    final = torch.from_numpy(np.random.default_rng(2).normal(0, 0.5, [3, 4, 8, 8]).astype(np.float32))
    with torch.no_grad():
        out = vae.decode(torch.from_numpy(unstandardise(final.double().numpy()).astype(np.float32)))["sample"]
    expected = np.floor(np.clip(out.numpy().astype(np.float64), 0, 1) * 255)
    got = enc.decode(final)
    assert got.dtype == torch.uint8 and got.shape == (3, 3, 32, 32)
    assert np.abs(got.numpy().astype(np.float64) - expected).max() <= 1
    assert np.mean(got.numpy() == expected) > 0.99
    assert 0 < (expected == 0).mean() < 1 or 0 < (expected == 255).mean() < 1  # the clamp is exercised
    # bf16 runs the same path within bf16's resolution.
    low = StabilityVAEEncoder(str(tiny_vae), precision="bf16").encode_pixels(pixels)
    torch.testing.assert_close(low, raw, rtol=0.05, atol=0.05)


def test_metadata_round_trip_and_checks():
    spec = {"class": "StabilityVAEEncoder", "kwargs": {"vae_name": "/models/vae", "raw_mean": [1.0, 2.0],
                                                       "raw_std": [3.0, 4.0], "final_mean": 0.0, "final_std": 0.5}}
    enc = encoder_from_dict(spec)
    assert enc.to_dict() == spec and enc.network_channels(4) == 2
    assert encoder_from_dict(spec, vae_name="elsewhere").vae_name == "elsewhere"
    assert isinstance(encoder_from_dict(None), StandardRGBEncoder)  # snapshots from before encoders existed
    assert encoder_from_dict(StabilityVAEEncoder().to_dict()).to_dict()["kwargs"]["raw_std"] == RAW_STD.tolist()
    for bad, fragment in [({"class": "PickleEncoder", "kwargs": {}}, "unknown encoder"),
                          ({"class": "StabilityVAEEncoder", "kwargs": {"exec": 1}}, "unknown"),
                          ({"class": "StabilityVAEEncoder", "kwargs": {"raw_std": [1.0, 0.0, 1.0, 1.0]}}, "positive")]:
        with pytest.raises(ValueError, match=fragment):
            encoder_from_dict(bad)
    with pytest.raises(ValueError, match="--latent-stats"):
        StabilityVAEEncoder().network_channels(16)  # 8 latent channels, statistics for 4


def test_latent_statistics_equal_the_moments_of_the_sampled_latents():
    rng = np.random.default_rng(3)
    n, c = 64, 3
    mean = rng.normal([2.0, -1.0, 0.5], [1.5, 0.5, 3.0], [n, 6, 6, c]).transpose(0, 3, 1, 2)
    std = rng.uniform(0.1, [0.5, 2.0, 1.0], [n, 6, 6, c]).transpose(0, 3, 1, 2)
    ds = ImageDataset(np.concatenate([mean, std], 1).astype(np.float32), None, name="lat")
    stats = latent_statistics(ds, batch_size=10)
    # Monte Carlo: the per-channel mean and std of many latents drawn as training draws them.
    draws = np.stack([ds.images[:, :c] + rng.standard_normal(mean.shape) * ds.images[:, c:] for _ in range(200)])
    np.testing.assert_allclose(stats.raw_mean, draws.mean(axis=(0, 1, 3, 4)), rtol=0.01, atol=0.01)
    np.testing.assert_allclose(stats.raw_std, draws.std(axis=(0, 1, 3, 4)), rtol=0.01)
    assert stats.num_images == n
    # With zero posterior std the statistics are exactly those of the means.
    exact = ImageDataset(np.concatenate([mean, 0 * std], 1).astype(np.float32), None, name="lat0")
    m = exact.images[:, :c].astype(np.float64)
    s0 = latent_statistics(exact, batch_size=7)
    np.testing.assert_allclose(s0.raw_mean, m.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(s0.raw_std, m.std(axis=(0, 2, 3)), rtol=1e-10)


def test_latent_stats_file_errors(tmp_path):
    (tmp_path / "bad.json").write_text('{"raw_mean": [1, 2]}')
    (tmp_path / "neg.json").write_text('{"raw_mean": [1, 2], "raw_std": [1, -2]}')
    cases = [("bad.json", "not a statistics file"), ("neg.json", "positive"), ("none.json", "cannot read")]
    for name, fragment in cases:
        with pytest.raises(ValueError, match=fragment):
            load_latent_stats(tmp_path / name)


def test_vae_loading_errors(tmp_path, monkeypatch, tiny_vae):
    with pytest.raises(ValueError, match="huggingface-cli download") as info:
        load_stability_vae(str(tmp_path / "no-vae"))
    assert "\n" not in str(info.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        load_stability_vae(str(tmp_path / "empty"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((tiny_vae / "config.json").read_text())
    weights = (tiny_vae / "diffusion_pytorch_model.safetensors").read_bytes()
    (broken / "diffusion_pytorch_model.safetensors").write_bytes(weights[: len(weights) // 3])
    with pytest.raises(ValueError, match="cannot load the VAE") as info:
        load_stability_vae(str(broken))
    assert "\n" not in str(info.value) and str(broken) in str(info.value)
    monkeypatch.setitem(sys.modules, "diffusers", None)  # as if not installed
    with pytest.raises(ValueError, match=r"pip install 'edm2\[vae\]'"):
        load_stability_vae(str(tiny_vae))
