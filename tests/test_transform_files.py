"""Tests of the transform files: ITK .tfm/.h5/.mat via ITK's own IO, and the JSON record (fixed -> moving, LPS)."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from samv2_components.errors import SAMv2InputError
from samv2_components.geometry import convert_points
from samv2_components.io import read_itk_transform, read_transform_json, write_itk_transform, write_transform_json

sitk = pytest.importorskip("SimpleITK")
pytest.importorskip("itk")


def rotation(axis, angle_deg: float) -> np.ndarray:
    a = np.asarray(axis, dtype=np.float64)
    a = a / np.linalg.norm(a)
    k = np.array([[0.0, -a[2], a[1]], [a[2], 0.0, -a[0]], [-a[1], a[0], 0.0]])
    t = math.radians(angle_deg)
    return np.eye(3) + math.sin(t) * k + (1.0 - math.cos(t)) * k @ k


def homogeneous(linear, translation) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = linear
    m[:3, 3] = translation
    return m


RIGID = homogeneous(rotation([0.3, -1.0, 0.6], 17.0), [14.5, -6.25, 31.0])
_SHEAR = np.array([[1.1, 0.05, 0.0], [0.0, 0.92, 0.1], [0.02, 0.0, 1.05]])
AFFINE = homogeneous(rotation([1.0, 1.0, 0.0], 9.0) @ _SHEAR, [-3.0, 8.0, 2.5])


def apply(m: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ m[:3, :3].T + m[:3, 3]


def random_points(n: int = 50, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-300.0, 300.0, size=(n, 3))


@pytest.mark.parametrize("suffix", [".tfm", ".h5", ".mat"])
@pytest.mark.parametrize("kind,matrix", [("rigid", RIGID), ("affine", AFFINE)])
def test_itk_file_loads_in_simpleitk_and_matches_json(tmp_path, suffix, kind, matrix):
    path = tmp_path / f"xform{suffix}"
    write_itk_transform(matrix, path, transform_type=kind)
    write_transform_json(matrix, tmp_path / "xform.json", fixed="fixed.nii.gz", moving="moving.nii.gz")
    json_matrix = read_transform_json(tmp_path / "xform.json")
    transform = sitk.ReadTransform(str(path))
    expected = "VersorRigid3DTransform" if kind == "rigid" else "AffineTransform"
    assert transform.Downcast().GetName() == expected
    points = random_points()
    by_sitk = np.array([transform.TransformPoint(p.tolist()) for p in points])
    np.testing.assert_allclose(by_sitk, apply(json_matrix, points), atol=1e-6, rtol=0)
    # Round trip through ITK's reader.
    np.testing.assert_allclose(read_itk_transform(path), matrix, atol=1e-12, rtol=0)
    assert sorted(os.listdir(tmp_path)) == sorted([path.name, "xform.json"])  # no temporary file left


def test_read_itk_transform_folds_centre_into_translation(tmp_path):
    # A transform with a non-zero centre (as SimpleITK registration writes them) and a composite of two.
    euler = sitk.Euler3DTransform((10.0, -20.0, 35.0), 0.1, -0.2, 0.3, (1.0, 2.0, 3.0))
    affine = sitk.AffineTransform(3)
    affine.SetMatrix([1.1, 0.1, 0.0, 0.0, 0.9, 0.2, 0.0, 0.0, 1.0])
    affine.SetCenter((5.0, -5.0, 50.0))
    affine.SetTranslation((3.0, 0.0, 1.0))
    points = random_points(20, seed=3)
    for name, transform in [("euler.tfm", euler), ("composite.h5", sitk.CompositeTransform([euler, affine]))]:
        sitk.WriteTransform(transform, str(tmp_path / name))
        m = read_itk_transform(tmp_path / name)
        expected = np.array([transform.TransformPoint(p.tolist()) for p in points])
        np.testing.assert_allclose(apply(m, points), expected, atol=1e-9, rtol=0)


def test_json_record(tmp_path):
    path = tmp_path / "sub" / "rigid.json"
    confidence = {"n_inliers": np.int64(42), "rms": np.float32(1.5)}
    write_transform_json(RIGID, path, fixed="ct.nii.gz", moving="mr.nii.gz", extra={"confidence": confidence})
    record = json.loads(path.read_text())
    assert record["coordinate_system"] == "LPS" and record["units"] == "mm"
    assert record["fixed"] == "ct.nii.gz" and record["moving"] == "mr.nii.gz"
    assert "fixed image" in record["convention"] and "moving image" in record["convention"]
    assert record["confidence"] == {"n_inliers": 42, "rms": 1.5}
    f2m, m2f = np.array(record["matrix_fixed_to_moving_lps"]), np.array(record["matrix_moving_to_fixed_lps"])
    np.testing.assert_allclose(f2m, RIGID, atol=0)
    np.testing.assert_allclose(f2m @ m2f, np.eye(4), atol=1e-12)
    np.testing.assert_allclose(m2f @ f2m, np.eye(4), atol=1e-12)
    np.testing.assert_array_equal(read_transform_json(path), RIGID)
    # RAS matrices act on RAS points as the LPS matrices act on LPS points.
    points = random_points(20, seed=5)
    for key in ("fixed_to_moving", "moving_to_fixed"):
        lps, ras = np.array(record[f"matrix_{key}_lps"]), np.array(record[f"matrix_{key}_ras"])
        ras_points = convert_points(points, "LPS", "RAS")
        np.testing.assert_allclose(apply(ras, ras_points), convert_points(apply(lps, points), "LPS", "RAS"), atol=1e-9)
    with pytest.raises(SAMv2InputError):
        write_transform_json(RIGID, path, extra={"units": "cm"})  # may not shadow the record's keys
    np.testing.assert_array_equal(read_transform_json(path), RIGID)  # previous file untouched


def _ellipsoid(points: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """An anisotropic, obliquely oriented Gaussian blob (so that rotations and flips are visible), world mm."""
    axes = rotation([1.0, 0.5, -0.3], 35.0)
    d = (points - centre) @ axes.T / np.array([14.0, 8.0, 5.0])
    return np.exp(-0.5 * np.sum(d**2, axis=1))


def _image(size, spacing, origin, direction, function) -> sitk.Image:
    """An image whose voxel at world point ``p`` (LPS) holds ``function(p)``."""
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in size], indexing="ij"), axis=-1).reshape(-1, 3)
    world = idx * np.asarray(spacing) @ np.asarray(direction).T + np.asarray(origin)
    values = function(world).reshape(size).transpose(2, 1, 0)  # SimpleITK arrays are (z, y, x)
    image = sitk.GetImageFromArray(values.astype(np.float32))
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(o) for o in origin])
    image.SetDirection(np.asarray(direction, dtype=np.float64).ravel().tolist())
    return image


def test_resampling_with_written_transform_realigns_moving_image(tmp_path):
    """Pins the direction: moving = fixed moved by a known rigid motion; the file must bring it back."""
    fixed_size, fixed_spacing = (28, 30, 24), (2.0, 2.5, 3.0)
    fixed_direction = rotation([0.2, 0.1, 1.0], 25.0)  # oblique grid: everything happens in world LPS
    fixed_origin = np.array([-40.0, -30.0, 20.0])
    fixed_centre = fixed_origin + fixed_direction @ (np.asarray(fixed_size) - 1) / 2 * fixed_spacing
    blob_centre = fixed_centre + [3.0, -2.0, 4.0]
    fixed = _image(fixed_size, fixed_spacing, fixed_origin, fixed_direction, lambda p: _ellipsoid(p, blob_centre))

    fixed_to_moving = homogeneous(rotation([1.0, -0.5, 0.8], 15.0), [6.0, -4.0, 9.0])
    moving_to_fixed = np.linalg.inv(fixed_to_moving)
    moving_size, moving_spacing = (48, 48, 48), (2.5, 2.5, 2.5)
    moving_origin = apply(fixed_to_moving, fixed_centre[None])[0] - (np.asarray(moving_size) - 1) / 2 * 2.5
    # The moving scan shows the same anatomy: the anatomy at fixed point x sits at moving point fixed_to_moving x.
    def moving_content(p):
        return _ellipsoid(apply(moving_to_fixed, p), blob_centre)

    moving = _image(moving_size, moving_spacing, moving_origin, np.eye(3), moving_content)

    write_itk_transform(fixed_to_moving, tmp_path / "rigid.tfm", transform_type="rigid")
    write_transform_json(fixed_to_moving, tmp_path / "rigid.json", fixed="fixed.nii.gz", moving="moving.nii.gz")
    target = sitk.GetArrayFromImage(fixed)

    def error(transform) -> float:
        out = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, transform, sitk.sitkLinear, 0.0))
        return float(np.abs(out - target).max())

    from_file = sitk.ReadTransform(str(tmp_path / "rigid.tfm"))
    assert error(from_file) < 0.06  # linear interpolation of a 5 mm-wide blob on a 2.5 mm grid
    read_back = sitk.AffineTransform(3)
    m = read_itk_transform(tmp_path / "rigid.tfm")
    read_back.SetMatrix(m[:3, :3].ravel().tolist())
    read_back.SetTranslation(m[:3, 3].tolist())
    assert error(read_back) < 0.06
    # The opposite direction must fail, or the test would not pin the convention.
    inverse = np.array(json.loads((tmp_path / "rigid.json").read_text())["matrix_moving_to_fixed_lps"])
    wrong = sitk.AffineTransform(3)
    wrong.SetMatrix(inverse[:3, :3].ravel().tolist())
    wrong.SetTranslation(inverse[:3, 3].tolist())
    assert error(wrong) > 0.5


@pytest.mark.parametrize(
    "matrix,kind",
    [
        (homogeneous(np.diag([1.0, 1.0, 1.2]), [0, 0, 0]), "rigid"),  # scaling is not a rotation
        (homogeneous(np.diag([-1.0, 1.0, 1.0]), [0, 0, 0]), "rigid"),  # reflection
        (homogeneous(np.diag([1.0, 1.0, 0.0]), [0, 0, 0]), "affine"),  # singular
        (np.eye(3), "rigid"),  # wrong shape
        (np.vstack([np.eye(4)[:3], [0.0, 0.0, 1.0, 1.0]]), "affine"),  # not homogeneous
        (np.eye(4), "similarity"),  # unknown type
    ],
)
def test_bad_inputs_raise_and_write_nothing(tmp_path, matrix, kind):
    with pytest.raises(ValueError):
        write_itk_transform(matrix, tmp_path / "t.tfm", transform_type=kind)
    assert os.listdir(tmp_path) == []


def test_bad_files_raise(tmp_path):
    with pytest.raises(SAMv2InputError, match="not found"):
        read_itk_transform(tmp_path / "missing.tfm")
    with pytest.raises(SAMv2InputError, match="not found"):
        read_transform_json(tmp_path / "missing.json")
    with pytest.raises(SAMv2InputError):
        write_itk_transform(np.eye(4), tmp_path / "t.nii.gz")  # not a transform file type
    (tmp_path / "junk.tfm").write_text("not a transform\n")
    with pytest.raises(SAMv2InputError):
        read_itk_transform(tmp_path / "junk.tfm")
    (tmp_path / "bad.json").write_text(json.dumps({"matrix_fixed_to_moving_lps": [[1, 0], [0, 1]]}))
    with pytest.raises(SAMv2InputError):
        read_transform_json(tmp_path / "bad.json")
    # A slightly non-orthonormal rotation (rounding) is accepted and written as the nearest rotation.
    near = RIGID.copy()
    near[:3, :3] += 1e-9
    write_itk_transform(near, tmp_path / "near.tfm")
    np.testing.assert_allclose(read_itk_transform(tmp_path / "near.tfm"), RIGID, atol=1e-8)


def test_non_linear_and_2d_transforms_are_refused(tmp_path):
    bspline = sitk.BSplineTransform(3, 3)
    sitk.WriteTransform(bspline, str(tmp_path / "bspline.tfm"))
    with pytest.raises(SAMv2InputError, match=r"bspline.tfm: holds a non-linear BSplineTransform"):
        read_itk_transform(tmp_path / "bspline.tfm")
    sitk.WriteTransform(sitk.Euler2DTransform(), str(tmp_path / "plane.tfm"))
    with pytest.raises(SAMv2InputError, match=r"plane.tfm: is not a 3D transform"):
        read_itk_transform(tmp_path / "plane.tfm")


def test_transform_files_load_no_itk_module(tmp_path):
    """Written and read through SimpleITK: the Python ``itk`` package would load about 900 wrapped modules (0.9 GB
    held by the process, the largest part of ``samv2 register``'s peak) to write one rigid transform."""
    import subprocess
    import sys

    code = ("import sys, numpy as np\n"
            "from samv2_components.io import read_itk_transform, write_itk_transform\n"
            f"write_itk_transform(np.eye(4), {str(tmp_path / 't.tfm')!r})\n"
            f"read_itk_transform({str(tmp_path / 't.tfm')!r})\n"
            "print(len([m for m in sys.modules if m.startswith('itk.') and m.endswith('Python')]))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "0"


def test_writes_are_atomic(tmp_path, monkeypatch):
    write_itk_transform(RIGID, tmp_path / "t.tfm")
    write_transform_json(RIGID, tmp_path / "t.json")
    before = {name: (tmp_path / name).read_bytes() for name in ("t.tfm", "t.json")}

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError):
        write_itk_transform(AFFINE, tmp_path / "t.tfm", transform_type="affine")
    with pytest.raises(OSError):
        write_transform_json(AFFINE, tmp_path / "t.json")
    assert sorted(os.listdir(tmp_path)) == ["t.json", "t.tfm"]  # no temporary file left behind
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
