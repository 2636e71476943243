"""The 2D toy distribution of the autoguidance paper's demonstration: a tree-shaped Gaussian mixture with two
classes, with its exact density and exact score at every noise level.

The tree is grown by a deterministic recursion: a trunk (a segment) splits at its end into two branches, turned
left and right, shorter and thinner than their parent; each of those splits again, for a few levels. Every branch
is a chain of anisotropic Gaussian components along its segment (long along it, narrow across), and a branch
has half the probability mass of its parent (every level holds the same mass), so the outer twigs are thin, faint
and many. The two classes are two such trees grown from one root, one leaning left and one (its mirror image, a
little less bent) leaning right: near the root the classes overlap, outwards they part.

A mixture sum_k pi_k N(mu_k, Sigma_k) convolved with N(0, sigma^2 I) is sum_k pi_k N(mu_k, Sigma_k + sigma^2 I),
so its log-density and its score grad_x log p(x; sigma) are exact in closed form (`GaussianMixture.log_prob`,
`.score`), and so is the ideal denoiser D(x; sigma) = x + sigma^2 score(x; sigma) (Tweedie's formula).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["GaussianMixture", "TreeSpec", "tree_mixture", "as_sigma"]


def as_sigma(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """Noise level(s) as a tensor of x's dtype shaped [N] (one per row of x [N, 2]) from a number, a 0-d tensor, or
    a tensor of N values in any shape ([N], [N, 1])."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1)
    return sigma.expand(x.shape[0]) if sigma.numel() == 1 else sigma.reshape(x.shape[0])


@dataclass(frozen=True)
class GaussianMixture:
    """A 2D Gaussian mixture sum_k weights_k N(means_k, covs_k) whose components belong to classes.

    `means` [K, 2], `covs` [K, 2, 2], `weights` [K] (summing to 1), `classes` [K] (integer class of each
    component). Every method takes `label`: None for the whole (unconditional) mixture, or a class for that
    class's own mixture p(x | label) (its components, weights renormalized).
    """

    means: torch.Tensor
    covs: torch.Tensor
    weights: torch.Tensor
    classes: torch.Tensor

    @property
    def num_classes(self) -> int:
        """The number of classes (the largest class index plus one)."""
        return int(self.classes.max()) + 1

    def restrict(self, label: int | None) -> GaussianMixture:
        """The mixture of one class (weights renormalized), or this mixture for label None."""
        if label is None:
            return self
        if not 0 <= int(label) < self.num_classes:
            raise ValueError(f"class {label} does not exist; the toy mixture has classes 0..{self.num_classes - 1}")
        keep = self.classes == int(label)
        w = self.weights[keep]
        return GaussianMixture(self.means[keep], self.covs[keep], w / w.sum(), self.classes[keep])

    def class_probabilities(self) -> torch.Tensor:
        """The prior probability of each class, [num_classes]."""
        return torch.zeros(self.num_classes, dtype=self.weights.dtype).index_add_(0, self.classes, self.weights)

    def _terms(self, x: torch.Tensor, sigma: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        """Per component: log(pi_k N(x; mu_k, Sigma_k + sigma^2 I)) [N, K] and (Sigma_k + sigma^2 I)^-1 (x - mu_k)
        [N, K, 2], in float64."""
        x = x.to(torch.float64)
        s2 = as_sigma(sigma, x).square()[:, None, None, None]  # [N, 1, 1, 1]
        cov = self.covs.to(torch.float64)[None] + s2 * torch.eye(2, dtype=torch.float64)  # [N, K, 2, 2]
        a, b, d = cov[..., 0, 0], cov[..., 0, 1], cov[..., 1, 1]
        det = a * d - b * b
        diff = x[:, None, :] - self.means.to(torch.float64)[None]  # [N, K, 2]
        u, v = diff[..., 0], diff[..., 1]
        solved = torch.stack([d * u - b * v, a * v - b * u], dim=-1) / det[..., None]  # cov^-1 diff
        maha = (diff * solved).sum(-1)
        logn = -0.5 * maha - 0.5 * det.log() - math.log(2 * math.pi)
        return self.weights.to(torch.float64).log()[None] + logn, solved

    def log_prob(self, x: torch.Tensor, sigma: torch.Tensor | float = 0.0, label: int | None = None) -> torch.Tensor:
        """log p(x; sigma) [N] of the mixture (of class `label`) convolved with N(0, sigma^2 I), float64."""
        terms, _ = self.restrict(label)._terms(x, sigma)
        return terms.logsumexp(dim=1)

    def score(self, x: torch.Tensor, sigma: torch.Tensor | float = 0.0, label: int | None = None) -> torch.Tensor:
        """grad_x log p(x; sigma) [N, 2], exact, float64: minus the responsibility-weighted sum of the components'
        (Sigma_k + sigma^2 I)^-1 (x - mu_k)."""
        terms, solved = self.restrict(label)._terms(x, sigma)
        resp = terms.softmax(dim=1)
        return -(resp[..., None] * solved).sum(dim=1)

    def ideal_denoiser(self, x: torch.Tensor, sigma: torch.Tensor | float,
                       label: int | None = None) -> torch.Tensor:
        """The optimal denoiser E[y | x; sigma] = x + sigma^2 score(x; sigma), in x's dtype."""
        s = as_sigma(sigma, x).to(torch.float64)[:, None]
        return (x.to(torch.float64) + s.square() * self.score(x, s, label)).to(x.dtype)

    def sample(self, n: int, generator: torch.Generator | None = None, label: int | None = None) -> torch.Tensor:
        """n samples [n, 2] (float64) of the mixture of class `label` (all classes for None)."""
        return self.sample_labeled(n, generator, label)[0]

    def sample_labeled(self, n: int, generator: torch.Generator | None = None,
                       label: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """n samples [n, 2] (float64) and their class labels [n] (int64): a component by its weight, then a point
        of it."""
        if n < 0:
            raise ValueError(f"the number of samples must not be negative, got {n}")
        mix = self.restrict(label)
        k = torch.multinomial(mix.weights.to(torch.float64), n, replacement=True, generator=generator)
        chol = torch.linalg.cholesky(mix.covs.to(torch.float64))[k]  # [n, 2, 2]
        z = torch.randn(n, 2, dtype=torch.float64, generator=generator)
        return mix.means.to(torch.float64)[k] + (chol @ z[..., None])[..., 0], mix.classes[k]

    def mean(self, label: int | None = None) -> torch.Tensor:
        """The exact mean [2] of the mixture (of class `label`)."""
        mix = self.restrict(label)
        return (mix.weights[:, None] * mix.means).sum(0)

    def covariance(self, label: int | None = None) -> torch.Tensor:
        """The exact covariance [2, 2] of the mixture (of class `label`)."""
        mix = self.restrict(label)
        second = mix.covs + mix.means[:, :, None] * mix.means[:, None, :]
        m = mix.mean()
        return (mix.weights[:, None, None] * second).sum(0) - m[:, None] * m[None, :]

    def sigma_data(self) -> float:
        """The standard deviation of the whole mixture per coordinate, sqrt(trace(cov) / 2): EDM's sigma_data."""
        return float(self.covariance().trace().div(2).sqrt())


@dataclass(frozen=True)
class TreeSpec:
    """The shape of the toy tree: `depth` levels of branches (the trunk is level 0), `links` Gaussian components per
    branch, the trunk's length and half-width, what each level keeps of its parent's length and width, and the
    turn of each child (radians) away from its parent's direction."""

    depth: int = 5
    links: int = 4
    trunk_length: float = 1.0
    trunk_width: float = 0.05
    length_decay: float = 0.72
    width_decay: float = 0.62
    turn: float = 0.5
    lean: float = 0.6  # how far each class's trunk leans away from vertical (radians)
    bend: float = 0.85  # the right class bends this much as much as the left (a slightly different tree)

    def __post_init__(self) -> None:
        if self.depth < 1 or self.links < 1:
            raise ValueError(f"the tree needs depth >= 1 and links >= 1, got {self.depth} and {self.links}")
        if min(self.trunk_length, self.trunk_width, self.length_decay, self.width_decay) <= 0:
            raise ValueError("the tree's lengths, widths and decays must be positive")


def _branch(start: torch.Tensor, angle: float, length: float, width: float, links: int
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A chain of `links` Gaussians along the segment from `start` at `angle`: means [links, 2], covariances
    [links, 2, 2] (std along the segment half a link's length, across it `width`), and the segment's end."""
    direction = torch.tensor([math.cos(angle), math.sin(angle)], dtype=torch.float64)
    normal = torch.tensor([-direction[1], direction[0]], dtype=torch.float64)
    t = (torch.arange(links, dtype=torch.float64) + 0.5) / links * length
    means = start[None] + t[:, None] * direction[None]
    along = 0.5 * length / links
    rot = torch.stack([direction, normal], dim=1)  # columns: along, across
    cov = rot @ torch.diag(torch.tensor([along**2, width**2], dtype=torch.float64)) @ rot.T
    return means, cov.expand(links, 2, 2), start + length * direction


def _grow(spec: TreeSpec, angle: float, side: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One class's tree from the origin, trunk at `angle`; children turn by `turn * side` first toward the outside.
    Every level holds the same mass (a branch has half its parent's). Returns means, covariances and weights
    (summing to 1) of its components."""
    means, covs, weights = [], [], []
    stack = [(torch.zeros(2, dtype=torch.float64), angle, 0, 1.0)]  # (start, angle, level, mass)
    while stack:
        start, theta, level, mass = stack.pop()
        length = spec.trunk_length * spec.length_decay**level
        width = spec.trunk_width * spec.width_decay**level
        m, c, end = _branch(start, theta, length, width, spec.links)
        means.append(m)
        covs.append(c)
        weights.append(torch.full((spec.links,), mass / spec.links, dtype=torch.float64))
        if level + 1 < spec.depth:
            for turn in (1.0, -1.0):
                stack.append((end, theta + turn * side * spec.turn, level + 1, 0.5 * mass))
    weights = torch.cat(weights)
    return torch.cat(means), torch.cat(covs), weights / weights.sum()


def tree_mixture(spec: TreeSpec | None = None, normalize: bool = True) -> GaussianMixture:
    """The two-class tree mixture (classes equally likely). With `normalize` it is shifted to mean 0 and scaled to
    sigma_data = 0.5, the scale EDM's preconditioning is designed for."""
    spec = spec or TreeSpec()
    parts = [_grow(spec, math.pi / 2 + spec.lean, 1.0), _grow(spec, math.pi / 2 - spec.lean * spec.bend, -spec.bend)]
    means = torch.cat([p[0] for p in parts])
    covs = torch.cat([p[1] for p in parts])
    weights = torch.cat([0.5 * p[2] for p in parts])
    classes = torch.cat([torch.full((len(p[2]),), c, dtype=torch.int64) for c, p in enumerate(parts)])
    mix = GaussianMixture(means, covs, weights, classes)
    if not normalize:
        return mix
    scale = 0.5 / mix.sigma_data()
    return GaussianMixture((means - mix.mean()) * scale, covs * scale**2, weights, classes)
