"""Does the sub-voxel refinement help across modalities? CT -> MR on the porcine phantom, with a same-modality control.

Ground truth: the CT-MR reference rigid transform of the registration benchmark
(``bundles/crosssam_registration/docs/benchmark_registration_reference.json``, multi-start Mattes MI; its solutions
agree within 0.9 mm). Template points: ``--num_points`` CT body voxels (HU > -300) whose mapped point lies at least
8 voxels inside the MR. Their simulated embedding matches are the true points plus a uniform error of up to
``--error_mm`` per axis, so only the refiner is measured. Rows:

* **CT -> MR** (MIND, the refiner's ``"auto"`` choice across modalities);
* **CT -> CT moved by the same transform** (control: the CT's grid moved rigidly by the reference transform, no
  resampling, so the truth is exact), with NCC and with MIND: shows what the refiner does when the two scans agree,
  and whether MIND itself or the CT-MR pair is the limit.

Each with the translation search alone and with the bundle's local affine levels (the ``refiner`` section of
``bundles/samv2_matching/configs/inference.json``; the trust radius is ``2 * error_mm``). The local frame given to
the refiner is the reference transform's rotation. Errors are world LPS mm. The control query and the points come
from :mod:`samv2_components.transforms.known_transform` (``moved_scan``, ``mapped_body_points``).

Example::

    python scripts/evaluate_refinement_cross_modal.py
"""

from __future__ import annotations

import json
import os
import sys
import time

try:
    import samv2_components  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fire
import numpy as np

from samv2_components.inference import read_bundle_config, section_settings
from samv2_components.io.image import load_scan
from samv2_components.matching import LocalIntensityRefiner
from samv2_components.transforms.known_transform import mapped_body_points, moved_scan

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.normpath(os.path.join(REPO, "..", "shared", "data", "ct_mr_phantom"))  # next to the checkout
REFERENCE = os.path.join(REPO, "bundles", "crosssam_registration", "docs", "benchmark_registration_reference.json")


def main(
    ct: str = f"{DATA}/ct_2mm.nii.gz",
    mr: str = f"{DATA}/mr_t2_2mm.nii.gz",
    reference: str = REFERENCE,
    num_points: int = 100,
    error_mm: float = 4.0,
    seed: int = 0,
    output: str | None = None,
):
    """Print (and with ``--output`` write) the Markdown table (module docstring)."""
    settings = section_settings(read_bundle_config(os.path.join(REPO, "bundles", "samv2_matching")), "refiner")
    settings["trust_radius_mm"] = 2.0 * float(error_mm)
    transform = np.asarray(json.load(open(reference))["fixed_to_moving"], np.float64)
    ct_scan, mr_scan = load_scan(ct), load_scan(mr)
    moved = moved_scan(ct_scan, transform)
    queries = {  # name: (query, same modality, similarity)
        "CT -> MR (MIND)": (mr_scan, False, "auto"),
        "CT -> CT moved by the same transform (control, NCC)": (moved, True, "auto"),
        "CT -> CT moved by the same transform (control, MIND)": (moved, True, "mind"),
    }
    rng = np.random.default_rng(seed + 1)
    lines = [
        "| query | refiner | before: median / mean (mm) | after: median / mean (mm) | accepted (%) | accepted: median after (mm) | time (s) |",
        "|:---|:---|---:|---:|---:|---:|---:|",
    ]
    for name, (query, same, similarity) in queries.items():
        points, truth = mapped_body_points(ct_scan, query, transform, num_points, seed)
        start = truth + rng.uniform(-error_mm, error_mm, truth.shape)
        frames = np.broadcast_to(transform[:3, :3], (len(points), 3, 3))
        for label, extra in (("search", {"affine_levels": None}), ("search + local affine", {})):
            refiner = LocalIntensityRefiner(**{**settings, "similarity": similarity, **extra})
            t0 = time.perf_counter()
            result = refiner.refine(ct_scan, points, query, start, same_modality=same, local_linear=frames)
            seconds = time.perf_counter() - t0
            before, after = np.linalg.norm(start - truth, axis=1), np.linalg.norm(result.points_lps - truth, axis=1)
            accepted = f"{np.median(after[result.accepted]):.2f}" if result.accepted.any() else "-"
            lines.append(
                f"| {name} | {label} | {np.median(before):.2f} / {before.mean():.2f} | {np.median(after):.2f} / {after.mean():.2f} "
                f"| {100 * result.accepted.mean():.0f} | {accepted} | {seconds:.1f} |"
            )
    header = [
        "# Sub-voxel refinement across modalities (CT-MR phantom)",
        "",
        f"- Command: `python {' '.join([os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]])}`",
        f"- CT `{ct}`, MR `{mr}`; truth: reference transform `{os.path.relpath(reference, REPO)}`; {num_points} CT body points; "
        f"simulated matches = truth + U(-{error_mm:g}, {error_mm:g}) mm per axis; trust radius {2 * error_mm:g} mm; seed {seed}",
        "",
    ]
    text = "\n".join(header + lines) + "\n"
    print(text)
    if output:
        with open(output, "w") as f:
            f.write(text)


if __name__ == "__main__":
    fire.Fire(main)
