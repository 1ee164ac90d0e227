"""Score one Semantic-SAM checkpoint on the project's fixed held-out benchmarks, in one command.

Usage::

    python scripts/evaluate_checkpoint.py --ckpt bundles/semantic_sam/models/model.pt \\
        [--name shipped] [--table bundles/semantic_sam/docs/checkpoints.md] [--json out.json] [--width 0.25]

Every number comes from scans the shipped training list holds out (``scripts/prepare_training_data.py``), matched
with the ``samv2_matching`` bundle's preprocessing, inferer and matcher settings and the given weights:

1. **Known transform** (``lung2``, chest CT): the scan against a known random rotation/scale/translation + smooth
   elastic warp of itself (:mod:`samv2_components.transforms.known_transform`, as
   ``scripts/evaluate_known_transform.py``, seed 0), 300 body points;
   NN (coarse-to-fine) and fixed-point: MED, CPM@10 mm.
2. **Inter-subject organ centroids**: the labelled sample CT (``example_ct_sm``, TotalSegmentator labels) into the
   AMOS abdomen-pelvis CT (paired by common structure name) and into the DICOM abdominal CT (paired by
   TotalSegmentator id, as ``scripts/benchmark_matching.py``); NN and fixed-point MED and CPM@10, with SimpleITK
   affine (Mattes MI) on the same pairs as the anchor (it does not depend on the weights: cached in
   ``--cache_dir``).
3. **CT-MR phantom**: CT body points on an 8 mm grid matched (NN) into the T2 MR turned to undo its head-to-foot
   reversal; the share within 10 mm of the benchmark's reference transform
   (``bundles/crosssam_registration/docs/benchmark_registration_reference.json``). The phantom's two scans are
   in the training list as single scans (self-supervised pairs within one scan), never as a CT-MR pair.

Prints one Markdown row (and appends it to ``--table``, writing the header first if the file is new).

The matcher is the bundle's with its global consistency check off (the paper's local matching): the table scores
the embeddings, and its rows stay comparable with those scored before the check existed; the matching bundle's own
benchmark (``scripts/benchmark_matching.py``) shows what the check adds.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import tempfile
import time

try:
    import samv2_components  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fire
import numpy as np

from samv2_components.errors import install_cli_error_handler
from samv2_components.geometry import apply_matrix
from samv2_components.inference import BundlePipeline
from samv2_components.io.image import load_scan
from samv2_components.io.label_vocabulary import AMOS, TOTALSEGMENTATOR_CT
from samv2_components.io.organ_pairs import organ_centroid_pairs
from samv2_components.matching import SAMv2Matcher
from samv2_components.metrics import summarize_errors
from samv2_components.registration.benchmark_cases import make_cases, undo_axis_aligned_rotation
from samv2_components.transforms import known_transform as known

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLE = os.path.join(REPO, "bundles", "samv2_matching")
REFERENCE = os.path.join(REPO, "bundles", "crosssam_registration", "docs", "benchmark_registration_reference.json")
COLUMNS = [
    ("lung2 NN MED", "known_nn_med", ".2f"), ("lung2 NN CPM@10", "known_nn_cpm", ".1f"),
    ("lung2 FP MED", "known_fp_med", ".2f"), ("lung2 FP CPM@10", "known_fp_cpm", ".1f"),
    ("AMOS NN MED", "amos_nn_med", ".1f"), ("AMOS FP MED", "amos_fp_med", ".1f"), ("AMOS FP CPM@10", "amos_fp_cpm", ".1f"),
    ("AMOS SimpleITK affine MED", "amos_sitk_med", ".1f"), ("AMOS SimpleITK CPM@10", "amos_sitk_cpm", ".1f"),
    ("DICOM NN MED", "dicom_nn_med", ".1f"), ("DICOM FP MED", "dicom_fp_med", ".1f"), ("DICOM FP CPM@10", "dicom_fp_cpm", ".1f"),
    ("DICOM SimpleITK affine MED", "dicom_sitk_med", ".1f"),
    ("CT-MR within 10 mm (%)", "phantom_within10", ".1f"), ("time (s)", "time_s", ".0f"),
]


def known_transform(pipe: BundlePipeline, image: str, num_points: int = 300, seed: int = 0) -> dict:
    template = load_scan(image)
    tf = known.random_transform(seed, known.grid_centre_lps(template))
    query, _ = known.resample_query(template, tf)
    points = known.sample_template_points(template, num_points, seed)
    truth = tf.template_to_query(points)
    with tempfile.TemporaryDirectory(prefix="samv2_eval_") as tmp:
        query_path = known.save_nifti(query, os.path.join(tmp, "query.nii"))
        matcher = SAMv2Matcher(**{**pipe.settings("matcher"), "global_consistency": False})
        tp, qp = matcher.prepare(pipe.embed(image)), matcher.prepare(pipe.embed(query_path))
    nn = summarize_errors(matcher.match(tp, qp, points, method="nearest_neighbour").points_lps, truth)
    fp = summarize_errors(matcher.match(tp, qp, points, method="fixed_point").points_lps, truth)
    return {"known_nn_med": nn["med"], "known_nn_cpm": nn["cpm"], "known_fp_med": fp["med"], "known_fp_cpm": fp["cpm"]}


def _sitk_baseline(template_image: str, query_image: str, points: np.ndarray, cache: str) -> np.ndarray:
    """Template points mapped by a SimpleITK affine registration (cached: independent of the weights)."""
    if os.path.isfile(cache):
        with open(cache, encoding="utf-8") as f:
            stored = json.load(f)
        if np.allclose(stored["points"], points):
            return np.asarray(stored["mapped"])
    from samv2_components.registration import register_intensity

    mapped = register_intensity(template_image, query_image, transform="affine").map_points(points)
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    with open(cache, "w", encoding="utf-8") as f:
        json.dump({"points": points.tolist(), "mapped": np.asarray(mapped).tolist()}, f)
    return np.asarray(mapped)


def inter_subject(pipe, template_image, template_labels, query_image, pairs, prefix: str, cache_dir: str) -> dict:
    matcher = SAMv2Matcher(**{**pipe.settings("matcher"), "global_consistency": False})
    tp, qp = matcher.prepare(pipe.embed(template_image)), matcher.prepare(pipe.embed(query_image))
    src, truth, radii = pairs.template.coords, pairs.query.coords, pairs.radii_mm
    nn = summarize_errors(matcher.match(tp, qp, src, method="nearest_neighbour").points_lps, truth, radii_mm=radii)
    fp_result = matcher.match(tp, qp, src, method="fixed_point")
    fp = summarize_errors(fp_result.points_lps, truth, radii_mm=radii)
    sitk = summarize_errors(
        _sitk_baseline(template_image, query_image, src, os.path.join(cache_dir, f"{prefix}_simpleitk_affine.json")),
        truth, radii_mm=radii,
    )
    per_organ = {n: round(float(np.linalg.norm(p - t)), 1) for n, p, t in zip(pairs.names, fp_result.points_lps, truth)}
    return {f"{prefix}_nn_med": nn["med"], f"{prefix}_nn_cpm": nn["cpm"], f"{prefix}_fp_med": fp["med"],
            f"{prefix}_fp_cpm": fp["cpm"], f"{prefix}_sitk_med": sitk["med"], f"{prefix}_sitk_cpm": sitk["cpm"],
            f"{prefix}_fp_per_organ_mm": per_organ, f"{prefix}_pairs": len(pairs)}


def phantom(pipe: BundlePipeline, data_root: str, cache_dir: str, grid_mm: float = 8.0) -> dict:
    """Share of CT body grid points whose NN match in the aligned, uncropped MR lies within 10 mm of the truth."""
    with open(REFERENCE, encoding="utf-8") as f:
        reference = np.asarray(json.load(f)["fixed_to_moving"], dtype=np.float64)
    work = os.path.join(cache_dir, "phantom_aligned")
    ct_path = os.path.join(data_root, "ct_mr_phantom", "ct_2mm.nii.gz")
    mr_path = os.path.join(data_root, "ct_mr_phantom", "mr_t2_2mm.nii.gz")
    flip = undo_axis_aligned_rotation(reference)  # the axis-aligned rotation that undoes the MR's reversal
    (case,) = make_cases(
        1, 0, reference, work, ct_path=ct_path, mr_path=mr_path, max_rotation_deg=0.0, max_translation_mm=0.0,
        crop=False, pre_rotation=flip, tre_spacing_mm=grid_mm, prefix="aligned_",
    )
    matcher = SAMv2Matcher(**{**pipe.settings("matcher"), "global_consistency": False})
    ct = matcher.prepare(pipe.embed(case.fixed_path, "ct"))
    mr = matcher.prepare(pipe.embed(case.moving_path, "mr"))
    found = matcher.match(ct, mr, case.points, method="nearest_neighbour").points_lps
    truth = apply_matrix(case.truth, case.points)
    error = np.linalg.norm(found - truth, axis=1)
    return {"phantom_within10": float(100.0 * np.mean(error <= 10.0)), "phantom_points": int(len(error)),
            "phantom_median_mm": float(np.median(error))}


def _row(name: str, result: dict) -> str:
    cells = [format(result[key], spec) if isinstance(result.get(key), (int, float)) else "-" for _, key, spec in COLUMNS]
    return f"| {name} | " + " | ".join(cells) + " |"


def main(
    ckpt: str,
    name: str | None = None,
    width: float = 0.25,
    data_root: str = os.path.join(REPO, "..", "shared", "data"),
    cache_dir: str = os.path.join(REPO, "bundles", "semantic_sam", "eval", "cache"),
    table: str | None = None,
    json_path: str | None = None,
    device: str = "cpu",
) -> None:
    """Score ``ckpt`` (a ``model.pt`` or a training checkpoint) and print one table row; see the module docstring."""
    t0 = time.perf_counter()
    body = os.path.join(data_root, "body_ct")
    pipe = BundlePipeline(BUNDLE, ckpt=ckpt, device=device, overrides={"network_def#width": width})
    result = {"ckpt": ckpt, "command": "python " + shlex.join(sys.argv)}
    result.update(known_transform(pipe, os.path.join(body, "lung2_image.nrrd")))
    template_image, template_labels = os.path.join(body, "example_ct_sm.nii.gz"), os.path.join(body, "example_seg.nii.gz")
    amos_pairs = organ_centroid_pairs(template_labels, os.path.join(body, "amos_0336_labels.nii.gz"),
                                      template_source=TOTALSEGMENTATOR_CT, query_source=AMOS)
    result.update(inter_subject(pipe, template_image, template_labels, os.path.join(body, "amos_0336_ct.nii.gz"),
                                amos_pairs, "amos", cache_dir))
    dicom_pairs = organ_centroid_pairs(template_labels, os.path.join(body, "example_seg_dicom.nii.gz"))
    result.update(inter_subject(pipe, template_image, template_labels, os.path.join(body, "example_ct_dicom"),
                                dicom_pairs, "dicom", cache_dir))
    result.update(phantom(pipe, data_root, cache_dir))
    result["time_s"] = time.perf_counter() - t0
    row = _row(name or os.path.relpath(ckpt, REPO), result)
    print(row)
    if table:
        new = not os.path.isfile(table)
        os.makedirs(os.path.dirname(os.path.abspath(table)), exist_ok=True)
        with open(table, "a", encoding="utf-8") as f:
            if new:
                f.write("| checkpoint | " + " | ".join(c for c, _, _ in COLUMNS) + " |\n")
                f.write("|:---|" + "---:|" * len(COLUMNS) + "\n")
            f.write(row + "\n")
    if json_path:
        with open(json_path, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    install_cli_error_handler()
    fire.Fire(main)
