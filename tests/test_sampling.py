"""EDM samplers: golden outputs of the official sampler, convergence order, guidance, per-seed noise.

The denoisers used here are analytic (no training), so every expectation is exact or follows from
numerical-analysis facts: the ideal denoiser of a point set (EDM paper, Section 1 of SPEC), the
denoiser of Gaussian data, and the EDM2 network loaded with the golden weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from edm2.networks import Precond
from edm2.sampling import StackedRandomGenerator, edm_sampler, edm_sigma_steps

DATA = Path(__file__).parent / "data"
with np.load(DATA / "sampler.npz") as _d:
    SAMPLER_META = json.loads(str(_d["meta_json"]))
CASES = SAMPLER_META["cases"]
DTYPES = {"f32": torch.float32, "f64": torch.float64}


# ---------------------------------------------------------------------------------------------------------
# Analytic denoisers and call recorders.


def _sigma_column(sigma, x: torch.Tensor) -> torch.Tensor:
    """sigma (scalar, [N] or [N,1,...]) as a [N or 1, 1] column in x's dtype."""
    return torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, 1)


def point_set_denoiser(points: torch.Tensor, point_classes: torch.Tensor | None = None):
    """Ideal denoiser of the finite data set `points` [P, ...]: D(x; s) = sum_i softmax_i(-|x-y_i|^2/2s^2) y_i.

    With `point_classes`, a sample labelled c (one-hot `labels`) only sees the points of class c; without,
    labels are ignored (an unconditional denoiser over all points).
    """

    def D(x: torch.Tensor, sigma, labels: torch.Tensor | None = None) -> torch.Tensor:
        y = points.to(x.dtype).reshape(points.shape[0], -1)  # [P, d]
        xf = x.reshape(x.shape[0], -1)  # [N, d]
        d2 = ((xf[:, None, :] - y[None, :, :]) ** 2).sum(-1)  # [N, P]
        logits = -d2 / (2 * _sigma_column(sigma, x) ** 2)
        if point_classes is not None:
            allowed = labels.to(x.dtype) @ torch.nn.functional.one_hot(point_classes, labels.shape[1]).to(x.dtype).T
            logits = logits.masked_fill(allowed == 0, -torch.inf)
        return (logits.softmax(dim=1) @ y).reshape(x.shape)

    return D


def gaussian_denoiser(mus: torch.Tensor, stds: torch.Tensor, per_class: bool = True):
    """Ideal denoiser of Gaussian data N(mu, std^2 I): D(x; s) = mu + std^2/(std^2 + s^2) (x - mu).

    `per_class`: mus [C, ...], stds [C] picked by the one-hot labels; otherwise one mu (shaped like an
    image) and a scalar std for every sample.
    """

    def D(x: torch.Tensor, sigma, labels: torch.Tensor | None = None) -> torch.Tensor:
        if per_class:
            cls = labels.argmax(dim=1)
            mu, std = mus.to(x.dtype)[cls], stds.to(x.dtype)[cls].reshape(-1, *[1] * (x.ndim - 1))
        else:
            mu, std = mus.to(x.dtype), torch.as_tensor(stds, dtype=x.dtype)
        s2 = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *[1] * (x.ndim - 1)) ** 2
        return mu + std**2 / (std**2 + s2) * (x - mu)

    return D


class Recorder:
    """Wrap a denoiser; remember every sigma it is called with."""

    def __init__(self, fn) -> None:
        self.fn = fn
        self.sigmas: list[float] = []

    def __call__(self, x, sigma, labels=None):
        s = torch.as_tensor(sigma)
        assert s.numel() == 1, "the sampler evaluates all images at one noise level"
        self.sigmas.append(float(s))
        return self.fn(x, sigma, labels)


class ScriptedNoise:
    """randn_like whose k-th call returns table[k] (the noise the reference sampler drew)."""

    def __init__(self, table: np.ndarray) -> None:
        self.table = table
        self.calls = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.as_tensor(self.table[self.calls], dtype=x.dtype)
        assert out.shape == x.shape
        self.calls += 1
        return out


def _case_params(g: dict, case: str) -> dict:
    """Sampler parameters of a golden case: params_json where stored, else parsed from the case name."""
    key = f"{case}/params_json"
    if key in g:
        p = json.loads(str(g[key]))
        # Cases without churn store S_churn = 0 only; the other churn options keep the sampler defaults.
        return dict(num_steps=p["num_steps"], guidance=p["guidance"], dtype=p["dtype"], S_churn=p["S_churn"],
                    S_min=p.get("S_min", 0), S_max=p.get("S_max", float("inf")), S_noise=p.get("S_noise", 1),
                    sigma_min=p["sigma_min"], sigma_max=p["sigma_max"], rho=p["rho"])
    # gauss_<dtype>_n<steps>_churn<0|1>_g<w>
    _, dtype, steps, churn, guidance = case.split("_")
    churn_kw = SAMPLER_META["churn"] if churn == "churn1" else dict(S_churn=0, S_min=0, S_max=float("inf"), S_noise=1)
    return dict(num_steps=int(steps[1:]), guidance=float(guidance[1:]), dtype=dtype, **churn_kw,
                sigma_min=0.002, sigma_max=80, rho=7)


def _golden_denoisers(g: dict, case: str):
    if case.startswith("gauss_"):
        net = gaussian_denoiser(torch.from_numpy(g["gauss/mus"]), torch.from_numpy(g["gauss/stds"]))
        gnet = gaussian_denoiser(torch.from_numpy(g["gauss/mu_all"]), float(g["gauss/std_all"]), per_class=False)
    else:
        points = torch.from_numpy(g["points"])
        net = point_set_denoiser(points, torch.from_numpy(g["point_classes"]))
        gnet = point_set_denoiser(points)
    return Recorder(net), Recorder(gnet)


def _run_golden_case(g: dict, case: str):
    p = _case_params(g, case)
    dtype = DTYPES[p["dtype"]]
    net, gnet = _golden_denoisers(g, case)
    randn = ScriptedNoise(g["churn_noise"])
    out = edm_sampler(net, torch.from_numpy(g["noise"]), torch.from_numpy(g["labels"]), gnet=gnet,
                      num_steps=p["num_steps"], sigma_min=p["sigma_min"], sigma_max=p["sigma_max"], rho=p["rho"],
                      guidance=p["guidance"], S_churn=p["S_churn"], S_min=p["S_min"], S_max=p["S_max"],
                      S_noise=p["S_noise"], dtype=dtype, randn_like=randn)
    return p, out, net, gnet, randn


# ---------------------------------------------------------------------------------------------------------
# Golden: the official sampler with analytic denoisers.


def test_golden_case_list_is_complete(golden_sampler):
    assert golden_sampler["meta"]["cases"] == CASES
    assert len(CASES) == 33
    assert sum(c.startswith("gauss_") for c in CASES) == 16


@pytest.mark.parametrize("case", CASES)
def test_golden_sampler_case(golden_sampler, case):
    g = golden_sampler
    p, out, net, gnet, randn = _run_golden_case(g, case)
    f64 = p["dtype"] == "f64"

    assert out.dtype == DTYPES[p["dtype"]]
    np.testing.assert_allclose(out.numpy(), g[f"{case}/out"], rtol=0, atol=1e-10 if f64 else 1e-5)

    steps = p["num_steps"]
    assert len(net.sigmas) == 2 * steps - 1  # NFE: Heun, Euler into sigma = 0
    np.testing.assert_allclose(net.sigmas, g[f"{case}/net_sigmas"], rtol=1e-13 if f64 else 1e-6, atol=0)
    if p["guidance"] == 1:
        assert gnet.sigmas == []  # the guide is never evaluated without guidance
    else:
        # Golden gnet sigmas where recorded; the guide always sees the same points as the main net.
        expected = g.get(f"{case}/gnet_sigmas", g[f"{case}/net_sigmas"])
        np.testing.assert_allclose(gnet.sigmas, expected, rtol=1e-13 if f64 else 1e-6, atol=0)
        assert gnet.sigmas == net.sigmas
    assert randn.calls == int(g[f"{case}/num_randn_like_calls"])


def test_gaussian_exact_ode_solution_and_second_order(golden_sampler):
    """The stored exact PF-ODE endpoint agrees with the closed form, and Heun's error against it falls
    about as N^-2."""
    g = golden_sampler
    noise, labels = torch.from_numpy(g["noise"]), torch.from_numpy(g["labels"])
    cls = labels.argmax(dim=1)
    mu, std = torch.from_numpy(g["gauss/mus"])[cls], torch.from_numpy(g["gauss/stds"])[cls].reshape(-1, 1, 1, 1)
    # The ODE dx/ds = (x - D)/s keeps (x - mu)/sqrt(std^2 + s^2) constant along a trajectory.
    exact = mu + (80 * noise - mu) * std / (std**2 + 80**2).sqrt()
    errors = {}
    for n in (4, 18, 32):
        case = f"gauss_f64_n{n}_churn0_g1"
        np.testing.assert_allclose(g[f"{case}/exact_ode_solution"], exact.numpy(), rtol=1e-12, atol=1e-12)
        _, out, *_ = _run_golden_case(g, case)
        errors[n] = (out - exact).abs().max().item()
    assert errors[4] > errors[18] > errors[32]
    slope = np.log(errors[32] / errors[18]) / np.log(32 / 18)
    assert -2.5 < slope < -1.5, errors


# ---------------------------------------------------------------------------------------------------------
# End to end with the EDM2 network and the golden weights.


def _golden_precond(golden_net: dict) -> Precond:
    """The golden 'small' conditional network with its (perturbed-gain) reference weights, in eval mode."""
    net = Precond(**golden_net["meta"]["precond_kwargs"])
    state = {k[len("state/"):]: torch.from_numpy(v) for k, v in golden_net.items() if k.startswith("state/")}
    net.load_state_dict(state, strict=True)
    return net.eval().requires_grad_(False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_edm2_net_sampler(golden_sampler, golden_net, dtype):
    # Only guidance 1: the g1.5 golden needs an unconditional guide whose weights are not in the archive.
    g = golden_sampler
    net = _golden_precond(golden_net).to(dtype)
    noise = torch.from_numpy(g["edm2net/noise"]).to(dtype)
    labels = torch.from_numpy(g["edm2net/labels"]).to(dtype)
    with torch.no_grad():
        out = edm_sampler(net, noise, labels, num_steps=SAMPLER_META["edm2net"]["num_steps"], dtype=dtype)
    assert out.dtype == dtype
    if dtype == torch.float64:
        np.testing.assert_allclose(out.numpy(), g["edm2net/g1/out_f64"], rtol=0, atol=1e-9)
    else:
        np.testing.assert_allclose(out.numpy(), g["edm2net/g1/out_f32"], rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------
# Convergence order.

# A small 2-D point set, stored as [K, 1, 1, 2] "images".
POINTS = torch.tensor([[-1.0, 0.3], [0.8, 0.9], [0.2, -1.1], [1.2, -0.4], [-0.6, -0.8]],
                      dtype=torch.float64).reshape(5, 1, 1, 2)


def blurred_point_set_denoiser(points: torch.Tensor, blur: float):
    """Ideal denoiser of the point set convolved with N(0, blur^2 I) (a Gaussian mixture).

    Noising the blurred data to sigma equals noising the points to s = sqrt(blur^2 + sigma^2), so
    D(x; sigma) = blur^2/s^2 x + sigma^2/s^2 D_points(x; s).
    """
    d_points = point_set_denoiser(points)

    def D(x, sigma, labels=None):
        s2 = torch.as_tensor(sigma, dtype=x.dtype) ** 2 + blur**2
        return (blur**2 / s2) * x + (1 - blur**2 / s2) * d_points(x, s2.sqrt(), labels)

    return D


def _fitted_slope(ns, errors) -> float:
    return float(np.polyfit(np.log(ns), np.log(errors), 1)[0])


def test_heun_second_order_euler_first_order():
    # Choice of problem: the ideal denoiser of a bare point set becomes stiff as sigma -> sigma_min (the
    # softmax turns into a hard nearest-point switch), so with few steps a sample jumps between basins and
    # the error is O(1) and not smooth in N. Blurring the points with N(0, 0.4^2) keeps the same sampler
    # settings (sigma_max 80, sigma_min 0.002, rho 7) while making the flow smooth, so that N = 8..64 is
    # already in the asymptotic regime. The reference is a 1024-step Heun solution from the same noise.
    D = blurred_point_set_denoiser(POINTS, blur=0.4)
    noise = torch.randn(64, 1, 1, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = edm_sampler(D, noise, num_steps=1024, dtype=torch.float64)
    ns = [8, 16, 32, 64]
    slopes = {}
    for solver in ("heun", "euler"):
        errors = [(edm_sampler(D, noise, num_steps=n, dtype=torch.float64, solver=solver) - ref).abs().max().item()
                  for n in ns]
        assert all(a > b for a, b in zip(errors, errors[1:])), (solver, errors)
        slopes[solver] = _fitted_slope(ns, errors)
    assert -2.5 < slopes["heun"] < -1.5, slopes
    assert -1.3 < slopes["euler"] < -0.7, slopes


def test_default_settings_land_on_the_data_points():
    D = point_set_denoiser(POINTS)
    noise = torch.randn(64, 1, 1, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    out = edm_sampler(D, noise, num_steps=32, dtype=torch.float64)
    dist = (out.reshape(64, 1, 2) - POINTS.reshape(1, 5, 2)).norm(dim=2).min(dim=1).values
    assert dist.max().item() < 1e-2
    # Not all samples collapse to one point.
    assert len(set((out.reshape(64, 1, 2) - POINTS.reshape(1, 5, 2)).norm(dim=2).argmin(dim=1).tolist())) >= 3


def test_euler_solver_uses_one_evaluation_per_step():
    net = Recorder(gaussian_denoiser(torch.zeros(1, 1, 2), 0.5, per_class=False))
    edm_sampler(net, torch.randn(3, 1, 1, 2), num_steps=7, solver="euler")
    steps = edm_sigma_steps(7, dtype=torch.float32)
    assert len(net.sigmas) == 7
    np.testing.assert_allclose(net.sigmas, steps[:-1].numpy(), rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# Guidance.


def _hand_written_sampler(D, noise, num_steps, solver="heun"):
    """Algorithm 1 of the EDM paper, written out with float64 NumPy time steps."""
    i = np.arange(num_steps)
    t = (80 ** (1 / 7) + i / (num_steps - 1) * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    t = np.append(t, 0.0)
    x = noise * t[0]
    for k in range(num_steps):
        d = (x - D(x, torch.tensor(t[k]))) / t[k]
        x_euler = x + (t[k + 1] - t[k]) * d
        if solver == "heun" and t[k + 1] > 0:
            d2 = (x_euler - D(x_euler, torch.tensor(t[k + 1]))) / t[k + 1]
            x = x + (t[k + 1] - t[k]) * (d + d2) / 2
        else:
            x = x_euler
    return x


@pytest.mark.parametrize("solver", ["heun", "euler"])
@pytest.mark.parametrize("w", [0.0, 0.5, 1.5, 3.0])
def test_guidance_is_guide_plus_w_times_difference(w, solver):
    mu_c, mu_u = torch.tensor([[[0.7, -0.2]]], dtype=torch.float64), torch.tensor([[[-0.3, 0.4]]], dtype=torch.float64)
    net = gaussian_denoiser(mu_c, 0.3, per_class=False)
    gnet = gaussian_denoiser(mu_u, 0.9, per_class=False)
    noise = torch.randn(5, 1, 1, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def guided(x, sigma):
        d_g = gnet(x, sigma)
        return d_g + w * (net(x, sigma) - d_g)

    expected = _hand_written_sampler(guided, noise, 12, solver)
    out = edm_sampler(net, noise, gnet=gnet, guidance=w, num_steps=12, dtype=torch.float64, solver=solver)
    np.testing.assert_allclose(out.numpy(), expected.numpy(), rtol=0, atol=1e-12)
    if w != 1:
        # Guidance must matter: the unguided sampler lands elsewhere.
        plain = edm_sampler(net, noise, num_steps=12, dtype=torch.float64, solver=solver)
        assert (plain - out).abs().max().item() > 1e-3


def test_sampler_argument_errors():
    net = gaussian_denoiser(torch.zeros(1, 1, 2), 0.5, per_class=False)
    noise = torch.randn(2, 1, 1, 2)
    with pytest.raises(ValueError):
        edm_sampler(net, noise, guidance=1.5)  # guidance without a guide
    with pytest.raises(ValueError):
        edm_sampler(net, noise, solver="rk4")
    for n in (0, -3):
        with pytest.raises(ValueError):
            edm_sampler(net, noise, num_steps=n)


# ---------------------------------------------------------------------------------------------------------
# Per-seed random numbers.


def test_stacked_generator_rows_depend_only_on_their_seed():
    shape = [1, 4, 4]
    together = StackedRandomGenerator("cpu", [3, 7, 9]).randn([3, *shape])
    first = StackedRandomGenerator("cpu", [3]).randn([1, *shape])
    rest = StackedRandomGenerator("cpu", [7, 9]).randn([2, *shape])
    assert together.shape == (3, *shape)
    torch.testing.assert_close(together, torch.cat([first, rest]), rtol=0, atol=0)
    assert not torch.equal(together[1], together[2])
    # The same seed in another position, in float64 too.
    a = StackedRandomGenerator("cpu", [9, 3]).randn([2, 5], dtype=torch.float64)
    b = StackedRandomGenerator("cpu", [3]).randn([1, 5], dtype=torch.float64)
    assert a.dtype == torch.float64
    torch.testing.assert_close(a[1:], b, rtol=0, atol=0)


def test_stacked_generator_sampler_outputs_independent_of_batching():
    seeds = [0, 1, 2, 3, 4, 5]
    D = point_set_denoiser(POINTS)
    churn = dict(S_churn=40, S_min=0.05, S_max=50, S_noise=1.003)

    def run(batch):
        gen = StackedRandomGenerator("cpu", batch)
        noise = gen.randn([len(batch), 1, 1, 2], dtype=torch.float64)
        return edm_sampler(D, noise, num_steps=18, dtype=torch.float64, randn_like=gen.randn_like, **churn)

    whole = run(seeds)
    split = torch.cat([run(seeds[:1]), run(seeds[1:4]), run(seeds[4:])])
    torch.testing.assert_close(whole, split, rtol=0, atol=1e-12)
    # The churn noise matters: without it (fresh global noise) the result changes.
    gen = StackedRandomGenerator("cpu", seeds)
    noise = gen.randn([6, 1, 1, 2], dtype=torch.float64)
    no_churn = edm_sampler(D, noise, num_steps=18, dtype=torch.float64)
    assert (no_churn - whole).abs().max().item() > 1e-6


def test_stacked_generator_randint_and_errors():
    gen = StackedRandomGenerator("cpu", [11, 12, 13, 14])
    labels = gen.randint(10, [4])
    assert labels.shape == (4,) and labels.dtype == torch.int64
    assert labels.min() >= 0 and labels.max() < 10
    many = StackedRandomGenerator("cpu", list(range(50))).randint(3, [50, 7])
    assert many.shape == (50, 7)
    assert set(many.flatten().tolist()) == {0, 1, 2}
    torch.testing.assert_close(StackedRandomGenerator("cpu", [13]).randint(10, [1]), labels[2:3])
    with pytest.raises(ValueError):
        gen.randn([3, 2])
    with pytest.raises(ValueError):
        gen.randint(10, [5])
    with pytest.raises(ValueError):
        gen.randn_like(torch.zeros(2, 3))


# ---------------------------------------------------------------------------------------------------------
# Time steps.


@pytest.mark.parametrize("n, sigma_min, sigma_max, rho", [(18, 0.002, 80, 7), (32, 0.002, 80, 7), (5, 0.1, 10, 3),
                                                          (2, 0.002, 80, 7)])
def test_edm_sigma_steps_formula(n, sigma_min, sigma_max, rho):
    steps = edm_sigma_steps(n, sigma_min, sigma_max, rho)
    assert steps.dtype == torch.float64 and steps.shape == (n + 1,)
    i = np.arange(n)
    expected = (sigma_max ** (1 / rho) + i / (n - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    np.testing.assert_allclose(steps[:-1].numpy(), expected, rtol=1e-14, atol=0)
    assert steps[0].item() == pytest.approx(sigma_max, rel=1e-14)
    assert steps[-2].item() == pytest.approx(sigma_min, rel=1e-12)
    assert steps[-1].item() == 0
    assert (steps[1:] < steps[:-1]).all()


def test_edm_sigma_steps_dtype_and_errors():
    s32 = edm_sigma_steps(18, dtype=torch.float32)
    assert s32.dtype == torch.float32
    torch.testing.assert_close(s32, edm_sigma_steps(18).float(), rtol=1e-6, atol=0)
    # A single step goes from sigma_max straight to 0 (one Euler step).
    assert edm_sigma_steps(1).tolist() == [80.0, 0.0]
    with pytest.raises(ValueError):
        edm_sigma_steps(0)
    with pytest.raises(ValueError):
        edm_sigma_steps(10, sigma_min=5, sigma_max=1)
    with pytest.raises(ValueError):
        edm_sigma_steps(10, sigma_min=0)


@pytest.mark.parametrize("point", [dict(), dict(discretization="vp", schedule="vp", scaling="vp", num_steps=6),
                                   dict(discretization="ve", schedule="ve", alpha=0.5, num_steps=5, S_churn=3.0)])
def test_steps_made_once_give_the_images_of_steps_made_per_call(point):
    """The session makes the step tensor once and hands it to the solver for every batch: the images must equal
    those of settings that make their steps themselves, batch by batch."""
    from edm2.sampling import SamplerSettings

    D = gaussian_denoiser(torch.full([1, 4, 4], 0.3), torch.tensor(0.2), per_class=False)
    settings = SamplerSettings(**point)
    steps = settings.time_steps(D)
    for seeds in ([0, 1, 2], [3, 4]):
        rnd_a, rnd_b = StackedRandomGenerator("cpu", seeds), StackedRandomGenerator("cpu", seeds)
        noise = rnd_a.randn([len(seeds), 1, 4, 4])
        assert torch.equal(noise, rnd_b.randn([len(seeds), 1, 4, 4]))
        once = settings.sample(D, noise, randn_like=rnd_a.randn_like, steps=steps)
        each = settings.sample(D, noise, randn_like=rnd_b.randn_like)
        assert torch.equal(once, each)
    first = steps if isinstance(steps, torch.Tensor) else steps.t
    assert first[-1] == 0 and bool((first[:-1] > first[1:]).all())  # t_0 > ... > t_N = 0
