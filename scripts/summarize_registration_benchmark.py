"""One table per case set from the per-case CSVs of ``scripts/benchmark_registration.py`` runs.

The benchmark can run its methods in several invocations over the same seeded cases (the slow ones split by case
set over processes, the fast classical tools in one go); this merges their CSVs (``--csv`` comma-separated) and
prints, per case set and method, the figures the registration targets are stated in: success (TRE below
``success_mm``), mean TRE of the successes, reported failures (refusals), wrong transforms written (not refused,
TRE at or above ``success_mm``) and the mean wall time per case. Rows of one (set, case, method) appearing in
two CSVs are an error: runs that overlap cannot be merged.

    python scripts/summarize_registration_benchmark.py --csv classical_cases.csv,pipeline_a_cases.csv,pipeline_b_cases.csv
"""

from __future__ import annotations

import csv as csv_files
import math
import sys
from collections import defaultdict

import fire

from samv2_components.registration.benchmark_methods import method_stats


def summarize(rows: list[dict], success_mm: float = 10.0) -> dict[tuple[str, str], dict]:
    """``{(set, method): figures}`` (:func:`~samv2_components.registration.benchmark_methods.method_stats`) of
    benchmark CSV rows (dicts with the CSV's columns)."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    seen = set()
    for r in rows:
        key = (r["set"], r["case"], r["method"])
        if key in seen:
            raise ValueError(f"case {r['case']} of set {r['set']} appears twice for {r['method']}: the runs overlap")
        seen.add(key)
        groups[(r["set"], r["method"])].append({"tre_mm": r["tre_mm"], "wall_s": r["wall_s"] or None,
                                                 "failed": r["reported_failure"] == "1"})
    return {key: method_stats(group, success_mm) for key, group in groups.items()}


def main(csv: str | tuple = "", success_mm: float = 10.0) -> None:
    """Print the merged table (Markdown) on stdout.

    Args:
        csv: comma-separated per-case CSVs of benchmark runs over the same cases.
        success_mm: a case succeeds when its TRE is below this (mm).
    """
    # fire turns "a,b" into a tuple: accept both
    paths = list(csv) if isinstance(csv, (list, tuple)) else [p for p in str(csv).split(",") if p]
    if not paths:
        print("ERROR: --csv: give the per-case CSVs to merge", file=sys.stderr)
        raise SystemExit(2)
    rows = []
    for path in paths:
        with open(path, newline="", encoding="utf-8") as f:
            rows += [r for r in csv_files.DictReader(f) if r["method"] != "identity (no registration)"]
    try:
        table = summarize(rows, success_mm)
    except ValueError as exc:
        print(f"ERROR: --csv: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"| case set | method | cases | success TRE < {success_mm:g} mm (%) | TRE of successes, mean (mm) | refused | "
          "wrong transforms written | mean time per case (s) |")
    print("|:---|:---|---:|---:|---:|---:|---:|---:|")
    for (case_set, method), s in sorted(table.items()):
        hits = "-" if math.isnan(s["success_mean"]) else f"{s['success_mean']:.1f}"
        wall = "-" if s["wall"] is None else f"{s['wall']:.1f}"
        print(f"| {case_set} | {method} | {s['n']} | {s['success']:.0f} | {hits} | {s['reported_failures']} | "
              f"{s['wrong_written']} | {wall} |")


if __name__ == "__main__":
    fire.Fire(main)
