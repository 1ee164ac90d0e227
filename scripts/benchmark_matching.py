"""Point-matching benchmark with ground truth: accuracy of NN vs fixed-point matching, an intensity-registration
baseline, confidence flags, and speed. Prints Markdown tables (and writes them with ``--output``).

Sections (each uses the ``samv2_matching`` bundle's preprocessing, network, weights and matcher settings from
``bundles/samv2_matching/configs/inference.json``, so the numbers describe what the bundle does):

1. **Intra-subject** (``--image``, default the held-out chest CT ``lung2``): the scan against a known random
   rotation/scale/translation + smooth elastic deformation of itself (the generator of
   ``scripts/evaluate_known_transform.py``: :mod:`samv2_components.transforms.known_transform`); ``--num_points``
   template points inside the body; exact ground truth.
   Rows: exhaustive NN (reference), coarse-to-fine NN, fixed-point, fixed-point + refine (the bundle's
   ``refiner``: local intensity registration at native resolution, :mod:`samv2_components.matching.refinement`);
   plus how often the coarse-to-fine NN finds the exhaustive maximum.
2. **Absent anatomy**: the same template points matched into a scan that does not contain them
   (``--absent_image``, default the abdominal sample CT of another subject: chest points have no match there);
   reports how many matches are flagged ``confident=false``, next to the flag rate on the intra-subject query.
3. **Inter-subject** (``--template_image/--template_labels`` vs ``--query_image/--query_labels``, default the two
   abdominal CTs of different subjects in ``../shared/data/body_ct`` next to the checkout): every organ labelled in
   both; the template organ's centroid is matched and compared with the query organ's centroid
   (``scripts/make_organ_pairs.py``; CPM@radius uses the query organ's equivalent-sphere radius). Baselines: the
   scanners' world coordinates (identity) and an affine Mattes-MI registration with SimpleITK
   (:func:`samv2_components.registration.register_intensity`) mapping the same centroids.
4. **Speed** after embedding, on the intra-subject pair: preparing a scan, 1,000 points by coarse-to-fine and by
   exhaustive NN, 100 points by fixed-point matching.

Example::

    python scripts/benchmark_matching.py --output bundles/samv2_matching/docs/benchmark.md
    python scripts/benchmark_matching.py --speed_only      # section 4 alone (issue 20's rows), about a minute

Errors are world LPS mm; MEDx/y/z along LPS x/y/z; CPM@10: % of points within 10 mm.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys
import tempfile
import time

try:
    import samv2_components  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fire
import monai
import numpy as np
import torch

from samv2_components.inference import BundlePipeline
from samv2_components.io.image import load_scan
from samv2_components.io.organ_pairs import organ_centroid_pairs
from samv2_components.matching import SAMv2Matcher, match_nearest_neighbour
from samv2_components.metrics import summarize_errors
from samv2_components.transforms import known_transform as known

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLE = os.path.join(REPO, "bundles", "samv2_matching")
DATA = os.path.normpath(os.path.join(REPO, "..", "shared", "data"))  # the shared data next to the checkout
BODY_CT = os.path.join(DATA, "body_ct")
DEFAULT_IMAGE = os.path.join(BODY_CT, "lung2_image.nrrd")


def matcher_of(pipe: BundlePipeline, **overrides) -> SAMv2Matcher:
    """The bundle's matcher (its ``matcher`` settings, ``overrides`` replacing some)."""
    return SAMv2Matcher(**{**pipe.settings("matcher"), **overrides})


def _timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def _flag_rate(result) -> float:
    return float(100.0 * np.mean(~np.asarray(result.confident)))


def _accuracy_table(rows: list[dict], radius_column: bool = False) -> list[str]:
    head = "| method | n | MED (mm) | MEDx | MEDy | MEDz | median | p90 | max | CPM@10mm (%) |"
    rule = "|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    if radius_column:
        head, rule = head + " CPM@radius (%) |", rule + "---:|"
    head, rule = head + " flagged (%) | time (s) |", rule + "---:|---:|"
    lines = [head, rule]
    for r in rows:
        def f(key, spec=".2f"):
            return format(r[key], spec) if r.get(key) is not None else "-"

        line = (
            f"| {r['method']} | {r['n']} | {f('med')} | {f('med_x')} | {f('med_y')} | {f('med_z')} | {f('median')} "
            f"| {f('p90')} | {f('max')} | {f('cpm', '.1f')} |"
        )
        if radius_column:
            line += f" {f('cpm_radius', '.1f')} |"
        lines.append(line + f" {f('flagged', '.1f')} | {f('time_s')} |")
    return lines


# ------------------------------------------------------------------------------------------------ sections
def known_transform_case(pipe: BundlePipeline, image: str, num_points: int, seed: int, max_rotation_deg: float = 10.0,
                         max_translation_mm: float = 20.0, refine: bool = True) -> dict:
    """The scan against a known transform of itself: template points, their true positions, both scans embedded.

    Returns a dict with ``template`` (as read), ``tf`` and ``disp`` (the transform), ``points`` / ``truth`` (LPS mm),
    ``template_heads`` / ``query_heads``, ``query_native`` (the query as the bundle reads it, for the intensity
    refinement) and ``query_image`` (the preprocessed query, only without ``refine``: the hard set aligns it).
    """
    template = load_scan(image)
    tf = known.random_transform(seed, known.grid_centre_lps(template), max_rotation_deg=max_rotation_deg,
                                max_translation_mm=max_translation_mm)
    query, disp = known.resample_query(template, tf)
    points = known.sample_template_points(template, num_points, seed)
    case = {"template": template, "tf": tf, "disp": disp, "points": points, "truth": tf.template_to_query(points)}
    with tempfile.TemporaryDirectory(prefix="samv2_bench_") as tmp:
        query_path = known.save_nifti(query, os.path.join(tmp, "query.nii"))
        del query
        case["template_heads"], case["query_heads"] = pipe.embed(image), pipe.embed(query_path)
        case["query_native"] = load_scan(query_path)
        case["query_image"] = None if refine else pipe.preprocess(query_path)
    return case


def intra_subject(pipe: BundlePipeline, image: str, num_points: int, seed: int, absent_image: str | None,
                  max_rotation_deg: float = 10.0, max_translation_mm: float = 20.0, refine: bool = True):
    refiner = pipe.parsed("refiner")  # the bundle's settings, used whether or not "refine" is on
    case = known_transform_case(pipe, image, num_points, seed, max_rotation_deg, max_translation_mm, refine)
    template, tf, disp, points, truth = (case[k] for k in ("template", "tf", "disp", "points", "truth"))
    template_heads, query_heads = case["template_heads"], case["query_heads"]
    query_native, query_image = case["query_native"], case["query_image"]
    matcher, local = matcher_of(pipe), matcher_of(pipe, global_consistency=False)
    (tp, qp), prep_s = _timed(lambda: (matcher.prepare(template_heads), matcher.prepare(query_heads)))
    (exhaustive, _), ex_s = _timed(match_nearest_neighbour, template_heads, query_heads, points)
    nn, nn_s = _timed(local.match, tp, qp, points, method="nearest_neighbour")
    fp_local, fp_local_s = _timed(local.match, tp, qp, points, method="fixed_point")
    fp, fp_s = _timed(matcher.match, tp, qp, points, method="fixed_point")
    agree = float(100.0 * np.mean(np.linalg.norm(nn.nn_points_lps - exhaustive, axis=1) < 1e-3))
    rows = [
        {"method": "no matching (template position)", **summarize_errors(points, truth)},
        {"method": "NN, exhaustive (reference)", **summarize_errors(exhaustive, truth), "time_s": ex_s},
        {"method": "NN, coarse-to-fine", **summarize_errors(nn.points_lps, truth), "time_s": nn_s, "flagged": _flag_rate(nn)},
        {"method": "fixed-point, local only (the paper)", **summarize_errors(fp_local.points_lps, truth),
         "time_s": fp_local_s, "flagged": _flag_rate(fp_local)},
        {"method": "fixed-point + global consistency" + (" (bundle default)" if refine else ""),
         **summarize_errors(fp.points_lps, truth), "time_s": fp_s, "flagged": _flag_rate(fp)},
    ]
    notes = [_global_note(fp)]

    def refined_from(result):  # as the bundle runs with --refine true (local frames in the aligned pair if aligned)
        return _timed(lambda: refiner.refine(template, points, query_native, result.points_lps,
                                             local_linear=refiner.local_frames(matcher, tp, qp, points, alignment=result.alignment)))

    if not refine:  # the hard set: also align the query to the template through the global map, then match
        from samv2_components.matching.align_then_match import align_then_match

        template_image = pipe.preprocess(image)
        (aligned, was_aligned), align_s = _timed(align_then_match, matcher, tp, template_image, query_image, points,
                                                 pipe.embed_image, first_result=fp)
        rows.append({"method": "fixed-point + global + align, then match (bundle default)" if was_aligned else
                     "align, then match: not triggered (rotation below the threshold)",
                     **summarize_errors(aligned.points_lps, truth), "time_s": fp_s + align_s, "flagged": _flag_rate(aligned)})
        refined_aligned, refine_aligned_s = refined_from(aligned)
        rows.append({"method": "... + refine (`--refine true`)", **summarize_errors(refined_aligned.points_lps, truth),
                     "time_s": fp_s + align_s + refine_aligned_s, "flagged": _flag_rate(aligned)})
    if refine:
        refined, refine_s = refined_from(fp)
        rows.append({"method": "fixed-point + global + refine", **summarize_errors(refined.points_lps, truth),
                     "time_s": fp_s + refine_s, "flagged": _flag_rate(fp)})
    fixed = np.array([m == "fixed_point" for m in fp.methods])
    notes += [
        f"coarse-to-fine NN found the exhaustive maximum for {agree:.1f} % of the points; fixed-point answered "
        f"{100 * fixed.mean():.1f} % of the points (the rest fell back to NN); median fixed points per point "
        f"{np.median(fp.n_fixed_points):.0f}; preparing both scans took {prep_s:.2f} s",
    ]
    if refine:
        notes.append(
            f"refinement ({refined.similarity}; search: step {refiner.step_for(template, query_native):.2f} mm, patch "
            f"{refiner.patch_mm:g} mm, trust radius {refiner.trust_radius_mm:g} mm; local affine levels (patch/step/"
            f"iterations/smoothing mm/tolerance mm): {', '.join(f'{l.patch_mm:g}/{l.step_mm:g}/{l.iterations}/{l.smoothing_mm:g}/{l.tolerance_mm:g}' for l in refiner.affine_levels) or 'none'}) accepted "
            f"{100 * refined.accepted.mean():.1f} % of the points in {refine_s:.2f} s; kept: "
            + (", ".join(f"{s} x{n}" for s, n in zip(*np.unique([s for s in refined.status if s != 'refined'], return_counts=True))) or "none"))
    notes += [
        f"transform: {tf.describe()['rotation_deg_xyz']} deg, scale {tf.describe()['scale']}, translation "
        f"{tf.describe()['translation_mm_lps']} mm, elastic max {disp['max_displacement_mm']:.2f} mm",
    ]
    err_fp = np.linalg.norm(fp.points_lps - truth, axis=1)
    scores = {"intra-subject, correct (<= 10 mm)": fp.scores[err_fp <= 10], "intra-subject, wrong": fp.scores[err_fp > 10]}
    absent = None
    if absent_image:
        absent_scan = matcher.prepare(pipe.embed(absent_image))
        absent = matcher.match(tp, absent_scan, points, method="fixed_point")
        scores["absent anatomy"] = absent.scores
    speed = speed_rows(matcher_of(pipe), tp, qp, template_heads, query_heads, points, seed)
    return rows, notes, fp, absent, scores, speed, ransac_stability(matcher, tp, qp, points, truth)


def _global_note(result) -> str:
    """One line on the global map of a result: its matches, inliers and the points it overruled."""
    gm = result.global_map
    if gm is None or not gm.valid:
        return "global map: none (too few consistent matches): answers unchanged"
    overruled = sum(bool(f) for f in (result.flags or []))
    return (f"global map: {gm.n_mutual} mutual matches of {gm.n_candidates} grid points, {gm.n_inliers} inliers, "
            f"RMS {gm.rms_residual_mm:.1f} mm; {overruled} of {len(result)} answers overruled")


def _speed_table(speed: list[tuple[str, float]]) -> list[str]:
    """Section 4's Markdown table."""
    return ["| task | wall time (s) |", "|:---|---:|", *[f"| {task} | {t:.2f} |" for task, t in speed]]


def speed_rows(matcher, tp, qp, template_heads, query_heads, points, seed) -> list[tuple[str, float]]:
    """Timings of the local steps (the global check off) and, separately, of the global map (once per pair)."""
    from samv2_components.matching.global_map import estimate_global_map

    global_kwargs = matcher.global_map_kwargs
    matcher.global_consistency = False  # the local steps alone (a copy made for this section)
    rng = np.random.default_rng(seed)
    many = points[rng.integers(0, len(points), 1000)] + rng.uniform(-3, 3, (1000, 3))
    few = points[:100]
    matcher.match(tp, qp, few[:5], method="nearest_neighbour")  # warm-up
    _, prep = _timed(matcher.prepare, dict(query_heads))
    _, nn_s = _timed(matcher.match, tp, qp, many, method="nearest_neighbour")
    _, ex_s = _timed(match_nearest_neighbour, template_heads, query_heads, many)
    _, fp_s = _timed(matcher.match, tp, qp, few, method="fixed_point")
    _, global_s = _timed(estimate_global_map, tp, qp, **global_kwargs)
    grid = " x ".join(str(n) for n in qp.map.grid_shape)
    return [
        (f"prepare one scan (fine grid {grid})", prep),
        ("1,000 points, NN coarse-to-fine", nn_s),
        ("1,000 points, NN exhaustive", ex_s),
        ("100 points, fixed-point", fp_s),
        ("global map of the pair (once per template and query; the global check)", global_s),
    ]


def ransac_stability(matcher: SAMv2Matcher, tp, qp, points, truth, seeds=range(10)) -> list[str]:
    """Markdown lines: the global map alone over RANSAC seeds, with the bundle's settings and with the ranking used
    before version 0.5 (most inliers of 1,000 samples): how much of a result is the seed's."""
    from samv2_components.matching.global_map import global_map_over_seeds

    settings = dict(matcher.global_map_kwargs)
    variants = {"most inliers of 1,000 samples (before 0.5)": {"consensus": "count", "iterations": 1000},
                f"{settings.get('consensus', 'lo-msac')}, {settings.get('iterations', 5000):,} samples (bundle)": {}}
    result = global_map_over_seeds(tp, qp, points, truth, variants, seeds, **settings)
    n_pairs = next(iter(result.values()))["n_pairs"]
    lines = [f"Global map alone over RANSAC seeds {seeds[0]}-{seeds[-1]} ({n_pairs} mutual pairs): MED of its prediction "
             "(mm) and its inliers", "",
             "| RANSAC | MED min | median | max | inliers min-max | seeds choosing seed 0's inliers |",
             "|:---|---:|---:|---:|---:|---:|"]
    for label, r in result.items():
        med = r["med_mm"]
        lines.append(f"| {label} | {np.nanmin(med):.2f} | {np.nanmedian(med):.2f} | {np.nanmax(med):.2f} | "
                     f"{min(r['n_inliers'])}-{max(r['n_inliers'])} | {r['same_as_first']} of {len(med)} |")
    return lines


def inter_subject(pipe: BundlePipeline, template_image, template_labels, query_image, query_labels, register: bool,
                  template_source=None, query_source=None):
    refiner = pipe.parsed("refiner")
    sources = {k: v for k, v in (("template_source", template_source), ("query_source", query_source)) if v is not None}
    pairs = organ_centroid_pairs(template_labels, query_labels, **sources)
    matcher, local = matcher_of(pipe), matcher_of(pipe, global_consistency=False)
    tp, qp = matcher.prepare(pipe.embed(template_image)), matcher.prepare(pipe.embed(query_image))
    src, truth, radii = pairs.template.coords, pairs.query.coords, pairs.radii_mm
    nn, nn_s = _timed(local.match, tp, qp, src, method="nearest_neighbour")
    fp_local, fp_local_s = _timed(local.match, tp, qp, src, method="fixed_point")
    fp, fp_s = _timed(matcher.match, tp, qp, src, method="fixed_point")
    refined, refine_s = _timed(
        lambda: refiner.refine(load_scan(template_image), src, load_scan(query_image), fp.points_lps,
                               local_linear=refiner.local_frames(matcher, tp, qp, src))
    )
    rows = [
        {"method": "identity (scanner coordinates)", **summarize_errors(src, truth, radii_mm=radii)},
    ]
    per_organ = {"NN": nn, "fixed-point (local)": fp_local, "fixed-point + global": fp}
    if register:
        from samv2_components.registration import register_intensity

        for transform in ("rigid", "affine"):
            reg = register_intensity(template_image, query_image, transform=transform)
            mapped = reg.map_points(src)
            rows.append(
                {
                    "method": f"SimpleITK {transform} (Mattes MI, moments init)",
                    **summarize_errors(mapped, truth, radii_mm=radii),
                    "time_s": reg.wall_time_s,
                }
            )
            per_organ[f"SimpleITK {transform}"] = mapped
    rows += [
        {"method": "SAMv2 NN", **summarize_errors(nn.points_lps, truth, radii_mm=radii), "time_s": nn_s, "flagged": _flag_rate(nn)},
        {"method": "SAMv2 fixed-point, local only (the paper)", **summarize_errors(fp_local.points_lps, truth, radii_mm=radii),
         "time_s": fp_local_s, "flagged": _flag_rate(fp_local)},
        {"method": "SAMv2 fixed-point + global consistency (bundle default)", **summarize_errors(fp.points_lps, truth, radii_mm=radii),
         "time_s": fp_s, "flagged": _flag_rate(fp)},
        {"method": f"SAMv2 fixed-point + global + refine ({100 * refined.accepted.mean():.0f} % refined)",
         **summarize_errors(refined.points_lps, truth, radii_mm=radii), "time_s": fp_s + refine_s, "flagged": _flag_rate(fp)},
    ]
    organ_lines = ["| organ | radius (mm) | " + " | ".join(per_organ) + " |", "|:---|---:|" + "---:|" * len(per_organ)]
    for i, name in enumerate(pairs.names):
        cells = []
        for result in per_organ.values():
            pts = result if isinstance(result, np.ndarray) else result.points_lps
            cell = f"{np.linalg.norm(pts[i] - truth[i]):.1f}"
            if not isinstance(result, np.ndarray):
                cell += "" if result.confident[i] else " (flagged)"
            cells.append(cell)
        organ_lines.append(f"| {name} | {radii[i]:.1f} | " + " | ".join(cells) + " |")
    return rows, organ_lines + ["", f"- {_global_note(fp)}", "", *ransac_stability(matcher, tp, qp, src, truth)]


def landmarks_across_subjects(pipe: BundlePipeline, query_image: str, query_labels: str, source) -> tuple[list[str], dict]:
    """The shipped template's named landmarks found in another subject's scan (as ``samv2 landmarks`` finds them:
    placed, or absent where the global map puts them outside the query), against the same rules applied to the
    query's label map (``source``: its vocabulary). Returns Markdown lines and the summary figures."""
    import nibabel as nib

    from samv2_components.geometry import convert_affine, convert_points
    from samv2_components.io.landmarks import derive_available_landmarks
    from samv2_components.io.points import read_points
    from samv2_components.matching.landmark_template import LANDMARK_RULES, TEMPLATE_LANDMARKS_SAMPLE, TEMPLATE_SAMPLE
    from samv2_components.sample_data import sample_path

    template = read_points(sample_path(TEMPLATE_LANDMARKS_SAMPLE))
    points = convert_points(template.coords, template.coordinate_system, "LPS")
    matcher = matcher_of(pipe)
    tp, qp = matcher.prepare(pipe.embed(sample_path(TEMPLATE_SAMPLE))), matcher.prepare(pipe.embed(query_image))
    result = matcher.match(tp, qp, points)
    placed = (np.asarray(result.predicted_inside, dtype=bool) if result.global_map is not None and result.global_map.valid
              else np.zeros(len(points), dtype=bool))
    image = nib.load(query_labels)
    truth = derive_available_landmarks(np.asarray(image.dataobj).astype(np.int64), convert_affine(image.affine, "RAS", "LPS"),
                                       source.names, [r for r in LANDMARK_RULES if r.name in template.names])
    lines = ["| landmark | truth in the query's labels | reported | error (mm) | confident |", "|:---|:---|:---|---:|:---|"]
    errors, confident_errors, wrongly_absent, unscored = [], [], 0, 0
    for i, name in enumerate(template.names):
        true = truth.get(name)
        error = None if true is None or not placed[i] else float(np.linalg.norm(result.points_lps[i] - np.asarray(true)))
        if error is not None:
            errors.append(error)
            if result.confident[i]:
                confident_errors.append(error)
        wrongly_absent += int(true is not None and not placed[i])
        unscored += int(true is None)
        lines.append(f"| {name} | {'yes' if true is not None else 'no'} | {'placed' if placed[i] else 'absent'} | "
                     f"{'-' if error is None else format(error, '.1f')} | {'yes' if placed[i] and result.confident[i] else 'no'} |")
    e = np.asarray(errors)
    figures = {"with_truth": len(template.names) - unscored, "placed_with_truth": len(e), "absent_with_truth": wrongly_absent,
               "med_mm": float(e.mean()) if len(e) else float("nan"), "cpm10": float(100 * np.mean(e < 10)) if len(e) else float("nan"),
               "confident": len(confident_errors), "confident_max_mm": max(confident_errors, default=float("nan")),
               "placed_without_truth": int(sum(placed[i] for i, n in enumerate(template.names) if truth.get(n) is None))}
    lines += ["", f"- {figures['with_truth']} of {len(template.names)} landmarks derivable from the query's labels: "
              f"{figures['placed_with_truth']} placed (MED {figures['med_mm']:.1f} mm, within 10 mm {figures['cpm10']:.0f} %), "
              f"{wrongly_absent} reported absent; confident {figures['confident']} (largest error "
              f"{figures['confident_max_mm']:.1f} mm); {figures['placed_without_truth']} placed without a truth to score"]
    return lines, figures


# ------------------------------------------------------------------------------------------------------ main
def main(
    image: str = DEFAULT_IMAGE,
    num_points: int = 300,
    seed: int = 0,
    absent_image: str | None = None,
    template_image: str = f"{BODY_CT}/example_ct_sm.nii.gz",
    template_labels: str = f"{BODY_CT}/example_seg.nii.gz",
    query_image: str = f"{BODY_CT}/example_ct_dicom",
    query_labels: str = f"{BODY_CT}/example_seg_dicom.nii.gz",
    register: bool = True,
    amos: bool = True,
    hard: bool = True,
    ckpt: str | None = None,
    output: str | None = None,
    device: str = "cpu",
    speed_only: bool = False,
    landmarks_only: bool = False,
):
    """Run the four sections and print the tables (see the module docstring).

    Args:
        image: intra-subject template scan (CT).
        num_points: intra-subject template points.
        seed: seeds the transform and the points.
        absent_image: scan without the template's anatomy (default: the abdominal sample CT ``ct_abdomen_2``).
        template_image, template_labels, query_image, query_labels: the inter-subject pair and label maps.
        register: run the SimpleITK baselines (needs the ``registration`` extra).
        amos: also the held-out AMOS CT (case 0336, AMOS labels) as an inter-subject query of the same template.
        hard: also the hard intra-subject set: rotations up to +-30 deg, translations up to +-50 mm (align, then
            match; its answers also refined as ``--refine true`` does).
        ckpt: weights (default: the bundle's ``models/model.pt``).
        output: also write the Markdown there.
        device: torch device.
        speed_only: only section 4 (speed after embedding) on the intra-subject pair; a minute instead of many.
        landmarks_only: only section 5 (the shipped template's named landmarks in the DICOM CT and the held-out AMOS
            CT, against the same rules on their label maps).
    """
    from samv2_components.sample_data import sample_path

    command = "python " + shlex.join([os.path.relpath(sys.argv[0]) if sys.argv else "scripts/benchmark_matching.py", *sys.argv[1:]])
    pipe = BundlePipeline(BUNDLE, ckpt=ckpt, device=device)
    if speed_only:
        case = known_transform_case(pipe, image, num_points, seed)
        matcher = matcher_of(pipe)
        tp, qp = matcher.prepare(case["template_heads"]), matcher.prepare(case["query_heads"])
        speed = speed_rows(matcher, tp, qp, case["template_heads"], case["query_heads"], case["points"], seed)
        text = "\n".join(["# SAMv2 matching speed (section 4 only)", "", f"- Command: `{command}`",
                          f"- Device: {device} ({torch.get_num_threads()} threads), torch {torch.__version__}, "
                          f"{datetime.datetime.now().astimezone().isoformat(timespec='seconds')}", "",
                          *_speed_table(speed), ""])
        print(text)
        if output:
            with open(output, "w", encoding="utf-8") as f:
                f.write(text)
        return
    if landmarks_only:
        from samv2_components.io.label_vocabulary import AMOS, TOTALSEGMENTATOR_CT

        text = ["# SAMv2 named landmarks across subjects (section 5 only)", "", f"- Command: `{command}`",
                f"- Device: {device} ({torch.get_num_threads()} threads), torch {torch.__version__}, "
                f"{datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
                "- Template: the shipped annotated template (`ct_abdomen`, 26 landmarks); truth: the same rules on the "
                "query's label map (TotalSegmentator for the DICOM CT, AMOS for AMOS 0336); a landmark is placed or "
                "reported absent as `samv2 landmarks` does (absent: the global map puts it outside the query).", ""]
        for title, q_image, q_labels, source in (("DICOM CT", query_image, query_labels, TOTALSEGMENTATOR_CT),
                                                 ("AMOS 0336 (held out)", f"{BODY_CT}/amos_0336_ct.nii.gz",
                                                  f"{BODY_CT}/amos_0336_labels.nii.gz", AMOS)):
            lines, _ = landmarks_across_subjects(pipe, q_image, q_labels, source)
            text += [f"## 5. Named landmarks: `ct_abdomen` -> {title}", "", *lines, ""]
        text = "\n".join(text)
        print(text)
        if output:
            with open(output, "w", encoding="utf-8") as f:
                f.write(text)
        return
    absent_image = absent_image or sample_path("ct_abdomen_2")
    rows, notes, fp, absent, scores, speed, stability = intra_subject(pipe, image, num_points, seed, absent_image)
    hard_section = []
    if hard:
        hard_rows, hard_notes, hard_fp, *_, hard_stability = intra_subject(pipe, image, num_points, seed, None, max_rotation_deg=30.0,
                                                          max_translation_mm=50.0, refine=False)
        hard_section = [f"## 1b. Intra-subject, hard: rotations up to ±30°, translations up to ±50 mm ({len(hard_fp)} points)",
                        "", *_accuracy_table(hard_rows), "", *[f"- {n}" for n in hard_notes], "", *hard_stability, ""]
    inter_rows, organ_lines = inter_subject(pipe, template_image, template_labels, query_image, query_labels, register)
    amos_section = []
    if amos:
        from samv2_components.io.label_vocabulary import AMOS, TOTALSEGMENTATOR_CT

        amos_image, amos_labels = f"{BODY_CT}/amos_0336_ct.nii.gz", f"{BODY_CT}/amos_0336_labels.nii.gz"
        amos_rows, amos_organs = inter_subject(pipe, template_image, template_labels, amos_image, amos_labels, register,
                                               template_source=TOTALSEGMENTATOR_CT, query_source=AMOS)
        amos_section = [f"## 3b. Inter-subject: organ centroids, `{template_image}` -> `{amos_image}` (held out)", "",
                        *_accuracy_table(amos_rows, radius_column=True), "", "Per organ (error in mm):", "", *amos_organs, ""]

    settings = ", ".join(f"{k}={v}" for k, v in pipe.settings("matcher").items())
    lines = [
        "# SAMv2 point matching benchmark",
        "",
        f"- Command: `{command}`",
        f"- Weights: `{os.path.relpath(pipe.ckpt, REPO)}`; matcher: {settings}",
        f"- Device: {device} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), "
        f"torch {torch.__version__}, monai {monai.__version__}, "
        f"{datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        "",
        f"## 1. Intra-subject: `{image}` vs a known transform of itself ({len(fp)} points)",
        "",
        *_accuracy_table(rows),
        "",
        *[f"- {n}" for n in notes],
        "",
        *stability,
        "",
        *hard_section,
        "## 2. Confidence flags",
        "",
        "| query | points | flagged confident=false (%) | fixed-point answers (%) | score p10 / p50 / p90 |",
        "|:---|---:|---:|---:|---:|",
    ]
    lines.append(
        f"| known transform of the template (anatomy present) | {len(fp)} | {_flag_rate(fp):.1f} | "
        f"{100 * np.mean([m == 'fixed_point' for m in fp.methods]):.1f} | "
        + " / ".join(f"{v:.3f}" for v in np.percentile(fp.scores, [10, 50, 90])) + " |"
    )
    if absent is not None:
        lines.append(
            f"| `{os.path.basename(absent_image)}` (anatomy absent) | {len(absent)} | {_flag_rate(absent):.1f} | "
            f"{100 * np.mean([m == 'fixed_point' for m in absent.methods]):.1f} | "
            + " / ".join(f"{v:.3f}" for v in np.percentile(absent.scores, [10, 50, 90])) + " |"
        )
    lines += ["", "Score percentiles (p5 / p25 / p50 / p75 / p95) by outcome:", ""]
    for name, s in scores.items():
        if len(s):
            lines.append(f"- {name} ({len(s)}): " + " / ".join(f"{v:.3f}" for v in np.percentile(s, [5, 25, 50, 75, 95])))
    lines += [
        "",
        f"## 3. Inter-subject: organ centroids, `{template_image}` -> `{query_image}`",
        "",
        *_accuracy_table(inter_rows, radius_column=True),
        "",
        "Per organ (error in mm; the template organ's centroid mapped into the query vs the query organ's centroid):",
        "",
        *organ_lines,
        "",
        *amos_section,
        "## 4. Speed after embedding",
        "",
        *_speed_table(speed),
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if output:
        with open(output, "w", encoding="utf-8") as f:
            f.write(text)


if __name__ == "__main__":
    fire.Fire(main)
