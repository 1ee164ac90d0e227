"""Robust consensus of transform hypotheses: MSAC scoring and the local optimisation of LO-RANSAC.

Both RANSACs of the package rank their hypotheses here: the matching bundle's global map (affines of 4 pairs,
:func:`samv2_components.matching.global_map.ransac_consensus`) and AdaReg's rigid fit (rigid transforms of 3
pairs, :func:`samv2_components.registration.rigid.fit_rigid_robust`). Each RANSAC draws and fits its own minimal
samples; what they share is how a hypothesis is judged and improved:

* **MSAC cost** (Torr and Zisserman 2000): the squared residuals truncated at the inlier threshold, summed, so an
  inlier counts by how well it fits and an outlier a constant. Ranking by inlier count alone leaves near-ties between
  two consensus sets to the order of the samples (and so to the random seed).
* **Local optimisation** (LO-RANSAC, Chum, Matas and Kittler 2003): the best few hypotheses are refitted on their
  inliers (by the caller's least-squares fit) while the cost falls. A minimal sample only lands near its consensus;
  refitted on the whole consensus, samples of one consensus end at one model and one cost.

A model is a ``(3, 4)`` or ``(4, 4)`` matrix mapping source to target points, ``y = M[:3, :3] @ x + M[:3, 3]``;
points are ``(N, 3)`` in one frame (mm).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = ["msac_cost", "msac_scores", "lo_msac"]

#: hypotheses scored at once (bounds the (block, N, 3) residual array: 6 MB against 1,000 pairs)
_BLOCK = 256


def _residuals(matrix: np.ndarray, source: np.ndarray, target: np.ndarray) -> np.ndarray:
    return np.linalg.norm(source @ matrix[:3, :3].T + matrix[:3, 3] - target, axis=1)


def msac_cost(matrix: np.ndarray, source: np.ndarray, target: np.ndarray, threshold: float) -> tuple[float, np.ndarray]:
    """MSAC cost of one model and its inliers: ``(cost, (N,) bool)``, inliers within ``threshold`` (inclusive)."""
    residual = _residuals(matrix, source, target)
    return float((np.minimum(residual, threshold) ** 2).sum()), residual <= threshold


def msac_scores(models: np.ndarray, source: np.ndarray, target: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """MSAC costs ``(K,)`` and inlier counts ``(K,)`` of ``models`` ``(K, 3 or 4, 4)``, scored a block at a time."""
    cost, count = np.empty(len(models)), np.empty(len(models), dtype=np.int64)
    for first in range(0, len(models), _BLOCK):
        block = models[first : first + _BLOCK]
        residual = np.linalg.norm(source @ block[:, :3, :3].transpose(0, 2, 1) + block[:, None, :3, 3] - target, axis=2)
        cost[first : first + _BLOCK] = (np.minimum(residual, threshold) ** 2).sum(1)
        count[first : first + _BLOCK] = (residual <= threshold).sum(1)
    return cost, count


def lo_msac(
    models: np.ndarray,
    source: np.ndarray,
    target: np.ndarray,
    threshold: float,
    refit: Callable[[np.ndarray, np.ndarray], np.ndarray],
    min_pairs: int,
    local_starts: int = 8,
    max_rounds: int | None = None,
) -> np.ndarray:
    """The inliers ``(N,)`` bool of the best consensus among ``models`` ``(K, 3 or 4, 4)`` by LO-MSAC.

    The ``local_starts`` models of lowest MSAC cost are each refitted on their inliers (``refit(source_inliers,
    target_inliers)`` -> ``(4, 4)``, the caller's least-squares fit, its own constraints applied) while the cost
    falls, at most ``max_rounds`` times (None: until it stops falling) and while at least ``min_pairs`` pairs are
    inliers; the lowest cost reached wins (the first of equal ones). All ``False`` without models.
    """
    best_cost, best = np.inf, np.zeros(len(source), dtype=bool)
    if not len(models):
        return best
    costs, _ = msac_scores(models, source, target, threshold)
    for index in np.argsort(costs, kind="stable")[: max(1, int(local_starts))]:
        cost, inliers = msac_cost(models[index], source, target, threshold)
        rounds = 0
        while inliers.sum() >= min_pairs and (max_rounds is None or rounds < max_rounds):
            new_cost, new_inliers = msac_cost(refit(source[inliers], target[inliers]), source, target, threshold)
            rounds += 1
            if new_cost >= cost:
                break
            cost, inliers = new_cost, new_inliers
        if cost < best_cost:
            best_cost, best = cost, inliers
    return best
