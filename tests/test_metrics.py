"""Frechet distance against closed forms and scipy; the digits judge on real and fake digits."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import linalg

from edm2.metrics import DigitsJudge, frechet_distance


def test_frechet_distance_matches_scipy_formula() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(600, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(size=(500, 6)) * 1.5 + 0.4
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(s_a + s_b - 2 * linalg.sqrtm(s_a @ s_b).real)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_of_shifted_isotropic_gaussians() -> None:
    # Same covariance: the distance is |mu_a - mu_b|^2 (sample estimates, so a loose tolerance).
    rng = np.random.default_rng(1)
    shift = np.array([1.0, -2.0, 0.5])
    a = rng.normal(size=(200_000, 3))
    b = rng.normal(size=(200_000, 3)) + shift
    assert frechet_distance(a, b) == pytest.approx(np.sum(shift**2), rel=0.01)
    assert abs(frechet_distance(a, a)) < 1e-9


def test_frechet_distance_handles_singular_covariance() -> None:
    rng = np.random.default_rng(2)
    a = np.concatenate([rng.normal(size=(300, 4)), np.zeros((300, 2))], axis=1)  # two dead features
    value = frechet_distance(a, a + 0.1)
    assert np.isfinite(value) and value == pytest.approx(6 * 0.01, abs=1e-9)


@pytest.fixture(scope="module")
def judge() -> DigitsJudge:
    return DigitsJudge()


def test_judge_recognises_real_digits(judge: DigitsJudge) -> None:
    assert judge.real_accuracy >= 0.95  # the demo's bar for the classifier itself
    report = judge.evaluate(judge.x_test.reshape(-1, 1, 8, 8), judge.y_test)
    assert report.accuracy == pytest.approx(judge.real_accuracy)
    assert abs(report.fd) < 1e-6  # identical sets


def test_judge_rejects_noise_and_wrong_labels(judge: DigitsJudge) -> None:
    rng = np.random.default_rng(3)
    noise = rng.uniform(-1, 1, size=(300, 1, 8, 8))
    real = judge.x_test.reshape(-1, 1, 8, 8)
    assert judge.evaluate(noise, rng.integers(0, 10, 300)).fd > 10 * judge.evaluate(real[:200], judge.y_test[:200]).fd
    wrong = (judge.y_test + 1) % 10
    assert judge.evaluate(real, wrong).accuracy < 0.05
    with pytest.raises(ValueError, match="8x8"):
        judge.evaluate(np.zeros((2, 1, 16, 16)), np.zeros(2))
