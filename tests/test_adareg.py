"""AdaReg (``samv2_components.registration``) and the crosssam_registration bundle: body masks, grid points,
a known rigid transform recovered end to end through ``python -m monai.bundle run`` (transform files, crop,
resampled scan), and failures that are reported instead of written as transforms.

The known rigid transform (``test_known_rigid_transform_is_recovered``) is the default suite's one run of the
registration bundle (its smoke test); the failure runs here and the runs of ``test_orientation_search.py`` are
``slow`` (``pytest -m slow``).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

sitk = pytest.importorskip("SimpleITK")

from samv2_components.geometry import voxel_to_world  # noqa: E402
from samv2_components.io.transforms import read_itk_transform, read_transform_json  # noqa: E402
from samv2_components.registration import body_mask, grid_points_in_mask  # noqa: E402
from samv2_components.sample_data import sample_path  # noqa: E402

from helpers import rigid, run_registration_bundle, sample_ct_tre, sitk_affine  # noqa: E402


def test_body_mask_keeps_the_largest_component_and_grid_points_lie_in_it():
    image = torch.full((1, 20, 40, 40), -50.0)
    image[0, 4:16, 8:32, 8:32] = 100.0  # body
    image[0, 1, 1, 1] = 100.0  # a speck
    affine = torch.tensor([[0, 0, -2.0, 30], [0, -2.0, 0, 40], [2.0, 0, 0, -20], [0, 0, 0, 1]], dtype=torch.float64)
    mt = MetaTensor(image, affine=affine)
    mask = body_mask(mt)
    assert int(mask.sum()) == 12 * 24 * 24 and not mask[1, 1, 1]
    points = grid_points_in_mask(mt, mask, spacing_mm=8.0)
    assert len(points) > 0
    body_world = voxel_to_world(np.argwhere(mask.numpy()).astype(float), affine.numpy())
    lo, hi = body_world.min(0) - 1e-6, body_world.max(0) + 1e-6
    assert np.all((points >= lo) & (points <= hi))
    spacing = np.unique(np.round(np.diff(np.unique(points[:, 0])), 6))
    assert np.allclose(spacing, 8.0)  # 4 voxels of 2 mm along that axis


@pytest.fixture(scope="module")
def moved_ct(tmp_path_factory):
    """The sample CT resampled so that fixed point x sits at moving point T @ x (T known, fixed -> moving)."""
    fixed = sitk.ReadImage(sample_path("ct_abdomen"), sitk.sitkFloat32)
    truth = rigid(8.0, (0.2, 0.1, 1.0), (9.0, -14.0, 3.0))
    moving = sitk.Resample(fixed, fixed, sitk_affine(np.linalg.inv(truth)), sitk.sitkLinear, -1024.0)
    path = str(tmp_path_factory.mktemp("moved") / "ct_moved.nii.gz")
    sitk.WriteImage(moving, path)
    return path, truth


def test_known_rigid_transform_is_recovered(moved_ct, tmp_path):
    path, truth = moved_ct
    out = tmp_path / "out"
    result = run_registration_bundle("--fixed_path", sample_path("ct_abdomen"), "--moving_path", path, "--moving_modality", "ct",
                        "--output_dir", str(out), "--deformable", "false", "--write_qc", "false")
    assert result.returncode == 0, result.stderr[-3000:]
    folder = out / "ct_abdomen__ct_moved"
    files = set(os.listdir(folder))
    assert {"rigid.tfm", "rigid.json", "moving_rigid.nii.gz", "summary.json"} <= files
    assert files & {"fixed_cropped.nii.gz", "moving_cropped.nii.gz"}
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["confidence"]["success"] and summary["coordinate_system"] == "LPS"
    # the bundle default is the samv2 pipeline: every candidate is recorded with its refined scores and the winner
    confidence = summary["confidence"]
    assert confidence["pipeline"] == "samv2" and confidence["winner"] == confidence["candidates"]["winner"]
    names = [c["name"] for c in confidence["candidates"]["candidates"]]
    assert {"header", "adareg"} <= set(names) and all(c["mi"] is not None for c in confidence["candidates"]["candidates"])
    estimate = read_transform_json(folder / "rigid.json")
    points, tre = sample_ct_tre(estimate, truth)
    assert tre.mean() < 3.0, tre.mean()
    # the ITK transform file says the same thing, in the ITK convention SimpleITK applies
    tfm = sitk.ReadTransform(str(folder / "rigid.tfm"))
    mapped = np.array([tfm.TransformPoint(p.tolist()) for p in points[:20]])
    np.testing.assert_allclose(mapped, points[:20] @ estimate[:3, :3].T + estimate[:3, 3], atol=1e-4)
    np.testing.assert_allclose(read_itk_transform(folder / "rigid.tfm"), estimate, atol=1e-5)


@pytest.mark.slow
def test_a_failing_deformable_stage_keeps_the_rigid_result(moved_ct, tmp_path, monkeypatch, capsys):
    """elastix failing in the optional deformable stage: the rigid transform and its outputs are written, summary.json
    records the failure, one ERROR line says so, ``samv2 register`` exits 4 and prints the result folder."""
    import samv2_components.registration.deformable as deformable
    from samv2_components.cli import EXIT_RIGID_ONLY, main

    def failing(*args, **kwargs):
        raise RuntimeError("itk::ExceptionObject: Too many samples map outside moving image buffer")

    monkeypatch.setattr(deformable, "refine_deformable", failing)
    path, truth = moved_ct
    out = tmp_path / "out"
    status = main(["register", "--fixed", sample_path("ct_abdomen"), "--moving", path, "--moving_modality", "ct",
                   "--output_dir", str(out), "--write_qc", "false"])
    captured = capsys.readouterr()
    assert status == EXIT_RIGID_ONLY, captured.err[-2000:]
    folder = out / "ct_abdomen__ct_moved"
    assert captured.out.splitlines() == [str(folder)]
    (line,) = [x for x in captured.err.splitlines() if x.startswith("ERROR:")]
    assert "the deformable stage failed" in line and "Too many samples" in line and "summary.json" in line
    files = set(os.listdir(folder))
    assert {"rigid.tfm", "rigid.json", "moving_rigid.nii.gz", "summary.json"} <= files
    assert not files & {"moving_deformable.nii.gz", "deformable_field.nii.gz"}
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["confidence"]["success"] and summary["deformable"]["success"] is False
    assert "Too many samples" in summary["deformable"]["error"]
    _, tre = sample_ct_tre(read_transform_json(folder / "rigid.json"), truth)
    assert tre.mean() < 3.0


@pytest.mark.slow
def test_noise_moving_scan_fails_with_reason_and_no_transform(tmp_path):
    rng = np.random.default_rng(0)
    noise = sitk.GetImageFromArray(rng.uniform(0, 100, (40, 60, 60)).astype(np.float32))
    noise.SetSpacing((3.0, 3.0, 3.0))
    path = str(tmp_path / "noise_mr.nii.gz")
    sitk.WriteImage(noise, path)
    out = tmp_path / "out"
    result = run_registration_bundle("--moving_path", path, "--output_dir", str(out), "--deformable", "false")
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR:")]
    assert len(errors) == 1 and "registration failed" in errors[0], result.stderr[-2000:]
    folder = out / "phantom_ct_3mm__noise_mr"
    assert sorted(os.listdir(folder)) == ["summary.json"]  # the report, never a transform it cannot support
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["confidence"]["success"] is False and summary["confidence"]["reason"]


@pytest.mark.slow
def test_ct_given_as_mr_is_refused(tmp_path):
    out = tmp_path / "out"
    result = run_registration_bundle("--moving_path", sample_path("ct_abdomen"), "--moving_modality", "mr", "--output_dir", str(out))
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR:")]
    assert len(errors) == 1 and "is this a CT" in errors[0], result.stderr[-2000:]
    assert not out.exists() or not any(p.is_file() for p in out.rglob("*"))


def test_crop_index_range_on_an_oblique_grid_against_known_voxels():
    from samv2_components.registration import body_box_corners, crop_index_range

    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))
    affine_lps = np.eye(4)
    affine_lps[:3, :3] = q @ np.diag([2.0, 1.5, 3.0])
    affine_lps[:3, 3] = [12.0, -40.0, 7.0]
    # the corners of voxels 5..9, 10..19, 3..6 (outer faces) -> exactly that index range
    lo, hi = np.array([4.5, 9.5, 2.5]), np.array([9.5, 19.5, 6.5])
    corners_idx = np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])])
    corners = corners_idx @ affine_lps[:3, :3].T + affine_lps[:3, 3]
    start, stop = crop_index_range(corners, affine_lps, (30, 40, 20), margin_mm=0.0)
    assert start.tolist() == [4, 9, 2] and stop.tolist() == [11, 21, 8]  # covers [lo, hi] by voxel centres
    # a margin of 6 mm adds 3, 4 and 2 voxels on each side (6 mm / spacing), clipped to the volume
    start, stop = crop_index_range(corners, affine_lps, (30, 40, 20), margin_mm=6.0)
    assert start.tolist() == [1, 5, 0] and stop.tolist() == [14, 25, 10]
    assert crop_index_range(corners + 1000.0, affine_lps, (30, 40, 20), margin_mm=6.0) is None  # no overlap
    # the body box of a mask on a MetaTensor: outer faces of its voxels, in LPS
    mask = torch.zeros(6, 8, 5, dtype=torch.bool)
    mask[1:4, 2:7, 0:2] = True
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_lps
    box = body_box_corners(MetaTensor(torch.zeros(1, 6, 8, 5), affine=torch.as_tensor(ras)), mask)
    expected = np.array([[a, b, c] for a in (0.5, 3.5) for b in (1.5, 6.5) for c in (-0.5, 1.5)]) @ affine_lps[:3, :3].T + affine_lps[:3, 3]
    np.testing.assert_allclose(box, expected, atol=1e-9)
