"""Inter-subject baseline: how far apart are the organ centroids of two subjects before and after intensity
registration (SimpleITK, :func:`samv2_components.registration.register_intensity`)?

For every label id present in both label maps with at least ``--min_voxels`` voxels in each, the centroid (world
LPS mm, :func:`samv2_components.geometry.label_centroids`) of the fixed subject's label is mapped into the moving
subject and compared with the moving subject's centroid of the same label. Rows:

* ``identity``: no registration (the two scanners' world coordinates taken as they are);
* ``init <mode>``: only the initial translation of ``CenteredTransformInitializer`` (``moments`` / ``geometry``);
* ``<transform> <mode>``: after the full registration started from that initialisation.

Caveat: centroids of organs that a scan cuts off (different z-ranges) are biased toward the covered part, so even a
perfect registration leaves errors on such organs; the scans are different subjects, so the "ground truth" is only
approximate anatomical correspondence.

Examples::

    python scripts/inter_subject_baseline.py                      # the shared body-CT example (defaults below)
    python scripts/inter_subject_baseline.py --transform rigid --initializations moments --threads 2
"""

from __future__ import annotations

import os
import sys
from typing import Any

try:
    import samv2_components  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fire
import numpy as np

from samv2_components.io.organ_pairs import common_label_centroids
from samv2_components.registration import read_sitk_image, register_intensity
from samv2_components.registration.intensity_baselines import _initial_rigid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.normpath(os.path.join(REPO, "..", "shared", "data", "body_ct"))  # the shared data next to the checkout
DEFAULTS = dict(
    fixed_image=f"{DATA}/example_ct_sm.nii.gz",
    fixed_labels=f"{DATA}/example_seg.nii.gz",
    moving_image=f"{DATA}/example_ct_dicom",
    moving_labels=f"{DATA}/example_seg_dicom.nii.gz",
)


def centroid_errors(mapped: dict, target: dict) -> dict[int, np.ndarray]:
    """Per label: the (3,) LPS difference mapped - target (mm)."""
    return {k: np.asarray(mapped[k] - target[k], dtype=np.float64) for k in target}


def main(
    fixed_image: str = DEFAULTS["fixed_image"],
    fixed_labels: str = DEFAULTS["fixed_labels"],
    moving_image: str = DEFAULTS["moving_image"],
    moving_labels: str = DEFAULTS["moving_labels"],
    transform: str = "affine",
    initializations: Any = ("moments", "geometry"),
    min_voxels: int = 50,
    threads: int | None = None,
    **registration_kwargs,
) -> None:
    """Print a Markdown table of per-label centroid distances (mm): identity, initialisation only, registered."""
    import SimpleITK as sitk

    if threads:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(int(threads))
    if isinstance(initializations, str):
        initializations = [s for s in initializations.split(",") if s]
    fixed_c, moving_c, cut = common_label_centroids(fixed_labels, moving_labels, min_voxels)
    if not fixed_c:
        raise SystemExit("no label is present in both label maps with enough voxels")
    labels = list(fixed_c)
    fixed_pts = np.array([fixed_c[k] for k in labels])
    rows: dict[str, tuple[dict[int, np.ndarray], str]] = {"identity": (centroid_errors(fixed_c, moving_c), "-")}
    fixed_img, moving_img = read_sitk_image(fixed_image, "fixed"), read_sitk_image(moving_image, "moving")
    for init in initializations:
        t0 = _initial_rigid(sitk, fixed_img, moving_img, init)
        mapped = np.array([t0.TransformPoint(p) for p in fixed_pts.tolist()])
        rows[f"init {init}"] = (centroid_errors(dict(zip(labels, mapped)), moving_c), "-")
        result = register_intensity(
            fixed_img, moving_img, transform=transform, initialization=init, **registration_kwargs
        )
        mapped = result.map_points(fixed_pts)
        rows[f"{transform} {init}"] = (
            centroid_errors(dict(zip(labels, mapped)), moving_c),
            f"{result.wall_time_s:.1f} s, metric {result.final_metric:.3f}",
        )
    names = list(rows)
    dist = {n: {k: float(np.linalg.norm(v)) for k, v in rows[n][0].items()} for n in names}
    print(f"fixed: {fixed_image}\nmoving: {moving_image}\ncentroid distance (mm), labels with >= {min_voxels} voxels")
    print("(* = label cut by a field of view: its centroid depends on the coverage)\n")
    print("| label | " + " | ".join(names) + " |")
    print("|---:|" + "---:|" * len(names))
    for k in labels:
        print(f"| {k}{'*' if k in cut else ''} | " + " | ".join(f"{dist[n][k]:.1f}" for n in names) + " |")
    summaries = {
        "**mean 3D**": lambda n: f"**{np.mean(list(dist[n].values())):.1f}**",
        "median 3D": lambda n: f"{np.median(list(dist[n].values())):.1f}",
        "mean in-plane (x, y)": lambda n: f"{np.mean([np.linalg.norm(v[:2]) for v in rows[n][0].values()]):.1f}",
        "mean abs z": lambda n: f"{np.mean([abs(v[2]) for v in rows[n][0].values()]):.1f}",
    }
    if len(cut) < len(labels):
        summaries[f"mean 3D, {len(labels) - len(cut)} uncut"] = lambda n: (
            f"{np.mean([d for k, d in dist[n].items() if k not in cut]):.1f}"
        )
    for title, fmt in summaries.items():
        print(f"| {title} | " + " | ".join(fmt(n) for n in names) + " |")
    print("| time | " + " | ".join(rows[n][1] for n in names) + " |")

if __name__ == "__main__":
    fire.Fire(main)
