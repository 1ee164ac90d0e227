"""Deformable refinement of a rigid alignment with elastix (B-spline, mutual information): AdaReg's last step.

SAMv2's AdaReg registers CT and MR in three steps: a rigid transform from embedding matches, a crop of the
large-FOV scan, and a deformable refinement (the paper used DEEDS). :func:`refine_deformable` is that last step,
with elastix's B-spline registration, run through SimpleITK's elastix filters where the installed SimpleITK has them
(``SimpleITK-SimpleElastix``) and otherwise through ``itk-elastix`` (ITK's Python wrapping, about 0.95 GB more
memory): :func:`require_elastix`.

Conventions:

* Points are world **LPS mm** (ITK physical space); every transform maps a point of the **fixed** image to the
  point of the **moving** image that shows the same anatomy (ITK resampling convention, as in
  :mod:`~samv2_components.registration.intensity_baselines`): ``moving(T(x)) ~ fixed(x)``.
* The result's ``displacement_field`` is the displacement of the **complete** mapping, rigid part included,
  relative to the identity: fixed point ``x`` corresponds to moving point ``x + u(x)``. It lives on the **working
  grid**: the fixed image's grid where its voxels are at least ``field_spacing_mm`` (2 mm) apart, otherwise a grid
  over the same extent, with the same origin and direction, at ``field_spacing_mm`` along the finer axes. A B-spline
  with control points tens of mm apart gains nothing from a 0.7 mm grid, which held 10.9 GB for a 512 x 512 x 187
  crop of a CT (a float64 vector field and its copies) and wrote a 0.9 GB field file.

Method:

0. Where the fixed image is finer than ``field_spacing_mm``, elastix registers its Gaussian-smoothed copy resampled
   onto the working grid (smoothing sigma ``sqrt(t^2 - s^2) / 2`` per axis, ``s`` the fixed and ``t`` the working
   spacing, against aliasing); the moving image is smoothed the same way before its pre-resampling. Below, "fixed
   grid" means the working grid.
1. The moving image is resampled once with the initial (rigid) transform ``R`` onto the fixed grid, padded by
   ``grid_spacing_mm`` on every side (so a deformation near the border still finds moving data): the pre-aligned
   moving image ``M'(y) = M(R(y))`` lives in the fixed physical frame; beyond the moving scan's edge it repeats the
   nearest edge value. elastix draws its samples only from the fixed voxels ``y`` whose ``R(y)`` lies inside the
   moving scan (a fixed mask, intersected with ``fixed_mask``), so padding never counts as anatomy; a sample that the
   B-spline moves a little past the edge still has a value. A moving mask instead (the choice before 0.9.4) drops
   every sample pushed past the edge, which biases the metric towards pushing ill-fitting samples out: registering the
   3 mm sample CT onto a crop of itself (identity truth, the fixed scan 18 mm longer at each end) moved points by
   10.7 mm on average (max 38 mm; 1.05 mm with the fixed mask), and onto itself by 1.01 mm (max 7.2; now 0.39).
2. elastix registers ``fixed`` to ``M'`` with its default ``"bspline"`` parameter map, adjusted: final control-point
   spacing ``grid_spacing_mm``, ``resolutions`` pyramid levels, ``iterations`` per level, ``metric``, optional
   bending-energy penalty, ``RandomSeed`` = ``seed``. This gives a B-spline ``B(x) = x + b(x)`` with
   ``M'(B(x)) ~ fixed(x)``, whose control grid is laid over the fixed image; the elastix parameter text does not
   depend on ``R`` (it is relative to ``M'``).
3. transformix evaluates ``b`` on the fixed grid. The complete mapping is ``T(x) = R(x + b(x))``:
   ``transform`` is ``CompositeTransform([R, DisplacementFieldTransform(b)])`` (applied right to left; outside the
   fixed grid ``b = 0`` and ``T = R``), and ``displacement_field`` is ``T(x) - x`` sampled on the fixed grid.
   ``resampled_moving`` is the **original** moving image resampled with ``T`` onto the **original** fixed grid (one
   interpolation, not two).

Pre-resampling (rather than handing elastix an initial transform) keeps elastix's B-spline grid on the fixed image
and its parameter file self-contained, and works for any SimpleITK initial transform.

All elastix/transformix files (log, parameter files) go to a temporary folder that is removed afterwards.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from samv2_components.errors import MissingExtraError, SAMv2InputError
from samv2_components.geometry import as_points
from samv2_components.io.atomic import atomic_file
from samv2_components.registration.intensity_baselines import _short, _sitk, matrix_to_sitk_transform, read_sitk_image

if TYPE_CHECKING:  # pragma: no cover
    import SimpleITK

__all__ = [
    "DeformableResult",
    "check_deformable_settings",
    "refine_deformable",
    "require_elastix",
    "write_displacement_field",
    "ELASTIX_BACKENDS",
    "ELASTIX_METRICS",
]

ELASTIX_BACKENDS = ("auto", "simpleitk", "itk-elastix")
ELASTIX_METRICS = (
    "AdvancedMattesMutualInformation",
    "NormalizedMutualInformation",
    "AdvancedNormalizedCorrelation",
    "AdvancedMeanSquares",
)
_GEOMETRY_TOL = 1e-4  # relative tolerance on origin/spacing/direction read back from transformix


def _simpleitk_has_elastix() -> bool:
    """True when the installed SimpleITK is a build with elastix (the ``SimpleITK-SimpleElastix`` package)."""
    try:
        import SimpleITK
    except ImportError:
        return False
    return hasattr(SimpleITK, "ElastixImageFilter") and hasattr(SimpleITK, "TransformixImageFilter")


def _itk_elastix_installed() -> bool:
    try:
        return importlib.util.find_spec("itk.ElastixPython") is not None
    except ImportError:  # no itk at all
        return False


def _itk_elastix_loaded() -> bool:
    """True once this process has loaded itk-elastix's compiled modules."""
    return any(name in sys.modules for name in ("itk._ElastixPython", "itk.ElastixPython"))


def require_elastix(backend: str = "auto") -> str:
    """Check that an elastix wrapping is installed, without loading it, and name the one the deformable stage uses.

    ``"simpleitk"``: SimpleITK's own elastix filters (the ``SimpleITK-SimpleElastix`` build of SimpleITK), which add
    a few MB to a process that already holds SimpleITK; ``"itk-elastix"``: the ITK Python package's wrapping, whose
    first use loads 30 of ITK's wrapped modules and holds about 0.95 GB for the rest of the process (a bare
    process: 38 -> 991 MiB); ``"auto"``: SimpleITK's where it has them, otherwise itk-elastix. The same elastix
    parameter map runs either way. A workflow calls this at its start; the modules load when the stage runs. Once
    itk-elastix's modules are loaded in a process, SimpleITK's elastix cannot run there (it aborts the process:
    the two builds of elastix clash), so ``"auto"`` then stays with itk-elastix.

    Raises:
        SAMv2InputError: unknown ``backend``. MissingExtraError: the requested wrapping (or, for ``"auto"``, any) is
        not installed.
    """
    if backend not in ELASTIX_BACKENDS:
        raise SAMv2InputError("backend", f"unknown value {backend!r}; expected one of {', '.join(ELASTIX_BACKENDS)}")
    if backend in ("auto", "simpleitk") and _simpleitk_has_elastix():
        if not _itk_elastix_loaded():
            return "simpleitk"
        if backend == "simpleitk":  # measured: SimpleITK's elastix then aborts the process (std::bad_alloc)
            raise SAMv2InputError(
                "backend", "'simpleitk' cannot run in a process that has already loaded itk-elastix's modules "
                "(the two elastix builds clash); use 'itk-elastix' or 'auto' here"
            )
    if backend == "simpleitk":
        raise SAMv2InputError(
            "SimpleITK-SimpleElastix", "not installed (backend 'simpleitk' needs SimpleITK built with elastix): "
            "pip install SimpleITK-SimpleElastix"
        )
    if not _itk_elastix_installed():
        raise MissingExtraError("itk-elastix", "registration", "the deformable stage")
    return "itk-elastix"


def _itk():
    try:
        import itk

        itk.ElastixRegistrationMethod  # noqa: B018 - itk loads its modules lazily; fail here, not mid-run
        itk.TransformixFilter  # noqa: B018
    except (ImportError, AttributeError) as exc:  # pragma: no cover - depends on the environment
        raise MissingExtraError("itk-elastix", "registration", "the deformable stage") from exc
    return itk


@contextlib.contextmanager
def _process_threads(threader, number_of_threads: int | None):
    """Run elastix and transformix on ``number_of_threads`` threads (``None``: the library's default), through the
    process-wide default of ``threader`` (``itk.MultiThreaderBase`` or ``SimpleITK.ProcessObject``), restored
    afterwards. The per-object ``SetNumberOfThreads`` of itk-elastix is not used: with more than one thread and a
    multi-metric map (the metric plus the bending penalty) it crashes the process with a segmentation fault
    (itk-elastix 0.2x, ITKElastix issue 160; reproduced here with 2 threads)."""
    if number_of_threads is None:
        yield
        return
    previous = threader.GetGlobalDefaultNumberOfThreads()
    threader.SetGlobalDefaultNumberOfThreads(int(number_of_threads))
    try:
        yield
    finally:
        threader.SetGlobalDefaultNumberOfThreads(previous)


@dataclass
class DeformableResult:
    """Outcome of :func:`refine_deformable`.

    Attributes:
        displacement_field: ``u`` on the working grid (the fixed image's own grid unless it is finer than
            ``field_spacing_mm``; always the fixed image's origin and direction, covering its voxel centres), vector
            image of 3 float64 components in LPS mm: grid point ``x`` maps to moving point ``x + u(x)``. The rigid
            (initial) part is included: ``u`` is the complete fixed -> moving mapping minus the identity.
        resampled_moving: the original moving image resampled onto the fixed grid with ``transform`` (linear
            interpolation, float32; outside the moving scan: the moving image's minimum).
        transform: the complete fixed -> moving mapping,
            ``CompositeTransform([initial, DisplacementFieldTransform(b)])``
            (``initial(x + b(x))`` with ``b`` the B-spline displacement, zero outside the fixed grid); usable with
            ``SimpleITK.Resample(moving, fixed, transform)`` and ``TransformPoint``.
        elastix_parameters: the final elastix ``TransformParameters`` text (B-spline stage, relative to the
            moving image pre-aligned with the initial transform), preceded by ``//`` comment lines recording the
            initial transform, for provenance.
        wall_time_s: seconds for the whole refinement (pre-alignment, elastix, transformix, composition).
        final_metric: elastix's final metric value of the last resolution (from its log; Mattes MI: negative,
            lower is better; includes the weighted bending penalty), or ``None`` if the log did not give it.
        backend: the elastix wrapping that ran (``"simpleitk"`` or ``"itk-elastix"``).
    """

    displacement_field: "SimpleITK.Image"
    resampled_moving: "SimpleITK.Image"
    transform: "SimpleITK.Transform"
    elastix_parameters: str
    wall_time_s: float
    final_metric: float | None = None
    backend: str = ""

    def map_points(self, fixed_points_lps) -> np.ndarray:
        """Fixed-image points ``(N, 3)`` (or one ``(3,)``) in LPS mm -> corresponding moving points ``(N, 3)``."""
        points = as_points(fixed_points_lps, "fixed_points_lps")
        return np.array([self.transform.TransformPoint(p) for p in points.tolist()], dtype=np.float64).reshape(-1, 3)


# ----------------------------------------------------------------------------------------------------------------
# conversions
# ----------------------------------------------------------------------------------------------------------------


def _initial_transform(sitk, initial, name: str = "initial_fixed_to_moving"):
    """``None`` / 4x4 LPS matrix (fixed -> moving) / ``SimpleITK.Transform`` as a SimpleITK transform (a copy)."""
    if initial is None:
        return sitk.Euler3DTransform()
    if isinstance(initial, sitk.Transform):
        if initial.GetDimension() != 3:
            raise SAMv2InputError(name, f"must be a 3D transform, got {initial.GetDimension()}D")
        return initial.__class__(initial)
    if hasattr(initial, "detach"):
        initial = initial.detach().cpu().numpy()
    matrix = np.asarray(initial, dtype=np.float64)
    if matrix.shape != (4, 4) or not np.all(np.isfinite(matrix)):
        raise SAMv2InputError(name, f"must be a finite 4x4 matrix or a SimpleITK transform, got shape {matrix.shape}")
    if not np.allclose(matrix[3], [0.0, 0.0, 0.0, 1.0], atol=1e-9):
        raise SAMv2InputError(name, f"last row must be (0, 0, 0, 1), got {matrix[3].tolist()}")
    if abs(np.linalg.det(matrix[:3, :3])) < 1e-9:
        raise SAMv2InputError(name, "matrix is singular")
    return matrix_to_sitk_transform(matrix)


def _to_itk(itk, sitk, image, pixel):
    """A SimpleITK scalar image as an ``itk.Image[pixel, 3]`` with the same geometry."""
    numpy_type = np.float32 if pixel is itk.F else np.uint8
    array = np.ascontiguousarray(sitk.GetArrayViewFromImage(image), dtype=numpy_type)  # (z, y, x)
    out = itk.image_from_array(array)  # itk size (x, y, z), like SimpleITK
    out.SetOrigin([float(v) for v in image.GetOrigin()])
    out.SetSpacing([float(v) for v in image.GetSpacing()])
    out.SetDirection(itk.matrix_from_array(np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)))
    return out


def _itk_field_to_sitk(itk, sitk, field):
    """ITK vector image ``(x, y, z) -> 3`` as a SimpleITK float64 vector image with the same geometry."""
    array = np.asarray(itk.array_from_image(field), dtype=np.float64)  # (z, y, x, 3)
    out = sitk.GetImageFromArray(array, isVector=True)
    out.SetOrigin([float(v) for v in field.GetOrigin()])
    out.SetSpacing([float(v) for v in field.GetSpacing()])
    out.SetDirection(np.asarray(itk.array_from_matrix(field.GetDirection()), dtype=np.float64).flatten().tolist())
    return out


def _checked_field(sitk, field, reference):
    """transformix's displacement field as a float64 vector image on exactly ``reference``'s grid; an error when it
    came back on another grid (its geometry went through parameter text, hence the tolerance)."""
    size = tuple(int(s) for s in field.GetSize())
    origin = np.asarray(field.GetOrigin(), dtype=np.float64)
    spacing = np.asarray(field.GetSpacing(), dtype=np.float64)
    direction = np.asarray(field.GetDirection(), dtype=np.float64)
    ref_spacing = np.asarray(reference.GetSpacing())
    if (
        field.GetNumberOfComponentsPerPixel() != 3
        or size != tuple(reference.GetSize())
        or not np.allclose(spacing, ref_spacing, rtol=_GEOMETRY_TOL, atol=0)
        or not np.allclose(origin, reference.GetOrigin(), rtol=0, atol=_GEOMETRY_TOL * ref_spacing.min())
        or not np.allclose(direction, reference.GetDirection(), atol=_GEOMETRY_TOL)
    ):
        raise SAMv2InputError(
            "refine_deformable", f"transformix returned a field on another grid (size {size}, origin "
            f"{origin.tolist()}, spacing {spacing.tolist()}) than the fixed image"
        )
    out = sitk.Cast(field, sitk.sitkVectorFloat64)
    out.CopyInformation(reference)  # exact fixed geometry
    return out


def _working_grid(sitk, fixed, field_spacing_mm: float | None):
    """An empty image of the working grid, or ``None`` when it is the fixed grid itself (no axis finer than
    ``field_spacing_mm``, or ``None``): same origin (first voxel centre) and direction, spacing
    ``max(spacing, field_spacing_mm)`` per axis, enough voxels to reach past the fixed grid's last voxel centre."""
    spacing = np.asarray(fixed.GetSpacing(), dtype=np.float64)
    if field_spacing_mm is None or np.all(spacing >= float(field_spacing_mm) - 1e-6):
        return None
    target = np.maximum(spacing, float(field_spacing_mm))
    extent = (np.asarray(fixed.GetSize()) - 1) * spacing
    size = [int(n) for n in np.ceil(extent / target - 1e-9).astype(int) + 1]
    grid = sitk.Image(size, sitk.sitkUInt8)
    grid.SetSpacing(target.tolist())
    grid.SetOrigin(fixed.GetOrigin())
    grid.SetDirection(fixed.GetDirection())
    return grid


def _smoothed_for(sitk, image, target_spacing):
    """``image`` (float32) Gaussian-smoothed for resampling to ``target_spacing``: per axis sigma
    ``sqrt(t^2 - s^2) / 2`` mm (nothing along axes already as coarse)."""
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    sigma = np.sqrt(np.clip(np.asarray(target_spacing, dtype=np.float64) ** 2 - spacing**2, 0.0, None)) / 2.0
    smoothing = sitk.DiscreteGaussianImageFilter()
    smoothing.SetVariance((sigma**2).tolist())  # physical units (the filter uses the image spacing)
    smoothing.SetMaximumKernelWidth(64)
    return smoothing.Execute(sitk.Cast(image, sitk.sitkFloat32))


def _padded_grid(sitk, fixed, margin_mm: float):
    """The fixed grid grown by ``margin_mm`` on every side (same spacing and direction), as an empty image."""
    spacing = np.asarray(fixed.GetSpacing(), dtype=np.float64)
    pad = np.ceil(margin_mm / spacing).astype(int)
    size = [int(s) + 2 * int(p) for s, p in zip(fixed.GetSize(), pad)]
    origin = fixed.TransformContinuousIndexToPhysicalPoint([-float(p) for p in pad])
    grid = sitk.Image(size, sitk.sitkUInt8)
    grid.SetSpacing(fixed.GetSpacing())
    grid.SetDirection(fixed.GetDirection())
    grid.SetOrigin(origin)
    return grid


def _final_metric_from_log(text: str) -> float | None:
    values = re.findall(r"Final metric value\s*=\s*([-+0-9.eE]+|nan|inf)", text)
    if not values:
        return None
    try:
        return float(values[-1])
    except ValueError:  # pragma: no cover
        return None


def _provenance_header(initial) -> str:
    lines = [
        "// samv2_components.registration.refine_deformable: elastix B-spline stage B(x) = x + b(x), from the fixed",
        "// image to the moving image pre-resampled with the initial transform R below (fixed -> moving, LPS mm).",
        "// Complete fixed -> moving mapping: x -> R(x + b(x)).",
        f"// InitialTransform {initial.GetName()}",
    ]
    try:
        lines.append("// InitialTransformParameters " + " ".join(f"{v:.17g}" for v in initial.GetParameters()))
        fixed_parameters = " ".join(f"{v:.17g}" for v in initial.GetFixedParameters())
        lines.append("// InitialTransformFixedParameters " + fixed_parameters)
    except Exception:  # pragma: no cover - composite transforms have no flat parameter list
        pass
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------
# elastix and transformix, through either wrapping
# ----------------------------------------------------------------------------------------------------------------


def _configure_bspline_map(
    pmap, resolutions, grid_spacing_mm, iterations, number_of_samples, seed, metric, bending_penalty, air
) -> None:
    """Adjust elastix's default ``"bspline"`` parameter map in place (the same settings for both wrappings)."""
    # the control grid's schedule stated explicitly: sqrt(2) apart per level (itk-elastix's default; SimpleITK's
    # elastix writes the same schedule rounded to 1.9881 / 1.41)
    pmap["GridSpacingSchedule"] = [repr(2.0 ** (level / 2)) for level in range(int(resolutions) - 1, -1, -1)]
    pmap["MaximumNumberOfIterations"] = [str(int(iterations))]
    pmap["NumberOfSpatialSamples"] = [str(int(number_of_samples))]
    pmap["RandomSeed"] = [str(int(seed))]
    pmap["ErodeMask"] = ["false"]
    pmap["WriteResultImage"] = ["false"]  # resampled_moving is made from the original moving image instead
    pmap["WriteIterationInfo"] = ["false"]
    pmap["DefaultPixelValue"] = [repr(air)]
    if bending_penalty:
        pmap["Metric"] = [metric, "TransformBendingEnergyPenalty"]
        pmap["Metric0Weight"] = ["1.0"]
        pmap["Metric1Weight"] = [repr(float(bending_penalty))]
    else:
        pmap["Metric"] = [metric]
        pmap["Metric0Weight"] = ["1.0"]
        if "Metric1Weight" in pmap:
            del pmap["Metric1Weight"]


def _read_text(path: str) -> str:
    if not os.path.exists(path):
        return ""
    with open(path, encoding="utf-8", errors="replace") as fh:
        return fh.read()


def _run_itk_elastix(work_fixed, prealigned, mask, settings: dict, workdir: str, number_of_threads):
    """elastix and transformix through itk-elastix: ``(b as an ITK-derived SimpleITK vector image, the final
    parameter text, elastix's log)``."""
    sitk, itk = _sitk(), _itk()
    parameters = itk.ParameterObject.New()
    pmap = parameters.GetDefaultParameterMap("bspline", int(settings["resolutions"]), float(settings["grid_spacing_mm"]))
    _configure_bspline_map(pmap, **settings)
    parameters.AddParameterMap(pmap)
    image_type = itk.Image[itk.F, 3]
    with _process_threads(itk.MultiThreaderBase, number_of_threads):
        moving = _to_itk(itk, sitk, prealigned, itk.F)  # one copy for elastix and transformix
        elastix = itk.ElastixRegistrationMethod[image_type, image_type].New()
        elastix.SetFixedImage(_to_itk(itk, sitk, work_fixed, itk.F))
        elastix.SetMovingImage(moving)
        elastix.SetFixedMask(_to_itk(itk, sitk, mask, itk.UC))
        elastix.SetParameterObject(parameters)
        elastix.SetOutputDirectory(workdir)
        elastix.SetLogToConsole(False)
        elastix.SetLogToFile(True)
        elastix.SetLogFileName("elastix.log")
        elastix.UpdateLargestPossibleRegion()
        result_parameters = elastix.GetTransformParameterObject()
        if result_parameters.GetNumberOfParameterMaps() != 1:  # pragma: no cover - we give elastix one map
            raise SAMv2InputError("refine_deformable", "elastix returned more than one transform")

        transformix = itk.TransformixFilter[image_type].New()
        transformix.SetMovingImage(moving)
        transformix.SetTransformParameterObject(result_parameters)
        transformix.SetComputeDeformationField(True)
        transformix.SetOutputDirectory(workdir)
        transformix.SetLogToConsole(False)
        transformix.SetLogToFile(False)
        transformix.UpdateLargestPossibleRegion()
        field = _itk_field_to_sitk(itk, sitk, transformix.GetOutputDeformationField())
    param_file = os.path.join(workdir, f"final.{uuid.uuid4().hex}.txt")
    result_parameters.WriteParameterFile(param_file)
    return field, _read_text(param_file), _read_text(os.path.join(workdir, "elastix.log"))


@contextlib.contextmanager
def _stdout_to_stderr():
    """Send what compiled code writes to the process's standard output to standard error meanwhile: SimpleITK's
    elastix prints "Writing image ..." whatever its log settings, and ``samv2``'s standard output carries only the
    result folder. Process-wide (file descriptor 1): another thread's output meanwhile goes to standard error too."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _run_simpleitk_elastix(work_fixed, prealigned, mask, settings: dict, workdir: str, number_of_threads):
    """elastix and transformix through SimpleITK's own filters (``SimpleITK-SimpleElastix``); same return as
    :func:`_run_itk_elastix`."""
    sitk = _sitk()
    pmap = sitk.GetDefaultParameterMap("bspline", int(settings["resolutions"]), float(settings["grid_spacing_mm"]))
    _configure_bspline_map(pmap, **settings)
    # the filters take the process default when they are made; their own SetNumberOfThreads also lowers ITK's global
    # maximum for the rest of the process (measured: a default of 3 read back as 2 afterwards), so it is not called
    with _process_threads(sitk.ProcessObject, number_of_threads):
        elastix = sitk.ElastixImageFilter()
        elastix.SetFixedImage(work_fixed)  # float32, as the pre-aligned moving image; the mask uint8
        elastix.SetMovingImage(prealigned)
        elastix.SetFixedMask(mask)
        elastix.SetParameterMap(pmap)
        elastix.SetOutputDirectory(workdir)
        elastix.LogToConsoleOff()
        elastix.LogToFileOn()
        elastix.SetLogFileName("elastix.log")
        with _stdout_to_stderr():
            elastix.Execute()  # it also resamples the moving image (its return value, unused here)
        result_maps = elastix.GetTransformParameterMap()
        if len(result_maps) != 1:  # pragma: no cover - we give elastix one map
            raise SAMv2InputError("refine_deformable", "elastix returned more than one transform")
        del elastix

        transformix = sitk.TransformixImageFilter()
        transformix.SetMovingImage(prealigned)
        transformix.SetTransformParameterMap(result_maps)
        transformix.ComputeDeformationFieldOn()
        transformix.SetOutputDirectory(workdir)
        transformix.LogToConsoleOff()
        transformix.LogToFileOff()
        transformix.Execute()
        field = transformix.GetDeformationField()
    param_file = os.path.join(workdir, f"final.{uuid.uuid4().hex}.txt")
    sitk.WriteParameterFile(result_maps[0], param_file)
    return field, _read_text(param_file), _read_text(os.path.join(workdir, "elastix.log"))


# ----------------------------------------------------------------------------------------------------------------
# main entry point
# ----------------------------------------------------------------------------------------------------------------


def check_deformable_settings(
    grid_spacing_mm: float = 30.0,
    iterations: int = 200,
    resolutions: int = 3,
    metric: str = "AdvancedMattesMutualInformation",
    bending_penalty: float | None = 1.0,
    number_of_threads: int | None = None,
    seed: int = 0,
    number_of_samples: int = 2048,
    field_spacing_mm: float | None = 2.0,
    backend: str = "auto",
    prefix: str = "",
) -> None:
    """Raise :class:`SAMv2InputError` naming the first invalid setting of :func:`refine_deformable` (the workflow
    calls it when it is built, before minutes of embedding and fitting, with ``prefix`` its config key
    ``"deformable_kwargs#"``)."""
    if metric not in ELASTIX_METRICS:
        raise SAMv2InputError(prefix + "metric", f"unknown value {metric!r}; expected one of {', '.join(ELASTIX_METRICS)}")
    if not (np.isfinite(grid_spacing_mm) and grid_spacing_mm > 0):
        raise SAMv2InputError(prefix + "grid_spacing_mm", f"must be positive, got {grid_spacing_mm}")
    counts = {"iterations": iterations, "resolutions": resolutions, "number_of_samples": number_of_samples}
    for what, value in counts.items():
        if int(value) < 1:
            raise SAMv2InputError(prefix + what, f"must be >= 1, got {value}")
    if bending_penalty is not None and not (np.isfinite(bending_penalty) and bending_penalty >= 0):
        raise SAMv2InputError(prefix + "bending_penalty", f"must be >= 0 or None, got {bending_penalty}")
    if not 0 <= int(seed) < 2**32 - 1:
        raise SAMv2InputError(prefix + "seed", f"must be in [0, 2**32 - 1), got {seed}")
    if number_of_threads is not None and int(number_of_threads) < 1:
        raise SAMv2InputError(prefix + "number_of_threads", f"must be >= 1 or None, got {number_of_threads}")
    if field_spacing_mm is not None and not (np.isfinite(field_spacing_mm) and field_spacing_mm > 0):
        raise SAMv2InputError(prefix + "field_spacing_mm", f"must be positive or None, got {field_spacing_mm}")
    if backend not in ELASTIX_BACKENDS:
        raise SAMv2InputError(prefix + "backend", f"unknown value {backend!r}; expected one of {', '.join(ELASTIX_BACKENDS)}")


def refine_deformable(
    fixed,
    moving,
    initial_fixed_to_moving=None,
    fixed_mask=None,
    grid_spacing_mm: float = 30.0,
    iterations: int = 200,
    resolutions: int = 3,
    metric: str = "AdvancedMattesMutualInformation",
    bending_penalty: float | None = 1.0,
    number_of_threads: int | None = None,
    seed: int = 0,
    number_of_samples: int = 2048,
    field_spacing_mm: float | None = 2.0,
    backend: str = "auto",
) -> DeformableResult:
    """Refine a rigid fixed -> moving alignment by elastix B-spline registration (see the module docstring).

    Args:
        fixed, moving: paths (NIfTI/NRRD/MHA/... or a DICOM series folder), ``SimpleITK.Image`` or ``MetaTensor``.
            For AdaReg, ``moving`` is typically the large-FOV scan already cropped around the fixed one.
        initial_fixed_to_moving: the rigid (or any) initial alignment, fixed -> moving in LPS mm: a 4x4 matrix
            (``moving = A[:3, :3] @ fixed + A[:3, 3]``), a ``SimpleITK.Transform``, or ``None`` (identity).
        fixed_mask: optional mask (same kinds as ``fixed``; voxels > 0 count) limiting the metric to a region.
        grid_spacing_mm: B-spline control-point spacing at the finest level (elastix
            ``FinalGridSpacingInPhysicalUnits``; coarser levels double/1.41x it). Smaller: more local freedom.
        iterations: optimizer iterations per resolution (``MaximumNumberOfIterations``).
        resolutions: pyramid levels (``NumberOfResolutions``; Gaussian smoothing pyramid, no downsampling).
        metric: elastix similarity metric, one of :data:`ELASTIX_METRICS`; Mattes MI for CT <-> MR.
        bending_penalty: weight of elastix's ``TransformBendingEnergyPenalty`` added to the metric (weight 1), a
            regulariser against folding and implausible warps; ``None`` or 0 turns it off (and runs ~3x faster).
            The penalty is the mean squared second derivative of the displacement (mm^-2): for deformations of a
            few mm over tens of mm it is ~1e-3, so the default 1.0 (elastix's own) is a mild regulariser; use
            10-100 for stiffer fields.
        number_of_threads: threads for elastix and transformix (ITK's process-wide default, set for this call and
            restored after it); ``None``: ITK's default (all cores). The random sampling is split over threads, so
            results differ (slightly) between thread counts.
        seed: elastix ``RandomSeed`` of the random sample coordinates (same seed, inputs and threads: same result).
        number_of_samples: random samples per iteration (``NumberOfSpatialSamples``).
        field_spacing_mm: finest spacing of the working grid (elastix's fixed image and the displacement field);
            ``None``: the fixed image's own grid, however fine.
        backend: which wrapping of elastix runs (:func:`require_elastix`): ``"simpleitk"`` (SimpleITK built with
            elastix, ``SimpleITK-SimpleElastix``: a few MB), ``"itk-elastix"`` (ITK's Python wrapping: about
            0.95 GB of ITK modules held by the process from then on) or ``"auto"`` (the first one installed). Same
            parameter map and inputs; results agree to elastix's run-to-run variation, not bit for bit.

    Returns:
        :class:`DeformableResult`; its ``transform`` / ``displacement_field`` map fixed points to moving points.

    Raises:
        SAMv2InputError: unreadable inputs, bad arguments, or elastix failing (e.g. no overlap).
        MissingExtraError: no elastix wrapping installed (``pip install samv2-components[registration]``).
    """
    sitk = _sitk()
    check_deformable_settings(grid_spacing_mm, iterations, resolutions, metric, bending_penalty, number_of_threads, seed,
                              number_of_samples, field_spacing_mm, backend)
    backend = require_elastix(backend)

    fixed_img = read_sitk_image(fixed, "fixed")
    moving_img = read_sitk_image(moving, "moving")
    mask = None if fixed_mask is None else read_sitk_image(fixed_mask, "fixed_mask", pixel_type="uint8")
    initial = _initial_transform(sitk, initial_fixed_to_moving)
    start = time.perf_counter()

    # 0. the working grid: the fixed grid, or a coarser one over its extent
    air = float(sitk.GetArrayViewFromImage(moving_img).min())
    work = _working_grid(sitk, fixed_img, field_spacing_mm)
    work_fixed = fixed_img if work is None else sitk.Resample(
        _smoothed_for(sitk, fixed_img, work.GetSpacing()), work, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    if mask is not None:  # onto the working grid, where it meets the overlap mask below
        mask = sitk.Resample(mask, work_fixed, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)

    # 1. pre-align the moving image onto the padded fixed grid (edge values repeated beyond the moving scan), and
    #    sample only the fixed voxels that the initial transform maps inside the moving scan
    grid = _padded_grid(sitk, work_fixed, float(grid_spacing_mm))
    moving_smoothed = moving_img if work is None else _smoothed_for(sitk, moving_img, work.GetSpacing())
    prealigned = sitk.Resample(moving_smoothed, grid, initial, sitk.sitkLinear, air, sitk.sitkFloat32, True)
    del moving_smoothed
    inside = sitk.Image(moving_img.GetSize(), sitk.sitkUInt8) + 1
    inside.CopyInformation(moving_img)
    overlap = sitk.Resample(inside, work_fixed, initial, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    if not sitk.GetArrayViewFromImage(overlap).any():
        raise SAMv2InputError("initial_fixed_to_moving", "maps the fixed image entirely outside the moving image")
    mask = overlap if mask is None else sitk.And(mask, overlap)
    del inside, overlap

    # 2. elastix B-spline, 3. transformix: the displacement b on the working grid
    settings = dict(
        resolutions=resolutions, grid_spacing_mm=grid_spacing_mm, iterations=iterations,
        number_of_samples=number_of_samples, seed=seed, metric=metric, bending_penalty=bending_penalty, air=air,
    )
    run = _run_simpleitk_elastix if backend == "simpleitk" else _run_itk_elastix
    with tempfile.TemporaryDirectory(prefix="samv2_elastix_") as workdir:
        try:
            bspline_field, elastix_text, log_text = run(work_fixed, prealigned, mask, settings, workdir, number_of_threads)
        except RuntimeError as exc:  # elastix raises with a long multi-line ITK message
            raise SAMv2InputError("refine_deformable", f"elastix failed ({_short(exc)})") from exc
    bspline_field = _checked_field(sitk, bspline_field, work_fixed)

    # 4. complete mapping x -> R(x + b(x)) (CompositeTransform applies its list right to left)
    deformation = sitk.DisplacementFieldTransform(sitk.Image(bspline_field))  # the constructor empties its input
    transform = sitk.CompositeTransform([initial, deformation])
    field = sitk.TransformToDisplacementField(
        transform,
        sitk.sitkVectorFloat64,
        work_fixed.GetSize(),
        work_fixed.GetOrigin(),
        work_fixed.GetSpacing(),
        work_fixed.GetDirection(),
    )
    del work_fixed, prealigned, mask
    resampled = sitk.Resample(moving_img, fixed_img, transform, sitk.sitkLinear, air, sitk.sitkFloat32)
    wall = time.perf_counter() - start
    return DeformableResult(
        displacement_field=field,
        resampled_moving=resampled,
        transform=transform,
        elastix_parameters=_provenance_header(initial) + elastix_text,
        wall_time_s=wall,
        final_metric=_final_metric_from_log(log_text),
        backend=backend,
    )


def write_displacement_field(result: DeformableResult | "SimpleITK.Image", path: str | os.PathLike) -> None:
    """Write ``result.displacement_field`` (or a displacement-field image) to ``path`` atomically.

    Any SimpleITK-writable format picked by the extension (``.nii.gz``, ``.nii``, ``.mha``, ``.nrrd``); a vector
    image of 3 components in LPS mm on the fixed grid (NIfTI stores it as a 5D ``(x, y, z, 1, 3)`` vector intent
    image, which ITK tools read back as a displacement field; note that NIfTI readers outside ITK may expect RAS
    vectors). Parent folders are created; the file appears only once complete
    (:func:`~samv2_components.io.atomic.atomic_file`).
    """
    sitk = _sitk()
    field = result.displacement_field if isinstance(result, DeformableResult) else result
    if not isinstance(field, sitk.Image) or field.GetNumberOfComponentsPerPixel() != 3:
        raise SAMv2InputError("displacement_field", "must be a 3-component SimpleITK vector image")
    path = os.fspath(path)
    name = os.path.basename(path)
    ext = next((e for e in (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr") if name.lower().endswith(e)), "")
    if not ext:
        raise SAMv2InputError(path, "unsupported extension (use .nii.gz, .nii, .mha or .nrrd)")
    if ext in (".mhd", ".nhdr"):
        raise SAMv2InputError(path, "header/data file pairs cannot be written atomically; use .mha or .nrrd")
    try:
        with atomic_file(path) as tmp:
            sitk.WriteImage(field, tmp, useCompression=ext in (".nii.gz", ".mha", ".nrrd"))
    except RuntimeError as exc:
        raise SAMv2InputError(path, f"cannot be written ({_short(exc)})") from exc
