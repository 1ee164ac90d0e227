"""The known-transform case builder (:mod:`samv2_components.transforms.known_transform`) against transforms whose
answer is known by construction: the inverse, a linear intensity ramp (trilinear interpolation reproduces it
exactly, so every resampled value can be checked), a pure translation by whole voxels, and the rigid grid move.
World points are LPS mm; images ``(1, X, Y, Z)`` with RAS affines."""

from __future__ import annotations

import numpy as np
import torch
from monai.data import MetaTensor

from samv2_components.geometry import convert_affine, points_outside_scan, voxel_to_world, world_to_voxel
from samv2_components.transforms.known_transform import (
    KnownTransform,
    grid_centre_lps,
    mapped_body_points,
    moved_scan,
    query_grid,
    random_transform,
    resample_query,
    rotation_zyx,
    sample_template_points,
    sample_volume,
)

RAMP = np.array([3.0, -2.0, 1.5])  # intensity = RAMP . p + 100 (p world LPS mm)


def _scan(values_of_lps, shape=(40, 36, 28), spacing=(3.0, 2.5, 3.5), angles_deg=(4.0, -6.0, 9.0),
          origin_lps=(-50.0, 30.0, -40.0)) -> MetaTensor:
    """An oblique, anisotropic grid (RAS affine) filled with ``values_of_lps(points (N, 3)) -> (N,)``."""
    affine_lps = np.eye(4)
    affine_lps[:3, :3] = rotation_zyx(np.deg2rad(angles_deg)) @ np.diag(spacing)
    affine_lps[:3, 3] = origin_lps
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3).astype(float)
    values = values_of_lps(voxel_to_world(idx, affine_lps, affine_space="LPS")).reshape(shape)
    return MetaTensor(
        torch.as_tensor(values, dtype=torch.float32)[None],
        affine=torch.as_tensor(convert_affine(affine_lps, "LPS", "RAS")),
        meta={"space": "RAS"},
    )


def _ramp(points):
    return points @ RAMP + 100.0


def test_template_to_query_inverts_query_to_template():
    tf = random_transform(11, centre=[5.0, -20.0, 60.0], elastic_mm=6.0)
    assert tf.displacement_bound() > 5.0 and tf.lipschitz_bound() < 0.9
    p = np.random.default_rng(0).uniform(-120, 120, (400, 3)) + tf.centre
    x = tf.template_to_query(p)
    assert np.abs(tf.query_to_template(x) - p).max() < 1e-3
    # the elastic part matters: the affine part alone is millimetres off
    assert np.linalg.norm(tf.affine_forward(p) - x, axis=1).max() > 1.0


def test_resampled_ramp_shows_the_template_value_at_every_mapped_point():
    template = _scan(_ramp)
    tf = random_transform(2, grid_centre_lps(template), elastic_mm=4.0)
    query, info = resample_query(template, tf)
    assert 0.0 < info["max_displacement_mm"] <= 4.0 + 1e-9
    # same spacing and directions as the template
    np.testing.assert_allclose(query.affine[:3, :3].numpy(), template.affine[:3, :3].numpy(), atol=1e-9)
    # every query voxel x whose template point T(x) lies inside the template holds ramp(T(x))
    shape = np.array(query.shape[1:])
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3).astype(float)
    x = voxel_to_world(idx, query.affine)
    p = tf.query_to_template(x)
    inside = ~points_outside_scan(template, p, tolerance_voxels=-0.01)
    assert inside.mean() > 0.3
    values = query[0].numpy().reshape(-1)
    np.testing.assert_allclose(values[inside], _ramp(p[inside]), atol=0.05)  # float32 trilinear of a ramp
    # more than a voxel outside the template: the template's minimum (air)
    outside = points_outside_scan(template, p, tolerance_voxels=1.01)
    assert outside.any()
    np.testing.assert_allclose(values[outside], float(template.min()), atol=1e-3)
    # the ground truth of template points: the query's value there is the template's value at the point
    points = sample_template_points(template, 150, seed=1, min_value=-1e9, border_mm=8.0)
    truth = tf.template_to_query(points)
    at_query = sample_volume(query[0].as_tensor(), world_to_voxel(truth, query.affine), fill=-1e4)
    np.testing.assert_allclose(at_query, _ramp(points), atol=0.05)


def test_pure_translation_by_whole_voxels_copies_the_template():
    spacing = (2.0, 2.5, 3.0)
    template = _scan(lambda p: np.sin(p[:, 0] / 7.0) * 300 + p[:, 1] * 2.0 + np.cos(p[:, 2] / 5.0) * 50,
                     spacing=spacing, angles_deg=(0.0, 0.0, 0.0), origin_lps=(10.0, -20.0, 30.0))
    shift_vox = np.array([3, -2, 4])
    translation = shift_vox * np.array(spacing)  # LPS axes = voxel axes here
    tf = KnownTransform(grid_centre_lps(template), np.zeros(3), 1.0, translation)
    assert tf.displacement_bound() == 0.0 and tf.describe()["elastic_modes_per_axis"] == 0
    points = sample_template_points(template, 50, seed=0, min_value=-1e9, border_mm=0.0)
    np.testing.assert_allclose(tf.template_to_query(points), points + translation, atol=1e-9)
    affine_lps, shape = query_grid(template, tf)
    query, info = resample_query(template, tf)
    assert info["max_displacement_mm"] == 0.0 and tuple(query.shape[1:]) == tuple(int(n) for n in shape)
    # the template's voxel (0, 0, 0) sits at query voxel `first`; the whole template is copied there
    first = np.rint(world_to_voxel(voxel_to_world(np.zeros((1, 3)), template.affine) + translation, query.affine)[0]).astype(int)
    n = np.array(template.shape[1:])
    block = query[0].numpy()[first[0] : first[0] + n[0], first[1] : first[1] + n[1], first[2] : first[2] + n[2]]
    np.testing.assert_allclose(block, template[0].numpy(), atol=1e-3)


def test_moved_scan_and_mapped_body_points():
    ct = _scan(lambda p: np.where(np.linalg.norm(p - [-10.0, 70.0, 5.0], axis=1) < 30.0, 40.0, -1000.0))
    transform = np.eye(4)
    transform[:3, :3] = rotation_zyx(np.deg2rad([0.0, 170.0, 0.0]))
    transform[:3, 3] = [12.0, -30.0, 5.5]
    query = moved_scan(ct, transform)
    np.testing.assert_array_equal(query.numpy(), ct.numpy())
    points, truth = mapped_body_points(ct, query, transform, 30, seed=0, inside_voxels=2.0)
    assert len(points) == 30
    np.testing.assert_allclose(truth, points @ transform[:3, :3].T + transform[:3, 3], atol=1e-9)
    # a body point (> -300) of the CT, and its image holds the same value in the moved scan
    values = sample_volume(ct[0].as_tensor(), world_to_voxel(points, ct.affine), fill=-1e4)
    moved_values = sample_volume(query[0].as_tensor(), world_to_voxel(truth, query.affine), fill=-1e4)
    assert np.all(values > -300.0)
    np.testing.assert_allclose(moved_values, values, atol=1e-3)
    assert not points_outside_scan(query, truth, tolerance_voxels=-2.0).any()
