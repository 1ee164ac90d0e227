"""The global map template -> query: what all the points of one scan agree on, used to check each point's match.

Fixed-point matching trusts each point's neighbourhood alone; across subjects an organ can then be matched onto
similar-looking tissue far away (the aorta onto the patient's arm). Every point of a scan moves with the others,
so a map fitted to many matches at once catches that:

1. **Sparse mutual matches**: template fine-grid voxels every ``grid_spacing_mm`` are matched into the query by
   nearest neighbour, and the answers back into the template; a pair is kept when the backward match lands within
   ``mutual_tolerance_mm`` of its start (forward-backward consistency, the idea behind fixed points, at scan scale).
   Air and other featureless voxels fail this test by themselves, so no body mask is needed.
2. **RANSAC affine** (:func:`ransac_consensus`): minimal samples of 4 pairs, ranked by their MSAC cost and the
   best few refitted on their inliers while that cost falls (LO-RANSAC), then a robust refit on the chosen
   inliers (:func:`~samv2_components.matching.affine_fit.fit_affine_robust`). Across subjects only a quarter of
   the pairs may agree, where 1,000 samples hold a few uncontaminated ones: ranked by inlier count alone, the
   chosen consensus then changed with the random seed (organ-centroid MED 24-42 mm over ten seeds on one pair).

A point's match is then expected near ``map(point)``; :class:`~samv2_components.matching.matcher.SAMv2Matcher`
searches within a radius of that prediction and flags a point whose unrestricted match disagrees with it.

All points are world LPS millimetres; the affine maps template points to query points
(``q = A[:3, :3] @ t + A[:3, 3]``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from samv2_components.consensus import lo_msac, msac_scores
from samv2_components.geometry import apply_matrix, as_points
from samv2_components.matching.affine_fit import fit_affine, fit_affine_robust
from samv2_components.matching.embedded_scan import EmbeddedScan

__all__ = ["GlobalMap", "estimate_global_map", "fit_global_map", "global_map_over_seeds", "ransac_consensus", "sparse_mutual_matches"]

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

    def local_support(self, points_lps, radius_mm: float) -> np.ndarray:
        """``(N,)`` int: the map's inlier pairs whose template point lies within ``radius_mm`` of each template
        point ``(N, 3)`` (LPS mm), i.e. how many consistent matches vouch for the map there (0 without a map)."""
        pts = as_points(points_lps)
        if self.matrix is None or not self.inliers.any():
            return np.zeros(len(pts), dtype=np.int64)
        sources = torch.from_numpy(np.ascontiguousarray(self.template_points[self.inliers]))
        points = torch.from_numpy(np.ascontiguousarray(pts))
        counts = np.empty(len(pts), dtype=np.int64)
        for first in range(0, len(pts), _POINTS_PER_BLOCK):  # exact differences (no |p|^2 - 2 p.s rounding at the radius)
            block = torch.cdist(points[first : first + _POINTS_PER_BLOCK], sources, compute_mode="donot_use_mm_for_euclid_dist")
            counts[first : first + len(block)] = (block <= radius_mm).sum(1).numpy()
        return counts

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


def _minimal_affines(source: np.ndarray, target: np.ndarray, samples: np.ndarray) -> np.ndarray:
    """The exact affines of minimal samples: ``samples`` ``(K, 4)`` indices of 4 pairs; returns the models
    ``(M, 3, 4)`` (linear part and translation, ``y = A[:, :3] @ x + A[:, 3]``) of the ``M`` samples that are not
    (nearly) coplanar."""
    x, y = source[samples], target[samples]  # (K, 4, 3)
    spread = np.linalg.svd(x - x.mean(1, keepdims=True), compute_uv=False)
    rows = np.flatnonzero(spread[:, 2] > 1.0)  # a 4-pair sample spanning less than ~1 mm in some direction: no affine
    design = np.concatenate([x[rows], np.ones((len(rows), 4, 1))], axis=2)  # y = [x, 1] @ P, P (4, 3)
    solution = np.linalg.solve(design, y[rows])
    return np.concatenate([solution[:, :3].transpose(0, 2, 1), solution[:, 3, :, None]], axis=2)


def ransac_consensus(
    source: np.ndarray,
    target: np.ndarray,
    inlier_threshold_mm: float = 15.0,
    iterations: int = 5000,
    seed: int = 0,
    scale_range: tuple[float, float] = (0.7, 1.4),
    consensus: str = "lo-msac",
    local_starts: int = 8,
) -> np.ndarray:
    """The pairs ``source[i] -> target[i]`` (``(N, 3)`` each, mm) that one plausible affine explains: RANSAC over
    ``iterations`` minimal samples of 4 pairs (coplanar samples and models stretching outside ``scale_range`` or
    mirroring skipped), all scored.

    ``consensus`` says how the models are ranked:

    * ``"lo-msac"`` (default): by the MSAC cost (Torr and Zisserman 2000: squared residuals truncated at
      ``inlier_threshold_mm``, so an inlier counts by how well it fits); the ``local_starts`` best models are each
      refitted on their inliers while that cost falls (the local optimisation of LO-RANSAC, Chum, Matas and
      Kittler 2003) and the lowest cost is kept, so that samples of one consensus end at one model.
    * ``"count"``: by the number of pairs within ``inlier_threshold_mm`` of the 4-pair model, the first such model
      kept (a near-tie between two consensus sets is then settled by the order of the samples); the global map's
      ranking before version 0.5 of the matching bundle.

    No early stop: across subjects a 4-pair sample of inliers alone is not enough (their residuals reach the
    threshold, so its model may miss most of its consensus); tried, the usual stopping rule (``log(1 - p) /
    log(1 - w^4)`` samples, ``p`` = 0.9999, ``w`` the inlier fraction) stopped after 1,000-2,000 samples on an
    inter-subject pair and chose another consensus for 3 seeds of 10, where 5,000 samples chose the same for all.

    Returns the inliers ``(N,)`` bool of the chosen model.
    """
    if consensus not in ("lo-msac", "count"):
        raise ValueError(f"consensus must be 'lo-msac' or 'count', got {consensus!r}")
    n = len(source)
    if n < 4:
        return np.zeros(n, dtype=bool)
    source, target = np.asarray(source, dtype=np.float64), np.asarray(target, dtype=np.float64)
    centre = source.mean(0)  # fit about the centre: the 4x4 systems stay well scaled
    source, target = source - centre, target - centre
    samples = np.random.default_rng(seed).integers(0, n, (int(iterations), 4))
    samples = samples[(np.diff(np.sort(samples, axis=1), axis=1) > 0).all(1)]  # 4 distinct pairs
    models = _minimal_affines(source, target, samples)
    singular = np.linalg.svd(models[:, :, :3], compute_uv=False)
    models = models[(np.linalg.det(models[:, :, :3]) > 0) & (singular.min(1) >= scale_range[0])
                    & (singular.max(1) <= scale_range[1])]
    if not len(models):
        return np.zeros(n, dtype=bool)
    if consensus == "count":
        _, count = msac_scores(models, source, target, inlier_threshold_mm)
        chosen = models[int(np.argmax(count))]  # the first model with the most inliers
        return np.linalg.norm(source @ chosen[:, :3].T + chosen[:, 3] - target, axis=1) <= inlier_threshold_mm

    def refit(inlier_source: np.ndarray, inlier_target: np.ndarray) -> np.ndarray:
        """Least squares on the inliers, the stretch clamped into ``scale_range``."""
        matrix = fit_affine(inlier_source, inlier_target, ridge=0.0).matrix
        return matrix if _plausible(matrix, scale_range) else _clamped(matrix, scale_range, inlier_source, inlier_target)

    return lo_msac(models, source, target, inlier_threshold_mm, refit, min_pairs=4, local_starts=local_starts,
                   max_rounds=10)


def estimate_global_map(
    template: EmbeddedScan,
    query: EmbeddedScan,
    grid_spacing_mm: float = 16.0,
    mutual_tolerance_mm: float = 8.0,
    min_score: float = 0.3,
    inlier_threshold_mm: float = 15.0,
    iterations: int = 5000,
    min_inliers: int = 12,
    seed: int = 0,
    smoothing_mm: float = 25.0,
    prior_weight: float = 1.0,
    scale_range: tuple[float, float] = (0.7, 1.4),
    consensus: str = "lo-msac",
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
        consensus: how RANSAC ranks its models (:func:`ransac_consensus`): ``"lo-msac"`` or ``"count"``.
    """
    t_pts, q_pts, n_candidates = sparse_mutual_matches(template, query, grid_spacing_mm, mutual_tolerance_mm, min_score)
    return fit_global_map(t_pts, q_pts, n_candidates, inlier_threshold_mm, iterations, min_inliers, seed, smoothing_mm,
                          prior_weight, scale_range, consensus)


def fit_global_map(
    template_points: np.ndarray,
    query_points: np.ndarray,
    n_candidates: int,
    inlier_threshold_mm: float = 15.0,
    iterations: int = 5000,
    min_inliers: int = 12,
    seed: int = 0,
    smoothing_mm: float = 25.0,
    prior_weight: float = 1.0,
    scale_range: tuple[float, float] = (0.7, 1.4),
    consensus: str = "lo-msac",
) -> GlobalMap:
    """The global map fitted to given mutual pairs ``template_points -> query_points`` (``(K, 3)`` each, LPS mm;
    ``n_candidates`` template points were tried to find them): steps 2 and 3 of :func:`estimate_global_map`, whose
    arguments these are."""
    t_pts, q_pts = np.asarray(template_points, dtype=np.float64), np.asarray(query_points, dtype=np.float64)
    n = len(t_pts)
    empty = GlobalMap(None, n_candidates, n, 0, float("nan"), t_pts, q_pts, np.zeros(n, dtype=bool), smoothing_mm, prior_weight)
    if n < max(min_inliers, 4):
        return empty
    best = ransac_consensus(t_pts, q_pts, inlier_threshold_mm, iterations, seed, scale_range, consensus)
    if best.sum() < min_inliers:
        return empty
    refit = fit_affine_robust(t_pts[best], q_pts[best], inlier_threshold_mm=inlier_threshold_mm, min_points=min_inliers)
    refit.transform.matrix = _clamped(refit.transform.matrix, scale_range, t_pts[best], q_pts[best])
    residual = np.linalg.norm(refit.transform(t_pts) - q_pts, axis=1)
    inliers = residual <= inlier_threshold_mm
    rms = float(np.sqrt(np.mean(residual[inliers] ** 2))) if inliers.any() else float("nan")
    return GlobalMap(refit.transform.matrix, n_candidates, n, int(inliers.sum()), rms, t_pts, q_pts, inliers,
                     smoothing_mm, prior_weight)


def global_map_over_seeds(
    template: EmbeddedScan,
    query: EmbeddedScan,
    points,
    truth,
    variants: dict[str, dict],
    seeds=range(10),
    **settings,
) -> dict[str, dict]:
    """How much of a global map is its RANSAC seed: the map fitted with each seed, for each variant of the settings.

    The mutual pairs are found once (``settings``' pairing arguments); per variant (a dict of
    :func:`estimate_global_map` arguments overriding ``settings``) and seed only the RANSAC and the refit run.

    Args:
        template, query: prepared scans.
        points, truth: ``(N, 3)`` template points and their true query positions, LPS mm.
        variants: label -> setting overrides (``{}``: ``settings`` as they are).
        seeds: the RANSAC seeds.
        settings: :func:`estimate_global_map` arguments.

    Returns:
        label -> ``{"med_mm": (len(seeds),) mean distance of the map's prediction of ``points`` from ``truth``
        (NaN where no map), "n_inliers": list, "same_as_first": how many seeds chose the first seed's inliers,
        "n_pairs": mutual pairs}``.
    """
    pairing = {k: settings.pop(k) for k in ("grid_spacing_mm", "mutual_tolerance_mm", "min_score") if k in settings}
    t_pts, q_pts, n_candidates = sparse_mutual_matches(template, query, **pairing)
    points, truth = as_points(points), as_points(truth)
    out = {}
    for label, overrides in variants.items():
        maps = [fit_global_map(t_pts, q_pts, n_candidates, **{**settings, **overrides, "seed": seed}) for seed in seeds]
        out[label] = {
            "med_mm": np.array([np.linalg.norm(m(points) - truth, axis=1).mean() if m.valid else np.nan for m in maps]),
            "n_inliers": [m.n_inliers for m in maps],
            "same_as_first": sum(np.array_equal(m.inliers, maps[0].inliers) for m in maps),
            "n_pairs": len(t_pts),
        }
    return out
