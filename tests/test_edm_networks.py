"""The networks of the EDM release (DDPM++ / NCSN++ = SongUNet, ADM = DhariwalUNet) under the VP, VE, iDDPM and
EDM preconditionings: golden outputs of the official implementation (tests/data/edm_nets.npz), the official
initialization, parameter counts of the official configurations, label dropout, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from edm2.complexity import count_complexity
from edm2.networks import (
    NETWORK_CLASSES,
    DhariwalUNet,
    EDMPrecond,
    Precond,
    SongUNet,
    VEPrecond,
    VPPrecond,
    build_network,
    iDDPMPrecond,
    network_class_name,
)
from edm2.networks.precond import iddpm_u_table, vp_sigma
from edm2.presets import get_preset

DATA = Path(__file__).parent / "data"
with np.load(DATA / "edm_nets.npz") as _d:
    GOLDEN = {k: _d[k] for k in _d.files}
META = json.loads(str(GOLDEN.pop("meta_json")))
CASES = META["cases"]


def golden(case: str, key: str) -> torch.Tensor:
    return torch.from_numpy(GOLDEN[f"{case}/{key}"])


def golden_state(case: str) -> dict[str, torch.Tensor]:
    prefix = f"{case}/state/"
    return {k[len(prefix):]: torch.from_numpy(v) for k, v in GOLDEN.items() if k.startswith(prefix)}


def golden_net(case: str) -> torch.nn.Module:
    net = build_network(CASES[case]["precond"], CASES[case]["kwargs"])
    net.load_state_dict(golden_state(case), strict=True)  # official names, buffers included
    return net.eval()


def assert_golden(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """The golden README's tolerance: atol 2e-5 + 1e-4 max|D_x|."""
    err = (actual - expected).abs().max().item()
    assert err <= 2e-5 + 1e-4 * expected.abs().max().item(), err


@pytest.mark.parametrize("case", sorted(CASES))
def test_official_state_dict_gives_the_official_outputs(case):
    net = golden_net(case)
    x, sigma, labels, aug = (golden(case, k) for k in ("x", "sigma", "labels", "augment_labels"))
    with torch.no_grad():
        assert_golden(net(x, sigma, labels, augment_labels=aug), golden(case, "D_x"))
        assert_golden(net(x, sigma, labels), golden(case, "D_x_noaug"))  # sampling: no augment labels
        assert_golden(net(x, sigma, None, augment_labels=aug), golden(case, "D_x_nolabel"))
    np.testing.assert_allclose(net.round_sigma(sigma.double()).numpy(), golden(case, "round_sigma").numpy(),
                               rtol=1e-7, atol=0)
    # sigma_min/sigma_max come from the constructor (for iDDPM from our own table: equal to 1 float32 ulp).
    np.testing.assert_allclose([net.sigma_min, net.sigma_max],
                               [float(golden(case, "sigma_min")), float(golden(case, "sigma_max"))], rtol=1e-6)


OFFICIAL_CLASSES = {cls.__name__: cls for cls in (VPPrecond, VEPrecond, iDDPMPrecond, EDMPrecond)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_official_constructors_take_the_model_arguments_flat(case):
    """`EDMPrecond(img_resolution=..., model_type=..., embedding_type=...)`: the official signature (the model's
    arguments flat, `**model_kwargs`) builds the network of the golden file, with its official initialization and
    outputs; the earlier spelling (`model_kwargs=` dict) builds the same network."""
    cls, kwargs = OFFICIAL_CLASSES[CASES[case]["precond"]], dict(CASES[case]["kwargs"])
    torch.manual_seed(0)
    flat = cls(**kwargs)
    torch.manual_seed(0)
    reference = build_network(CASES[case]["precond"], kwargs)
    own = {k: kwargs.pop(k) for k in list(kwargs) if k in ("img_resolution", "img_channels", "label_dim",
                                                             "use_fp16", "model_type")}
    torch.manual_seed(0)
    nested = cls(**own, model_kwargs=kwargs)
    assert flat.init_kwargs == nested.init_kwargs == reference.init_kwargs
    for name, value in reference.state_dict().items():
        assert torch.equal(flat.state_dict()[name], value) and torch.equal(nested.state_dict()[name], value), name
    flat.load_state_dict(golden_state(case), strict=True)
    x, sigma, labels, aug = (golden(case, k) for k in ("x", "sigma", "labels", "augment_labels"))
    with torch.no_grad():
        assert_golden(flat.eval()(x, sigma, labels, augment_labels=aug), golden(case, "D_x"))
        assert_golden(flat(x, sigma, labels), golden(case, "D_x_noaug"))
    with pytest.raises(TypeError, match="model_channels"):  # one argument given both ways
        cls(**own, model_channels=8, model_kwargs=kwargs)


def test_zero_augment_labels_are_no_augmentation():
    # At sampling time the network gets no augment labels; the all-zero vector means the same.
    for case in ("vp_ddpmpp", "edm_adm"):
        net = golden_net(case)
        x, sigma, labels = golden(case, "x"), golden(case, "sigma"), golden(case, "labels")
        with torch.no_grad():
            torch.testing.assert_close(net(x, sigma, labels, augment_labels=torch.zeros(4, 9)),
                                       net(x, sigma, labels), rtol=0, atol=0)


@pytest.mark.parametrize("case", sorted(CASES))
def test_initialization_draws_the_official_weights(case):
    # The golden weights are the official initialization after torch.manual_seed(0), except the tensors the
    # official code initializes to (almost) zero, which the golden file replaced by random draws so that every
    # layer matters. Ours must equal the rest exactly, and be (almost) zero where it was replaced.
    torch.manual_seed(0)
    net = build_network(CASES[case]["precond"], CASES[case]["kwargs"])
    assert sum(p.numel() for p in net.parameters()) == CASES[case]["num_params"]
    state = net.state_dict()
    reference = golden_state(case)
    assert set(state) == set(reference)
    replaced = [k for k in state if k != "u" and not torch.equal(state[k], reference[k])]
    for k in replaced:
        assert state[k].abs().max().item() <= 1e-5, k  # official zero / 1e-5-scaled initializations
    drawn = [k for k in state if k.endswith(("conv0.weight", "affine.weight", "qkv.weight", "map_layer0.weight"))]
    assert drawn and not set(drawn) & set(replaced)  # the randomly drawn layers are the official draws
    if "u" in state:  # the iDDPM table: computed, equal up to float32 rounding of sin on another machine
        torch.testing.assert_close(state["u"], reference["u"], rtol=1e-6, atol=0)


def test_iddpm_table_follows_its_recursion():
    # EDM Table 1: u_M = 0, u_{j-1} = sqrt((u_j^2 + 1) / max(alpha_bar(j-1) / alpha_bar(j), C_1) - 1) with
    # alpha_bar(j) = sin^2(pi/2 j / (M (C_2 + 1))); alpha_bar in float32 as in the official code.
    u = iddpm_u_table(1000, 0.001, 0.008, torch.float64)
    assert u[1000] == 0 and bool((u[:-1] > u[1:]).all())
    j = torch.arange(1, 1001, dtype=torch.float64)
    alpha_bar = lambda k: (torch.sin(0.5 * np.pi * k / 1000 / 1.008) ** 2).float()  # noqa: E731
    ratio = (alpha_bar(j - 1) / alpha_bar(j)).clip(min=0.001).double()
    # (The lowest ten levels come from 1/ratio - 1 with ratio within 1e-5 of 1: float32 rounding decides them.)
    torch.testing.assert_close(u[:990], ((u[1:] ** 2 + 1) / ratio - 1).sqrt()[:990], rtol=1e-4, atol=0)
    torch.testing.assert_close(iddpm_u_table()[:990].double(), u[:990], rtol=1e-4, atol=0)  # the float32 table


def test_iddpm_network_predicts_twice_the_channels_and_uses_the_first_half():
    net = golden_net("iddpm_adm")
    assert net.model.out_conv.weight.shape[0] == 2 * net.img_channels
    x, sigma = golden("iddpm_adm", "x"), golden("iddpm_adm", "sigma")
    with torch.no_grad():
        F = net.model(x / (sigma**2 + 1).sqrt().reshape(-1, 1, 1, 1),
                      net.M - 1 - net.round_sigma(sigma, return_index=True).float(), golden("iddpm_adm", "labels"))
        D = net(x, sigma, golden("iddpm_adm", "labels"))
    torch.testing.assert_close(D, x - sigma.reshape(-1, 1, 1, 1) * F[:, :3], rtol=0, atol=1e-6 * D.abs().max())


def test_vp_noise_range_is_that_of_the_vp_sde():
    net = VPPrecond(8, 1, model_kwargs=dict(model_channels=8, channel_mult=[1], num_blocks=1, attn_resolutions=[]))
    sigma = lambda t: np.sqrt(np.exp(0.5 * 19.9 * t**2 + 0.1 * t) - 1)  # noqa: E731  (EDM Table 1)
    assert net.sigma_max == pytest.approx(sigma(1.0), rel=1e-6)
    # sigma_min: the official float32 evaluation of exp(1e-6) - 1 cancels to 0.000977 (exact: 0.0010005); the
    # golden test above shows the official value, which is what a sampler clips to.
    assert net.sigma_min == pytest.approx(sigma(1e-5), rel=0.03)
    t = torch.tensor([1e-5, 0.3, 1.0], dtype=torch.float64)
    torch.testing.assert_close(net.sigma_inv(vp_sigma(t, 19.9, 0.1)), t, rtol=1e-10, atol=0)


@pytest.mark.parametrize("name, label_dim, expected", [
    ("edm-cifar10-ddpmpp-vp", 10, 55_735_299),  # conditional DDPM++ (augment_dim 9)
    ("edm-cifar10-ncsnpp-ve", 0, 56_397_827),  # unconditional NCSN++ (augment_dim 9)
    ("edm-ffhq64-ddpmpp-edm", 0, 61_805_571),  # FFHQ-64 DDPM++ (augment_dim 9)
    ("edm-imagenet64-adm", 1000, 295_899_267),  # conditional ADM (= EDM2 config A)
])
def test_parameter_counts_of_the_official_configurations(name, label_dim, expected):
    config = get_preset(name).network.replace(label_dim=label_dim)
    assert count_complexity(config).parameters == expected  # counted on the meta device


def test_label_dropout_drops_the_class_label_in_training():
    kwargs = dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0)
    for model_type, extra in (("SongUNet", {}), ("DhariwalUNet", {})):
        torch.manual_seed(0)
        net = EDMPrecond(8, 3, label_dim=5, model_type=model_type, model_kwargs={**kwargs, **extra,
                                                                                 "label_dropout": 1.0})
        for p in net.parameters():  # wake up the zero-initialized layers
            torch.nn.init.normal_(p, std=0.2) if p.ndim else None
        x, sigma = torch.randn(3, 3, 8, 8), torch.tensor([0.3, 1.0, 5.0])
        labels = torch.nn.functional.one_hot(torch.tensor([0, 2, 4]), 5).float()
        with torch.no_grad():
            dropped = net.train()(x, sigma, labels)
            zero_label = net.eval()(x, sigma, torch.zeros_like(labels))
            kept = net.eval()(x, sigma, labels)
        torch.testing.assert_close(dropped, zero_label, rtol=1e-5, atol=1e-6)
        assert (kept - zero_label).abs().max() > 1e-3, model_type


@pytest.mark.parametrize("encoder_type, decoder_type", [("skip", "skip"), ("residual", "skip"), ("skip", "standard")])
def test_song_unet_encoder_and_decoder_variants_build_and_run(encoder_type, decoder_type):
    net = SongUNet(16, 3, 3, model_channels=8, channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[8],
                   encoder_type=encoder_type, decoder_type=decoder_type, embedding_type="fourier",
                   channel_mult_noise=2, resample_filter=[1, 3, 3, 1])
    names = set(net.enc) | set(net.dec)
    assert any(("aux_skip" if encoder_type == "skip" else "aux_residual") in n for n in names)
    assert any("aux_up" in n for n in names) == (decoder_type == "skip")
    out = net(torch.randn(2, 3, 16, 16), torch.randn(2), None)
    assert out.shape == (2, 3, 16, 16) and bool(out.isfinite().all())


def test_build_network_and_class_names_round_trip():
    for c in CASES.values():
        net = build_network(c["precond"], c["kwargs"])
        assert network_class_name(net) == c["precond"]
        # The flat official arguments are recorded, and rebuild the same network.
        again = build_network(network_class_name(net), net.init_kwargs)
        assert [n for n, _ in again.named_parameters()] == [n for n, _ in net.named_parameters()]
    assert isinstance(build_network("EDMPrecond", dict(img_resolution=8, img_channels=1, model_channels=8,
                                                       channel_mult=[1], num_blocks=1, attn_resolutions=[])).model,
                      DhariwalUNet)
    assert set(NETWORK_CLASSES) == {"VPPrecond", "VEPrecond", "iDDPMPrecond", "EDMPrecond", "Precond"}
    assert NETWORK_CLASSES["Precond"] is Precond and NETWORK_CLASSES["iDDPMPrecond"] is iDDPMPrecond


@pytest.mark.parametrize("make, fragment", [
    (lambda: build_network("FooPrecond", {}), "unknown network class 'FooPrecond'"),
    (lambda: build_network("VEPrecond", dict(img_resolution=8, img_channels=3, model_chanels=8)), "model_chanels"),
    (lambda: build_network("VPPrecond", dict(img_channels=3)), "img_resolution"),
    (lambda: VPPrecond(8, 3, model_type="UNet"), "model_type"),
    (lambda: SongUNet(8, 3, 3, embedding_type="sinusoidal"), "embedding_type"),
    (lambda: SongUNet(8, 3, 3, encoder_type="dense"), "encoder_type"),
])
def test_bad_constructor_arguments_are_clear_errors(make, fragment):
    with pytest.raises(ValueError, match=fragment):
        make()


def test_augment_labels_of_the_wrong_width_are_a_clear_error():
    net = golden_net("edm_adm")
    x, sigma = golden("edm_adm", "x"), golden("edm_adm", "sigma")
    with pytest.raises(ValueError, match=r"augment_labels has shape \[4, 6\].*\[4, 9\]"):
        net(x, sigma, augment_labels=torch.zeros(4, 6))
    plain = build_network("EDMPrecond", dict(img_resolution=16, img_channels=3, model_channels=8,
                                             channel_mult=[1], num_blocks=1, attn_resolutions=[]))
    with pytest.raises(ValueError, match="augment_dim=0"):
        plain(x, sigma, augment_labels=torch.zeros(4, 9))
    with pytest.raises(ValueError, match="x has shape"):
        net(x[:, :2], sigma)


def test_low_precision_runs_the_model_in_that_dtype():
    net = golden_net("vp_ddpmpp")
    x, sigma, labels = golden("vp_ddpmpp", "x"), golden("vp_ddpmpp", "sigma"), golden("vp_ddpmpp", "labels")
    seen = []
    net.model.enc["16x16_conv"].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with torch.no_grad():
        full = net(x, sigma, labels)
        low = net.set_precision("bf16")(x, sigma, labels)
    assert seen == [torch.float32, torch.bfloat16] and low.dtype == torch.float32
    assert (low - full).abs().max() <= 0.05 * full.abs().max()
