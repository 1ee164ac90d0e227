"""The coarse head read on the fine grid on demand equals the head upsampled and normalised (SAMv2Net.forward)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from samv2_components.matching import DescriptorMap
from samv2_components.matching.coarse_head import CoarseHeadOnFineGrid
from samv2_components.matching.coarse_to_fine import CoarseToFineSearch
from samv2_components.networks import HEAD_GRIDS, upsample_to_fine_grid

#: fine stride / coarse stride of the network's grids, (0.5, 0.125, 0.125)
RATIOS = [f / c for f, c in zip(HEAD_GRIDS["fine"][0], HEAD_GRIDS["coarse"][0])]

# (coarse grid, fine grid): fine grids reaching beyond the last coarse voxel (border values), the network's own pair of
# sizes (10 x 24 x 24 from a 20 x 48 x 48 input) and axes of a single coarse voxel
SHAPES = [((3, 4, 5), (6, 30, 37)), ((1, 2, 1), (2, 12, 5)), ((5, 3, 3), (10, 24, 24))]


def _reference(coarse: torch.Tensor, fine_shape) -> torch.Tensor:
    """``(n_fine, C)``: upsampled by the network's function, normalised, voxel-major."""
    up = upsample_to_fine_grid(coarse[None], list(fine_shape), RATIOS)[0]
    return F.normalize(up, dim=0).permute(1, 2, 3, 0).reshape(-1, coarse.shape[0])


def _case(coarse_shape, fine_shape, channels=16, seed=0):
    coarse = torch.randn(channels, *coarse_shape, generator=torch.Generator().manual_seed(seed))
    return CoarseHeadOnFineGrid(coarse, fine_shape, RATIOS), _reference(coarse, fine_shape)


@pytest.mark.parametrize("coarse_shape,fine_shape", SHAPES)
def test_rows_planes_and_scores_equal_the_upsampled_head(coarse_shape, fine_shape):
    head, reference = _case(coarse_shape, fine_shape)
    assert head.n_rows == reference.shape[0]
    index = torch.randperm(head.n_rows, generator=torch.Generator().manual_seed(1))[:300]
    torch.testing.assert_close(head.rows(index), reference[index], atol=1e-6, rtol=0)
    torch.testing.assert_close(head.row_range(3, head.n_rows - 2), reference[3:-2], atol=1e-6, rtol=0)
    stop = min(4, fine_shape[0])
    torch.testing.assert_close(head.planes(1, stop), reference.view(*fine_shape, -1)[1:stop], atol=1e-6, rtol=0)
    up = upsample_to_fine_grid(head.table.T.reshape(-1, *coarse_shape)[None], list(fine_shape), RATIOS)[0]
    torch.testing.assert_close(head.inverse_length, 1 / up.norm(dim=0).reshape(-1), atol=0, rtol=1e-5)
    descriptor = F.normalize(torch.randn(16, generator=torch.Generator().manual_seed(2)), dim=0)
    torch.testing.assert_close(head.scores(descriptor), reference @ descriptor, atol=1e-6, rtol=0)


@pytest.mark.parametrize("coarse_shape,fine_shape", SHAPES)
def test_window_scores_equal_the_dot_products_of_the_windows_rows(coarse_shape, fine_shape):
    """Scored on the coarse box under each window and interpolated: windows everywhere, at both borders too."""
    head, reference = _case(coarse_shape, fine_shape)
    size = tuple(min(n, w) for n, w in zip(fine_shape, (5, 13, 13)))
    generator = torch.Generator().manual_seed(3)
    starts = torch.stack([torch.randint(0, n - w + 1, (30,), generator=generator) for n, w in zip(fine_shape, size)], 1)
    starts[0] = 0
    starts[1] = torch.tensor(fine_shape) - torch.tensor(size)
    strides = torch.tensor([fine_shape[1] * fine_shape[2], fine_shape[2], 1])
    offsets = [torch.arange(w) * s for w, s in zip(size, strides)]
    window_index = (starts * strides).sum(1)[:, None] + (
        offsets[0][:, None, None] + offsets[1][None, :, None] + offsets[2][None, None, :]).reshape(1, -1)
    descriptors = torch.randn(30, 4, 16, generator=generator)
    scores = head.window_scores(descriptors, starts, window_index, size)
    expected = torch.bmm(descriptors, reference[window_index].transpose(1, 2))
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=0)


def test_search_equals_a_map_with_the_coarse_head_stored():
    """The coarse-to-fine search (cell sums from the computed planes, windows scored on the coarse boxes) finds
    what it finds on a map holding the upsampled coarse rows; the on-demand head holds a fraction of the memory."""
    fine_shape, coarse_shape = (12, 48, 40), (6, 6, 5)
    generator = torch.Generator().manual_seed(4)
    # smooth fields, so that neighbouring voxels look alike as in a real map
    fine = F.normalize(F.interpolate(torch.randn(1, 8, 6, 12, 10, generator=generator), size=fine_shape,
                                     mode="trilinear")[0], dim=0).permute(1, 2, 3, 0).reshape(-1, 8)
    coarse = torch.randn(8, *coarse_shape, generator=generator)
    computed = CoarseHeadOnFineGrid(coarse, fine_shape, RATIOS)
    stored = _reference(coarse, fine_shape)
    assert computed.nbytes * 4 < stored.numel() * stored.element_size()
    maps = [DescriptorMap([fine, block], fine_shape, np.eye(4), "LPS", ("fine", "coarse")) for block in (computed, stored)]
    descriptors = maps[1].rows(torch.randperm(maps[1].n_voxels, generator=generator)[:200])
    descriptors += 0.05 * torch.randn(descriptors.shape, generator=generator)
    found = [CoarseToFineSearch(m, cell_size=(2, 8, 8), top_k=2, margin=(1, 2, 2)).search_indices(descriptors)
             for m in maps]
    np.testing.assert_array_equal(found[0][0].numpy(), found[1][0].numpy())
    torch.testing.assert_close(found[0][1], found[1][1], atol=1e-5, rtol=0)
    torch.testing.assert_close(maps[0].scores(descriptors[0]), maps[1].scores(descriptors[0]), atol=1e-5, rtol=0)


def test_bad_coarse_head_is_refused():
    with pytest.raises(ValueError, match="must be"):
        CoarseHeadOnFineGrid(torch.zeros(4, 3, 3), (4, 8, 8), RATIOS)
    with pytest.raises(ValueError, match="block per head"):
        DescriptorMap([CoarseHeadOnFineGrid(torch.randn(4, 2, 2, 2), (4, 8, 8), RATIOS)], (4, 8, 8), np.eye(4), "LPS",
                      ("coarse",))
