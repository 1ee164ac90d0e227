"""Fixed-point matching (SAMv2 paper, Sec. III-B).

For a template point ``t`` let ``F`` be the forward nearest neighbour (template voxel -> best query voxel) and
``B`` the backward one (query voxel -> best template voxel). ``f = B o F`` maps template voxels to template
voxels; its fixed points ``s = f(s)`` are exactly the *mutual* nearest-neighbour pairs ``(s, F(s))``, the pairs
the embedding agrees on in both directions. The matcher

1. starts from every voxel of an ``L^3`` grid (``grid_size`` L, ``grid_step`` fine voxels apart) around ``t``;
2. iterates ``s <- f(s)`` until ``f(s) == s`` (converged) or ``max_iterations`` forward-backward rounds;
3. keeps the distinct fixed points within ``max_distance_mm`` of ``t`` whose score is at least ``min_score``;
4. fits an affine ``s -> F(s)`` to the kept pairs (least squares with outlier trimming,
   :func:`~samv2_components.matching.affine_fit.fit_affine_robust`) and answers ``T(t)``.

With fewer than ``min_fixed_points`` kept pairs the point falls back to plain nearest-neighbour matching, and
the result says so (``method``). Every NN evaluation is memoised per voxel, and all starts of all points are
iterated together, so neighbouring starts and neighbouring points share work.

Differences from the reference code (design notes §2, `docs/design.md`): it runs 4 half-iterations without a convergence test and keeps
pairs by a backward score threshold tuned for a summed score; here convergence is tested exactly, a start that
has not converged after ``max_iterations`` is dropped (it is on a cycle, not a fixed point), and ``min_score``
is on the mean-cosine score in [-1, 1] (its default is derived in ``bundles/samv2_matching/docs/README.md``).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from samv2_components.geometry import as_points
from samv2_components.matching.affine_fit import fit_affine_robust
from samv2_components.matching.embedded_scan import EmbeddedScan
from samv2_components.matching.nearest_neighbour import subvoxel_offsets

__all__ = ["FixedPointResult", "fixed_point_match"]


class FixedPointResult(NamedTuple):
    """Per template point (``N`` of them); points are world LPS mm.

    Attributes:
        points_lps: ``(N, 3)`` the affine-mapped template point; NaN where there were too few fixed points.
        n_fixed_points: ``(N,)`` kept fixed points (distinct, within distance, above the score threshold).
        n_inliers: ``(N,)`` fixed points the final affine used (after outlier trimming).
        residual_mm: ``(N,)`` RMS residual of the affine on its inliers, mm; NaN without a fit.
        n_converged: ``(N,)`` starts that reached a fixed point.
    """

    points_lps: np.ndarray
    n_fixed_points: np.ndarray
    n_inliers: np.ndarray
    residual_mm: np.ndarray
    n_converged: np.ndarray


class _MemoisedNN:
    """Nearest neighbour from ``source`` voxels into ``target``, each source voxel searched at most once."""

    def __init__(self, source: EmbeddedScan, target: EmbeddedScan):
        self.source, self.target = source, target
        device = source.map.device
        self.best = torch.full((source.n_voxels,), -1, dtype=torch.long, device=device)
        self.score = torch.zeros(source.n_voxels, dtype=torch.float32, device=device)

    def __call__(self, voxels: torch.Tensor) -> torch.Tensor:
        missing = torch.unique(voxels[self.best[voxels] < 0])
        if len(missing):
            index, score = self.target.search.search_indices(self.source.map.rows(missing))
            self.best[missing] = index.to(self.best.device)
            self.score[missing] = score.to(self.score.device)
        return self.best[voxels]


def _start_voxels(scan: EmbeddedScan, points_lps: np.ndarray, grid_size: int, grid_step: int):
    """Linear indices of the ``L^3`` start grid around every point (inside the grid) and the owning point."""
    half = (grid_size - 1) / 2.0
    steps = (np.arange(grid_size) - half) * grid_step
    offsets = np.stack(np.meshgrid(steps, steps, steps, indexing="ij"), axis=-1).reshape(-1, 3)
    centre = scan.map.world_to_voxel(points_lps)
    # an even grid size has no voxel at its centre: that grid is centred on the fractional point itself
    anchor = centre if grid_size % 2 == 0 else np.rint(centre)
    starts = np.rint(anchor[:, None, :] + offsets[None])
    shape = np.asarray(scan.map.grid_shape)
    inside = np.all((starts >= 0) & (starts <= shape - 1), axis=2)
    owner = np.broadcast_to(np.arange(len(points_lps))[:, None], inside.shape)[inside]
    linear = np.ravel_multi_index(starts[inside].astype(np.int64).T, tuple(shape))
    device = scan.map.device
    return torch.as_tensor(linear, device=device), torch.as_tensor(owner, device=device)


def fixed_point_match(
    template: EmbeddedScan,
    query: EmbeddedScan,
    points_lps,
    grid_size: int = 5,
    grid_step: int = 1,
    max_iterations: int = 10,
    max_distance_mm: float = 12.0,
    min_score: float = 0.5,
    min_fixed_points: int = 4,
    inlier_threshold_mm: float = 4.0,
    subvoxel: bool = True,
) -> FixedPointResult:
    """Fixed-point matching of template points into the query (see the module docstring).

    Args:
        template, query: the two prepared scans (same heads).
        points_lps: ``(N, 3)`` template points, world LPS mm.
        grid_size: L, starts per axis (paper: 5).
        grid_step: spacing of the start grid in fine voxels (1 = 4 mm at the default 2 mm input).
        max_iterations: forward-backward rounds at most before a start is given up.
        max_distance_mm: a fixed point farther than this from the template point is not kept.
        min_score: a fixed point whose pair scores lower (mean cosine) is not kept.
        min_fixed_points: fewest kept pairs to fit the affine; below it the point gets NaN (caller falls back).
        inlier_threshold_mm: residual always accepted by the affine's outlier trimming.
        subvoxel: refine each pair's query voxel by the parabola fit of the score before the affine fit.
    """
    pts = as_points(points_lps)
    if template.head_names != query.head_names:
        raise ValueError(f"template heads {template.head_names} and query heads {query.head_names} differ")
    if grid_size < 1 or grid_step < 1 or max_iterations < 1:
        raise ValueError("grid_size, grid_step and max_iterations must be >= 1")
    forward, backward = _MemoisedNN(template, query), _MemoisedNN(query, template)

    current, owner = _start_voxels(template, pts, int(grid_size), int(grid_step))
    converged = torch.zeros(len(current), dtype=torch.bool, device=current.device)
    for _ in range(int(max_iterations)):
        active = torch.nonzero(~converged).flatten()
        if not len(active):
            break
        following = backward(forward(current[active]))
        converged[active] = following == current[active]
        current[active] = following

    n = len(pts)
    n_converged = np.bincount(owner[converged].cpu().numpy(), minlength=n)
    # distinct (point, fixed point) pairs
    key = torch.unique(owner[converged] * template.n_voxels + current[converged])
    pair_owner, fixed = (key // template.n_voxels).cpu().numpy(), key % template.n_voxels
    matched = forward(fixed)
    source = template.voxel_world(fixed)
    if subvoxel and len(fixed):
        voxels = torch.stack(torch.unravel_index(matched, query.map.grid_shape), dim=1).double()
        voxels += subvoxel_offsets(template.map.rows(fixed), query.map, matched)
        target = query.map.voxel_to_world(voxels.cpu().numpy())
    else:
        target = query.voxel_world(matched)
    score = forward.score[fixed].float().cpu().numpy()
    keep = (np.linalg.norm(source - pts[pair_owner], axis=1) <= max_distance_mm) & (score >= min_score)

    result = np.full((n, 3), np.nan)
    n_fixed = np.bincount(pair_owner[keep], minlength=n)
    n_inliers = np.zeros(n, dtype=np.int64)
    residual = np.full(n, np.nan)
    for i in np.flatnonzero(n_fixed >= max(int(min_fixed_points), 1)):
        mine = keep & (pair_owner == i)
        fit = fit_affine_robust(source[mine], target[mine], inlier_threshold_mm, min_points=int(min_fixed_points))
        result[i] = fit.transform(pts[i : i + 1])[0]
        n_inliers[i], residual[i] = int(fit.inliers.sum()), fit.rms_residual_mm
    return FixedPointResult(result, n_fixed, n_inliers, residual, n_converged)
