"""Small real scans shipped with the package so that the bundles and tests run without external data.

See ``README.md`` in this folder (and each bundle's ``docs/data_license.txt``) for provenance and licences.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["SAMPLES", "sample_path", "SAMPLE_DATALIST"]

_HERE = Path(__file__).resolve().parent

#: Decathlon-style training datalist of the sample scans (paths relative to it), for smoke-test training runs
SAMPLE_DATALIST = str(_HERE / "datalist.json")

#: sample name -> (file name, modality, description)
SAMPLES: dict[str, tuple[str, str, str]] = {
    "ct_abdomen": ("ct_abdomen.nii.gz", "ct", "30-slice abdominal CT, 122x101x30 @ 3 mm (TotalSegmentator test data)"),
    "ct_abdomen_labels": ("ct_abdomen_labels.nii.gz", "label", "TotalSegmentator v2 organ labels of ct_abdomen"),
    "ct_abdomen_2": (
        "ct_abdomen_2.nii.gz",
        "ct",
        "20-slice abdominal CT of another subject, 250x172x20 @ 2 mm (TotalSegmentator DICOM test series, resampled)",
    ),
    "ct_abdomen_2_labels": ("ct_abdomen_2_labels.nii.gz", "label", "TotalSegmentator v2 organ labels of ct_abdomen_2"),
    "ct_abdomen_points": ("ct_abdomen_points.csv", "points", "8 organ centroids of ct_abdomen, LPS mm"),
    "ct_abdomen_landmarks": (
        "ct_abdomen_landmarks.csv",
        "points",
        "26 named landmarks of ct_abdomen derived from its labels (name, LPS mm, definition): the annotated template",
    ),
    "ct_abdomen_pairs": (
        "ct_abdomen_pairs.csv",
        "pairs",
        "21 organ-centroid pairs ct_abdomen -> ct_abdomen_2 with query organ radii, LPS mm",
    ),
    "mr_abdomen": ("mr_abdomen.nii.gz", "mr", "abdominal MR, 117x91x20 @ 3 mm (TotalSegmentator test data)"),
    "mr_abdomen_labels": ("mr_abdomen_labels.nii.gz", "label", "TotalSegmentator-MR labels of mr_abdomen"),
    "phantom_ct": ("phantom_ct_3mm.nii.gz", "ct", "porcine phantom CT, 67x67x85 @ 3 mm (TCIA MRI-DIR)"),
    "phantom_mr": ("phantom_mr_t2_3mm.nii.gz", "mr", "porcine phantom T2 MR, 85x85x78 @ 3 mm (TCIA MRI-DIR)"),
}


def sample_path(name: str) -> str:
    """Absolute path of the shipped sample scan ``name`` (one of :data:`SAMPLES`)."""
    if name not in SAMPLES:
        raise KeyError(f"unknown sample {name!r}; available: {', '.join(SAMPLES)}")
    return str(_HERE / SAMPLES[name][0])
