"""Point-matching accuracy metrics (landmark / lesion-tracking style).

Every array function takes predicted and ground-truth points ``(N, 3)`` in the same world coordinate system (LPS
mm in this project; any consistent system works, the per-axis errors are then along its axes) as numpy arrays,
lists or tensors, and returns plain floats / numpy arrays in millimetres (or percent for the CPM values).
:func:`evaluate_point_sets` takes named :class:`~samv2_components.io.points.PointSet` objects instead: it pairs
points by name and brings both sets into the truth's coordinate system itself.

* MED: mean Euclidean distance; MEDx/y/z: mean absolute error per axis (:func:`per_axis_errors`);
* std: population standard deviation (``ddof=0``) of the Euclidean error;
* CPM@r: percentage of correctly predicted points, error <= r mm (SAMv2 paper: r = 10 mm);
* CPM@Radius: percentage of points whose error is <= that point's own lesion radius (DLS lesion-tracking
  papers; :func:`cpm_at_radius`);
* percentiles of the Euclidean error (median, 90th ...).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from samv2_components.errors import SAMv2InputError
from samv2_components.geometry import as_points
from samv2_components.io.points import PointSet

__all__ = [
    "point_errors",
    "euclidean_errors",
    "mean_euclidean_distance",
    "per_axis_errors",
    "cpm",
    "cpm_at_radius",
    "error_percentile",
    "landmark_summary",
    "summarize_errors",
    "evaluate_point_sets",
    "format_metrics_table",
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


def _checked_radii(radii_mm, n: int) -> np.ndarray:
    """Return per-point radii as a float64 ``(n,)`` array of positive finite mm, or raise ``ValueError``."""
    radii = np.asarray(radii_mm, dtype=np.float64)
    if radii.shape != (n,):
        raise ValueError(f"radii_mm must have shape ({n},), one radius per point, got {radii.shape}")
    bad = ~(np.isfinite(radii) & (radii > 0))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"radii_mm must be positive finite mm; point {i + 1} has radius {radii[i]!r}")
    return radii


def cpm_at_radius(predicted, truth, radii_mm) -> float:
    """CPM@Radius: percentage (0-100) of points whose Euclidean error is <= that point's own radius.

    Args:
        predicted, truth: ``(N, 3)`` points, mm, in the same coordinate system.
        radii_mm: ``(N,)`` per-point radius in mm (e.g. the lesion radius), positive and finite.

    Raises:
        ValueError: shapes differ, no points, or a radius is not positive and finite.
    """
    dist = euclidean_errors(predicted, truth)
    return float((dist <= _checked_radii(radii_mm, len(dist))).mean() * 100.0)


def error_percentile(predicted, truth, q: float = 90.0) -> float:
    """The ``q``-th percentile (0-100, linear interpolation as ``numpy.percentile``) of the Euclidean error, mm."""
    return float(np.percentile(euclidean_errors(predicted, truth), q))


def landmark_summary(predicted, truth) -> dict[str, float]:
    """Landmark-error summary of the Euclidean error: ``n, mean, std, median, max`` (mm).

    ``std`` is the population standard deviation (``ddof=0``), as ``numpy.std`` computes by default.
    ``predicted`` and ``truth`` are ``(N, 3)`` points in mm in the same coordinate system.
    """
    dist = euclidean_errors(predicted, truth)
    return {
        "n": int(len(dist)),
        "mean": float(dist.mean()),
        "std": float(dist.std(ddof=0)),
        "median": float(np.median(dist)),
        "max": float(dist.max()),
    }


def summarize_errors(predicted, truth, cpm_radius_mm: float = 10.0, radii_mm=None) -> dict[str, float]:
    """All of the above in one dict (mm; CPM values in %).

    Keys: ``n, med, std, med_x, med_y, med_z, median, p90, max, cpm, cpm_radius_mm``, where ``std`` is the
    population standard deviation (``ddof=0``) of the Euclidean error, ``cpm`` is CPM@``cpm_radius_mm`` and
    ``cpm_radius_mm`` echoes that radius. When ``radii_mm`` (``(N,)`` per-point radii, mm) is given, the key
    ``cpm_radius`` (CPM@Radius, see :func:`cpm_at_radius`) is added.
    """
    dist = euclidean_errors(predicted, truth)
    axes = per_axis_errors(predicted, truth)
    summary = {
        "n": int(len(dist)),
        "med": float(dist.mean()),
        "std": float(dist.std(ddof=0)),
        "med_x": float(axes[0]),
        "med_y": float(axes[1]),
        "med_z": float(axes[2]),
        "median": float(np.median(dist)),
        "p90": float(np.percentile(dist, 90.0)),
        "max": float(dist.max()),
        "cpm": float((dist <= cpm_radius_mm).mean() * 100.0),
        "cpm_radius_mm": float(cpm_radius_mm),
    }
    if radii_mm is not None:
        summary["cpm_radius"] = float((dist <= _checked_radii(radii_mm, len(dist))).mean() * 100.0)
    return summary


def _radii_in_order(radii_mm, names: list[str]):
    """Per-point radii in ``names`` order from a ``{name: radius}`` mapping or a sequence already in that order."""
    if radii_mm is None or not isinstance(radii_mm, Mapping):
        return radii_mm
    missing = [name for name in names if name not in radii_mm]
    if missing:
        raise SAMv2InputError(None, f"no radius for truth point(s): {', '.join(missing)}")
    return [radii_mm[name] for name in names]


def evaluate_point_sets(
    predicted: PointSet, truth: PointSet, radii_mm=None, cpm_radius_mm: float = 10.0
) -> dict[str, float | str]:
    """Match predicted to ground-truth points **by name** and summarise the errors (:func:`summarize_errors`).

    Args:
        predicted: the predicted points (any order, either coordinate system). Names that are not in ``truth``
            are ignored.
        truth: the ground-truth points; every one of its names needs a prediction. The errors (and MEDx/y/z,
            which are along the axes of this system) are computed in ``truth.coordinate_system``: ``predicted``
            is converted to it with :meth:`PointSet.to`.
        radii_mm: optional per-point radii in mm for CPM@Radius: a ``{name: radius}`` mapping covering every
            truth name, or a sequence of ``len(truth)`` radii in ``truth.names`` order.
        cpm_radius_mm: the fixed radius of the ``cpm`` value, mm.

    Returns:
        the :func:`summarize_errors` dict (over ``len(truth)`` points) plus ``"coordinate_system"`` (the truth's).

    Raises:
        SAMv2InputError: a truth name has no prediction (all such names are listed) or a radius is missing.
        ValueError: ``radii_mm`` has the wrong length or a radius that is not positive and finite.
    """
    for value, label in ((predicted, "predicted"), (truth, "truth")):
        if not isinstance(value, PointSet):
            raise TypeError(f"{label} must be a PointSet, got {type(value).__name__}")
    missing = [name for name in truth.names if name not in set(predicted.names)]
    if missing:
        raise SAMv2InputError(None, f"no prediction for {len(missing)} truth point(s): {', '.join(missing)}")
    pred = predicted.to(truth.coordinate_system)
    index = {name: i for i, name in enumerate(pred.names)}
    aligned = pred.coords[[index[name] for name in truth.names]]
    summary = summarize_errors(aligned, truth.coords, cpm_radius_mm, _radii_in_order(radii_mm, truth.names))
    return {**summary, "coordinate_system": truth.coordinate_system}


# (header, unit, key or None for the mean±std cell)
_TABLE_COLUMNS = (
    ("MED", "mm", "med"),
    ("MEDx", "mm", "med_x"),
    ("MEDy", "mm", "med_y"),
    ("MEDz", "mm", "med_z"),
    ("mean±std", "mm", None),
    ("median", "mm", "median"),
    ("p90", "mm", "p90"),
    ("max", "mm", "max"),
)


def _cell(row: Mapping, key: str) -> str:
    value = row.get(key)
    return "-" if value is None else f"{float(value):.2f}"


def format_metrics_table(rows: Mapping[str, Mapping]) -> str:
    """Format :func:`summarize_errors` / :func:`evaluate_point_sets` dicts as a fixed-width text table.

    Args:
        rows: ``{method or case name: metrics dict}``, one table row each, in the given order.

    Returns:
        the table (no trailing newline): a header line, a units line (distances in mm, CPM in %) and one line
        per row with columns ``n, MED, MEDx, MEDy, MEDz, mean±std, median, p90, max, CPM@<r>`` and, when any row
        has ``cpm_radius``, ``CPM@r`` (CPM@Radius). Numbers have 2 decimals; a value a row lacks shows as ``-``.
        ``mean±std`` is MED with the population (``ddof=0``) standard deviation. The CPM header shows the rows'
        ``cpm_radius_mm`` (10 when absent); when rows use different radii it reads ``CPM@fixed`` and a last line
        lists each row's radius.
    """
    if not rows:
        raise ValueError("no rows to format")
    radii = [float(row.get("cpm_radius_mm", 10.0)) for row in rows.values()]
    cpm_header = f"CPM@{radii[0]:g}" if len(set(radii)) == 1 else "CPM@fixed"
    with_radius = any(row.get("cpm_radius") is not None for row in rows.values())
    header = ["name", "n", *(c[0] for c in _TABLE_COLUMNS), cpm_header] + (["CPM@r"] if with_radius else [])
    units = ["", "", *(c[1] for c in _TABLE_COLUMNS), "%"] + (["%"] if with_radius else [])
    lines = [header, units]
    for name, row in rows.items():
        cells = [str(name), "-" if row.get("n") is None else str(int(row["n"]))]
        for _, _, key in _TABLE_COLUMNS:
            if key is None:
                mean, std = row.get("med", row.get("mean")), row.get("std")
                cells.append("-" if mean is None or std is None else f"{float(mean):.2f}±{float(std):.2f}")
            else:
                cells.append(_cell(row, key))
        cells.append(_cell(row, "cpm"))
        if with_radius:
            cells.append(_cell(row, "cpm_radius"))
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = [
        "  ".join([line[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(line[1:], widths[1:]))]).rstrip()
        for line in lines
    ]
    if len(set(radii)) > 1:
        text.append("CPM@fixed radius (mm): " + ", ".join(f"{n}={r:g}" for n, r in zip(rows, radii)))
    return "\n".join(text)
