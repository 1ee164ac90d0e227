"""CT–MR rigid registration benchmark on the porcine phantom pair: SAMv2 CrossSAM/AdaReg (the
``crosssam_registration`` bundle) against SimpleITK, elastix and ANTs rigid registration, on the same cases.
Prints Markdown tables (and writes them with ``--output``), a per-case CSV and a box plot (paper Fig. 7 style).

Data: ``/work/shared/data/ct_mr_phantom`` (TCIA MRI-DIR porcine phantom; CT and T2 MR in different frames of
reference, never registered, different fields of view). Convention everywhere: a transform is a 4x4 matrix (or an
ITK transform) mapping **fixed** (CT) physical points, LPS mm, to **moving** (MR) physical points.

1. **Reference transform** (:func:`derive_reference`; no ground truth exists). Multi-start Mattes-MI rigid
   registration of the MR (moving) to the CT (fixed) with SimpleITK: one start per axis-aligned orientation (the 24
   rotations of the cube, which include the head-to-foot reversals), each around the body-mask centroids (the MR
   centroid is mapped onto the CT centroid); Euler3D optimised with RegularStepGradientDescent on a 2-level
   pyramid of the 3 mm scans. Every result is scored by the same full-sampling Mattes MI on the 2 mm scans; the
   best few are refined on the 2 mm scans and the best refined one is refined once more at the finest level (CT
   1 mm, native MR). Reported: the metric of every start, the spread (mean distance over the CT body) between the
   best solution and the other refined solutions that reached about the same metric, and a fiducial check: the
   gold markers of the CT (> 2500 HU components of the 1 mm CT, merged within 6 mm) are mapped into the native MR
   and the nearest signal void (the darkest spot of a difference-of-Gaussians within ``search_mm``) is located;
   the residuals are compared with the same search from random body points (a void is found anywhere in this
   heterogeneous tissue: residuals are only informative when clearly below the random-point ones).
   The result is cached as JSON (``--reference`` reuses it).
2. **Cases** (:func:`make_cases`): a random rigid offset ``D`` in the MR frame (rotation about a random axis, angle
   uniform in ±``max_rotation_deg``, about the MR body centroid; translation uniform in ±``max_translation_mm`` per
   axis) and a random crop of the MR body extent along one or two axes (50–80 % kept). The case's moving image is
   ``M_case(y) = MR(D^-1(y))`` on an axis-aligned 2 mm grid covering the cropped region, so its true
   fixed -> moving transform is ``T_case = D ∘ T_ref`` (a CT point p shows in the MR at ``T_ref(p)``, which the
   offset moves to ``D(T_ref(p))``). Two case sets (``--orientations``), same random offsets and crops:
   ``acquired`` (the MR as acquired: the reference rotates by ~180 deg, the MR lies head-to-foot reversed relative
   to the CT) and ``aligned`` (``D`` also undoes that reversal with the nearest axis-aligned rotation, so the
   headers agree up to the random offset, the situation of scans in consistent patient coordinates).
3. **Methods** (each returns a fixed -> moving 4x4 LPS matrix, or a reported failure, and its wall time):
   AdaReg rigid through the bundle's ``configs/inference.json`` (preprocessing, network, weights, inferer,
   ``adareg``; time = embedding both scans + rigid fit; a reported failure counts as a failure and is scored with
   the identity transform), SimpleITK rigid (:func:`~samv2_components.registration.register_intensity`), elastix
   rigid (itk-elastix default ``rigid`` parameter map, warmed up once outside the timing), ANTs rigid (antspyx in
   a separate virtual environment, through ``scripts/_ants_rigid.py``; skipped with the reason when unavailable).
4. **Metrics**: TRE of a case = mean over points p of ``|T_est(p) - T_case(p)|``, points on a ``--tre_spacing``
   grid inside the CT body (HU > -300, largest component) that ``T_case`` maps inside the moving image's field of
   view. Per method: mean ± std, median, success rate (TRE < ``success_mm``), mean wall time.

Example (the full run, 20 cases in each of the two sets, about 15-20 minutes on 2 CPU cores: ~2 min for the reference,
~35 s per case pair; see ``--help``)::

    python3 -m venv .venv-ants && .venv-ants/bin/pip install --only-binary :all: antspyx   # once, for the ANTs row
    OMP_NUM_THREADS=2 python scripts/benchmark_registration.py --output bundles/crosssam_registration/docs/benchmark_registration.md

It writes the Markdown, ``<output stem>_reference.json`` (reused on the next run), ``<output stem>_cases.csv`` and
``docs/benchmark_boxplot.png`` (MR as acquired) / ``docs/benchmark_boxplot_aligned.png``.
"""

from __future__ import annotations

import csv
import datetime
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

try:
    import samv2_components  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fire
import numpy as np
import SimpleITK as sitk

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLE = os.path.join(REPO, "bundles", "crosssam_registration")
DATA = "/work/shared/data/ct_mr_phantom"
ANTS_PYTHON = os.path.join(REPO, ".venv-ants", "bin", "python")
ANTS_HELPER = os.path.join(REPO, "scripts", "_ants_rigid.py")
BODY_HU = -300.0


# ------------------------------------------------------------------------------------------------ geometry
def rigid_matrix(rotation: np.ndarray | None = None, translation=(0.0, 0.0, 0.0), centre=(0.0, 0.0, 0.0)) -> np.ndarray:
    """4x4 matrix of ``p -> R (p - c) + c + t``."""
    R = np.eye(3) if rotation is None else np.asarray(rotation, dtype=np.float64)
    c = np.asarray(centre, dtype=np.float64)
    m = np.eye(4)
    m[:3, :3] = R
    m[:3, 3] = c - R @ c + np.asarray(translation, dtype=np.float64)
    return m


def axis_angle(axis, angle_deg: float) -> np.ndarray:
    """3x3 rotation by ``angle_deg`` about ``axis`` (Rodrigues)."""
    a = np.asarray(axis, dtype=np.float64)
    a = a / np.linalg.norm(a)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    t = np.radians(angle_deg)
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k


def rotation_angle_deg(matrix: np.ndarray) -> float:
    R = np.asarray(matrix)[:3, :3]
    return float(np.degrees(np.arccos(np.clip((np.trace(R) - 1.0) / 2.0, -1.0, 1.0))))


def apply_matrix(matrix: np.ndarray, points) -> np.ndarray:
    """Map ``(N, 3)`` points with a 4x4 matrix."""
    p = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    return p @ np.asarray(matrix)[:3, :3].T + np.asarray(matrix)[:3, 3]


def transform_to_matrix(transform) -> np.ndarray:
    """4x4 matrix of an affine-like SimpleITK transform (incl. composites), from the images of 0 and the unit
    vectors (exact for any affine map)."""
    o = np.array(transform.TransformPoint((0.0, 0.0, 0.0)))
    m = np.eye(4)
    m[:3, 3] = o
    for i in range(3):
        e = [0.0, 0.0, 0.0]
        e[i] = 1.0
        m[:3, i] = np.array(transform.TransformPoint(tuple(e))) - o
    return m


def matrix_to_transform(matrix: np.ndarray) -> "sitk.AffineTransform":
    t = sitk.AffineTransform(3)
    t.SetMatrix(np.asarray(matrix, dtype=np.float64)[:3, :3].ravel().tolist())
    t.SetTranslation(np.asarray(matrix, dtype=np.float64)[:3, 3].tolist())
    return t


def tre(estimate: np.ndarray, truth: np.ndarray, points) -> float:
    """Mean distance between ``estimate(p)`` and ``truth(p)`` over ``points`` ``(N, 3)`` (mm)."""
    return float(np.mean(np.linalg.norm(apply_matrix(estimate, points) - apply_matrix(truth, points), axis=1)))


def _unit(rng) -> np.ndarray:
    v = rng.normal(size=3)
    return v / np.linalg.norm(v)


def cube_rotations() -> list[np.ndarray]:
    """The 24 axis-aligned rotations (float 3x3, identity first): the package's orientation-search candidates."""
    from samv2_components.registration import axis_aligned_rotations

    return [r.astype(np.float64) for r in axis_aligned_rotations()]


def image_box_contains(image: "sitk.Image", points, margin_vox: float = 0.5) -> np.ndarray:
    """Which physical points ``(N, 3)`` lie inside the image's voxel grid (centres, ± ``margin_vox``)."""
    p = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    D = np.array(image.GetDirection()).reshape(3, 3)
    S = np.array(image.GetSpacing())
    idx = ((p - np.array(image.GetOrigin())) @ D) / S
    size = np.array(image.GetSize())
    return np.all((idx >= -margin_vox) & (idx <= size - 1 + margin_vox), axis=1)


def voxel_centres(image: "sitk.Image", index_zyx: np.ndarray) -> np.ndarray:
    """Physical points of numpy (z, y, x) indices."""
    ijk = np.asarray(index_zyx, dtype=np.float64)[:, ::-1]
    D = np.array(image.GetDirection()).reshape(3, 3)
    return np.array(image.GetOrigin()) + (ijk * np.array(image.GetSpacing())) @ D.T


# ------------------------------------------------------------------------------------------------ masks
def largest_component(mask: "sitk.Image") -> "sitk.Image":
    return sitk.RelabelComponent(sitk.ConnectedComponent(mask), sortByObjectSize=True) == 1


def ct_body_mask(ct: "sitk.Image") -> "sitk.Image":
    """CT body: HU > -300, largest connected component."""
    return largest_component(sitk.Cast(ct > BODY_HU, sitk.sitkUInt8))


def mr_body_mask(mr: "sitk.Image") -> "sitk.Image":
    """MR body: above the Otsu threshold of the smoothed scan, largest component, holes closed."""
    smooth = sitk.SmoothingRecursiveGaussian(sitk.Cast(mr, sitk.sitkFloat32), 2.0)
    mask = largest_component(sitk.OtsuThreshold(smooth, 0, 1))
    return sitk.BinaryFillhole(sitk.BinaryMorphologicalClosing(mask, [2, 2, 2]))


def mask_centroid(mask: "sitk.Image") -> np.ndarray:
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(sitk.Cast(mask, sitk.sitkUInt8))
    return np.array(stats.GetCentroid(1))


def body_grid_points(ct: "sitk.Image", spacing_mm: float) -> np.ndarray:
    """Physical points of a ``spacing_mm`` grid on the CT body mask."""
    mask = sitk.GetArrayFromImage(ct_body_mask(ct)).astype(bool)
    stride = np.maximum(1, np.rint(spacing_mm / np.array(ct.GetSpacing())[::-1])).astype(int)
    sub = mask[stride[0] // 2 :: stride[0], stride[1] // 2 :: stride[1], stride[2] // 2 :: stride[2]]
    idx = np.argwhere(sub) * stride + stride // 2
    return voxel_centres(ct, idx)


def read(path: str) -> "sitk.Image":
    return sitk.Cast(sitk.ReadImage(path), sitk.sitkFloat32)


# ------------------------------------------------------------------------------------------------ reference
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
             iterations=150, learning_rate=2.0, seed=0) -> np.ndarray:
    """Mattes-MI rigid refinement of the fixed -> moving matrix ``initial``. The Euler3D transform (centre
    ``centre``) is optimised near the identity and composed before ``initial`` (ITK's moving initial transform:
    ``p -> initial(euler(p))``), so any start orientation works without Euler-angle gimbal lock."""
    reg = _mi_method(sampling, seed, shrink, sigmas, iterations, learning_rate)
    euler = sitk.Euler3DTransform()
    euler.SetCenter([float(v) for v in centre])
    reg.SetMovingInitialTransform(matrix_to_transform(initial))
    reg.SetInitialTransform(euler, inPlace=True)
    reg.Execute(fixed, moving)
    return np.asarray(initial) @ transform_to_matrix(euler)


def mi_value(fixed, moving, matrix: np.ndarray, fixed_mask=None) -> float:
    """Mattes MI (all fixed voxels, 50 bins; lower is better) of ``moving`` at ``matrix(p)`` against ``fixed``."""
    reg = _mi_method(1.0, 0, (1,), (0.0,), 1, 1.0)
    reg.SetInitialTransform(matrix_to_transform(matrix))
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


def _void_map(mr: "sitk.Image") -> "sitk.Image":
    """Darkness of small spots: Gaussian(3 mm) - Gaussian(1 mm) of the MR (positive where a spot is darker than its
    surroundings), zero outside the MR body."""
    m = sitk.Cast(mr, sitk.sitkFloat32)
    dog = sitk.SmoothingRecursiveGaussian(m, 3.0) - sitk.SmoothingRecursiveGaussian(m, 1.0)
    body = sitk.BinaryErode(mr_body_mask(mr), [2, 2, 1])
    return sitk.Mask(dog, body)


def nearest_void(void: "sitk.Image", point, search_mm: float) -> tuple[np.ndarray, float]:
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
    ct = read(ct_path.replace("ct_1mm", "ct_2mm")) if "ct_1mm" in ct_path else read(ct_path)
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


def derive_reference(
    ct_coarse: str = f"{DATA}/ct_3mm.nii.gz",
    mr_coarse: str = f"{DATA}/mr_t2_3mm.nii.gz",
    ct_medium: str = f"{DATA}/ct_2mm.nii.gz",
    mr_medium: str = f"{DATA}/mr_t2_2mm.nii.gz",
    ct_fine: str | None = f"{DATA}/ct_1mm.nii.gz",
    mr_fine: str | None = f"{DATA}/mr_t2.nii.gz",
    top_k: int = 4,
    n_perturbed: int = 6,
    seed: int = 0,
    log=print,
) -> dict:
    """Reference CT -> MR rigid transform by multi-start Mattes MI (module docstring, step 1). Returns a JSON-ready
    dict with ``fixed_to_moving`` (4x4 LPS), every start's metric, the spread of the top solutions and the fiducial
    check."""
    t0 = time.perf_counter()
    ct3, mr3, ct2, mr2 = read(ct_coarse), read(mr_coarse), read(ct_medium), read(mr_medium)
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
        offset = rigid_matrix(axis_angle(rng.normal(size=3), 10.0), translation=10.0 * _unit(rng), centre=c_ct)
        m = mi_rigid(ct2, mr2, best2 @ offset, c_ct, shrink=(2, 1), sigmas=(2.0, 1.0), sampling=0.2, iterations=200,
                     learning_rate=1.0, seed=seed + 1 + k)
        refined.append({"start": f"best+perturbation {k}", "metric_2mm": mi_value(ct2, mr2, m, ct2_mask), "matrix": m})
        log(f"  perturbed restart {k}: MI {refined[-1]['metric_2mm']:.4f}")
    best = best2
    fine_note = "no finest-level refinement"
    if ct_fine and mr_fine and os.path.exists(ct_fine) and os.path.exists(mr_fine):
        ct1, mr1 = read(ct_fine), read(mr_fine)
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


# ------------------------------------------------------------------------------------------------ cases
@dataclass
class Case:
    """One benchmark case: the CT (fixed) against a rigidly offset, cropped resampling of the MR (moving).

    Attributes:
        name: case id.
        fixed_path, moving_path: the NIfTI files.
        offset: ``D``, 4x4 rigid map in the MR frame (MR point -> case moving point).
        truth: ``T_case = D @ T_ref``, fixed -> case moving (LPS mm).
        points: ``(N, 3)`` CT points for the TRE (body grid points that ``truth`` maps inside the case's data).
        info: offset angle / translation / crop, for the tables.
    """

    name: str
    fixed_path: str
    moving_path: str
    offset: np.ndarray
    truth: np.ndarray
    points: np.ndarray
    info: dict = field(default_factory=dict)


def _box_corners(lo, hi) -> np.ndarray:
    return np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])])


def _grid_box(image: "sitk.Image") -> tuple[np.ndarray, np.ndarray]:
    """Physical bounding box (outer voxel faces) of an axis-aligned image."""
    size = np.array(image.GetSize())
    corners = voxel_centres(image, _box_corners([-0.5] * 3, size[::-1] - 0.5))
    return corners.min(0), corners.max(0)


def case_image(mr: "sitk.Image", offset: np.ndarray, lo, hi, spacing: float) -> "sitk.Image":
    """``M(y) = MR(offset^-1(y))`` on the axis-aligned ``spacing`` grid covering the box ``[lo, hi]`` (LPS mm;
    identity direction), zero outside the MR's field of view."""
    lo, hi = np.asarray(lo, float), np.asarray(hi, float)
    size = np.maximum(2, np.floor((hi - lo) / spacing).astype(int))
    grid = sitk.Image([int(v) for v in size], sitk.sitkFloat32)
    grid.SetSpacing([float(spacing)] * 3)
    grid.SetOrigin((lo + spacing / 2.0).tolist())
    # ITK's Resample maps output points through the transform into the input: out(y) = MR(transform(y))
    return sitk.Resample(mr, grid, matrix_to_transform(np.linalg.inv(offset)), sitk.sitkLinear, 0.0, sitk.sitkFloat32)


def case_points(ct: "sitk.Image", reference: np.ndarray, truth: np.ndarray, mr: "sitk.Image", moving: "sitk.Image",
                spacing_mm: float) -> np.ndarray:
    """CT body grid points whose true position lies inside the case's moving image and inside the MR's FOV."""
    points = body_grid_points(ct, spacing_mm)
    keep = image_box_contains(moving, apply_matrix(truth, points), 0.0) & image_box_contains(mr, apply_matrix(reference, points), 0.0)
    return points[keep]


def make_cases(
    n: int = 20,
    seed: int = 0,
    reference: np.ndarray | None = None,
    work_dir: str | None = None,
    ct_path: str = f"{DATA}/ct_2mm.nii.gz",
    mr_path: str = f"{DATA}/mr_t2_2mm.nii.gz",
    max_rotation_deg: float = 20.0,
    max_translation_mm: float = 40.0,
    keep_range: tuple[float, float] = (0.5, 0.8),
    tre_spacing_mm: float = 8.0,
    min_points: int = 100,
    spacing_mm: float = 2.0,
    pre_rotation: np.ndarray | None = None,
    prefix: str = "case",
    crop: bool = True,
) -> list[Case]:
    """Draw ``n`` cases (seeded) and write their moving images to ``work_dir`` (NIfTI).

    For each case: ``D`` = rotation by ``U(-max_rotation_deg, max_rotation_deg)`` about a random axis through the MR
    body centroid, then a translation ``U(-max_translation_mm, max_translation_mm)`` per axis. The moving image
    is the MR resampled as ``M(y) = MR(D^-1(y))`` on an axis-aligned 2 mm grid covering ``D`` (MR grid), cropped
    along one or two random axes to a random window keeping ``keep_range`` of the (offset) MR body's extent.

    Composition: the reference says CT point p shows at ``T_ref(p)`` in the MR; the moving image shows the MR point
    q at ``D(q)``; hence p shows at ``T_case(p) = D(T_ref(p))``, i.e. ``T_case = D @ T_ref`` (4x4, applied to column
    vectors). A draw whose overlap keeps fewer than ``min_points`` TRE points is redrawn.

    ``pre_rotation`` (3x3, optional): an extra rotation ``F`` about the MR body centroid applied before the random
    offset, ``D = D_random @ F`` (the "aligned" set uses the axis-aligned rotation that undoes the reference's
    head-to-foot reversal, so that the scans' headers agree up to the random offset). ``T_case = D @ T_ref`` holds
    for either.

    ``crop=False`` keeps the whole (offset) MR grid (the "native" set: no offset, no crop, the pair as it comes).
    """
    if reference is None:
        raise ValueError("make_cases needs the reference fixed -> moving matrix")
    reference = np.asarray(reference, dtype=np.float64)
    work_dir = work_dir or tempfile.mkdtemp(prefix="samv2_regbench_")
    os.makedirs(work_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    ct, mr = read(ct_path), read(mr_path)
    mr_mask = mr_body_mask(mr)
    centre = mask_centroid(mr_mask)
    body_idx = np.argwhere(sitk.GetArrayViewFromImage(mr_mask))
    body_lo, body_hi = body_idx.min(0), body_idx.max(0)
    body_corners = voxel_centres(mr, _box_corners(body_lo - 0.5, body_hi + 0.5))
    grid_lo, grid_hi = _grid_box(mr)
    cases = []
    while len(cases) < n:
        angle = float(rng.uniform(-max_rotation_deg, max_rotation_deg))
        axis = _unit(rng)
        translation = rng.uniform(-max_translation_mm, max_translation_mm, 3)
        offset = rigid_matrix(axis_angle(axis, angle), translation=translation, centre=centre)
        if pre_rotation is not None:
            offset = offset @ rigid_matrix(pre_rotation, centre=centre)
        content = apply_matrix(offset, _box_corners(grid_lo, grid_hi))
        lo, hi = content.min(0), content.max(0)
        body = apply_matrix(offset, body_corners)
        b_lo, b_hi = body.min(0), body.max(0)
        axes = sorted(rng.choice(3, size=int(rng.integers(1, 3)), replace=False).tolist()) if crop else []
        kept = {}
        for ax in axes:
            keep = float(rng.uniform(*keep_range))
            length = (b_hi[ax] - b_lo[ax]) * keep
            start = b_lo[ax] + rng.uniform(0.0, 1.0 - keep) * (b_hi[ax] - b_lo[ax])
            lo[ax], hi[ax] = max(lo[ax], start), min(hi[ax], start + length)
            kept["LPS"[ax]] = round(keep, 2)
        moving = case_image(mr, offset, lo, hi, spacing_mm)
        truth = offset @ reference
        points = case_points(ct, reference, truth, mr, moving, tre_spacing_mm)
        if len(points) < min_points:
            continue
        name = f"{prefix}{len(cases):02d}"
        path = os.path.join(work_dir, f"{name}_mr.nii.gz")
        sitk.WriteImage(moving, path)
        cases.append(
            Case(name, ct_path, path, offset, truth, points, {
                "rotation_deg": round(abs(angle), 1),
                "axis": np.round(axis, 3).tolist(),
                "translation_mm": np.round(translation, 1).tolist(),
                "crop_keep": kept,
                "moving_size": list(moving.GetSize()),
            })
        )
    return cases


# ------------------------------------------------------------------------------------------------ methods
@dataclass
class MethodResult:
    matrix: np.ndarray | None  # fixed -> moving, LPS; None when the method failed without a transform
    wall_s: float
    failed: bool = False  # the method reported a failure (or raised)
    reason: str = ""


class AdaRegMethod:
    """AdaReg rigid through the ``crosssam_registration`` bundle config (preprocessing, network + weights,
    inferer, ``adareg``), like ``BundlePipeline`` in ``scripts/benchmark_matching.py``. The fixed scan is embedded
    once; its embedding time is added to every case's wall time. ``orientation_search`` as the bundle's
    (``"off"``: trust the headers; ``"auto"``: the bundle default, search the 24 axis-aligned orientations of the
    moving scan when the headers give no consistent registration)."""

    name = "SAMv2 AdaReg rigid, headers trusted (orientation search off)"

    def __init__(self, bundle_root: str = BUNDLE, ckpt: str | None = None, device: str = "cpu", orientation_search: str = "off",
                 confirm_below_fraction: float | None = None):
        import torch
        from monai.bundle import ConfigParser

        from samv2_components.networks.weights import load_weights

        parser = ConfigParser()
        parser.read_config(os.path.join(bundle_root, "configs", "inference.json"))
        parser["bundle_root"] = bundle_root
        self.torch = torch
        self.device = torch.device(device)
        self.preprocessing = parser.get_parsed_content("preprocessing")
        self.inferer = parser.get_parsed_content("inferer")
        self.network = parser.get_parsed_content("network_def").to(self.device).eval()
        self.ckpt = ckpt or parser.get_parsed_content("ckpt_path")
        load_weights(self.network, self.ckpt)
        self.adareg = parser.get_parsed_content("adareg")
        self.orientation_search, self.confirm_below_fraction = orientation_search, confirm_below_fraction
        self.settings = {k: v for k, v in parser["adareg"].items() if k not in ("_target_", "matcher")}
        self._fixed: dict[str, tuple] = {}

    def embed_image(self, image) -> dict:
        with self.torch.no_grad():
            heads = self.inferer(image[None].to(self.device), self.network)
        return {k: v[0] for k, v in heads.items()}

    def embed(self, path: str, modality: str):
        t0 = time.perf_counter()
        image = self.preprocessing({"image": path, "modality": modality})["image"]
        return image, self.embed_image(image), time.perf_counter() - t0

    def warm_up(self, case: Case):
        self.embed(case.moving_path, "mr")

    def __call__(self, case: Case) -> MethodResult:
        from samv2_components.registration import register_rigid_with_orientation_search

        if case.fixed_path not in self._fixed:
            self._fixed[case.fixed_path] = self.embed(case.fixed_path, "ct")
        fixed_image, fixed_heads, fixed_s = self._fixed[case.fixed_path]
        moving_image, moving_heads, moving_s = self.embed(case.moving_path, "mr")
        t0 = time.perf_counter()
        result = register_rigid_with_orientation_search(
            self.adareg, self.embed_image, fixed_image, fixed_heads, moving_image, moving_heads, mode=self.orientation_search,
            confirm_below_fraction=self.confirm_below_fraction,
        )
        wall = fixed_s + moving_s + time.perf_counter() - t0
        summary = result.summary
        detail = f"inliers {summary.get('n_inliers', '-')}/{summary.get('n_matches_above_score', '-')}"
        if "orientation_search" in summary:
            detail += f", orientation search {summary['orientation_search']['seconds']} s"
        if not result.success:
            return MethodResult(None, wall, True, f"{result.reason} ({detail})")
        return MethodResult(np.asarray(result.fixed_to_moving, dtype=np.float64), wall, False, detail)


class SearchingAdaRegMethod(AdaRegMethod):
    """AdaReg as the bundle runs it by default: the orientation search when the headers give no consistent
    registration."""

    name = "SAMv2 AdaReg rigid (bundle default: orientation search auto)"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, orientation_search="auto", **kwargs)


class ConfirmingAdaRegMethod(AdaRegMethod):
    """Orientation search ``auto`` that also searches when the header fit is marginal (inlier fraction below
    ``confirm_below_fraction``): the header orientation must then win the search."""

    name = "SAMv2 AdaReg rigid, orientation search auto + confirm marginal header fits (< 15 % inliers)"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, orientation_search="auto", confirm_below_fraction=0.15, **kwargs)


class UncheckedAdaRegMethod(AdaRegMethod):
    """Diagnostic: AdaReg with its confidence checks off (any inlier fraction and residual, 6 inliers suffice), to
    show how far the embedding matches alone get when the bundle would rather report a failure."""

    name = "AdaReg rigid, confidence checks off (diagnostic)"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.adareg.min_inlier_fraction, self.adareg.max_rms_residual_mm, self.adareg.min_inliers = 0.0, 1e9, 6


class SimpleITKMethod:
    name = "SimpleITK rigid (Mattes MI)"

    def warm_up(self, case: Case):
        pass

    def __call__(self, case: Case) -> MethodResult:
        from samv2_components.errors import SAMv2InputError
        from samv2_components.registration import register_intensity

        t0 = time.perf_counter()
        try:
            res = register_intensity(case.fixed_path, case.moving_path, transform="rigid", seed=0)
        except SAMv2InputError as exc:
            return MethodResult(None, time.perf_counter() - t0, True, str(exc))
        return MethodResult(transform_to_matrix(res.transform), res.wall_time_s)


def elastix_to_matrix(parameter_map) -> np.ndarray:
    """Fixed -> moving 4x4 of an elastix ``EulerTransform`` parameter map (ITK Euler3D: ``R = Rz Rx Ry`` unless
    ``ComputeZYX``, about ``CenterOfRotationPoint``)."""
    get = lambda key: [float(v) for v in parameter_map[key]]  # noqa: E731
    kind = str(parameter_map["Transform"][0])
    if kind != "EulerTransform":
        raise ValueError(f"expected an elastix EulerTransform, got {kind}")
    rx, ry, rz, tx, ty, tz = get("TransformParameters")
    euler = sitk.Euler3DTransform()
    euler.SetCenter(get("CenterOfRotationPoint"))
    zyx = "ComputeZYX" in parameter_map and str(parameter_map["ComputeZYX"][0]).lower() == "true"
    euler.SetComputeZYX(zyx)
    euler.SetRotation(rx, ry, rz)
    euler.SetTranslation((tx, ty, tz))
    return transform_to_matrix(euler)


class ElastixMethod:
    name = "elastix rigid (default map, Mattes MI)"

    def __init__(self, threads: int = 2):
        import itk

        self.itk, self.threads = itk, int(threads)
        itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(self.threads)

    def _run(self, fixed_path: str, moving_path: str):
        itk = self.itk
        fixed = itk.imread(fixed_path, itk.F)
        moving = itk.imread(moving_path, itk.F)
        params = itk.ParameterObject.New()
        params.AddParameterMap(params.GetDefaultParameterMap("rigid"))
        with tempfile.TemporaryDirectory(prefix="samv2_elastix_") as log_dir:
            t0 = time.perf_counter()
            try:
                _, result = itk.elastix_registration_method(
                    fixed, moving, parameter_object=params, log_to_file=True, output_directory=log_dir,
                    number_of_threads=self.threads,
                )
            except RuntimeError as exc:  # the reason is in elastix's log, not in the exception
                reason = str(exc).strip().splitlines()[-1]
                for name in os.listdir(log_dir):
                    if name.endswith(".log"):
                        with open(os.path.join(log_dir, name), encoding="utf-8", errors="replace") as f:
                            found = [ln.split("ITK ERROR:")[-1].strip() for ln in f if "Description:" in ln]
                        reason = found[-1] if found else reason
                raise RuntimeError(reason) from exc
            wall = time.perf_counter() - t0
        return elastix_to_matrix(result.GetParameterMap(0)), wall

    def warm_up(self, case: Case):  # ITK's lazy loading (~10 s) happens here, outside the timing
        try:
            self._run(case.fixed_path, case.fixed_path)
        except Exception:  # noqa: BLE001 - only the loading matters
            pass

    def __call__(self, case: Case) -> MethodResult:
        t0 = time.perf_counter()
        try:
            matrix, wall = self._run(case.fixed_path, case.moving_path)
        except RuntimeError as exc:  # e.g. too many samples outside the moving image (FOV difference)
            return MethodResult(None, time.perf_counter() - t0, True, f"elastix stopped: {str(exc)[:160]}")
        return MethodResult(matrix, wall)


def ants_rigid(fixed_path: str, moving_path: str, python: str = ANTS_PYTHON, threads: int = 2, seed: int = 0,
               timeout: float = 600.0) -> dict:
    """Run ``scripts/_ants_rigid.py`` with ``python`` (the ANTs environment); returns its JSON
    (``fixed_to_moving`` 4x4 LPS, ``wall_time_s``)."""
    with tempfile.TemporaryDirectory(prefix="samv2_ants_") as tmp:
        out = os.path.join(tmp, "result.json")
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": str(threads)}
        proc = subprocess.run(
            [python, ANTS_HELPER, fixed_path, moving_path, out, "--threads", str(threads), "--seed", str(seed)],
            capture_output=True, text=True, timeout=timeout, env=env,
        )
        if proc.returncode != 0 or not os.path.exists(out):
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"ANTs helper failed (rc {proc.returncode}): {tail[0][:200]}")
        with open(out, encoding="utf-8") as f:
            return json.load(f)


def ants_available(python: str = ANTS_PYTHON) -> str:
    """Empty string when ``python`` can import ants, else the reason."""
    if not os.path.exists(python):
        return f"no ANTs environment at {python} (python3 -m venv .venv-ants && .venv-ants/bin/pip install antspyx)"
    proc = subprocess.run([python, "-c", "import ants"], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        return "antspyx does not import: " + (proc.stderr.strip().splitlines() or ["?"])[-1][:160]
    return ""


class AntsMethod:
    name = "ANTs rigid (antspyx)"

    def __init__(self, python: str = ANTS_PYTHON, threads: int = 2):
        self.python, self.threads = python, int(threads)

    def warm_up(self, case: Case):
        pass

    def __call__(self, case: Case) -> MethodResult:
        t0 = time.perf_counter()
        try:
            out = ants_rigid(case.fixed_path, case.moving_path, self.python, self.threads)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            return MethodResult(None, time.perf_counter() - t0, True, str(exc))
        return MethodResult(np.asarray(out["fixed_to_moving"], dtype=np.float64), float(out["wall_time_s"]))


# ------------------------------------------------------------------------------------------------ box plot
def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def write_boxplot(path: str, data: dict[str, list[float]], threshold_mm: float | None = 10.0,
                  title: str = "CT-MR rigid registration, TRE per case", y_min: float = 0.5, seed: int = 0,
                  failed: dict[str, list[bool]] | None = None) -> str:
    """Box plot PNG (Pillow only): one box per method (quartiles, median, whiskers to the furthest point within
    1.5 IQR), every case as a jittered dot, log y axis in mm with 1-2-5 ticks, the success threshold dashed.
    Values below ``y_min`` are drawn at ``y_min``; the axis ends at the first of 20, 50, 100, 200, ... mm above the
    largest finite value (inf, e.g. a failure without a transform, is drawn at the top). ``failed`` (per method,
    per value) marks reported failures, drawn as crosses."""
    from PIL import Image, ImageDraw

    names = list(data)
    values = [np.clip(np.asarray(v, dtype=np.float64), y_min, None) for v in data.values()]
    finite = np.concatenate([v[np.isfinite(v)] for v in values] + [np.array([10.0])])
    nice = [t * 10.0**e for e in range(1, 6) for t in (2, 5, 10)]
    y_max = next((t for t in nice if t >= finite.max() * 1.05), nice[-1])
    values = [np.clip(v, None, y_max) for v in values]  # beyond the axis (and inf): drawn at the top
    W, H = max(520, 150 * len(names) + 140), 520
    left, right, top, bottom = 70, 30, 60, 90
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    f_small, f_mid = _font(13), _font(16)
    lo_log, hi_log = np.log10(y_min), np.log10(y_max)

    def y_of(v):
        return top + (H - top - bottom) * (1.0 - (np.log10(v) - lo_log) / (hi_log - lo_log))

    ticks = [t * 10.0**e for e in range(-2, 6) for t in (1, 2, 5) if y_min <= t * 10.0**e <= y_max]
    for t in ticks:
        y = y_of(t)
        d.line([left + 1, y, W - right - 1, y], fill=(230, 230, 230))
        d.line([left - 5, y, left, y], fill="black")
        label = f"{t:g}"
        d.text((left - 8 - d.textlength(label, font=f_small), y - 7), label, fill="black", font=f_small)
    d.rectangle([left, top, W - right, H - bottom], outline="black")
    d.text((left - 50, top - 24), "TRE (mm, log scale)", fill="black", font=f_small)
    d.text((left, 12), title, fill="black", font=f_mid)
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (148, 103, 189), (140, 86, 75), (227, 119, 194)]
    rng = np.random.default_rng(seed)
    step = (W - left - right) / max(len(names), 1)
    if failed and any(any(f) for f in failed.values()):
        note = "x: reported failure (scored with the identity)"
        d.text((W - right - d.textlength(note, font=f_small), top - 24), note, fill="black", font=f_small)
    for i, (name, v) in enumerate(zip(names, values)):
        cx, colour = left + step * (i + 0.5), colours[i % len(colours)]
        marks = np.asarray((failed or {}).get(name, [False] * len(v)), dtype=bool)
        marks = marks[np.isfinite(v)] if len(marks) == len(v) else np.zeros(int(np.isfinite(v).sum()), bool)
        v = v[np.isfinite(v)]
        if len(v):
            q1, med, q3 = np.percentile(v, [25, 50, 75])
            iqr = q3 - q1
            lo_w, hi_w = v[v >= q1 - 1.5 * iqr].min(), v[v <= q3 + 1.5 * iqr].max()
            bw = min(60, step * 0.4)
            d.line([cx, y_of(lo_w), cx, y_of(q1)], fill="black")
            d.line([cx, y_of(q3), cx, y_of(hi_w)], fill="black")
            for w in (lo_w, hi_w):
                d.line([cx - bw / 3, y_of(w), cx + bw / 3, y_of(w)], fill="black")
            d.rectangle([cx - bw / 2, y_of(q3), cx + bw / 2, y_of(q1)], outline=colour, fill=tuple(int(c * 0.35 + 255 * 0.65) for c in colour), width=2)
            d.line([cx - bw / 2, y_of(med), cx + bw / 2, y_of(med)], fill="black", width=3)
            for val, mark in zip(v, marks):
                x, y = cx + rng.uniform(-bw / 2, bw / 2), y_of(val)
                if mark:
                    d.line([x - 4, y - 4, x + 4, y + 4], fill="black", width=2)
                    d.line([x - 4, y + 4, x + 4, y - 4], fill="black", width=2)
                else:
                    d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour, outline="black")
        # method label, wrapped
        words, lines, line = name.split(), [], ""
        for w in words:
            if d.textlength((line + " " + w).strip(), font=f_small) > step - 8 and line:
                lines.append(line)
                line = w
            else:
                line = (line + " " + w).strip()
        lines.append(line)
        for k, text in enumerate(lines[:4]):
            d.text((cx - d.textlength(text, font=f_small) / 2, H - bottom + 8 + 16 * k), text, fill="black", font=f_small)
    if threshold_mm:
        y = y_of(threshold_mm)
        for x in range(left, W - right, 12):
            d.line([x, y, min(x + 6, W - right), y], fill=(200, 0, 0), width=2)
        label = f"success < {threshold_mm:g} mm"
        d.rectangle([left + 4, y - 19, left + 8 + d.textlength(label, font=f_small), y - 4], fill="white")
        d.text((left + 6, y - 18), label, fill=(200, 0, 0), font=f_small)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img.save(path, format="PNG")
    return path


# ------------------------------------------------------------------------------------------------ main
def _stats(rows: list[dict], success_mm: float) -> dict:
    t = np.array([r["tre_mm"] for r in rows], dtype=np.float64)
    w = np.array([r["wall_s"] for r in rows if r["wall_s"] is not None], dtype=np.float64)
    return {
        "n": len(rows),
        "success": 100.0 * float(np.mean(t < success_mm)) if len(t) else float("nan"),
        "mean": float(np.mean(t)) if len(t) else float("nan"),
        "std": float(np.std(t)) if len(t) else float("nan"),
        "median": float(np.median(t)) if len(t) else float("nan"),
        "max": float(np.max(t)) if len(t) else float("nan"),
        "wall": float(np.mean(w)) if len(w) else None,
        "reported_failures": sum(bool(r["failed"]) for r in rows),
    }


def _reference_lines(ref: dict, path: str | None) -> list[str]:
    fid = ref.get("fiducial_check", {})
    spread = ref.get("spread_mm_within_2pct_metric", {})
    starts = sorted(ref.get("starts", []), key=lambda s: s["metric_2mm"])
    lines = [
        "## 1. Reference transform (CT -> MR; no ground truth exists)",
        "",
        f"- Method: {ref['method']}.",
        f"- Result: rotation {ref['rotation_deg']} deg, translation {ref['translation_mm']} mm (LPS), Mattes MI "
        f"{ref['metric_2mm']} (2 mm scans, all CT voxels in the body); derived in {ref.get('wall_time_s', '-')} s"
        + (f"; cached in `{os.path.relpath(path, REPO) if path.startswith(REPO) else path}`" if path else "") + ".",
    ]
    if len(starts) > 1:
        lines.append(
            f"- Starts: best start MI {starts[0]['metric_2mm']}, second basin MI {next((s['metric_2mm'] for s in starts if s['distance_to_best_mm'] > 10), '-')}; "
            f"{sum(s['distance_to_best_mm'] <= 10 for s in starts)} of {len(starts)} starts ended within 10 mm of the answer."
        )
    if spread:
        lines.append(
            f"- Consistency: {spread.get('n')} refined solutions (top starts and restarts from the answer perturbed by "
            f"10 deg / 10 mm) reached MI within 2 % of the best; their mean distance to the answer over the CT body "
            f"{spread.get('mean')} mm, max {spread.get('max')} mm; the finest-level refinement moved it by "
            f"{ref.get('fine_refinement_shift_mm', '-')} mm."
        )
    if fid.get("possible"):
        verdict = "conclusive" if fid.get("conclusive") else "inconclusive: no better than random body points"
        lines.append(
            f"- Fiducial check ({verdict}): {fid['n_fiducials']} CT markers (> 2500 HU) detected, {fid['n_inside_mr_fov']} inside "
            f"the MR FOV; distance from each mapped marker to the darkest MR spot within {fid['search_mm']} mm: median "
            f"{fid['residual_mm_median']} mm (darkness {fid['darkness_median']}) vs {fid['random_points_residual_mm_median']} mm "
            f"(darkness {fid['random_points_darkness_median']}) from random body points: the markers' voids cannot be told "
            f"apart from the tissue's other dark spots in this T2 scan, so they do not verify the reference."
            if not fid.get("conclusive") else
            f"- Fiducial check: {fid['n_fiducials']} CT markers, median residual {fid['residual_mm_median']} mm vs "
            f"{fid['random_points_residual_mm_median']} mm for random body points."
        )
    else:
        lines.append(f"- Fiducial check not possible: {fid.get('reason', 'not run')}.")
    return lines + [""]


ORIENTATIONS = {
    "native": "the pair as it comes (the MR 2 mm as acquired, head-to-foot reversed relative to the CT; no offset, "
    "no crop; one case)",
    "acquired": "the MR as acquired (head-to-foot reversed relative to the CT: the reference rotates by ~180 deg)",
    "aligned": "the MR pre-rotated by the axis-aligned rotation that undoes the reversal (headers agree up to the "
    "random offset); the same random offsets and crops",
}


def run_cases(cases: list[Case], runners: list, success_mm: float, log=print) -> list[dict]:
    """Every method on every case: rows ``{case, method, tre_mm, success, failed, wall_s, reason}`` (plus the
    identity as "no registration")."""
    rows = [{"case": c.name, "method": IDENTITY, "tre_mm": tre(np.eye(4), c.truth, c.points), "success": None,
             "failed": False, "wall_s": None, "reason": ""} for c in cases]
    for runner in runners:
        log(f"{runner.name}:")
        for case in cases:
            res = runner(case)
            estimate = res.matrix if res.matrix is not None else np.eye(4)  # a reported failure: identity
            error = tre(estimate, case.truth, case.points)
            rows.append({"case": case.name, "method": runner.name, "tre_mm": error, "success": error < success_mm,
                         "failed": res.failed, "wall_s": res.wall_s, "reason": res.reason})
            log(f"  {case.name}: TRE {error:8.2f} mm, {res.wall_s:6.1f} s{' FAILED: ' + res.reason if res.failed else ''}")
    return rows


IDENTITY = "identity (no registration)"


def _result_lines(title: str, cases: list[Case], rows: list[dict], method_names: list[str], skipped: dict,
                  success_mm: float) -> list[str]:
    by_method = {m: [r for r in rows if r["method"] == m] for m in method_names}
    lines = [
        title,
        "",
        f"| method | cases | success TRE < {success_mm:g} mm (%) | TRE mean ± std (mm) | median (mm) | max (mm) | reported failures | mean wall time (s) |",
        "|:---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m, v in by_method.items():
        s = _stats(v, success_mm)
        wall = "-" if s["wall"] is None else f"{s['wall']:.1f}"
        succ = "-" if m == IDENTITY else f"{s['success']:.0f}"
        lines.append(f"| {m} | {s['n']} | {succ} | {s['mean']:.1f} ± {s['std']:.1f} | {s['median']:.1f} | {s['max']:.1f} | "
                     f"{s['reported_failures']} | {wall} |")
    for name, why in skipped.items():
        lines.append(f"| {name} | skipped: {why} | | | | | | |")
    lines += [
        "",
        "| case | offset rotation (deg) | offset translation (mm, LPS) | crop (kept fraction of body extent) | TRE points | "
        + " | ".join(method_names) + " |",
        "|:---|---:|:---|:---|---:|" + "---:|" * len(method_names),
    ]
    for c in cases:
        cells = []
        for m in method_names:
            r = next(r for r in by_method[m] if r["case"] == c.name)
            cells.append(f"{r['tre_mm']:.1f}" + (" (failed)" if r["failed"] else ""))
        lines.append(f"| {c.name} | {c.info['rotation_deg']} | {c.info['translation_mm']} | "
                     f"{', '.join(f'{k} {v}' for k, v in c.info['crop_keep'].items())} | {len(c.points)} | " + " | ".join(cells) + " |")
    return lines + [""]


def main(
    num_cases: int = 20,
    seed: int = 0,
    reference: str | None = None,
    output: str | None = None,
    csv_path: str | None = None,
    boxplot: str = os.path.join(BUNDLE, "docs", "benchmark_boxplot.png"),
    work_dir: str | None = None,
    methods: str = "adareg_search,adareg,adareg_unchecked,simpleitk,elastix,ants",
    orientations: str = "acquired,aligned",
    threads: int = 2,
    ckpt: str | None = None,
    device: str = "cpu",
    tre_spacing: float = 8.0,
    success_mm: float = 10.0,
    ants_python: str = ANTS_PYTHON,
):
    """Run the benchmark (module docstring) and print the Markdown tables.

    Args:
        num_cases: random cases (offset + crop of the MR) per orientation set.
        seed: seeds the cases (and the reference's restarts).
        reference: reference-transform JSON: reused if it exists, else derived and written there (default: next
            to ``output`` as ``<output stem>_reference.json``, else ``benchmark_registration_reference.json`` next
            to ``boxplot``).
        output: also write the Markdown there.
        csv_path: per-case CSV (default: next to ``output`` as ``<output stem>_cases.csv``, else
            ``benchmark_registration_cases.csv`` next to ``boxplot``).
        boxplot: the box-plot PNG of the first orientation set; other sets get ``<stem>_<set>.png``.
        work_dir: where the case images go (default: a temporary folder, deleted at the end).
        methods: comma-separated subset of ``adareg_search`` (the bundle default: orientation search auto),
            ``adareg_confirm`` (auto, and a marginal header fit must win a search too),
            ``adareg`` (headers trusted), ``adareg_unchecked`` (diagnostic), ``simpleitk``, ``elastix``, ``ants``.
        orientations: comma-separated case sets: ``native`` (the pair as it comes, one case: D = identity, no
            crop), ``acquired`` (the MR as acquired with random offsets and crops: T_case = D @ T_ref) and/or
            ``aligned`` (D also undoes the reference's axis-aligned head-to-foot reversal; same random offsets).
        threads: threads of every method (torch, ITK/SimpleITK, elastix, ANTs).
        ckpt: AdaReg weights (default: the bundle's ``models/model.pt``).
        device: torch device of the embedding network.
        tre_spacing: grid spacing (mm) of the TRE points in the CT body.
        success_mm: a case succeeds when its TRE is below this.
        ants_python: the Python of the ANTs environment.
    """
    import torch

    torch.set_num_threads(int(threads))
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(int(threads))
    command = "python " + shlex.join([os.path.relpath(sys.argv[0]) if sys.argv else "scripts/benchmark_registration.py", *sys.argv[1:]])
    # fire turns "a,b" into a tuple: accept both
    methods = ",".join(methods) if isinstance(methods, (list, tuple)) else methods
    orientations = ",".join(orientations) if isinstance(orientations, (list, tuple)) else orientations
    sets = [o.strip().lower() for o in str(orientations).replace(" ", "").split(",") if o.strip()]
    if not sets or any(o not in ORIENTATIONS for o in sets):
        raise ValueError(f"orientations must be a comma-separated subset of {', '.join(ORIENTATIONS)}, got {orientations!r}")
    temp_dir = None
    if work_dir is None:
        work_dir = temp_dir = tempfile.mkdtemp(prefix="samv2_regbench_")
    os.makedirs(work_dir, exist_ok=True)
    stem = os.path.splitext(output)[0] if output else os.path.join(os.path.dirname(os.path.abspath(boxplot)), "benchmark_registration")
    reference = reference or f"{stem}_reference.json"
    csv_path = csv_path or f"{stem}_cases.csv"
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    t_start = time.perf_counter()
    try:
        ref = load_or_derive_reference(reference, log=log, seed=seed)
        T_ref = np.asarray(ref["fixed_to_moving"], dtype=np.float64)
        case_sets = {}
        for o in sets:
            log(f"drawing {1 if o == 'native' else num_cases} '{o}' case(s) into {work_dir} ...")
            flip = np.round(T_ref[:3, :3].T) if o == "aligned" else None  # nearest axis-aligned inverse rotation
            if flip is not None and not np.isclose(abs(np.linalg.det(flip)), 1.0):
                raise ValueError("the reference rotation is not close to an axis-aligned one; no 'aligned' set")
            if o == "native":  # the pair as it comes: one case, no offset, no crop
                case_sets[o] = make_cases(1, seed, T_ref, work_dir, tre_spacing_mm=tre_spacing, max_rotation_deg=0.0,
                                          max_translation_mm=0.0, crop=False, prefix="native_")
            else:
                case_sets[o] = make_cases(num_cases, seed, T_ref, work_dir, tre_spacing_mm=tre_spacing,
                                          pre_rotation=flip, prefix=f"{o}_")

        wanted = [m.strip().lower() for m in str(methods).replace(" ", "").split(",") if m.strip()]
        runners, skipped = [], {}
        for key in wanted:
            if key == "adareg_search":
                runners.append(SearchingAdaRegMethod(ckpt=ckpt, device=device))
            elif key == "adareg_confirm":
                runners.append(ConfirmingAdaRegMethod(ckpt=ckpt, device=device))
            elif key == "adareg":
                runners.append(AdaRegMethod(ckpt=ckpt, device=device))
            elif key == "adareg_unchecked":
                runners.append(UncheckedAdaRegMethod(ckpt=ckpt, device=device))
            elif key == "simpleitk":
                runners.append(SimpleITKMethod())
            elif key == "elastix":
                try:
                    runners.append(ElastixMethod(threads))
                except ImportError as exc:
                    skipped["elastix rigid"] = f"itk-elastix not installed ({exc})"
            elif key == "ants":
                why = ants_available(ants_python)
                if why:
                    skipped[AntsMethod.name] = why
                else:
                    runners.append(AntsMethod(ants_python, threads))
            else:
                raise ValueError(f"unknown method {key!r}")
        first = next(iter(case_sets.values()))[0]
        for runner in runners:
            log(f"{runner.name}: warm-up ...")
            runner.warm_up(first)

        method_names = [IDENTITY] + [r.name for r in runners]
        rel = lambda p: os.path.relpath(p, REPO) if os.path.abspath(p).startswith(REPO) else p  # noqa: E731
        all_rows, result_lines, plots = [], [], []
        for k, (o, cases) in enumerate(case_sets.items()):
            rows = run_cases(cases, runners, success_mm, log=log)
            for r in rows:
                r["set"] = o
            all_rows += rows
            png = boxplot if k == 0 else f"{os.path.splitext(boxplot)[0]}_{o}.png"
            write_boxplot(png, {m: [r["tre_mm"] for r in rows if r["method"] == m] for m in method_names if m != IDENTITY},
                          threshold_mm=success_mm, title=f"CT-MR rigid, phantom, MR {o}: TRE of {len(cases)} cases",
                          failed={m: [r["failed"] for r in rows if r["method"] == m] for m in method_names})
            plots.append(png)
            result_lines += _result_lines(f"## {k + 2}. Results, MR {o}: {ORIENTATIONS[o]}", cases, rows, method_names,
                                          skipped, success_mm)

        info = {c.name: c for cases in case_sets.values() for c in cases}
        os.makedirs(os.path.dirname(os.path.abspath(csv_path)), exist_ok=True)
        with open(csv_path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["set", "case", "method", "tre_mm", "success", "reported_failure", "wall_s", "offset_rotation_deg",
                        "offset_translation_mm", "crop_keep", "n_points", "note"])
            for r in all_rows:
                c = info[r["case"]]
                w.writerow([r["set"], r["case"], r["method"], f"{r['tre_mm']:.3f}", "" if r["success"] is None else int(r["success"]),
                            int(r["failed"]), "" if r["wall_s"] is None else f"{r['wall_s']:.2f}", c.info["rotation_deg"],
                            " ".join(map(str, c.info["translation_mm"])), " ".join(f"{k}:{v}" for k, v in c.info["crop_keep"].items()),
                            len(c.points), r["reason"]])

        adareg = next((r for r in runners if isinstance(r, AdaRegMethod)), None)
        lines = [
            "# CT-MR rigid registration benchmark (porcine phantom)",
            "",
            f"- Command: `{command}` ({time.perf_counter() - t_start:.0f} s in all)",
            f"- Data: `{DATA}`: CT 2 mm (fixed) against the T2 MR 2 mm with a random rigid offset (up to 20 deg about a "
            f"random axis, up to 40 mm per axis) and a crop (50-80 % of the body extent kept along one or two axes) "
            f"(moving); {num_cases} cases per set, seed {seed}. The true fixed -> moving transform is T_case = D @ T_ref "
            f"(D: the offset; T_ref: section 1). TRE: mean distance between T_est(p) and T_case(p) over CT body points "
            f"(HU > -300) on a {tre_spacing:g} mm grid that T_case maps inside the moving image.",
            f"- {platform.processor() or platform.machine()}, {threads} threads per method, torch {torch.__version__}, "
            f"SimpleITK {sitk.Version.VersionString()}, {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        ]
        if adareg is not None:
            lines.append(f"- AdaReg: weights `{rel(adareg.ckpt)}`; " + ", ".join(f"{k}={v}" for k, v in adareg.settings.items()))
        lines += ["", *_reference_lines(ref, reference), *result_lines]
        lines += [
            "Notes:",
            "",
            "- A reported failure (AdaReg: the matches do not support a rigid transform) counts as a failure and is "
            "scored with the identity transform. Wall time: registration only (images already on disk); AdaReg includes "
            "embedding both scans (the CT once, its time added to every case); elastix after one warm-up call; ANTs "
            "inside its helper process (without the interpreter start and imports).",
            "- Per-case CSV: `" + rel(csv_path) + "`; box plots: " + ", ".join(f"`{rel(p)}`" for p in plots) + ".",
            "",
        ]
        text = "\n".join(lines)
        print(text)
        if output:
            os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
            with open(output, "w", encoding="utf-8") as f:
                f.write(text)
        return None
    finally:
        if temp_dir is not None:
            shutil.rmtree(temp_dir, ignore_errors=True)


if __name__ == "__main__":
    fire.Fire(main)
