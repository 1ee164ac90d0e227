"""Tests of scan reading (:mod:`samv2_components.io.image`) against images whose geometry the test wrote itself.

Every format goes through one ITK read path; these tests write one volume with a known oblique, anisotropic,
flipped geometry in several formats and check that the array, the RAS affine and the world position of voxels
(against ITK's own ``TransformIndexToPhysicalPoint``, which is LPS) all agree with what was written.
"""

from __future__ import annotations

import os
from pathlib import Path

import itk
import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import Compose
from PIL import Image

from samv2_components.errors import SAMv2InputError, find_samv2_error
from samv2_components.geometry import voxel_to_world
from samv2_components.io.image import LoadScand, load_scan
from samv2_components.sample_data import sample_path

from helpers import nifti_file, nifti_bytes, scans_with_bad_headers, unreadable_scans  # noqa: E402

FLIP_XY = np.diag([-1.0, -1.0, 1.0, 1.0])

SIZE = (9, 7, 5)  # ITK (x, y, z) size; numpy arrays from ITK are (z, y, x)
SPACING = (0.7, 1.3, 2.9)
ORIGIN = (-37.25, 81.5, 12.125)


def _rotation(axis, angle: float) -> np.ndarray:
    axis = np.asarray(axis, dtype=float)
    axis = axis / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


# oblique and left-handed (an axis flip), as a scanner-oblique acquisition stored with a flipped slice axis
DIRECTION = _rotation([1.0, 2.0, 3.0], 0.4) @ np.diag([1.0, 1.0, -1.0])


def _lps_affine(direction, spacing, origin) -> np.ndarray:
    aff = np.eye(4)
    aff[:3, :3] = np.asarray(direction) @ np.diag(spacing)
    aff[:3, 3] = origin
    return aff


def _itk_image(array_zyx: np.ndarray, spacing=SPACING, origin=ORIGIN, direction=DIRECTION):
    img = itk.image_from_array(np.ascontiguousarray(array_zyx))
    img.SetSpacing([float(s) for s in spacing])
    img.SetOrigin([float(o) for o in origin])
    img.SetDirection(itk.matrix_from_array(np.ascontiguousarray(direction, dtype=np.float64)))
    return img


def _continuous_index(idx) -> itk.ContinuousIndex:
    ci = itk.ContinuousIndex[itk.D, 3]()
    for axis, value in enumerate(idx):
        ci.SetElement(axis, float(value))
    return ci


@pytest.fixture(scope="module")
def volume_zyx() -> np.ndarray:
    """Distinct int16 values (so any axis permutation or flip changes the array), ITK order (z, y, x)."""
    rng = np.random.default_rng(3)
    return rng.permutation(np.arange(-600, -600 + np.prod(SIZE))).reshape(SIZE[::-1]).astype(np.int16)


@pytest.fixture(scope="module")
def written(tmp_path_factory, volume_zyx) -> dict[str, str]:
    """The same volume written as NIfTI (ITK and nibabel), NRRD and MHA."""
    d = tmp_path_factory.mktemp("formats")
    img = _itk_image(volume_zyx)
    paths = {ext: str(d / f"vol.{ext}") for ext in ("nii.gz", "nrrd", "mha")}
    for p in paths.values():
        itk.imwrite(img, p)
    # nibabel writes its own RAS affine: an independent writer of the same known transform
    ras = FLIP_XY @ _lps_affine(DIRECTION, SPACING, ORIGIN)
    paths["nibabel.nii.gz"] = str(d / "vol_nibabel.nii.gz")
    nib.save(nib.Nifti1Image(volume_zyx.transpose(2, 1, 0), ras), paths["nibabel.nii.gz"])
    return paths


@pytest.mark.parametrize("fmt", ["nii.gz", "nrrd", "mha", "nibabel.nii.gz"])
def test_formats_share_array_and_geometry(written, volume_zyx, fmt):
    path = written[fmt]
    image = load_scan(path)
    assert image.meta["space"] == "RAS"
    assert tuple(image.shape) == (1, *SIZE)
    assert image.dtype == torch.float32
    # MONAI array axes are ITK index axes (i, j, k) = (x, y, z)
    np.testing.assert_array_equal(image[0].numpy(), volume_zyx.transpose(2, 1, 0).astype(np.float32))

    expected_ras = FLIP_XY @ _lps_affine(DIRECTION, SPACING, ORIGIN)
    np.testing.assert_allclose(image.affine.numpy(), expected_ras, atol=1e-4)

    # world position of voxels (integer and fractional) == ITK's physical point (LPS) of the same file
    ref = itk.imread(path)
    rng = np.random.default_rng(0)
    corners = np.array([[i, j, k] for i in (0, SIZE[0] - 1) for j in (0, SIZE[1] - 1) for k in (0, SIZE[2] - 1)])
    fractional = rng.uniform(-1, np.array(SIZE), size=(6, 3))
    for idx in np.concatenate([corners, fractional]):
        itk_point = np.array(ref.TransformContinuousIndexToPhysicalPoint(_continuous_index(idx)))
        ours = voxel_to_world(idx, image.affine)[0]
        np.testing.assert_allclose(ours, itk_point, atol=1e-3)
        # and equals the known transform the test wrote
        np.testing.assert_allclose(ours, np.asarray(ORIGIN) + DIRECTION @ (np.asarray(SPACING) * idx), atol=1e-3)
    for idx in corners:
        itk_point = np.array(ref.TransformIndexToPhysicalPoint([int(v) for v in idx]))
        np.testing.assert_allclose(voxel_to_world(idx, image.affine)[0], itk_point, atol=1e-3)


def test_formats_agree_with_each_other(written):
    images = {fmt: load_scan(p) for fmt, p in written.items()}
    first = images.pop("mha")
    for fmt, image in images.items():
        assert torch.equal(image.as_tensor(), first.as_tensor()), fmt
        np.testing.assert_allclose(image.affine.numpy(), first.affine.numpy(), atol=1e-4, err_msg=fmt)


def _nifti_variants(tmp_path, volume_zyx) -> dict[str, str]:
    """One volume as NIfTI files whose headers give the geometry in different ways."""
    ras = FLIP_XY @ _lps_affine(DIRECTION, SPACING, ORIGIN)
    moved = ras.copy()
    moved[:3, 3] += (5.0, -3.0, 2.0)
    data = volume_zyx.transpose(2, 1, 0)
    paths = {}
    cases = (("sform_only", ras, None), ("qform_only", None, ras), ("disagree", ras, moved),
             ("sform_and_unit_pixdim", ras, None))  # MONAI's nibabel reader would swap in the qform here
    for name, sform, qform in cases:
        img = nib.Nifti1Image(data, None)
        img.set_sform(sform, code=0 if sform is None else 1)
        img.set_qform(qform, code=0 if qform is None else 1)
        if name != "sform_and_unit_pixdim":
            img.header.set_zooms(SPACING)
        paths[name] = str(tmp_path / f"{name}.nii.gz")
        nib.save(img, paths[name])
    scaled = nib.Nifti1Image(data, ras)
    scaled.header.set_slope_inter(0.5, -3.0)  # stored integers, floats on reading
    paths["scaled"] = str(tmp_path / "scaled.nii")
    nib.save(scaled, paths["scaled"])
    return paths


def test_nifti_read_by_nibabel_equals_itk(tmp_path, volume_zyx):
    """NIfTI files with one clear geometry are read by nibabel (no ITK modules: 0.26 GB of a process) to ITK's
    array, type and affine; where sform and qform disagree, ITK's choice is kept by reading with ITK."""
    from samv2_components.io import image as image_io

    paths = _nifti_variants(tmp_path, volume_zyx)
    for name, path in paths.items():
        assert image_io._nifti_geometry_is_unambiguous(path) == (name in ("sform_only", "qform_only", "scaled")), name
        ours, itk_read = load_scan(path, float32=False), image_io._itk_loader()(path)
        assert ours.dtype == itk_read.dtype, name
        assert torch.equal(ours.as_tensor(), itk_read.as_tensor()), name
        np.testing.assert_allclose(ours.affine.numpy(), itk_read.affine.numpy(), atol=1e-4, err_msg=name)
    np.testing.assert_allclose(load_scan(paths["scaled"])[0].numpy(), volume_zyx.transpose(2, 1, 0) * 0.5 - 3.0)


def test_loading_a_nifti_scan_does_not_load_itk_wrappers():
    """ITK's compiled Python wrappers (0.26 GB of memory once ``itk.imread`` runs) stay unloaded for a NIfTI scan
    (MONAI's loader imports the ``itk`` package itself, which is lazy and small)."""
    import subprocess
    import sys

    code = ("import sys; from samv2_components.io.image import load_scan; from samv2_components.sample_data import "
            "sample_path; load_scan(sample_path('ct_abdomen')); print(sorted(m for m in sys.modules "
            "if m.startswith('itk.') and m.endswith('Python')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------------------------------------------
# DICOM series
# --------------------------------------------------------------------------------------------------------------

DCM_SIZE = (16, 16, 4)
DCM_SPACING = (0.75, 0.6, 2.5)
DCM_ORIGIN = (-120.5, 60.25, 30.0)
DCM_DIRECTION = _rotation([0.2, 0.3, 1.0], np.deg2rad(25.0))  # right-handed: slice normal = row x column
DCM_INTERCEPT, DCM_SLOPE = -1024, 2


def _write_ct_series(folder: Path, hu_zyx: np.ndarray) -> None:
    """One single-frame CT file per slice, with per-slice position, orientation and rescale slope/intercept.

    Given HU values and RescaleIntercept/Slope tags, GDCM stores ``(HU - intercept) / slope`` as pixel data.
    """
    folder.mkdir()
    study = "1.2.826.0.1.3680043.2.1125.7"
    for k in range(hu_zyx.shape[0]):
        position = np.asarray(DCM_ORIGIN) + k * DCM_SPACING[2] * DCM_DIRECTION[:, 2]
        sl = _itk_image(hu_zyx[k : k + 1], spacing=DCM_SPACING, origin=position, direction=DCM_DIRECTION)
        meta = sl.GetMetaDataDictionary()
        meta["0008|0060"] = "CT"
        meta["0020|000d"] = study
        meta["0020|000e"] = study + ".1"
        meta["0020|0052"] = study + ".2"
        meta["0008|0018"] = f"{study}.3.{k + 1}"
        meta["0020|0013"] = str(k + 1)
        meta["0028|1052"] = str(DCM_INTERCEPT)
        meta["0028|1053"] = str(DCM_SLOPE)
        io = itk.GDCMImageIO.New()
        io.KeepOriginalUIDOn()
        writer = itk.ImageFileWriter[type(sl)].New(Input=sl, FileName=str(folder / f"IM{k:04d}.dcm"), ImageIO=io)
        writer.Update()


def test_dicom_series_folder(tmp_path):
    rng = np.random.default_rng(1)
    stored = rng.integers(0, 1600, size=DCM_SIZE[::-1]).astype(np.int16)  # what the file should hold
    hu = (stored.astype(np.int32) * DCM_SLOPE + DCM_INTERCEPT).astype(np.int16)  # HU in [-1024, 2174]
    assert hu.min() < -900  # negative HU cannot be stored unsigned without the rescale
    folder = tmp_path / "series"
    _write_ct_series(folder, hu)

    # the files really hold rescaled values (pixel data is the last element: rows x columns uint16)
    n_bytes = DCM_SIZE[0] * DCM_SIZE[1] * 2
    for k, name in enumerate(sorted(os.listdir(folder))):
        raw = np.frombuffer((folder / name).read_bytes()[-n_bytes:], dtype="<u2").reshape(DCM_SIZE[1], DCM_SIZE[0])
        np.testing.assert_array_equal(raw, stored[k])

    image = load_scan(folder)
    assert tuple(image.shape) == (1, *DCM_SIZE)
    assert image.meta["space"] == "RAS"
    # HU = slope * stored + intercept, with the slices in position order
    np.testing.assert_array_equal(image[0].numpy(), hu.transpose(2, 1, 0).astype(np.float32))
    expected = FLIP_XY @ _lps_affine(DCM_DIRECTION, DCM_SPACING, DCM_ORIGIN)
    np.testing.assert_allclose(image.affine.numpy(), expected, atol=1e-3)
    np.testing.assert_allclose(voxel_to_world([0, 0, 0], image.affine)[0], DCM_ORIGIN, atol=1e-3)
    np.testing.assert_allclose(np.linalg.norm(image.affine.numpy()[:3, :3], axis=0), DCM_SPACING, atol=1e-4)


def test_real_sample_ct():
    path = sample_path("ct_abdomen")
    image = load_scan(path)
    assert tuple(image.shape) == (1, 122, 101, 30)
    assert image.meta["space"] == "RAS"
    ref = nib.load(path)  # nibabel's affine is RAS too
    np.testing.assert_allclose(image.affine.numpy(), ref.affine, atol=1e-4)
    np.testing.assert_array_equal(image[0].numpy(), np.asanyarray(ref.dataobj).astype(np.float32))
    assert float(image.min()) < -1000  # air, in HU


# --------------------------------------------------------------------------------------------------------------
# bad inputs
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory) -> list[tuple[str, str]]:
    return unreadable_scans(tmp_path_factory.mktemp("bad"))


def test_load_scan_rejects_bad_inputs(bad_inputs):
    for path, phrase in bad_inputs:
        with pytest.raises(SAMv2InputError) as info:
            load_scan(path)
        message = str(info.value)
        assert path in message, message
        assert phrase in message, message
        assert info.value.source == path
        assert "\n" not in message  # one line, ITK's multi-line errors included


def test_load_scand_raises_the_same_errors(bad_inputs):
    for path, phrase in bad_inputs:
        with pytest.raises(SAMv2InputError) as info:
            LoadScand(keys="image")({"image": path})
        assert path in str(info.value) and phrase in str(info.value)
        # inside a Compose MONAI wraps it; find_samv2_error digs it out
        with pytest.raises(Exception) as wrapped:
            Compose([LoadScand(keys="image")])({"image": path})
        found = find_samv2_error(wrapped.value)
        assert isinstance(found, SAMv2InputError), repr(wrapped.value)
        assert path in str(found) and phrase in str(found)


def test_check_intensities_false_lets_label_maps_through(tmp_path):
    labels = np.zeros((8, 9, 10), np.uint8)  # a label map may be all background
    path = nifti_file(tmp_path / "labels.nii.gz", labels)
    with pytest.raises(SAMv2InputError, match="constant"):
        load_scan(path)
    image = load_scan(path, check_intensities=False)
    assert tuple(image.shape) == (1, 8, 9, 10)
    assert float(image.abs().max()) == 0.0
    out = LoadScand(keys="label", check_intensities=False)({"label": path, "other": 1})
    assert tuple(out["label"].shape) == (1, 8, 9, 10) and out["other"] == 1
    # shape problems are still reported with intensity checks off
    flat = nifti_file(tmp_path / "flat.nii.gz", np.zeros((8, 9, 1), np.uint8))
    with pytest.raises(SAMv2InputError, match="2D"):
        load_scan(flat, check_intensities=False)


def test_files_itk_would_read_silently_wrong_are_refused(tmp_path):
    """ITK decodes a truncated gzip stream as far as it goes, replaces a zero voxel size by 1 and drops a singular
    sform: each would be embedded with made-up voxels or geometry."""
    import gzip

    cases = {os.path.basename(path): phrase for path, phrase in scans_with_bad_headers(tmp_path)}
    for name, message in cases.items():
        with pytest.raises(SAMv2InputError, match=message) as info:
            load_scan(tmp_path / name)
        assert str(tmp_path / name) in str(info.value) and "\n" not in str(info.value)
    rng = np.random.default_rng(5)
    (tmp_path / "good.nii.gz").write_bytes(gzip.compress(nifti_bytes(rng.normal(size=(20, 20, 20)))))
    assert tuple(load_scan(tmp_path / "good.nii.gz").shape) == (1, 20, 20, 20)
