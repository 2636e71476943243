"""The digits judge, used by the demo and `edm2 ema-sweep` on digits models.

The judge is a small neural-network classifier trained on the real 8x8 digits (scikit-learn). It
reports how often generated samples are recognised as their conditioning class, and the Frechet
distance between generated and real digits in its hidden-layer feature space (an FID-like number).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edm2.metrics.frechet import frechet_distance
from edm2.sampling import SamplerSettings

__all__ = ["DigitsJudge", "JudgeReport", "DigitsQuality", "class_samples"]


@dataclass
class JudgeReport:
    accuracy: float  # fraction of samples classified as their conditioning class
    fd: float  # Frechet distance to the held-out real digits in feature space
    num_samples: int

    def to_dict(self) -> dict:
        return {"accuracy": self.accuracy, "fd": self.fd, "num_samples": self.num_samples}


class DigitsJudge:
    """Classifier of 8x8 digits in [-1, 1], trained on 75 % of scikit-learn's digits (fixed split)."""

    def __init__(self, seed: int = 0, hidden: int = 64) -> None:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
        from sklearn.neural_network import MLPClassifier

        digits = load_digits()
        x = digits.data / 8.0 - 1.0  # 0..16 -> [-1, 1], as the diffusion model sees them
        x_train, x_test, y_train, y_test = train_test_split(x, digits.target, test_size=0.25, random_state=seed,
                                                            stratify=digits.target)
        self.clf = MLPClassifier(hidden_layer_sizes=(hidden,), alpha=1e-3, max_iter=2000, random_state=seed)
        self.clf.fit(x_train, y_train)
        self.x_test, self.y_test = x_test, y_test
        self.real_accuracy = float(self.clf.score(x_test, y_test))
        self.real_features = self.features(x_test)

    def features(self, x: np.ndarray) -> np.ndarray:
        """Hidden-layer activations of the classifier for flattened images [N, 64] in [-1, 1]."""
        return np.maximum(x @ self.clf.coefs_[0] + self.clf.intercepts_[0], 0)

    def evaluate(self, images: torch.Tensor | np.ndarray, classes: torch.Tensor | np.ndarray) -> JudgeReport:
        """Judge generated images [N, 1, 8, 8] in [-1, 1] conditioned on `classes` [N]."""
        x = np.asarray(images, dtype=np.float64).reshape(len(images), -1).clip(-1, 1)
        if x.shape[1] != 64:
            raise ValueError(f"the digits judge takes 8x8 grayscale images, got {list(np.shape(images))[1:]}")
        accuracy = float((self.clf.predict(x) == np.asarray(classes)).mean())
        return JudgeReport(accuracy, frechet_distance(self.features(x), self.real_features), len(x))


@dataclass
class DigitsQuality:
    """Sample-quality metric of an 8x8 digits snapshot, for `edm2.ema.sweep.ema_sweep`: samples `num_samples`
    digits (seed i has class i % 10, the same seeds for every snapshot) with `num_steps` Heun steps and
    returns the judge's Frechet distance `fd` (lower is better) and class `accuracy`."""

    judge: DigitsJudge
    num_samples: int = 500
    num_steps: int = 32
    device: str = "cpu"

    def __call__(self, path: Path) -> dict[str, float]:
        from edm2.files import load_network

        net, _ = load_network(path, self.device)
        if (net.img_resolution, net.img_channels, net.label_dim) != (8, 1, 10):
            raise ValueError(f"{path}: the digits metric needs an 8x8 grayscale model with 10 classes, this one is "
                             f"{net.img_resolution}x{net.img_resolution}x{net.img_channels} with {net.label_dim}")
        images, classes = class_samples(net, self.num_samples, self.num_steps, self.device)
        report = self.judge.evaluate(images, classes)
        return {"fd": report.fd, "accuracy": report.accuracy}


def class_samples(net: torch.nn.Module, num_samples: int, num_steps: int, device: str = "cpu",
                  batch: int | None = None, gnet: torch.nn.Module | None = None,
                  settings: SamplerSettings | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """(images on the CPU, classes) of seeds 0..num_samples-1, seed i of class i mod `net.label_dim`, sampled
    with `num_steps` Heun steps (or `settings`, e.g. with guidance by `gnet`) in batches of `batch` (None: one
    batch): what the judges measure."""
    from edm2.generate import sample_batch

    seeds = list(range(num_samples))
    classes = [s % net.label_dim for s in seeds]
    batch = batch or max(1, num_samples)
    settings = settings or SamplerSettings(num_steps=num_steps)
    parts = [sample_batch(net, seeds[i:i + batch], class_idx=classes[i:i + batch], gnet=gnet, settings=settings,
                          device=device)[0].cpu()
             for i in range(0, num_samples, batch)]
    return torch.cat(parts), np.array(classes)
