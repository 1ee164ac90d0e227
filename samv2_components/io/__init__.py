"""Reading scans and points, writing points and embedding maps."""

from samv2_components.io.embeddings import SaveEmbeddingsd, case_name, write_embedding_case
from samv2_components.io.image import LoadScand, load_scan, validate_scan
from samv2_components.io.points import PointSet, read_points, write_points

__all__ = [
    "LoadScand",
    "PointSet",
    "SaveEmbeddingsd",
    "case_name",
    "load_scan",
    "read_points",
    "validate_scan",
    "write_embedding_case",
    "write_points",
]
