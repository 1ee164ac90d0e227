"""MSAC scoring and LO-RANSAC's local optimisation (``samv2_components.consensus``) on pairs with a known map."""

from __future__ import annotations

import numpy as np

from samv2_components.consensus import lo_msac, msac_cost, msac_scores


def _translated_pairs(n: int = 200, inlier_fraction: float = 0.3, seed: int = 0):
    rng = np.random.default_rng(seed)
    source = rng.uniform(-100, 100, (n, 3))
    target = source + [10.0, -20.0, 5.0] + rng.normal(0, 1.0, (n, 3))
    outliers = rng.random(n) >= inlier_fraction
    target[outliers] = rng.uniform(-100, 100, (int(outliers.sum()), 3))
    return source, target, ~outliers


def _translation(shift) -> np.ndarray:
    m = np.eye(4)
    m[:3, 3] = shift
    return m


def test_msac_cost_truncates_each_residual_at_the_threshold():
    source = np.zeros((3, 3))
    target = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 50.0]])
    cost, inliers = msac_cost(np.eye(4), source, target, threshold=5.0)
    assert cost == 1.0 + 4.0 + 25.0 and inliers.tolist() == [True, True, False]
    models = np.stack([np.eye(4), _translation([0.0, 0.0, 50.0])])
    costs, counts = msac_scores(models, source, target, 5.0)
    assert costs.tolist() == [30.0, 25.0 + 25.0 + 0.0] and counts.tolist() == [2, 1]


def test_lo_msac_refits_a_rough_hypothesis_onto_the_whole_consensus():
    """One hypothesis 8 mm off the true translation (a minimal sample's model) and one wrong: the refit (the mean
    shift of the inliers) recovers the consensus, which the rough model alone only partly holds."""
    source, target, truth = _translated_pairs()
    rough, wrong = _translation([18.0, -20.0, 5.0]), _translation([-40.0, 30.0, 0.0])

    def refit(s, t):
        return _translation((t - s).mean(0))

    _, rough_inliers = msac_cost(rough, source, target, 8.0)
    found = lo_msac(np.stack([wrong, rough]), source, target, 8.0, refit, min_pairs=1)
    assert rough_inliers.sum() < found.sum()
    assert (found != truth).sum() <= 2  # up to a stray outlier near the map
    assert not lo_msac(np.empty((0, 4, 4)), source, target, 8.0, refit, min_pairs=1).any()
    unrefined = lo_msac(np.stack([wrong, rough]), source, target, 8.0, refit, min_pairs=1, max_rounds=0)
    np.testing.assert_array_equal(unrefined, rough_inliers)
