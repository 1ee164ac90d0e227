"""The project's one place for coordinate conversions.

Conventions (see the project README):

* **World points** are physical millimetres in **LPS** (ITK/DICOM: +x left, +y posterior, +z superior) unless a
  function is told ``"RAS"`` (NIfTI/3D Slicer display: +x right, +y anterior, +z superior). The two differ by
  the sign of x and y.
* **Affines** map voxel indices ``(i, j, k, 1)`` of an array (in its own axis order, channel excluded) to world
  coordinates. MONAI's ``MetaTensor.affine`` is RAS by default (``meta["space"] == "RAS"``); the functions take
  the affine's space explicitly so that no caller re-derives the flip.
* Voxel index ``i`` means the **centre** of voxel ``i`` (ITK and NIfTI agree on this).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from samv2_components.errors import SAMv2InputError

if TYPE_CHECKING:  # pragma: no cover
    from monai.data import MetaTensor

__all__ = [
    "COORDINATE_SYSTEMS",
    "as_points",
    "check_coordinate_system",
    "convert_points",
    "convert_affine",
    "voxel_to_world",
    "world_to_voxel",
    "affine_and_space",
    "strided_grid_affine",
    "strided_grid_of",
    "label_centroids",
    "points_outside_scan",
    "body_mask",
    "body_box_corners",
    "body_points",
    "crop_index_range",
    "axis_angle_rotation",
    "rotation_angle_deg",
    "rigid_matrix",
    "apply_matrix",
    "linear_map_matrix",
    "voxel_to_grid_sample",
    "voxel_to_grid_sample_matrix",
    "grid_sample_points",
]

COORDINATE_SYSTEMS = ("LPS", "RAS")
_FLIP_XY = np.diag([-1.0, -1.0, 1.0, 1.0])


def check_coordinate_system(name: str, source: str | None = None) -> str:
    """Return ``name`` upper-cased if it is ``"LPS"`` or ``"RAS"``, else raise :class:`SAMv2InputError`."""
    system = str(name).strip().upper()
    if system not in COORDINATE_SYSTEMS:
        raise SAMv2InputError(source, f"unknown coordinate system {name!r}; expected one of {', '.join(COORDINATE_SYSTEMS)}")
    return system


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def as_points(points, name: str = "points") -> np.ndarray:
    """``points`` (tensor, array or sequence; ``(N, 3)`` or one ``(3,)`` point) as a float64 ``(N, 3)`` array."""
    arr = _as_numpy(points)
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] != 3:
        raise ValueError(f"{name} must have shape (N, 3), got {arr.shape}")
    return arr


def convert_points(points, from_system: str, to_system: str) -> np.ndarray:
    """Convert world points ``(N, 3)`` between LPS and RAS (negates x and y when the systems differ)."""
    src, dst = check_coordinate_system(from_system), check_coordinate_system(to_system)
    pts = as_points(points).copy()
    if src != dst:
        pts[:, :2] *= -1.0
    return pts


def convert_affine(affine, from_system: str, to_system: str) -> np.ndarray:
    """Re-express a 4x4 voxel-to-world affine in another world system (LPS <-> RAS flips world x and y)."""
    aff = _as_numpy(affine)
    if aff.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got {aff.shape}")
    if check_coordinate_system(from_system) != check_coordinate_system(to_system):
        aff = _FLIP_XY @ aff
    return aff


def voxel_to_world(indices, affine, affine_space: str = "RAS", world_space: str = "LPS") -> np.ndarray:
    """Map voxel indices ``(N, 3)`` (array axis order, may be fractional) to world points ``(N, 3)`` in mm.

    Args:
        indices: voxel coordinates, ``(N, 3)`` or ``(3,)``.
        affine: 4x4 voxel-to-world matrix of the array, expressed in ``affine_space``.
        affine_space: ``"RAS"`` for MONAI ``MetaTensor`` affines (the default), ``"LPS"`` for ITK-style ones.
        world_space: coordinate system of the returned points.
    """
    aff = convert_affine(affine, affine_space, world_space)
    idx = as_points(indices)
    return idx @ aff[:3, :3].T + aff[:3, 3]


def world_to_voxel(points, affine, affine_space: str = "RAS", world_space: str = "LPS") -> np.ndarray:
    """Inverse of :func:`voxel_to_world`: world points ``(N, 3)`` in ``world_space`` to fractional voxel indices."""
    aff = convert_affine(affine, affine_space, world_space)
    pts = as_points(points)
    return np.linalg.solve(aff[:3, :3], (pts - aff[:3, 3]).T).T


def affine_and_space(image) -> tuple[np.ndarray, str]:
    """Return the 4x4 affine (un-batched) of a MONAI ``MetaTensor`` and the space it is expressed in."""
    affine = _as_numpy(image.affine)
    if affine.ndim == 3:
        affine = affine[0]
    space = str(image.meta.get("space", "RAS")) if hasattr(image, "meta") else "RAS"
    return affine, check_coordinate_system(space)


def strided_grid_affine(affine, stride: Sequence[float], offset: Sequence[float]) -> np.ndarray:
    """Affine of a grid whose voxel ``i`` (per axis) has its centre at input voxel ``stride * i + offset``.

    This is how every embedding map gets its affine: a network head with output stride ``s`` whose receptive
    field centre lies at input index ``s * i + o``.
    """
    aff = _as_numpy(affine)
    sub = np.eye(4)
    sub[:3, :3] = np.diag(np.asarray(stride, dtype=np.float64))
    sub[:3, 3] = np.asarray(offset, dtype=np.float64)
    return aff @ sub


def strided_grid_of(affine, grid_affine, decimals: int = 6) -> tuple[tuple[int | float, ...], tuple[float, ...]]:
    """``(stride, offset)`` of the grid with affine ``grid_affine`` on the grid with ``affine`` (both in one space):
    the inverse of :func:`strided_grid_affine`, e.g. a head's grid read off its embedding map and the input scan.

    Values are rounded to ``decimals`` (strides that are whole numbers become ints). Raises ``ValueError`` when the
    grid is not a strided, axis-aligned sub-grid of ``affine``'s (rotated or sheared relative to it).
    """
    sub = np.linalg.solve(_as_numpy(affine), _as_numpy(grid_affine))
    scale = np.abs(np.diag(sub)[:3]).max()
    if np.abs(sub[:3, :3] - np.diag(np.diag(sub)[:3])).max() > 1e-6 * max(scale, 1.0):
        raise ValueError("the grid is not an axis-aligned strided sub-grid of the other")
    stride = [round(float(s), decimals) for s in np.diag(sub)[:3]]
    offset = tuple(round(float(o), decimals) + 0.0 for o in sub[:3, 3])  # + 0.0: no -0.0
    return tuple(int(s) if s == int(s) else s for s in stride), offset


def label_centroids(label_map, labels=None, min_voxels: int = 1) -> dict[int, np.ndarray]:
    """World centroid (LPS mm) of each label of an integer label map: the mean of its voxel centres.

    Args:
        label_map: ``MetaTensor`` ``(1, D, H, W)`` or ``(D, H, W)`` holding integer label ids, with its affine
            (as :func:`samv2_components.io.image.load_scan` with ``check_intensities=False`` returns; labels
            stored as floats are accepted if every value is a whole number).
        labels: optional label ids to report (others are ignored; ids absent from the map are left out).
        min_voxels: labels with fewer voxels than this are left out.

    Returns:
        ``{label_id: (3,) float64 LPS point}``, sorted by label id; background ``0`` is never included.
    """
    if not hasattr(label_map, "affine"):
        raise SAMv2InputError("label_map", "needs an affine (give a MetaTensor, e.g. from load_scan)")
    affine, space = affine_and_space(label_map)
    arr = _as_numpy(label_map)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 3:
        raise SAMv2InputError("label_map", f"must be one 3D volume ((1, D, H, W) or (D, H, W)), got {arr.shape}")
    if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr)):
        raise SAMv2InputError("label_map", "must hold integer label ids (found non-integer values)")
    idx = np.nonzero(arr)
    values = arr[idx].astype(np.int64)
    if labels is not None:
        wanted = np.asarray(sorted({int(v) for v in np.atleast_1d(labels)} - {0}), dtype=np.int64)
        keep = np.isin(values, wanted)
        idx, values = tuple(i[keep] for i in idx), values[keep]
    ids, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    sums = np.stack([np.bincount(inverse, weights=i.astype(np.float64), minlength=len(ids)) for i in idx], axis=1)
    ok = counts >= max(int(min_voxels), 1)
    if not ok.any():
        return {}
    # the affine is linear, so the world mean of the voxel centres is the world point of their mean index
    world = voxel_to_world(sums[ok] / counts[ok, None], affine, space, "LPS")
    return {int(i): w for i, w in zip(ids[ok], world)}


def points_outside_scan(image, points_lps, tolerance_voxels: float = 0.5) -> np.ndarray:
    """Mask ``(N,)`` of world points (LPS mm) that lie outside the scan as it was read from disk.

    Uses ``meta["original_affine"]`` and ``meta["spatial_shape"]`` (what the reader saw, before reorientation,
    resampling and padding) when present, else the image's own affine and shape. A point is inside when its voxel
    coordinates are within ``[-tolerance, n - 1 + tolerance]`` on every axis (``0.5``: the outer voxel faces).
    """
    meta = getattr(image, "meta", {})
    if "original_affine" in meta and "spatial_shape" in meta:
        affine = np.asarray(meta["original_affine"], dtype=np.float64)
        shape = np.asarray(meta["spatial_shape"], dtype=np.float64).reshape(-1)[-3:]
        space = str(meta.get("space", "RAS"))
    else:
        (affine, space), shape = affine_and_space(image), np.asarray(image.shape[-3:], np.float64)
    voxels = world_to_voxel(points_lps, affine, affine_space=space, world_space="LPS")
    return np.any((voxels < -tolerance_voxels) | (voxels > shape - 1 + tolerance_voxels), axis=1)


# ----------------------------------------------------------------------------------------------------------------
# Body box (AdaReg's crop, also used for CrossSAM's registered pairs)
# ----------------------------------------------------------------------------------------------------------------


def body_mask(image: torch.Tensor, threshold: float = -25.0) -> torch.Tensor:
    """Body mask ``(D, H, W)`` bool of a preprocessed scan ``(1, D, H, W)``: intensity > ``threshold``, largest
    face-connected component (drops table, coils and noise specks). Uses SimpleITK's connected components (the
    ``registration`` extra; MONAI's own needs scikit-image)."""
    import SimpleITK as sitk

    mask = torch.as_tensor(image[0] > threshold).cpu()
    if not mask.any():
        return mask
    labels = sitk.RelabelComponent(sitk.ConnectedComponent(sitk.GetImageFromArray(mask.numpy().astype(np.uint8))), sortByObjectSize=True)
    return torch.from_numpy(sitk.GetArrayViewFromImage(labels) == 1)


def body_box_corners(image: MetaTensor, mask: torch.Tensor) -> np.ndarray:
    """The 8 corners ``(8, 3)`` (LPS mm) of the voxel bounding box of ``mask`` ``(D, H, W)`` in ``image``'s grid,
    at the outer voxel faces."""
    idx = torch.nonzero(torch.as_tensor(mask)).cpu().numpy()
    lo, hi = idx.min(0) - 0.5, idx.max(0) + 0.5
    corners = np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])])
    affine, space = affine_and_space(image)
    return voxel_to_world(corners, affine, affine_space=space, world_space="LPS")


def body_points(image: MetaTensor, mask: torch.Tensor, step_mm: float = 8.0) -> np.ndarray:
    """Points ``(N, 3)`` (LPS mm) of ``mask`` ``(D, H, W)`` in ``image``'s grid: its voxel centres every ``step_mm``
    or so along each array axis (a stride of ``round(step_mm / voxel size)``, at least 1): the body sampled evenly,
    to measure how far apart two transforms place it."""
    affine, space = affine_and_space(image)
    voxel_mm = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    stride = [max(1, int(round(float(step_mm) / v))) for v in voxel_mm]
    sub = torch.as_tensor(mask)[:: stride[0], :: stride[1], :: stride[2]]
    idx = torch.nonzero(sub).cpu().numpy() * np.asarray(stride)
    return voxel_to_world(idx.astype(np.float64), affine, affine_space=space, world_space="LPS")


def crop_index_range(corners_lps: np.ndarray, affine_lps: np.ndarray, shape, margin_mm: float) -> tuple[np.ndarray, np.ndarray] | None:
    """The voxel index range ``[start, stop)`` of a volume (``shape`` and 4x4 voxel -> LPS ``affine_lps``, in the
    same axis order) that covers the world points ``corners_lps`` ``(N, 3)`` dilated by ``margin_mm`` along the
    volume's axes, clipped to the volume; None when fewer than 2 voxels per axis remain (no overlap).

    AdaReg's crop of the large-FOV scan: the small scan's body box mapped through the rigid transform, plus the
    margin. Used for the bundle's output crop (original scan, SimpleITK index order) and for CrossSAM's training
    pairs (preprocessed tensor, array order).
    """
    affine_lps = np.asarray(affine_lps, dtype=np.float64)
    index = np.linalg.solve(affine_lps[:3, :3], (np.asarray(corners_lps, dtype=np.float64) - affine_lps[:3, 3]).T).T
    voxel_mm = np.linalg.norm(affine_lps[:3, :3], axis=0)
    lo, hi = index.min(0) - margin_mm / voxel_mm, index.max(0) + margin_mm / voxel_mm
    size = np.asarray(shape, dtype=int)
    start = np.clip(np.floor(lo).astype(int), 0, size)
    stop = np.clip(np.ceil(hi).astype(int) + 1, 0, size)  # voxel centres start..stop-1 cover [lo, hi] (if inside)
    if np.any(stop - start < 2):
        return None
    return start, stop


# ----------------------------------------------------------------------------------------------------------------
# Rotations and 4x4 matrices (world LPS mm, column vectors: y = M[:3, :3] @ x + M[:3, 3])
# ----------------------------------------------------------------------------------------------------------------


def axis_angle_rotation(axis, angle_deg: float) -> np.ndarray:
    """3x3 rotation by ``angle_deg`` degrees about ``axis`` ``(3,)`` (any length > 0), right-handed (Rodrigues:
    ``R = I + sin(t) K + (1 - cos(t)) K^2`` with ``K`` the cross-product matrix of the unit axis).

    The package's one Rodrigues rotation (the registration benchmark's random offsets, the rigid fit's minimal
    rotation between two directions)."""
    a = np.asarray(axis, dtype=np.float64)
    a = a / np.linalg.norm(a)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    t = np.radians(angle_deg)
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k


def rotation_angle_deg(matrix) -> float:
    """Angle (degrees, ``[0, 180]``) of the rotation in the upper-left 3x3 block of ``matrix`` (3x3 or 4x4)."""
    r = np.asarray(matrix, dtype=np.float64)[:3, :3]
    return float(np.degrees(np.arccos(np.clip((np.trace(r) - 1.0) / 2.0, -1.0, 1.0))))


def rigid_matrix(rotation=None, translation=(0.0, 0.0, 0.0), centre=(0.0, 0.0, 0.0)) -> np.ndarray:
    """4x4 matrix of ``p -> R (p - c) + c + t`` (``R`` 3x3, default identity; ``t``, ``c`` ``(3,)`` mm)."""
    r = np.eye(3) if rotation is None else np.asarray(rotation, dtype=np.float64)
    c = np.asarray(centre, dtype=np.float64)
    m = np.eye(4)
    m[:3, :3] = r
    m[:3, 3] = c - r @ c + np.asarray(translation, dtype=np.float64)
    return m


def apply_matrix(matrix, points) -> np.ndarray:
    """Map points ``(N, 3)`` (or one ``(3,)``) with a 4x4 matrix: ``(N, 3)`` float64."""
    p = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    return p @ np.asarray(matrix)[:3, :3].T + np.asarray(matrix)[:3, 3]


def linear_map_matrix(map_point) -> np.ndarray:
    """4x4 matrix of an affine map given as a function ``map_point((x, y, z)) -> (3,)`` (e.g. an ITK or SimpleITK
    transform's ``TransformPoint``, composites included), from the images of the origin and the unit vectors
    (exact for any affine map)."""
    o = np.array([float(v) for v in map_point([0.0, 0.0, 0.0])])
    m = np.eye(4)
    m[:3, 3] = o
    for i in range(3):
        e = [0.0, 0.0, 0.0]
        e[i] = 1.0
        m[:3, i] = np.array([float(v) for v in map_point(e)]) - o
    return m


# ----------------------------------------------------------------------------------------------------------------
# torch.nn.functional.grid_sample's normalised coordinates
# ----------------------------------------------------------------------------------------------------------------


def _grid_sample_scale_offset(shape, align_corners: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-axis ``(scale, offset)`` (array axis order, float64) of ``normalised = scale * voxel + offset``."""
    n = np.asarray([float(s) for s in shape], dtype=np.float64)
    if align_corners:
        return 2.0 / np.maximum(n - 1.0, 1.0), np.full(n.shape, -1.0)
    return 2.0 / n, 1.0 / n - 1.0


def voxel_to_grid_sample(voxels, shape, align_corners: bool = False):
    """Continuous voxel coordinates of a volume to the normalised coordinates ``torch.nn.functional.grid_sample``
    reads: the package's one such conversion (the network's coarse-to-fine upsampling keeps its own, see
    ``upsample_to_fine_grid``).

    Args:
        voxels: ``(..., 3)`` voxel coordinates in **array axis order** ``(D, H, W)`` (the volume's last three axes;
            fractional allowed, voxel index ``i`` is the centre of voxel ``i``), a float ``torch.Tensor`` or
            anything numpy reads.
        shape: the volume's spatial size ``(D, H, W)``.
        align_corners: the ``align_corners`` the caller passes to ``grid_sample``. ``False`` (default): the
            normalised range ``[-1, 1]`` spans the outer voxel faces, voxel ``i`` of ``n`` sits at
            ``(2 i + 1) / n - 1`` (valid for ``n == 1`` too). ``True``: ``[-1, 1]`` spans the first and last voxel
            centres, voxel ``i`` sits at ``2 i / (n - 1) - 1`` (for ``n == 1`` every value reads voxel 0).
            Either way ``grid_sample`` maps the result back to voxel ``i``; padding starts beyond the outer voxel
            centres (``padding_mode="zeros"``: a point one voxel outside, e.g. ``-1``, reads only padding).

    Returns:
        ``(..., 3)`` in **grid_sample's order** ``(x, y, z) = (W, H, D)``, i.e. the last axis reversed, as float64
        (numpy input: ``np.ndarray``; tensor input: a tensor on its device). Cast to the volume's dtype and
        reshape to ``(N, d_out, h_out, w_out, 3)`` for a 5-D ``grid_sample``.
    """
    if isinstance(voxels, torch.Tensor):
        v = voxels.to(torch.float64)
        n = torch.as_tensor([float(s) for s in shape], dtype=torch.float64, device=v.device)
        if align_corners:
            norm = v * 2.0 / torch.clamp(n - 1.0, min=1.0) - 1.0
        else:
            norm = (v * 2.0 + 1.0) / n - 1.0
        return norm[..., [2, 1, 0]]
    v = np.asarray(voxels, dtype=np.float64)
    n = np.asarray([float(s) for s in shape], dtype=np.float64)
    norm = v * 2.0 / np.maximum(n - 1.0, 1.0) - 1.0 if align_corners else (v * 2.0 + 1.0) / n - 1.0
    return norm[..., ::-1].copy()


def voxel_to_grid_sample_matrix(shape, align_corners: bool = False) -> np.ndarray:
    """:func:`voxel_to_grid_sample` as a 4x4 float64 matrix: voxel ``(i, j, k, 1)`` (array axis order) to
    ``(x, y, z, 1)`` in ``grid_sample``'s order (rows reversed), to compose with a world -> voxel matrix (batched,
    differentiable sampling at world points)."""
    scale, offset = _grid_sample_scale_offset(shape, align_corners)
    matrix = np.diag([*scale, 1.0])
    matrix[:3, 3] = offset
    return matrix[[2, 1, 0, 3]]


def grid_sample_points(volume: torch.Tensor, grid: torch.Tensor, mode: str = "bilinear", padding_mode: str = "zeros",
                       align_corners: bool = False) -> torch.Tensor:
    """Samples ``(C, P)`` of one volume ``(1, C, D, H, W)`` at ``P`` points ``(P, 3)`` given in ``grid_sample``'s
    normalised ``(x, y, z)`` (e.g. from :func:`voxel_to_grid_sample_matrix`); ``mode``, ``padding_mode`` and
    ``align_corners`` as ``torch.nn.functional.grid_sample`` takes them. Differentiable in ``grid``.

    On the CPU ``grid_sample`` spreads a 3D volume's work over its batch entries only, so one batch entry samples on
    one core: the points are dealt out to one entry per thread of the volume (expanded, not copied). Every sample is
    computed alone, so the values are those of a single call.
    """
    n_points = grid.shape[0]
    groups = max(1, min(torch.get_num_threads(), n_points)) if volume.device.type == "cpu" and volume.shape[0] == 1 else 1
    per_group = -(-n_points // groups)
    if per_group * groups > n_points:  # pad with copies of the last point, dropped below
        grid = torch.cat([grid, grid[-1:].expand(per_group * groups - n_points, -1)])
    samples = F.grid_sample(volume.expand(groups, -1, -1, -1, -1), grid.reshape(groups, per_group, 1, 1, 3), mode=mode,
                            padding_mode=padding_mode, align_corners=align_corners)
    channels = volume.shape[1]
    return samples.reshape(groups, channels, per_group).transpose(0, 1).reshape(channels, -1)[:, :n_points]
