"""Align, then match: for a query turned far from the template, match in the template's own frame.

The embeddings are not rotation invariant: a query turned by 30° or more matches poorly even where the global map
(:mod:`samv2_components.matching.global_map`) knows roughly where everything is. When that map's rotation is at
least ``min_rotation_deg``, the query is resampled through the map's affine onto the template's grid (so it lies
as the template does), embedded once more, matched there, and every answer is mapped back through the same affine
into the query's own space: exact, since the resampling used exactly that transform.

Images are preprocessed network inputs ``(1, D, H, W)`` with their affines; points are world LPS mm.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor

from samv2_components.geometry import affine_and_space, apply_matrix, convert_affine, rotation_angle_deg, voxel_to_grid_sample
from samv2_components.matching.embedded_scan import EmbeddedScan

__all__ = ["Alignment", "rotation_of", "resample_through", "align_then_match"]

#: intensity of "no data" in the network's input range (the preprocessing's padding value)
BACKGROUND = -50.0


@dataclass
class Alignment:
    """How an aligned answer was found (``MatchResult.alignment``).

    Attributes:
        scan: the query resampled onto the template's grid through ``template_to_query``, prepared for matching
            (embeddings there are compared without the turn; the refiner estimates its local frames in it).
        template_to_query: 4x4, template LPS mm -> query LPS mm (the global map's affine).
    """

    scan: EmbeddedScan
    template_to_query: np.ndarray


def rotation_of(matrix: np.ndarray) -> float:
    """Angle (degrees) of the rotation closest to the linear part of an affine (its polar factor, by SVD)."""
    u, _, vt = np.linalg.svd(np.asarray(matrix, dtype=np.float64)[:3, :3])
    return rotation_angle_deg(u @ vt)


def resample_through(query: MetaTensor, grid: MetaTensor, template_to_query: np.ndarray) -> MetaTensor:
    """``query`` resampled onto ``grid``'s voxels: the value at template point ``x`` is the query's at
    ``template_to_query @ x`` (trilinear; outside the query: :data:`BACKGROUND`).

    Args:
        query: ``(1, D, H, W)`` preprocessed query with its affine.
        grid: ``(1, D', H', W')`` image whose grid (shape, affine) the result takes (the template).
        template_to_query: 4x4 affine, template LPS mm -> query LPS mm.

    Returns:
        ``(1, D', H', W')`` MetaTensor with ``grid``'s affine.
    """
    g_affine, g_space = affine_and_space(grid)
    q_affine, q_space = affine_and_space(query)
    g_lps, q_lps = convert_affine(g_affine, g_space, "LPS"), convert_affine(q_affine, q_space, "LPS")
    shape = tuple(grid.shape[1:])
    # template voxel -> query voxel, one matrix: (query voxel <- query LPS <- template LPS <- template voxel)
    voxel_map = np.linalg.inv(q_lps) @ np.asarray(template_to_query, dtype=np.float64) @ g_lps
    axes = [torch.arange(n, dtype=torch.float32) for n in shape]
    voxels = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)
    mapped = voxels @ torch.as_tensor(voxel_map[:3, :3].T, dtype=torch.float32) + torch.as_tensor(voxel_map[:3, 3], dtype=torch.float32)
    coords = voxel_to_grid_sample(mapped, tuple(query.shape[1:])).reshape(1, *shape, 3)
    data = torch.as_tensor(query, dtype=torch.float32).reshape(1, 1, *query.shape[1:]) - BACKGROUND
    out = F.grid_sample(data, coords.to(data.dtype), mode="bilinear", padding_mode="zeros", align_corners=False)
    return MetaTensor(out[0] + BACKGROUND, affine=grid.affine.clone() if torch.is_tensor(grid.affine) else grid.affine)


def align_then_match(matcher, template_scan, template_image: MetaTensor, query_image: MetaTensor, points_lps,
                     embed: Callable[[MetaTensor], Mapping[str, torch.Tensor]], first_result=None,
                     min_rotation_deg: float = 15.0):
    """Match ``points_lps`` (template, LPS mm), aligning the query first when the global map turns far.

    Args:
        matcher: a :class:`~samv2_components.matching.SAMv2Matcher` with ``global_consistency`` on.
        template_scan: the prepared template (:meth:`SAMv2Matcher.prepare`).
        template_image, query_image: the preprocessed scans ``(1, D, H, W)``.
        points_lps: ``(N, 3)`` template points.
        embed: ``embed(image (1, D, H, W)) -> {head: (C, d, h, w)}`` (the bundle's network and inferer).
        first_result: the plain match of the query (computed here when None).
        min_rotation_deg: align when the global map's rotation is at least this.

    Returns:
        ``(result, aligned)``: a :class:`~samv2_components.matching.MatchResult` in the query's space, and whether
        the query was aligned (then every position in it was mapped back from the template frame, and
        ``result.alignment`` is the :class:`Alignment`).
    """
    first = first_result if first_result is not None else matcher.match(template_scan, matcher.prepare(embed(query_image)), points_lps)
    gm = first.global_map
    if gm is None or not gm.valid or rotation_of(gm.matrix) < min_rotation_deg:
        return first, False
    aligned_query = resample_through(query_image, template_image, gm.matrix)
    aligned_scan = matcher.prepare(embed(aligned_query))
    second = matcher.match(template_scan, aligned_scan, points_lps)
    back = gm.matrix

    def to_query(points):
        return None if points is None else apply_matrix(back, points)

    second.points_lps = to_query(second.points_lps)
    second.nn_points_lps = to_query(second.nn_points_lps)
    second.unrestricted_points_lps = to_query(second.unrestricted_points_lps)
    second.global_prediction_lps = to_query(second.global_prediction_lps)
    second.predicted_inside = first.predicted_inside  # the query's own field of view decides what is absent
    second.alignment = Alignment(aligned_scan, np.asarray(back, dtype=np.float64))
    return second, True
