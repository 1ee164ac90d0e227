"""Accuracy of a matching run against ground-truth pairs (the ``samv2_matching`` bundle's ``evaluate.json``).

Reads what :class:`~samv2_components.matching.workflow.MatchPointsd` wrote for the query of a pairs file
(``matches.json``: the matcher's answers and, per point, the plain nearest-neighbour answer) and reports the
lesion-tracking metrics of the SAMv2 paper (CPM@10 mm, CPM@radius, MED, MEDx/y/z) and landmark metrics
(mean ± std, median, max) for both, by point name, in the pairs file's coordinate system.
"""

from __future__ import annotations

import json
import os

from samv2_components.errors import SAMv2InputError
from samv2_components.io.embeddings import case_name
from samv2_components.io.point_pairs import read_point_pairs
from samv2_components.io.points import PointSet
from samv2_components.metrics import evaluate_point_sets, format_metrics_table

__all__ = ["MatchingEvaluation"]


class MatchingEvaluation:
    """Compare a run's matches with ground-truth pairs and write ``metrics.json`` next to them.

    Args:
        pairs_path: the ground-truth pairs CSV (template point, true query point, optional ``radius_mm``).
        query_path: the query scan the pairs refer to (its case folder holds the matches).
        output_dir: the run's output folder (``<output_dir>/<query case>/matches.json``).
        cpm_radius_mm: the fixed radius of CPM, mm (paper: 10).
    """

    def __init__(self, pairs_path: str, query_path: str, output_dir: str, cpm_radius_mm: float = 10.0):
        self.pairs_path, self.query_path = os.fspath(pairs_path), os.fspath(query_path)
        self.output_dir, self.cpm_radius_mm = os.fspath(output_dir), float(cpm_radius_mm)
        if not self.cpm_radius_mm > 0:
            raise SAMv2InputError("cpm_radius_mm", f"must be a positive radius in mm, got {cpm_radius_mm!r}")

    def check(self) -> "MatchingEvaluation":
        """Refuse a missing query or an unusable pairs file before any matching is done (cheap: reads the CSV)."""
        if not isinstance(self.query_path, str) or not os.path.exists(self.query_path):
            raise SAMv2InputError(self.query_path, "evaluation needs exactly one existing query scan")
        read_point_pairs(self.pairs_path)
        return self

    def run(self) -> dict:
        """Compute, print and write the metrics; returns ``{row name: metrics dict}``."""
        self.check()
        pairs = read_point_pairs(self.pairs_path)
        folder = os.path.join(self.output_dir, case_name(self.query_path))
        summary_path = os.path.join(folder, "matches.json")
        if not os.path.isfile(summary_path):
            raise SAMv2InputError(summary_path, "no matches to evaluate (run the matching first)")
        with open(summary_path, encoding="utf-8") as f:
            summary = json.load(f)
        system = summary["coordinate_system"]
        names = [p["name"] for p in summary["points"]]
        rows = {}
        answers = {summary["method"]: [p["matched"] for p in summary["points"]]}
        if all("embedding_x" in p for p in summary["points"]):  # refined run: the embedding matches it started from
            answers[summary["method"].replace("+refine", "") + " (before refinement)"] = [
                [p["embedding_x"], p["embedding_y"], p["embedding_z"]] for p in summary["points"]
            ]
        answers["nearest_neighbour"] = [p["nearest_neighbour"] for p in summary["points"]]
        for label, coords in answers.items():
            predicted = PointSet(names, coords, system)
            rows[label] = evaluate_point_sets(predicted, pairs.query, pairs.radii_mm, self.cpm_radius_mm)
        table = format_metrics_table(rows)
        print(f"Matching accuracy on {len(pairs)} pairs of {self.pairs_path} ({rows[summary['method']]['coordinate_system']} mm):")
        print(table)
        record = {"pairs": self.pairs_path, "query": self.query_path, "metrics": rows}
        with open(os.path.join(folder, "metrics.json"), "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2)
        return rows
