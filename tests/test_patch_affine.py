"""Batched local affine registration of patches, against a known affine transform of the shipped sample CT.

The query is the sample CT resampled (SimpleITK) through a known rotation + anisotropic scale + translation, so
the true match of every template point and the true local linear map are exact. The optimiser must find both
from a start a few millimetres and degrees off; the LPS -> sampling-grid matrix must agree with the project's one
voxel <-> world conversion.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from samv2_components.geometry import voxel_to_world
from samv2_components.io.image import load_scan
from samv2_components.matching.patch_affine import (
    AffineLevel,
    cube_offsets,
    lps_to_sampling_grid,
    patch_similarity,
    register_patches,
    sample_world_points,
    smoothed_volume,
)
from samv2_components.matching.refinement import LocalIntensityRefiner, sample_lps_cubes
from samv2_components.sample_data import sample_path

from helpers import interior_points

LEVELS = [AffineLevel(32.0, 2.0, 100, 1.0), AffineLevel(16.0, 1.0, 40)]
GAUSS_NEWTON_LEVELS = [AffineLevel(32.0, 2.0, 30, 1.0, optimizer="gauss_newton"), AffineLevel(16.0, 1.0, 20, optimizer="gauss_newton")]


@pytest.fixture(scope="module")
def ct():
    return load_scan(sample_path("ct_abdomen"))


@pytest.fixture(scope="module")
def affine_pair(tmp_path_factory):
    """``(query scan, linear (3, 3), offset (3,))`` with ``query point = linear @ template point + offset`` (LPS)."""
    sitk = pytest.importorskip("SimpleITK")
    image = sitk.ReadImage(sample_path("ct_abdomen"))
    centre = np.array(image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()]))
    turn = sitk.Euler3DTransform(centre.tolist(), np.deg2rad(4.0), np.deg2rad(-3.0), np.deg2rad(10.0))
    rotation = np.array(turn.GetMatrix()).reshape(3, 3)
    linear = np.diag([1.06, 0.95, 1.0]) @ rotation  # template -> query
    offset = centre - linear @ centre + np.array([3.1, -2.2, 1.7])
    to_template = sitk.AffineTransform(3)  # ITK resampling maps query points to template points
    to_template.SetMatrix(np.linalg.inv(linear).ravel().tolist())
    to_template.SetTranslation((-np.linalg.inv(linear) @ offset).tolist())
    path = tmp_path_factory.mktemp("affine") / "query.nii.gz"
    sitk.WriteImage(sitk.Resample(image, image, to_template, sitk.sitkLinear, -1024.0), str(path))
    return load_scan(path), linear, offset


@pytest.fixture
def sampled_rows(monkeypatch) -> list:
    """The number of patches sampled by each call of ``sample_world_points`` in ``register_patches``."""
    import samv2_components.matching.patch_affine as patch_affine

    rows, real_sampler = [], patch_affine.sample_world_points

    def counting_sampler(volume, to_grid, world):
        rows.append(len(world))
        return real_sampler(volume, to_grid, world)

    monkeypatch.setattr(patch_affine, "sample_world_points", counting_sampler)
    return rows


def _inner_points(image, n: int, seed: int) -> np.ndarray:
    """Points far enough inside the 30-slice CT for a 32 mm patch around a few millimetres of error."""
    return interior_points(image, n, seed, max_margin=25, margin_divisor=3)


def test_sampling_grid_matrix_agrees_with_the_voxel_world_conversion(ct):
    """A voxel centre's LPS position maps to its grid_sample coordinate; samples equal the cube sampler's."""
    to_grid = lps_to_sampling_grid(ct).numpy()
    size = np.asarray(ct.shape[1:], np.float64)
    voxel = np.array([[0.0, 0.0, 0.0], [size[0] - 1, 10.0, 3.0], [20.0, size[1] - 1, size[2] - 1]])
    world = voxel_to_world(voxel, np.asarray(ct.affine))
    grid = world @ to_grid[:3, :3].T + to_grid[:3, 3]
    np.testing.assert_allclose(grid, (2 * voxel / (size - 1) - 1)[:, ::-1], atol=1e-9)  # (x, y, z) = last..first axis
    at_centres = sample_world_points(smoothed_volume(ct), lps_to_sampling_grid(ct), torch.as_tensor(world)[None])[0]
    expected_values = [float(ct[0, int(i), int(j), int(k)]) for i, j, k in voxel]
    np.testing.assert_allclose(at_centres.numpy(), expected_values, atol=1e-2)
    points = _inner_points(ct, 4, seed=0)
    expected = sample_lps_cubes(ct, points, half_size=2, step_mm=2.5).flatten(1).numpy()
    probe = AffineLevel(10.0, 2.5, 0)  # 5 samples per axis
    world = torch.as_tensor(points, dtype=torch.float32)[:, None, :] + cube_offsets(probe.half_size, probe.step_mm)[None]
    sampled = sample_world_points(smoothed_volume(ct), lps_to_sampling_grid(ct), world).numpy()
    np.testing.assert_allclose(sampled, expected, atol=0.05)
    identity = np.broadcast_to(np.eye(3), (4, 3, 3))
    # an exact copy of the scan compared with itself: NCC 1 at the same points, lower 3 mm away
    assert np.allclose(patch_similarity(ct, points, ct, points, identity, probe), 1.0, atol=1e-5)
    assert np.all(patch_similarity(ct, points, ct, points + [3.0, 0, 0], identity, probe) < 0.999)


def test_smoothing_is_monai_gaussian_filter_and_leaves_onednn_as_it_was(ct):
    """``smoothed_volume`` runs MONAI's Gaussian filter (sigma in voxels per axis from the spacing) with oneDNN off
    (its conv3d is slow on whole scans) and restores the setting, even when the filter fails."""
    from monai.networks.layers import GaussianFilter

    spacing = np.linalg.norm(np.asarray(ct.affine)[:3, :3], axis=0)
    expected = GaussianFilter(3, [1.5 / s for s in spacing])(torch.as_tensor(ct.as_tensor(), dtype=torch.float32)[None])
    assert torch.backends.mkldnn.enabled
    np.testing.assert_allclose(smoothed_volume(ct, 1.5).numpy(), expected.numpy(), atol=1e-3)
    assert torch.backends.mkldnn.enabled
    with pytest.raises(Exception):
        smoothed_volume(ct[:, :0], 1.5)  # an empty volume: the filter raises
    assert torch.backends.mkldnn.enabled


@pytest.mark.parametrize("n_rows", [1, 5, 64])
def test_sampling_on_several_threads_is_one_grid_sample_bit_for_bit(ct, n_rows):
    """The rows dealt out to one batch entry per thread (padded to a multiple of the thread count) give the very
    values and gradients of one plain ``grid_sample`` call."""
    volume, to_grid = smoothed_volume(ct), lps_to_sampling_grid(ct)
    generator = torch.Generator().manual_seed(n_rows)
    centre = torch.as_tensor(interior_points(ct, n_rows, seed=n_rows), dtype=torch.float32)
    world = (centre[:, None, :] + 8.0 * torch.randn(n_rows, 300, 3, generator=generator)).requires_grad_(True)
    plain_grid = (world @ to_grid[:3, :3].T.float() + to_grid[:3, 3].float())[None, :, :, None]
    plain = torch.nn.functional.grid_sample(volume, plain_grid, mode="bilinear", padding_mode="border",
                                            align_corners=True)[0, 0, :, :, 0]
    threads = torch.get_num_threads()
    torch.set_num_threads(3)  # 5 and 64 rows are not multiples of it
    try:
        samples = sample_world_points(volume, to_grid, world)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(samples, plain)
    assert torch.equal(torch.autograd.grad(samples.sum(), world)[0], torch.autograd.grad(plain.sum(), world)[0])


@pytest.mark.parametrize("optimizer", ["adam", "gauss_newton"])
@pytest.mark.parametrize("similarity", ["ncc", "mind"])
def test_a_known_affine_is_recovered(ct, affine_pair, similarity, optimizer):
    query, linear, offset = affine_pair
    points = _inner_points(ct, 24, seed=1)
    truth = points @ linear.T + offset
    rng = np.random.default_rng(2)
    start = truth + rng.uniform(-3.0, 3.0, truth.shape)
    given = start.copy()
    levels = LEVELS if optimizer == "adam" else GAUSS_NEWTON_LEVELS
    result = register_patches(ct, points, query, start, np.eye(3), levels, similarity)
    before, after = np.linalg.norm(start - truth, axis=1), np.linalg.norm(result.points_lps - truth, axis=1)
    assert np.median(after) < 0.5 < np.median(before)
    # most of the turn and scale is found (the 16 mm patch of the last level constrains it only loosely)
    assert np.median(np.linalg.norm(result.linear - linear, axis=(1, 2))) < 0.4 * np.linalg.norm(np.eye(3) - linear)
    assert np.median(result.similarity_final) > np.median(result.similarity_start)
    np.testing.assert_array_equal(start, given)  # the caller's array is not overwritten


def test_converged_points_stop_early_and_the_others_take_the_same_steps(ct, affine_pair, sampled_rows):
    """With ``tolerance_mm`` a point whose patch moved less than it over the last window stops there: fewer points
    are sampled per step, a point still moving follows exactly the steps of the run without it, and a stopped one
    stays close to where the full run ends (it was barely moving)."""
    import samv2_components.matching.patch_affine as patch_affine

    query, linear, offset = affine_pair
    points = _inner_points(ct, 24, seed=7)
    start = points @ linear.T + offset + np.random.default_rng(8).uniform(-3.0, 3.0, points.shape)
    levels = [AffineLevel(32.0, 2.0, 150, 1.0), AffineLevel(16.0, 1.0, 60)]
    full = register_patches(ct, points, query, start, np.eye(3), levels)
    work_full, sampled_rows[:] = sum(sampled_rows), []
    tolerance = [AffineLevel(32.0, 2.0, 150, 1.0, tolerance_mm=0.05), AffineLevel(16.0, 1.0, 60, tolerance_mm=0.05)]
    early = register_patches(ct, points, query, start, np.eye(3), tolerance)
    assert sum(sampled_rows) < 0.95 * work_full
    moved = np.linalg.norm(early.points_lps - full.points_lps, axis=1)
    assert moved.max() < 0.5 and np.median(moved) < 0.05
    assert (moved == 0).sum() >= 1  # points that never stopped: the very same answer
    # a point stopped at once takes no step: a huge tolerance leaves every map as the first window left it
    once = register_patches(ct, points, query, start, np.eye(3), [AffineLevel(16.0, 1.0, 30, tolerance_mm=1e6)])
    ten = register_patches(ct, points, query, start, np.eye(3), [AffineLevel(16.0, 1.0, patch_affine.CONVERGENCE_WINDOW)])
    np.testing.assert_array_equal(once.points_lps, ten.points_lps)


def test_gauss_newton_finds_a_pure_shift_in_a_few_iterations_and_stops(ct, sampled_rows):
    """The query is the template's own grid moved by a known shift (no resampling): from 2.5 mm off, a few damped
    Gauss-Newton steps land within 0.05 mm (a wrong derivative, e.g. a sign or axis order, would not converge);
    points stop once a step is below ``tolerance_mm``, so far fewer rows are sampled than iterations allow."""
    from samv2_components.transforms.known_transform import moved_scan

    shift = np.array([1.3, -2.1, 0.8])
    moved = np.eye(4)
    moved[:3, 3] = shift
    query = moved_scan(ct, moved)
    points = _inner_points(ct, 12, seed=11)
    truth = points + shift
    start = truth + np.random.default_rng(12).uniform(-2.5, 2.5, truth.shape)
    level = AffineLevel(24.0, 1.0, 50, 0.5, tolerance_mm=0.01, optimizer="gauss_newton")
    result = register_patches(ct, points, query, start, np.eye(3), [level])
    assert np.linalg.norm(result.points_lps - truth, axis=1).max() < 0.05
    np.testing.assert_allclose(result.linear, np.broadcast_to(np.eye(3), result.linear.shape), atol=0.01)
    assert np.all(result.similarity_final > 0.999)
    # start and final scores, and one evaluation per iteration: stopping points leave far fewer than 50 x 12 rows
    assert sum(sampled_rows) < 0.5 * 50 * len(points)


def test_the_linear_prior_holds_the_linear_part_near_its_start(ct, affine_pair):
    """Gauss-Newton's ``linear_prior``: a huge weight keeps each linear part at its start (only the shift moves),
    none lets the patch fit the turn and scale."""
    query, linear, offset = affine_pair
    points = _inner_points(ct, 8, seed=13)
    start = points @ linear.T + offset
    held = register_patches(ct, points, query, start, np.eye(3), [AffineLevel(32.0, 2.0, 20, 1.0, optimizer="gauss_newton", linear_prior=1e9)])
    free = register_patches(ct, points, query, start, np.eye(3), [AffineLevel(32.0, 2.0, 20, 1.0, optimizer="gauss_newton", linear_prior=0.0)])
    assert np.abs(held.linear - np.eye(3)).max() < 1e-5
    assert np.median(np.linalg.norm(free.linear - linear, axis=(1, 2))) < 0.5 * np.linalg.norm(np.eye(3) - linear)


def test_refiner_with_affine_levels_beats_the_translation_search(ct, affine_pair):
    """Under a turned and scaled query, the affine stage brings refined matches below a millimetre; it never moves
    a point beyond the trust radius."""
    query, linear, offset = affine_pair
    points = _inner_points(ct, 24, seed=3)
    truth = points @ linear.T + offset
    rng = np.random.default_rng(4)
    embedding = truth + rng.uniform(-4.0, 4.0, truth.shape)
    search = LocalIntensityRefiner(patch_mm=24, trust_radius_mm=8, step_mm=2.0, min_improvement=0.0, affine_levels=())
    both = LocalIntensityRefiner(patch_mm=24, trust_radius_mm=8, step_mm=2.0, min_improvement=0.0, affine_levels=LEVELS)
    only_search, with_affine = search.refine(ct, points, query, embedding), both.refine(ct, points, query, embedding)
    error_search = np.linalg.norm(only_search.points_lps - truth, axis=1)
    error_affine = np.linalg.norm(with_affine.points_lps - truth, axis=1)
    assert with_affine.accepted.mean() >= 0.8
    assert np.median(error_affine[with_affine.accepted]) < 0.6
    assert np.median(error_affine) < np.median(error_search)
    assert np.all(np.linalg.norm(with_affine.points_lps - embedding, axis=1) <= 8.0 + 1e-9)


def test_a_far_match_is_kept_when_the_affine_optimum_leaves_the_trust_radius(ct, affine_pair):
    query, linear, offset = affine_pair
    points = _inner_points(ct, 8, seed=5)
    truth = points @ linear.T + offset
    far = truth + np.array([0.0, 0.0, 9.0])
    result = LocalIntensityRefiner(patch_mm=24, trust_radius_mm=3.0, step_mm=2.0, min_improvement=0.0, affine_levels=LEVELS).refine(ct, points, query, far)
    moved_far = result.shift_mm > 3.0
    assert moved_far.sum() >= 4  # the optimiser does find the truth 9 mm away ...
    assert not result.accepted[moved_far].any()  # ... but it is not accepted
    np.testing.assert_allclose(result.points_lps[~result.accepted], far[~result.accepted])
    assert {"kept: optimum beyond the trust radius"} >= {s for s, m in zip(result.status, moved_far) if m}


def test_bad_levels_are_refused(ct):
    points = _inner_points(ct, 2, seed=6)
    with pytest.raises(ValueError, match="patch_mm"):
        register_patches(ct, points, ct, points, None, [{"patch_mm": 0.0, "step_mm": 1.0}])
    with pytest.raises(ValueError, match="tolerance_mm"):
        register_patches(ct, points, ct, points, None, [{"patch_mm": 16.0, "step_mm": 1.0, "tolerance_mm": -1.0}])
    with pytest.raises(ValueError, match="optimizer"):
        register_patches(ct, points, ct, points, None, [{"patch_mm": 16.0, "step_mm": 1.0, "optimizer": "lbfgs"}])
    with pytest.raises(ValueError, match="linear_prior"):
        register_patches(ct, points, ct, points, None, [{"patch_mm": 16.0, "step_mm": 1.0, "linear_prior": -0.1}])
    with pytest.raises(ValueError, match="similarity"):
        register_patches(ct, points, ct, points, None, LEVELS, "mutual_information")
    with pytest.raises(ValueError, match="start points"):
        register_patches(ct, points, ct, points[:1], None, LEVELS)
    with pytest.raises(TypeError):
        LocalIntensityRefiner(affine_levels=[{"patch_mm": 16.0, "step_mm": 1.0, "unknown": 1}])


def test_cross_modal_evaluation_moves_a_grid_by_exactly_the_reference_transform(ct):
    """scripts/evaluate_refinement_cross_modal.py's control query (``moved_scan``): every voxel centre lands at
    T p (LPS)."""
    from samv2_components.transforms.known_transform import moved_scan

    angle = np.deg2rad(170.0)
    transform = np.eye(4)
    transform[:3, :3] = [[np.cos(angle), 0, np.sin(angle)], [0, 1, 0], [-np.sin(angle), 0, np.cos(angle)]]
    transform[:3, 3] = [12.0, -30.0, 5.5]
    moved = moved_scan(ct, transform)
    voxels = np.array([[0.0, 0.0, 0.0], [10.0, 20.0, 5.0], [121.0, 100.0, 29.0]])
    before = voxel_to_world(voxels, np.asarray(ct.affine))
    after = voxel_to_world(voxels, np.asarray(moved.affine))
    np.testing.assert_allclose(after, before @ transform[:3, :3].T + transform[:3, 3], atol=1e-6)
    np.testing.assert_array_equal(moved.numpy(), ct.numpy())  # same voxels, no resampling
