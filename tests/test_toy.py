"""The 2D autoguidance toy (`edm2.toy`, `edm2 toy`): the exact score of the tree mixture, the ideal denoiser through
the EDM sampler, a short training, guidance and its interval, model files, and the two commands."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

from edm2.cli import main
from edm2.toy import (
    GaussianMixture,
    ToyDenoiser,
    ToyNetConfig,
    ToySampler,
    ToyTrainConfig,
    TreeSpec,
    load_toy_model,
    mean_log_likelihood,
    sample_toy,
    save_toy_model,
    toy_denoiser,
    train_toy,
    tree_mixture,
)


@pytest.fixture(scope="module")
def mixture() -> GaussianMixture:
    return tree_mixture()


def random_net(num_classes: int, seed: int) -> ToyDenoiser:
    """A toy denoiser with random weights everywhere (its output layer too, which starts at zero)."""
    torch.manual_seed(seed)
    net = ToyDenoiser(ToyNetConfig(num_classes=num_classes, hidden=16, blocks=1))
    torch.nn.init.normal_(net.out.weight, std=0.5)
    return net.eval().requires_grad_(False)


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


# ----------------------------------------------------------------------------------------------------
# The mixture.


def test_tree_mixture_shape_and_moments(mixture):
    spec = TreeSpec()
    assert mixture.num_classes == 2
    assert len(mixture.weights) == 2 * spec.links * (2**spec.depth - 1)
    assert float(mixture.weights.sum()) == pytest.approx(1.0)
    assert mixture.class_probabilities().tolist() == pytest.approx([0.5, 0.5])
    assert mixture.sigma_data() == pytest.approx(0.5)
    assert mixture.mean().abs().max() < 1e-12
    assert torch.linalg.eigvalsh(mixture.covs).min() > 0
    x = mixture.sample(40_000, torch.Generator().manual_seed(0), label=1)
    assert torch.allclose(x.mean(0), mixture.mean(1), atol=0.01)
    assert torch.allclose(torch.cov(x.T), mixture.covariance(1), atol=0.01)
    assert torch.equal(tree_mixture().means, mixture.means)  # deterministic


@pytest.mark.parametrize("sigma", [0.0, 0.003, 0.05, 0.5, 3.0])
@pytest.mark.parametrize("label", [None, 0, 1])
def test_score_is_the_gradient_of_the_log_density(mixture, sigma, label):
    """Central differences of log p(x; sigma) in float64, at points on the tree, between branches and far out."""
    g = torch.Generator().manual_seed(1)
    x = torch.cat([mixture.sample(12, g), torch.randn(6, 2, generator=g, dtype=torch.float64),
                   torch.tensor([[3.0, -2.0], [-0.2, 0.4]], dtype=torch.float64)])
    h = 1e-6
    fd = torch.stack([(mixture.log_prob(x + h * e, sigma, label) - mixture.log_prob(x - h * e, sigma, label)) / (2 * h)
                      for e in torch.eye(2, dtype=torch.float64)], dim=1)
    score = mixture.score(x, sigma, label)
    assert score.dtype == torch.float64
    assert torch.allclose(score, fd, rtol=1e-5, atol=1e-5 * (1 + fd.abs().max()))


def test_per_point_sigma_and_normalization(mixture):
    x = mixture.sample(5, torch.Generator().manual_seed(2))
    sigma = torch.tensor([0.01, 0.1, 0.3, 1.0, 2.0], dtype=torch.float64)
    one_by_one = torch.cat([mixture.score(x[i:i + 1], float(s)) for i, s in enumerate(sigma)])
    assert torch.allclose(mixture.score(x, sigma), one_by_one, rtol=1e-12, atol=1e-12)
    assert torch.allclose(mixture.score(x, sigma[:, None]), one_by_one, rtol=1e-12, atol=1e-12)
    xs = torch.linspace(-3, 3, 241, dtype=torch.float64)
    X, Y = torch.meshgrid(xs, xs, indexing="xy")
    p = mixture.log_prob(torch.stack([X.reshape(-1), Y.reshape(-1)], 1), 0.2, label=0).exp()
    assert float(p.sum()) * float(xs[1] - xs[0]) ** 2 == pytest.approx(1.0, abs=1e-3)


def test_ideal_denoiser_through_edm_solve_reproduces_the_mixture(mixture):
    for label in (0, None):
        data = mixture.sample(2000, torch.Generator().manual_seed(3), label)
        denoise = toy_denoiser(mixture.ideal_denoiser, label=label, dtype=torch.float64)
        x = sample_toy(denoise, 2000, torch.Generator().manual_seed(4), dtype=torch.float64)
        assert x.dtype == torch.float64
        assert mean_log_likelihood(mixture, x, label) == pytest.approx(mean_log_likelihood(mixture, data, label),
                                                                       abs=0.1)
        assert torch.allclose(x.mean(0), mixture.mean(label), atol=0.03)
        assert torch.allclose(torch.cov(x.T), mixture.covariance(label), atol=0.03)


def test_mixture_rejects_unknown_class(mixture):
    with pytest.raises(ValueError, match="class 2 does not exist"):
        mixture.log_prob(torch.zeros(1, 2), label=2)


# ----------------------------------------------------------------------------------------------------
# The network and its training.


def test_short_training_lowers_the_loss(mixture):
    net, losses = train_toy(mixture, ToyNetConfig(hidden=32, blocks=2),
                            ToyTrainConfig(steps=150, batch_size=256, lr=5e-3))
    assert len(losses) == 150 and all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:25]) / 25, sum(losses[-25:]) / 25
    assert last < 0.95 * first, (first, last)
    assert not net.training and not any(p.requires_grad for p in net.parameters())


def test_preconditioning_and_conditioning():
    net = random_net(2, 0)
    x = torch.randn(8, 2)
    with pytest.raises(ValueError, match="pass labels"):
        net(x, 0.5)
    a, b = net(x, 0.5, torch.zeros(8, dtype=torch.int64)), net(x, 0.5, torch.ones(8, dtype=torch.int64))
    assert not torch.allclose(a, b)
    assert torch.equal(net(x, 0.5, torch.tensor([1])), b)  # one label for the batch
    assert torch.allclose(net(x, 1e-6, torch.tensor([0])), x, atol=1e-4)  # c_skip -> 1, c_out -> 0
    assert net(x.double(), torch.full((8,), 0.5), torch.tensor([0])).dtype == torch.float64
    uncond = random_net(0, 1)
    assert torch.equal(uncond(x, 0.5), uncond(x, 0.5, torch.tensor([1])))  # labels ignored


def test_save_and_load(tmp_path):
    net = random_net(2, 2)
    save_toy_model(tmp_path / "net.safetensors", net, {"role": "main"})
    back, meta = load_toy_model(tmp_path / "net.safetensors")
    assert meta["role"] == "main" and meta["net"]["num_classes"] == 2
    x = torch.randn(5, 2)
    assert torch.equal(back(x, 0.3, torch.tensor([1])), net(x, 0.3, torch.tensor([1])))
    (tmp_path / "junk.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(ValueError, match="safetensors"):
        load_toy_model(tmp_path / "junk.safetensors")


# ----------------------------------------------------------------------------------------------------
# Guidance.


def sample_with(net, gnet, guidance, interval=None, n=64, steps=12):
    denoise = toy_denoiser(net, gnet, guidance, label=1, interval=interval)
    return sample_toy(denoise, n, torch.Generator().manual_seed(5), ToySampler(num_steps=steps))


def test_guidance_of_weight_one_is_no_guidance():
    net, guide = random_net(2, 3), random_net(2, 4)
    plain = sample_with(net, None, 1.0)
    assert torch.equal(sample_with(net, guide, 1.0), plain)
    assert not torch.allclose(sample_with(net, guide, 2.0), plain)


def test_guidance_composes_the_two_denoisers(mixture):
    """D_w = D_g + w (D - D_g) at one step, with the exact class and unconditional denoisers (exact CFG)."""
    x = mixture.sample(7, torch.Generator().manual_seed(6)).float()
    sigma = torch.tensor(0.3)
    D = mixture.ideal_denoiser(x, sigma, 0)
    D_g = mixture.ideal_denoiser(x, sigma, None)
    def unconditional(x, sigma, labels):
        return mixture.ideal_denoiser(x, sigma, None)

    guided = toy_denoiser(mixture.ideal_denoiser, unconditional, 3.0, label=0)(x, sigma)
    assert torch.allclose(guided, D_g + 3.0 * (D - D_g), atol=1e-5)


def test_guidance_interval():
    net, guide = random_net(2, 3), random_net(2, 4)
    every, none = sample_with(net, guide, 2.5), sample_with(net, None, 1.0)
    assert torch.equal(sample_with(net, guide, 2.5, interval=(0.0, 80.0)), every)  # sigma_max is 80
    assert torch.equal(sample_with(net, guide, 2.5, interval=(0.0, math.inf)), every)
    assert torch.equal(sample_with(net, guide, 2.5, interval=(80.0, 100.0)), none)
    part = sample_with(net, guide, 2.5, interval=(0.1, 2.0))
    assert not torch.allclose(part, every) and not torch.allclose(part, none)


@pytest.mark.parametrize("guidance, interval, match", [(-1.0, None, "non-negative"), (math.nan, None, "non-negative"),
                                                       (2.0, (1.0, 0.5), "SIGMA_LO < SIGMA_HI")])
def test_guidance_rejects_bad_settings(guidance, interval, match):
    with pytest.raises(ValueError, match=match):
        toy_denoiser(random_net(2, 0), random_net(2, 1), guidance, 0, interval)


# ----------------------------------------------------------------------------------------------------
# The commands.


def test_toy_train_and_plot_write_their_files(tmp_path):
    run = tmp_path / "run"
    result = invoke("toy", "train", "--fast", "--outdir", run, "--seed", 3)
    assert result.exit_code == 0, result.output
    for name in ("main", "uncond", "guide"):
        assert (run / f"{name}.safetensors").is_file()
    losses = json.loads((run / "losses.json").read_text())
    assert {k: len(v) for k, v in losses.items()} == {"main": 200, "uncond": 200, "guide": 50}
    result = invoke("toy", "plot", "--rundir", run, "--samples", 200, "--sampler-steps", 8)
    assert result.exit_code == 0, result.output
    assert (run / "toy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((run / "toy_results.json").read_text())
    assert set(results["mean_log_likelihood"]) == {"ground truth", "no guidance", "CFG", "autoguidance"}
    assert set(results["per_class"]) == {"0", "1"} and results["guidance"] == 2.0
    out = tmp_path / "figs" / "one.png"
    result = invoke("toy", "plot", "--rundir", tmp_path / "again", "--train", "--fast", "--out", out, "--class", 1,
                    "--samples", 100, "--sampler-steps", 6, "--guidance", 3, "--guidance-interval", "0.1,2")
    assert result.exit_code == 0, result.output
    results = json.loads((out.parent / "toy_results.json").read_text())
    assert set(results["per_class"]) == {"1"} and results["interval"] == [0.1, 2.0]
    assert (tmp_path / "again" / "main.safetensors").is_file()


def test_the_command_line_defaults_are_the_library_defaults():
    from edm2.cli import toy as cli_toy
    from edm2.toy import experiment

    assert (cli_toy.DEFAULT_GUIDANCE, cli_toy.DEFAULT_STEPS, cli_toy.FAST_STEPS) == (
        experiment.DEFAULT_GUIDANCE, experiment.DEFAULT_STEPS, experiment.FAST_STEPS)


@pytest.mark.parametrize("args, fragment", [
    (["plot", "--rundir", "{tmp}/missing"], "no such run folder"),
    (["plot"], "--rundir"),
    (["plot", "--rundir", "{tmp}", "--guidance", "-1"], "non-negative"),
    (["plot", "--rundir", "{tmp}", "--guidance-interval", "2,1"], "SIGMA_LO < SIGMA_HI"),
    (["plot", "--rundir", "{tmp}", "--steps", "5"], "only go with --train"),
    (["plot", "--rundir", "{tmp}", "--samples", "0"], "--samples"),
    (["plot", "--rundir", "{tmp}"], "missing main.safetensors"),
    (["train", "--outdir", "{tmp}/x", "--steps", "0"], "--steps must be positive"),
])
def test_toy_errors_are_one_line(tmp_path, args, fragment):
    result = invoke("toy", *[a.format(tmp=tmp_path) for a in args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edm2: error:") and fragment in lines[0], result.stderr
    assert "Traceback" not in result.output


def test_toy_plot_rejects_an_unknown_class(tmp_path):
    assert invoke("toy", "train", "--fast", "--steps", 4, "--outdir", tmp_path).exit_code == 0
    result = invoke("toy", "plot", "--rundir", tmp_path, "--class", 7, "--samples", 10, "--sampler-steps", 2)
    assert result.exit_code == 2 and "class 7 does not exist" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
