"""The EDM2 network (edm2.networks) against the official implementation's outputs (tests/data/net_cond.npz),
plus the training-time invariants of forced weight normalization and input validation."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from edm2.layers import MPConv, normalize
from edm2.losses import EDM2Loss
from edm2.networks import Block, Precond
from edm2.training import make_adam

F32 = dict(rtol=1e-4, atol=2e-5)
F64 = dict(rtol=1e-9, atol=1e-10)
EPS = 1e-4  # normalize's eps

SMALL = dict(img_resolution=8, img_channels=1, model_channels=32, channel_mult=[1, 2], num_blocks=1,
             attn_resolutions=[4], use_fp16=False)


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy()


def _state(g: dict[str, np.ndarray], prefix: str = "state/") -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: torch.from_numpy(g[k]) for k in g if k.startswith(prefix)}


def _inputs(g: dict[str, np.ndarray], dtype: torch.dtype = torch.float32):
    return (torch.from_numpy(g["x"]).to(dtype), torch.from_numpy(g["sigma"]).to(dtype),
            torch.from_numpy(g["labels"]).to(dtype))


def _gain_names(net: torch.nn.Module) -> list[str]:
    return [name for name, p in net.named_parameters() if p.ndim == 0]


def _set_gains(net: torch.nn.Module, seed: int = 1) -> None:
    """Give every 0-d parameter (out_gain, emb_gain) a nonzero value, so every layer affects the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in _gain_names(net):
            net.get_parameter(name).copy_(torch.rand([], generator=gen) * 0.8 + 0.2)


def _mpconvs(net: torch.nn.Module) -> dict[str, MPConv]:
    return {name: m for name, m in net.named_modules() if isinstance(m, MPConv)}


def _row_rms(w: torch.Tensor) -> torch.Tensor:
    return w.detach().double().reshape(w.shape[0], -1).square().mean(dim=1).sqrt()


# ----------------------------------------------------------------------------------------------------
# The golden "small" network.


@pytest.fixture(scope="module")
def pristine_net(golden_net) -> Precond:
    torch.manual_seed(0)
    return Precond(**golden_net["meta"]["precond_kwargs"]).eval()


@pytest.fixture(scope="module")
def golden_loaded_net(golden_net) -> Precond:
    net = Precond(**golden_net["meta"]["precond_kwargs"])
    net.load_state_dict(_state(golden_net), strict=True)
    return net.eval()


def test_structure_matches_reference(pristine_net, golden_net):
    assert sum(p.numel() for p in pristine_net.parameters()) == 1_202_928 == golden_net["meta"]["num_params"]
    sd = pristine_net.state_dict()
    assert len(sd) == 85
    assert list(sd) == list(_state(golden_net))
    assert sorted(name for name, _ in pristine_net.named_buffers()) == [
        "logvar_fourier.freqs", "logvar_fourier.phases", "unet.emb_fourier.freqs", "unet.emb_fourier.phases"]
    for name, value in _state(golden_net).items():
        assert tuple(sd[name].shape) == tuple(value.shape), name


def test_pristine_init_matches_reference(pristine_net, golden_net):
    # Gains start at zero (the golden init_gain/*); everything else is the reference init after seed 0.
    init_gain = _state(golden_net, "init_gain/")
    assert sorted(init_gain) == sorted(_gain_names(pristine_net))
    golden = _state(golden_net)
    for name, value in pristine_net.state_dict().items():
        if name in init_gain:
            assert value.item() == 0 == init_gain[name].item(), name
        else:
            assert torch.equal(value, golden[name]), name


def test_pristine_output_is_c_skip_x(pristine_net, golden_net):
    x, sigma, labels = _inputs(golden_net)
    with torch.no_grad():
        D_x, logvar = pristine_net(x, sigma, labels, return_logvar=True)
    np.testing.assert_allclose(_np(D_x), golden_net["init_D_x"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_np(logvar), golden_net["init_logvar"], rtol=1e-5, atol=1e-6)
    # Independent expectation: with out_gain = 0 the U-Net is invisible, D = c_skip x, sigma_data = 0.5.
    s = golden_net["sigma"].astype(np.float64).reshape(-1, 1, 1, 1)
    c_skip = 0.25 / (s**2 + 0.25)
    np.testing.assert_allclose(_np(D_x), c_skip * golden_net["x"].astype(np.float64), rtol=1e-6, atol=0)


def test_golden_state_loads_strict(golden_net):
    net = Precond(**golden_net["meta"]["precond_kwargs"])
    net.load_state_dict(_state(golden_net), strict=True)
    bad = _state(golden_net)
    bad["unet.extra.weight"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        net.load_state_dict(bad, strict=True)


def test_eval_output_matches_golden(golden_loaded_net, golden_net):
    x, sigma, labels = _inputs(golden_net)
    with torch.no_grad():
        D_x, logvar = golden_loaded_net(x, sigma, labels, return_logvar=True)
    assert D_x.shape == (4, 3, 16, 16) and logvar.shape == (4, 1, 1, 1)
    np.testing.assert_allclose(_np(D_x), golden_net["D_x"], **F32)
    np.testing.assert_allclose(_np(logvar), golden_net["logvar"], **F32)
    # The perturbed gains make the U-Net visible: the output is not just c_skip x.
    assert np.abs(golden_net["D_x"] - golden_net["init_D_x"]).max() > 1e-2


def test_eval_activations_match_golden(golden_loaded_net, golden_net):
    net = golden_loaded_net
    modules = {"emb_fourier": net.unet.emb_fourier, "emb_noise": net.unet.emb_noise,
               "emb_label": net.unet.emb_label, "out_conv": net.unet.out_conv}
    modules.update({f"enc.{name}": m for name, m in net.unet.enc.items()})
    modules.update({f"dec.{name}": m for name, m in net.unet.dec.items()})
    assert {f"act/{name}" for name in modules} == {k for k in golden_net if k.startswith("act/")}

    acts: dict[str, np.ndarray] = {}

    def hook(name):
        def fn(_module, _inputs, output):
            acts[name] = _np(output).copy()  # Block clips in place: take the tensor as returned
        return fn

    handles = [m.register_forward_hook(hook(name)) for name, m in modules.items()]
    try:
        x, sigma, labels = _inputs(golden_net)
        with torch.no_grad():
            net(x, sigma, labels)
    finally:
        for h in handles:
            h.remove()

    mismatches = []
    for name in modules:  # forward order, so the first mismatch localises the fault
        expected = golden_net[f"act/{name}"]
        if acts[name].shape != expected.shape or not np.allclose(acts[name], expected, **F32):
            err = np.abs(acts[name] - expected).max() if acts[name].shape == expected.shape else "shape"
            mismatches.append(f"{name}: max|diff| {err}")
    assert not mismatches, "activation mismatches (forward order): " + "; ".join(mismatches)


def test_eval_float64_matches_golden(golden_loaded_net, golden_net):
    net = copy.deepcopy(golden_loaded_net).double()
    x, sigma, labels = _inputs(golden_net, torch.float64)
    with torch.no_grad():
        D_x, logvar = net(x, sigma, labels, return_logvar=True)
    assert D_x.dtype == torch.float64 and logvar.dtype == torch.float64
    np.testing.assert_allclose(_np(D_x), golden_net["D_x_f64"], **F64)
    np.testing.assert_allclose(_np(logvar), golden_net["logvar_f64"], **F64)


def test_no_label_matches_golden(golden_loaded_net, golden_net):
    x, sigma, labels = _inputs(golden_net)
    with torch.no_grad():
        D_x = golden_loaded_net(x, sigma, None)
        D_zero = golden_loaded_net(x, sigma, torch.zeros_like(labels))
    np.testing.assert_allclose(_np(D_x), golden_net["D_x_nolabel"], **F32)
    np.testing.assert_allclose(_np(D_x), _np(D_zero), rtol=1e-6, atol=1e-7)  # None = all-zero label
    assert np.abs(golden_net["D_x_nolabel"] - golden_net["D_x"]).max() > 1e-3  # labels do matter


def test_sigma_4d_matches_golden(golden_loaded_net, golden_net):
    x, sigma, labels = _inputs(golden_net)
    with torch.no_grad():
        D_x = golden_loaded_net(x, sigma.reshape(4, 1, 1, 1), labels)
    np.testing.assert_allclose(_np(D_x), golden_net["D_x_sigma4d"], **F32)
    np.testing.assert_allclose(_np(D_x), golden_net["D_x"], **F32)


# ----------------------------------------------------------------------------------------------------
# Training-time invariants of forced weight normalization.


def _small_batch(n: int = 4, label_dim: int = 10, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 1, 8, 8, generator=gen) * 0.5
    labels = torch.nn.functional.one_hot(torch.randint(0, label_dim, [n], generator=gen), label_dim).float()
    return images, labels, gen


def _assert_forced_normalized(net, before: dict[str, torch.Tensor], what: str) -> None:
    """Each stored MPConv weight equals normalize(previous stored weight): row RMS r / (eps + r)."""
    for name, conv in _mpconvs(net).items():
        w_prev = before[name]
        r = _row_rms(w_prev)
        rms = _row_rms(conv.weight)
        assert (rms - 1).abs().max() <= (EPS / r).max() + 1e-6, f"{what}: {name} not unit RMS"
        np.testing.assert_allclose(_np(rms), _np(r / (EPS + r)), rtol=0, atol=1e-6, err_msg=f"{what}: {name}")
        np.testing.assert_allclose(_np(conv.weight), _np(normalize(w_prev)), rtol=1e-6, atol=1e-7,
                                   err_msg=f"{what}: {name}")


def _snapshot(net) -> dict[str, torch.Tensor]:
    return {name: conv.weight.detach().clone() for name, conv in _mpconvs(net).items()}


def test_training_step_keeps_weights_on_sphere():
    torch.manual_seed(0)
    net = Precond(label_dim=10, **SMALL).train()
    _set_gains(net)
    images, labels, gen = _small_batch()
    loss_fn = EDM2Loss()

    raw = _snapshot(net)
    assert max((_row_rms(w) - 1).abs().max().item() for w in raw.values()) > 0.05  # randn init: not unit

    loss = loss_fn(net, images, labels, generator=gen)
    assert loss.shape == images.shape
    (loss.sum() / images.shape[0]).backward()
    _assert_forced_normalized(net, raw, "after first forward")

    # Gradients w.r.t. the stored weights are tangent to the sphere, per output row. With
    # d = eps + ||w||/sqrt(n), normalize's Jacobian scales the radial part of the upstream gradient u by
    # eps/d relative to the tangential part, so cos(g, w) ~ (eps/d) * u_radial/|u_tangential|: well below
    # eps unless u is nearly parallel to w, which only happens for small fan-in rows (emb_label, fan-in
    # 10, sees one-hot inputs: up to ~1e-4 here). Without the normalization on use, cos(g, w) would be
    # of order 1/sqrt(fan_in) >= 0.03.
    for name, conv in _mpconvs(net).items():
        g = conv.weight.grad.double().reshape(conv.weight.shape[0], -1)
        w = conv.weight.detach().double().reshape(g.shape)
        assert (g.norm(dim=1) > 0).all(), name
        cos = (g * w).sum(dim=1).abs() / (g.norm(dim=1) * w.norm(dim=1))
        bound = EPS if g.shape[1] >= 16 else 2 * EPS
        assert cos.max() < bound, f"{name}: gradient not orthogonal to weight (cos {cos.max():.2e})"

    opt = make_adam(net.parameters(), lr=0.05)
    opt.step()
    opt.zero_grad(set_to_none=True)
    stepped = _snapshot(net)
    drift = torch.cat([(_row_rms(w) - 1).abs() for w in stepped.values()])
    assert drift.mean() > 5e-4  # the Adam step leaves the sphere

    loss_fn(net, images, labels, generator=gen)
    _assert_forced_normalized(net, stepped, "after Adam step and second forward")


def test_eval_forward_does_not_modify_weights():
    torch.manual_seed(0)
    net = Precond(label_dim=10, **SMALL).eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    images, labels, _ = _small_batch()
    with torch.no_grad():
        net(images, torch.full([4], 1.3), labels, return_logvar=True)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_logvar_linear_normalized_only_with_return_logvar():
    torch.manual_seed(0)
    net = Precond(label_dim=10, **SMALL).train()
    images, labels, _ = _small_batch()
    w_logvar = net.logvar_linear.weight.detach().clone()
    w_out = net.unet.out_conv.weight.detach().clone()

    net(images, torch.full([4], 1.3), labels)
    assert torch.equal(net.logvar_linear.weight, w_logvar)
    assert not torch.equal(net.unet.out_conv.weight, w_out)  # the U-Net itself was force-normalized

    net(images, torch.full([4], 1.3), labels, return_logvar=True)
    np.testing.assert_allclose(_np(net.logvar_linear.weight), _np(normalize(w_logvar)), rtol=1e-6, atol=1e-7)
    assert not torch.equal(net.logvar_linear.weight, w_logvar)


def test_dropout_only_in_train_mode():
    torch.manual_seed(0)
    net = Precond(label_dim=10, dropout=0.1, **SMALL)
    _set_gains(net)
    ref = Precond(label_dim=10, dropout=0.0, **SMALL)
    images, labels, _ = _small_batch()
    sigma = torch.full([4], 1.3)

    net.train()
    net(images, sigma, labels)  # first call moves the weights onto the sphere
    ref.load_state_dict(net.state_dict())
    ref.train()

    def call(model, seed):
        torch.manual_seed(seed)
        return _np(model(images, sigma, labels))

    a, b, a_again = call(net, 1), call(net, 2), call(net, 1)
    assert np.abs(a - b).max() > 1e-3  # dropout masks differ
    np.testing.assert_allclose(a, a_again, rtol=1e-5, atol=1e-6)  # same mask, (nearly) fixed weights
    r1, r2 = call(ref, 1), call(ref, 2)
    np.testing.assert_allclose(r1, r2, rtol=1e-5, atol=1e-6)  # no dropout: the seed does not matter

    net.eval()
    ref.eval()
    with torch.no_grad():
        e1, e2 = call(net, 1), call(net, 2)
        np.testing.assert_array_equal(e1, e2)
        np.testing.assert_allclose(e1, call(ref, 3), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# Input validation and unconditional nets.


@pytest.fixture(scope="module")
def small_cond_net() -> Precond:
    torch.manual_seed(0)
    return Precond(label_dim=10, **SMALL).eval()


def _onehot(n: int, dim: int = 10) -> torch.Tensor:
    return torch.eye(dim)[torch.arange(n) % dim]


@pytest.mark.parametrize(
    "x_shape, sigma, labels, match",
    [
        ([2, 2, 8, 8], [1.0, 1.0], _onehot(2), r"x has shape \[2, 2, 8, 8\]"),
        ([2, 1, 16, 16], [1.0, 1.0], _onehot(2), r"x has shape \[2, 1, 16, 16\]"),
        ([1, 8, 8], [1.0], _onehot(1), r"x has shape \[1, 8, 8\]"),
        ([2, 1, 8, 8], [1.0, 1.0, 1.0], _onehot(2), "sigma has 3 elements"),
        ([2, 1, 8, 8], [1.0, 0.0], _onehot(2), "sigma must be positive"),
        ([2, 1, 8, 8], [-0.5, 1.0], _onehot(2), "sigma must be positive"),
        ([2, 1, 8, 8], 0.0, _onehot(2), "sigma must be positive"),
        ([2, 1, 8, 8], [1.0, 1.0], torch.zeros(2, 5), r"class_labels has shape \[2, 5\]"),
        ([2, 1, 8, 8], [1.0, 1.0], _onehot(3), "class_labels has 3 rows for 2 images"),
    ],
    ids=["channels", "resolution", "3d", "sigma-count", "sigma-zero", "sigma-negative", "sigma-scalar-zero",
         "label-width", "label-rows"],
)
def test_bad_input_raises(small_cond_net, x_shape, sigma, labels, match):
    with pytest.raises(ValueError, match=match):
        small_cond_net(torch.zeros(x_shape), torch.as_tensor(sigma), labels)


def test_valid_input_variants_accepted(small_cond_net):
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        full = small_cond_net(x, torch.tensor([0.7, 0.7]), _onehot(1).expand(2, -1))
        # A scalar sigma and a single label row broadcast over the batch.
        np.testing.assert_allclose(_np(small_cond_net(x, 0.7, _onehot(1))), _np(full), rtol=1e-6, atol=1e-7)


def test_unconditional_net_ignores_labels():
    torch.manual_seed(0)
    net = Precond(label_dim=0, **SMALL).eval()
    _set_gains(net)
    assert net.unet.emb_label is None
    x = torch.randn(4, 1, 8, 8)
    sigma = torch.tensor([0.1, 0.5, 2.0, 10.0])
    with torch.no_grad():
        base = net(x, sigma)
        for labels in (_onehot(4), torch.randn(4, 10), _onehot(1, 3)):
            assert torch.equal(net(x, sigma, labels), base)
        assert np.abs(_np(base) - _np(0.25 / (sigma.reshape(-1, 1, 1, 1) ** 2 + 0.25) * x)).max() > 1e-3


def test_block_rejects_unknown_flavor():
    with pytest.raises(ValueError, match="flavor"):
        Block(8, 8, 16, flavor="xyz")
    for flavor in ("enc", "dec"):
        assert Block(8, 8, 16, flavor=flavor).flavor == flavor


def test_network_config_is_the_signature_of_precond_and_unet():
    """`NetworkConfig` lists Precond's own arguments and those it hands to UNet, with the same defaults, so the
    typed spec cannot drift from the network it describes."""
    import dataclasses
    import inspect

    from edm2.networks import NetworkConfig, UNet

    def defaults(fn, skip):
        return {n: p.default for n, p in inspect.signature(fn).parameters.items() if n not in skip}

    expected = {**defaults(UNet.__init__, {"self"}), **defaults(Precond.__init__, {"self", "unet_kwargs"})}
    fields = {f.name: f.default for f in dataclasses.fields(NetworkConfig)}
    assert set(fields) == set(expected)
    for name, default in fields.items():
        want = expected[name]
        want = tuple(want) if isinstance(want, (list, tuple)) else want
        assert (default is dataclasses.MISSING) == (want is inspect.Parameter.empty), name
        if default is not dataclasses.MISSING:
            assert default == want, name


def test_every_preset_network_is_built_by_the_one_builder():
    from edm2.networks import NETWORK_CLASSES, build_network, network_class_name
    from edm2.presets import PRESETS

    for preset in PRESETS.values():
        with torch.device("meta"):
            net = build_network(preset.network)
        assert type(net) is NETWORK_CLASSES[preset.network.class_name]
        assert network_class_name(net) == preset.network.class_name
        assert (net.img_resolution, net.img_channels) == (preset.network.img_resolution,
                                                          preset.network.img_channels)
