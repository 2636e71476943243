"""The ordering of EDM Figure 2 with the ideal denoiser of a small point set (no training, no network).

    python benchmarks/edm_figure2.py --out DIR [--nfe 9,17,33,65] [--samples 1024] [--seed 0]

EDM Figure 2 compares samplers at equal numbers of network evaluations (NFE). Here the denoiser is exact (the
ideal denoiser of a finite point set, D(x; sigma) = sum_k y_k softmax_k(-|x - y_k|^2 / 2 sigma^2); here 64
points drawn from N(0, 0.5^2) in 256 dimensions, tiny 16x16 "images"), so the only error of a sampler is its
discretization error: the distance of its samples to the converged solution of the same probability-flow ODE
from the same noise (sigma from 80 to 0.002 for every sampler; reference: Heun with the EDM time steps and
256 steps, which 512 steps change by less than 1e-17). Samplers (`edm2.sampling.ablation_sampler`):

- "VP, original": Euler, VP time steps, VP schedule and scaling (Song et al.'s probability-flow sampler);
- "VE, original": Euler, VE time steps and schedule, no scaling;
- "EDM time steps, Euler": Euler, EDM time steps, sigma(t) = t, no scaling;
- "EDM time steps, Heun": the EDM sampler (Algorithm 1), 2N - 1 evaluations for N steps.

Writes DIR/edm_figure2.json (mean distance per sampler and NFE, and whether Heun with the EDM time steps is
the closest at every NFE) and DIR/edm_figure2.png, and prints the JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from edm2.sampling import ablation_sampler

SAMPLERS = {
    "VP, original": dict(solver="euler", discretization="vp", schedule="vp", scaling="vp"),
    "VE, original": dict(solver="euler", discretization="ve", schedule="ve", scaling="none"),
    "EDM time steps, Euler": dict(solver="euler", discretization="edm", schedule="linear", scaling="none"),
    "EDM time steps, Heun": dict(solver="heun", discretization="edm", schedule="linear", scaling="none"),
}
SIGMA_RANGE = dict(sigma_min=0.002, sigma_max=80.0)
REFERENCE_STEPS = 256


def point_set_denoiser(points: torch.Tensor):
    """The ideal denoiser of the finite data set `points` [P, ...] (exact, no training)."""
    y = points.reshape(points.shape[0], -1)

    def D(x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        xf, yf = x.reshape(x.shape[0], -1), y.to(x.dtype)
        d2 = (xf**2).sum(1, keepdim=True) - 2 * xf @ yf.T + (yf**2).sum(1)  # |x - y_k|^2 for every pair
        logits = -d2 / (2 * torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1) ** 2)
        return (logits.softmax(dim=1) @ yf).reshape(x.shape)

    return D


def steps_for(nfe: int, solver: str) -> int:
    """Steps with `nfe` evaluations: Euler one per step, Heun 2N - 1."""
    return (nfe + 1) // 2 if solver == "heun" else nfe


def study(nfes: list[int], samples: int = 1024, num_points: int = 64, dim: int = 256, seed: int = 0) -> dict:
    """Mean Euclidean distance of each sampler's samples to the converged solution, per NFE."""
    gen = torch.Generator().manual_seed(seed)
    points = torch.randn(num_points, dim, generator=gen, dtype=torch.float64) * 0.5
    noise = torch.randn(samples, 1, 1, dim, generator=gen, dtype=torch.float64)
    D = point_set_denoiser(points)
    reference = ablation_sampler(D, noise, num_steps=REFERENCE_STEPS, **SIGMA_RANGE)
    errors: dict[str, list[float]] = {}
    for name, options in SAMPLERS.items():
        print(f"{name} ...", file=sys.stderr, flush=True)
        errors[name] = []
        for nfe in nfes:
            out = ablation_sampler(D, noise, num_steps=steps_for(nfe, options["solver"]), **SIGMA_RANGE, **options)
            errors[name].append(float((out - reference).flatten(1).norm(dim=1).mean()))
    heun = errors["EDM time steps, Heun"]
    closest = all(heun[k] < min(e[k] for n, e in errors.items() if n != "EDM time steps, Heun")
                  for k in range(len(nfes)))
    return {"nfe": nfes, "errors": errors, "heun_edm_closest_at_every_nfe": closest, "samples": samples,
            "points": num_points, "dim": dim, "seed": seed, "reference_steps": REFERENCE_STEPS, **SIGMA_RANGE}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from edm2.files import atomic_output

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, errs in result["errors"].items():
        ax.loglog(result["nfe"], errs, "o-", label=name)
    ax.set_xticks(result["nfe"], [str(n) for n in result["nfe"]])
    ax.minorticks_off()
    ax.set_xlabel("network evaluations (NFE)")
    ax.set_ylabel("mean distance to the converged solution")
    ax.set_title("EDM Figure 2 ordering, ideal denoiser of a point set")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for edm_figure2.json and .png")
    parser.add_argument("--nfe", default="9,17,33,65", help="comma-separated numbers of network evaluations")
    parser.add_argument("--samples", type=int, default=1024, help="noise samples (the error is their mean)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the point set and the noise")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    result = study([int(n) for n in args.nfe.split(",")], samples=args.samples, seed=args.seed)
    from edm2.files import atomic_write_text

    atomic_write_text(args.out / "edm_figure2.json", json.dumps(result, indent=2) + "\n")
    plot(result, args.out / "edm_figure2.png")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
