"""Statistics behind the metrics: the Frechet distance against closed forms and the official formula, feature
statistics against numpy, precision/recall against a brute-force count, reference files in every layout, the
seeds of repeated evaluations, and results that do not depend on the batch size."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import scipy.linalg
import torch
from detector_weights import write_small_dinov2
from PIL import Image

from edm2.metrics.detectors import load_detector
from edm2.metrics.frechet import frechet_distance, frechet_distance_from_stats
from edm2.metrics.measure import measure_images, seed_repeats
from edm2.metrics.precision_recall import precision_recall
from edm2.metrics.stats import FeatureStats, MetricStats, load_reference, save_reference


def random_cov(rng: np.random.Generator, d: int, rank: int | None = None) -> np.ndarray:
    a = rng.standard_normal((d, rank or d))
    return a @ a.T / (rank or d)


def test_fd_of_identical_statistics_is_zero():
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((500, 32)) * rng.uniform(0.1, 3, 32) + 5
    assert frechet_distance(feats, feats) == pytest.approx(0, abs=1e-9)
    mu, sigma = rng.standard_normal(64), random_cov(rng, 64, rank=10)  # singular
    assert frechet_distance_from_stats(mu, sigma, mu, sigma) == pytest.approx(0, abs=1e-9)


def test_fd_between_gaussians_matches_the_closed_form():
    """Covariances diagonal in one basis: FD = |mu_a - mu_b|^2 + sum (sqrt(a_i) - sqrt(b_i))^2."""
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.standard_normal((20, 20)))
    a, b = rng.uniform(0, 4, 20), rng.uniform(0, 4, 20)
    a[:5] = 0  # singular: dead features
    mu_a, mu_b = rng.standard_normal(20), rng.standard_normal(20)
    expected = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    fd = frechet_distance_from_stats(mu_a, q @ np.diag(a) @ q.T, mu_b, q @ np.diag(b) @ q.T)
    assert fd == pytest.approx(expected, rel=1e-7)  # sqrt near the zero eigenvalues: sqrt(eps)-level rounding


def test_fd_equals_the_official_sqrtm_formula_for_general_covariances():
    rng = np.random.default_rng(2)
    mu_a, mu_b = rng.standard_normal(48), rng.standard_normal(48)
    s_a, s_b = random_cov(rng, 48), random_cov(rng, 48)
    s = scipy.linalg.sqrtm(s_a @ s_b)
    official = float(np.real(np.sum((mu_a - mu_b) ** 2) + np.trace(s_a + s_b - 2 * s)))
    assert frechet_distance_from_stats(mu_a, s_a, mu_b, s_b) == pytest.approx(official, rel=1e-9)


def test_feature_stats_equal_numpy_mean_and_covariance():
    rng = np.random.default_rng(3)
    feats = (rng.standard_normal((300, 16)) * 2 + 7).astype(np.float32)
    stats = FeatureStats(16, keep=10)
    for start in range(0, 300, 37):
        stats.update(torch.from_numpy(feats[start:start + 37]), list(range(start, min(start + 37, 300))))
    res = stats.result()
    np.testing.assert_allclose(res.mu, feats.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(res.sigma, np.cov(feats.astype(np.float64), rowvar=False), rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(res.features, feats[:10])
    with pytest.raises(ValueError, match="at least 2"):
        FeatureStats(4).result()


def _brute_force_pr(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    def radii(x):
        return np.array([np.sort([np.linalg.norm(p - o) for o in x])[k] for p in x])

    def inside(manifold, r, queries):
        return np.mean([any(np.linalg.norm(q - m) <= rr for m, rr in zip(manifold, r)) for q in queries])

    return inside(real, radii(real), fake), inside(fake, radii(fake), real)


def test_precision_recall_against_a_brute_force_count():
    rng = np.random.default_rng(4)
    real = rng.standard_normal((60, 5))
    fake = rng.standard_normal((50, 5)) * 1.5 + 0.7
    expected = _brute_force_pr(real, fake, 3)
    assert precision_recall(real, fake, k=3) == pytest.approx(expected, abs=1e-12)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1
    assert precision_recall(real, real) == (1.0, 1.0)
    assert precision_recall(real, real + 100) == (0.0, 0.0)


def test_reference_files_round_trip_in_every_layout(tmp_path):
    rng = np.random.default_rng(5)
    stats = {m: MetricStats(rng.standard_normal(d), random_cov(rng, d), 10, rng.standard_normal((4, d)))
             for m, d in (("fid", 6), ("fd_dinov2", 4))}
    save_reference(tmp_path / "ours.npz", stats, (32, 32))
    ref = load_reference(tmp_path / "ours.npz")
    assert ref.resolution == (32, 32) and ref.num_images == 10 and set(ref.stats) == {"fid", "fd_dinov2"}
    for m, s in stats.items():
        np.testing.assert_array_equal(ref.stats[m].sigma, s.sigma)
        np.testing.assert_array_equal(ref.stats[m].features, s.features.astype(np.float32))
    # The official EDM2 layout, written by plain pickle as the official script does; read with numpy arrays only.
    official = {"num_images": 10, **{m: {"mu": s.mu, "sigma": s.sigma} for m, s in stats.items()}}
    (tmp_path / "official.pkl").write_bytes(pickle.dumps(official))
    ref = load_reference(tmp_path / "official.pkl")
    assert ref.resolution is None and ref.num_images == 10
    np.testing.assert_array_equal(ref.stats["fd_dinov2"].mu, stats["fd_dinov2"].mu)
    save_reference(tmp_path / "ours.pkl", stats, (32, 32))  # our writer of the official layout
    assert set(load_reference(tmp_path / "ours.pkl").stats) == {"fid", "fd_dinov2"}
    # EDM's fid-refs: mu and sigma of FID.
    np.savez(tmp_path / "edm.npz", mu=stats["fid"].mu, sigma=stats["fid"].sigma)
    assert set(load_reference(tmp_path / "edm.npz").stats) == {"fid"}


def test_reference_files_that_are_not_statistics_are_refused(tmp_path):
    (tmp_path / "code.pkl").write_bytes(pickle.dumps({"fid": {"mu": torch.zeros(2)}}))
    with pytest.raises(ValueError, match="refused.*torch"):
        load_reference(tmp_path / "code.pkl")
    (tmp_path / "cut.pkl").write_bytes(pickle.dumps({"fid": {"mu": np.zeros(3), "sigma": np.eye(3)}})[:40])
    with pytest.raises(ValueError, match="not a readable"):
        load_reference(tmp_path / "cut.pkl")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="not reference statistics"):
        load_reference(tmp_path / "other.npz")
    np.savez(tmp_path / "shape.npz", mu=np.zeros(3), sigma=np.zeros((2, 2)))
    with pytest.raises(ValueError, match="not a mean and its covariance"):
        load_reference(tmp_path / "shape.npz")


def test_seed_repeats_are_disjoint_ranges():
    assert seed_repeats(range(0, 5), 3) == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11, 12, 13, 14]]
    assert seed_repeats([3, 7], 2, stride=100) == [[3, 7], [103, 107]]
    with pytest.raises(ValueError, match="repeat 1 overlap"):
        seed_repeats(range(10), 2, stride=5)
    with pytest.raises(ValueError, match="twice"):
        seed_repeats([1, 2, 1], 1)


def test_statistics_do_not_depend_on_the_batch_size(tmp_path):
    rng = np.random.default_rng(6)
    for i in range(7):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    write_small_dinov2(tmp_path / "det")
    det = {"fd_dinov2": load_detector("fd_dinov2", tmp_path / "det")}
    a, res = measure_images(tmp_path, det, batch_size=7, keep=7, num_workers=0)
    b, _ = measure_images(tmp_path, det, batch_size=3, keep=7, num_workers=2)
    assert res == (24, 24) and a["fd_dinov2"].num_images == 7
    np.testing.assert_allclose(a["fd_dinov2"].mu, b["fd_dinov2"].mu, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(a["fd_dinov2"].sigma, b["fd_dinov2"].sigma, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(a["fd_dinov2"].features, b["fd_dinov2"].features, rtol=1e-5, atol=1e-6)
    s = a["fd_dinov2"]
    assert frechet_distance_from_stats(s.mu, s.sigma, b["fd_dinov2"].mu, b["fd_dinov2"].sigma) < 1e-9
