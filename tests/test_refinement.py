"""Sub-voxel refinement of matches by local intensity registration, against known transforms of a real scan.

The query is the shipped sample CT with its grid moved by a known translation (exact ground truth at any point);
embedding matches are simulated as the true point plus a few millimetres of error. The refiner must bring them
to the truth, never move a point beyond its trust radius or out of the query, and keep (and flag) what it
cannot improve. The bundle route writes both positions.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from samv2_components.geometry import convert_points, voxel_to_world
from samv2_components.io.image import load_scan
from samv2_components.matching.refinement import LocalIntensityRefiner, sample_lps_cubes
from samv2_components.sample_data import sample_path

from helpers import interior_points

SHIFT_LPS = np.array([7.3, -4.1, 2.6])
#: these tests check the translation search alone: the settings it had before the bundle's became the defaults
SEARCH_ONLY = dict(patch_mm=16.0, trust_radius_mm=6.0, min_improvement=0.0, affine_levels=())


@pytest.fixture(scope="module")
def ct():
    return load_scan(sample_path("ct_abdomen"))


def _moved(image: MetaTensor, shift_lps: np.ndarray) -> MetaTensor:
    """The same voxels with the grid moved by ``shift_lps``: every anatomical point moves by exactly that."""
    affine = np.asarray(image.affine, np.float64).copy()
    affine[:3, 3] += convert_points(shift_lps[None], "LPS", "RAS")[0]
    return MetaTensor(image.as_tensor().clone(), affine=torch.as_tensor(affine))


def test_cubes_are_sampled_along_world_lps_axes(ct):
    """A cube centred on a voxel centre reproduces that voxel's value, and one step along LPS x is one step in -R."""
    affine = np.asarray(ct.affine)
    voxel = np.array([60.0, 50.0, 15.0])
    centre = voxel_to_world(voxel[None], affine)
    cube = sample_lps_cubes(ct, centre, half_size=1, step_mm=3.0)[0, 0]
    assert cube.shape == (3, 3, 3)
    assert float(cube[1, 1, 1]) == pytest.approx(float(ct[0, 60, 50, 15]), abs=1e-3)
    # the voxel 3 mm further along LPS x (= 3 mm towards patient left)
    neighbour = np.linalg.solve(affine[:3, :3], convert_points(centre + [3.0, 0, 0], "LPS", "RAS")[0] - affine[:3, 3])
    expected = ct[0, int(round(neighbour[0])), int(round(neighbour[1])), int(round(neighbour[2]))]
    assert float(cube[2, 1, 1]) == pytest.approx(float(expected), abs=1e-3)


@pytest.mark.parametrize("similarity", ["ncc", "mind"])
def test_refinement_recovers_a_known_translation_below_a_millimetre(ct, similarity):
    query = _moved(ct, SHIFT_LPS)
    template_points = interior_points(ct, 30, seed=0)
    truth = template_points + SHIFT_LPS
    rng = np.random.default_rng(1)
    embedding = truth + rng.uniform(-2.5, 2.5, truth.shape)  # a few mm off, within the trust radius
    result = LocalIntensityRefiner(**{**SEARCH_ONLY, "similarity": similarity, "step_mm": 1.0}).refine(ct, template_points, query, embedding)
    before = np.linalg.norm(embedding - truth, axis=1)
    after = np.linalg.norm(result.points_lps - truth, axis=1)
    assert result.similarity == similarity
    assert result.accepted.mean() >= 0.8
    assert np.median(after[result.accepted]) < 0.5 < np.median(before)
    assert np.all(result.similarity_after[result.accepted] >= result.similarity_before[result.accepted])
    np.testing.assert_allclose(result.embedding_points_lps, embedding)  # both positions kept
    np.testing.assert_allclose(result.points_lps[~result.accepted], embedding[~result.accepted])


def test_local_frame_corrects_a_rotation(ct, tmp_path):
    """Query = the CT turned by 12 degrees about S: with the true local linear map the patches are compared in one
    frame and the truth is found; a translation-only comparison is off."""
    sitk = pytest.importorskip("SimpleITK")
    image = sitk.ReadImage(sample_path("ct_abdomen"))
    centre = image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()])
    turn = sitk.Euler3DTransform(centre, 0.0, 0.0, np.deg2rad(12.0))  # query point -> template point (ITK, LPS)
    query_path = tmp_path / "turned.nii.gz"
    sitk.WriteImage(sitk.Resample(image, image, turn, sitk.sitkLinear, -1024.0), str(query_path))
    query = load_scan(query_path)
    matrix = np.array(turn.GetMatrix()).reshape(3, 3)
    offset = np.array(turn.GetTranslation()) + np.array(centre) - matrix @ np.array(centre)
    template_points = interior_points(ct, 30, seed=4)
    truth = (template_points - offset) @ np.linalg.inv(matrix).T  # the inverse of query -> template
    rng = np.random.default_rng(5)
    embedding = truth + rng.uniform(-2.5, 2.5, truth.shape)
    refiner = LocalIntensityRefiner(**{**SEARCH_ONLY, "step_mm": 1.0})
    frames = np.broadcast_to(np.linalg.inv(matrix), (len(truth), 3, 3))  # template -> query linear part
    with_frame = refiner.refine(ct, template_points, query, embedding, local_linear=frames)
    without = refiner.refine(ct, template_points, query, embedding)
    error_with = np.linalg.norm(with_frame.points_lps - truth, axis=1)
    error_without = np.linalg.norm(without.points_lps - truth, axis=1)
    assert with_frame.accepted.mean() >= 0.8
    assert np.median(error_with) < 1.0
    assert np.median(error_with) < np.median(error_without)


def test_implausible_frames_fall_back_to_the_identity():
    frames = np.stack([np.eye(3), np.diag([1.0, 1.0, -1.0]), 3 * np.eye(3), np.full((3, 3), np.nan), np.diag([1.2, 0.9, 1.1])])
    assert LocalIntensityRefiner.plausible_linear(frames).tolist() == [True, False, False, False, True]


def test_auto_similarity_follows_the_modality_pair(ct):
    refiner = LocalIntensityRefiner(**{**SEARCH_ONLY, "step_mm": 3.0})
    points = interior_points(ct, 3, seed=2)
    assert refiner.refine(ct, points, ct, points, same_modality=True).similarity == "ncc"
    assert refiner.refine(ct, points, ct, points, same_modality=False).similarity == "mind"


def test_a_match_far_from_the_truth_is_kept_and_flagged(ct):
    """The optimum lies beyond the trust radius: the embedding match stays, flagged, however good the optimum."""
    query = _moved(ct, SHIFT_LPS)
    template_points = interior_points(ct, 10, seed=3)
    far = template_points + SHIFT_LPS + np.array([0.0, 0.0, 12.0])  # 12 mm off, trust radius 4 mm
    result = LocalIntensityRefiner(**{**SEARCH_ONLY, "step_mm": 1.0, "trust_radius_mm": 4.0}).refine(ct, template_points, query, far)
    assert not result.accepted.any()
    assert all(s.startswith("kept:") for s in result.status)
    np.testing.assert_allclose(result.points_lps, far)
    assert np.all(np.linalg.norm(result.points_lps - far, axis=1) <= 4.0)


def test_refinement_never_leaves_the_query_scan(ct):
    """Template points whose true match lies just outside the query's grid: nothing is moved out of the scan."""
    query = _moved(ct, SHIFT_LPS)
    size = np.asarray(ct.shape[1:])
    idx = np.array([[60.0, 50.0, size[2] - 1.0], [60.0, 40.0, size[2] - 1.0]])
    template_points = voxel_to_world(idx, np.asarray(ct.affine))
    embedding = template_points + SHIFT_LPS
    inside = lambda p: np.zeros(len(p), dtype=bool)  # noqa: E731 - a query that contains no refined point
    result = LocalIntensityRefiner(**{**SEARCH_ONLY, "step_mm": 1.0}).refine(ct, template_points, query, embedding, inside_query=inside)
    assert not result.accepted.any()
    assert all(s in ("kept: refined point outside the query scan", "kept: no optimum inside the trust radius",
                     "kept: no similarity gain") for s in result.status)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="similarity"):
        LocalIntensityRefiner(similarity="mutual_information")
    with pytest.raises(ValueError, match="positive"):
        LocalIntensityRefiner(trust_radius_mm=0)


def test_bundle_writes_refined_and_embedding_positions(tmp_path):
    from samv2_components.bundle_support import run_bundle

    out = tmp_path / "out"
    run_bundle("samv2_matching", ["inference.json"], {"output_dir": str(out), "refine": True, "write_qc": False})
    folder = out / "ct_abdomen_2"
    with open(folder / "ct_abdomen_points.csv", newline="") as f:
        rows = list(csv.DictReader(line for line in f if not line.startswith("#")))
    with open(folder / "matches.json") as f:
        summary = json.load(f)
    assert summary["method"] == "fixed_point+refine" and summary["refinement"]["similarity"] == "ncc"
    for row, point in zip(rows, summary["points"]):
        final = np.array([float(row[a]) for a in "xyz"])
        embedding = np.array([float(row[f"embedding_{a}"]) for a in "xyz"])
        shift = np.linalg.norm(final - embedding)
        if row["refined"] == "True":
            assert 0 < shift <= summary["refinement"]["trust_radius_mm"] + 1e-3
            assert float(row["refine_shift_mm"]) == pytest.approx(shift, abs=2e-3)
        else:
            assert shift == pytest.approx(0.0, abs=2e-3) and row["refine_status"].startswith("kept:")  # 3-decimal columns
        np.testing.assert_allclose(point["matched"], final, atol=1e-3)


def test_local_frames_of_an_aligned_match_come_from_the_aligned_query():
    """Under align-then-match the frames are fitted against the aligned query and composed with the alignment's
    linear part; where no frame fits there, the alignment's linear part itself."""
    from types import SimpleNamespace

    from samv2_components.geometry import axis_angle_rotation, rigid_matrix
    from samv2_components.matching.align_then_match import Alignment

    local = axis_angle_rotation([1.0, 0.0, 0.0], 8.0) * 1.05  # template -> aligned query, around every point
    turn = rigid_matrix(axis_angle_rotation([0.0, 0.0, 1.0], 40.0), translation=(5.0, -3.0, 2.0))

    class GridMatcher:
        """NN answers: the aligned scan maps by ``local`` (consistently), "nowhere" gives none, any other scan
        scatters them at random (as embeddings do under a large turn)."""

        def match(self, template_scan, query_scan, sources, method=None):
            if query_scan == "aligned":
                return SimpleNamespace(points_lps=sources @ local.T + 7.0)
            if query_scan == "nowhere":  # no answer at all (NaN): no frame can be fitted
                return SimpleNamespace(points_lps=np.full(sources.shape, np.nan))
            return SimpleNamespace(points_lps=np.random.default_rng(0).uniform(-300, 300, sources.shape))

    points = np.array([[0.0, 0.0, 0.0], [30.0, -20.0, 55.0]])
    refiner = LocalIntensityRefiner()
    frames = refiner.local_frames(GridMatcher(), "template", "turned", points, alignment=Alignment("aligned", turn))
    np.testing.assert_allclose(frames, np.broadcast_to(turn[:3, :3] @ local, (2, 3, 3)), atol=0.01)  # the fit is ridged
    # without the alignment the frames come from the turned pair's (here scattered) matches
    turned = refiner.local_frames(GridMatcher(), "template", "turned", points)
    assert np.abs(turned - turn[:3, :3] @ local).max() > 0.1
    # where no frame fits in the aligned scan, the alignment's own linear part
    assert np.isnan(refiner.local_frames(GridMatcher(), "template", "nowhere", points)).all()
    unfit = refiner.local_frames(GridMatcher(), "template", "turned", points, alignment=Alignment("nowhere", turn))
    np.testing.assert_allclose(unfit, np.broadcast_to(turn[:3, :3], (2, 3, 3)))
