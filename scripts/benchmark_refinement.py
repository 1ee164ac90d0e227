"""Time and accuracy of the matching refinement's local affine optimisers, side by side, on known transforms.

For each transform seed: the matching benchmark's intra-subject case (``scripts/benchmark_matching.py`` section 1:
the held-out chest CT against a known random rotation/scale/translation + elastic deformation of itself, 300 body
points), both scans embedded and matched with the ``samv2_matching`` bundle (fixed point + global consistency),
the refinement's local frames estimated once; then ``LocalIntensityRefiner.refine`` alone, once per optimiser
setting, alternating, so that only the local affine levels differ. Prints one Markdown row per seed and setting:
the refiner's wall time (local frames excluded), MED / CPM@10 of the refined answers and the share accepted.

Settings: ``bundle`` (the bundle's ``refiner#affine_levels``) and ``adam`` (the same patches with 0.4.0's 200 and
100 Adam steps). Example (the table in ``bundles/samv2_matching/docs/README.md``, speed section)::

    python scripts/benchmark_refinement.py --seeds 0,1,2,3

Errors are world LPS mm.
"""

from __future__ import annotations

import os
import sys
import time

try:
    import samv2_components  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fire
import numpy as np
import torch

from benchmark_matching import BUNDLE, DEFAULT_IMAGE, known_transform_case, matcher_of
from samv2_components.inference import BundlePipeline
from samv2_components.matching.patch_affine import AffineLevel
from samv2_components.metrics import summarize_errors

#: samv2_matching 0.3.2-0.4.0's local affine levels: the bundle's patches, 200 and 100 Adam steps
ADAM_LEVELS = (AffineLevel(32.0, 2.0, 200, 1.0, tolerance_mm=0.02), AffineLevel(16.0, 1.0, 100, tolerance_mm=0.02))


def main(seeds="0,1,2,3", image: str = DEFAULT_IMAGE, num_points: int = 300, settings="bundle,adam",
         output: str | None = None):
    """Print the table (module docstring); ``seeds`` and ``settings`` are comma-separated."""
    seeds = [int(s) for s in str(seeds).split(",")] if not isinstance(seeds, (list, tuple)) else [int(s) for s in seeds]
    settings = settings.split(",") if isinstance(settings, str) else list(settings)
    pipe = BundlePipeline(BUNDLE)
    refiner, matcher = pipe.parsed("refiner"), matcher_of(pipe)
    levels = {"bundle": list(refiner.affine_levels), "adam": list(ADAM_LEVELS)}
    unknown = set(settings) - set(levels)
    if unknown:
        raise SystemExit(f"unknown settings {sorted(unknown)}: choose from {sorted(levels)}")
    lines = [f"- Command: `python scripts/benchmark_refinement.py --seeds {','.join(map(str, seeds))}`; "
             f"{torch.get_num_threads()} threads, torch {torch.__version__}",
             *(f"- `{name}`: " + ", ".join(f"{lv.patch_mm:g}/{lv.step_mm:g} mm, {lv.iterations} {lv.optimizer}"
                                           for lv in levels[name]) for name in settings),
             "", "| seed | setting | refine (s) | MED (mm) | CPM@10 (%) | refined (%) |", "|---:|:---|---:|---:|---:|---:|"]
    print("\n".join(lines), flush=True)
    for seed in seeds:
        case = known_transform_case(pipe, image, num_points, seed)
        tp, qp = matcher.prepare(case["template_heads"]), matcher.prepare(case["query_heads"])
        result = matcher.match(tp, qp, case["points"], method="fixed_point")
        frames = refiner.local_frames(matcher, tp, qp, case["points"], alignment=result.alignment)
        for name in settings:
            refiner.affine_levels = levels[name]
            start = time.perf_counter()
            refined = refiner.refine(case["template"], case["points"], case["query_native"], result.points_lps,
                                     local_linear=frames)
            seconds = time.perf_counter() - start
            errors = summarize_errors(refined.points_lps, case["truth"])
            line = (f"| {seed} | {name} | {seconds:.1f} | {errors['med']:.3f} | {errors['cpm']:.1f} | "
                    f"{100 * refined.accepted.mean():.1f} |")
            lines.append(line)
            print(line, flush=True)
    if output:
        with open(output, "w") as f:
            f.write("# Refinement optimisers on known transforms\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    fire.Fire(main)
