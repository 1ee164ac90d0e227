"""Intensity-based registration baselines with SimpleITK (rigid / similarity / affine, multi-resolution).

Conventions:

* All points are world **LPS mm** (ITK physical space), as everywhere in the project.
* The returned transform follows ITK's resampling convention: it maps a point of the **fixed** image to the
  point of the **moving** image that shows the same anatomy, ``moving(T(p)) ~ fixed(p)``. So
  ``IntensityRegistrationResult.map_points(fixed_points)`` gives the corresponding moving points, and
  ``SimpleITK.Resample(moving, fixed, result.transform)`` brings the moving image onto the fixed grid.

Method (:func:`register_intensity`):

1. Initial centre/translation with ``CenteredTransformInitializer``: ``"moments"`` aligns the intensity centres
   of mass, computed on ``image - min(image)`` so that air (CT -1000 HU, MR 0) weighs nothing and the negative
   CT values cannot flip the centre; ``"geometry"`` aligns the centres of the two voxel grids.
2. A rigid stage (``Euler3DTransform``). For ``"similarity"`` and ``"affine"`` a second stage
   (``Similarity3DTransform`` / ``AffineTransform``) starts from the rigid result: fitting the 12 affine
   parameters directly from a centre-of-mass start lets scaling/shear absorb misalignment and is less robust.
3. Each stage: ``ImageRegistrationMethod`` with Mattes mutual information (50 bins) or correlation, random
   sampling of ``sampling_percentage`` of the fixed voxels with a fixed ``seed`` (reproducible), linear
   interpolation, ``RegularStepGradientDescent`` (step ``learning_rate_mm``, halved on each direction reversal
   down to ``min_step_mm``; the plain gradient-descent optimizer with a short convergence window stops after a
   few iterations here), parameter scales from physical shift (a unit step moves voxels ~1 mm whatever the
   parameter), and a pyramid of ``shrink_factors`` with Gaussian smoothing ``smoothing_sigmas_mm`` (physical
   units). ``iterations`` is the per-level cap of each stage.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from samv2_components.errors import MissingExtraError, SAMv2InputError
from samv2_components.geometry import affine_and_space, as_points, convert_affine, crop_index_range, linear_map_matrix

if TYPE_CHECKING:  # pragma: no cover
    import SimpleITK

__all__ = [
    "IntensityRegistrationResult",
    "register_intensity",
    "read_sitk_image",
    "read_sitk_crop",
    "matrix_to_sitk_transform",
    "sitk_transform_to_matrix",
]

TRANSFORMS = ("rigid", "similarity", "affine")
METRICS = ("mattes", "correlation")
INITIALIZATIONS = ("moments", "geometry")


def _sitk():
    try:
        import SimpleITK as sitk
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingExtraError("SimpleITK", "registration", "intensity registration") from exc
    return sitk


def matrix_to_sitk_transform(matrix) -> "SimpleITK.AffineTransform":
    """A SimpleITK ``AffineTransform`` (centre 0) that maps points exactly as the 4x4 ``matrix`` (world LPS mm,
    column vectors; in this package a fixed -> moving matrix, ITK's resampling direction). The package's one
    matrix -> SimpleITK conversion."""
    sitk = _sitk()
    m = np.asarray(matrix, dtype=np.float64)
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(m[:3, :3].ravel().tolist())
    transform.SetTranslation(m[:3, 3].tolist())
    return transform


def sitk_transform_to_matrix(transform) -> np.ndarray:
    """The 4x4 matrix (world LPS mm) of an affine-like SimpleITK transform (composites included): maps points
    exactly as its ``TransformPoint`` (:func:`samv2_components.geometry.linear_map_matrix`). The inverse of
    :func:`matrix_to_sitk_transform`."""
    return linear_map_matrix(transform.TransformPoint)


def _short(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    detail = next((ln for ln in lines if "Description:" in ln or "ERROR" in ln), lines[-1] if lines else "")
    return f"{type(exc).__name__}: {detail}".strip()


def _from_metatensor(sitk, image, name: str):
    """A MONAI ``MetaTensor`` ``(1, X, Y, Z)`` / ``(X, Y, Z)`` (RAS or LPS affine) as a SimpleITK image."""
    affine, space = affine_and_space(image)
    lps = convert_affine(affine, space, "LPS")
    array = image.detach().cpu().numpy()
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3:
        raise SAMv2InputError(name, f"must be one 3D volume, got shape {tuple(array.shape)}")
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    direction = lps[:3, :3] / spacing
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
        raise SAMv2InputError(name, "affine has shear; ITK images need orthogonal axes")
    out = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array, (2, 1, 0))))  # sitk arrays are (z, y, x)
    out.SetSpacing(spacing.tolist())
    out.SetDirection(direction.flatten().tolist())
    out.SetOrigin(lps[:3, 3].tolist())
    return out


def read_sitk_image(source, name: str = "image", pixel_type: str = "float32") -> "SimpleITK.Image":
    """Read a 3D image as SimpleITK (``float32`` by default, ``"uint8"`` for masks: voxel > 0).

    Args:
        source: path of an ITK-readable file (NIfTI, NRRD, MHA, ...), a folder holding a DICOM series (read with
            ``ImageSeriesReader``; the largest series if there are several), a ``SimpleITK.Image`` or a MONAI
            ``MetaTensor``.
        name: what to call the value in error messages when it is not a path.
        pixel_type: ``"float32"`` or ``"uint8"``.

    Raises:
        SAMv2InputError: missing/unreadable file or folder, or not a 3D volume.
    """
    sitk = _sitk()
    if isinstance(source, sitk.Image):
        image, where = source, name
    elif hasattr(source, "affine") and hasattr(source, "detach"):
        image, where = _from_metatensor(sitk, source, name), name
    else:
        where = os.fspath(source)
        if not os.path.exists(where):
            raise SAMv2InputError(where, "file not found")
        try:
            if os.path.isdir(where):
                reader = sitk.ImageSeriesReader()
                series = [reader.GetGDCMSeriesFileNames(where, sid) for sid in reader.GetGDCMSeriesIDs(where)]
                if not series:
                    raise SAMv2InputError(where, "folder holds no DICOM series")
                reader.SetFileNames(max(series, key=len))
                image = reader.Execute()
            else:
                image = sitk.ReadImage(where)
        except SAMv2InputError:
            raise
        except Exception as exc:  # SimpleITK raises RuntimeError with a multi-line ITK message
            raise SAMv2InputError(where, f"cannot be read as an image ({_short(exc)})") from exc
    _check_volume(where, image.GetDimension(), image.GetSize(), image.GetNumberOfComponentsPerPixel())
    return _as_pixel_type(sitk, image, pixel_type)


def _check_volume(where: str, dimension: int, size, components: int) -> None:
    if dimension != 3 or components != 1 or min(size) < 2:
        raise SAMv2InputError(where, f"must be one 3D single-channel volume (size {tuple(size)}, {components} components)")


def _as_pixel_type(sitk, image, pixel_type: str):
    if pixel_type == "uint8":
        return sitk.Cast(sitk.BinaryThreshold(sitk.Cast(image, sitk.sitkFloat32), 0.0, 0.0, 0, 1), sitk.sitkUInt8)
    if pixel_type != "float32":
        raise ValueError(f"pixel_type must be 'float32' or 'uint8', got {pixel_type!r}")
    if image.GetPixelID() == sitk.sitkFloat32:
        return sitk.Image(image)  # SimpleITK copies on write: no second buffer (187 MB for a 512 x 488 x 187 crop)
    return sitk.Cast(image, sitk.sitkFloat32)


def read_sitk_crop(source, corners_lps: np.ndarray, margin_mm: float, name: str = "image"):
    """The part of a 3D image that covers the world points ``corners_lps`` ``(N, 3)`` (LPS mm) dilated by
    ``margin_mm`` along its axes (:func:`~samv2_components.geometry.crop_index_range`), as a float32 SimpleITK
    image with the file's own geometry; ``None`` when the points miss the image.

    Equal to ``RegionOfInterest`` of :func:`read_sitk_image` (values and geometry), but a file is read region
    first: ITK reads only that region where the format streams (uncompressed NIfTI, MHA, NRRD), and the float32
    copy is made of the region only (a 512 x 512 x 600 int16 CT read whole and cast: 0.9 GB at once). DICOM folders,
    images and tensors are read whole, then cropped.

    Raises:
        SAMv2InputError: as :func:`read_sitk_image`.
    """
    sitk = _sitk()
    if isinstance(source, sitk.Image) or hasattr(source, "affine") or os.path.isdir(os.fspath(source)):
        image = read_sitk_image(source, name)
        box = _index_box(image.GetSize(), image.GetOrigin(), image.GetSpacing(), image.GetDirection(), corners_lps, margin_mm)
        return None if box is None else sitk.RegionOfInterest(image, (box[1] - box[0]).tolist(), box[0].tolist())
    where = os.fspath(source)
    if not os.path.exists(where):
        raise SAMv2InputError(where, "file not found")
    reader = sitk.ImageFileReader()
    reader.SetFileName(where)
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise SAMv2InputError(where, f"cannot be read as an image ({_short(exc)})") from exc
    _check_volume(where, reader.GetDimension(), reader.GetSize(), reader.GetNumberOfComponents())
    box = _index_box(reader.GetSize(), reader.GetOrigin(), reader.GetSpacing(), reader.GetDirection(), corners_lps, margin_mm)
    if box is None:
        return None
    reader.SetExtractIndex(box[0].tolist())
    reader.SetExtractSize((box[1] - box[0]).tolist())
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise SAMv2InputError(where, f"cannot be read as an image ({_short(exc)})") from exc
    return _as_pixel_type(sitk, image, "float32")


def _index_box(size, origin, spacing, direction, corners_lps, margin_mm: float):
    """``crop_index_range`` on a SimpleITK geometry (index order x, y, z)."""
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(direction, dtype=np.float64).reshape(3, 3) @ np.diag(spacing)
    affine[:3, 3] = origin
    return crop_index_range(corners_lps, affine, size, margin_mm)


@dataclass
class IntensityRegistrationResult:
    """Outcome of :func:`register_intensity`.

    Attributes:
        transform: maps **fixed** physical points (LPS mm) to **moving** physical points (ITK resampling
            convention: ``SimpleITK.Resample(moving, fixed, transform)`` aligns moving onto fixed).
        final_metric: metric value at the end of the last stage (Mattes MI: negative, lower is better).
        wall_time_s: seconds spent registering (initialisation and all stages; not reading the images).
        stages: per stage: transform name, metric value, iterations of the last level, optimizer stop reason.
    """

    transform: "SimpleITK.Transform"
    final_metric: float
    wall_time_s: float
    stages: list[dict[str, Any]] | None = None

    def map_points(self, fixed_points_lps) -> np.ndarray:
        """Fixed-image points ``(N, 3)`` (or one ``(3,)``) in LPS mm -> corresponding moving points ``(N, 3)``."""
        points = as_points(fixed_points_lps, "fixed_points_lps")
        return np.array([self.transform.TransformPoint(p) for p in points.tolist()], dtype=np.float64).reshape(-1, 3)


def _choice(value: str, allowed: Sequence[str], what: str) -> str:
    v = str(value).strip().lower()
    if v not in allowed:
        raise SAMv2InputError(what, f"unknown value {value!r}; expected one of {', '.join(allowed)}")
    return v


def _initial_rigid(sitk, fixed, moving, initialization: str):
    if initialization == "moments":
        # centre of mass of (image - min): air and padding weigh ~0, CT's negative HU cannot flip the centre
        shift = lambda im: im - float(sitk.GetArrayViewFromImage(im).min())  # noqa: E731
        f, m, mode = shift(fixed), shift(moving), sitk.CenteredTransformInitializerFilter.MOMENTS
    else:
        f, m, mode = fixed, moving, sitk.CenteredTransformInitializerFilter.GEOMETRY
    return sitk.CenteredTransformInitializer(f, m, sitk.Euler3DTransform(), mode)


def _centre(sitk, image) -> np.ndarray:
    """Physical centre ``(3,)`` (LPS mm) of a mask's foreground (uint8) or of a float image's voxel grid."""
    if image.GetPixelID() == sitk.sitkUInt8 and sitk.GetArrayViewFromImage(image).any():
        stats = sitk.LabelShapeStatisticsImageFilter()
        stats.Execute(image)
        return np.asarray(stats.GetCentroid(1), dtype=np.float64)
    return np.asarray(image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2.0 for n in image.GetSize()]))


def _rigid_from_matrix(sitk, matrix, centre) -> "SimpleITK.Euler3DTransform":
    """The ``Euler3DTransform`` about ``centre`` that maps points as the rigid 4x4 ``matrix`` (``y = R x + t``, so
    its translation is ``t + R c - c``)."""
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape != (4, 4) or not np.allclose(m[:3, :3] @ m[:3, :3].T, np.eye(3), atol=1e-5) or np.linalg.det(m[:3, :3]) <= 0:
        raise SAMv2InputError("initial_transform", "must be a 4x4 rigid matrix (a proper rotation and a translation)")
    c = np.asarray(centre, dtype=np.float64)
    out = sitk.Euler3DTransform()
    out.SetCenter(c.tolist())
    # re-orthonormalise: SimpleITK rejects a matrix that is orthogonal only to ~1e-6
    u, _, vt = np.linalg.svd(m[:3, :3])
    r = u @ vt
    out.SetMatrix(r.ravel().tolist())
    out.SetTranslation((m[:3, 3] + r @ c - c).tolist())
    return out


def _promote(sitk, rigid, kind: str):
    """Similarity / affine transform equal to the rigid ``rigid`` (same centre)."""
    if kind == "similarity":
        out = sitk.Similarity3DTransform()
        out.SetCenter(rigid.GetCenter())
        out.SetMatrix(rigid.GetMatrix())
        out.SetTranslation(rigid.GetTranslation())
        return out
    out = sitk.AffineTransform(3)
    out.SetCenter(rigid.GetCenter())
    out.SetMatrix(rigid.GetMatrix())
    out.SetTranslation(rigid.GetTranslation())
    return out


def register_intensity(
    fixed,
    moving,
    transform: str = "affine",
    metric: str = "mattes",
    initialization: str = "moments",
    shrink_factors: Sequence[int] = (4, 2, 1),
    smoothing_sigmas_mm: Sequence[float] = (4.0, 2.0, 1.0),
    sampling_percentage: float = 0.2,
    iterations: int = 200,
    seed: int = 0,
    fixed_mask=None,
    learning_rate_mm: float = 2.0,
    min_step_mm: float = 1e-3,
    initial_transform=None,
) -> IntensityRegistrationResult:
    """Register ``moving`` to ``fixed`` by intensity (see the module docstring for the method).

    Args:
        fixed, moving: paths (NIfTI/NRRD/MHA/... or a DICOM series folder), ``SimpleITK.Image`` or ``MetaTensor``.
        transform: ``"rigid"`` (Euler3D), ``"similarity"`` (rigid + isotropic scale) or ``"affine"``.
        metric: ``"mattes"`` (Mattes mutual information, 50 bins; multi-modal) or ``"correlation"``.
        initialization: ``"moments"`` (centres of mass) or ``"geometry"`` (grid centres).
        shrink_factors, smoothing_sigmas_mm: the resolution pyramid, coarse to fine (same length).
        sampling_percentage: fraction (0-1] of fixed voxels sampled at random (seeded) for the metric.
        iterations: optimizer iterations cap per level and stage.
        seed: seed of the metric sampling, >= 0 (same seed, inputs and thread count: same result). SimpleITK
            takes seed 0 to mean "wall clock", so ``seed + 1`` is what it gets.
        fixed_mask: optional mask (same kinds as ``fixed``; voxels > 0 count) limiting the metric to a region.
        learning_rate_mm, min_step_mm: RegularStepGradientDescent initial and minimum step (~mm of motion).
        initial_transform: optional 4x4 rigid **fixed -> moving** matrix (LPS mm) to start from instead of
            ``initialization`` (e.g. a candidate of :mod:`~samv2_components.registration.candidates`); the rotation
            centre is then the centre of ``fixed_mask`` (of the fixed image without a mask), where a rotation step
            moves the metric's samples least.

    Returns:
        :class:`IntensityRegistrationResult` whose ``transform`` maps fixed points to moving points.
    """
    sitk = _sitk()
    transform = _choice(transform, TRANSFORMS, "transform")
    metric = _choice(metric, METRICS, "metric")
    initialization = _choice(initialization, INITIALIZATIONS, "initialization")
    shrink_factors = [int(s) for s in np.atleast_1d(shrink_factors)]
    smoothing_sigmas_mm = [float(s) for s in np.atleast_1d(smoothing_sigmas_mm)]
    if len(shrink_factors) != len(smoothing_sigmas_mm):
        raise SAMv2InputError("smoothing_sigmas_mm", "needs one value per shrink factor")
    if not 0.0 < float(sampling_percentage) <= 1.0:
        raise SAMv2InputError("sampling_percentage", f"must be in (0, 1], got {sampling_percentage}")
    if not 0 <= int(seed) < 2**32 - 1:
        raise SAMv2InputError("seed", f"must be in [0, 2**32 - 1), got {seed}")
    itk_seed = int(seed) + 1  # SimpleITK reads seed 0 as sitkWallClock (a different sampling every run)
    fixed_img = read_sitk_image(fixed, "fixed")
    moving_img = read_sitk_image(moving, "moving")
    mask = None if fixed_mask is None else read_sitk_image(fixed_mask, "fixed_mask", pixel_type="uint8")

    def run_stage(initial):
        reg = sitk.ImageRegistrationMethod()
        if metric == "mattes":
            reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=50)
        else:
            reg.SetMetricAsCorrelation()
        reg.SetMetricSamplingStrategy(reg.RANDOM)
        reg.SetMetricSamplingPercentage(float(sampling_percentage), itk_seed)
        if mask is not None:
            reg.SetMetricFixedMask(mask)
        reg.SetInterpolator(sitk.sitkLinear)
        reg.SetOptimizerAsRegularStepGradientDescent(
            learningRate=float(learning_rate_mm),
            minStep=float(min_step_mm),
            numberOfIterations=int(iterations),
            relaxationFactor=0.5,
            gradientMagnitudeTolerance=1e-8,
        )
        reg.SetOptimizerScalesFromPhysicalShift()
        reg.SetShrinkFactorsPerLevel(shrink_factors)
        reg.SetSmoothingSigmasPerLevel(smoothing_sigmas_mm)
        reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
        out = type(initial)(initial)  # a copy, optimised in place: stays a plain Euler3D/Similarity3D/Affine
        reg.SetInitialTransform(out, inPlace=True)
        try:
            reg.Execute(fixed_img, moving_img)
        except RuntimeError as exc:  # e.g. "All samples map outside moving image buffer"
            raise SAMv2InputError("register_intensity", f"registration failed ({_short(exc)})") from exc
        info = {
            "transform": out.GetName(),
            "metric": float(reg.GetMetricValue()),
            "iterations_last_level": int(reg.GetOptimizerIteration()),
            "stop": reg.GetOptimizerStopConditionDescription(),
        }
        return out, info

    start = time.perf_counter()
    if initial_transform is None:
        initial = _initial_rigid(sitk, fixed_img, moving_img, initialization)
    else:
        initial = _rigid_from_matrix(sitk, initial_transform, _centre(sitk, mask if mask is not None else fixed_img))
    rigid, info = run_stage(initial)
    stages, result = [info], rigid
    if transform != "rigid":
        result, info = run_stage(_promote(sitk, rigid, transform))
        stages.append(info)
    wall = time.perf_counter() - start
    return IntensityRegistrationResult(
        transform=result, final_metric=stages[-1]["metric"], wall_time_s=wall, stages=stages
    )
