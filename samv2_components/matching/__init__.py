"""Point matching with SAMv2 embeddings: template point (world, LPS mm) -> corresponding query point.

* :class:`SAMv2Matcher` — the configurable front door: nearest-neighbour or fixed-point matching, scores, flags;
* :class:`EmbeddedScan` — one scan's heads prepared once (descriptor map + coarse-to-fine search index);
* :mod:`.nearest_neighbour` — descriptor and score conventions, exhaustive NN (the reference);
* :mod:`.coarse_to_fine` — the fast NN search; :mod:`.fixed_point` — fixed-point matching;
* :mod:`.affine_fit` — robust affine fit; :mod:`.workflow` — the bundle's template and per-query transform;
* :mod:`.refinement` — sub-voxel refinement of matches by local intensity registration (beyond the paper);
* :mod:`.patch_affine` — its batched local affine registration of one patch per point.
"""

from samv2_components.matching.affine_fit import AffineFit, fit_affine, fit_affine_robust
from samv2_components.matching.coarse_to_fine import CoarseToFineSearch
from samv2_components.matching.embedded_scan import EmbeddedScan
from samv2_components.matching.evaluation import MatchingEvaluation
from samv2_components.matching.fixed_point import FixedPointResult, fixed_point_match
from samv2_components.matching.matcher import METHODS, MatchResult, SAMv2Matcher
from samv2_components.matching.nearest_neighbour import (
    DescriptorMap,
    descriptor_at_points,
    match_nearest_neighbour,
    nearest_neighbour_search,
    present_heads,
    query_descriptor_map,
)
from samv2_components.matching.patch_affine import AffineLevel, PatchAffineResult, register_patches
from samv2_components.matching.refinement import LocalIntensityRefiner, RefinementResult
from samv2_components.matching.workflow import MatchingTemplate, MatchPointsd, check_modality_pair, points_outside_scan

__all__ = [
    "AffineFit",
    "fit_affine",
    "fit_affine_robust",
    "CoarseToFineSearch",
    "EmbeddedScan",
    "MatchingEvaluation",
    "FixedPointResult",
    "fixed_point_match",
    "METHODS",
    "MatchResult",
    "SAMv2Matcher",
    "LocalIntensityRefiner",
    "RefinementResult",
    "AffineLevel",
    "PatchAffineResult",
    "register_patches",
    "DescriptorMap",
    "descriptor_at_points",
    "match_nearest_neighbour",
    "nearest_neighbour_search",
    "present_heads",
    "query_descriptor_map",
    "MatchingTemplate",
    "MatchPointsd",
    "check_modality_pair",
    "points_outside_scan",
]
