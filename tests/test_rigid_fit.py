"""Tests of the rigid point fit (Kabsch/Arun) and its robust RANSAC + trimming wrapper."""

from __future__ import annotations

import math

import numpy as np
import pytest

from samv2_components.registration import RigidTransform, RobustRigidFit, fit_rigid, fit_rigid_robust


def rotation(axis, angle_deg: float) -> np.ndarray:
    """Rotation matrix about ``axis`` by ``angle_deg`` (Rodrigues)."""
    a = np.asarray(axis, dtype=np.float64)
    a = a / np.linalg.norm(a)
    k = np.array([[0.0, -a[2], a[1]], [a[2], 0.0, -a[0]], [-a[1], a[0], 0.0]])
    t = math.radians(angle_deg)
    return np.eye(3) + math.sin(t) * k + (1.0 - math.cos(t)) * k @ k


R_TRUE = rotation([1.0, -2.0, 0.5], 20.0)
T_TRUE = np.array([12.0, -7.5, 30.0])


def apply(points: np.ndarray, r=R_TRUE, t=T_TRUE) -> np.ndarray:
    return points @ r.T + t


def cloud(n: int, seed: int = 1) -> np.ndarray:
    """``n`` points spread over a body-sized box (mm)."""
    return np.random.default_rng(seed).uniform([-150, -120, -200], [150, 120, 200], size=(n, 3))


def test_exact_recovery_noiseless():
    x = cloud(30)
    fit = fit_rigid(x, apply(x))
    assert isinstance(fit, RigidTransform)
    np.testing.assert_allclose(fit.rotation, R_TRUE, atol=1e-9)
    np.testing.assert_allclose(fit.translation, T_TRUE, atol=1e-9)
    np.testing.assert_allclose(fit(x), apply(x), atol=1e-9)
    assert fit.rotation_angle_deg == pytest.approx(20.0, abs=1e-9)
    np.testing.assert_allclose(fit.matrix[3], [0, 0, 0, 1])
    inverse = fit.inverse()
    np.testing.assert_allclose(inverse(fit(x)), x, atol=1e-9)
    np.testing.assert_allclose(inverse.matrix @ fit.matrix, np.eye(4), atol=1e-12)


def test_three_points_are_enough_and_planar_points_work():
    x = cloud(3)
    np.testing.assert_allclose(fit_rigid(x, apply(x)).matrix[:3, :3], R_TRUE, atol=1e-9)
    planar = cloud(10)
    planar[:, 2] = 5.0  # all on one plane: the reflection fix keeps the answer a rotation
    fit = fit_rigid(planar, apply(planar))
    np.testing.assert_allclose(fit.rotation, R_TRUE, atol=1e-9)


def test_reflection_gives_proper_rotation():
    x = cloud(25)
    mirrored = x * np.array([-1.0, 1.0, 1.0])  # the best orthogonal matrix would be a reflection
    fit = fit_rigid(x, mirrored)
    r = fit.rotation
    assert np.linalg.det(r) == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(r.T @ r, np.eye(3), atol=1e-12)


def test_weights_suppress_a_down_weighted_outlier():
    x = cloud(20)
    y = apply(x)
    y[0] += [80.0, -60.0, 40.0]  # one gross outlier
    unweighted = fit_rigid(x, y)
    weights = np.ones(20)
    weights[0] = 1e-9
    weighted = fit_rigid(x, y, weights=weights)
    test = cloud(50, seed=7)
    assert np.abs(unweighted(test) - apply(test)).max() > 1.0
    assert np.abs(weighted(test) - apply(test)).max() < 1e-6
    with pytest.raises(ValueError):
        fit_rigid(x, y, weights=-weights)
    with pytest.raises(ValueError):
        fit_rigid(x, y, weights=np.ones(3))


def test_malformed_inputs_raise():
    with pytest.raises(ValueError):
        fit_rigid(np.zeros((4, 3)), np.zeros((5, 3)))
    with pytest.raises(ValueError):
        fit_rigid(np.zeros((4, 2)), np.zeros((4, 2)))
    bad = cloud(10)
    bad[3, 1] = np.nan
    with pytest.raises(ValueError):
        fit_rigid_robust(bad, cloud(10))
    with pytest.raises(ValueError):
        fit_rigid_robust(cloud(10), cloud(10), scores=np.ones(9))
    with pytest.raises(ValueError):
        fit_rigid_robust(cloud(10), cloud(10), min_score=0.5)  # min_score without scores
    with pytest.raises(ValueError):
        fit_rigid_robust(cloud(10), cloud(10), inlier_threshold_mm=0.0)


def _outlier_problem(n: int = 200, outlier_fraction: float = 0.4, seed: int = 3):
    rng = np.random.default_rng(seed)
    x = cloud(n, seed=seed)
    y = apply(x) + rng.normal(0.0, 1.0, size=(n, 3))
    bad = rng.random(n) < outlier_fraction
    y[bad] = rng.uniform([-200, -200, -250], [200, 200, 250], size=(int(bad.sum()), 3))  # wrong matches
    return x, y, bad


def test_ransac_recovers_transform_with_40_percent_outliers():
    x, y, bad = _outlier_problem()
    assert 0.3 < bad.mean() < 0.5
    fit = fit_rigid_robust(x, y, inlier_threshold_mm=6.0)
    assert isinstance(fit, RobustRigidFit)
    assert fit.success and fit.reason == ""
    test = cloud(100, seed=11)
    assert np.linalg.norm(fit.transform(test) - apply(test), axis=1).max() < 0.5
    assert fit.inliers.shape == (len(x),)
    assert not np.any(fit.inliers & bad)  # every gross outlier is flagged
    assert fit.inliers[~bad].mean() > 0.95
    assert fit.n_inliers == int(fit.inliers.sum())
    assert 1.0 < fit.rms_residual_mm < 3.0  # 1 mm per axis noise: ~1.7 mm 3D residual
    assert fit.median_residual_mm <= fit.rms_residual_mm
    # Plain least squares on the same data is far off.
    assert np.linalg.norm(fit_rigid(x, y)(test) - apply(test), axis=1).max() > 5.0


def test_scores_weight_and_filter():
    x, y, bad = _outlier_problem(n=120, outlier_fraction=0.3, seed=5)
    scores = np.where(bad, 0.1, 0.9)
    fit = fit_rigid_robust(x, y, scores=scores, min_score=0.5)
    assert fit.success
    assert not np.any(fit.inliers[bad])  # dropped by min_score, reported as not inliers
    test = cloud(50, seed=2)
    assert np.linalg.norm(fit.transform(test) - apply(test), axis=1).max() < 0.5
    # Everything below min_score: a readable failure, not an exception.
    failed = fit_rigid_robust(x, y, scores=scores, min_score=0.95)
    assert not failed.success
    assert "score >= 0.95" in failed.reason and "need at least" in failed.reason
    assert failed.n_inliers == 0 and not failed.inliers.any()
    np.testing.assert_allclose(failed.transform.matrix, np.eye(4))
    assert math.isnan(failed.rms_residual_mm)


def test_too_few_pairs_reports_failure():
    x = cloud(4)
    fit = fit_rigid_robust(x, apply(x), min_inliers=6)
    assert not fit.success
    assert "only 4 of 4" in fit.reason
    # Enough pairs, but too few agree with one rigid transform.
    x, y, bad = _outlier_problem(n=30, outlier_fraction=0.8, seed=9)
    fit = fit_rigid_robust(x, y, inlier_threshold_mm=5.0, min_inliers=int((~bad).sum()) + 3)
    assert not fit.success and "agree with one rigid transform" in fit.reason
    assert fit.inliers.shape == (30,)


def test_deterministic_with_seed():
    x, y, _ = _outlier_problem(n=150, outlier_fraction=0.45, seed=4)
    a = fit_rigid_robust(x, y, seed=123, ransac_iterations=50)
    b = fit_rigid_robust(x, y, seed=123, ransac_iterations=50)
    np.testing.assert_array_equal(a.transform.matrix, b.transform.matrix)
    np.testing.assert_array_equal(a.inliers, b.inliers)


def test_collinear_input_is_handled():
    t = np.linspace(-50.0, 50.0, 12)[:, None]
    x = t * np.array([[1.0, 2.0, -1.0]]) + [5.0, 6.0, 7.0]
    y = apply(x)
    fit = fit_rigid(x, y)  # rotation about the line is undetermined, but the points must map
    np.testing.assert_allclose(fit(x), y, atol=1e-9)
    assert np.linalg.det(fit.rotation) == pytest.approx(1.0)
    robust = fit_rigid_robust(x, y)  # every RANSAC sample is degenerate: no crash, a readable failure
    assert not robust.success and "one line" in robust.reason
    np.testing.assert_allclose(robust.transform(x), y, atol=1e-6)
    one = fit_rigid(x[:1], y[:1])  # a single pair: pure translation
    np.testing.assert_allclose(one.rotation, np.eye(3))
    np.testing.assert_allclose(one(x[:1]), y[:1])


def test_lo_msac_consensus_recovers_the_rigid_map_for_every_seed():
    """600 pairs of which 12 % follow a known rigid map (3 mm noise per axis), the rest anywhere (CT-MR matches of
    the light model look like this): LO-MSAC finds the same inliers for every seed and the map within 1.5 mm."""
    rng = np.random.default_rng(0)
    turn, translation = rotation([0.3, 1.0, 0.2], 25.0), np.array([10.0, -20.0, 5.0])
    x = rng.uniform(-120, 120, (600, 3))
    y = x @ turn.T + translation + rng.normal(0, 3, x.shape)
    wrong = rng.random(600) > 0.12
    y[wrong] = rng.uniform(-150, 150, (int(wrong.sum()), 3))
    fits = [fit_rigid_robust(x, y, inlier_threshold_mm=10.0, ransac_iterations=1000, min_inliers=12, seed=s,
                             consensus="lo-msac") for s in range(5)]
    for fit in fits:
        assert fit.success and np.array_equal(fit.inliers, fits[0].inliers)
        assert fit.inliers[wrong].sum() <= 3 and fit.inliers[~wrong].mean() > 0.9
        m = fit.transform.matrix
        assert np.linalg.norm(x @ m[:3, :3].T + m[:3, 3] - (x @ turn.T + translation), axis=1).mean() < 1.5
    with pytest.raises(ValueError, match="consensus"):
        fit_rigid_robust(x, y, consensus="most")
