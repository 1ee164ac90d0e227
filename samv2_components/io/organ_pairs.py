"""Ground-truth point pairs between two subjects from their organ label maps (inter-subject matching benchmarks).

For every structure labelled in both maps with at least ``min_voxels`` voxels in each, the pair is (template organ
centroid, query organ centroid), world **LPS** mm, with ``radius_mm`` = the radius of the sphere with the query
organ's volume (for CPM@radius).

Two label maps of the same vocabulary are paired by id and named by that vocabulary (``source``, default
TotalSegmentator CT). Maps of different vocabularies (e.g. TotalSegmentator and AMOS) are first harmonised to the
common structure names (:mod:`samv2_components.io.label_vocabulary`) and paired by common name; structures without
a common name are left out.

Organ centroids are an approximate correspondence between two people, and a scan that cuts an organ off moves its
centroid toward the covered part: these pairs measure "lands on the same organ, near its centre", not landmark
precision.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from samv2_components.geometry import label_centroids
from samv2_components.io.image import load_scan
from samv2_components.io.label_vocabulary import TOTALSEGMENTATOR_CT, LabelSource, common_name, harmonise_labels
from samv2_components.io.point_pairs import PointPairs
from samv2_components.io.points import PointSet

__all__ = ["organ_centroid_pairs", "common_label_centroids", "labels_cut_by_field_of_view"]


def _label_map(value):
    return load_scan(value, check_intensities=False) if isinstance(value, (str, os.PathLike)) else value


def _harmonised(label_map, source: LabelSource):
    array = label_map.detach().cpu().numpy().astype(np.int64)
    out = label_map.clone()
    out.data = torch.from_numpy(harmonise_labels(array, source).astype(np.float32))
    return out


def organ_centroid_pairs(
    template_labels,
    query_labels,
    min_voxels: int = 50,
    source: LabelSource = TOTALSEGMENTATOR_CT,
    template_source: LabelSource | None = None,
    query_source: LabelSource | None = None,
) -> PointPairs:
    """Pairs of organ centroids shared by two label maps (paths or channel-first MetaTensors), LPS mm.

    Args:
        template_labels, query_labels: label maps (files any ITK reader takes, or loaded ``MetaTensor`` s).
        min_voxels: smallest organ (voxels) taken in either map.
        source: the vocabulary of both maps when they share one (names of the pairs).
        template_source, query_source: the two maps' vocabularies when they differ; both or neither.

    Raises:
        ValueError: only one of ``template_source`` / ``query_source`` given, or no shared structure.
    """
    if (template_source is None) != (query_source is None):
        raise ValueError("give both template_source and query_source, or neither")
    maps = [_label_map(template_labels), _label_map(query_labels)]
    if template_source is not None:
        maps = [_harmonised(maps[0], template_source), _harmonised(maps[1], query_source)]
    centroids = [label_centroids(m, min_voxels=min_voxels) for m in maps]
    shared = sorted(set(centroids[0]) & set(centroids[1]))
    if template_source is not None:
        shared = [k for k in shared if common_name(k) is not None]  # per-source ids mean different things
        names = [common_name(k) for k in shared]
    else:
        names = [source.names.get(k, f"label_{k}") for k in shared]
    if not shared:
        raise ValueError("the two label maps share no structure with enough voxels")
    voxel_mm3 = abs(float(np.linalg.det(np.asarray(maps[1].affine, dtype=np.float64)[:3, :3])))
    radii = [(3.0 * float((maps[1] == k).sum()) * voxel_mm3 / (4.0 * math.pi)) ** (1.0 / 3.0) for k in shared]
    return PointPairs(
        PointSet(names, [centroids[0][k] for k in shared], "LPS"),
        PointSet(names, [centroids[1][k] for k in shared], "LPS"),
        np.asarray(radii),
    )


def labels_cut_by_field_of_view(label_map) -> set[int]:
    """Label ids of a channel-first label map ``(1, X, Y, Z)`` that touch a face of the volume (cut off by the
    field of view, so their centroid is biased toward the covered part)."""
    a = label_map.detach().cpu().numpy()[0]
    faces = [a[0], a[-1], a[:, 0], a[:, -1], a[:, :, 0], a[:, :, -1]]
    return {int(v) for f in faces for v in np.unique(f)} - {0}


def common_label_centroids(fixed_labels, moving_labels, min_voxels: int = 50) -> tuple[dict, dict, set[int]]:
    """Centroids (world LPS mm, ``{id: (3,)}``) of the label ids present in both maps (paths or loaded
    ``MetaTensor`` s) with >= ``min_voxels`` voxels in each, paired by id (one vocabulary), for the fixed and the
    moving map, and the ids of those cut by either field of view (:func:`labels_cut_by_field_of_view`)."""
    fl, ml = _label_map(fixed_labels), _label_map(moving_labels)
    f, m = label_centroids(fl, min_voxels=min_voxels), label_centroids(ml, min_voxels=min_voxels)
    common = sorted(set(f) & set(m))
    cut = (labels_cut_by_field_of_view(fl) | labels_cut_by_field_of_view(ml)) & set(common)
    return {k: f[k] for k in common}, {k: m[k] for k in common}, cut
