"""Evaluate matched points against ground truth: MED, MEDx/y/z, mean±std, median, p90, max, CPM@r, CPM@Radius.

::

    python scripts/evaluate_matches.py --predicted matched.csv --truth pairs.csv [--cpm_radius_mm 10] \\
        [--output metrics.json]

* ``--predicted``: the predicted query points, any file :func:`samv2_components.io.points.read_points` reads
  (``.csv``, ``.json``, Slicer ``.mrk.json``), in LPS or RAS as the file states.
* ``--truth``: either a ground-truth pairs CSV (:mod:`samv2_components.io.point_pairs`; its *query* columns
  are the truth and its ``radius_mm`` column, when present, gives CPM@Radius), or any points file
  ``read_points`` reads (then there is no CPM@Radius). A ``.csv`` whose header has ``template_x`` or
  ``query_x`` columns is read as a pairs file.

Points are paired by name (:func:`samv2_components.metrics.evaluate_point_sets`); every truth name needs a
prediction, extra predictions are ignored. Errors are in mm, in the truth's coordinate system (MEDx/y/z along
its axes); std is the population standard deviation (ddof=0); CPM values are in %.

Prints the table (:func:`samv2_components.metrics.format_metrics_table`, one row named after the predicted
file) and, with ``--output``, writes the metrics as JSON (atomically): the
:func:`~samv2_components.metrics.evaluate_point_sets` keys plus ``predicted`` and ``truth`` (the paths).

Exit status 0 on success; 1 with one ``ERROR: <file>: <problem>`` line on stderr when an input file is missing
or malformed, a truth point has no prediction, or the output cannot be written.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

try:
    import samv2_components  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fire

from samv2_components.errors import SAMv2Error, SAMv2InputError
from samv2_components.io.point_pairs import is_point_pairs_file, read_point_pairs
from samv2_components.io.points import _atomic_write, read_points
from samv2_components.metrics import evaluate_point_sets, format_metrics_table


def read_truth(path: str):
    """Return ``(truth PointSet, radii_mm or None)`` from a pairs CSV (query columns) or any points file."""
    if is_point_pairs_file(path):
        pairs = read_point_pairs(path)
        return pairs.query, pairs.radii_mm
    return read_points(path), None


def evaluate(predicted: str, truth: str, cpm_radius_mm: float = 10.0) -> dict:
    """Metrics of the ``predicted`` points file against the ``truth`` file (see the module docstring)."""
    try:
        radius = float(cpm_radius_mm)
    except (TypeError, ValueError):
        radius = math.nan
    if not (math.isfinite(radius) and radius > 0):
        raise SAMv2InputError("--cpm_radius_mm", f"must be a positive number of mm, got {cpm_radius_mm!r}")
    truth_points, radii = read_truth(truth)
    predicted_points = read_points(predicted)
    try:
        metrics = evaluate_point_sets(predicted_points, truth_points, radii, radius)
    except SAMv2InputError as e:  # a truth name without prediction: the predicted file is at fault
        raise SAMv2InputError(predicted, e.problem) from None
    return {**metrics, "predicted": os.fspath(predicted), "truth": os.fspath(truth)}


def write_metrics(metrics: dict, output: str) -> None:
    """Write ``metrics`` as JSON to ``output`` atomically; an OS error becomes a :class:`SAMv2InputError`."""
    try:
        _atomic_write(Path(output), lambda f: f.write(json.dumps(metrics, indent=2, allow_nan=False) + "\n"))
    except OSError as e:
        raise SAMv2InputError(output, f"cannot write metrics ({e.strerror or e})") from None


def main(predicted: str, truth: str, cpm_radius_mm: float = 10.0, output: str | None = None) -> None:
    """Evaluate ``predicted`` against ``truth``, print the metrics table and optionally write ``output`` JSON.

    Args:
        predicted: predicted points file (``.csv``, ``.json`` or ``.mrk.json``).
        truth: ground-truth pairs ``.csv`` or points file.
        cpm_radius_mm: the fixed CPM radius, mm (SAMv2 paper: 10).
        output: optional metrics ``.json`` to write.
    """
    try:
        metrics = evaluate(predicted, truth, cpm_radius_mm)
        print(format_metrics_table({Path(predicted).name: metrics}))
        print(f"(errors in mm in {metrics['coordinate_system']}, std with ddof=0, CPM in %)")
        if output is not None:
            write_metrics(metrics, output)
            print(f"wrote {output}")
    except SAMv2Error as error:
        sys.stderr.write(f"ERROR: {error}\n")
        sys.stderr.flush()
        sys.exit(1)


if __name__ == "__main__":
    fire.Fire(main)
