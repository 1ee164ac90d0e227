"""Ground-truth point pairs between two subjects from their organ label maps (inter-subject matching benchmark).

For every label present in both label maps with at least ``--min_voxels`` voxels in each, the pair is (template
organ centroid, query organ centroid), world **LPS** mm, with ``radius_mm`` = the radius of the sphere with the
query organ's volume (for CPM@Radius). Written as a pairs CSV (:mod:`samv2_components.io.point_pairs`).

Organ centroids are an approximate correspondence between two people, and a scan that cuts an organ off moves
its centroid toward the covered part: these pairs measure "lands on the same organ, near its centre", not
landmark precision. Label ids follow TotalSegmentator v2; names are given for the ids listed in
:data:`TOTALSEGMENTATOR_NAMES`, other ids are named ``label_<id>``.

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
import numpy as np

from samv2_components.errors import install_cli_error_handler
from samv2_components.geometry import label_centroids
from samv2_components.io.image import load_scan
from samv2_components.io.point_pairs import PointPairs, write_point_pairs
from samv2_components.io.points import PointSet

#: TotalSegmentator v2 ("total" task) names of the label ids that occur in the sample data.
TOTALSEGMENTATOR_NAMES = {
    1: "spleen", 2: "kidney_right", 3: "kidney_left", 4: "gallbladder", 5: "liver", 6: "stomach", 7: "pancreas",
    8: "adrenal_gland_right", 9: "adrenal_gland_left", 18: "small_bowel", 19: "duodenum", 20: "colon",
    30: "vertebrae_L2", 31: "vertebrae_L1", 32: "vertebrae_T12", 33: "vertebrae_T11", 52: "aorta",
    63: "inferior_vena_cava", 64: "portal_vein_and_splenic_vein", 69: "humerus_left", 70: "humerus_right",
    79: "spinal_cord", 86: "autochthon_left", 87: "autochthon_right", 88: "iliopsoas_left", 89: "iliopsoas_right",
    **{92 + i: f"rib_left_{i + 1}" for i in range(12)},
    **{104 + i: f"rib_right_{i + 1}" for i in range(12)},
    116: "sternum", 117: "costal_cartilages",
}


def organ_pairs(template_labels, query_labels, min_voxels: int = 50) -> PointPairs:
    """Pairs of organ centroids shared by two label maps (paths or MetaTensors), LPS mm, with query radii."""
    maps = [load_scan(p, check_intensities=False) if isinstance(p, (str, os.PathLike)) else p
            for p in (template_labels, query_labels)]
    centroids = [label_centroids(m, min_voxels=min_voxels) for m in maps]
    shared = sorted(set(centroids[0]) & set(centroids[1]))
    if not shared:
        raise ValueError("the two label maps share no label with enough voxels")
    voxel_mm3 = abs(float(np.linalg.det(np.asarray(maps[1].affine, dtype=np.float64)[:3, :3])))
    radii = [(3.0 * float((maps[1] == k).sum()) * voxel_mm3 / (4.0 * math.pi)) ** (1.0 / 3.0) for k in shared]
    names = [TOTALSEGMENTATOR_NAMES.get(k, f"label_{k}") for k in shared]
    return PointPairs(
        PointSet(names, [centroids[0][k] for k in shared], "LPS"),
        PointSet(names, [centroids[1][k] for k in shared], "LPS"),
        np.asarray(radii),
    )


def main(template_labels: str, query_labels: str, output: str, min_voxels: int = 50) -> None:
    """Write the organ-centroid pairs CSV of two label maps to ``output``."""
    pairs = organ_pairs(template_labels, query_labels, min_voxels)
    write_point_pairs(pairs, output)
    print(f"{len(pairs)} pairs -> {output}")


if __name__ == "__main__":
    install_cli_error_handler()
    fire.Fire(main)
