"""Tests of the coordinate conversions in :mod:`samv2_components.geometry` against hand-computed transforms."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from samv2_components.errors import SAMv2InputError
from samv2_components.geometry import (
    check_coordinate_system,
    convert_points,
    strided_grid_affine,
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
