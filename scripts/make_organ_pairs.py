"""Ground-truth point pairs between two subjects from their organ label maps (inter-subject matching benchmark).

For every label present in both label maps with at least ``--min_voxels`` voxels in each, the pair is (template
organ centroid, query organ centroid), world **LPS** mm, with ``radius_mm`` = the radius of the sphere with the
query organ's volume (for CPM@Radius). Written as a pairs CSV (:mod:`samv2_components.io.point_pairs`).

Organ centroids are an approximate correspondence between two people (see
:mod:`samv2_components.io.organ_pairs`). Label ids follow TotalSegmentator v2 unless ``--template_source`` /
``--query_source`` say otherwise; maps of different vocabularies are paired by common structure name.

Example (the shipped sample pair)::

    python scripts/make_organ_pairs.py samv2_components/sample_data/ct_abdomen_labels.nii.gz \\
        samv2_components/sample_data/ct_abdomen_2_labels.nii.gz samv2_components/sample_data/ct_abdomen_pairs.csv
"""

from __future__ import annotations

import math
import os
import sys

try:
    import samv2_components  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fire

from samv2_components.errors import install_cli_error_handler
from samv2_components.io.label_vocabulary import AMOS, TOTALSEGMENTATOR_CT, TOTALSEGMENTATOR_MR
from samv2_components.io.organ_pairs import organ_centroid_pairs
from samv2_components.io.point_pairs import write_point_pairs

SOURCES = {s.name: s for s in (TOTALSEGMENTATOR_CT, TOTALSEGMENTATOR_MR, AMOS)}


def main(
    template_labels: str,
    query_labels: str,
    output: str,
    min_voxels: int = 50,
    template_source: str = "totalsegmentator_ct",
    query_source: str | None = None,
) -> None:
    """Write the organ-centroid pairs CSV of two label maps to ``output``.

    ``template_source`` / ``query_source``: the maps' label vocabularies (``totalsegmentator_ct``,
    ``totalsegmentator_mr``, ``amos``); when the query's differs, the maps are paired by common structure name.
    """
    for name in (template_source, query_source):
        if name is not None and name not in SOURCES:
            raise SystemExit(f"unknown label source {name!r}; one of {sorted(SOURCES)}")
    if query_source is None or query_source == template_source:
        pairs = organ_centroid_pairs(template_labels, query_labels, min_voxels, source=SOURCES[template_source])
    else:
        pairs = organ_centroid_pairs(template_labels, query_labels, min_voxels,
                                     template_source=SOURCES[template_source], query_source=SOURCES[query_source])
    write_point_pairs(pairs, output)
    print(f"{len(pairs)} pairs -> {output}")


if __name__ == "__main__":
    install_cli_error_handler()
    fire.Fire(main)
