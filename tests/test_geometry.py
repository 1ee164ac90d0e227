"""Tests of the coordinate conversions in :mod:`samv2_components.geometry` against hand-computed transforms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from samv2_components.errors import SAMv2InputError
from samv2_components.geometry import (
    check_coordinate_system,
    grid_sample_points,
    label_centroids,
    convert_points,
    strided_grid_affine,
    strided_grid_of,
    voxel_to_grid_sample,
    voxel_to_grid_sample_matrix,
    voxel_to_world,
    world_to_voxel,
)

FLIP_XY = np.diag([-1.0, -1.0, 1.0, 1.0])


def _rotation(axis: np.ndarray, angle: float) -> np.ndarray:
    """Rodrigues' formula: rotation by ``angle`` radians about unit ``axis``."""
    axis = axis / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


@pytest.fixture
def oblique_affine() -> np.ndarray:
    """A rotated, anisotropic, translated voxel-to-world affine."""
    affine = np.eye(4)
    affine[:3, :3] = _rotation(np.array([1.0, 2.0, 3.0]), 0.4) @ np.diag([0.8, 1.25, 3.0])
    affine[:3, 3] = [-120.5, 33.0, 250.25]
    return affine


@pytest.fixture
def voxels() -> np.ndarray:
    return np.random.default_rng(0).uniform(-5, 60, size=(20, 3))


def test_hand_computed_example():
    affine = np.diag([2.0, 3.0, 4.0, 1.0])
    affine[:3, 3] = [10.0, 20.0, 30.0]  # RAS origin
    np.testing.assert_allclose(voxel_to_world([1, 1, 1], affine, "RAS", "RAS"), [[12.0, 23.0, 34.0]])
    np.testing.assert_allclose(voxel_to_world([1, 1, 1], affine, "RAS", "LPS"), [[-12.0, -23.0, 34.0]])
    np.testing.assert_allclose(world_to_voxel([-12.0, -23.0, 34.0], affine, "RAS", "LPS"), [[1.0, 1.0, 1.0]])
    # voxel index 0 is the centre of the first voxel, i.e. the origin
    np.testing.assert_allclose(voxel_to_world([0, 0, 0], affine, "RAS", "RAS"), [[10.0, 20.0, 30.0]])


@pytest.mark.parametrize("affine_space", ["RAS", "LPS"])
@pytest.mark.parametrize("world_space", ["RAS", "LPS"])
def test_oblique_round_trip(oblique_affine, voxels, affine_space, world_space):
    world = voxel_to_world(voxels, oblique_affine, affine_space, world_space)
    assert world.shape == voxels.shape
    np.testing.assert_allclose(world_to_voxel(world, oblique_affine, affine_space, world_space), voxels, atol=1e-9)


def test_oblique_matches_matrix_product(oblique_affine, voxels):
    homogeneous = np.c_[voxels, np.ones(len(voxels))]
    expected_ras = (oblique_affine @ homogeneous.T).T[:, :3]
    np.testing.assert_allclose(voxel_to_world(voxels, oblique_affine, "RAS", "RAS"), expected_ras)
    expected_lps = expected_ras * [-1, -1, 1]
    np.testing.assert_allclose(voxel_to_world(voxels, oblique_affine, "RAS", "LPS"), expected_lps)


def test_affine_in_lps_or_ras_same_physical_point(oblique_affine, voxels):
    affine_lps = FLIP_XY @ oblique_affine  # the same image geometry written in LPS
    for world_space in ("LPS", "RAS"):
        from_ras = voxel_to_world(voxels, oblique_affine, "RAS", world_space)
        from_lps = voxel_to_world(voxels, affine_lps, "LPS", world_space)
        np.testing.assert_allclose(from_ras, from_lps)
        np.testing.assert_allclose(world_to_voxel(from_ras, affine_lps, "LPS", world_space), voxels, atol=1e-9)


def test_torch_inputs_accepted(oblique_affine, voxels):
    out = voxel_to_world(torch.as_tensor(voxels), torch.as_tensor(oblique_affine), "RAS", "LPS")
    np.testing.assert_allclose(out, voxel_to_world(voxels, oblique_affine, "RAS", "LPS"))


def test_convert_points_is_an_involution(voxels):
    ras = convert_points(voxels, "LPS", "RAS")
    np.testing.assert_allclose(ras, voxels * [-1, -1, 1])
    np.testing.assert_allclose(convert_points(ras, "RAS", "LPS"), voxels)
    np.testing.assert_allclose(convert_points(voxels, "LPS", "LPS"), voxels)
    np.testing.assert_allclose(convert_points([1.0, 2.0, 3.0], "ras", "lps"), [[-1.0, -2.0, 3.0]])


def test_convert_points_does_not_modify_input(voxels):
    before = voxels.copy()
    convert_points(voxels, "LPS", "RAS")
    np.testing.assert_array_equal(voxels, before)


@pytest.mark.parametrize("stride,offset", [((2, 2, 2), (0.5, 0.5, 0.5)), ((4, 4, 2), (1.5, 1.5, 0.0))])
def test_strided_grid_affine(oblique_affine, stride, offset):
    grid_affine = strided_grid_affine(oblique_affine, stride, offset)
    grid = np.array([[0, 0, 0], [1, 2, 3], [7, 0, 5]], dtype=float)
    inputs = grid * np.asarray(stride, dtype=float) + np.asarray(offset, dtype=float)
    np.testing.assert_allclose(
        voxel_to_world(grid, grid_affine, "RAS", "LPS"), voxel_to_world(inputs, oblique_affine, "RAS", "LPS")
    )


def test_strided_grid_affine_hand_computed():
    affine = np.diag([2.0, 3.0, 4.0, 1.0])
    affine[:3, 3] = [10.0, 20.0, 30.0]
    grid_affine = strided_grid_affine(affine, (2, 2, 2), (0.5, 0.5, 0.5))
    # grid voxel (1, 1, 1) is input voxel (2.5, 2.5, 2.5): 10 + 2 * 2.5, 20 + 3 * 2.5, 30 + 4 * 2.5
    np.testing.assert_allclose(voxel_to_world([1, 1, 1], grid_affine, "RAS", "RAS"), [[15.0, 27.5, 40.0]])


@pytest.mark.parametrize("stride,offset", [((2, 2, 2), (0.5, 0.0, 0.0)), ((4, 16, 16), (0.5, 0.0, 0.0)), ((1, 3, 2), (0.25, 1.0, 0.0))])
def test_strided_grid_of_inverts_strided_grid_affine(oblique_affine, stride, offset):
    """How the embedding writer reads a head's grid off its affine: exact ints and offsets, no -0.0."""
    got_stride, got_offset = strided_grid_of(oblique_affine, strided_grid_affine(oblique_affine, stride, offset))
    assert got_stride == stride and all(isinstance(s, int) for s in got_stride)
    assert got_offset == offset and "-" not in repr(got_offset)


def test_strided_grid_of_refuses_a_rotated_grid(oblique_affine):
    rotated = oblique_affine @ np.array([[0.0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    with pytest.raises(ValueError, match="axis-aligned"):
        strided_grid_of(oblique_affine, rotated)


@pytest.mark.parametrize("name", ["XYZ", "RAI", "", "lpsx"])
def test_bad_coordinate_system(name):
    with pytest.raises(SAMv2InputError, match="unknown coordinate system"):
        check_coordinate_system(name)
    with pytest.raises(SAMv2InputError, match="unknown coordinate system"):
        convert_points([0.0, 0.0, 0.0], name, "LPS")
    with pytest.raises(SAMv2InputError, match="unknown coordinate system"):
        voxel_to_world([0.0, 0.0, 0.0], np.eye(4), "RAS", name)


def test_bad_coordinate_system_names_source():
    with pytest.raises(SAMv2InputError, match=r"^points\.csv: unknown coordinate system 'XYZ'"):
        check_coordinate_system("XYZ", "points.csv")


def test_check_coordinate_system_normalises():
    assert check_coordinate_system(" ras ") == "RAS"
    assert check_coordinate_system("LPS") == "LPS"


# --- label_centroids -------------------------------------------------------------------------------------------


def _label_map(shape, affine):
    from monai.data import MetaTensor

    return MetaTensor(torch.zeros((1, *shape), dtype=torch.float32), affine=torch.as_tensor(affine))


def test_label_centroids_oblique_grid(oblique_affine):
    shape = (40, 32, 12)
    label_map = _label_map(shape, oblique_affine)
    # blob centres chosen as world LPS points, snapped to the nearest voxel centre so that symmetric blobs have
    # their centroid exactly there
    targets_lps = voxel_to_world([[10, 8, 3], [30, 20, 8]], oblique_affine, "RAS", "LPS") + 0.3
    centres = np.round(world_to_voxel(targets_lps, oblique_affine, "RAS", "LPS")).astype(int)
    (a, b, c), (d, e, f) = centres
    label_map[0, a - 2 : a + 3, b - 1 : b + 2, c - 1 : c + 2] = 3  # 5x3x3 box
    label_map[0, d - 1 : d + 2, e, f] = 7  # 3-voxel line
    label_map[0, d, e - 1 : e + 2, f] = 7  # with the line: a symmetric 5-voxel cross
    label_map[0, 0, 0, 0] = 9  # one voxel in a corner
    label_map[0, 5, 5, 0:2] = 11  # two voxels: centroid half-way
    hom = lambda idx: (FLIP_XY @ oblique_affine @ np.r_[idx, 1.0])[:3]  # noqa: E731  independent RAS->LPS
    out = label_centroids(label_map)
    assert list(out) == [3, 7, 9, 11]
    assert all(v.shape == (3,) and v.dtype == np.float64 for v in out.values())
    np.testing.assert_allclose(out[3], hom(centres[0]), atol=1e-6)
    np.testing.assert_allclose(out[7], hom(centres[1]), atol=1e-6)
    np.testing.assert_allclose(out[9], hom([0, 0, 0]), atol=1e-6)
    np.testing.assert_allclose(out[11], hom([5, 5, 0.5]), atol=1e-6)
    # the 'known world position' the blob was placed at is within half a voxel diagonal of its centroid
    assert np.linalg.norm(out[3] - targets_lps[0]) < 0.5 * np.linalg.norm(np.diag([0.8, 1.25, 3.0]))
    # min_voxels / labels filters; a (D, H, W) MetaTensor without the channel gives the same
    assert list(label_centroids(label_map, min_voxels=3)) == [3, 7]
    assert list(label_centroids(label_map, labels=[7, 9, 0, 42])) == [7, 9]
    assert list(label_centroids(label_map, labels=5)) == []
    no_channel = label_centroids(label_map[0])
    for k in out:
        np.testing.assert_allclose(no_channel[k], out[k])


def test_label_centroids_lps_affine_same_points(oblique_affine):
    from monai.data import MetaTensor

    label_map = _label_map((20, 20, 10), oblique_affine)
    label_map[0, 3:6, 10:14, 2:7] = 1
    lps_affine = torch.as_tensor(FLIP_XY @ oblique_affine)
    lps = MetaTensor(label_map.as_tensor().clone(), affine=lps_affine, meta={"space": "LPS"})
    np.testing.assert_allclose(label_centroids(lps)[1], label_centroids(label_map)[1], atol=1e-9)


def test_label_centroids_rejects_bad_input(oblique_affine):
    label_map = _label_map((8, 8, 8), oblique_affine)
    label_map[0, 1, 1, 1] = 1.5
    with pytest.raises(SAMv2InputError, match="integer label ids"):
        label_centroids(label_map)
    with pytest.raises(SAMv2InputError, match="affine"):
        label_centroids(np.zeros((8, 8, 8)))


def _itk_centroids(path) -> dict[int, np.ndarray]:
    """Expected centroids computed independently: SimpleITK's own voxel -> physical point mapping."""
    sitk = pytest.importorskip("SimpleITK")
    image = sitk.ReadImage(str(path))
    array = sitk.GetArrayFromImage(image)  # (z, y, x)
    out = {}
    for label in np.unique(array[array != 0]):
        mean_zyx = np.argwhere(array == label).mean(axis=0)
        out[int(label)] = np.array(image.TransformContinuousIndexToPhysicalPoint(mean_zyx[::-1].tolist()))
    return out


def test_label_centroids_nifti_matches_simpleitk(tmp_path, oblique_affine):
    import nibabel as nib

    from samv2_components.io.image import load_scan

    array = np.zeros((30, 24, 10), dtype=np.int16)
    array[2:9, 3:7, 1:4] = 1
    array[20:23, 15:22, 5:9] = 4
    array[10, 10:12, 9] = 250
    array[25:28, 1:3, 0] = 4  # a second, disconnected part of label 4
    path = tmp_path / "labels.nii.gz"
    nib.save(nib.Nifti1Image(array, oblique_affine), str(path))
    expected = _itk_centroids(path)
    got = label_centroids(load_scan(path, check_intensities=False))
    assert sorted(got) == sorted(expected) == [1, 4, 250]
    for k in expected:
        np.testing.assert_allclose(got[k], expected[k], atol=1e-4)


def test_label_centroids_sample_labels_match_simpleitk():
    from samv2_components.io.image import load_scan
    from samv2_components.sample_data import sample_path

    path = sample_path("ct_abdomen_labels")
    expected = _itk_centroids(path)
    got = label_centroids(load_scan(path, check_intensities=False))
    assert sorted(got) == sorted(expected)
    for k in expected:
        np.testing.assert_allclose(got[k], expected[k], atol=1e-4)


def test_points_outside_scan_against_a_known_grid_and_its_original_geometry():
    """A 10 x 20 x 5 grid with 2 x 1 x 3 mm voxels, origin (RAS) (100, -50, 30): voxel faces bound the scan; after a
    reorientation/resampling the check still uses the grid as read (``original_affine``, ``spatial_shape``)."""
    import torch
    from monai.data import MetaTensor

    from samv2_components.geometry import points_outside_scan

    affine = np.diag([2.0, 1.0, 3.0, 1.0])
    affine[:3, 3] = [100.0, -50.0, 30.0]
    image = MetaTensor(torch.zeros(1, 10, 20, 5), affine=torch.as_tensor(affine))
    corner_ras = affine[:3, 3]  # voxel (0, 0, 0)
    far_ras = affine[:3, :3] @ [9, 19, 4] + affine[:3, 3]  # voxel (9, 19, 4)
    lps = lambda ras: np.array([-ras[0], -ras[1], ras[2]])  # noqa: E731
    points = np.stack([
        lps(corner_ras), lps(far_ras),
        lps(corner_ras - [0.9, 0, 0]),  # 0.45 voxel beyond the first face along i: inside the face
        lps(corner_ras - [1.1, 0, 0]),  # 0.55 voxel beyond: outside
        lps(far_ras + [0, 0, 1.6]),  # 0.53 voxel beyond the last face along k: outside
    ])
    np.testing.assert_array_equal(points_outside_scan(image, points), [False, False, False, True, True])
    # a resampled copy (other affine and shape) that remembers the grid it was read from gives the same answer
    resampled = MetaTensor(torch.zeros(1, 3, 3, 3), affine=torch.eye(4, dtype=torch.float64),
                           meta={"original_affine": affine, "spatial_shape": np.array([10, 20, 5])})
    np.testing.assert_array_equal(points_outside_scan(resampled, points), [False, False, False, True, True])


def test_rotations_and_rigid_matrices_by_hand():
    from samv2_components.geometry import (
        apply_matrix,
        axis_angle_rotation,
        linear_map_matrix,
        rigid_matrix,
        rotation_angle_deg,
    )

    # 90 deg about z: x -> y (right-handed); any axis length
    np.testing.assert_allclose(axis_angle_rotation([0, 0, 5.0], 90.0) @ [1.0, 0, 0], [0, 1.0, 0], atol=1e-12)
    r = axis_angle_rotation([1.0, 2.0, 3.0], 40.0)
    np.testing.assert_allclose(r, _rotation(np.array([1.0, 2.0, 3.0]), np.radians(40.0)), atol=1e-12)
    np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-12)
    assert rotation_angle_deg(r) == pytest.approx(40.0) and rotation_angle_deg(np.eye(4)) == 0.0
    # p -> R (p - c) + c + t: the centre moves by t only
    m = rigid_matrix(r, translation=(1.0, -2.0, 3.0), centre=(10.0, 20.0, 30.0))
    np.testing.assert_allclose(apply_matrix(m, [10.0, 20.0, 30.0]), [[11.0, 18.0, 33.0]], atol=1e-12)
    p = np.array([[1.0, 2.0, 3.0], [-4.0, 0.5, 9.0]])
    np.testing.assert_allclose(apply_matrix(m, p), p @ m[:3, :3].T + m[:3, 3])
    # the matrix of an affine map from its images of the origin and the unit vectors
    np.testing.assert_allclose(linear_map_matrix(lambda q: apply_matrix(m, q)[0]), m, atol=1e-12)


# ------------------------------------------------------------------------------------------- grid_sample coordinates
def _grid_sample_at(volume: torch.Tensor, voxels, align_corners: bool, mode="bilinear", padding_mode="zeros"):
    """``volume`` ``(D, H, W)`` sampled at voxel coordinates ``(N, 3)`` (D, H, W) through the helper: ``(N,)``."""
    grid = torch.as_tensor(voxel_to_grid_sample(voxels, volume.shape, align_corners=align_corners), dtype=torch.float32)
    out = F.grid_sample(
        volume[None, None], grid.reshape(1, 1, 1, -1, 3), mode=mode, padding_mode=padding_mode, align_corners=align_corners
    )
    return out.reshape(-1)


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("shape", [(5, 7, 9), (1, 4, 6), (3, 1, 1)])
def test_voxel_centres_read_their_own_voxels_through_grid_sample(shape, align_corners):
    """Every voxel centre, given in (D, H, W) order, reads that voxel (the (x, y, z) = (W, H, D) reversal and the
    normalisation of both conventions), with numpy and torch coordinates alike, for any axis size: exactly with
    nearest sampling, trilinearly up to the rounding of the float32 normalised coordinate (a weight ~1e-7 on a
    neighbour)."""
    volume = torch.arange(float(np.prod(shape))).reshape(shape) * 1.5 - 20.0  # every voxel a different value
    centres = np.indices(shape).reshape(3, -1).T.astype(np.float64)
    expected = volume.reshape(-1)
    for voxels in (centres, torch.as_tensor(centres)):
        torch.testing.assert_close(_grid_sample_at(volume, voxels, align_corners, "nearest"), expected, rtol=0, atol=0)
        torch.testing.assert_close(_grid_sample_at(volume, voxels, align_corners), expected, rtol=0, atol=1e-6 * 500)
    # halfway between two voxel centres along W reads their mean (trilinear weights in array order)
    if shape[2] > 1:
        mid = _grid_sample_at(volume, np.array([[0.0, 0.0, 0.5]]), align_corners)
        torch.testing.assert_close(mid, (volume[0, 0, :1] + volume[0, 0, 1:2]) / 2)


def test_grid_sample_coordinates_by_hand_and_outside_the_volume():
    """align_corners=False: voxel i of n at (2 i + 1) / n - 1, so [-1, 1] spans the outer faces; a point half a
    voxel beyond the outer face (index -1 or n) reads only padding, one on the face half its voxel."""
    shape = (4, 2, 8)
    np.testing.assert_array_equal(voxel_to_grid_sample([[0.0, 0.0, 0.0]], shape), [[1 / 8 - 1, 1 / 2 - 1, 1 / 4 - 1]])
    faces = voxel_to_grid_sample([[-0.5, -0.5, -0.5], [3.5, 1.5, 7.5]], shape)
    np.testing.assert_array_equal(faces, [[-1.0] * 3, [1.0] * 3])
    centres = voxel_to_grid_sample([[0.0, 0.0, 0.0], [3.0, 1.0, 7.0]], shape, align_corners=True)
    np.testing.assert_array_equal(centres, [[-1.0] * 3, [1.0] * 3])
    volume = torch.full(shape, 10.0)
    outside = np.array([[-1.0, 0.0, 0.0], [4.0, 1.0, 7.0], [0.0, -1.0, 3.0], [2.0, 1.0, 8.0]])
    torch.testing.assert_close(_grid_sample_at(volume, outside, False), torch.zeros(4), rtol=0, atol=0)
    face = np.array([[-0.5, 0.0, 0.0], [2.0, 1.0, 7.5]])
    torch.testing.assert_close(_grid_sample_at(volume, face, False), torch.full((2,), 5.0))
    # border padding (the matching code's convention): beyond the outer voxel centres the border value
    torch.testing.assert_close(_grid_sample_at(volume, outside, True, padding_mode="border"), torch.full((4,), 10.0))


@pytest.mark.parametrize("align_corners", [False, True])
def test_grid_sample_matrix_is_the_point_helper(align_corners):
    """The 4x4 form maps homogeneous voxel coordinates to the point helper's (x, y, z)."""
    rng = np.random.default_rng(0)
    shape = (6, 1, 11)
    voxels = rng.uniform(-2.0, 12.0, size=(50, 3))
    matrix = voxel_to_grid_sample_matrix(shape, align_corners)
    by_matrix = voxels @ matrix[:3, :3].T + matrix[:3, 3]
    np.testing.assert_allclose(by_matrix, voxel_to_grid_sample(voxels, shape, align_corners), atol=1e-12)
    np.testing.assert_array_equal(matrix[3], [0.0, 0.0, 0.0, 1.0])


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("n_points", [1, 7, 1000])
def test_grid_sample_points_is_one_grid_sample_call_on_any_thread_count(threads, n_points):
    """Dealing the points out to one batch entry per thread (padding with copies of the last point when they do not
    divide) changes neither the samples (C > 1 channels, every mode and convention) nor the gradient in the grid."""
    rng = np.random.default_rng(n_points)
    volume = torch.as_tensor(rng.normal(size=(1, 2, 5, 6, 7)), dtype=torch.float32)
    grid = torch.as_tensor(rng.uniform(-1.2, 1.2, size=(n_points, 3)), dtype=torch.float32)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for mode, padding_mode, align_corners in (("bilinear", "zeros", False), ("nearest", "zeros", False), ("bilinear", "border", True)):
            g1 = grid.clone().requires_grad_(True)
            g2 = grid.clone().requires_grad_(True)
            single = F.grid_sample(volume, g1.view(1, n_points, 1, 1, 3), mode=mode, padding_mode=padding_mode,
                                   align_corners=align_corners)[0, :, :, 0, 0]
            dealt = grid_sample_points(volume, g2, mode, padding_mode, align_corners)
            assert dealt.shape == (2, n_points)
            torch.testing.assert_close(dealt, single, rtol=0, atol=0)
            if mode == "bilinear":
                weights = torch.as_tensor(rng.normal(size=(2, n_points)), dtype=torch.float32)
                (single * weights).sum().backward()
                (dealt * weights).sum().backward()
                torch.testing.assert_close(g2.grad, g1.grad, rtol=1e-6, atol=1e-6)
    finally:
        torch.set_num_threads(previous)
