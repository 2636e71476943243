"""Power-function EMA (EDM2 Section 3): golden values from the official implementation, the tracking
classes, post-hoc reconstruction and the O(1/n^4) reconstruction-error claim."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from edm2.ema import (
    PowerFunctionEMA,
    TraditionalEMA,
    exp_to_std,
    power_function_beta,
    power_function_correlation,
    power_function_response,
    solve_posthoc_coefficients,
    std_to_exp,
)

EMA_STDS = (0.05, 0.10)


def _gamma(std: float) -> float:
    """Exponent of a power-function profile with relative width `std`, by bisection on the closed
    form sigma_rel(g) = sqrt(g+1) / ((g+2) sqrt(g+3)), which decreases monotonically in g >= 0."""
    def sigma_rel(g: float) -> float:
        return np.sqrt(g + 1) / ((g + 2) * np.sqrt(g + 3))

    lo, hi = 0.0, 1e6
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if sigma_rel(mid) > std:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


class _OneParam(torch.nn.Module):
    """The object the golden EMA sequences wrap: a module holding one 1-element parameter."""

    def __init__(self, value: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.p = torch.nn.Parameter(torch.full([1], value, dtype=dtype))


class _Wrapper(torch.nn.Module):
    """Stands in for DistributedDataParallel: the real network sits in `.module`."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module


def _small_net(dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    return net.to(dtype)


@torch.no_grad()
def _set_params(net: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in net.parameters():
        p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))


# ---------------------------------------------------------------------------------------------------
# Golden values of the stand-alone functions.


def test_exp_to_std_golden(golden_phema):
    g = golden_phema
    scalar = np.array([exp_to_std(float(e)) for e in g["exp_to_std/exp"]])
    np.testing.assert_allclose(scalar, g["exp_to_std/std"], rtol=1e-12, atol=1e-15)
    vector = exp_to_std(g["exp_to_std/exp"])
    assert vector.shape == g["exp_to_std/exp"].shape
    np.testing.assert_allclose(vector, g["exp_to_std/std_vectorised"], rtol=1e-12, atol=1e-15)


def test_std_to_exp_golden(golden_phema):
    g = golden_phema
    stds = g["std_to_exp/std"]
    scalar = np.array([std_to_exp(float(s)) for s in stds])
    np.testing.assert_allclose(scalar, g["std_to_exp/exp"], rtol=1e-10)
    vector = std_to_exp(stds)
    assert vector.shape == stds.shape
    np.testing.assert_allclose(vector, g["std_to_exp/exp"], rtol=1e-10)
    np.testing.assert_allclose(exp_to_std(vector), g["std_to_exp/roundtrip_std"], rtol=1e-10)
    exp_2d = std_to_exp(g["std_to_exp/std_2d"])
    assert exp_2d.shape == (6, 10)
    np.testing.assert_allclose(exp_2d, g["std_to_exp/exp_2d"], rtol=1e-10)


def test_power_function_beta_golden(golden_phema):
    g = golden_phema
    beta = power_function_beta(std=g["beta/std"], t_next=g["beta/t_next"], t_delta=g["beta/t_delta"])
    np.testing.assert_allclose(beta, g["beta/beta"], rtol=1e-12, atol=1e-15)


def test_power_function_response_golden(golden_phema):
    g = golden_phema
    r0 = power_function_response(g["response0/ofs"], g["response0/std"], int(g["response0/len"]), axis=0)
    assert r0.shape == (400, 4)
    np.testing.assert_allclose(r0, g["response0/resp"], rtol=1e-12, atol=1e-15)
    r1 = power_function_response(float(g["response1/ofs"]), g["response1/std"], int(g["response1/len"]), axis=1)
    assert r1.shape == (2, 300, 1)
    np.testing.assert_allclose(r1, g["response1/resp"], rtol=1e-12, atol=1e-15)


def test_power_function_correlation_golden(golden_phema):
    g = golden_phema
    corr = power_function_correlation(g["corr/a_ofs"], g["corr/a_std"], g["corr/b_ofs"], g["corr/b_std"])
    np.testing.assert_allclose(corr, g["corr/corr"], rtol=1e-12, atol=1e-15)


def _profile_error(coefs, in_ofs, in_std, out_ofs, out_std) -> np.ndarray:
    """Relative squared L2 error ||sum_i X_i p_i - p_out||^2 / ||p_out||^2 per output column, from
    the inner products of the continuous profiles."""
    in_ofs, in_std = np.broadcast_arrays(np.float64(in_ofs), np.float64(in_std))
    out_ofs, out_std = np.broadcast_arrays(np.atleast_1d(np.float64(out_ofs)), np.float64(out_std))
    A = power_function_correlation(in_ofs[:, None], in_std[:, None], in_ofs[None, :], in_std[None, :])
    B = power_function_correlation(in_ofs[:, None], in_std[:, None], out_ofs[None, :], out_std[None, :])
    c = power_function_correlation(out_ofs, out_std, out_ofs, out_std)
    X = np.asarray(coefs, dtype=np.float64).reshape(len(in_ofs), -1)
    return (np.einsum("io,ij,jo->o", X, A, X) - 2 * np.einsum("io,io->o", X, B) + c) / c


@pytest.mark.parametrize("case", ["posthoc", "posthoc_small"])
def test_solve_posthoc_coefficients_golden(golden_phema, case):
    g = golden_phema
    in_ofs, in_std = g[f"{case}/in_ofs"], g[f"{case}/in_std"]
    out_ofs, out_std = g[f"{case}/out_ofs"], g[f"{case}/out_std"]
    coefs = solve_posthoc_coefficients(in_ofs, in_std, out_ofs, out_std)
    assert coefs.shape == g[f"{case}/coefs"].shape
    coefs = coefs / coefs.sum(axis=0, keepdims=True)
    np.testing.assert_allclose(coefs, g[f"{case}/coefs"], rtol=0, atol=1e-6)
    if case == "posthoc":
        err = _profile_error(coefs, in_ofs, in_std, out_ofs, out_std)
        assert np.all(err <= 1e-7), err
        # The golden errors are 4.4e-10 and 1.3e-8: ours must be as good, up to rounding noise.
        assert np.all(err <= g["posthoc/rel_l2_error"] * 2 + 1e-9), (err, g["posthoc/rel_l2_error"])


# ---------------------------------------------------------------------------------------------------
# Golden EMA sequences.


@pytest.mark.parametrize("dtype_name", ["f32", "f64"])
@pytest.mark.parametrize("bs", [2048, 1])
def test_ema_sequences_golden(golden_phema, dtype_name, bs):
    g = golden_phema
    key = f"ema_{dtype_name}_bs{bs}"
    dtype = torch.float32 if dtype_name == "f32" else torch.float64
    values = g["ema_seq/values"]
    assert list(g["meta"]["ema_stds"]) == list(EMA_STDS)
    assert [str(s) for s in g[f"{key}/suffixes"]] == [f"-{s:.3f}" for s in EMA_STDS]
    trad_cfg = g["meta"]["traditional"]

    net = _OneParam(float(g["ema_seq/init_value"]), dtype)
    ema = PowerFunctionEMA(net, stds=list(EMA_STDS))
    trad = TraditionalEMA(net, halflife_Mimg=trad_cfg["halflife_Mimg"], rampup_ratio=trad_cfg["rampup_ratio"])
    phema = np.zeros([len(values), 2])
    betas = np.zeros([len(values), 2])
    traditional = np.zeros(len(values))
    for t, value in enumerate(values):
        with torch.no_grad():
            net.p.fill_(float(value))
        cur_nimg = (t + 1) * bs
        ema.update(cur_nimg=cur_nimg, batch_size=bs)
        trad.update(cur_nimg=cur_nimg, batch_size=bs)
        sd = ema.state_dict()
        for i, std in enumerate(EMA_STDS):
            assert sd[f"{i}/p"].dtype == dtype
            phema[t, i] = sd[f"{i}/p"].item()
            betas[t, i] = power_function_beta(std=std, t_next=cur_nimg, t_delta=bs)
        traditional[t] = trad.ema[0].item()

    np.testing.assert_allclose(betas, g[f"{key}/beta"], rtol=1e-12, atol=1e-15)
    if dtype == torch.float32:
        np.testing.assert_allclose(phema, g[f"{key}/phema"], rtol=0, atol=1e-6)
        np.testing.assert_allclose(traditional, g[f"{key}/traditional"], rtol=0, atol=1e-6)
    else:
        np.testing.assert_allclose(phema, g[f"{key}/phema"], rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(traditional, g[f"{key}/traditional"], rtol=1e-12, atol=1e-15)


# ---------------------------------------------------------------------------------------------------
# Properties of the profile parametrisation.


def test_std_exp_values_from_spec():
    assert std_to_exp(0.05) == pytest.approx(16.97, abs=0.005)
    assert std_to_exp(0.10) == pytest.approx(6.94, abs=0.005)
    for s in [0.01, 0.05, 0.10, 0.13, 0.2, 0.28]:
        assert float(std_to_exp(s)) == pytest.approx(_gamma(s), rel=1e-10)
        assert float(exp_to_std(std_to_exp(s))) == pytest.approx(s, rel=1e-12)


@pytest.mark.parametrize("bad", [0.0, -0.1, 0.2887, 0.3, 1.0])
def test_std_to_exp_rejects_out_of_range(bad):
    with pytest.raises(ValueError):
        std_to_exp(bad)
    with pytest.raises(ValueError):
        std_to_exp([0.05, bad])
    with pytest.raises(ValueError):
        PowerFunctionEMA(_OneParam(0.0, torch.float64), stds=[0.05, bad])


# ---------------------------------------------------------------------------------------------------
# The O(1/n^4) claim of post-hoc reconstruction with two averages per snapshot.


def _reconstruction_error(n: int, in_stds, out_std: float, out_t: float = 1.0) -> float:
    """Relative L2 profile error of reconstructing (out_t, out_std) from n snapshots at t_i = i/n
    (i = 1..n), each holding one average per entry of `in_stds`; coefficients normalized to sum 1."""
    t = np.arange(1, n + 1) / n
    in_ofs = np.repeat(t, len(in_stds))
    in_std = np.tile(np.float64(in_stds), n)
    coefs = solve_posthoc_coefficients(in_ofs, in_std, out_t, out_std)
    coefs = coefs / coefs.sum(axis=0, keepdims=True)
    return float(_profile_error(coefs, in_ofs, in_std, out_t, out_std)[0])


def test_profile_error_matches_numerical_integration():
    # Cross-check the inner-product error against the profiles p(tau) = (g+1)/t (tau/t)^g integrated
    # on a fine grid, so the n^-4 test below does not rest on cancellation in the quadratic form.
    n, in_stds, out_std = 8, (0.05, 0.10), 0.13
    t = np.arange(1, n + 1) / n
    in_ofs, in_std = np.repeat(t, 2), np.tile(in_stds, n)
    coefs = solve_posthoc_coefficients(in_ofs, in_std, 1.0, out_std)[:, 0]
    coefs = coefs / coefs.sum()
    tau = np.linspace(0, 1, 400001)

    def profile(t_end: float, std: float) -> np.ndarray:
        g = _gamma(std)
        return np.where(tau <= t_end, (g + 1) / t_end * np.minimum(tau / t_end, 1) ** g, 0.0)

    recon = sum(x * profile(a, s) for x, a, s in zip(coefs, in_ofs, in_std))
    target = profile(1.0, out_std)
    numeric = np.trapezoid((recon - target) ** 2, tau) / np.trapezoid(target**2, tau)
    analytic = _reconstruction_error(n, in_stds, out_std)
    assert numeric == pytest.approx(analytic, rel=1e-3)
    assert 1e-5 < analytic < 1e-2  # a genuinely non-trivial error at n = 8


@pytest.mark.parametrize("out_std, out_t", [(0.13, 1.0), (0.07, 1.0), (0.13, 0.75)])
def test_reconstruction_error_falls_as_n_to_the_minus_4(out_std, out_t):
    # Targets end on a snapshot time (t = 1, or 3/4 with n a multiple of 4): a target ending between
    # snapshots has a cut-off no combination can represent, which dominates the error for every n.
    # Measured fit slopes over n = 4..64: -3.79, -3.64, -3.65; the local slope approaches -4 from n = 16
    # on (n = 4 is pre-asymptotic). cond(A) at n = 64 is large but the error of the returned
    # coefficients is measured directly, and it stays on the power law.
    ns = np.array([4, 8, 16, 32, 64])
    two = np.array([_reconstruction_error(n, (0.05, 0.10), out_std, out_t) for n in ns])
    one = np.array([_reconstruction_error(n, (0.10,), out_std, out_t) for n in ns])
    assert np.all(two > 0) and np.all(np.diff(two) < 0)
    slope = np.polyfit(np.log(ns), np.log(two), 1)[0]
    assert slope < -3.5, (slope, two)
    tail_slope = np.polyfit(np.log(ns[2:]), np.log(two[2:]), 1)[0]
    assert -4.5 < tail_slope < -3.8, (tail_slope, two)
    # One average per snapshot only reaches ~n^-2 and is far worse at the same n.
    slope_one = np.polyfit(np.log(ns), np.log(one), 1)[0]
    assert slope_one > -2.5, (slope_one, one)
    assert one[ns == 16][0] > 10 * two[ns == 16][0]
    assert one[ns == 64][0] > 100 * two[ns == 64][0]


# ---------------------------------------------------------------------------------------------------
# PowerFunctionEMA behaviour.


def test_update_interval_independence():
    # A trajectory constant within each group of 4 steps: updating every step with (cur_nimg, b) or
    # only at the end of each group with (cur_nimg, 4b) gives the same average, since the per-step
    # betas (1 - b/t)^(g+1) telescope to ((t - 4b)/t)^(g+1).
    b, groups = 32, 40
    gen = torch.Generator().manual_seed(3)
    traj = torch.randn([groups, 5], generator=gen, dtype=torch.float64)
    init = torch.randn(5, generator=gen, dtype=torch.float64)

    def make():
        net = torch.nn.Linear(5, 1, bias=False).double()
        with torch.no_grad():
            net.weight.copy_(init)
        return net, PowerFunctionEMA(net, stds=EMA_STDS)

    fine_net, fine = make()
    coarse_net, coarse = make()
    step = 0
    for j in range(groups):
        for _ in range(4):
            step += 1
            with torch.no_grad():
                fine_net.weight.copy_(traj[j])
            fine.update(cur_nimg=step * b, batch_size=b)
        with torch.no_grad():
            coarse_net.weight.copy_(traj[j])
        coarse.update(cur_nimg=step * b, batch_size=4 * b)
        if j in (0, 7, groups - 1):
            for i in range(len(EMA_STDS)):
                a, c = fine.state_dict()[f"{i}/weight"], coarse.state_dict()[f"{i}/weight"]
                torch.testing.assert_close(a, c, rtol=1e-12, atol=0)
    # The averages moved away from the last value (the check above is not trivially satisfied).
    assert not torch.allclose(fine.state_dict()["0/weight"], traj[-1].reshape(1, 5), atol=1e-3)


def test_sparse_updates_equal_explicit_power_function_average():
    # With updates at t_1 < ... < t_K (t_0 = 0) and beta_k = (t_{k-1}/t_k)^(g+1), multiplying the
    # recursion e_k = beta_k e_{k-1} + (1 - beta_k) theta_k by t_k^(g+1) telescopes to
    #   e_K = sum_k theta_k (t_k^(g+1) - t_{k-1}^(g+1)) / t_K^(g+1),
    # independent of the initial value (beta_1 = 0).
    gen = torch.Generator().manual_seed(5)
    increments = torch.randint(1, 400, [50], generator=gen).tolist()
    times = np.cumsum(increments).astype(np.float64)
    thetas = torch.randn([len(times), 4], generator=gen, dtype=torch.float64)

    net = torch.nn.Linear(4, 1, bias=False).double()
    with torch.no_grad():
        net.weight.fill_(123.0)
    ema = PowerFunctionEMA(net, stds=(0.05, 0.10, 0.2))
    prev = 0
    for t, theta in zip(times, thetas):
        with torch.no_grad():
            net.weight.copy_(theta)
        ema.update(cur_nimg=int(t), batch_size=int(t - prev))
        prev = t

    for i, std in enumerate((0.05, 0.10, 0.2)):
        g = _gamma(std)
        frac = (times / times[-1]) ** (g + 1)
        weights = np.diff(np.concatenate([[0.0], frac]))
        expected = (torch.from_numpy(weights)[:, None] * thetas).sum(0)
        torch.testing.assert_close(ema.state_dict()[f"{i}/weight"].reshape(-1), expected, rtol=1e-12, atol=1e-14)


def test_averages_start_as_copies_of_the_parameters():
    net = _small_net()
    ema = PowerFunctionEMA(net, stds=EMA_STDS)
    initial = {n: p.detach().clone() for n, p in net.named_parameters()}
    _set_params(net, seed=4)  # the averages are copies, not views of the live parameters
    for _, sd in ema.state_dicts():
        for n, v in initial.items():
            torch.testing.assert_close(sd[n], v, rtol=0, atol=0)
    for i in range(len(EMA_STDS)):
        for n, v in initial.items():
            torch.testing.assert_close(ema.state_dict()[f"{i}/{n}"], v, rtol=0, atol=0)


def test_state_dict_round_trip():
    net = _small_net()
    ema = PowerFunctionEMA(net, stds=EMA_STDS)
    for k in range(1, 4):
        _set_params(net, seed=k)
        ema.update(cur_nimg=k * 8, batch_size=8)
    state = ema.state_dict()
    names = [n for n, _ in net.named_parameters()]
    assert set(state) == {f"{i}/{n}" for i in range(len(EMA_STDS)) for n in names}

    net2 = _small_net()
    _set_params(net2, seed=99)
    restored = PowerFunctionEMA(net2, stds=EMA_STDS)
    assert any(not torch.equal(restored.state_dict()[k], v) for k, v in state.items())
    restored.load_state_dict(state)
    for k, v in state.items():
        torch.testing.assert_close(restored.state_dict()[k], v, rtol=0, atol=0)
    # Continuing from the restored state is indistinguishable from never stopping.
    _set_params(net, seed=10)
    _set_params(net2, seed=10)
    ema.update(cur_nimg=40, batch_size=16)
    restored.update(cur_nimg=40, batch_size=16)
    for k, v in ema.state_dict().items():
        torch.testing.assert_close(restored.state_dict()[k], v, rtol=0, atol=0)


def test_state_dicts_hold_averages_and_buffers():
    net = _small_net()
    with torch.no_grad():
        net[1].running_mean.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64))
    ema = PowerFunctionEMA(_Wrapper(net), stds=EMA_STDS)
    _set_params(net, seed=1)
    theta1 = {n: p.detach().clone() for n, p in net.named_parameters()}
    ema.update(cur_nimg=100, batch_size=100)  # beta = 0: the averages become theta1
    _set_params(net, seed=2)
    theta2 = {n: p.detach().clone() for n, p in net.named_parameters()}
    ema.update(cur_nimg=120, batch_size=20)  # beta = (100/120)^(g+1)

    out = ema.state_dicts()
    assert [s for s, _ in out] == pytest.approx(list(EMA_STDS))
    for std, sd in out:
        assert set(sd) == set(net.state_dict())  # buffers included, no 'module.' prefix
        assert not any(k.startswith("module.") for k in sd)
        for k, v in net.named_buffers():
            torch.testing.assert_close(sd[k], v, rtol=0, atol=0)
        beta = (100 / 120) ** (_gamma(std) + 1)
        for n in theta1:
            expected = beta * theta1[n] + (1 - beta) * theta2[n]
            torch.testing.assert_close(sd[n], expected, rtol=1e-12, atol=1e-14)
        # The two averages differ from each other and from the live parameters.
        assert not torch.allclose(sd["0.weight"], net[0].weight, rtol=0, atol=1e-3)
    assert not torch.allclose(out[0][1]["0.weight"], out[1][1]["0.weight"])
    # The returned tensors are copies: later changes to the network do not leak into them.
    saved = out[0][1]["0.weight"].clone()
    with torch.no_grad():
        net[0].weight.add_(1.0)
        net[1].running_mean.add_(1.0)
    torch.testing.assert_close(out[0][1]["0.weight"], saved, rtol=0, atol=0)
    assert torch.equal(out[0][1]["1.running_mean"], torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64))


def test_get_returns_network_copies_like_the_official_class():
    """`get()` gives [(network, '-0.050'), ...]: copies of the network whose parameters are the averages and
    whose buffers are the live ones, equal to the tensor API (`state_dicts()`), refreshed by every call."""
    net = _small_net()
    with torch.no_grad():
        net[1].running_mean.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64))
    ema = PowerFunctionEMA(_Wrapper(net), stds=EMA_STDS)
    for k in range(1, 4):
        _set_params(net, seed=k)
        ema.update(cur_nimg=k * 10, batch_size=10)
    got = ema.get()
    assert [suffix for _, suffix in got] == ["-0.050", "-0.100"]
    for (copy_net, _), (_, sd) in zip(got, ema.state_dicts()):
        assert copy_net is not net and type(copy_net) is type(net)
        assert set(copy_net.state_dict()) == set(sd)
        for name, value in copy_net.state_dict().items():
            torch.testing.assert_close(value, sd[name], rtol=0, atol=0)
    # A later update and buffer change show up in the same copies at the next call.
    first = [m for m, _ in got]
    _set_params(net, seed=7)
    with torch.no_grad():
        net[1].running_mean.add_(10.0)
    ema.update(cur_nimg=50, batch_size=20)
    again = ema.get()
    assert [m for m, _ in again] == first
    for (copy_net, _), (_, sd) in zip(again, ema.state_dicts()):
        for name, value in copy_net.state_dict().items():
            torch.testing.assert_close(value, sd[name], rtol=0, atol=0)
        torch.testing.assert_close(copy_net.state_dict()["1.running_mean"], net[1].running_mean, rtol=0, atol=0)
    # The copies do not drag the live network along, nor the other way round.
    with torch.no_grad():
        first[0][0].weight.add_(1.0)
    assert not torch.equal(first[0][0].weight, net[0].weight)


class _ReferenceEMA:
    """The official class's behaviour, written out: one deep copy of the network per length, every parameter
    moved towards the live one by `lerp_(p, 1 - beta)` at each update, the live buffers copied in by `get()`."""

    def __init__(self, net: torch.nn.Module, stds) -> None:
        self.net, self.stds = net, list(stds)
        self.copies = [copy.deepcopy(net) for _ in self.stds]

    @torch.no_grad()
    def update(self, cur_nimg: int, batch_size: int) -> None:
        for std, ema in zip(self.stds, self.copies):
            beta = float(power_function_beta(std=std, t_next=cur_nimg, t_delta=batch_size))
            for live, avg in zip(self.net.parameters(), ema.parameters()):
                avg.lerp_(live, 1 - beta)

    @torch.no_grad()
    def get(self) -> list[tuple[torch.nn.Module, str]]:
        for ema in self.copies:
            for live, avg in zip(self.net.buffers(), ema.buffers()):
                avg.copy_(live)
        return [(ema, f"-{std:.3f}") for std, ema in zip(self.stds, self.copies)]


@pytest.mark.parametrize("make", [lambda: torch.nn.Linear(3, 2).double(), _small_net], ids=["linear", "buffers"])
def test_get_of_a_network_with_or_without_buffers_gives_the_official_result(make):
    """A plain Linear has no buffers (the fused copy refuses an empty list); a network with buffers copies them.
    Both give what the official class gives: the averaged parameters and the live buffers."""
    net = make()
    ema, reference = PowerFunctionEMA(net, stds=EMA_STDS), _ReferenceEMA(net, EMA_STDS)
    for k in range(1, 5):
        _set_params(net, seed=k)
        with torch.no_grad():
            for b in net.buffers():
                b.add_(k) if b.is_floating_point() else b.fill_(k)
        ema.update(cur_nimg=k * 16, batch_size=16)
        reference.update(cur_nimg=k * 16, batch_size=16)
    got, expected = ema.get(), reference.get()
    assert [s for _, s in got] == [s for _, s in expected] == ["-0.050", "-0.100"]
    for (ours, _), (theirs, _) in zip(got, expected):
        assert ours.state_dict().keys() == theirs.state_dict().keys()
        for name, value in theirs.state_dict().items():
            torch.testing.assert_close(ours.state_dict()[name], value, rtol=1e-12, atol=1e-14)
        for name, value in net.named_buffers():
            assert torch.equal(ours.get_buffer(name), value)
    assert not torch.equal(next(got[0][0].parameters()), next(net.parameters()))  # averages, not the live weights


@pytest.mark.parametrize("n, out_t, out_std", [(8, 1.0, 0.13), (20, 0.7, (0.03, 0.1, 0.2))])
def test_coefficient_columns_sum_to_one(n, out_t, out_std):
    """As the official `solve_posthoc_coefficients`: each column is a weighting of the stored averages."""
    t = np.arange(1, n + 1) / n
    coefs = solve_posthoc_coefficients(np.repeat(t, 2), np.tile([0.05, 0.10], n), out_t, out_std)
    assert coefs.shape == (2 * n, np.size(out_std))
    np.testing.assert_allclose(coefs.sum(axis=0), 1.0, rtol=0, atol=1e-12)
