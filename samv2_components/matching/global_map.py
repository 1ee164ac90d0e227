"""The global map template -> query: what all the points of one scan agree on, used to check each point's match.

Fixed-point matching trusts each point's neighbourhood alone; across subjects an organ can then be matched onto
similar-looking tissue far away (the aorta onto the patient's arm). Every point of a scan moves with the others,
so a map fitted to many matches at once catches that:

1. **Sparse mutual matches**: template fine-grid voxels every ``grid_spacing_mm`` are matched into the query by
   nearest neighbour, and the answers back into the template; a pair is kept when the backward match lands within
   ``mutual_tolerance_mm`` of its start (forward-backward consistency, the idea behind fixed points, at scan scale).
   Air and other featureless voxels fail this test by themselves, so no body mask is needed.
2. **RANSAC affine**: minimal samples of 4 pairs, the model with the most pairs within ``inlier_threshold_mm``,
   refitted on its inliers (:func:`~samv2_components.matching.affine_fit.fit_affine_robust`).

A point's match is then expected near ``map(point)``; :class:`~samv2_components.matching.matcher.SAMv2Matcher`
searches within a radius of that prediction and flags a point whose unrestricted match disagrees with it.

All points are world LPS millimetres; the affine maps template points to query points
(``q = A[:3, :3] @ t + A[:3, 3]``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from samv2_components.geometry import apply_matrix, as_points
from samv2_components.matching.affine_fit import fit_affine, fit_affine_robust
from samv2_components.matching.embedded_scan import EmbeddedScan

__all__ = ["GlobalMap", "estimate_global_map", "sparse_mutual_matches"]

#: points whose smooth correction is computed at once (bounds the points x inliers distance block: 18 MB in
#: float64 against 4,400 inliers)
_POINTS_PER_BLOCK = 512


@dataclass
class GlobalMap:
    """A robust affine template -> query fitted to sparse mutual matches.

    Attributes:
        matrix: ``(4, 4)`` affine, template LPS mm -> query LPS mm; ``None`` when too few matches agreed.
        n_candidates: template grid points tried.
        n_mutual: forward-backward consistent pairs.
        n_inliers: pairs within the inlier threshold of the final affine.
        rms_residual_mm: RMS distance of the inliers from the affine, mm.
        template_points, query_points: ``(n_mutual, 3)`` the mutual pairs, LPS mm.
        inliers: ``(n_mutual,)`` bool.
    """

    matrix: np.ndarray | None
    n_candidates: int
    n_mutual: int
    n_inliers: int
    rms_residual_mm: float
    template_points: np.ndarray
    query_points: np.ndarray
    inliers: np.ndarray

    @property
    def valid(self) -> bool:
        return self.matrix is not None

    smoothing_mm: float = 0.0
    prior_weight: float = 1.0

    def affine(self, points_lps) -> np.ndarray:
        """The affine part alone: query positions ``(N, 3)`` of template points ``(N, 3)``, LPS mm."""
        if self.matrix is None:
            raise ValueError("no global map: too few consistent matches")
        return apply_matrix(self.matrix, as_points(points_lps))

    def __call__(self, points_lps) -> np.ndarray:
        """Predicted query positions ``(N, 3)`` of template points ``(N, 3)``, LPS mm: the affine plus, with
        ``smoothing_mm`` > 0, a smooth correction, the Gaussian-weighted mean of the inliers' residual
        displacements (kernel width ``smoothing_mm``), shrunk towards zero where few inliers are near
        (``prior_weight`` acts as that many pseudo-inliers of zero residual): where the matches support a local
        deformation it follows them, elsewhere it stays affine."""
        pts = as_points(points_lps)
        predicted = self.affine(pts)
        if self.smoothing_mm <= 0 or not self.inliers.any():
            return predicted
        sources = self.template_points[self.inliers]
        residual = self.query_points[self.inliers] - self.affine(sources)
        # a block of points at a time (the refiner's local frames ask for 37,500 points against 4,400 inliers), in
        # torch float64; squared distances as |p|^2 + |s|^2 - 2 p.s (a matrix product, 5x faster than the
        # differences), about the inliers' centre so that the terms stay small
        centre = sources.mean(axis=0)
        points_t, sources_t, residual_t = (torch.from_numpy(np.ascontiguousarray(a))
                                           for a in (pts - centre, sources - centre, residual))
        source_norms = (sources_t**2).sum(1)
        for first in range(0, len(pts), _POINTS_PER_BLOCK):
            block = points_t[first : first + _POINTS_PER_BLOCK]
            squared = torch.addmm((block**2).sum(1, keepdim=True) + source_norms, block, sources_t.T, alpha=-2.0)
            w = squared.clamp_min_(0.0).mul_(-0.5 / self.smoothing_mm**2).exp_()
            predicted[first : first + len(block)] += ((w @ residual_t) / (w.sum(1, keepdim=True) + self.prior_weight)).numpy()
        return predicted

    def summary(self) -> dict:
        """JSON-ready figures (the matrix as nested lists, LPS mm)."""
        return {
            "valid": self.valid,
            "template_to_query_lps": None if self.matrix is None else np.round(self.matrix, 6).tolist(),
            "n_candidates": self.n_candidates,
            "n_mutual": self.n_mutual,
            "n_inliers": self.n_inliers,
            "rms_residual_mm": round(float(self.rms_residual_mm), 3),
        }


def _plausible(matrix: np.ndarray, scale_range: tuple[float, float]) -> bool:
    """The linear part keeps handedness and stretches every direction within ``scale_range``."""
    singular = np.linalg.svd(matrix[:3, :3], compute_uv=False)
    return np.linalg.det(matrix[:3, :3]) > 0 and scale_range[0] <= singular.min() and singular.max() <= scale_range[1]


def _clamped(matrix: np.ndarray, scale_range: tuple[float, float], source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """``matrix`` with its stretches clamped into ``scale_range`` (SVD), the translation refitted so the centroids
    of ``source`` and ``target`` still correspond."""
    u, singular, vt = np.linalg.svd(matrix[:3, :3])
    linear = u @ np.diag(np.clip(singular, *scale_range)) @ vt
    out = np.eye(4)
    out[:3, :3] = linear
    out[:3, 3] = target.mean(0) - linear @ source.mean(0)
    return out


def _grid_voxels(scan: EmbeddedScan, spacing_mm: float) -> np.ndarray:
    """Fine-grid voxel indices ``(M, 3)`` every ``spacing_mm`` (at least every voxel) along each axis."""
    voxel_mm = np.linalg.norm(scan.map.affine[:3, :3], axis=0)
    steps = np.maximum(1, np.round(spacing_mm / voxel_mm)).astype(int)
    shape = scan.map.grid_shape
    axes = [np.arange(steps[a] // 2, shape[a], steps[a]) for a in range(3)]
    return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)


def sparse_mutual_matches(
    template: EmbeddedScan,
    query: EmbeddedScan,
    grid_spacing_mm: float = 16.0,
    mutual_tolerance_mm: float = 8.0,
    min_score: float = 0.3,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Forward-backward consistent nearest-neighbour pairs of a sparse template grid.

    Returns:
        ``(template_points (K, 3), query_points (K, 3), n_candidates)``, LPS mm.
    """
    voxels = _grid_voxels(template, grid_spacing_mm)
    flat_index = torch.as_tensor(np.ravel_multi_index(voxels.T, template.map.grid_shape))
    descriptors = template.map.rows(flat_index)
    start = template.map.voxel_to_world(voxels.astype(np.float64))
    found_voxels, scores = query.search.search(descriptors, subvoxel=False)
    found = query.map.voxel_to_world(found_voxels)
    back_descriptors = query.descriptors_at(found)
    back_voxels, _ = template.search.search(back_descriptors, subvoxel=False)
    back = template.map.voxel_to_world(back_voxels)
    keep = (np.linalg.norm(back - start, axis=1) <= mutual_tolerance_mm) & (scores >= min_score)
    return start[keep], found[keep], len(start)


def estimate_global_map(
    template: EmbeddedScan,
    query: EmbeddedScan,
    grid_spacing_mm: float = 16.0,
    mutual_tolerance_mm: float = 8.0,
    min_score: float = 0.3,
    inlier_threshold_mm: float = 15.0,
    iterations: int = 1000,
    min_inliers: int = 12,
    seed: int = 0,
    smoothing_mm: float = 25.0,
    prior_weight: float = 1.0,
    scale_range: tuple[float, float] = (0.7, 1.4),
) -> GlobalMap:
    """Fit the global affine template -> query (see the module docstring).

    Args:
        template, query: prepared scans (:meth:`SAMv2Matcher.prepare`).
        grid_spacing_mm: spacing of the template grid points tried.
        mutual_tolerance_mm: a pair is mutual when its backward match lands this close to its start.
        min_score: pairs scoring lower are not used.
        inlier_threshold_mm: RANSAC inlier distance (mm); across subjects anatomy differs by a few cm.
        iterations: RANSAC samples.
        min_inliers: fewer inliers than this: no map (``matrix`` None).
        seed: RANSAC's random generator.
        smoothing_mm, prior_weight: the smooth correction of :meth:`GlobalMap.__call__` (0: affine only).
        scale_range: the plausible stretch of one body into another: an affine whose linear part stretches any
            direction outside this range is not a model (a thin slab would otherwise be "matched" by squashing the
            template into it, and nothing would ever lie outside the query).
    """
    t_pts, q_pts, n_candidates = sparse_mutual_matches(template, query, grid_spacing_mm, mutual_tolerance_mm, min_score)
    n = len(t_pts)
    empty = GlobalMap(None, n_candidates, n, 0, float("nan"), t_pts, q_pts, np.zeros(n, dtype=bool), smoothing_mm, prior_weight)
    if n < max(min_inliers, 4):
        return empty
    rng = np.random.default_rng(seed)
    best = np.zeros(n, dtype=bool)
    for _ in range(int(iterations)):
        sample = rng.choice(n, 4, replace=False)
        spread = t_pts[sample] - t_pts[sample].mean(0)
        if np.linalg.matrix_rank(spread, tol=1.0) < 3:  # (nearly) coplanar: no affine
            continue
        model = fit_affine(t_pts[sample], q_pts[sample], ridge=0.0)
        if not _plausible(model.matrix, scale_range):
            continue
        inliers = np.linalg.norm(model(t_pts) - q_pts, axis=1) <= inlier_threshold_mm
        if inliers.sum() > best.sum():
            best = inliers
    if best.sum() < min_inliers:
        return empty
    refit = fit_affine_robust(t_pts[best], q_pts[best], inlier_threshold_mm=inlier_threshold_mm, min_points=min_inliers)
    refit.transform.matrix = _clamped(refit.transform.matrix, scale_range, t_pts[best], q_pts[best])
    residual = np.linalg.norm(refit.transform(t_pts) - q_pts, axis=1)
    inliers = residual <= inlier_threshold_mm
    rms = float(np.sqrt(np.mean(residual[inliers] ** 2))) if inliers.any() else float("nan")
    return GlobalMap(refit.transform.matrix, n_candidates, n, int(inliers.sum()), rms, t_pts, q_pts, inliers,
                     smoothing_mm, prior_weight)
