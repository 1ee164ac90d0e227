"""Point matching with SAMv2 embeddings: template point (world, LPS mm) -> corresponding query point.

Currently the exhaustive nearest-neighbour matcher (:func:`match_nearest_neighbour`); see
:mod:`samv2_components.matching.nearest_neighbour` for the descriptor, score and coordinate conventions.
"""

from samv2_components.matching.nearest_neighbour import (
    DescriptorMap,
    descriptor_at_points,
    match_nearest_neighbour,
    present_heads,
    query_descriptor_map,
)

__all__ = [
    "DescriptorMap",
    "descriptor_at_points",
    "match_nearest_neighbour",
    "present_heads",
    "query_descriptor_map",
]
