"""Replay the ``samv2`` pipeline's selection (:func:`~samv2_components.registration.selection.select_candidate`)
offline on the per-case records of ``scripts/benchmark_registration.py --dump_dir``, with any of its rules changed,
and print what each setting would have written: successes, refusals and wrong transforms per case set.

The records hold every refined candidate with its scores and its TRE against the case's truth, so a rule can be
tried on a whole validation draw in a second instead of a benchmark run. What a replay cannot show: candidates the
pipeline would have refined further under another rule (``settle_rivals`` finishes a rival only when the selection
refuses), and the compared points, which here are the case's TRE points (the CT body inside the moving scan's
field of view, every 8 mm) where the pipeline uses the small scan's body every 8 mm (on 229 records of the phantom
benchmark the replay reproduced 226 outcomes; the other 3 differ through those points). Rules a record predates
are replayed at their defaults (the script says so). Tune on validation seeds only
(``--seed 1``, ``--seed 2``), never on the test draw (seed 0).

Usage::

    python scripts/benchmark_registration.py --seed 1 --num_cases 8 --methods samv2_pipeline \\
        --orientations aligned,acquired,slab,hard --dump_dir /tmp/dump1 --output /tmp/seed1.md --boxplot /tmp/seed1.png
    python scripts/replay_selection.py /tmp/dump1 /tmp/dump2 --rules "[{'mi_margin': 0.02}, {'edge_margin': 0.05}]" --cases
"""

from __future__ import annotations

import ast
import inspect
import json
import os
import sys
from collections import defaultdict
from typing import Any

try:
    import samv2_components  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fire
import numpy as np

from samv2_components.registration.selection import select_candidate
from samv2_components.registration.selection_replay import RULES, load_records, replay


def _case_set(record: dict[str, Any]) -> str:
    return record["case"].rsplit("_", 1)[0]


def main(*dump_dirs: str, rules: Any = None, success_mm: float = 10.0, cases: bool = False) -> None:
    """Print one table row per rule setting (the records' own rules first) and, with ``--cases``, every case whose
    outcome a setting changes.

    Args:
        dump_dirs: folders of ``--dump_dir`` records.
        rules: a dict of rule overrides (``select_candidate`` keywords), or a list of them (one row each).
        success_mm: a winner closer than this (mean TRE) is a success.
        cases: also list the cases whose outcome differs from the first row's.
    """
    records = load_records(list(dump_dirs))
    if not records:
        raise SystemExit(f"no pipeline records with candidates in {', '.join(dump_dirs) or '(no folder given)'}")
    if isinstance(rules, str):
        try:
            rules = ast.literal_eval(rules)
        except (ValueError, SyntaxError) as exc:
            raise SystemExit(f"ERROR: --rules: not a Python dict or list of dicts ({exc}): {rules!r}")
    settings: list[dict[str, Any]] = [{}]
    settings += [dict(r) for r in (rules if isinstance(rules, (list, tuple)) else [rules] if rules is not None else [])]
    unknown = sorted({k for s in settings for k in s} - RULES)
    if unknown:
        raise SystemExit(f"ERROR: --rules: unknown rule(s) {', '.join(unknown)} (select_candidate takes {', '.join(sorted(RULES))})")
    missing = {k: sum(k not in r["record"]["candidates"]["rules"] for r in records) for k in sorted(RULES)}
    for k, n in missing.items():
        if n:  # records of an earlier version
            print(f"note: {n} record(s) predate the rule {k}: replayed at its default, "
                  f"{inspect.signature(select_candidate).parameters[k].default}")
    sets = sorted({_case_set(r) for r in records})
    print(f"{len(records)} records ({', '.join(f'{s}: {sum(_case_set(r) == s for r in records)}' for s in sets)}) "
          f"from {', '.join(dump_dirs)}; success: TRE < {success_mm:g} mm")
    print("| rules | " + " | ".join(f"{s}: solved / refused / wrong" for s in sets) + " | all | TRE of successes (mm) |")
    print("|:---|" + "---:|" * (len(sets) + 2))
    baseline = None
    for overrides in settings:
        outcomes = [replay(r, overrides, success_mm) for r in records]
        counts = defaultdict(lambda: defaultdict(int))
        for r, o in zip(records, outcomes):
            counts[_case_set(r)][o["outcome"]] += 1
            counts["all"][o["outcome"]] += 1
        good = [o["tre_mm"] for o in outcomes if o["outcome"] == "solved"]
        cells = [f"{counts[s]['solved']} / {counts[s]['refused']} / {counts[s]['wrong']}" for s in [*sets, "all"]]
        label = json.dumps(overrides) if overrides else "as recorded"
        print(f"| {label} | " + " | ".join(cells) + (f" | {np.mean(good):.2f} |" if good else " | - |"))
        if baseline is None:
            baseline = outcomes
        elif cases:
            for r, before, after in zip(records, baseline, outcomes):
                if (before["outcome"], before["winner"]) != (after["outcome"], after["winner"]):
                    print(f"    {r['case']}: {before['outcome']} {before['winner']} "
                          f"({'-' if before['tre_mm'] is None else format(before['tre_mm'], '.1f')} mm) -> "
                          f"{after['outcome']} {after['winner']} "
                          f"({'-' if after['tre_mm'] is None else format(after['tre_mm'], '.1f')} mm)")


if __name__ == "__main__":
    fire.Fire(main)
