"""Reading scans, points and point pairs; writing points, point pairs, embedding maps and transform files."""

from samv2_components.io.embeddings import SaveEmbeddingsd, case_name, write_embedding_case
from samv2_components.io.image import LoadScand, load_scan, validate_scan
from samv2_components.io.point_pairs import PointPairs, is_point_pairs_file, read_point_pairs, write_point_pairs
from samv2_components.io.points import PointSet, read_points, write_points
from samv2_components.io.transforms import (
    read_itk_transform,
    read_transform_json,
    write_itk_transform,
    write_transform_json,
)

__all__ = [
    "LoadScand",
    "PointPairs",
    "PointSet",
    "SaveEmbeddingsd",
    "case_name",
    "is_point_pairs_file",
    "load_scan",
    "read_point_pairs",
    "read_itk_transform",
    "read_points",
    "read_transform_json",
    "validate_scan",
    "write_embedding_case",
    "write_itk_transform",
    "write_point_pairs",
    "write_points",
    "write_transform_json",
]
