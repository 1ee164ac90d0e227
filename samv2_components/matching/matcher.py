"""The point matcher users configure: nearest-neighbour or fixed-point matching, with scores and flags.

``SAMv2Matcher`` is what the ``samv2_matching`` bundle instantiates from its config; every parameter of the
method is an argument here. Typical use::

    matcher = SAMv2Matcher(method="fixed_point")
    template, query = matcher.prepare(template_heads), matcher.prepare(query_heads)   # once per scan
    result = matcher.match(template, query, points_lps)                               # (N, 3) LPS mm
    result.points_lps, result.scores, result.methods, result.confident

Output conventions: points are world **LPS** millimetres. ``score`` is the SAMv2 similarity (mean of per-head
cosines, [-1, 1]) between the template point's descriptor and the query's descriptor *at the reported point*
(trilinear on each head's grid), for every method alike, so scores of NN and fixed-point answers compare.
``confident`` flags the answers to trust. A fixed-point answer is confident when its score is at least
``min_confident_score`` and its local affine fits the fixed points within ``max_confident_residual_mm``; a plain NN
answer when its score is high enough; a fixed-point request that fell back to NN (the embedding was not
consistent in both directions around the point) never is. With the global check, an answer is moreover confident
only where it agrees with the global map *and* the map is supported there: at least ``min_confident_support``
of its inlier pairs within ``confident_support_radius_mm`` of the template point (agreeing with a map that no
nearby match vouches for proves nothing: a rib matched onto its neighbour agrees with a map extrapolated there). An unconfident match, for instance in a query scan that
does not contain the anatomy, is still reported, but flagged, never silently passed off as a good one.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from samv2_components.errors import SAMv2InputError, parse_bool
from samv2_components.geometry import as_points
from samv2_components.matching.align_then_match import Alignment
from samv2_components.matching.embedded_scan import EmbeddedScan
from samv2_components.matching.fixed_point import fixed_point_match
from samv2_components.matching.global_map import GlobalMap, estimate_global_map

__all__ = ["MatchResult", "SAMv2Matcher", "METHODS"]

#: ``method`` values of a result: what produced each answer (``global_restricted``: the unrestricted answer
#: disagreed with the global map; the best match within ``global_radius_mm`` of its prediction is reported).
METHODS = ("fixed_point", "nearest_neighbour", "nearest_neighbour_fallback", "global_restricted")


@dataclass
class MatchResult:
    """Matches of ``N`` template points.

    Attributes:
        points_lps: ``(N, 3)`` matched query points, world LPS mm.
        scores: ``(N,)`` similarity at the matched point (mean of per-head cosines, [-1, 1]).
        methods: ``N`` strings from :data:`METHODS`; ``nearest_neighbour_fallback`` means fixed-point matching
            was asked for but found fewer than ``min_fixed_points`` fixed points.
        confident: ``(N,)`` bool, see the module docstring.
        n_fixed_points: ``(N,)`` kept fixed points (0 for NN).
        residual_mm: ``(N,)`` RMS residual of the fixed-point affine, mm (NaN for NN answers).
        nn_points_lps: ``(N, 3)`` the plain nearest-neighbour answer, for comparison (LPS mm).
        global_prediction_lps: ``(N, 3)`` where the global map puts each point (LPS mm; None without a map).
        global_support: ``(N,)`` int, the map's inlier pairs within ``confident_support_radius_mm`` of each template
            point (None without a map).
        unrestricted_points_lps: ``(N, 3)`` the answer before the global check (fixed point or NN), LPS mm.
        flags: ``N`` strings, empty or the reason a point was overruled (both positions are in the arrays above).
        global_map: the :class:`~samv2_components.matching.global_map.GlobalMap` used, or None.
        predicted_inside: ``(N,)`` bool, whether the global map puts the point inside the query's field of view
            (None without a map): a point predicted outside has no anatomy to match in this query.
        alignment: the :class:`~samv2_components.matching.align_then_match.Alignment` when the answers were found
            in the query aligned to the template (align, then match), else None.
    """

    points_lps: np.ndarray
    scores: np.ndarray
    methods: list
    confident: np.ndarray
    n_fixed_points: np.ndarray
    residual_mm: np.ndarray
    nn_points_lps: np.ndarray
    global_prediction_lps: np.ndarray | None = None
    global_support: np.ndarray | None = None
    unrestricted_points_lps: np.ndarray | None = None
    flags: list | None = None
    global_map: GlobalMap | None = None
    predicted_inside: np.ndarray | None = None
    alignment: Alignment | None = None

    def __len__(self) -> int:
        return len(self.points_lps)

    def columns(self) -> dict[str, list]:
        """Per-point output columns (for a points file): ``score, method, confident, n_fixed_points, residual_mm``,
        and with a global map ``global_distance_mm`` (unrestricted answer to the map's prediction),
        ``global_support`` (the map's inlier pairs near the point) and ``flag``."""
        columns = {
            "score": [round(float(s), 4) for s in self.scores],
            "method": list(self.methods),
            "confident": [bool(c) for c in self.confident],
            "n_fixed_points": [int(n) for n in self.n_fixed_points],
            "residual_mm": [None if np.isnan(r) else round(float(r), 3) for r in self.residual_mm],
        }
        if self.global_prediction_lps is not None:
            distance = np.linalg.norm(self.unrestricted_points_lps - self.global_prediction_lps, axis=1)
            columns["global_distance_mm"] = [None if np.isnan(d) else round(float(d), 2) for d in distance]
            columns["global_support"] = [int(n) for n in self.global_support]
            columns["flag"] = list(self.flags)
        return columns


class SAMv2Matcher:
    """Template points -> query points with SAMv2 embeddings.

    Args:
        method: ``"fixed_point"`` (paper Sec. III-B, the default) or ``"nearest_neighbour"``.
        cell_size, top_k, margin, cell_dtype: the coarse-to-fine search
            (:class:`~samv2_components.matching.coarse_to_fine.CoarseToFineSearch`): cells of ``cell_size`` fine
            voxels ranked in ``cell_dtype``, the best ``top_k`` cells searched exactly (float32) within ``margin``
            fine voxels around them.
        subvoxel: refine grid maxima to sub-voxel precision (parabola fit of the score per axis).
        grid_size, grid_step, max_iterations, max_distance_mm, min_fixed_point_score, min_fixed_points,
            inlier_threshold_mm: fixed-point parameters (see
            :func:`~samv2_components.matching.fixed_point.fixed_point_match`; ``min_fixed_point_score`` is its
            ``min_score``).
        min_confident_score: a match scoring lower is flagged ``confident=False``.
        max_confident_residual_mm: a fixed-point answer whose affine's RMS residual is larger is flagged.
        global_consistency: fit the global map template -> query
            (:func:`~samv2_components.matching.global_map.estimate_global_map`) and check every answer against it:
            one farther than ``global_radius_mm`` from the map's prediction is replaced by the best match within
            that radius of the prediction (``method`` ``global_restricted``), flagged with both positions, and
            not confident. Without a map (too few consistent matches) answers are unchanged.
        global_radius_mm: the radius of that check and of the restricted search, mm.
        min_confident_support, confident_support_radius_mm: with a global map, an answer is confident only where at
            least ``min_confident_support`` of the map's inlier pairs lie within ``confident_support_radius_mm`` of
            the template point (default 4, the map's minimal sample, within 25 mm, its smoothing width).
        global_map_kwargs: arguments of :func:`~samv2_components.matching.global_map.estimate_global_map`.
    """

    def __init__(
        self,
        method: str = "fixed_point",
        cell_size: Sequence[int] = (4, 4, 4),
        top_k: int = 8,
        margin: Sequence[int] = (1, 1, 1),
        cell_dtype: str = "bfloat16",
        subvoxel: bool = True,
        grid_size: int = 5,
        grid_step: int = 1,
        max_iterations: int = 10,
        max_distance_mm: float = 12.0,
        min_fixed_point_score: float = 0.5,
        min_fixed_points: int = 4,
        inlier_threshold_mm: float = 4.0,
        min_confident_score: float = 0.6,
        max_confident_residual_mm: float = 5.0,
        global_consistency: bool = True,
        global_radius_mm: float = 10.0,
        min_confident_support: int = 4,
        confident_support_radius_mm: float = 25.0,
        global_map_kwargs: Mapping | None = None,
    ):
        if method not in ("fixed_point", "nearest_neighbour"):
            raise SAMv2InputError("matcher#method", f"must be one of fixed_point, nearest_neighbour; got {method!r}")
        self.method = method
        self.search_kwargs = {
            "cell_size": tuple(cell_size),
            "top_k": int(top_k),
            "margin": tuple(margin),
            "cell_dtype": cell_dtype,
        }
        self.subvoxel = bool(subvoxel)
        self.fixed_point_kwargs = {
            "grid_size": int(grid_size),
            "grid_step": int(grid_step),
            "max_iterations": int(max_iterations),
            "max_distance_mm": float(max_distance_mm),
            "min_score": float(min_fixed_point_score),
            "min_fixed_points": int(min_fixed_points),
            "inlier_threshold_mm": float(inlier_threshold_mm),
            "subvoxel": self.subvoxel,
        }
        self.min_confident_score = float(min_confident_score)
        self.max_confident_residual_mm = float(max_confident_residual_mm)
        self.global_consistency = parse_bool(global_consistency, "matcher#global_consistency")
        if not (np.isfinite(global_radius_mm) and global_radius_mm > 0):
            raise SAMv2InputError("matcher#global_radius_mm", f"must be a positive radius, got {global_radius_mm}")
        self.global_radius_mm = float(global_radius_mm)
        if int(min_confident_support) < 0:
            raise SAMv2InputError("matcher#min_confident_support", f"must be a count >= 0, got {min_confident_support}")
        if not (np.isfinite(confident_support_radius_mm) and confident_support_radius_mm > 0):
            raise SAMv2InputError("matcher#confident_support_radius_mm",
                                  f"must be a positive radius, got {confident_support_radius_mm}")
        self.min_confident_support = int(min_confident_support)
        self.confident_support_radius_mm = float(confident_support_radius_mm)
        self.global_map_kwargs = dict(global_map_kwargs or {})
        # query scan -> (its template, the settings, the map): the refiner's local frames match the same pair again
        self._global_maps: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def global_map(self, template: EmbeddedScan, query: EmbeddedScan) -> GlobalMap:
        """The global map template -> query (:func:`~samv2_components.matching.global_map.estimate_global_map`
        with ``global_map_kwargs``), estimated once per pair of prepared scans and reused by later calls."""
        settings = repr(sorted(self.global_map_kwargs.items()))
        cached = self._global_maps.get(query)
        if cached is not None and cached[0]() is template and cached[1] == settings:
            return cached[2]
        global_map = estimate_global_map(template, query, **self.global_map_kwargs)
        self._global_maps[query] = (weakref.ref(template), settings, global_map)
        return global_map

    def prepare(self, heads: Mapping[str, torch.Tensor] | EmbeddedScan) -> EmbeddedScan:
        """An :class:`EmbeddedScan` of ``heads`` (``{head: MetaTensor}``) with this matcher's search settings."""
        return heads if isinstance(heads, EmbeddedScan) else EmbeddedScan(heads, **self.search_kwargs)

    def nearest_neighbour(self, template: EmbeddedScan, query: EmbeddedScan, points_lps) -> tuple:
        """``(points (N, 3) LPS mm, grid scores (N,), template descriptors (N, C))`` by coarse-to-fine NN."""
        descriptors = template.descriptors_at(points_lps)
        voxels, scores = query.search.search(descriptors, subvoxel=self.subvoxel)
        return query.map.voxel_to_world(voxels), scores, descriptors

    def match(
        self,
        template: Mapping[str, torch.Tensor] | EmbeddedScan,
        query: Mapping[str, torch.Tensor] | EmbeddedScan,
        points_lps,
        method: str | None = None,
    ) -> MatchResult:
        """Match template points ``(N, 3)`` (world LPS mm) into the query scan.

        Args:
            template, query: heads dicts or prepared scans (:meth:`prepare`); same heads.
            points_lps: ``(N, 3)`` template points, LPS mm.
            method: overrides the matcher's ``method`` for this call.
        """
        method = method or self.method
        template, query = self.prepare(template), self.prepare(query)
        if template.head_names != query.head_names:
            raise ValueError(f"template heads {template.head_names} and query heads {query.head_names} differ")
        pts = as_points(points_lps)
        nn_points, _, descriptors = self.nearest_neighbour(template, query, pts)
        points, n = nn_points.copy(), len(pts)
        methods = ["nearest_neighbour"] * n
        n_fixed, residual = np.zeros(n, dtype=np.int64), np.full(n, np.nan)
        if method == "fixed_point":
            fixed = fixed_point_match(template, query, pts, **self.fixed_point_kwargs)
            found = np.all(np.isfinite(fixed.points_lps), axis=1)
            points[found] = fixed.points_lps[found]
            methods = ["fixed_point" if f else "nearest_neighbour_fallback" for f in found]
            n_fixed, residual = fixed.n_fixed_points, fixed.residual_mm
        unrestricted = points.copy()
        global_map, prediction, support, flags = None, None, None, [""] * n
        if self.global_consistency:
            global_map = self.global_map(template, query)
            if global_map.valid:
                prediction = global_map(pts)
                support = global_map.local_support(pts, self.confident_support_radius_mm)
                overruled = self._check_against_global(query, descriptors, points, prediction, methods, flags)
        scores = query.score_at(descriptors, points)
        confident = scores >= self.min_confident_score
        confident &= np.array([m not in ("nearest_neighbour_fallback", "global_restricted") for m in methods], dtype=bool)
        confident &= ~(residual > self.max_confident_residual_mm)  # NaN (no fit) passes
        if prediction is not None:
            confident &= ~overruled & (support >= self.min_confident_support)
        return MatchResult(
            points_lps=points,
            scores=scores,
            methods=methods,
            confident=confident,
            n_fixed_points=n_fixed,
            residual_mm=residual,
            nn_points_lps=nn_points,
            global_prediction_lps=prediction,
            global_support=support,
            unrestricted_points_lps=unrestricted if prediction is not None else None,
            flags=flags if prediction is not None else None,
            global_map=global_map,
            predicted_inside=None if prediction is None else _inside_grid(query, prediction),
        )

    def _check_against_global(self, query, descriptors, points, prediction, methods, flags) -> np.ndarray:
        """Replace (in place) the answers farther than ``global_radius_mm`` from the global prediction by the best
        match within that radius of it; return the ``(N,)`` bool mask of the overruled points."""
        distance = np.linalg.norm(points - prediction, axis=1)
        overruled = distance > self.global_radius_mm
        if overruled.any():
            index = np.flatnonzero(overruled)
            restricted, _ = query.search_within(descriptors[torch.as_tensor(index)], prediction[index],
                                                self.global_radius_mm, subvoxel=self.subvoxel)
            for k, i in enumerate(index):
                flags[i] = f"unrestricted match {distance[i]:.0f} mm from the global map's prediction"
                if np.all(np.isfinite(restricted[k])):
                    points[i] = restricted[k]
                    methods[i] = "global_restricted"
                else:
                    flags[i] += "; the prediction lies outside the query scan"
        return overruled

    __call__ = match


def _inside_grid(scan: EmbeddedScan, points_lps: np.ndarray) -> np.ndarray:
    """``(N,)`` bool: the points lie within the scan's fine grid (half a voxel of tolerance)."""
    voxels = scan.map.world_to_voxel(points_lps)
    shape = np.array(scan.map.grid_shape)
    return np.all((voxels >= -0.5) & (voxels <= shape - 0.5), axis=1)
