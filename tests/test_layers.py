"""Magnitude-preserving primitives (edm2.layers) against the official EDM2 outputs and their defining
statistical property: unit-variance input gives unit-variance output (EDM2 paper, Section 2)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edm2.layers import MPConv, MPFourier, mp_cat, mp_silu, mp_sum, normalize, resample

EPS = 1e-4  # normalize's eps (EDM2 reference value)
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-10, atol=1e-12)}


def _t(g: dict[str, np.ndarray], key: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.from_numpy(g[key]).to(dtype)


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy()


# ----------------------------------------------------------------------------------------------------
# Golden conformance: functional ops.

# golden key -> function of (golden dict, dtype)
OPS = {
    "normalize_all": lambda g, dt: normalize(_t(g, "x", dt)),
    "normalize_dim1": lambda g, dt: normalize(_t(g, "x", dt), dim=1),
    "normalize_x5_dim2": lambda g, dt: normalize(_t(g, "x5", dt), dim=2),
    "normalize_w_small": lambda g, dt: normalize(_t(g, "w_small", dt)),
    "mp_silu": lambda g, dt: mp_silu(_t(g, "x", dt)),
    "mp_sum_t0.5": lambda g, dt: mp_sum(_t(g, "a", dt), _t(g, "b_same", dt), t=0.5),
    "mp_sum_t0.3": lambda g, dt: mp_sum(_t(g, "a", dt), _t(g, "b_same", dt), t=0.3),
    "mp_cat_t0.5": lambda g, dt: mp_cat(_t(g, "a", dt), _t(g, "b", dt), dim=1, t=0.5),
    "mp_cat_t0.3": lambda g, dt: mp_cat(_t(g, "a", dt), _t(g, "b", dt), dim=1, t=0.3),
    "resample_keep": lambda g, dt: resample(_t(g, "img", dt), mode="keep"),
    "resample_down": lambda g, dt: resample(_t(g, "img", dt), f=[1, 1], mode="down"),
    "resample_up": lambda g, dt: resample(_t(g, "img", dt), f=[1, 1], mode="up"),
    "resample_down_f1331": lambda g, dt: resample(_t(g, "img", dt), f=[1, 3, 3, 1], mode="down"),
    "resample_up_f1331": lambda g, dt: resample(_t(g, "img", dt), f=[1, 3, 3, 1], mode="up"),
}


def test_every_golden_op_is_covered(golden_ops):
    golden_f64_ops = {k[: -len("_f64")] for k in golden_ops if k.endswith("_f64")}
    assert golden_f64_ops == set(OPS)
    assert all(k in golden_ops for k in OPS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(OPS))
def test_op_matches_golden(golden_ops, name, dtype):
    out = OPS[name](golden_ops, dtype)
    assert out.dtype == dtype
    key = name if dtype == torch.float32 else f"{name}_f64"
    expected = golden_ops[key]
    assert out.shape == expected.shape
    np.testing.assert_allclose(_np(out), expected, **TOL[dtype])


def test_normalize_handles_all_zero_slice(golden_ops):
    # ops.npz 'x' has one all-zero pixel: eps keeps the result finite (and zero) there.
    x = _t(golden_ops, "x")
    zero = (x == 0).all(dim=1)
    assert zero.any()
    y = normalize(x, dim=1)
    assert torch.isfinite(y).all()
    assert (y.permute(0, 2, 3, 1)[zero] == 0).all()


def test_resample_f11_is_box_average_and_nearest_neighbour(golden_ops):
    # Independent definitions: down = 2x2 average pooling, up = nearest-neighbour x2.
    img = _t(golden_ops, "img", torch.float64)
    down = resample(img, f=[1, 1], mode="down")
    np.testing.assert_allclose(_np(down), _np(torch.nn.functional.avg_pool2d(img, 2)), rtol=1e-12, atol=1e-14)
    up = resample(img, f=[1, 1], mode="up")
    nearest = img.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    np.testing.assert_allclose(_np(up), _np(nearest), rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------------------------------
# Golden conformance: modules.

MPCONV_SPECS = {"conv3": (8, 4, [3, 3]), "conv1": (8, 4, [1, 1]), "linear": (8, 5, [])}


def _reference_modules() -> tuple[MPFourier, dict[str, MPConv]]:
    """The reference created MPFourier(16), then conv3, conv1, linear right after torch.manual_seed(7)."""
    torch.manual_seed(7)
    fourier = MPFourier(16)
    convs = {name: MPConv(*spec) for name, spec in MPCONV_SPECS.items()}
    return fourier, convs


def test_mpfourier_init_and_output_match_golden(golden_ops):
    fourier, _ = _reference_modules()
    assert [name for name, _ in fourier.named_buffers()] == ["freqs", "phases"]
    assert list(fourier.parameters()) == []  # fixed features, nothing learned
    np.testing.assert_array_equal(_np(fourier.freqs), golden_ops["fourier/freqs"])
    np.testing.assert_array_equal(_np(fourier.phases), golden_ops["fourier/phases"])
    out = fourier(_t(golden_ops, "fourier/in"))
    np.testing.assert_allclose(_np(out), golden_ops["fourier/out"], **TOL[torch.float32])
    # Independent formula: sqrt(2) cos(x f + phi), buffers already contain the 2 pi.
    x = golden_ops["fourier/in"].astype(np.float64)
    f = golden_ops["fourier/freqs"].astype(np.float64)
    p = golden_ops["fourier/phases"].astype(np.float64)
    np.testing.assert_allclose(_np(out), np.sqrt(2) * np.cos(np.outer(x, f) + p), rtol=1e-5, atol=2e-6)


def test_mpconv_init_reproduces_reference_weights(golden_ops):
    _, convs = _reference_modules()
    for name, conv in convs.items():
        np.testing.assert_array_equal(_np(conv.weight), golden_ops[f"{name}/weight"], err_msg=name)


def _loaded_mpconv(g: dict[str, np.ndarray], name: str) -> MPConv:
    conv = MPConv(*MPCONV_SPECS[name])
    with torch.no_grad():
        conv.weight.copy_(_t(g, f"{name}/weight"))
    return conv


@pytest.mark.parametrize("name", list(MPCONV_SPECS))
def test_mpconv_eval_matches_golden(golden_ops, name):
    conv = _loaded_mpconv(golden_ops, name).eval()
    x = _t(golden_ops, f"{name}/in")
    with torch.no_grad():
        for gain, key in [(1.0, "out_gain1"), (0.37, "out_gain0.37"), (torch.tensor(0.37), "out_gain_tensor0.37")]:
            out = conv(x, gain=gain)
            np.testing.assert_allclose(_np(out), golden_ops[f"{name}/{key}"], **TOL[torch.float32], err_msg=key)
    # Eval mode writes nothing.
    np.testing.assert_array_equal(_np(conv.weight), golden_ops[f"{name}/weight"])


@pytest.mark.parametrize("name", list(MPCONV_SPECS))
def test_mpconv_train_matches_golden(golden_ops, name):
    conv = _loaded_mpconv(golden_ops, name).train()
    x = _t(golden_ops, f"{name}/in")
    out = conv(x)
    np.testing.assert_allclose(_np(out), golden_ops[f"{name}/train_out_gain1"], **TOL[torch.float32])
    np.testing.assert_allclose(_np(conv.weight), golden_ops[f"{name}/train_weight_after"], **TOL[torch.float32])
    out = conv(x)
    np.testing.assert_allclose(_np(out), golden_ops[f"{name}/train_out_gain1_second_call"], **TOL[torch.float32])
    np.testing.assert_allclose(_np(conv.weight), golden_ops[f"{name}/train_weight_after_second_call"],
                               **TOL[torch.float32])


def _normalize_rows_np(w: np.ndarray) -> np.ndarray:
    """Independent float64 normalize over all but the first axis: w / (eps + ||w|| / sqrt(n))."""
    flat = w.reshape(w.shape[0], -1).astype(np.float64)
    rms = np.sqrt((flat**2).mean(axis=1, keepdims=True))
    return (flat / (EPS + rms)).reshape(w.shape)


def _apply_np(name: str, w_eff: np.ndarray, x: np.ndarray, gain: float = 1.0) -> np.ndarray:
    """Run the MPConv math with an explicit effective (already normalized) weight, in float64."""
    fan_in = int(np.prod(w_eff.shape[1:]))
    w = torch.from_numpy(w_eff * gain / np.sqrt(fan_in))
    xt = torch.from_numpy(x.astype(np.float64))
    if name == "linear":
        return _np(xt @ w.t())
    return _np(torch.nn.functional.conv2d(xt, w, padding=w.shape[-1] // 2))


@pytest.mark.parametrize("name", list(MPCONV_SPECS))
def test_mpconv_double_normalization_in_train_mode(golden_ops, name):
    w0 = golden_ops[f"{name}/weight"]
    x = golden_ops[f"{name}/in"]
    once = _apply_np(name, _normalize_rows_np(w0), x)
    twice = _apply_np(name, _normalize_rows_np(_normalize_rows_np(w0)), x)
    # The second normalization is not the identity (eps); the difference is well above float32 noise.
    assert np.abs(once - twice).max() > 1e-5

    conv = _loaded_mpconv(golden_ops, name)
    with torch.no_grad():
        eval_out = _np(conv.eval()(_t(golden_ops, f"{name}/in")))
    np.testing.assert_array_equal(_np(conv.weight), w0)  # eval: nothing written
    np.testing.assert_allclose(eval_out, once, rtol=1e-5, atol=1e-6)
    assert not np.allclose(eval_out, twice, rtol=1e-5, atol=1e-6)

    train_out = _np(conv.train()(_t(golden_ops, f"{name}/in")))
    np.testing.assert_allclose(train_out, twice, rtol=1e-5, atol=1e-6)
    assert not np.allclose(train_out, once, rtol=1e-5, atol=1e-6)
    # Stored weight: normalized once (forced weight normalization).
    np.testing.assert_allclose(_np(conv.weight), _normalize_rows_np(w0), rtol=1e-6, atol=1e-7)


def test_mpconv_gain_scales_output_linearly(golden_ops):
    conv = _loaded_mpconv(golden_ops, "conv3").eval()
    x = _t(golden_ops, "conv3/in")
    with torch.no_grad():
        np.testing.assert_allclose(_np(conv(x, gain=-2.5)), -2.5 * _np(conv(x)), rtol=1e-5, atol=1e-6)
        assert (conv(x, gain=0.0) == 0).all()


# ----------------------------------------------------------------------------------------------------
# Magnitude preservation: unit variance in -> unit variance out (within 3 %).

REL = 0.03


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("scale", [0.05, 1.0, 20.0])
def test_normalize_gives_unit_rms(scale):
    x = _randn(64, 4, 32, 32) * scale
    y = normalize(x)
    rms = y.square().mean(dim=(1, 2, 3)).sqrt()
    assert torch.allclose(rms, torch.ones_like(rms), rtol=0, atol=REL)
    # Exactly: RMS(y) = r / (eps + r) with r = RMS(x).
    r = x.double().square().mean(dim=(1, 2, 3)).sqrt()
    np.testing.assert_allclose(_np(rms), _np(r / (EPS + r)), rtol=1e-5)
    # Pixel norm (dim=1) gives RMS r / (eps + r) per pixel, i.e. 1 unless the pixel itself is tiny.
    pix = normalize(x, dim=1).square().mean(dim=1).sqrt()
    r_pix = x.double().square().mean(dim=1).sqrt()
    np.testing.assert_allclose(_np(pix), _np(r_pix / (EPS + r_pix)), rtol=1e-5)
    assert ((pix - 1).abs() < REL).double().mean() > 0.999


def test_mp_silu_unit_second_moment():
    y = mp_silu(_randn(1 << 20))
    assert abs(y.square().mean().item() - 1) < REL


@pytest.mark.parametrize("t", [0.3, 0.5, 0.8])
def test_mp_sum_unit_variance(t):
    a, b = _randn(1 << 18, seed=1), _randn(1 << 18, seed=2)
    y = mp_sum(a, b, t=t)
    assert abs(y.var().item() - 1) < REL
    # Plain lerp would shrink the variance (except t in {0, 1}).
    assert a.lerp(b, t).var().item() < 0.8


@pytest.mark.parametrize("t", [0.3, 0.5, 0.8])
def test_mp_cat_unit_variance_and_balance(t):
    a, b = _randn(2048, 64, seed=3), _randn(2048, 192, seed=4)
    y = mp_cat(a, b, dim=1, t=t)
    assert y.shape == (2048, 256)
    assert abs(y.var().item() - 1) < REL
    # Balance: the share of total energy carried by b is t^2 / ((1-t)^2 + t^2).
    share_b = y[:, 64:].square().sum() / y.square().sum()
    assert abs(share_b.item() - t**2 / ((1 - t) ** 2 + t**2)) < REL


def test_mpfourier_unit_variance():
    torch.manual_seed(0)
    fourier = MPFourier(256)
    y = fourier(_randn(4096, seed=5))
    assert y.shape == (4096, 256)
    assert abs(y.var().item() - 1) < REL


@pytest.mark.parametrize("kernel", [[], [3, 3]], ids=["linear", "conv3x3"])
def test_mpconv_unit_variance(kernel):
    torch.manual_seed(0)
    conv = MPConv(256, 64, kernel=kernel).eval()
    with torch.no_grad():
        if kernel:
            y = conv(_randn(4, 256, 16, 16, seed=6))[:, :, 1:-1, 1:-1]  # interior: no zero padding
        else:
            y = conv(_randn(4096, 256, seed=6))
    assert abs(y.var().item() - 1) < REL


def test_mpconv_gain_scales_standard_deviation():
    torch.manual_seed(0)
    conv = MPConv(256, 64, kernel=[]).eval()
    with torch.no_grad():
        y = conv(_randn(4096, 256, seed=7), gain=0.5)
    assert abs(y.var().item() / 0.25 - 1) < REL


def test_resample_variance():
    x = _randn(8, 16, 32, 32, seed=8)
    up = resample(x, mode="up")
    assert up.shape == (8, 16, 64, 64)
    # Nearest-neighbour upsampling replicates values: variance unchanged (up to rounding).
    assert abs(up.var().item() / x.var().item() - 1) < 1e-4
    assert abs(up.var().item() - 1) < REL
    # Down: a 2x2 box average of i.i.d. unit-variance values has variance 1/4. Not magnitude-preserving
    # by design; the encoder Block follows it with pixel norm.
    down = resample(x, mode="down")
    assert down.shape == (8, 16, 16, 16)
    assert abs(down.var().item() / 0.25 - 1) < REL


# ----------------------------------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize("mode", ["sideways", "Down", ""])
def test_resample_unknown_mode(mode):
    with pytest.raises(ValueError, match="mode"):
        resample(torch.zeros(1, 1, 4, 4), mode=mode)


@pytest.mark.parametrize("mode", ["down", "up"])
@pytest.mark.parametrize("f", [[1], [1, 2, 1], [1, 3, 3, 3, 1]])
def test_resample_odd_filter(mode, f):
    with pytest.raises(ValueError, match="even length"):
        resample(torch.zeros(1, 1, 4, 4), f=f, mode=mode)
