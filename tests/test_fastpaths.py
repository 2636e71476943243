"""Fast paths against the plain float32 eager path and the official outputs: attention by SDPA, strided
norms, the eval-mode weight cache (and its invalidation), bf16/fp16 precision, torch.compile."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import edm2.layers as layers
from edm2.layers import FAST_PATHS, MPConv, fast_paths, force_weight_normalization_, normalize
from edm2.losses import EDM2Loss
from edm2.networks import Block, Precond
from edm2.runtime import resolve_precision
from edm2.training import TrainOptions, make_adam, train

F32 = dict(rtol=1e-4, atol=2e-5)  # the golden tolerances of tests/test_networks.py
F64 = dict(rtol=1e-9, atol=1e-10)
SMALL = dict(img_resolution=8, img_channels=1, label_dim=10, model_channels=32, channel_mult=[1, 2], num_blocks=1,
             attn_resolutions=[4], channels_per_head=16, use_fp16=False)


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy()


def _golden_net(golden_net: dict, dtype: torch.dtype = torch.float32) -> tuple[Precond, tuple]:
    net = Precond(**golden_net["meta"]["precond_kwargs"])
    net.load_state_dict({k[6:]: torch.from_numpy(v) for k, v in golden_net.items() if k.startswith("state/")})
    inputs = tuple(torch.from_numpy(golden_net[k]).to(dtype) for k in ("x", "sigma", "labels"))
    return net.to(dtype).eval(), inputs


def _small_net(seed: int = 0, **changes) -> Precond:
    torch.manual_seed(seed)
    net = Precond(**{**SMALL, **changes})
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim == 0:
                p.fill_(0.7)  # nonzero gains: every layer shapes the output
    return net


def _small_inputs(n: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn([n, 1, 8, 8], generator=g)
    sigma = torch.exp(torch.randn([n], generator=g))
    labels = torch.eye(10)[torch.randint(10, [n], generator=g)]
    return x, sigma, labels


def test_defaults_are_the_exact_path():
    assert FAST_PATHS == layers.FastPaths(weight_cache=True, sdpa=False, strided_norm=False)
    with fast_paths(sdpa=True, strided_norm=True) as fp:
        assert fp.sdpa and fp.strided_norm and fp.weight_cache
    assert not FAST_PATHS.sdpa and not FAST_PATHS.strided_norm


# ----------------------------------------------------------------------------------------------------
# SDPA and strided norms.


@pytest.mark.parametrize("dtype, tol", [(torch.float32, dict(rtol=1e-5, atol=2e-6)),
                                        (torch.float64, dict(rtol=1e-12, atol=1e-12))])
def test_sdpa_attention_equals_explicit_form(dtype, tol, monkeypatch):
    torch.manual_seed(0)
    block = Block(32, 32, 16, flavor="enc", attention=True, channels_per_head=8).eval().to(dtype)
    x = torch.randn(3, 32, 4, 4, dtype=dtype)
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        plain = block.attention(x)
        assert not calls
        with fast_paths(sdpa=True):
            fast = block.attention(x)
    assert len(calls) == 1
    torch.testing.assert_close(fast, plain, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_strided_norm_equals_vector_norm_and_golden(golden_ops, dtype):
    suffix = "_f64" if dtype == torch.float64 else ""
    tol = F64 if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    x = torch.from_numpy(golden_ops["x"]).to(dtype)  # one pixel is all zero (exercises eps)
    x5 = torch.from_numpy(golden_ops["x5"]).to(dtype)
    with fast_paths(strided_norm=True):
        fast1, fast5 = normalize(x, dim=1), normalize(x5, dim=2)
    np.testing.assert_allclose(_np(fast1), golden_ops["normalize_dim1" + suffix], **tol)
    np.testing.assert_allclose(_np(fast5), golden_ops["normalize_x5_dim2" + suffix], **tol)
    torch.testing.assert_close(fast1, normalize(x, dim=1), rtol=1e-6 if dtype == torch.float32 else 1e-13, atol=0)


def test_strided_norm_gradient_of_zero_slice_is_zero_not_nan():
    x = torch.randn(2, 5, 3, 3)
    x[1, :, 2, 1] = 0
    grads = []
    for strided in (False, True):
        xr = x.clone().requires_grad_(True)
        with fast_paths(strided_norm=strided):
            (normalize(xr, dim=1) * torch.arange(5.0).reshape(1, 5, 1, 1)).sum().backward()
        grads.append(xr.grad)
    assert torch.isfinite(grads[1]).all()
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_all_fast_paths_reproduce_the_golden_network(golden_net, dtype):
    net, (x, sigma, labels) = _golden_net(golden_net, dtype)
    suffix, tol = ("_f64", F64) if dtype == torch.float64 else ("", F32)
    with torch.no_grad(), fast_paths(weight_cache=True, sdpa=True, strided_norm=True):
        for _ in range(2):  # the second call runs on cached weights
            D_x, logvar = net(x, sigma, labels, return_logvar=True)
            np.testing.assert_allclose(_np(D_x), golden_net["D_x" + suffix], **tol)
            np.testing.assert_allclose(_np(logvar), golden_net["logvar" + suffix], **tol)


# ----------------------------------------------------------------------------------------------------
# Eval-mode weight cache.


def _count_weight_computations(monkeypatch) -> list:
    calls = []
    real = MPConv._effective_weight
    monkeypatch.setattr(MPConv, "_effective_weight", lambda self, *a: calls.append(self) or real(self, *a))
    return calls


def _uncached(net: Precond, *inputs) -> torch.Tensor:
    with torch.no_grad(), fast_paths(weight_cache=False):
        return net(*inputs)


def test_weight_cache_gives_the_same_numbers_and_normalizes_once(monkeypatch):
    net = _small_net().eval()
    inputs = _small_inputs()
    plain = _uncached(net, *inputs)
    calls = _count_weight_computations(monkeypatch)
    with torch.no_grad():
        first = net(*inputs)
        n_convs = len(calls)
        second = net(*inputs)
        other = net(*_small_inputs(seed=5))
    assert n_convs == sum(isinstance(m, MPConv) for m in net.unet.modules())  # the logvar head was not called
    assert len(calls) == n_convs  # the later calls reused every weight
    assert torch.equal(first, plain) and torch.equal(second, plain)
    assert torch.equal(other, _uncached(net, *_small_inputs(seed=5)))


def test_weight_cache_follows_every_change_of_the_weights():
    net = _small_net().eval()
    inputs = _small_inputs()
    with torch.no_grad():
        net(*inputs)  # fill the cache

    def check(what: str) -> None:
        with torch.no_grad():
            cached = net(*inputs)
        assert torch.equal(cached, _uncached(net, *inputs)), what

    # An optimizer step in training mode (and back to eval).
    net.train()
    opt = make_adam(net.parameters(), lr=0.05, foreach=True)
    EDM2Loss()(net, *_small_inputs(seed=2)[::2]).sum().backward()
    opt.step()
    net.eval()
    check("after an optimizer step")
    # New weights loaded into the same parameters (in-place copy).
    net.load_state_dict(_small_net(seed=7).state_dict())
    check("after load_state_dict")
    # A learned gain (a Parameter passed as `gain`) changed in place.
    with torch.no_grad():
        net.unet.out_gain.fill_(-1.3)
        net.unet.enc["4x4_block0"].emb_gain.mul_(2)
    check("after changing gains")
    # One weight changed in place without autograd.
    with torch.no_grad():
        net.unet.out_conv.weight.mul_(-1)
    check("after an in-place edit")
    # Another dtype: new storage.
    net.to(torch.float64)
    with torch.no_grad():
        out64 = net(*(t.double() for t in inputs))
    assert out64.dtype == torch.float64
    assert torch.equal(out64, _uncached(net, *(t.double() for t in inputs)))


def test_weight_cache_off_in_training_and_when_gradients_are_needed():
    net = _small_net().eval()
    inputs = _small_inputs()
    with torch.no_grad():
        net(*inputs)
    convs = [m for m in net.modules() if isinstance(m, MPConv)]
    assert any(m._weight_cache is not None for m in convs)
    net.train()
    assert all(m._weight_cache is None for m in convs)  # train() drops the cache
    net.eval()
    # Eval mode with gradients: nothing is cached, and the gradients equal those of the plain path.
    grads = []
    for cache in (True, False):
        net.zero_grad(set_to_none=True)
        with fast_paths(weight_cache=cache):
            net(*inputs).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None})
        assert all(m._weight_cache is None for m in convs)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for k in grads[0]:
        assert torch.equal(grads[0][k], grads[1][k]), k


# ----------------------------------------------------------------------------------------------------
# Mixed precision.


def test_bf16_network_is_close_and_keeps_float32_islands(golden_net):
    net, (x, sigma, labels) = _golden_net(golden_net)
    with torch.no_grad():
        D32, logvar32 = net(x, sigma, labels, return_logvar=True)
        net.set_precision("bf16")
        D16, logvar16 = net(x, sigma, labels, return_logvar=True)
    assert D16.dtype == torch.float32 and torch.isfinite(D16).all()
    np.testing.assert_allclose(_np(D16), golden_net["D_x"], atol=2e-2)  # loosely (tests/data README)
    assert np.abs(_np(D16 - D32)).max() > 1e-5  # the U-Net did run in bfloat16
    assert torch.equal(logvar16, logvar32)  # the uncertainty head stays float32

    # With the U-Net silenced (out_gain 0), D = c_skip x exactly as in float32: preconditioning is float32.
    with torch.no_grad():
        net.unet.out_gain.zero_()
        silent16 = net(x, sigma, labels)
        net.set_precision("fp32")
        silent32 = net(x, sigma, labels)
    assert torch.equal(silent16, silent32)


def test_outer_autocast_leaves_fourier_features_and_logvar_head_in_float32(golden_net):
    net, (x, sigma, labels) = _golden_net(golden_net)
    with torch.no_grad():
        _, logvar = net(x, sigma, labels, return_logvar=True)
        feats = net.logvar_fourier(sigma.log() / 4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            D_auto, logvar_auto = net(x, sigma, labels, return_logvar=True)
            feats_auto = net.logvar_fourier(sigma.log() / 4)
    assert torch.equal(logvar_auto, logvar) and torch.equal(feats_auto, feats)
    assert D_auto.dtype == torch.float32
    np.testing.assert_allclose(_np(D_auto), golden_net["D_x"], atol=2e-2)


def test_precision_validation():
    cpu = torch.device("cpu")
    assert resolve_precision(None, cpu, use_fp16=True) == "fp32"  # use_fp16 means float16 on CUDA only
    assert resolve_precision("bf16", cpu) == "bf16"
    with pytest.raises(ValueError, match="--precision fp16 needs a CUDA device"):
        resolve_precision("fp16", cpu)
    with pytest.raises(ValueError, match="unknown precision"):
        resolve_precision("fp8", cpu)
    with pytest.raises(ValueError, match="unknown precision"):
        _small_net().set_precision("half")


# 20 steps of the minimal network with a learning rate high enough that the network changes noticeably
# (the loss falls by a third); a status line (mean loss) after every step.
BF16_RUN = dict(data="digits", preset="cpu-tiny8", batch=16, duration=16 * 20, status=16, snapshot=16 * 20,
                checkpoint=16 * 20, seed=3, device="cpu", lr=0.3, decay=1000, rampup=10_000)  # the preset's schedule


def _losses(outdir: Path) -> np.ndarray:
    return np.array([json.loads(line)["loss"] for line in (outdir / "stats.jsonl").read_text().splitlines()])


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory) -> Path:
    outdir = tmp_path_factory.mktemp("fp32") / "run"
    train(TrainOptions(outdir=str(outdir), precision="fp32", **BF16_RUN), progress=False)
    return outdir


def test_bf16_training_is_finite_and_tracks_fp32(fp32_run: Path, tmp_path: Path):
    outdir = tmp_path / "bf16"
    result = train(TrainOptions(outdir=str(outdir), precision="bf16", **BF16_RUN), progress=False)
    assert result["run"]["precision"] == "bf16"
    ref, low = _losses(fp32_run), _losses(outdir)
    assert len(low) == len(ref) == 20 and np.isfinite(low).all()
    assert ref[-5:].mean() < 0.75 * ref[:5].mean()  # the run did learn something
    np.testing.assert_allclose(low, ref, rtol=1e-2)
    assert np.abs(low - ref).max() > 0  # and did run in bfloat16
    assert FAST_PATHS == layers.FastPaths()  # train() restored the process-wide switches


def test_fp16_loss_scaling_path_resumes_exactly(fp32_run: Path, tmp_path: Path, monkeypatch):
    """The fp16 code path (autocast float16, GradScaler, scaler state in checkpoints), run on the CPU by
    lifting the CUDA-only check: it tracks float32 and resumes exactly."""
    import edm2.runtime

    monkeypatch.setattr(edm2.runtime, "resolve_precision", lambda precision, device, use_fp16=False: precision)
    short = {**BF16_RUN, "duration": 16 * 6}
    full = tmp_path / "full"
    train(TrainOptions(outdir=str(full), precision="fp16", **short), progress=False)
    paused = tmp_path / "paused"
    assert train(TrainOptions(outdir=str(paused), precision="fp16", **short), progress=False,
                 max_steps=3)["status"] == "paused"
    train(TrainOptions(outdir=str(paused), precision="fp16", **short), progress=False)
    from edm2.checkpoint import find_checkpoints, load_tensors

    a, _ = load_tensors(find_checkpoints(full)[-1], kind="checkpoint")
    b, _ = load_tensors(find_checkpoints(paused)[-1], kind="checkpoint")
    assert float(a["scaler/scale"]) == 1.0 and a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    np.testing.assert_allclose(_losses(full), _losses(fp32_run)[:6], rtol=1e-2)


# ----------------------------------------------------------------------------------------------------
# torch.compile (inductor, C++ code generated with the system compiler): a tiny attention block, because
# compiling the whole network takes minutes on a small CPU. benchmarks/bench_speed.py --compile checks the
# whole network and reports its largest output difference.


@pytest.mark.slow
def test_compiled_block_matches_eager_in_training_and_eval():
    torch.manual_seed(0)
    eager = Block(8, 16, 16, flavor="enc", attention=True, channels_per_head=8, resample_mode="down")
    with torch.no_grad():
        eager.emb_gain.fill_(0.6)
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin)
    x, emb = torch.randn(2, 8, 8, 8), torch.randn(2, 16)

    # Training mode: forward, backward; the compiled module needs its forced weight normalization from
    # outside (compiled code does not write parameters).
    y_eager = eager(x, emb)
    force_weight_normalization_(twin)
    y_compiled = compiled(x, emb)
    y_eager.square().sum().backward()
    y_compiled.square().sum().backward()
    torch.testing.assert_close(y_compiled, y_eager, rtol=1e-5, atol=2e-6)
    for (name, p), q in zip(eager.named_parameters(), twin.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7, msg=name)  # weights normalized alike
        assert (q.grad - p.grad).abs().max() <= 1e-4 * p.grad.abs().max() + 1e-7, name

    # Eval mode (sampling).
    eager.eval()
    twin.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, emb), eager(x, emb), rtol=1e-5, atol=2e-6)
