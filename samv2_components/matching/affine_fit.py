"""Robust least-squares affine fit between two point sets (the last step of fixed-point matching).

Points are world coordinates in millimetres (any one system for both sets; LPS in this project). The fit is an
ordinary least-squares affine with a weak ridge that pulls the linear part towards the identity, so that
degenerate configurations (all points on a plane or a line, two or three points) give a translation-dominated
answer instead of an arbitrary one; outliers are rejected by iterative trimming on the residual.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from samv2_components.geometry import as_points

__all__ = ["AffineFit", "fit_affine", "fit_affine_robust"]


class AffineFit:
    """A 4x4 affine ``matrix`` (homogeneous, column vectors: ``y = matrix[:3, :3] @ x + matrix[:3, 3]``)."""

    def __init__(self, matrix: np.ndarray):
        self.matrix = np.asarray(matrix, dtype=np.float64)

    def __call__(self, points) -> np.ndarray:
        """Map points ``(N, 3)`` (mm) -> ``(N, 3)`` (mm)."""
        pts = as_points(points)
        return pts @ self.matrix[:3, :3].T + self.matrix[:3, 3]


class RobustAffineFit(NamedTuple):
    """Result of :func:`fit_affine_robust`.

    Attributes:
        transform: the fitted :class:`AffineFit` (source -> target).
        inliers: ``(N,)`` bool, the points the final fit used.
        rms_residual_mm: root-mean-square residual of the inliers, mm.
    """

    transform: AffineFit
    inliers: np.ndarray
    rms_residual_mm: float


def fit_affine(source, target, ridge: float = 1e-2) -> AffineFit:
    """Least-squares affine ``source -> target`` with a ridge on ``linear part - identity``.

    Minimises ``sum_i |M (x_i - x_mean) - (y_i - y_mean)|^2 + lam * |M - I|_F^2`` with
    ``lam = ridge * trace(Xc^T Xc)`` (scale-free), then sets the translation so the centroids map exactly:
    ``M = (Yc^T Xc + lam I) (Xc^T Xc + lam I)^-1``.

    Args:
        source, target: ``(N, 3)`` corresponding points, mm, ``N >= 1``.
        ridge: relative weight of the identity prior; 0 gives plain least squares (needs 4 non-coplanar points).
    """
    x, y = as_points(source, "source"), as_points(target, "target")
    if x.shape != y.shape or len(x) == 0:
        raise ValueError(f"source {x.shape} and target {y.shape} must be equal, non-empty (N, 3) arrays")
    x_mean, y_mean = x.mean(axis=0), y.mean(axis=0)
    xc, yc = x - x_mean, y - y_mean
    scatter = xc.T @ xc
    lam = float(ridge) * float(np.trace(scatter))
    if lam <= 0.0 and np.linalg.matrix_rank(scatter) < 3:
        lam = 1e-9  # no spread at all: pure translation
    eye = np.eye(3)
    linear = np.linalg.solve((scatter + lam * eye).T, (yc.T @ xc + lam * eye).T).T
    matrix = np.eye(4)
    matrix[:3, :3] = linear
    matrix[:3, 3] = y_mean - linear @ x_mean
    return AffineFit(matrix)


def fit_affine_robust(
    source,
    target,
    inlier_threshold_mm: float = 4.0,
    max_rounds: int = 5,
    min_points: int = 4,
    ridge: float = 1e-2,
) -> RobustAffineFit:
    """Affine fit with outlier rejection by iterative trimming.

    Each round fits :func:`fit_affine` to the current inliers, then keeps the points whose residual is at most
    ``max(inlier_threshold_mm, 2.5 * 1.4826 * MAD)`` (MAD: median absolute residual of the current inliers, so the
    threshold adapts when the whole set is noisier than ``inlier_threshold_mm``). It stops when the inlier set is
    stable, after ``max_rounds``, or when trimming would leave fewer than ``min_points`` (the previous fit is kept).

    Args:
        source, target: ``(N, 3)`` corresponding points, mm.
        inlier_threshold_mm: residual always accepted, mm.
        max_rounds: trimming rounds at most.
        min_points: never trim below this many points.
        ridge: see :func:`fit_affine`.
    """
    x, y = as_points(source, "source"), as_points(target, "target")
    inliers = np.ones(len(x), dtype=bool)
    fit = fit_affine(x, y, ridge)
    for _ in range(int(max_rounds)):
        residual = np.linalg.norm(fit(x) - y, axis=1)
        mad = float(np.median(residual[inliers]))
        keep = residual <= max(float(inlier_threshold_mm), 2.5 * 1.4826 * mad)
        if keep.sum() < min_points or np.array_equal(keep, inliers):
            break
        inliers = keep
        fit = fit_affine(x[inliers], y[inliers], ridge)
    residual = np.linalg.norm(fit(x[inliers]) - y[inliers], axis=1)
    return RobustAffineFit(fit, inliers, float(np.sqrt(np.mean(residual**2))))
