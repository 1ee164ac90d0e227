"""Orientation search for AdaReg (``samv2_components.registration.orientation``): the 24 cube rotations, the exact
voxel rotation and its world-space map, and the sample CT registered back from 90° and 180° turns that its header
does not know about (through the bundle, known truth; those bundle runs are ``slow``, the registration bundle's
smoke test is in ``test_adareg.py``)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

sitk = pytest.importorskip("SimpleITK")

from samv2_components.geometry import convert_affine, voxel_to_world  # noqa: E402
from samv2_components.io.transforms import read_transform_json  # noqa: E402
from samv2_components.registration import axis_aligned_rotations, rotate_volume  # noqa: E402
from samv2_components.sample_data import sample_path  # noqa: E402
from helpers import run_registration_bundle, sample_ct_tre, turned_sample_ct  # noqa: E402


def test_the_24_rotations_form_the_cube_group():
    rotations = axis_aligned_rotations()
    assert len(rotations) == 24 and np.array_equal(rotations[0], np.eye(3))
    keys = {r.tobytes() for r in rotations}
    assert len(keys) == 24
    for r in rotations:
        assert round(np.linalg.det(r)) == 1 and np.array_equal(r @ r.T, np.eye(3))
    for a in rotations[::5]:  # closed under composition
        for b in rotations[::7]:
            assert (a @ b).astype(np.int64).tobytes() in keys


def test_rotate_volume_moves_each_voxel_where_the_world_map_says():
    rng = np.random.default_rng(0)
    data = torch.as_tensor(rng.normal(size=(1, 6, 9, 11)), dtype=torch.float32)
    # oblique RAS affine with cubic 2 mm voxels
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    affine = np.eye(4)
    affine[:3, :3] = 2.0 * q
    affine[:3, 3] = [10.0, -30.0, 55.0]
    image = MetaTensor(data, affine=torch.as_tensor(affine))
    affine_lps = convert_affine(affine, "RAS", "LPS")
    idx = np.stack([rng.integers(0, n, 40) for n in data.shape[1:]], axis=1)
    for s in axis_aligned_rotations():
        rotated, world_map = rotate_volume(image, s)
        assert np.allclose(world_map[:3, :3] @ world_map[:3, :3].T, np.eye(3)) and np.isclose(np.linalg.det(world_map[:3, :3]), 1.0)
        x = voxel_to_world(idx.astype(float), affine)  # LPS
        y = x @ world_map[:3, :3].T + world_map[:3, 3]
        new_idx = np.linalg.solve(affine_lps[:3, :3], (y - affine_lps[:3, 3]).T).T
        new_idx_int = np.rint(new_idx).astype(int)
        np.testing.assert_allclose(new_idx, new_idx_int, atol=1e-6)  # lands on voxel centres
        values = rotated[0].numpy()[tuple(new_idx_int.T)]
        np.testing.assert_array_equal(values, data[0].numpy()[tuple(idx.T)])


def test_rotate_volume_refuses_non_cubic_voxels_and_bad_matrices():
    image = MetaTensor(torch.zeros(1, 4, 4, 4), affine=torch.diag(torch.tensor([1.0, 1.0, 2.0, 1.0], dtype=torch.float64)))
    with pytest.raises(ValueError, match="cubic voxels"):
        rotate_volume(image, axis_aligned_rotations()[3])
    with pytest.raises(ValueError, match="signed permutation"):
        rotate_volume(image, -np.eye(3))  # a reflection


@pytest.mark.slow
@pytest.mark.parametrize(
    "rotation",
    [
        np.diag([-1.0, 1.0, -1.0]),  # head-to-foot reversal, as the phantom pair as acquired
        np.array([[1.0, 0, 0], [0, 0, -1.0], [0, 1.0, 0]]),
    ],
    ids=["180deg_about_y", "90deg_about_x"],
)
def test_header_disagreeing_by_a_large_rotation_is_found(tmp_path, rotation):
    path, truth = turned_sample_ct(str(tmp_path / "ct_turned.nii.gz"), rotation)
    out = tmp_path / "out"
    common = ("--fixed_path", sample_path("ct_abdomen"), "--moving_path", path, "--moving_modality", "ct",
              "--deformable", "false", "--write_qc", "false")
    trusted = run_registration_bundle(*common, "--output_dir", str(out), "--orientation_search", "off")
    # the headers alone do not register it (the search is what finds it): a refusal, never a wrong transform
    assert trusted.returncode != 0 and not (out / "ct_abdomen__ct_turned" / "rigid.tfm").exists()
    result = run_registration_bundle(*common, "--output_dir", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    folder = out / "ct_abdomen__ct_turned"
    confidence = json.loads((folder / "summary.json").read_text())["confidence"]
    assert confidence["pipeline"] == "samv2" and "turn_" in confidence["winner"]  # a turned candidate won
    assert 0 < len(confidence["orientation_search"]["embedded_turns"]) <= 5  # ranked by intensity, only the best embedded
    _, tre = sample_ct_tre(read_transform_json(folder / "rigid.json"), truth, seed=1)
    assert tre.mean() < 4.0, (tre.mean(), confidence["winner"])
    assert os.path.exists(folder / "rigid.tfm")
    # the paper's AdaReg with its own orientation search finds it too
    adareg = run_registration_bundle(*common, "--pipeline", "adareg", "--output_dir", str(tmp_path / "adareg"))
    assert adareg.returncode == 0, adareg.stderr[-3000:]
    search = json.loads((tmp_path / "adareg" / "ct_abdomen__ct_turned" / "summary.json").read_text())["confidence"]["orientation_search"]
    assert search["n_candidates"] == 24 and search["header_orientation"]["success"] is False


class _ScriptedAdaReg:
    """A stand-in for AdaReg whose rigid fit reports a scripted inlier count per orientation candidate (found by
    comparing the turned volume with each of the 24 turns) and the identity transform in the turned scan's space,
    with the turned scan's real body box: what the search makes of it is then known exactly."""

    grid_spacing_mm, min_inliers = 12.0, 12

    def __init__(self, moving, inliers: dict[int, int]):
        self.turns = [rotate_volume(moving, s)[0].as_tensor() for s in axis_aligned_rotations()]
        self.inliers = inliers

    def rigid(self, fixed_image, fixed_heads, moving_image, moving_heads):
        from samv2_components.registration import RigidRegistration, body_box_corners, body_mask

        k = next(i for i, t in enumerate(self.turns) if t.shape == moving_image.shape and torch.equal(t, moving_image.as_tensor()))
        n = self.inliers.get(k, 0)
        summary = {"n_points": 100, "n_inliers": n, "n_matches_above_score": 100, "inlier_fraction": n / 100}
        ok = n >= self.min_inliers
        return RigidRegistration(ok, "" if ok else "too few", np.eye(4), "moving", np.zeros((0, 3)), np.zeros((0, 3)),
                                 np.zeros(0), np.zeros(0, bool), summary, body_box_corners(moving_image, body_mask(moving_image)))


def _asymmetric_volume() -> MetaTensor:
    rng = np.random.default_rng(3)
    data = torch.full((1, 10, 14, 12), -50.0)
    data[0, 2:8, 3:12, 2:7] = torch.as_tensor(rng.uniform(10, 200, (6, 9, 5)), dtype=torch.float32)  # off-centre body
    affine = torch.tensor([[0, 0, -2.0, 40], [0, -2.0, 0, 25], [2.0, 0, 0, -60], [0, 0, 0, 1]], dtype=torch.float64)
    return MetaTensor(data, affine=affine)


def test_search_maps_the_winner_back_to_the_moving_scan_and_embeds_each_turn_once():
    from samv2_components.registration import OrientationSearch, body_box_corners, body_mask

    moving = _asymmetric_volume()
    adareg = _ScriptedAdaReg(moving, {7: 40, 3: 15})
    calls = []
    search = OrientationSearch(adareg, embed=lambda image: calls.append(1) or {"fine": None})
    result, candidates = search(moving, {}, moving, moving_heads={"fine": None})
    assert result.success and candidates[0].index == 7
    _, world_map = rotate_volume(moving, axis_aligned_rotations()[7])
    # the scripted fit is the identity in the turned scan, so fixed -> moving is the inverse turn
    np.testing.assert_allclose(result.fixed_to_moving, np.linalg.inv(world_map), atol=1e-9)
    # the body box comes back in the moving scan's own space: the same 8 corners as computed there
    expected = body_box_corners(moving, body_mask(moving))
    got = result.small_body_corners
    assert sorted(map(tuple, np.round(got, 6))) == sorted(map(tuple, np.round(expected, 6)))
    assert len(calls) == 23  # the identity reuses the given embeddings, the winner's refit reuses its own


def test_search_without_a_clear_winner_fails_and_names_both_candidates():
    from samv2_components.registration import OrientationSearch

    moving = _asymmetric_volume()
    search = OrientationSearch(_ScriptedAdaReg(moving, {7: 40, 3: 36}), embed=lambda image: {})
    result, _ = search(moving, {}, moving)
    assert not result.success and "no clear winner" in result.reason
    assert np.array_equal(result.fixed_to_moving, np.eye(4))
    best_two = result.summary["orientation_search"]["best_two"]
    assert [c["candidate"] for c in best_two] == [7, 3] and [c["n_inliers"] for c in best_two] == [40, 36]
    clear, _ = OrientationSearch(_ScriptedAdaReg(moving, {7: 40, 3: 20}), embed=lambda image: {})(moving, {}, moving)
    assert clear.success  # 20 < 0.8 x 40


def test_auto_confirms_a_marginal_header_fit_by_searching():
    """``confirm_below_fraction``: a header fit that only just passes must win a search; a clear one is kept."""
    from samv2_components.registration import register_rigid_with_orientation_search

    moving = _asymmetric_volume()
    identity = next(i for i, r in enumerate(axis_aligned_rotations()) if np.allclose(r, np.eye(3)))
    embed = lambda image: {}  # noqa: E731
    marginal = _ScriptedAdaReg(moving, {identity: 13, 7: 40})  # 13 % inliers: passes the 12-inlier check
    kept = register_rigid_with_orientation_search(marginal, embed, moving, {}, moving, {}, mode="auto")
    assert kept.success and "orientation_search" not in kept.summary  # plain auto trusts it
    confirmed = register_rigid_with_orientation_search(marginal, embed, moving, {}, moving, {}, mode="auto",
                                                       confirm_below_fraction=0.15)
    assert confirmed.success and confirmed.summary["orientation_search"]["chosen"]["candidate"] == 7
    assert confirmed.summary["orientation_search"]["header_orientation"]["inlier_fraction"] == 0.13
    clear = _ScriptedAdaReg(moving, {identity: 30, 7: 40})
    trusted = register_rigid_with_orientation_search(clear, embed, moving, {}, moving, {}, mode="auto",
                                                     confirm_below_fraction=0.15)
    assert trusted.success and "orientation_search" not in trusted.summary
    np.testing.assert_allclose(trusted.fixed_to_moving, np.eye(4))


@pytest.mark.slow
def test_the_phantom_pair_as_it_comes_registers_to_the_reference(tmp_path):
    """The shipped CT-MR phantom pair, MR head-to-foot reversed (~178 deg): the bundle's default run (orientation
    search auto) finds it; compared with the benchmark's reference transform (mutual information, many starts)."""
    out = tmp_path / "out"
    result = run_registration_bundle("--output_dir", str(out), "--deformable", "false", "--write_qc", "false")
    assert result.returncode == 0, result.stderr[-3000:]
    folder = out / "phantom_ct_3mm__phantom_mr_t2_3mm"
    summary = json.loads((folder / "summary.json").read_text())
    assert "turn_" in summary["confidence"]["winner"]  # not the header orientation: the MR is reversed
    estimate = read_transform_json(folder / "rigid.json")
    reference_path = os.path.join(os.path.dirname(__file__), "..", "bundles", "crosssam_registration", "docs",
                                  "benchmark_registration_reference.json")
    with open(reference_path) as f:
        reference = np.array(json.load(f)["fixed_to_moving"])
    ct = sitk.ReadImage(sample_path("phantom_ct"))
    body = sitk.GetArrayFromImage(ct) > -300  # (z, y, x)
    voxels = np.argwhere(body)[:, ::-1][:: max(1, int(body.sum()) // 2000)].astype(float)
    points = np.array([ct.TransformContinuousIndexToPhysicalPoint(v.tolist()) for v in voxels])
    tre = np.linalg.norm(points @ estimate[:3, :3].T + estimate[:3, 3] - (points @ reference[:3, :3].T + reference[:3, 3]), axis=1)
    assert tre.mean() < 8.0, tre.mean()
