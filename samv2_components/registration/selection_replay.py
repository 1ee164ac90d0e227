"""Offline replay of the ``samv2`` pipeline's selection on the per-case records that
``scripts/benchmark_registration.py --dump_dir`` writes (:func:`~samv2_components.registration.benchmark_methods.dump_case`):
every refined candidate with its scores and its TRE against the case's truth, so a change of the selection rules
(:func:`~samv2_components.registration.selection.select_candidate`) can be tried on a whole draw without running
the pipeline again. The command line is ``scripts/replay_selection.py``.

Limits: candidates that the pipeline would have refined further under another rule are not there (``settle_rivals``
finishes a rival only when the selection refuses), and two answers are compared at the case's TRE points (CT, LPS
mm) where the pipeline uses the small scan's body points.
"""

from __future__ import annotations

import glob
import inspect
import json
import math
import os
from typing import Any

import numpy as np

from samv2_components.registration.benchmark_cases import tre
from samv2_components.registration.selection import ScoredCandidate, select_candidate

__all__ = ["RULES", "candidates_of", "load_records", "replay"]

#: the rules select_candidate takes (its keyword arguments)
RULES = set(inspect.signature(select_candidate).parameters) - {"candidates", "points"}


def load_records(dump_dirs: list[str]) -> list[dict[str, Any]]:
    """Every ``*.json`` record under the given folders (those of a pipeline run with candidates)."""
    records = []
    for folder in dump_dirs:
        for path in sorted(glob.glob(os.path.join(folder, "**", "*.json"), recursive=True)):
            with open(path, encoding="utf-8") as f:
                record = json.load(f)
            if (record.get("record") or {}).get("candidates", {}).get("candidates"):
                record["path"] = path
                records.append(record)
    return records


def candidates_of(record: dict[str, Any]) -> list[ScoredCandidate]:
    """The refined candidates of one record, as the selection saw them."""
    out = []
    for c in record["record"]["candidates"]["candidates"]:
        out.append(ScoredCandidate(
            name=c["name"], fixed_to_moving=np.asarray(c["fixed_to_moving"], dtype=np.float64),
            mi=math.nan if c.get("mi") is None else float(c["mi"]), support=float(c["support"]),
            overlap_fraction=float(c["overlap_fraction"]), error=c.get("error", ""), tilt=bool(c.get("tilt", False)),
            edges=math.nan if c.get("edges") is None else float(c["edges"])))
    return out


def replay(record: dict[str, Any], overrides: dict[str, Any], success_mm: float = 10.0) -> dict[str, Any]:
    """The selection of one record under its own rules with ``overrides``: outcome (``solved``, ``refused`` or
    ``wrong``), the winner's name and TRE (mm)."""
    # a record's rules as they were recorded, those this select_candidate still takes (records of other versions)
    rules = {k: v for k, v in record["record"]["candidates"]["rules"].items() if k in RULES}
    rules.update(overrides)
    points = np.asarray(record["points"], dtype=np.float64)
    truth = np.asarray(record["truth"], dtype=np.float64)
    selection = select_candidate(candidates_of(record), points, **rules)
    if not selection.success:
        return {"outcome": "refused", "winner": None, "tre_mm": None, "reason": selection.reason}
    error = tre(selection.winner.fixed_to_moving, truth, points)
    return {"outcome": "solved" if error < success_mm else "wrong", "winner": selection.winner.name, "tre_mm": error,
            "reason": ""}
