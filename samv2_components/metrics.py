"""Point-matching accuracy metrics (landmark / lesion-tracking style).

Every function takes predicted and ground-truth points ``(N, 3)`` in the same world coordinate system (LPS mm in
this project; any consistent system works, the per-axis errors are then along its axes) as numpy arrays, lists
or tensors, and returns plain floats / numpy arrays in millimetres (or percent for :func:`cpm`).

* MED: mean Euclidean distance; MEDx/y/z: mean absolute error per axis (:func:`per_axis_errors`);
* CPM@r: percentage of correctly predicted points, error <= r mm (paper: r = 10 mm);
* percentiles of the Euclidean error (median, 90th ...).
"""

from __future__ import annotations

import numpy as np

from samv2_components.geometry import as_points

__all__ = [
    "point_errors",
    "euclidean_errors",
    "mean_euclidean_distance",
    "per_axis_errors",
    "cpm",
    "error_percentile",
    "summarize_errors",
]



def point_errors(predicted, truth) -> np.ndarray:
    """Signed error vectors ``predicted - truth``, ``(N, 3)`` mm."""
    pred, gt = as_points(predicted, "predicted"), as_points(truth, "truth")
    if pred.shape != gt.shape:
        raise ValueError(f"predicted {pred.shape} and truth {gt.shape} differ in shape")
    if len(pred) == 0:
        raise ValueError("no points")
    return pred - gt


def euclidean_errors(predicted, truth) -> np.ndarray:
    """Euclidean error per point, ``(N,)`` mm."""
    return np.linalg.norm(point_errors(predicted, truth), axis=1)


def mean_euclidean_distance(predicted, truth) -> float:
    """MED: mean Euclidean error, mm."""
    return float(euclidean_errors(predicted, truth).mean())


def per_axis_errors(predicted, truth) -> np.ndarray:
    """Mean absolute error along each axis ``(3,)`` (MEDx, MEDy, MEDz), mm."""
    return np.abs(point_errors(predicted, truth)).mean(axis=0)


def cpm(predicted, truth, radius_mm: float = 10.0) -> float:
    """CPM@radius: percentage (0-100) of points whose Euclidean error is <= ``radius_mm``."""
    return float((euclidean_errors(predicted, truth) <= radius_mm).mean() * 100.0)


def error_percentile(predicted, truth, q: float = 90.0) -> float:
    """The ``q``-th percentile (0-100, linear interpolation as ``numpy.percentile``) of the Euclidean error, mm."""
    return float(np.percentile(euclidean_errors(predicted, truth), q))


def summarize_errors(predicted, truth, cpm_radius_mm: float = 10.0) -> dict[str, float]:
    """All of the above in one dict: ``n, med, med_x, med_y, med_z, median, p90, max, cpm`` (mm; cpm in %)."""
    dist = euclidean_errors(predicted, truth)
    axes = per_axis_errors(predicted, truth)
    return {
        "n": int(len(dist)),
        "med": float(dist.mean()),
        "med_x": float(axes[0]),
        "med_y": float(axes[1]),
        "med_z": float(axes[2]),
        "median": float(np.median(dist)),
        "p90": float(np.percentile(dist, 90.0)),
        "max": float(dist.max()),
        "cpm": float((dist <= cpm_radius_mm).mean() * 100.0),
        "cpm_radius_mm": float(cpm_radius_mm),
    }
