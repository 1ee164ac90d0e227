"""NN matching (:mod:`samv2_components.matching`), the known-transform benchmark's transform generator
(:mod:`samv2_components.transforms.known_transform`, used by ``scripts/evaluate_known_transform.py``) and the point
metrics (:mod:`samv2_components.metrics`).

Matching identities hold for any weights, so a small random network (width 0.25) on a small real crop of the
sample CT is enough: a scan matched against itself, or against an exact translated copy, must find every point.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from samv2_components.geometry import convert_affine, voxel_to_world, world_to_voxel
from samv2_components.inference import SAMv2Inferer
from samv2_components.io.image import load_scan
from samv2_components.matching import (
    descriptor_at_points,
    match_nearest_neighbour,
    present_heads,
    query_descriptor_map,
)
from samv2_components.matching.coarse_head import CoarseHeadOnFineGrid
from samv2_components.metrics import (
    cpm,
    error_percentile,
    euclidean_errors,
    mean_euclidean_distance,
    per_axis_errors,
    point_errors,
    summarize_errors,
)
from samv2_components.networks import SAMv2Net
from samv2_components.sample_data import sample_path
from samv2_components.transforms import known_transform as ekt

from helpers import SHIFT_LPS, body_fine_voxels


def _fine_spacing(dmap):
    return np.linalg.norm(dmap.affine[:3, :3], axis=0)


def test_self_match_returns_each_point(embedded):
    heads = embedded["template"]
    _, points, dmap = body_fine_voxels(heads, embedded["template_path"], 60)
    half = _fine_spacing(dmap).max() / 2  # axes of the fine grid are the LPS axes here (axis-aligned scan)
    for subvoxel in (False, True):
        matched, scores = match_nearest_neighbour(heads, heads, points, batch_size=16, subvoxel=subvoxel)
        assert matched.shape == (60, 3) and scores.shape == (60,)
        np.testing.assert_allclose(scores, 1.0, atol=1e-4)
        tol = 1e-4 if not subvoxel else half
        assert np.abs(matched - points).max() <= tol, np.abs(matched - points).max()


def test_self_match_off_grid_points(embedded):
    """Points between fine voxel centres: an interpolated descriptor need not score highest at the nearest voxel
    (random weights: about 90% do), so this checks the typical case and that sub-voxel refinement helps."""
    heads = embedded["template"]
    _, points, dmap = body_fine_voxels(heads, embedded["template_path"], 100, seed=1)
    voxel = _fine_spacing(dmap).max()
    points = points + np.random.default_rng(2).uniform(-0.45, 0.45, points.shape) * voxel
    refined, scores = match_nearest_neighbour(heads, heads, points)
    rounded, _ = match_nearest_neighbour(heads, heads, points, subvoxel=False)
    assert np.all(scores > 0.9) and np.all(scores <= 1.0 + 1e-5)
    err_refined, err_rounded = np.abs(refined - points), np.abs(rounded - points)
    assert np.mean(np.all(err_refined <= voxel / 2, axis=1)) >= 0.8
    assert err_refined.max() <= 2 * voxel
    assert err_refined.mean() < 0.8 * err_rounded.mean()


def test_translated_scan_matches_shift_exactly(embedded):
    """Same array, origin moved by (8, -12, 4) mm LPS: every match moves by exactly that translation."""
    _, points, dmap = body_fine_voxels(embedded["template"], embedded["template_path"], 50)
    for subvoxel, tol in ((False, 1e-3), (True, _fine_spacing(dmap).max() / 2)):
        matched, scores = match_nearest_neighbour(embedded["template"], embedded["shifted"], points, subvoxel=subvoxel)
        np.testing.assert_allclose(scores, 1.0, atol=1e-4)
        assert np.abs(matched - points - SHIFT_LPS).max() <= tol


def test_descriptor_at_voxel_centre_equals_map_column(embedded):
    heads = embedded["template"]
    dmap = query_descriptor_map(heads)
    assert dmap.head_names == ("fine", "coarse", "semantic") and dmap.n_heads == 3
    assert dmap.n_channels == 384 and dmap.grid_shape == tuple(heads["fine"].shape[2:])
    rng = np.random.default_rng(0)
    idx = np.stack([rng.integers(0, s, 25) for s in dmap.grid_shape], axis=1)
    idx[0] = 0
    idx[1] = np.array(dmap.grid_shape) - 1  # corners: the coarse head is clamped at its border on both sides
    desc = descriptor_at_points(heads, dmap.voxel_to_world(idx))
    # the inferer's float16 heads give a float16 map (half the memory): equal up to float16 rounding, 2**-11 relative
    # (the coarse head is computed in float32 from its float16 grid)
    assert heads["fine"].dtype == dmap.dtype == torch.float16
    columns = torch.cat([dmap.head_planes(h, 0, dmap.grid_shape[0])[idx[:, 0], idx[:, 1], idx[:, 2]]
                         for h in range(dmap.n_heads)], dim=1).float()
    torch.testing.assert_close(desc, columns, atol=2e-5, rtol=2.0**-10)
    linear = torch.as_tensor(np.ravel_multi_index(idx.T, dmap.grid_shape))
    torch.testing.assert_close(dmap.rows(linear), columns)
    torch.testing.assert_close(torch.stack([dmap.row_range(int(i), int(i) + 1)[0] for i in linear]), columns)
    # every head's part of a descriptor is unit length
    np.testing.assert_allclose(desc.view(25, 3, 128).norm(dim=2).numpy(), 1.0, atol=1e-5)


def test_descriptor_map_uses_unit_fine_grid_heads_in_place(embedded):
    """The inferer's channels-last unit heads become the map's blocks without a copy (0.55 GB of a large CT's map);
    a head that is not unit length is copied and normalised, and the caller's head is left as it was."""
    heads = embedded["template"]
    dmap = query_descriptor_map(heads)
    for name in ("fine", "semantic"):
        block = dmap.blocks[dmap.head_names.index(name)].data
        assert block.untyped_storage().data_ptr() == heads[name].untyped_storage().data_ptr()
    # the coarse head is not stored upsampled: its own grid (32 times smaller) and one inverse length per fine voxel
    coarse = dmap.blocks[dmap.head_names.index("coarse")]
    assert isinstance(coarse, CoarseHeadOnFineGrid)
    assert coarse.nbytes < dmap.n_voxels * 128 * 2 / 8

    scaled = dict(heads, fine=heads["fine"] * 2)  # same layout and type, twice unit length
    before = scaled["fine"].clone()
    block = query_descriptor_map(scaled).blocks[0].data
    assert block.untyped_storage().data_ptr() != scaled["fine"].untyped_storage().data_ptr()
    torch.testing.assert_close(block.float(), dmap.blocks[0].data.float(), atol=1e-3, rtol=0)
    np.testing.assert_allclose(block.float().norm(dim=1).numpy(), 1.0, atol=1e-3)
    assert torch.equal(scaled["fine"], before)


def test_descriptor_map_matches_network_forward():
    """The map's channels are those of ``SAMv2Net.forward`` (coarse upsampled and re-normalised)."""
    torch.manual_seed(0)
    net = SAMv2Net(width=0.25).eval()
    x = torch.randn(1, 1, 16, 64, 64) * 50
    affine = torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0], dtype=torch.float64))
    image = MetaTensor(x, affine=affine, meta={"space": "RAS"})
    heads = SAMv2Inferer(bf16=False, channels_last=False, output_dtype="float32")(image, net)
    with torch.no_grad():
        expected = net(x)[0]
    dmap = query_descriptor_map(heads)
    volumes = [dmap.head_planes(h, 0, dmap.grid_shape[0]) for h in range(dmap.n_heads)]
    torch.testing.assert_close(torch.cat([v.permute(3, 0, 1, 2) for v in volumes]), expected, atol=1e-4, rtol=0)
    # and every voxel's row, read one by one or as a range, is the network's channel vector
    rows = dmap.row_range(0, dmap.n_voxels)
    torch.testing.assert_close(rows.T.reshape(expected.shape), expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(dmap.rows(torch.arange(dmap.n_voxels)), rows, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------- sub-voxel fit
def _smooth_heads(shape=(12, 14, 16), rate=0.35):
    """A synthetic fine head whose cosine to a shifted copy is (cos(a di) + cos(a dj) + cos(a dk)) / 3."""
    idx = [torch.arange(n, dtype=torch.float64) * rate for n in shape]
    ii, jj, kk = torch.meshgrid(*idx, indexing="ij")
    emb = torch.zeros(128, *shape, dtype=torch.float64)
    for c, angle in enumerate((ii, jj, kk)):
        emb[2 * c], emb[2 * c + 1] = torch.cos(angle), torch.sin(angle)
    emb = (emb / math.sqrt(3)).float()
    affine = torch.tensor([[0, 0, -4.0, 50], [0, 4.0, 0, -20], [4.0, 0, 0, 10], [0, 0, 0, 1]], dtype=torch.float64)
    return {"fine": MetaTensor(emb[None], affine=affine, meta={"space": "RAS"})}


def test_subvoxel_refinement_recovers_fractional_positions():
    heads = _smooth_heads()
    rng = np.random.default_rng(0)
    voxels = np.stack([rng.uniform(2, n - 3, 30) for n in (12, 14, 16)], axis=1)
    points = voxel_to_world(voxels, heads["fine"].affine)
    refined, _ = match_nearest_neighbour(heads, heads, points, subvoxel=True)
    rounded, _ = match_nearest_neighbour(heads, heads, points, subvoxel=False)
    err_refined = np.abs(world_to_voxel(refined, heads["fine"].affine) - voxels)
    err_rounded = np.abs(world_to_voxel(rounded, heads["fine"].affine) - voxels)
    np.testing.assert_allclose(err_rounded, np.abs(voxels - np.rint(voxels)), atol=1e-4)  # plain NN: nearest voxel
    assert err_refined.max() < 0.06 and err_refined.mean() < 0.25 * err_rounded.mean()


def test_heads_must_agree():
    heads = _smooth_heads()
    with pytest.raises(ValueError, match="differ"):
        match_nearest_neighbour(heads, {**heads, "semantic": heads["fine"]}, np.zeros((1, 3)))
    with pytest.raises(ValueError, match="fine"):
        present_heads({"coarse": heads["fine"]})


# -------------------------------------------------------------------------------------------- the transform
def test_transform_and_inverse_compose_to_identity():
    tf = ekt.random_transform(3, centre=[10.0, -40.0, 200.0])
    assert tf.lipschitz_bound() < 0.9 and tf.displacement_bound() <= 5.0 + 1e-9
    info = tf.describe()
    assert all(abs(a) <= 10 for a in info["rotation_deg_xyz"]) and 0.9 <= info["scale"] <= 1.1
    assert all(abs(t) <= 20 for t in info["translation_mm_lps"])
    p = np.random.default_rng(0).uniform(-150, 150, (500, 3)) + tf.centre
    gt = tf.template_to_query(p)
    assert np.abs(tf.query_to_template(gt) - p).max() < 0.05
    x = np.random.default_rng(1).uniform(-150, 150, (500, 3)) + tf.centre
    assert np.abs(tf.template_to_query(tf.query_to_template(x)) - x).max() < 0.05
    # the affine part alone is inverted exactly, and the displacement really is elastic (non-zero, bounded)
    np.testing.assert_allclose(tf.affine_inverse(tf.affine_forward(p)), p, atol=1e-9)
    u = np.linalg.norm(tf.displacement(x), axis=1)
    assert 0.5 < u.max() <= 5.0


def _smooth_volume(points_lps):
    """A smooth synthetic intensity field of world (LPS) position."""
    x, y, z = points_lps.T
    return 300 * np.sin(x / 23.0) * np.cos(y / 31.0) + 200 * np.cos(z / 17.0 + 0.3) + 0.002 * (x - y) ** 2


def test_ground_truth_lands_on_the_same_intensity(tmp_path):
    # an oblique, anisotropic template grid with flipped axes (RAS affine), filled with the smooth field
    rot = ekt.rotation_zyx(np.deg2rad([5.0, -8.0, 12.0]))
    affine_lps = np.eye(4)
    affine_lps[:3, :3] = rot @ np.diag([2.5, 3.0, 3.5])
    affine_lps[:3, 3] = [-60.0, 40.0, -30.0]
    shape = (48, 44, 36)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3).astype(float)
    values = _smooth_volume(voxel_to_world(idx, affine_lps, affine_space="LPS")).reshape(shape)
    template = MetaTensor(
        torch.as_tensor(values, dtype=torch.float32)[None],
        affine=torch.as_tensor(convert_affine(affine_lps, "LPS", "RAS")),
        meta={"space": "RAS"},
    )
    tf = ekt.random_transform(7, ekt.grid_centre_lps(template))
    query, info = ekt.resample_query(template, tf)
    assert 0 < info["max_displacement_mm"] <= 5.0

    # the query is stored and read back through ITK with the same geometry
    reread = load_scan(ekt.save_nifti(query, str(tmp_path / "q.nii")))
    np.testing.assert_allclose(reread.affine.numpy(), query.affine.numpy(), atol=1e-4)
    np.testing.assert_allclose(reread.numpy(), query.numpy(), atol=1e-3)
    # it covers the whole transformed template
    corners = np.array(list(itertools.product(*[(0, n - 1) for n in shape])), dtype=float)
    inside = world_to_voxel(tf.template_to_query(voxel_to_world(corners, template.affine)), query.affine)
    assert np.all(inside >= 0) and np.all(inside <= np.array(query.shape[1:]) - 1)

    points = ekt.sample_template_points(template, 200, seed=0, min_value=-1e9, border_mm=10.0)
    truth = tf.template_to_query(points)
    at_template = ekt.sample_volume(template[0].as_tensor(), world_to_voxel(points, template.affine), fill=0.0)
    at_query = ekt.sample_volume(query[0].as_tensor(), world_to_voxel(truth, query.affine), fill=0.0)
    span = values.max() - values.min()
    # two trilinear interpolations of a field smooth on the voxel scale: a fraction of a percent of its range
    assert np.abs(at_query - at_template).max() < 0.01 * span
    # and a wrong correspondence (ignoring the elastic part) would not be
    wrong = tf.affine_forward(points)
    at_wrong = ekt.sample_volume(query[0].as_tensor(), world_to_voxel(wrong, query.affine), fill=0.0)
    assert np.abs(at_wrong - at_template).max() > 3 * np.abs(at_query - at_template).max()


def test_template_points_respect_body_and_border():
    scan = load_scan(sample_path("ct_abdomen"))
    pts = ekt.sample_template_points(scan, 100, seed=0)
    assert pts.shape == (100, 3)
    np.testing.assert_array_equal(pts, ekt.sample_template_points(scan, 100, seed=0))  # seeded
    vox = world_to_voxel(pts, scan.affine)
    np.testing.assert_allclose(vox, np.rint(vox), atol=1e-6)
    vox = np.rint(vox).astype(int)
    assert np.all(scan[0].numpy()[vox[:, 0], vox[:, 1], vox[:, 2]] > -300)
    spacing = np.linalg.norm(scan.affine.numpy()[:3, :3], axis=0)
    assert np.all(vox * spacing >= 10) and np.all((np.array(scan.shape[1:]) - 1 - vox) * spacing >= 10)


# ------------------------------------------------------------------------------------------------- metrics
def test_metrics_by_hand():
    truth = np.array([[0.0, 0.0, 0.0], [10.0, 10.0, 10.0], [-5.0, 2.0, 1.0], [1.0, 1.0, 1.0]])
    errors = np.array([[3.0, -4.0, 0.0], [0.0, 0.0, 12.0], [-1.0, 2.0, -2.0], [6.0, 8.0, 0.0]])  # |e| = 5, 12, 3, 10
    pred = truth + errors
    np.testing.assert_allclose(point_errors(pred, truth), errors)
    np.testing.assert_allclose(euclidean_errors(pred, truth), [5, 12, 3, 10])
    assert mean_euclidean_distance(pred, truth) == pytest.approx(7.5)
    np.testing.assert_allclose(per_axis_errors(pred, truth), [2.5, 3.5, 3.5])
    assert cpm(pred, truth) == pytest.approx(75.0)  # 10 mm exactly counts
    assert cpm(pred, truth, radius_mm=4.0) == pytest.approx(25.0)
    assert error_percentile(pred, truth, 90) == pytest.approx(11.4)  # sorted 3, 5, 10, 12: 10 + 0.7 * 2
    summary = summarize_errors(torch.as_tensor(pred), truth)
    assert summary["n"] == 4 and summary["median"] == pytest.approx(7.5) and summary["max"] == pytest.approx(12.0)
    assert summary["p90"] == pytest.approx(11.4) and summary["cpm"] == pytest.approx(75.0)
    with pytest.raises(ValueError):
        point_errors(pred[:3], truth)


@pytest.mark.parametrize("shape", [(4, 5, 6, 7), (3, 1, 4, 5), (5, 9, 8, 2)])
def test_trilinear_sampling_equals_grid_sample_with_border_values(shape):
    """Descriptors at points read 8 neighbours per point (no float32 copy of a float16 map); the values are those of
    grid_sample (align_corners=True, border padding), inside, on the last voxel centre and beyond the grid."""
    from samv2_components.geometry import voxel_to_grid_sample
    from samv2_components.matching.nearest_neighbour import _sample_trilinear

    volume = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    voxels = np.random.default_rng(0).uniform(-2, np.array(shape[1:]) + 1, (60, 3))
    voxels[:3] = np.array(shape[1:]) - 1
    voxels[3:6] = 0
    grid = torch.as_tensor(voxel_to_grid_sample(voxels, shape[1:], align_corners=True), dtype=torch.float32)
    expected = torch.nn.functional.grid_sample(volume[None], grid.view(1, 1, 1, -1, 3), mode="bilinear",
                                               padding_mode="border", align_corners=True).view(shape[0], -1).T
    torch.testing.assert_close(_sample_trilinear(volume, voxels), expected, atol=1e-5, rtol=0)
    half = _sample_trilinear(volume.half(), voxels)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, expected, atol=2e-3, rtol=0)
    # the inferer's channels-last layout (rows gathered whole) gives the same numbers bit for bit
    channels_last = volume[None].contiguous(memory_format=torch.channels_last_3d)[0]
    assert channels_last.permute(1, 2, 3, 0).is_contiguous() and not volume.permute(1, 2, 3, 0).is_contiguous()
    assert torch.equal(_sample_trilinear(channels_last, voxels), _sample_trilinear(volume, voxels))
