"""One embedded scan prepared for matching: its heads, its fine-grid descriptor map and its search index."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from samv2_components.matching.coarse_to_fine import CoarseToFineSearch
from samv2_components.matching.nearest_neighbour import DescriptorMap, descriptor_at_points, query_descriptor_map

__all__ = ["EmbeddedScan"]


class EmbeddedScan:
    """The heads of one scan, ready to be a template (descriptors at points) or a query (searched).

    Preparing a scan costs one pass over its fine grid (descriptor map, cell means); a run that matches one
    template against many queries prepares every scan once.

    Args:
        heads: ``{head: MetaTensor (1, C, d, h, w)}`` as :class:`~samv2_components.inference.SAMv2Inferer`
            returns, each with its grid's affine.
        search_kwargs: keyword arguments of :class:`~samv2_components.matching.coarse_to_fine.CoarseToFineSearch`
            (``cell_size``, ``top_k``, ``margin``...).

    Attributes:
        heads: the input heads.
        map: the :class:`~samv2_components.matching.nearest_neighbour.DescriptorMap` (fine grid, all heads).
        search: the :class:`~samv2_components.matching.coarse_to_fine.CoarseToFineSearch` over :attr:`map`.
    """

    def __init__(self, heads: Mapping[str, torch.Tensor], **search_kwargs):
        self.heads = dict(heads)
        self.map: DescriptorMap = query_descriptor_map(self.heads)
        self.search = CoarseToFineSearch(self.map, **search_kwargs)

    @property
    def head_names(self) -> tuple:
        return self.map.head_names

    @property
    def n_voxels(self) -> int:
        return int(self.map.flat.shape[0])

    def descriptors_at(self, points_lps) -> torch.Tensor:
        """``(N, C_total)`` descriptors of world points ``(N, 3)`` (LPS mm), trilinear on each head's own grid."""
        return descriptor_at_points(self.heads, points_lps)

    def voxel_world(self, linear_index: torch.Tensor) -> np.ndarray:
        """World positions ``(N, 3)`` (LPS mm) of fine-grid voxels given by linear index ``(N,)``."""
        voxels = torch.stack(torch.unravel_index(linear_index.cpu(), self.map.grid_shape), dim=1).double().numpy()
        return self.map.voxel_to_world(voxels)

    def score_at(self, descriptors: torch.Tensor, points_lps) -> np.ndarray:
        """SAMv2 score ``(N,)`` between ``descriptors`` ``(N, C_total)`` and this scan's descriptors at points."""
        here = self.descriptors_at(points_lps).to(descriptors.device)
        return ((descriptors * here).sum(1) / self.map.n_heads).float().cpu().numpy()
