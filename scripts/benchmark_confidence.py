"""How much the matcher's ``confident`` flag can be trusted: confident answers against exact ground truth.

Each scan (non-held-out CTs of the shared data by default: what a rule is chosen on must not be what it is judged
by) is matched against a known random transform of itself (``benchmark_matching.py``'s section 1 generator,
±10°, ±20 mm, smooth deformation), ``--num_points`` points in the body, with the ``samv2_matching`` bundle's
settings. For every answer it records the error, the flags of the confidence rule and two candidate checks:

- **local support** (the bundle's rule since samv2_matching 0.6.0): the global map's inlier pairs within
  ``confident_support_radius_mm`` of the template point, at least ``min_confident_support``;
- **distinctiveness** (a ratio test in the spirit of Lowe's): the answer's score minus the best score 15-40 mm
  away from it (the runner-up one structure over: a neighbouring rib, the next vertebra), at least ``--margin``.

Prints, per scan and in total, how many answers are confident, how many confident answers are wrong (> 10 mm and
> 20 mm), and what each check removes (right and wrong answers). Example::

    python scripts/benchmark_confidence.py --output bundles/samv2_matching/docs/benchmark_confidence.md

Errors are world LPS mm.
"""

from __future__ import annotations

import datetime
import os
import shlex
import sys

try:
    import samv2_components  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fire
import numpy as np
import torch

from benchmark_matching import BUNDLE, DATA, known_transform_case, matcher_of
from samv2_components.inference import BundlePipeline

#: non-held-out CTs with a body to match (chest, head, chest-abdomen); the lung_nc scans are CC BY-NC,
#: evaluation only, which a threshold study is
DEFAULT_SCANS = (
    "body_ct/lung1_image.nrrd",
    "body_ct/lung_nc_pat1_ct.nii.gz",
    "body_ct/lung_nc_pat2_ct.nii.gz",
    "body_ct/lung_nc_pat3_ct.nii.gz",
    "body_ct/lung_nc_pat4_ct.nii.gz",
    "body_ct/ctchest4_ct.nii.gz",
    "head_ct/fullhead_ct.nii.gz",
    "head_ct/sinus_ct_0p7mm.nii.gz",
)
#: the runner-up is searched this far from the answer (mm): beyond the 10 mm that counts as right, within reach
#: of the next repeating structure
RUNNER_UP_ANNULUS_MM = (15.0, 40.0)


def confidence_features(pipe: BundlePipeline, image: str, num_points: int, seed: int) -> dict[str, np.ndarray]:
    """Per-point ``error`` (mm), ``confident_without_support`` (the rule before 0.6.0), ``support`` (the map's
    inliers near the point; -1 without a map) and ``margin`` (score minus the runner-up's) of one scan."""
    case = known_transform_case(pipe, image, num_points, seed)
    matcher = matcher_of(pipe, min_confident_support=0)
    template, query = matcher.prepare(case["template_heads"]), matcher.prepare(case["query_heads"])
    result = matcher.match(template, query, case["points"], method="fixed_point")
    descriptors = template.descriptors_at(case["points"])
    inner, outer = RUNNER_UP_ANNULUS_MM
    _, runner_up = query.search_within(descriptors, result.points_lps, outer, subvoxel=False, exclude_mm=inner)
    support = result.global_support if result.global_support is not None else np.full(len(result), -1)
    return {
        "error": np.linalg.norm(result.points_lps - case["truth"], axis=1),
        "confident_without_support": np.asarray(result.confident),
        "support": support,
        "margin": result.scores - np.nan_to_num(runner_up, nan=-1.0),
    }


def _row(name: str, f: dict[str, np.ndarray], min_support: int, margin: float) -> str:
    error, before = f["error"], f["confident_without_support"]
    right, wrong = error <= 10.0, error > 10.0
    supported = before & (f["support"] >= min_support)
    distinct = before & (f["margin"] >= margin)
    return (f"| {name} | {len(error)} | {before.sum()} | {(before & wrong).sum()} / {(before & (error > 20.0)).sum()} | "
            f"{supported.sum()} | {(supported & wrong).sum()} | {(before & ~supported & right).sum()} | "
            f"{(before & ~distinct & right).sum()} / {(before & ~distinct & wrong).sum()} |")


def main(scans: tuple = DEFAULT_SCANS, num_points: int = 300, seed: int = 1, margin: float = 0.02,
         ckpt: str | None = None, output: str | None = None, device: str = "cpu"):
    """Print the table (see the module docstring).

    Args:
        scans: paths relative to the shared data folder (or absolute).
        num_points: template points per scan.
        seed: seeds the transform and the points.
        margin: the distinctiveness check's score margin over the runner-up.
        ckpt: weights (default: the bundle's ``models/model.pt``).
        output: also write the Markdown there.
        device: torch device.
    """
    command = "python " + shlex.join([os.path.relpath(sys.argv[0]) if sys.argv else "scripts/benchmark_confidence.py", *sys.argv[1:]])
    pipe = BundlePipeline(BUNDLE, ckpt=ckpt, device=device)
    min_support = int(pipe.settings("matcher")["min_confident_support"])
    features = {}
    for scan in scans:
        features[os.path.basename(scan).split(".")[0]] = confidence_features(pipe, os.path.join(DATA, scan), num_points, seed)
        print(f"{scan}: done", file=sys.stderr, flush=True)
    total = {k: np.concatenate([f[k] for f in features.values()]) for k in next(iter(features.values()))}
    lines = [
        "# SAMv2 matching: how far `confident` can be trusted (known transforms, exact truth)", "",
        f"- Command: `{command}`",
        f"- Device: {device} ({torch.get_num_threads()} threads), torch {torch.__version__}, "
        f"{datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- Known transform seed {seed} (±10°, ±20 mm, smooth deformation), {num_points} points per scan; wrong: "
        f"error > 10 mm (> 20 mm after the slash).",
        f"- Local support: at least {min_support} global-map inliers within "
        f"{pipe.settings('matcher')['confident_support_radius_mm']} mm of the template point (the bundle's rule). "
        f"Distinctiveness: score at least {margin} above the best score {RUNNER_UP_ANNULUS_MM[0]:.0f}-"
        f"{RUNNER_UP_ANNULUS_MM[1]:.0f} mm from the answer (studied, not used).", "",
        "| scan | points | confident without the support check | of which wrong | confident with it | of which wrong "
        "| right answers it unflags | distinctiveness would unflag right / wrong |",
        "|:---|---:|---:|---:|---:|---:|---:|---:|",
        *[_row(name, f, min_support, margin) for name, f in features.items()],
        _row("**all**", total, min_support, margin), "",
    ]
    text = "\n".join(lines)
    print(text)
    if output:
        with open(output, "w", encoding="utf-8") as f:
            f.write(text)


if __name__ == "__main__":
    fire.Fire(main)
