"""Coarse-to-fine NN, fixed-point matching, the robust affine fit and SAMv2Matcher's flags.

Identities that hold for any weights (a scan against itself or an exact translation of itself) use the shared
random-network fixture ``embedded`` (``conftest.py``); the affine fit uses points the test makes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import SHIFT_LPS, body_fine_voxels
from samv2_components.matching import (
    CoarseToFineSearch,
    DescriptorMap,
    EmbeddedScan,
    SAMv2Matcher,
    fit_affine,
    fit_affine_robust,
    fixed_point_match,
    nearest_neighbour_search,
    query_descriptor_map,
)


def _unbatched(heads):
    return {k: v[0] for k, v in heads.items()}


# ------------------------------------------------------------------------------------------- coarse to fine
def test_coarse_to_fine_agrees_with_exhaustive_search(embedded):
    """On real (random-network) embeddings the windows hold the exhaustive maximum for nearly every point, and
    wherever they do not the score found is lower (never higher: the search only looks at real voxels)."""
    template, query = embedded["template"], embedded["shifted"]
    dmap = query_descriptor_map(query)
    descriptors = query_descriptor_map(template).rows(torch.randperm(dmap.n_voxels, generator=torch.Generator().manual_seed(0))[:300])
    exact_vox, exact_score = nearest_neighbour_search(descriptors, dmap, subvoxel=False)
    search = CoarseToFineSearch(dmap, cell_size=(2, 4, 4), top_k=4, margin=(1, 1, 1))
    assert not search.exhaustive
    vox, score = search.search(descriptors, subvoxel=False)
    same = np.all(np.abs(vox - exact_vox) < 1e-9, axis=1)
    assert same.mean() >= 0.9
    np.testing.assert_allclose(score[same], exact_score[same], atol=1e-5)
    assert np.all(score <= exact_score + 1e-5)


def test_coarse_to_fine_windows_cover_the_grid_exactly():
    """Every fine voxel lies in the window of the cell whose footprint holds it (no gaps at the borders)."""
    shape = (6, 21, 19)
    flat = torch.nn.functional.normalize(torch.randn(int(np.prod(shape)), 8), dim=1)
    dmap = DescriptorMap([flat], shape, np.eye(4), "LPS", ("fine",))
    search = CoarseToFineSearch(dmap, cell_size=(2, 4, 4), top_k=1, margin=0)
    starts, windows = search._window_indices(torch.arange(int(np.prod(search.cell_grid_shape))))
    assert torch.unique(windows).numel() == flat.shape[0]
    np.testing.assert_array_equal(windows[:, 0].numpy(), np.ravel_multi_index(starts.numpy().T, shape))


def test_coarse_to_fine_exhaustive_when_windows_cover_everything(embedded):
    dmap = query_descriptor_map(embedded["template"])
    search = CoarseToFineSearch(dmap, cell_size=(2, 8, 8), top_k=10_000)
    assert search.exhaustive
    descriptors = dmap.rows(torch.arange(50))
    index, score = search.search_indices(descriptors)
    np.testing.assert_array_equal(index.numpy(), np.arange(50))  # every voxel is its own best match
    # a float16 map's rows are unit length to float16 rounding (2**-11 relative per channel)
    np.testing.assert_allclose(score.numpy(), 1.0, atol=5e-4)


def test_coarse_to_fine_rejects_bad_settings(embedded):
    dmap = query_descriptor_map(embedded["template"])
    for kwargs in ({"cell_size": (0, 4, 4)}, {"top_k": 0}, {"margin": -1}, {"cell_dtype": "float16"}):
        with pytest.raises(ValueError):
            CoarseToFineSearch(dmap, **kwargs)
    with pytest.raises(ValueError, match="descriptors must be"):
        CoarseToFineSearch(dmap).search_indices(torch.zeros(3, 5))


# ------------------------------------------------------------------------------------------------ fixed point
def test_fixed_point_recovers_an_exact_translation(embedded):
    """Against an exact translated copy every start is a fixed point at once, and the affine maps every template
    point (also off the grid) by exactly the shift."""
    template, shifted = EmbeddedScan(_unbatched(embedded["template"])), EmbeddedScan(_unbatched(embedded["shifted"]))
    _, points, dmap = body_fine_voxels(embedded["template"], embedded["template_path"], 20, seed=3)
    points = points + np.random.default_rng(0).uniform(-1.5, 1.5, points.shape)  # off the voxel centres
    result = fixed_point_match(template, shifted, points, subvoxel=False, max_distance_mm=20.0, min_score=-1.0)
    assert np.all(result.n_fixed_points >= 4)
    np.testing.assert_allclose(result.points_lps, points + SHIFT_LPS, atol=1e-4)
    np.testing.assert_allclose(result.residual_mm, 0.0, atol=1e-6)
    assert np.all(result.n_converged > 0)


def test_fixed_points_are_mutual_nearest_neighbours(embedded):
    """A converged start s satisfies B(F(s)) == s: check the kept pairs with the exhaustive search."""
    t, q = _unbatched(embedded["template"]), _unbatched(embedded["shifted"])
    template, query = EmbeddedScan(t, top_k=10_000), EmbeddedScan(q, top_k=10_000)  # exhaustive: exact F and B
    _, points, _ = body_fine_voxels(embedded["template"], embedded["template_path"], 5, seed=4)
    from samv2_components.matching.fixed_point import _MemoisedNN, _start_voxels

    forward, backward = _MemoisedNN(template, query), _MemoisedNN(query, template)
    starts, _ = _start_voxels(template, points, 3, 1)
    matched = forward(starts)
    back = backward(matched)
    fixed = starts[back == starts]
    assert len(fixed) > 0
    f_vox, _ = nearest_neighbour_search(template.map.rows(fixed), query.map, subvoxel=False)
    b_vox, _ = nearest_neighbour_search(query.map.rows(forward(fixed)), template.map, subvoxel=False)
    grid = np.stack(np.unravel_index(fixed.numpy(), template.map.grid_shape), 1)
    np.testing.assert_array_equal(b_vox.astype(int), grid)
    np.testing.assert_array_equal(np.ravel_multi_index(f_vox.astype(int).T, query.map.grid_shape), forward(fixed).numpy())


def test_fixed_point_without_enough_points_falls_back_and_is_flagged(embedded):
    template, shifted = _unbatched(embedded["template"]), _unbatched(embedded["shifted"])
    _, points, _ = body_fine_voxels(embedded["template"], embedded["template_path"], 6, seed=5)
    matcher = SAMv2Matcher(min_fixed_points=10_000, min_confident_score=-1.0)
    result = matcher.match(template, shifted, points)
    assert result.methods == ["nearest_neighbour_fallback"] * 6
    assert not result.confident.any()  # a failed consistency test is never a confident answer
    np.testing.assert_allclose(result.points_lps, result.nn_points_lps)
    columns = result.columns()
    assert columns["method"] == result.methods and columns["residual_mm"] == [None] * 6


def test_matcher_scores_and_flags(embedded):
    template, shifted = _unbatched(embedded["template"]), _unbatched(embedded["shifted"])
    _, points, _ = body_fine_voxels(embedded["template"], embedded["template_path"], 15, seed=6)
    result = SAMv2Matcher(subvoxel=False, max_distance_mm=20.0, min_fixed_point_score=-1.0).match(template, shifted, points)
    assert set(result.methods) == {"fixed_point"}
    np.testing.assert_allclose(result.points_lps, points + SHIFT_LPS, atol=1e-4)
    # the score at an exact correspondence of a voxel centre is the self-similarity, 1
    np.testing.assert_allclose(result.scores, 1.0, atol=1e-4)
    assert result.confident.all()
    strict = SAMv2Matcher(subvoxel=False, max_distance_mm=20.0, min_confident_score=1.01).match(template, shifted, points)
    assert not strict.confident.any()
    with pytest.raises(ValueError, match="method"):
        SAMv2Matcher(method="closest")


# -------------------------------------------------------------------------------------------------- affine fit
def _known_affine():
    rng = np.random.default_rng(0)
    linear = np.array([[1.05, 0.1, 0.0], [-0.08, 0.97, 0.05], [0.02, 0.0, 1.1]])
    shift = np.array([5.0, -3.0, 12.0])
    src = rng.uniform(-10, 10, (40, 3))
    return src, src @ linear.T + shift, linear, shift


def test_affine_fit_recovers_a_known_affine():
    src, dst, linear, shift = _known_affine()
    fit = fit_affine(src, dst, ridge=0.0)
    np.testing.assert_allclose(fit.matrix[:3, :3], linear, atol=1e-9)
    np.testing.assert_allclose(fit.matrix[:3, 3], shift, atol=1e-9)


def test_robust_fit_rejects_outliers():
    src, dst, linear, shift = _known_affine()
    dst = dst.copy()
    dst[:6] += np.array([30.0, -25.0, 40.0])  # 15 % gross outliers
    robust = fit_affine_robust(src, dst, inlier_threshold_mm=1.0, ridge=0.0)
    assert not robust.inliers[:6].any() and robust.inliers[6:].all()
    assert robust.rms_residual_mm < 1e-6
    np.testing.assert_allclose(robust.transform(np.zeros((1, 3)))[0], shift, atol=1e-6)
    # the default weak ridge (towards an identity linear part) costs well under 0.1 mm here
    assert fit_affine_robust(src, dst, inlier_threshold_mm=1.0).rms_residual_mm < 0.1
    plain = fit_affine(src, dst, ridge=0.0)
    assert np.linalg.norm(plain(np.zeros((1, 3)))[0] - shift) > 3.0  # what the trimming protects against


def test_degenerate_points_give_the_mean_translation():
    """Coplanar (or single) points cannot fix an affine: the ridge pulls the linear part to the identity."""
    src = np.array([[0.0, 0.0, 0.0], [4.0, 0.0, 0.0], [0.0, 4.0, 0.0], [4.0, 4.0, 0.0]])
    moved = src + [1.0, 2.0, 3.0]
    fit = fit_affine(src, moved)
    np.testing.assert_allclose(fit(np.array([[2.0, 2.0, 5.0]])), [[3.0, 4.0, 8.0]], atol=1e-6)
    single = fit_affine(src[:1], moved[:1])
    np.testing.assert_allclose(single(np.array([[10.0, 0.0, 0.0]])), [[11.0, 2.0, 3.0]], atol=1e-6)
    with pytest.raises(ValueError):
        fit_affine(src, moved[:2])


@pytest.mark.parametrize("shape", [(13, 21, 19), (8, 32, 24)])
@pytest.mark.parametrize("kernel,stride", [((3, 5, 5), (2, 4, 4)), ((5, 5, 5), (4, 4, 4))])
def test_cell_sums_equal_torch_pooling(shape, kernel, stride):
    """The cell stage's box sums equal avg_pool3d (ceil mode, zero padding) sums, windows at the ends included."""
    from samv2_components.matching.coarse_to_fine import _box_sums

    x = torch.randn(*shape, 4, generator=torch.Generator().manual_seed(0))
    reference = torch.nn.functional.avg_pool3d(
        x.permute(3, 0, 1, 2)[None], kernel, stride, tuple(k // 2 for k in kernel), ceil_mode=True, divisor_override=1
    )[0].permute(1, 2, 3, 0)
    sums = x
    for axis, (k, s) in enumerate(zip(kernel, stride)):
        sums = _box_sums(sums, axis, k, s)
    assert sums.shape == reference.shape
    torch.testing.assert_close(sums, reference, atol=1e-4, rtol=1e-5)
    # the search's own path: in-plane a few depth planes at a time (13 planes: two blocks), then depth; float16 maps
    # are summed in float32
    for dtype in (torch.float32, torch.float16):
        flat = x.reshape(-1, 4).to(dtype)
        exact = torch.nn.functional.avg_pool3d(  # of the values as stored
            flat.float().view(*shape, 4).permute(3, 0, 1, 2)[None], kernel, stride, tuple(k // 2 for k in kernel),
            ceil_mode=True, divisor_override=1)[0].permute(1, 2, 3, 0)
        dmap = DescriptorMap([flat], shape, np.eye(4), "LPS", ("fine",))
        search = CoarseToFineSearch(dmap, cell_size=stride, top_k=1, margin=0)
        assert search._kernel == tuple(kernel)
        cell_sums = search._cell_sums(lambda start, stop: flat.view(*shape, 4)[start:stop], shape[0])
        assert cell_sums.dtype == torch.float32
        torch.testing.assert_close(cell_sums, exact, atol=1e-4, rtol=1e-5)


def test_float16_map_finds_what_a_float32_map_finds(embedded):
    """The bundles' float16 maps (half the memory) are searched in float32: the same voxels as a float32 map of the
    same heads, but for near-ties, and scores within float16 rounding."""
    template = query_descriptor_map(embedded["template"])
    query16 = query_descriptor_map(embedded["shifted"])
    query32 = query_descriptor_map({k: v.float() for k, v in embedded["shifted"].items()})
    assert query16.dtype == torch.float16 and query32.dtype == torch.float32
    descriptors = template.rows(torch.randperm(template.n_voxels, generator=torch.Generator().manual_seed(1))[:300])
    found = []
    for dmap in (query16, query32):
        search = CoarseToFineSearch(dmap, cell_size=(2, 4, 4), top_k=4, margin=(1, 1, 1))
        found.append(search.search_indices(descriptors))
    same = (found[0][0] == found[1][0]).numpy()
    assert same.mean() >= 0.97
    np.testing.assert_allclose(found[0][1].numpy()[same], found[1][1].numpy()[same], atol=1e-3)
    assert np.abs(found[0][1].numpy() - found[1][1].numpy()).max() < 5e-3  # a near-tie elsewhere, not a worse voxel
    exhaustive = [nearest_neighbour_search(descriptors, dmap, subvoxel=True) for dmap in (query16, query32)]
    assert np.mean(np.all(np.abs(exhaustive[0][0] - exhaustive[1][0]) < 0.05, axis=1)) >= 0.97
