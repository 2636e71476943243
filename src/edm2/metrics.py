"""Sample-quality metrics: Frechet distance, and the digits judge used by the demo and the EMA sweep.

The digits judge is a small neural-network classifier trained on the real 8x8 digits (scikit-learn). It
reports how often generated samples are recognised as their conditioning class, and the Frechet
distance between generated and real digits in its hidden-layer feature space (an FID-like number).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["frechet_distance", "DigitsJudge"]


def frechet_distance(feat_a: np.ndarray, feat_b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets [N, D]:
    |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^1/2 S_b S_a^1/2)^1/2).

    Computed with symmetric eigendecompositions, so singular covariances (dead features) are fine."""
    mu_a, mu_b = feat_a.mean(0), feat_b.mean(0)
    s_a, s_b = np.atleast_2d(np.cov(feat_a, rowvar=False)), np.atleast_2d(np.cov(feat_b, rowvar=False))
    w, v = np.linalg.eigh(s_a)
    sqrt_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(sqrt_a @ s_b @ sqrt_a), 0, None)).sum()
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(s_a) + np.trace(s_b) - 2 * cross)


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
