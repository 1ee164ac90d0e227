"""The reference transform of the CT-MR registration benchmark (``scripts/benchmark_registration.py``): no ground
truth exists for the phantom pair, so the CT -> MR rigid transform is derived by multi-start Mattes-MI registration
(:func:`derive_reference`) and checked for consistency and against the CT's metal markers (:func:`fiducial_check`).
:func:`slab_optima` measures how far each axial slab's own optimum lies from it: the reference's uncertainty where a
slab-sized scan is registered.

Conventions as :mod:`~samv2_components.registration.benchmark_cases`: world **LPS mm**; 4x4 matrices map **fixed**
(CT) points to **moving** (MR) points. Needs SimpleITK (the ``registration`` extra).

:func:`derive_reference`: one start per axis-aligned orientation (the 24 rotations of the cube, which include the
head-to-foot reversals), each around the body-mask centroids (the MR centroid is mapped onto the CT centroid);
Euler3D optimised with RegularStepGradientDescent on a 2-level pyramid of the coarse (3 mm) scans. Every result is
scored by the same full-sampling Mattes MI on the medium (2 mm) scans; the best few are refined on the medium scans,
restarted from perturbations of the best, and the best refined one is refined once more at the finest level.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import SimpleITK as sitk

from samv2_components.registration.benchmark_cases import (
    apply_matrix,
    axis_angle_rotation,
    body_grid_points,
    ct_body_mask,
    cube_rotations,
    image_box_contains,
    mask_centroid,
    matrix_to_sitk_transform,
    mr_body_mask,
    random_unit_vector,
    read_float,
    rigid_matrix,
    rotation_angle_deg,
    sitk_transform_to_matrix,
    tre,
    voxel_centres,
)

__all__ = [
    "derive_reference",
    "detect_ct_fiducials",
    "fiducial_check",
    "load_or_derive_reference",
    "mi_rigid",
    "mi_value",
    "nearest_void",
    "phantom_files",
    "slab_optima",
]


def phantom_files(data_dir: str) -> dict[str, str]:
    """:func:`derive_reference`'s inputs in the phantom folder ``data_dir`` (``ct_3mm``, ``mr_t2_3mm``,
    ``ct_2mm``, ``mr_t2_2mm``, ``ct_1mm``, ``mr_t2`` NIfTI files), as keyword arguments."""
    return {
        "ct_coarse": f"{data_dir}/ct_3mm.nii.gz",
        "mr_coarse": f"{data_dir}/mr_t2_3mm.nii.gz",
        "ct_medium": f"{data_dir}/ct_2mm.nii.gz",
        "mr_medium": f"{data_dir}/mr_t2_2mm.nii.gz",
        "ct_fine": f"{data_dir}/ct_1mm.nii.gz",
        "mr_fine": f"{data_dir}/mr_t2.nii.gz",
    }


def _mi_method(sampling: float, seed: int, shrink, sigmas, iterations: int, learning_rate: float):
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=50)
    if sampling >= 1.0:
        reg.SetMetricSamplingStrategy(reg.NONE)
    else:
        reg.SetMetricSamplingStrategy(reg.RANDOM)
        reg.SetMetricSamplingPercentage(float(sampling), int(seed) + 1)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=learning_rate, minStep=1e-3, numberOfIterations=iterations, relaxationFactor=0.5,
        gradientMagnitudeTolerance=1e-8,
    )
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel(list(shrink))
    reg.SetSmoothingSigmasPerLevel(list(sigmas))
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    return reg


def mi_rigid(fixed, moving, initial: np.ndarray, centre, shrink=(2, 1), sigmas=(4.0, 2.0), sampling=0.1,
             iterations=150, learning_rate=2.0, seed=0, fixed_mask=None) -> np.ndarray:
    """Mattes-MI rigid refinement of the fixed -> moving matrix ``initial``. The Euler3D transform (centre
    ``centre``) is optimised near the identity and composed before ``initial`` (ITK's moving initial transform:
    ``p -> initial(euler(p))``), so any start orientation works without Euler-angle gimbal lock. ``fixed_mask``
    (optional, on the fixed grid) restricts the metric to its voxels."""
    reg = _mi_method(sampling, seed, shrink, sigmas, iterations, learning_rate)
    if fixed_mask is not None:
        reg.SetMetricFixedMask(fixed_mask)
    euler = sitk.Euler3DTransform()
    euler.SetCenter([float(v) for v in centre])
    reg.SetMovingInitialTransform(matrix_to_sitk_transform(initial))
    reg.SetInitialTransform(euler, inPlace=True)
    reg.Execute(fixed, moving)
    return np.asarray(initial) @ sitk_transform_to_matrix(euler)


def mi_value(fixed, moving, matrix: np.ndarray, fixed_mask=None) -> float:
    """Mattes MI (all fixed voxels, 50 bins; lower is better) of ``moving`` at ``matrix(p)`` against ``fixed``."""
    reg = _mi_method(1.0, 0, (1,), (0.0,), 1, 1.0)
    reg.SetInitialTransform(matrix_to_sitk_transform(matrix))
    if fixed_mask is not None:
        reg.SetMetricFixedMask(fixed_mask)
    try:
        return float(reg.MetricEvaluate(fixed, moving))
    except RuntimeError:  # too few samples overlap
        return 0.0


def detect_ct_fiducials(ct_path: str, threshold_hu: float = 2500.0, merge_mm: float = 6.0) -> np.ndarray:
    """Centroids ``(K, 3)`` (LPS mm) of the CT's metal markers: > ``threshold_hu`` connected components, with
    components closer than ``merge_mm`` merged (a seed often splits in two at the threshold); weighted by voxels."""
    ct = sitk.ReadImage(ct_path)
    cc = sitk.ConnectedComponent(sitk.Cast(ct > threshold_hu, sitk.sitkUInt8))
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(cc)
    blobs = [(np.array(stats.GetCentroid(lab)), stats.GetNumberOfPixels(lab)) for lab in stats.GetLabels()]
    groups: list[list] = []
    for c, n in blobs:
        for g in groups:
            if min(np.linalg.norm(c - gc) for gc, _ in g) < merge_mm:
                g.append((c, n))
                break
        else:
            groups.append([(c, n)])
    out = [sum(c * n for c, n in g) / sum(n for _, n in g) for g in groups]
    return np.array(out).reshape(-1, 3)


def _void_map(mr: "SimpleITK.Image") -> "SimpleITK.Image":
    """Darkness of small spots: Gaussian(3 mm) - Gaussian(1 mm) of the MR (positive where a spot is darker than its
    surroundings), zero outside the MR body."""
    m = sitk.Cast(mr, sitk.sitkFloat32)
    dog = sitk.SmoothingRecursiveGaussian(m, 3.0) - sitk.SmoothingRecursiveGaussian(m, 1.0)
    body = sitk.BinaryErode(mr_body_mask(mr), [2, 2, 1])
    return sitk.Mask(dog, body)


def nearest_void(void: "SimpleITK.Image", point, search_mm: float) -> tuple[np.ndarray, float]:
    """The voxel of highest darkness within ``search_mm`` of ``point``: its position and darkness."""
    arr = sitk.GetArrayViewFromImage(void)
    c = np.array(void.TransformPhysicalPointToContinuousIndex([float(v) for v in point]))[::-1]
    r = search_mm / np.array(void.GetSpacing())[::-1]
    lo = np.maximum(0, np.floor(c - r)).astype(int)
    hi = np.minimum(arr.shape, np.ceil(c + r) + 1).astype(int)
    if np.any(hi <= lo):
        return np.full(3, np.nan), float("nan")
    idx = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij"), -1).reshape(-1, 3)
    pts = voxel_centres(void, idx)
    near = np.linalg.norm(pts - np.asarray(point), axis=1) <= search_mm
    vals = arr[tuple(idx[near].T)]
    best = int(np.argmax(vals))
    return pts[near][best], float(vals[best])


def fiducial_check(reference: np.ndarray, ct_path: str, mr_path: str, search_mm: float = 8.0, seed: int = 0) -> dict:
    """Map the CT fiducials into the MR with ``reference`` and measure the distance to the darkest spot (signal
    void) within ``search_mm``; the same for random CT body points as the chance level."""
    fiducials = detect_ct_fiducials(ct_path)
    if len(fiducials) == 0:
        return {"possible": False, "reason": f"no CT component above 2500 HU in {ct_path}"}
    mr = sitk.ReadImage(mr_path)
    void = _void_map(mr)
    mapped = apply_matrix(reference, fiducials)
    rows = []
    for f, m in zip(fiducials, mapped):
        pos, dark = nearest_void(void, m, search_mm)
        rows.append({"ct_lps": np.round(f, 2).tolist(), "mapped_mr_lps": np.round(m, 2).tolist(),
                     "void_mr_lps": np.round(pos, 2).tolist(), "residual_mm": round(float(np.linalg.norm(pos - m)), 2),
                     "darkness": round(dark, 1)})
    rng = np.random.default_rng(seed)
    ct = read_float(ct_path.replace("ct_1mm", "ct_2mm")) if "ct_1mm" in ct_path else read_float(ct_path)
    body = body_grid_points(ct, 4.0)
    body = body[image_box_contains(mr, apply_matrix(reference, body), -search_mm / min(mr.GetSpacing()))]
    controls = []
    for p in body[rng.choice(len(body), size=min(40, len(body)), replace=False)]:
        m = apply_matrix(reference, p)[0]
        pos, dark = nearest_void(void, m, search_mm)
        controls.append((float(np.linalg.norm(pos - m)), dark))
    res = np.array([r["residual_mm"] for r in rows])
    inside = np.array([image_box_contains(mr, [r["mapped_mr_lps"]])[0] for r in rows])
    ctrl = np.array(controls)
    return {
        "possible": True,
        "n_fiducials": int(len(rows)),
        "n_inside_mr_fov": int(inside.sum()),
        "search_mm": search_mm,
        "fiducials": rows,
        "residual_mm_median": round(float(np.median(res[inside])), 2) if inside.any() else None,
        "residual_mm_mean": round(float(np.mean(res[inside])), 2) if inside.any() else None,
        "darkness_median": round(float(np.median([r["darkness"] for r, i in zip(rows, inside) if i])), 1) if inside.any() else None,
        "random_points_residual_mm_median": round(float(np.median(ctrl[:, 0])), 2),
        "random_points_darkness_median": round(float(np.median(ctrl[:, 1])), 1),
        # informative only when the markers' voids are clearly closer and darker than what random points find
        "conclusive": bool(inside.any() and np.median(res[inside]) < 0.5 * np.median(ctrl[:, 0])
                           and np.median([r["darkness"] for r, i in zip(rows, inside) if i]) > 1.5 * np.median(ctrl[:, 1])),
    }


def slab_optima(
    fixed: "SimpleITK.Image",
    moving: "SimpleITK.Image",
    reference: np.ndarray,
    thickness_mm: float = 40.0,
    step_mm: float = 20.0,
    starts: int = 5,
    perturbation_deg: float = 5.0,
    perturbation_mm: float = 5.0,
    point_spacing_mm: float = 6.0,
    sampling: float = 0.3,
    seed: int = 0,
) -> list[dict]:
    """Where each axial slab of the fixed scan's body would put the reference if it were registered alone.

    A whole-scan rigid reference is a compromise over the whole body: where the object is not exactly rigid
    between the two acquisitions (or the similarity is biased locally), a slab-sized scan has its own optimum,
    and no registration of that slab can be expected to land closer to the reference than that optimum does.
    For every slab ``[z, z + thickness_mm]`` (LPS z, the scanner's table axis; one every ``step_mm`` over the
    fixed body), Mattes MI (50 bins, 2-level pyramid at 2x and 1x the grid, Gaussian 2 / 1 mm) is optimised over
    a rigid transform with the metric restricted to the fixed body inside the slab, the moving scan whole
    (so no cut edge pulls the optimum), from the reference and from ``starts - 1`` perturbations of it
    (``perturbation_deg`` about a random axis through the slab, ``perturbation_mm`` along a random direction).

    Args:
        fixed, moving: the CT and the MR (SimpleITK, LPS); 4x4 matrices map fixed -> moving points, LPS mm.
        reference: the 4x4 reference transform.
        point_spacing_mm: grid of the fixed body points the distances are averaged over.
        sampling: fraction of the slab's voxels sampled per iteration (seeded per start).

    Returns:
        one dict per slab: ``z_mm`` (its range), ``points`` (``(N, 3)`` its fixed body points, LPS mm, on the
        ``point_spacing_mm`` grid), ``optimum`` (the 4x4 from the reference start),
        ``to_reference_mm`` (mean distance over the slab's points between the optimum and the reference),
        ``start_spread_mm`` (mean over the other starts of their mean distance to the optimum: how precise the
        optimum is), ``mi_reference`` / ``mi_optimum`` (Mattes MI on the slab, lower is better) and
        ``shift_mm`` (optimum minus reference at the slab's centre, LPS).
    """
    body = ct_body_mask(fixed)
    mask_array = sitk.GetArrayFromImage(body)
    index = np.argwhere(mask_array > 0)
    z_body = voxel_centres(fixed, index)[:, 2]
    points_all = body_grid_points(fixed, point_spacing_mm)
    rng = np.random.default_rng(seed)
    rows = []
    for z0 in np.arange(z_body.min(), z_body.max() - thickness_mm + 1e-6, step_mm):
        inside = (z_body >= z0) & (z_body <= z0 + thickness_mm)
        points = points_all[(points_all[:, 2] >= z0) & (points_all[:, 2] <= z0 + thickness_mm)]
        if not inside.any() or len(points) < 4:
            continue
        slab = np.zeros_like(mask_array, dtype=np.uint8)
        slab[tuple(index[inside].T)] = 1
        slab_mask = sitk.GetImageFromArray(slab)
        slab_mask.CopyInformation(fixed)
        centre = points.mean(0)
        ends = []
        for k in range(int(starts)):
            start = np.asarray(reference, dtype=np.float64)
            if k:  # the perturbation acts on the fixed side, about the slab's centre
                start = start @ rigid_matrix(axis_angle_rotation(rng.normal(size=3), perturbation_deg),
                                             translation=perturbation_mm * random_unit_vector(rng), centre=centre)
            ends.append(mi_rigid(fixed, moving, start, centre, shrink=(2, 1), sigmas=(2.0, 1.0), sampling=sampling,
                                 iterations=200, learning_rate=1.0, seed=seed + k, fixed_mask=slab_mask))
        optimum = ends[0]
        shift = apply_matrix(optimum, centre[None])[0] - apply_matrix(reference, centre[None])[0]
        rows.append({
            "z_mm": [round(float(z0), 1), round(float(z0 + thickness_mm), 1)],
            "points": points,
            "optimum": optimum,
            "to_reference_mm": tre(optimum, reference, points),
            "start_spread_mm": float(np.mean([tre(e, optimum, points) for e in ends[1:]])) if len(ends) > 1 else 0.0,
            "mi_reference": mi_value(fixed, moving, reference, slab_mask),
            "mi_optimum": mi_value(fixed, moving, optimum, slab_mask),
            "shift_mm": shift.tolist(),
        })
    return rows


def derive_reference(
    ct_coarse: str,
    mr_coarse: str,
    ct_medium: str,
    mr_medium: str,
    ct_fine: str | None = None,
    mr_fine: str | None = None,
    top_k: int = 4,
    n_perturbed: int = 6,
    seed: int = 0,
    log=print,
) -> dict:
    """Reference CT -> MR rigid transform by multi-start Mattes MI (module docstring) from the coarse (3 mm), medium
    (2 mm) and optional finest scans (paths; :func:`phantom_files` names the phantom's). Returns a JSON-ready dict
    with ``fixed_to_moving`` (4x4, CT LPS mm -> MR LPS mm), every start's metric, the spread of the top solutions
    and the fiducial check (:func:`fiducial_check`, on the finest scans when they exist)."""
    t0 = time.perf_counter()
    ct3, mr3, ct2, mr2 = read_float(ct_coarse), read_float(mr_coarse), read_float(ct_medium), read_float(mr_medium)
    c_ct, c_mr = mask_centroid(ct_body_mask(ct3)), mask_centroid(mr_body_mask(mr3))
    ct2_mask = ct_body_mask(ct2)
    starts = []
    for i, R in enumerate(cube_rotations()):
        init = rigid_matrix(R, translation=c_mr - c_ct, centre=c_ct)
        try:
            m = mi_rigid(ct3, mr3, init, c_ct, shrink=(2, 1), sigmas=(4.0, 2.0), sampling=0.1, iterations=150, seed=seed)
            value = mi_value(ct2, mr2, m, ct2_mask)
        except RuntimeError as exc:
            m, value = init, 0.0
            log(f"  start {i}: failed ({str(exc).strip().splitlines()[-1][:80]})")
        starts.append({"start": i, "initial_rotation": R.astype(int).tolist(), "metric_2mm": value, "matrix": m})
        log(f"  start {i:2d}: rotation {rotation_angle_deg(R):5.1f} deg -> MI {value:.4f}")
    order = sorted(starts, key=lambda s: s["metric_2mm"])
    refined = []
    for s in order[:top_k]:
        m = mi_rigid(ct2, mr2, s["matrix"], c_ct, shrink=(2, 1), sigmas=(2.0, 1.0), sampling=0.2, iterations=200,
                     learning_rate=1.0, seed=seed)
        refined.append({"start": s["start"], "metric_2mm": mi_value(ct2, mr2, m, ct2_mask), "matrix": m})
        log(f"  refined start {s['start']:2d}: MI {refined[-1]['metric_2mm']:.4f}")
    refined.sort(key=lambda s: s["metric_2mm"])
    best2 = refined[0]["matrix"]
    # consistency: restarts from the best solution perturbed by 10 deg (random axes) and 10 mm
    rng = np.random.default_rng(seed)
    for k in range(n_perturbed):
        offset = rigid_matrix(axis_angle_rotation(rng.normal(size=3), 10.0), translation=10.0 * random_unit_vector(rng), centre=c_ct)
        m = mi_rigid(ct2, mr2, best2 @ offset, c_ct, shrink=(2, 1), sigmas=(2.0, 1.0), sampling=0.2, iterations=200,
                     learning_rate=1.0, seed=seed + 1 + k)
        refined.append({"start": f"best+perturbation {k}", "metric_2mm": mi_value(ct2, mr2, m, ct2_mask), "matrix": m})
        log(f"  perturbed restart {k}: MI {refined[-1]['metric_2mm']:.4f}")
    best = best2
    fine_note = "no finest-level refinement"
    if ct_fine and mr_fine and os.path.exists(ct_fine) and os.path.exists(mr_fine):
        ct1, mr1 = read_float(ct_fine), read_float(mr_fine)
        best = mi_rigid(ct1, mr1, best2, c_ct, shrink=(1,), sigmas=(0.5,), sampling=0.02, iterations=100,
                        learning_rate=0.5, seed=seed)
        fine_note = f"refined on {os.path.basename(ct_fine)} / {os.path.basename(mr_fine)}"
        del ct1, mr1
    points = body_grid_points(ct2, 8.0)
    best_metric = mi_value(ct2, mr2, best, ct2_mask)
    spread = [
        {"start": s["start"], "metric_2mm": round(s["metric_2mm"], 4), "distance_to_best_mm": round(tre(s["matrix"], best, points), 2)}
        for s in refined
    ]
    near = [s["distance_to_best_mm"] for s in spread if s["metric_2mm"] <= 0.98 * best_metric]  # within 2 % of best MI
    log(f"  best MI {best_metric:.4f}; top solutions: {spread}")
    fid = fiducial_check(best, ct_fine if ct_fine and os.path.exists(ct_fine) else ct_medium,
                         mr_fine if mr_fine and os.path.exists(mr_fine) else mr_medium, seed=seed)
    return {
        "fixed_to_moving": best.tolist(),
        "convention": "4x4, fixed (CT) LPS mm -> moving (MR) LPS mm",
        "method": "multi-start Mattes-MI rigid (SimpleITK Euler3D, RegularStepGradientDescent): 24 axis-aligned "
        f"start orientations about the body centroids on the 3 mm scans, ranked by full-sampling MI on the 2 mm "
        f"scans, top {top_k} refined on the 2 mm scans, best {fine_note}",
        "inputs": {"ct": [ct_coarse, ct_medium, ct_fine], "mr": [mr_coarse, mr_medium, mr_fine]},
        "rotation_deg": round(rotation_angle_deg(best), 2),
        "translation_mm": np.round(best[:3, 3], 2).tolist(),
        "metric_2mm": round(best_metric, 4),
        "starts": [{"start": s["start"], "initial_rotation": s["initial_rotation"], "metric_2mm": round(s["metric_2mm"], 4),
                    "distance_to_best_mm": round(tre(s["matrix"], best, points), 1)} for s in starts],
        "top_solutions": spread,
        "spread_mm_within_2pct_metric": {"n": len(near), "mean": round(float(np.mean(near)), 2) if near else None,
                                         "max": max(near) if near else None},
        "fine_refinement_shift_mm": round(tre(best2, best, points), 2),
        "fiducial_check": fid,
        "wall_time_s": round(time.perf_counter() - t0, 1),
    }


def load_or_derive_reference(path: str | None, log=print, **kwargs) -> dict:
    """The cached reference JSON at ``path`` if it exists, else :func:`derive_reference` (written to ``path``)."""
    if path and os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            ref = json.load(f)
        log(f"reference transform: reusing {path}")
        return ref
    log("reference transform: multi-start Mattes MI (about 2 minutes) ...")
    ref = derive_reference(log=log, **kwargs)
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(ref, f, indent=1)
        log(f"reference transform written to {path}")
    return ref
