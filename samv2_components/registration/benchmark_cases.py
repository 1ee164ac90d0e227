"""Cases of the CT-MR rigid registration benchmark (``scripts/benchmark_registration.py``): a fixed CT against
rigidly offset, cropped resamplings of an MR whose true relation to the CT (the reference transform,
:mod:`~samv2_components.registration.benchmark_reference`) is known.

Conventions: points are world **LPS mm**, arrays ``(N, 3)``; a transform is a 4x4 matrix (column vectors,
``y = M[:3, :3] @ x + M[:3, 3]``) or a SimpleITK transform mapping **fixed** (CT) physical points to **moving** (MR)
physical points (ITK's resampling direction). Images are SimpleITK images (physical space = LPS); numpy arrays of
them are indexed ``(z, y, x)``.

A case (:func:`make_cases`): ``D`` = a random rigid offset in the MR frame; the case's moving image is
``M_case(y) = MR(D^-1(y))`` (:func:`case_image`), so the MR point ``q`` shows at ``D(q)`` and the case's true
fixed -> moving transform is ``T_case = D @ T_ref``.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from samv2_components.geometry import apply_matrix, axis_angle_rotation, rigid_matrix, rotation_angle_deg
from samv2_components.registration.intensity_baselines import _sitk, matrix_to_sitk_transform, sitk_transform_to_matrix

if TYPE_CHECKING:  # pragma: no cover
    import SimpleITK

__all__ = [
    "BODY_HU",
    "CASE_SETS",
    "Case",
    "apply_matrix",
    "axis_angle_rotation",
    "body_grid_points",
    "box_corners",
    "case_image",
    "case_points",
    "ct_body_mask",
    "cube_rotations",
    "grid_box",
    "image_box_contains",
    "largest_component",
    "make_case_set",
    "make_cases",
    "mask_centroid",
    "matrix_to_sitk_transform",
    "mr_body_mask",
    "random_unit_vector",
    "read_float",
    "rigid_matrix",
    "rotation_angle_deg",
    "sitk_transform_to_matrix",
    "tre",
    "undo_axis_aligned_rotation",
    "voxel_centres",
]

#: CT body threshold (HU)
BODY_HU = -300.0


# ------------------------------------------------------------------------------------------------ geometry
def tre(estimate: np.ndarray, truth: np.ndarray, points) -> float:
    """Mean distance (mm) between ``estimate(p)`` and ``truth(p)`` (4x4 each) over ``points`` ``(N, 3)``."""
    return float(np.mean(np.linalg.norm(apply_matrix(estimate, points) - apply_matrix(truth, points), axis=1)))


def random_unit_vector(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random direction ``(3,)`` (one ``rng.normal(size=3)`` draw, normalised)."""
    v = rng.normal(size=3)
    return v / np.linalg.norm(v)


def cube_rotations() -> list[np.ndarray]:
    """The 24 axis-aligned rotations (float 3x3, identity first): the package's orientation-search candidates."""
    from samv2_components.registration.orientation import axis_aligned_rotations

    return [r.astype(np.float64) for r in axis_aligned_rotations()]


def undo_axis_aligned_rotation(reference: np.ndarray) -> np.ndarray:
    """The axis-aligned rotation (3x3) nearest to the inverse of ``reference``'s rotation: pre-rotating the MR by
    it about its centre makes the scans' headers agree up to a small rotation (the benchmark's "aligned" set).

    Raises:
        ValueError: the rounded matrix is not a rotation (the reference is far from axis-aligned).
    """
    flip = np.round(np.asarray(reference, dtype=np.float64)[:3, :3].T)
    if not np.isclose(abs(np.linalg.det(flip)), 1.0):
        raise ValueError("the reference rotation is not close to an axis-aligned one; no 'aligned' set")
    return flip


def image_box_contains(image: "SimpleITK.Image", points, margin_vox: float = 0.5) -> np.ndarray:
    """Which physical points ``(N, 3)`` lie inside the image's voxel grid (centres, +- ``margin_vox``): ``(N,)``
    bool."""
    p = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    D = np.array(image.GetDirection()).reshape(3, 3)
    S = np.array(image.GetSpacing())
    idx = ((p - np.array(image.GetOrigin())) @ D) / S
    size = np.array(image.GetSize())
    return np.all((idx >= -margin_vox) & (idx <= size - 1 + margin_vox), axis=1)


def voxel_centres(image: "SimpleITK.Image", index_zyx: np.ndarray) -> np.ndarray:
    """Physical points ``(N, 3)`` of numpy ``(z, y, x)`` indices ``(N, 3)`` (fractional ones allowed)."""
    ijk = np.asarray(index_zyx, dtype=np.float64)[:, ::-1]
    D = np.array(image.GetDirection()).reshape(3, 3)
    return np.array(image.GetOrigin()) + (ijk * np.array(image.GetSpacing())) @ D.T


def box_corners(lo, hi) -> np.ndarray:
    """The 8 corners ``(8, 3)`` of the box ``[lo, hi]`` (``(3,)`` each)."""
    return np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])])


def grid_box(image: "SimpleITK.Image") -> tuple[np.ndarray, np.ndarray]:
    """Physical bounding box ``(lo (3,), hi (3,))`` (outer voxel faces, LPS mm) of an axis-aligned image."""
    size = np.array(image.GetSize())
    corners = voxel_centres(image, box_corners([-0.5] * 3, size[::-1] - 0.5))
    return corners.min(0), corners.max(0)


# ------------------------------------------------------------------------------------------------ masks
def largest_component(mask: "SimpleITK.Image") -> "SimpleITK.Image":
    """The largest connected component of a binary image."""
    sitk = _sitk()
    return sitk.RelabelComponent(sitk.ConnectedComponent(mask), sortByObjectSize=True) == 1


def ct_body_mask(ct: "SimpleITK.Image") -> "SimpleITK.Image":
    """CT body: HU > -300 (:data:`BODY_HU`), largest connected component."""
    sitk = _sitk()
    return largest_component(sitk.Cast(ct > BODY_HU, sitk.sitkUInt8))


def mr_body_mask(mr: "SimpleITK.Image") -> "SimpleITK.Image":
    """MR body: above the Otsu threshold of the smoothed scan (2 mm Gaussian), largest component, holes closed."""
    sitk = _sitk()
    smooth = sitk.SmoothingRecursiveGaussian(sitk.Cast(mr, sitk.sitkFloat32), 2.0)
    mask = largest_component(sitk.OtsuThreshold(smooth, 0, 1))
    return sitk.BinaryFillhole(sitk.BinaryMorphologicalClosing(mask, [2, 2, 2]))


def mask_centroid(mask: "SimpleITK.Image") -> np.ndarray:
    """Physical centroid ``(3,)`` (LPS mm) of a binary mask's foreground."""
    sitk = _sitk()
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(sitk.Cast(mask, sitk.sitkUInt8))
    return np.array(stats.GetCentroid(1))


def body_grid_points(ct: "SimpleITK.Image", spacing_mm: float) -> np.ndarray:
    """Physical points ``(N, 3)`` (LPS mm) of a ``spacing_mm`` grid (voxel strides) on the CT body mask."""
    sitk = _sitk()
    mask = sitk.GetArrayFromImage(ct_body_mask(ct)).astype(bool)
    stride = np.maximum(1, np.rint(spacing_mm / np.array(ct.GetSpacing())[::-1])).astype(int)
    sub = mask[stride[0] // 2 :: stride[0], stride[1] // 2 :: stride[1], stride[2] // 2 :: stride[2]]
    idx = np.argwhere(sub) * stride + stride // 2
    return voxel_centres(ct, idx)


def read_float(path: str) -> "SimpleITK.Image":
    """A scan read with SimpleITK as float32."""
    sitk = _sitk()
    return sitk.Cast(sitk.ReadImage(path), sitk.sitkFloat32)


# ------------------------------------------------------------------------------------------------ cases
@dataclass
class Case:
    """One benchmark case: the CT (fixed) against a rigidly offset, cropped resampling of the MR (moving).

    Attributes:
        name: case id.
        fixed_path, moving_path: the NIfTI files.
        offset: ``D``, 4x4 rigid map in the MR frame (MR point -> case moving point, LPS mm).
        truth: ``T_case = D @ T_ref``, fixed -> case moving (4x4, LPS mm).
        points: ``(N, 3)`` CT points (LPS mm) for the TRE (body grid points that ``truth`` maps inside the case's
            data).
        info: offset angle / translation / crop, for the tables.
    """

    name: str
    fixed_path: str
    moving_path: str
    offset: np.ndarray
    truth: np.ndarray
    points: np.ndarray
    info: dict = field(default_factory=dict)


def case_image(mr: "SimpleITK.Image", offset: np.ndarray, lo, hi, spacing: float) -> "SimpleITK.Image":
    """``M(y) = MR(offset^-1(y))`` on the axis-aligned ``spacing`` grid covering the box ``[lo, hi]`` (LPS mm;
    identity direction), zero outside the MR's field of view: the MR point ``q`` shows at ``offset(q)``."""
    sitk = _sitk()
    lo, hi = np.asarray(lo, float), np.asarray(hi, float)
    size = np.maximum(2, np.floor((hi - lo) / spacing).astype(int))
    grid = sitk.Image([int(v) for v in size], sitk.sitkFloat32)
    grid.SetSpacing([float(spacing)] * 3)
    grid.SetOrigin((lo + spacing / 2.0).tolist())
    # ITK's Resample maps output points through the transform into the input: out(y) = MR(transform(y))
    return sitk.Resample(mr, grid, matrix_to_sitk_transform(np.linalg.inv(offset)), sitk.sitkLinear, 0.0, sitk.sitkFloat32)


def case_points(ct: "SimpleITK.Image", reference: np.ndarray, truth: np.ndarray, mr: "SimpleITK.Image",
                moving: "SimpleITK.Image", spacing_mm: float) -> np.ndarray:
    """CT body grid points ``(N, 3)`` whose true position (``truth``) lies inside the case's moving image and
    whose reference position lies inside the MR's field of view."""
    points = body_grid_points(ct, spacing_mm)
    keep = image_box_contains(moving, apply_matrix(truth, points), 0.0) & image_box_contains(mr, apply_matrix(reference, points), 0.0)
    return points[keep]


def make_cases(
    n: int = 20,
    seed: int = 0,
    reference: np.ndarray | None = None,
    work_dir: str | None = None,
    ct_path: str | None = None,
    mr_path: str | None = None,
    max_rotation_deg: float = 20.0,
    max_translation_mm: float = 40.0,
    keep_range: tuple[float, float] = (0.5, 0.8),
    tre_spacing_mm: float = 8.0,
    min_points: int = 100,
    spacing_mm: float = 2.0,
    pre_rotation: np.ndarray | None = None,
    prefix: str = "case",
    crop: bool = True,
    slab_mm: tuple[float, float] | None = None,
) -> list[Case]:
    """Draw ``n`` cases (seeded) of the CT ``ct_path`` against the MR ``mr_path`` and write their moving images
    to ``work_dir`` (NIfTI; default a new temporary folder).

    For each case: ``D`` = rotation by ``U(-max_rotation_deg, max_rotation_deg)`` about a random axis through the MR
    body centroid, then a translation ``U(-max_translation_mm, max_translation_mm)`` per axis. The moving image
    is the MR resampled as ``M(y) = MR(D^-1(y))`` on an axis-aligned ``spacing_mm`` grid covering ``D`` (MR grid),
    cropped along one or two random axes to a random window keeping ``keep_range`` of the (offset) MR body's
    extent.

    Composition: the reference (4x4, CT LPS -> MR LPS) says CT point p shows at ``T_ref(p)`` in the MR; the moving
    image shows the MR point q at ``D(q)``; hence p shows at ``T_case(p) = D(T_ref(p))``, i.e.
    ``T_case = D @ T_ref`` (4x4, applied to column vectors). A draw whose overlap keeps fewer than ``min_points``
    TRE points is redrawn.

    ``pre_rotation`` (3x3, optional): an extra rotation ``F`` about the MR body centroid applied before the random
    offset, ``D = D_random @ F`` (the "aligned" set uses :func:`undo_axis_aligned_rotation`, so that the scans'
    headers agree up to the random offset). ``T_case = D @ T_ref`` holds for either.

    ``crop=False`` keeps the whole (offset) MR grid (the "native" set: no offset, no crop, the pair as it comes).
    ``slab_mm=(a, b)`` crops instead to an axial slab (along LPS z, the scanner's table axis) of thickness
    ``U(a, b)`` mm at a random height within the (offset) MR body: the small-FOV case of the paper.
    """
    if reference is None:
        raise ValueError("make_cases needs the reference fixed -> moving matrix")
    if not ct_path or not mr_path:
        raise ValueError("make_cases needs the CT (ct_path) and MR (mr_path) files")
    sitk = _sitk()
    reference = np.asarray(reference, dtype=np.float64)
    work_dir = work_dir or tempfile.mkdtemp(prefix="samv2_regbench_")
    os.makedirs(work_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    ct, mr = read_float(ct_path), read_float(mr_path)
    mr_mask = mr_body_mask(mr)
    centre = mask_centroid(mr_mask)
    body_idx = np.argwhere(sitk.GetArrayViewFromImage(mr_mask))
    body_lo, body_hi = body_idx.min(0), body_idx.max(0)
    body_corners = voxel_centres(mr, box_corners(body_lo - 0.5, body_hi + 0.5))
    grid_lo, grid_hi = grid_box(mr)
    cases = []
    while len(cases) < n:
        angle = float(rng.uniform(-max_rotation_deg, max_rotation_deg))
        axis = random_unit_vector(rng)
        translation = rng.uniform(-max_translation_mm, max_translation_mm, 3)
        offset = rigid_matrix(axis_angle_rotation(axis, angle), translation=translation, centre=centre)
        if pre_rotation is not None:
            offset = offset @ rigid_matrix(pre_rotation, centre=centre)
        content = apply_matrix(offset, box_corners(grid_lo, grid_hi))
        lo, hi = content.min(0), content.max(0)
        body = apply_matrix(offset, body_corners)
        b_lo, b_hi = body.min(0), body.max(0)
        axes = sorted(rng.choice(3, size=int(rng.integers(1, 3)), replace=False).tolist()) if crop and not slab_mm else []
        kept = {}
        if slab_mm:
            thickness = float(rng.uniform(*slab_mm))
            start = b_lo[2] + rng.uniform(0.0, 1.0) * max(0.0, b_hi[2] - b_lo[2] - thickness)
            lo[2], hi[2] = max(lo[2], start), min(hi[2], start + thickness)
            kept["slab_mm"] = round(thickness, 1)
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
                "crop_keep": kept,  # kept fraction of the body extent per axis, or the slab thickness
                "moving_size": list(moving.GetSize()),
            })
        )
    return cases


#: the benchmark's case sets: what each draws (``make_case_set``)
CASE_SETS = {
    "native": "the pair as it comes (the MR 2 mm as acquired, head-to-foot reversed relative to the CT; no offset, "
    "no crop; one case)",
    "acquired": "the MR as acquired (head-to-foot reversed relative to the CT: the reference rotates by ~180 deg)",
    "aligned": "the MR pre-rotated by the axis-aligned rotation that undoes the reversal (headers agree up to the "
    "random offset); the same random offsets and crops",
    "slab": "the MR aligned as in 'aligned', offset as there (up to 20 deg, 40 mm) and cut to an axial slab of 30-60 mm "
    "(the paper's small-FOV case)",
    "hard": "the MR aligned, offset by up to 45 deg about a random axis and 80 mm per axis, and cut to an axial slab of "
    "30-60 mm",
}


def make_case_set(kind: str, n: int, seed: int, reference: np.ndarray, work_dir: str, ct_path: str, mr_path: str,
                  tre_spacing_mm: float = 8.0) -> list[Case]:
    """Draw one of :data:`CASE_SETS` (``n`` cases, seeded; ``native`` is one case) with :func:`make_cases`."""
    if kind not in CASE_SETS:
        raise ValueError(f"case set must be one of {', '.join(CASE_SETS)}, got {kind!r}")
    files = {"ct_path": ct_path, "mr_path": mr_path, "tre_spacing_mm": tre_spacing_mm, "prefix": f"{kind}_"}
    if kind == "native":  # no offset, no crop
        return make_cases(1, seed, reference, work_dir, max_rotation_deg=0.0, max_translation_mm=0.0, crop=False, **files)
    flip = None if kind == "acquired" else undo_axis_aligned_rotation(reference)  # nearest axis-aligned inverse
    extra = {"slab": {"slab_mm": (30.0, 60.0)},
             "hard": {"slab_mm": (30.0, 60.0), "max_rotation_deg": 45.0, "max_translation_mm": 80.0}}.get(kind, {})
    return make_cases(n, seed, reference, work_dir, pre_rotation=flip, **extra, **files)
