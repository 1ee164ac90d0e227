"""Tests of the SimpleITK intensity-registration baselines against known transforms of the real sample CT.

The moving images are made from the sample CT with a transform ``G`` we choose (fixed point -> moving point),
by ``Resample(ct, ct, G^-1)``: then ``moving(G(p)) = ct(p)``, so a correct registration has ``map_points(p) = G(p)``.
"""

from __future__ import annotations

import locale
import sys

import numpy as np
import pytest

sitk = pytest.importorskip("SimpleITK")

from samv2_components.errors import SAMv2InputError  # noqa: E402
from samv2_components.registration import read_sitk_image, register_intensity  # noqa: E402
from samv2_components.registration import intensity_baselines  # noqa: E402
from samv2_components.sample_data import sample_path  # noqa: E402

FAST = dict(shrink_factors=(4, 2), smoothing_sigmas_mm=(4.0, 2.0), iterations=100)


@pytest.fixture(scope="module", autouse=True)
def two_threads():
    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(2)
    yield
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before)


@pytest.fixture(scope="module")
def ct():
    return read_sitk_image(sample_path("ct_abdomen"))


@pytest.fixture(scope="module")
def centre(ct) -> np.ndarray:
    return np.array(ct.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in ct.GetSize()]))


@pytest.fixture(scope="module")
def body_points(ct, centre) -> np.ndarray:
    """~300 LPS points inside the body (> -200 HU), away from the first/last slices (cropped by the motion)."""
    array = sitk.GetArrayViewFromImage(ct)
    idx = np.argwhere(array > -200)[:, ::-1].astype(float)  # (x, y, z) indices
    pts = np.array([ct.TransformContinuousIndexToPhysicalPoint(i) for i in idx[::50].tolist()])
    pts = pts[np.abs(pts[:, 2] - centre[2]) < 30]
    assert len(pts) > 200
    return pts


def _rigid(centre) -> "sitk.Euler3DTransform":
    """5 degrees about the S (z) axis through the grid centre, then (8, -6, 3) mm: fixed -> moving."""
    return sitk.Euler3DTransform(centre.tolist(), 0.0, 0.0, np.deg2rad(5.0), (8.0, -6.0, 3.0))


def _warp(ct, truth):
    """Moving image with moving(truth(p)) = ct(p), on the CT's own grid (air outside)."""
    air = float(sitk.GetArrayViewFromImage(ct).min())
    return sitk.Resample(ct, ct, truth.GetInverse(), sitk.sitkLinear, air)


def _apply(transform, points) -> np.ndarray:
    return np.array([transform.TransformPoint(p) for p in np.asarray(points).tolist()])


def test_rigid_recovers_known_transform(ct, centre, body_points):
    truth = _rigid(centre)
    result = register_intensity(ct, _warp(ct, truth), transform="rigid", **FAST)
    expected = _apply(truth, body_points)
    err = np.linalg.norm(result.map_points(body_points) - expected, axis=1)
    assert err.max() < 2.0, f"mean {err.mean():.2f} max {err.max():.2f} mm"
    # direction: the inverse mapping is far off (the motion is ~10 mm), so a swapped convention would fail
    inverse_err = np.linalg.norm(result.map_points(body_points) - _apply(truth.GetInverse(), body_points), axis=1)
    assert inverse_err.mean() > 10.0
    assert result.transform.GetName() == "Euler3DTransform"
    assert np.rad2deg(result.transform.GetAngleZ()) == pytest.approx(5.0, abs=0.5)
    assert result.final_metric < 0 and result.wall_time_s > 0
    assert result.map_points(body_points[0]).shape == (1, 3)


def test_affine_recovers_known_transform(ct, centre, body_points):
    rigid = _rigid(centre)
    truth = sitk.AffineTransform(3)
    truth.SetCenter(centre.tolist())
    truth.SetMatrix((1.05 * np.array(rigid.GetMatrix())).tolist())
    truth.SetTranslation(rigid.GetTranslation())
    result = register_intensity(ct, _warp(ct, truth), transform="affine", **FAST)
    err = np.linalg.norm(result.map_points(body_points) - _apply(truth, body_points), axis=1)
    assert err.max() < 2.0, f"mean {err.mean():.2f} max {err.max():.2f} mm"
    assert [s["transform"] for s in result.stages] == ["Euler3DTransform", "AffineTransform"]
    assert np.linalg.det(np.reshape(result.transform.GetMatrix(), (3, 3))) == pytest.approx(1.05**3, abs=0.03)


@pytest.mark.parametrize("initialization", ["moments", "geometry"])
def test_direction_convention_pure_shift(ct, body_points, initialization):
    """Same voxels, origin moved by d: the anatomy at fixed p is at moving p + d, so map_points must add d."""
    d = np.array([12.0, -9.0, 6.0])
    moving = sitk.Image(ct)
    moving.SetOrigin((np.array(ct.GetOrigin()) + d).tolist())
    mask = sitk.Cast(ct > -500, sitk.sitkUInt8)
    result = register_intensity(
        ct, moving, transform="rigid", initialization=initialization, fixed_mask=mask, **FAST
    )
    mapped = result.map_points(body_points)
    np.testing.assert_allclose(mapped - body_points, np.broadcast_to(d, mapped.shape), atol=1.0)
    # and the moving image really shows the fixed anatomy there (HU at mapped points = HU at fixed points)
    fixed_hu = [ct.EvaluateAtPhysicalPoint(p, sitk.sitkLinear) for p in body_points.tolist()]
    moving_hu = [moving.EvaluateAtPhysicalPoint(p, sitk.sitkLinear) for p in mapped.tolist()]
    assert np.median(np.abs(np.subtract(fixed_hu, moving_hu))) < 20.0
    # resampling the moving image with the transform brings it back onto the fixed one
    back = sitk.GetArrayFromImage(sitk.Resample(moving, ct, result.transform, sitk.sitkLinear, -1100.0))
    body = sitk.GetArrayViewFromImage(ct) > -200
    assert np.median(np.abs(back[body] - sitk.GetArrayViewFromImage(ct)[body])) < 20.0


def test_paths_dicom_series_and_metatensor_inputs(tmp_path, ct, request):
    """A DICOM series folder and a MetaTensor read to the same geometry as the NIfTI; path inputs register."""
    from samv2_components.io.image import load_scan

    folder = tmp_path / "dicom"
    folder.mkdir()
    saved_locale = locale.setlocale(locale.LC_ALL)  # GDCM's DICOM writer switches the process to the C locale
    request.addfinalizer(lambda: locale.setlocale(locale.LC_ALL, saved_locale))
    image = sitk.Cast(ct, sitk.sitkInt16)
    direction = image.GetDirection()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        slice_k = image[:, :, k]
        for tag, value in {
            "0008|0060": "CT",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
            "0020|000e": "1.2.826.0.1.3680043.2.1125.1.2",
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(map(str, image.TransformIndexToPhysicalPoint((0, 0, k)))),
            "0020|0037": "\\".join(map(str, (*direction[0:7:3], *direction[1:8:3]))),
            "0028|0030": f"{image.GetSpacing()[1]}\\{image.GetSpacing()[0]}",
            "0018|0050": str(image.GetSpacing()[2]),
        }.items():
            slice_k.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(slice_k)
    for other in (read_sitk_image(folder), read_sitk_image(load_scan(sample_path("ct_abdomen")))):
        assert other.GetPixelID() == sitk.sitkFloat32 and other.GetSize() == ct.GetSize()
        np.testing.assert_allclose(other.GetOrigin(), ct.GetOrigin(), atol=1e-3)
        np.testing.assert_allclose(other.GetSpacing(), ct.GetSpacing(), atol=1e-3)
        np.testing.assert_allclose(other.GetDirection(), ct.GetDirection(), atol=1e-6)
        np.testing.assert_array_equal(sitk.GetArrayViewFromImage(other), np.round(sitk.GetArrayViewFromImage(ct)))
    result = register_intensity(
        sample_path("ct_abdomen"), folder, transform="rigid", shrink_factors=(4,), smoothing_sigmas_mm=(4.0,),
        iterations=20,
    )
    assert np.abs(result.map_points([[0.0, 0.0, 130.0]]) - [[0.0, 0.0, 130.0]]).max() < 1.0


def test_bad_inputs(tmp_path, ct):
    missing = tmp_path / "nope.nii.gz"
    with pytest.raises(SAMv2InputError, match=r"nope\.nii\.gz: file not found"):
        register_intensity(missing, ct)
    with pytest.raises(SAMv2InputError, match=r"nope\.nii\.gz: file not found"):
        register_intensity(ct, missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SAMv2InputError, match="empty: folder holds no DICOM series"):
        register_intensity(ct, tmp_path / "empty")
    (tmp_path / "junk.nii.gz").write_bytes(b"not an image")
    with pytest.raises(SAMv2InputError, match=r"junk\.nii\.gz: cannot be read as an image"):
        register_intensity(tmp_path / "junk.nii.gz", ct)
    with pytest.raises(SAMv2InputError, match="unknown value 'bspline'"):
        register_intensity(ct, ct, transform="bspline")
    with pytest.raises(SAMv2InputError, match="one value per shrink factor"):
        register_intensity(ct, ct, shrink_factors=(4, 2), smoothing_sigmas_mm=(1.0,))


def test_same_seed_same_result(ct, centre):
    """Seeded sampling is reproducible (SimpleITK's seed 0 would mean 'wall clock': the wrapper avoids it)."""
    moving = _warp(ct, _rigid(centre))
    kw = dict(transform="rigid", shrink_factors=(4,), smoothing_sigmas_mm=(4.0,), iterations=30, seed=0)
    a, b = register_intensity(ct, moving, **kw), register_intensity(ct, moving, **kw)
    np.testing.assert_allclose(a.transform.GetParameters(), b.transform.GetParameters(), atol=1e-6)
    with pytest.raises(SAMv2InputError, match="seed"):
        register_intensity(ct, moving, seed=-1)


def test_missing_simpleitk_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "SimpleITK", None)
    from samv2_components.errors import MissingExtraError

    with pytest.raises(MissingExtraError, match=r'SimpleITK: not installed .*pip install -e "\.\[registration\]"'):
        intensity_baselines._sitk()


def test_affine_default_settings(ct, centre, body_points):
    """The defaults (3 levels, 200 iterations) on a larger motion with anisotropic scaling (~5 s)."""
    rigid = sitk.Euler3DTransform(centre.tolist(), np.deg2rad(3.0), 0.0, np.deg2rad(10.0), (15.0, -10.0, 5.0))
    truth = sitk.AffineTransform(3)
    truth.SetCenter(centre.tolist())
    truth.SetMatrix((np.diag([1.08, 0.95, 1.0]) @ np.reshape(rigid.GetMatrix(), (3, 3))).flatten().tolist())
    truth.SetTranslation(rigid.GetTranslation())
    result = register_intensity(ct, _warp(ct, truth))
    err = np.linalg.norm(result.map_points(body_points) - _apply(truth, body_points), axis=1)
    assert err.max() < 2.0, f"mean {err.mean():.2f} max {err.max():.2f} mm"


def test_read_sitk_image_of_a_float32_image_is_independent_of_it(ct):
    """A float32 SimpleITK image is returned without a second buffer (SimpleITK copies on write), yet writing to the
    result leaves the caller's image as it was; other types are converted."""
    out = read_sitk_image(ct)
    assert out is not ct and out.GetPixelID() == sitk.sitkFloat32
    before = ct[0, 0, 0]
    out[0, 0, 0] = before + 123.0
    assert ct[0, 0, 0] == before and out[0, 0, 0] == before + 123.0
    assert read_sitk_image(sitk.Cast(ct, sitk.sitkInt16)).GetPixelID() == sitk.sitkFloat32


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".mha"])
def test_read_sitk_crop_equals_the_crop_of_the_whole_scan(ct, tmp_path, suffix):
    """The large scan is read as its crop around the small scan's body (the registration workflow's write stage):
    region first from a file, the same voxels and geometry as cropping the whole scan read as float32, on an
    oblique int16 scan (so the cast and the index box are both exercised); None when the box misses the scan."""
    from samv2_components.geometry import crop_index_range
    from samv2_components.registration import read_sitk_crop

    scan = sitk.Cast(ct, sitk.sitkInt16)
    q, _ = np.linalg.qr(np.random.default_rng(3).normal(size=(3, 3)))
    scan.SetDirection((q * np.sign(np.linalg.det(q))).flatten().tolist())
    path = str(tmp_path / f"scan{suffix}")
    sitk.WriteImage(scan, path)
    whole = read_sitk_image(path)
    corners = np.array([whole.TransformContinuousIndexToPhysicalPoint(i) for i in ([20.5, 30.0, 4.0], [60.0, 75.5, 18.0])])
    affine = np.eye(4)
    affine[:3, :3] = np.reshape(whole.GetDirection(), (3, 3)) @ np.diag(whole.GetSpacing())
    affine[:3, 3] = whole.GetOrigin()
    start, stop = crop_index_range(corners, affine, whole.GetSize(), 6.0)
    assert np.all(start > 0) and np.all(stop < np.asarray(whole.GetSize()))  # a real crop on every axis
    expected = sitk.RegionOfInterest(whole, (stop - start).tolist(), start.tolist())
    for source in (path, whole):  # a file (region first) and an image in memory (cropped after)
        crop = read_sitk_crop(source, corners, 6.0)
        assert crop.GetPixelID() == sitk.sitkFloat32 and crop.GetSize() == expected.GetSize()
        np.testing.assert_allclose(crop.GetOrigin(), expected.GetOrigin(), atol=1e-6)
        assert crop.GetSpacing() == expected.GetSpacing()
        np.testing.assert_allclose(crop.GetDirection(), expected.GetDirection(), atol=1e-7)
        np.testing.assert_array_equal(sitk.GetArrayViewFromImage(crop), sitk.GetArrayViewFromImage(expected))
    assert read_sitk_crop(path, corners + 5000.0, 6.0) is None
    with pytest.raises(SAMv2InputError, match="file not found"):
        read_sitk_crop(str(tmp_path / "missing.nii"), corners, 6.0)
