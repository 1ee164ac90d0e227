"""One embedded scan prepared for matching: its heads, its fine-grid descriptor map and its search index."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from samv2_components.matching.coarse_to_fine import CoarseToFineSearch
from samv2_components.matching.nearest_neighbour import (
    DescriptorMap,
    descriptor_at_points,
    grid_voxels,
    query_descriptor_map,
    subvoxel_offsets,
)

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
        return self.map.n_voxels

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

    def search_within(
        self, descriptors: torch.Tensor, centres_lps, radius_mm: float, subvoxel: bool = True, exclude_mm: float = 0.0
    ) -> tuple[np.ndarray, np.ndarray]:
        """Nearest neighbour of each descriptor among the fine voxels within ``radius_mm`` of its own centre (and,
        with ``exclude_mm`` > 0, farther than ``exclude_mm`` from it: the best match elsewhere than an answer).

        Args:
            descriptors: ``(N, C_total)`` template descriptors.
            centres_lps: ``(N, 3)`` where each answer is expected (world LPS mm), e.g. a global map's prediction.
            radius_mm: search radius around each centre, mm.
            exclude_mm: voxels within this distance of the centre are not searched, mm (0: none excluded).
            subvoxel: refine the grid maximum by the per-axis parabola fit.

        Returns:
            ``(points (N, 3) LPS mm, scores (N,))``; NaN points and scores where no fine voxel lies within the
            radius (a centre outside the scan).
        """
        centres = np.asarray(centres_lps, dtype=np.float64).reshape(-1, 3)
        device, shape = self.map.device, np.array(self.map.grid_shape)
        descriptors = descriptors.to(device=device, dtype=torch.float32)
        voxel_mm = np.linalg.norm(self.map.affine[:3, :3], axis=0)
        reach = np.ceil(radius_mm / voxel_mm).astype(int)
        centre_voxels = self.map.world_to_voxel(centres)
        best = torch.full((len(centres),), -1, dtype=torch.long)
        score = torch.full((len(centres),), float("nan"), dtype=torch.float32)
        for i, (centre, voxel) in enumerate(zip(centres, centre_voxels)):
            if not np.all(np.isfinite(voxel)):
                continue
            lo = np.maximum(np.floor(voxel).astype(int) - reach, 0)
            hi = np.minimum(np.ceil(voxel).astype(int) + reach, shape - 1)
            if np.any(hi < lo):
                continue
            axes = [np.arange(lo[a], hi[a] + 1) for a in range(3)]
            box = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
            distance = np.linalg.norm(self.map.voxel_to_world(box.astype(np.float64)) - centre, axis=1)
            keep = distance <= radius_mm
            if exclude_mm > 0:
                keep &= distance > exclude_mm
            box = box[keep]
            if len(box) == 0:
                continue
            rows = torch.as_tensor(np.ravel_multi_index(box.T, tuple(shape)), device=device)
            values = self.map.rows(rows) @ descriptors[i]
            j = int(values.argmax())
            best[i], score[i] = rows[j], float(values[j]) / self.map.n_heads
        points = np.full((len(centres), 3), np.nan)
        found = best >= 0
        if found.any():
            index = best[found].to(device)
            voxels = grid_voxels(index, self.map.grid_shape)
            if subvoxel:
                voxels += subvoxel_offsets(descriptors[found.to(device)], self.map, index)
            points[found.numpy()] = self.map.voxel_to_world(voxels.cpu().numpy())
        return points, score.numpy()
