"""One list of structure names for label maps from different sources (TotalSegmentator, AMOS, 3D Slicer, AAL, ...).

Label ids mean different things in different sources (TotalSegmentator CT calls the liver 5, AMOS 6, the
TotalSegmentator MR model 5 again but its 10 is a lung, not a lobe). The prototypical loss with prototypes over
the whole batch (paper Eq. 2, :class:`~samv2_components.losses.PrototypeContrastiveLoss` with
``per_sample=False``) pulls a class together *across* scans, which is what inter-subject matching needs, and that
only works when the same structure has the same id in every scan. :func:`harmonise_labels` maps a source's ids to

* the id of a **common structure name** (``COMMON_STRUCTURES``; id = position + 1) where the source's structure
  has one, coarsened where sources disagree on granularity (every rib is ``ribs``, every vertebra ``vertebrae``,
  lung lobes are ``lung_left`` / ``lung_right``), or
* a **per-source id** ``SOURCE_ID_BLOCK * source.block + original id`` where no common name exists (e.g. an AAL
  cortical parcel), so that it stays a class of its own and never collides with another source's id.

Background (0) stays 0. ``vocabulary_rows`` gives the mapping as a table for the docs.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "COMMON_STRUCTURES",
    "SOURCE_ID_BLOCK",
    "LabelSource",
    "TOTALSEGMENTATOR_CT",
    "TOTALSEGMENTATOR_MR",
    "AMOS",
    "common_id",
    "common_name",
    "harmonise_labels",
    "aal_source",
    "freesurfer_source",
    "slicer_segmentation_source",
    "vocabulary_rows",
]

#: Structure names shared between sources; a structure's common id is its position + 1.
COMMON_STRUCTURES: tuple[str, ...] = (
    # abdomen
    "spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "stomach", "pancreas",
    "adrenal_gland_right", "adrenal_gland_left", "esophagus", "duodenum", "small_bowel", "colon",
    "urinary_bladder", "prostate",
    # vessels, chest
    "aorta", "inferior_vena_cava", "portal_vein_and_splenic_vein", "heart", "lung_left", "lung_right", "trachea",
    # skeleton, muscles
    "vertebrae", "ribs", "sternum", "costal_cartilages", "sacrum", "spinal_cord", "intervertebral_discs",
    "humerus_left", "humerus_right", "femur_left", "femur_right", "hip_left", "hip_right",
    "autochthon_left", "autochthon_right", "iliopsoas_left", "iliopsoas_right",
    # brain
    "brain", "caudate_left", "caudate_right", "putamen_left", "putamen_right", "pallidum_left", "pallidum_right",
    "thalamus_left", "thalamus_right", "hippocampus_left", "hippocampus_right", "amygdala_left", "amygdala_right",
)
_COMMON_IDS = {name: i + 1 for i, name in enumerate(COMMON_STRUCTURES)}

#: Per-source ids are ``SOURCE_ID_BLOCK * block + original id``; original ids must stay below it.
SOURCE_ID_BLOCK = 1000


def common_id(name: str) -> int:
    """Common id of a structure name of :data:`COMMON_STRUCTURES` (KeyError for any other name)."""
    return _COMMON_IDS[name]


def common_name(label_id: int) -> str | None:
    """Name of a common id, or None for background and per-source ids."""
    return COMMON_STRUCTURES[label_id - 1] if 1 <= label_id <= len(COMMON_STRUCTURES) else None


@dataclass(frozen=True)
class LabelSource:
    """A label vocabulary: ``names`` (original id -> the source's own name) and ``common`` (original id -> a name of
    :data:`COMMON_STRUCTURES`, for the ids that have one). ``block`` (>= 1) numbers its per-source ids."""

    name: str
    block: int
    names: Mapping[int, str]
    common: Mapping[int, str] = field(default_factory=dict)

    def __post_init__(self):
        if self.block < 1:
            raise ValueError(f"{self.name}: block must be >= 1, got {self.block}")
        unknown = sorted(set(self.common.values()) - set(_COMMON_IDS))
        if unknown:
            raise ValueError(f"{self.name}: not common structure names: {unknown}")
        too_large = [k for k in self.names if not 0 < k < SOURCE_ID_BLOCK]
        if too_large:
            raise ValueError(f"{self.name}: label ids must be in 1..{SOURCE_ID_BLOCK - 1}, got {too_large[:5]}")

    def harmonised_id(self, original: int) -> int:
        """The id ``original`` gets in the common vocabulary (0 stays 0)."""
        if original == 0:
            return 0
        if original in self.common:
            return _COMMON_IDS[self.common[original]]
        if not 0 < original < SOURCE_ID_BLOCK:
            raise ValueError(f"{self.name}: label id {original} outside 1..{SOURCE_ID_BLOCK - 1}")
        return SOURCE_ID_BLOCK * self.block + original


def harmonise_labels(labels: np.ndarray, source: LabelSource) -> np.ndarray:
    """Map an integer label array of ``source`` to the common vocabulary (int16 array of the same shape).

    Ids absent from ``source.names`` are kept as per-source ids too (a label map may hold ids its vocabulary file
    does not name); the caller decides whether that is an error.
    """
    labels = np.asarray(labels)
    present = np.unique(labels)
    lut = {int(k): source.harmonised_id(int(k)) for k in present}
    out = np.zeros(labels.shape, dtype=np.int16)
    for original, new in lut.items():
        if new:
            out[labels == original] = new
    return out


# ---------------------------------------------------------------------------------------------------------------
# built-in sources
# ---------------------------------------------------------------------------------------------------------------

_TOTALSEG_CT_NAMES = {
    1: "spleen", 2: "kidney_right", 3: "kidney_left", 4: "gallbladder", 5: "liver", 6: "stomach", 7: "pancreas",
    8: "adrenal_gland_right", 9: "adrenal_gland_left", 10: "lung_upper_lobe_left", 11: "lung_lower_lobe_left",
    12: "lung_upper_lobe_right", 13: "lung_middle_lobe_right", 14: "lung_lower_lobe_right", 15: "esophagus",
    16: "trachea", 17: "thyroid_gland", 18: "small_bowel", 19: "duodenum", 20: "colon", 21: "urinary_bladder",
    22: "prostate", 23: "kidney_cyst_left", 24: "kidney_cyst_right", 25: "sacrum", 26: "vertebrae_S1",
    **{27 + i: f"vertebrae_L{5 - i}" for i in range(5)},
    **{32 + i: f"vertebrae_T{12 - i}" for i in range(12)},
    **{44 + i: f"vertebrae_C{7 - i}" for i in range(7)},
    51: "heart", 52: "aorta", 53: "pulmonary_vein", 54: "brachiocephalic_trunk", 55: "subclavian_artery_right",
    56: "subclavian_artery_left", 57: "common_carotid_artery_right", 58: "common_carotid_artery_left",
    59: "brachiocephalic_vein_left", 60: "brachiocephalic_vein_right", 61: "atrial_appendage_left",
    62: "superior_vena_cava", 63: "inferior_vena_cava", 64: "portal_vein_and_splenic_vein", 65: "iliac_artery_left",
    66: "iliac_artery_right", 67: "iliac_vena_left", 68: "iliac_vena_right", 69: "humerus_left", 70: "humerus_right",
    71: "scapula_left", 72: "scapula_right", 73: "clavicula_left", 74: "clavicula_right", 75: "femur_left",
    76: "femur_right", 77: "hip_left", 78: "hip_right", 79: "spinal_cord", 80: "gluteus_maximus_left",
    81: "gluteus_maximus_right", 82: "gluteus_medius_left", 83: "gluteus_medius_right", 84: "gluteus_minimus_left",
    85: "gluteus_minimus_right", 86: "autochthon_left", 87: "autochthon_right", 88: "iliopsoas_left",
    89: "iliopsoas_right", 90: "brain", 91: "skull",
    **{92 + i: f"rib_left_{i + 1}" for i in range(12)},
    **{104 + i: f"rib_right_{i + 1}" for i in range(12)},
    116: "sternum", 117: "costal_cartilages",
}


def _coarsened(names: Mapping[int, str]) -> dict[int, str]:
    """Common names of a TotalSegmentator-style vocabulary: equal names, and the granularity the sources share."""
    out = {}
    for k, name in names.items():
        if name in _COMMON_IDS:
            out[k] = name
        elif name.startswith("vertebrae_") and name != "vertebrae_S1":
            out[k] = "vertebrae"
        elif name.startswith("rib_"):
            out[k] = "ribs"
        elif name.startswith("lung_") and name.endswith(("_left", "_right")):
            out[k] = "lung_" + name.rsplit("_", 1)[1]
    return out


#: TotalSegmentator v2, task "total" (CT), 117 classes; ids checked on the shared data by organ position.
TOTALSEGMENTATOR_CT = LabelSource("totalsegmentator_ct", 1, _TOTALSEG_CT_NAMES, _coarsened(_TOTALSEG_CT_NAMES))

_TOTALSEG_MR_NAMES = {
    1: "spleen", 2: "kidney_right", 3: "kidney_left", 4: "gallbladder", 5: "liver", 6: "stomach", 7: "pancreas",
    8: "adrenal_gland_right", 9: "adrenal_gland_left", 10: "lung_left", 11: "lung_right", 12: "esophagus",
    13: "small_bowel", 14: "duodenum", 15: "colon", 16: "urinary_bladder", 17: "prostate", 18: "sacrum",
    19: "vertebrae", 20: "intervertebral_discs", 21: "spinal_cord", 22: "heart", 23: "aorta",
    24: "inferior_vena_cava", 25: "portal_vein_and_splenic_vein", 26: "iliac_artery_left", 27: "iliac_artery_right",
    28: "iliac_vena_left", 29: "iliac_vena_right", 30: "humerus_left", 31: "humerus_right", 32: "scapula_left",
    33: "scapula_right", 34: "clavicula_left", 35: "clavicula_right", 36: "femur_left", 37: "femur_right",
    38: "hip_left", 39: "hip_right", 40: "gluteus_maximus_left", 41: "gluteus_maximus_right",
    42: "gluteus_medius_left", 43: "gluteus_medius_right", 44: "gluteus_minimus_left", 45: "gluteus_minimus_right",
    46: "autochthon_left", 47: "autochthon_right", 48: "iliopsoas_left", 49: "iliopsoas_right", 50: "brain",
}
#: TotalSegmentator v2, task "total_mr"; ids checked on the shared data by organ position (left/right, anterior).
TOTALSEGMENTATOR_MR = LabelSource("totalsegmentator_mr", 2, _TOTALSEG_MR_NAMES, _coarsened(_TOTALSEG_MR_NAMES))

_AMOS_NAMES = {
    1: "spleen", 2: "kidney_right", 3: "kidney_left", 4: "gallbladder", 5: "esophagus", 6: "liver", 7: "stomach",
    8: "aorta", 9: "inferior_vena_cava", 10: "pancreas", 11: "adrenal_gland_right", 12: "adrenal_gland_left",
    13: "duodenum", 14: "urinary_bladder", 15: "prostate",
}
#: AMOS 2022 (15 abdominal organs), the numbering of the AMOS label maps.
AMOS = LabelSource("amos", 3, _AMOS_NAMES, dict(_AMOS_NAMES))

#: 3D Slicer segment names (lower case) that have a common name.
_SLICER_COMMON = {
    "ribs": "ribs", "rib": "ribs", "cervical vertebral column": "vertebrae", "thoracic vertebral column": "vertebrae",
    "lumbar vertebral column": "vertebrae", "right lung": "lung_right", "left lung": "lung_left",
    "liver": "liver", "spleen": "spleen", "heart": "heart", "aorta": "aorta",
}


def slicer_segmentation_source(segments: Mapping[int, str], name: str = "slicer", block: int = 4) -> LabelSource:
    """A source from a 3D Slicer segmentation's ``{label value: segment name}`` (``Segment<k>_LabelValue`` /
    ``Segment<k>_Name`` of a ``.seg.nrrd``)."""
    names = {int(k): str(v) for k, v in segments.items()}
    common = {k: _SLICER_COMMON[v.strip().lower()] for k, v in names.items() if v.strip().lower() in _SLICER_COMMON}
    return LabelSource(name, block, names, common)


def _read_id_name_lines(path: str | os.PathLike) -> dict[int, str]:
    """``<id> <name> ...`` lines of a names/LUT text file (comments and blank lines skipped)."""
    names = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and not parts[0].startswith("#") and parts[0].isdigit() and int(parts[0]) > 0:
                names[int(parts[0])] = parts[1]
    if not names:
        raise ValueError(f"{path}: no '<id> <name>' lines")
    return names


_SIDE = {"L": "left", "R": "right", "Left": "left", "Right": "right"}
_BRAIN_COMMON = {"Caudate": "caudate", "Putamen": "putamen", "Pallidum": "pallidum", "Thalamus": "thalamus",
                 "Hippocampus": "hippocampus", "Amygdala": "amygdala"}


def aal_source(names_file: str | os.PathLike, block: int = 5) -> LabelSource:
    """The AAL atlas (``<id> <Region_L|R> ...`` lines, e.g. MRIcron's ``aal.nii.txt``): the six subcortical nuclei
    of both sides get common names, the cortical and cerebellar parcels per-source ids."""
    names = _read_id_name_lines(names_file)
    common = {}
    for k, name in names.items():
        match = re.fullmatch(r"([A-Za-z]+)_([LR])", name)
        if match and match.group(1) in _BRAIN_COMMON:
            common[k] = f"{_BRAIN_COMMON[match.group(1)]}_{_SIDE[match.group(2)]}"
    return LabelSource("aal", block, names, common)


def freesurfer_source(lut_file: str | os.PathLike, block: int = 6, ids: Iterable[int] | None = None) -> LabelSource:
    """FreeSurfer ``aseg`` labels from a colour look-up table (``FreeSurferColorLUT.txt``); ``ids`` restricts it
    to the labels a map holds (the LUT names thousands). Nuclei and hippocampus/amygdala get common names."""
    names = _read_id_name_lines(lut_file)
    if ids is not None:
        keep = {int(i) for i in ids}
        names = {k: v for k, v in names.items() if k in keep}
    names = {k: v for k, v in names.items() if k < SOURCE_ID_BLOCK}
    common = {}
    for k, name in names.items():
        match = re.fullmatch(r"(Left|Right)-([A-Za-z]+)", name)
        if match and match.group(2) in _BRAIN_COMMON:
            common[k] = f"{_BRAIN_COMMON[match.group(2)]}_{_SIDE[match.group(1)]}"
    return LabelSource("freesurfer_aseg", block, names, common)


def vocabulary_rows(sources: Iterable[LabelSource]) -> list[tuple[str, int, str, int, str]]:
    """``(source, original id, source name, harmonised id, common name or "")`` for every id of every source."""
    rows = []
    for source in sources:
        for k in sorted(source.names):
            new = source.harmonised_id(k)
            rows.append((source.name, k, source.names[k], new, common_name(new) or ""))
    return rows
