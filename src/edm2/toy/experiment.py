"""The toy experiment end to end: train the three models into a run folder, sample every method from them, judge
the samples by their exact log-likelihood, draw the figure.

The models: the main model (conditional), an unconditional model of the same size and training (the guide of
classifier-free guidance), and the autoguidance guide: a conditional model that is smaller and trained for a
quarter of the steps. A run folder holds `main.safetensors`, `uncond.safetensors`, `guide.safetensors` and
`losses.json`; `toy plot` writes `toy.png` and `toy_results.json`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from edm2.files.base import atomic_write_text
from edm2.toy.guidance import ToySampler, mean_log_likelihood, sample_toy, toy_denoiser
from edm2.toy.mixture import GaussianMixture, TreeSpec, tree_mixture
from edm2.toy.model import (
    ToyDenoiser,
    ToyNetConfig,
    ToyTrainConfig,
    load_toy_model,
    one_thread,
    save_toy_model,
    train_toy,
)
from edm2.toy.plot import plot_toy

__all__ = ["MODEL_FILES", "METHODS", "DEFAULT_STEPS", "FAST_STEPS", "DEFAULT_GUIDANCE", "ToyModels",
           "model_recipes", "train_models", "load_models", "compare_methods", "plot_run"]

MODEL_FILES = {"main": "main.safetensors", "uncond": "uncond.safetensors", "guide": "guide.safetensors"}
METHODS = ("ground truth", "no guidance", "CFG", "autoguidance")
DEFAULT_STEPS = 6000  # of the main and the unconditional model; the guide trains for a quarter of them
FAST_STEPS = 200
FAST_BATCH = 512
DEFAULT_GUIDANCE = 2.0  # the best autoguidance weight of a sweep at the defaults (docs/toy.md)

Progress = Callable[[str, int, int, float], None]  # (model name, step, total steps, loss)


@dataclass
class ToyModels:
    """The three networks of a run and the mixture they were trained on."""

    main: ToyDenoiser
    uncond: ToyDenoiser
    guide: ToyDenoiser
    mixture: GaussianMixture
    tree: TreeSpec


def model_recipes(num_classes: int, sigma_data: float, steps: int = DEFAULT_STEPS, batch_size: int = 2048,
                  seed: int = 0) -> dict[str, tuple[ToyNetConfig, ToyTrainConfig]]:
    """(network, training) of each model: main and uncond 64 wide with 3 blocks for `steps`; the guide 32 wide
    with 2 blocks for steps // 4 (at least 1). Each model has its own seed."""
    if steps < 1:
        raise ValueError(f"--steps must be positive, got {steps}")
    big = {"hidden": 64, "blocks": 3, "sigma_data": sigma_data}
    small = {"hidden": 32, "blocks": 2, "sigma_data": sigma_data}
    return {
        "main": (ToyNetConfig(num_classes=num_classes, **big), ToyTrainConfig(steps, batch_size, seed=seed)),
        "uncond": (ToyNetConfig(num_classes=0, **big), ToyTrainConfig(steps, batch_size, seed=seed + 1)),
        "guide": (ToyNetConfig(num_classes=num_classes, **small),
                  ToyTrainConfig(max(1, steps // 4), batch_size, seed=seed + 2)),
    }


def train_models(outdir: str | Path, steps: int | None = None, fast: bool = False, seed: int = 0,
                 progress: Progress | None = None, tree: TreeSpec | None = None) -> dict:
    """Train main, uncond and guide on the tree mixture and write them and `losses.json` into `outdir`.
    `fast` trains on batches of FAST_BATCH points, for FAST_STEPS steps unless `steps` is given (a smoke test,
    not a useful model). Returns a summary: files, steps, seconds and the first and last losses of each model."""
    outdir = Path(outdir)
    tree = tree or TreeSpec()
    mixture = tree_mixture(tree)
    steps = steps if steps is not None else FAST_STEPS if fast else DEFAULT_STEPS
    recipes = model_recipes(mixture.num_classes, mixture.sigma_data(), steps, FAST_BATCH if fast else 2048, seed)
    outdir.mkdir(parents=True, exist_ok=True)
    losses, summary = {}, {"outdir": str(outdir), "models": {}}
    for name, (net_config, train_config) in recipes.items():
        t0 = time.time()
        report = None if progress is None else (lambda step, loss, name=name, total=train_config.steps:
                                                progress(name, step, total, loss))
        net, history = train_toy(mixture, net_config, train_config, report)
        seconds = time.time() - t0
        meta = {"role": name, "train": dataclasses.asdict(train_config), "tree": dataclasses.asdict(tree),
                "seconds": seconds}
        save_toy_model(outdir / MODEL_FILES[name], net, meta)
        losses[name] = history
        summary["models"][name] = {"file": MODEL_FILES[name], "steps": train_config.steps, "seconds": seconds,
                                   "loss_first": history[0], "loss_last": history[-1]}
    atomic_write_text(outdir / "losses.json", json.dumps(losses))
    return summary


def load_models(rundir: str | Path) -> ToyModels:
    """The three models of a run folder written by `train_models`, and the mixture they were trained on."""
    rundir = Path(rundir)
    if not rundir.is_dir():
        raise ValueError(f"{rundir}: no such run folder; train one with 'edm2 toy train --outdir {rundir}'")
    missing = [f for f in MODEL_FILES.values() if not (rundir / f).is_file()]
    if missing:
        raise ValueError(f"{rundir}: missing {', '.join(missing)}; train with 'edm2 toy train --outdir {rundir}'")
    nets, metas = {}, {}
    for name, file in MODEL_FILES.items():
        nets[name], metas[name] = load_toy_model(rundir / file)
    try:
        tree = TreeSpec(**metas["main"]["tree"])
    except (KeyError, TypeError) as e:
        raise ValueError(f"{rundir / MODEL_FILES['main']}: no usable tree description ({e})") from None
    if not nets["main"].conditional or not nets["guide"].conditional or nets["uncond"].conditional:
        raise ValueError(f"{rundir}: main and guide must be conditional and uncond unconditional")
    return ToyModels(nets["main"], nets["uncond"], nets["guide"], tree_mixture(tree), tree)


def compare_methods(models: ToyModels, label: int, num_samples: int, guidance: float,
                    interval: tuple[float, float] | None = None, seed: int = 0,
                    sampler: ToySampler | None = None) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Samples of class `label` by every method of METHODS (the same noise for each sampled one) and their mean
    exact log-likelihood under the true class density."""
    denoisers = {
        "no guidance": toy_denoiser(models.main, label=label),
        "CFG": toy_denoiser(models.main, models.uncond, guidance, label, interval),
        "autoguidance": toy_denoiser(models.main, models.guide, guidance, label, interval),
    }
    samples = {"ground truth": models.mixture.sample(num_samples, torch.Generator().manual_seed(seed), label)}
    for name, denoise in denoisers.items():
        samples[name] = sample_toy(denoise, num_samples, torch.Generator().manual_seed(seed + 1), sampler)
    scores = {name: mean_log_likelihood(models.mixture, x, label) for name, x in samples.items()}
    return samples, scores


def plot_run(models: ToyModels, out_png: str | Path, guidance: float = DEFAULT_GUIDANCE,
             labels: Sequence[int] | None = None, num_samples: int = 2000, seed: int = 0,
             interval: tuple[float, float] | None = None, sampler: ToySampler | None = None,
             results_json: str | Path | None = None) -> dict:
    """Sample every method for each class of `labels` (all for None), draw the figure to `out_png`, write the
    results to `results_json` (when given) and return them: the mean log-likelihood per class and method, and its
    average over the classes."""
    if num_samples < 1:
        raise ValueError(f"--samples must be positive, got {num_samples}")
    labels = list(range(models.mixture.num_classes)) if labels is None else [int(c) for c in labels]
    sampler = sampler or ToySampler()
    samples, scores = {}, {}
    for label in labels:
        models.mixture.restrict(label)  # a ValueError for a class that does not exist
        with one_thread():
            samples[label], scores[label] = compare_methods(models, label, num_samples, guidance, interval, seed,
                                                            sampler)
    titles = {"CFG": f"CFG (w={guidance:g})", "autoguidance": f"autoguidance (w={guidance:g})"}
    plot_toy(models.mixture, samples, scores, out_png, titles)
    mean = {m: sum(scores[c][m] for c in labels) / len(labels) for m in METHODS}
    results = {"guidance": guidance, "interval": None if interval is None else list(interval),
               "samples_per_class": num_samples, "seed": seed, "sampler": dataclasses.asdict(sampler),
               "mean_log_likelihood": mean, "per_class": {str(c): scores[c] for c in labels}}
    if results_json is not None:
        atomic_write_text(results_json, json.dumps(results, indent=2) + "\n")
    return results
