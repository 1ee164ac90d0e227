"""Reading and writing linear (rigid / affine) transform files: ITK ``.tfm``/``.h5``/``.mat`` and a JSON record.

DIRECTION CONVENTION -- READ THIS FIRST
=======================================

Every matrix here is a 4x4 homogeneous matrix (column vectors, ``y = M[:3, :3] @ x + M[:3, 3]``) in **world
LPS millimetres** (ITK physical space) that maps a point of the **FIXED** image to the corresponding point of the
**MOVING** image (``fixed -> moving``). This is the ITK resampling convention: to resample the moving image onto
the fixed image's grid, ITK/SimpleITK/ANTs/3D Slicer (as a "transform from parent" / resampling transform) look up,
for each fixed voxel at ``x``, the moving image at ``M x``. It is therefore the **inverse** of the motion that
carries the moving image onto the fixed one: to move *points* of the moving image (e.g. landmarks) onto the fixed
image, apply ``inv(M)``.

* :func:`write_itk_transform` / :func:`read_itk_transform`: ITK transform files written and read by ITK's own
  transform IO through SimpleITK (``SimpleITK.WriteTransform`` / ``ReadTransform``), so that ITK, ANTs
  (``antsApplyTransforms``) and 3D Slicer load them. ``.tfm``/``.txt`` is text, ``.h5``/``.hdf5`` is HDF5,
  ``.mat`` is the ITK/ANTs MATLAB format. Rigid matrices are stored as ``VersorRigid3DTransform_double_3_3``,
  affine ones as ``AffineTransform_double_3_3`` (rotation centre 0, so the translation is ``M[:3, 3]``).
* :func:`write_transform_json` / :func:`read_transform_json`: a self-describing JSON record holding the matrix in
  both directions and in both LPS and RAS, with the fixed and moving file names.

SimpleITK rather than the Python ``itk`` package: the latter loads about 900 of ITK's wrapped modules (0.9 GB of
memory held for the rest of the process) to write one rigid transform. Writes are atomic: the file is
written under a temporary name in the same folder and moved into place, so a failed write leaves any previous
file untouched and no partial file behind.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from samv2_components.errors import SAMv2InputError
from samv2_components.geometry import linear_map_matrix
from samv2_components.io.atomic import atomic_file
from samv2_components.io.points import _atomic_write

__all__ = [
    "TRANSFORM_CONVENTION",
    "read_itk_transform",
    "read_transform_json",
    "write_itk_transform",
    "write_transform_json",
]

TRANSFORM_CONVENTION = (
    "matrix_fixed_to_moving maps a physical point of the fixed image to the corresponding point of the moving "
    "image (the ITK resampling convention: resampling the moving image with it aligns it to the fixed image); "
    "its inverse, matrix_moving_to_fixed, moves points of the moving image onto the fixed image. "
    "Homogeneous 4x4, column vectors: y = M[:3, :3] @ x + M[:3, 3], world millimetres."
)
_ITK_SUFFIXES = (".tfm", ".txt", ".h5", ".hdf5", ".mat")
_TRANSFORM_TYPES = ("rigid", "affine")
_ROTATION_TOLERANCE = 1e-6
_FLIP_XY = np.diag([-1.0, -1.0, 1.0, 1.0])
_JSON_KEYS = (
    "convention",
    "coordinate_system",
    "units",
    "fixed",
    "moving",
    "matrix_fixed_to_moving_lps",
    "matrix_moving_to_fixed_lps",
    "matrix_fixed_to_moving_ras",
    "matrix_moving_to_fixed_ras",
)
_PathLike = str | os.PathLike


def _check_matrix(matrix, source: str = "matrix") -> np.ndarray:
    """``matrix`` as a float64 4x4 invertible homogeneous matrix, else :class:`SAMv2InputError`."""
    try:
        m = np.array(matrix, dtype=np.float64)
    except (TypeError, ValueError):
        raise SAMv2InputError(source, "must be a 4x4 matrix of numbers") from None
    if m.shape != (4, 4):
        raise SAMv2InputError(source, f"must be a 4x4 matrix, got shape {m.shape}")
    if not np.all(np.isfinite(m)):
        raise SAMv2InputError(source, "must be finite (no NaN or inf)")
    if not np.allclose(m[3], [0.0, 0.0, 0.0, 1.0], rtol=0.0, atol=1e-12):
        raise SAMv2InputError(source, f"last row must be [0, 0, 0, 1], got {m[3].tolist()}")
    det = float(np.linalg.det(m[:3, :3]))
    if not abs(det) > 1e-12:
        raise SAMv2InputError(source, "the linear part is singular (not invertible)")
    m[3] = [0.0, 0.0, 0.0, 1.0]
    return m


def _proper_rotation(linear: np.ndarray, source: str) -> np.ndarray:
    """The nearest rotation to ``linear``, which must be one within :data:`_ROTATION_TOLERANCE`."""
    error = float(np.abs(linear.T @ linear - np.eye(3)).max())
    det = float(np.linalg.det(linear))
    if error > _ROTATION_TOLERANCE or det <= 0.0:
        problem = "a reflection (det < 0)" if det <= 0.0 and error <= _ROTATION_TOLERANCE else "not orthonormal"
        raise SAMv2InputError(
            source,
            f"rigid transform_type needs a proper rotation (orthonormal, det +1) but the 3x3 part is {problem} "
            f"(max |R^T R - I| = {error:.2e}, det = {det:.6f}); use transform_type='affine'",
        )
    u, _, vt = np.linalg.svd(linear)
    return u @ vt


def _itk_suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in _ITK_SUFFIXES:
        known = ", ".join(_ITK_SUFFIXES)
        raise SAMv2InputError(path, f"unknown transform file type {path.suffix!r}; use one of {known}")
    return suffix


def _sitk_transform(m: np.ndarray, transform_type: str, source: str):
    import SimpleITK as sitk  # a dependency of the package, imported where a transform file is read or written
    if transform_type == "rigid":
        transform = sitk.VersorRigid3DTransform()
        transform.SetMatrix(_proper_rotation(m[:3, :3], source).ravel().tolist())
    else:
        transform = sitk.AffineTransform(3)
        transform.SetMatrix(np.ascontiguousarray(m[:3, :3]).ravel().tolist())
    transform.SetCenter([0.0, 0.0, 0.0])
    transform.SetTranslation([float(v) for v in m[:3, 3]])
    return transform


def write_itk_transform(matrix, path: _PathLike, transform_type: str = "rigid") -> None:
    """Write a 4x4 world-LPS matrix as an ITK transform file (``.tfm``/``.txt``, ``.h5``/``.hdf5`` or ``.mat``).

    **The matrix must map points of the FIXED image to points of the MOVING image** (``fixed -> moving``, the ITK
    resampling convention): SimpleITK ``Resample(moving, fixed, ReadTransform(path))``, ``antsApplyTransforms
    -r fixed -i moving -t path`` and 3D Slicer then put the moving image onto the fixed image. Pass the inverse of
    a motion that carries moving points onto fixed points.

    Args:
        matrix: 4x4 homogeneous matrix (column vectors), LPS millimetres, fixed -> moving.
        path: output file; the extension picks the format. Its folder is created if needed.
        transform_type: ``"rigid"`` (the 3x3 part must be a proper rotation within 1e-6, which is then
            re-orthonormalised; written as ``VersorRigid3DTransform``) or ``"affine"`` (any invertible 3x3;
            written as ``AffineTransform``).

    Raises:
        SAMv2InputError (a ValueError): malformed matrix, non-rotation for ``"rigid"``, unknown type or extension.
    """
    path = Path(path)
    if transform_type not in _TRANSFORM_TYPES:
        raise SAMv2InputError("transform_type", f"must be one of {', '.join(_TRANSFORM_TYPES)}, got {transform_type!r}")
    _itk_suffix(path)
    m = _check_matrix(matrix)
    transform = _sitk_transform(m, transform_type, "matrix")
    import SimpleITK as sitk

    # ITK picks the file format from the extension: the temporary name keeps it
    with atomic_file(path) as tmp:
        sitk.WriteTransform(transform, tmp)
        if os.path.getsize(tmp) == 0:
            raise OSError(f"ITK wrote nothing to {tmp}")


def _transform_to_matrix(transform, path: Path) -> np.ndarray:
    """4x4 that maps points exactly as ``transform.TransformPoint`` does (any linear SimpleITK transform, composites
    of linear ones included: probed at four points, exact for a linear map)."""
    if not transform.IsLinear():
        raise SAMv2InputError(path, f"holds a non-linear {transform.GetName()}; expected a rigid or affine transform")
    return _check_matrix(linear_map_matrix(transform.TransformPoint), os.fspath(path))


def read_itk_transform(path: _PathLike) -> np.ndarray:
    """Read an ITK transform file holding one linear transform, as a 4x4 world-LPS matrix, fixed -> moving.

    The matrix maps points exactly as ITK's ``TransformPoint`` does (the transform's centre and translation are
    folded into ``M[:3, 3]``), i.e. in the same direction as :func:`write_itk_transform` takes it. A file of several
    linear transforms (SimpleITK reads it as their composite) gives the matrix of the composite.

    Raises:
        SAMv2InputError: missing or unreadable file, a non-linear or a non-3D transform.
    """
    path = Path(path)
    if not path.is_file():
        raise SAMv2InputError(path, "transform file not found")
    _itk_suffix(path)
    import SimpleITK as sitk

    try:
        transform = sitk.ReadTransform(str(path))
    except Exception as exc:  # SimpleITK raises RuntimeError with a long ITK message
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise SAMv2InputError(path, f"cannot be read as an ITK transform ({first})") from None
    if transform.GetDimension() != 3:
        raise SAMv2InputError(path, "is not a 3D transform")
    return _transform_to_matrix(transform, path)


def _lps_to_ras(m: np.ndarray) -> np.ndarray:
    """The same world-to-world map expressed in RAS: ``F M F`` with ``F = diag(-1, -1, 1, 1)``."""
    return _FLIP_XY @ m @ _FLIP_XY


def _json_default(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def write_transform_json(
    matrix,
    path: _PathLike,
    fixed: _PathLike | None = None,
    moving: _PathLike | None = None,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Write a self-describing JSON record of a 4x4 world-LPS matrix, **fixed -> moving** (see the module doc).

    Keys: ``convention`` (a sentence stating the direction), ``coordinate_system: "LPS"``, ``units: "mm"``,
    ``fixed`` and ``moving`` (the file names as given, or null), ``matrix_fixed_to_moving_lps`` (``matrix``),
    ``matrix_moving_to_fixed_lps`` (its inverse), the same two in RAS (``matrix_fixed_to_moving_ras``,
    ``matrix_moving_to_fixed_ras``: ``F M F`` with ``F = diag(-1, -1, 1, 1)``), then the items of ``extra`` (e.g.
    a confidence summary; NumPy values are converted; its keys may not shadow the ones above).

    Args:
        matrix: 4x4 homogeneous matrix (column vectors), LPS mm, mapping a point of the fixed image to the
            corresponding point of the moving image.
        path: output ``.json`` file (written atomically; its folder is created if needed).
        fixed, moving: the fixed and moving image files (recorded as given).
        extra: more JSON-serialisable top-level items.
    """
    m = _check_matrix(matrix)
    inverse = np.linalg.inv(m)
    inverse[3] = [0.0, 0.0, 0.0, 1.0]
    record: dict[str, Any] = {
        "convention": TRANSFORM_CONVENTION,
        "coordinate_system": "LPS",
        "units": "mm",
        "fixed": None if fixed is None else os.fspath(fixed),
        "moving": None if moving is None else os.fspath(moving),
        "matrix_fixed_to_moving_lps": m.tolist(),
        "matrix_moving_to_fixed_lps": inverse.tolist(),
        "matrix_fixed_to_moving_ras": _lps_to_ras(m).tolist(),
        "matrix_moving_to_fixed_ras": _lps_to_ras(inverse).tolist(),
    }
    for key, value in dict(extra or {}).items():
        if key in record:
            raise SAMv2InputError("extra", f"key {key!r} is reserved for the transform record")
        record[str(key)] = value
    text = json.dumps(record, indent=2, default=_json_default, allow_nan=False) + "\n"  # fails before any write
    _atomic_write(Path(path), lambda f: f.write(text))


def read_transform_json(path: _PathLike) -> np.ndarray:
    """Read the 4x4 world-LPS matrix, **fixed -> moving**, of a file written by :func:`write_transform_json`.

    Uses ``matrix_fixed_to_moving_lps``; a record holding only ``matrix_fixed_to_moving_ras`` is converted.

    Raises:
        SAMv2InputError: missing file, invalid JSON, no or malformed matrix.
    """
    path = Path(path)
    if not path.is_file():
        raise SAMv2InputError(path, "transform file not found")
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SAMv2InputError(path, f"is not a readable JSON file ({exc})") from None
    if not isinstance(record, dict):
        raise SAMv2InputError(path, "must hold a JSON object")
    if "matrix_fixed_to_moving_lps" in record:
        return _check_matrix(record["matrix_fixed_to_moving_lps"], f"{os.fspath(path)}: matrix_fixed_to_moving_lps")
    if "matrix_fixed_to_moving_ras" in record:
        ras = _check_matrix(record["matrix_fixed_to_moving_ras"], f"{os.fspath(path)}: matrix_fixed_to_moving_ras")
        return _lps_to_ras(ras)  # the flip is its own inverse
    raise SAMv2InputError(path, "has no 'matrix_fixed_to_moving_lps' entry")

