"""The annotated template shipped with the matching bundle: the sample abdominal CT and its named landmarks.

``LANDMARK_RULES`` derive 26 landmarks from the template's TotalSegmentator label map
(:func:`samv2_components.io.landmarks.derive_landmarks`; ``scripts/make_landmarks.py`` writes them to
``samv2_components/sample_data/ct_abdomen_landmarks.csv``). The template is a 90 mm slab from the lower thorax to
L2, so structures wholly inside it give centroids and the long ones (aorta, vena cava, spinal cord, kidneys, back
muscles) give their cross-section at the lowest slice, the centre and the highest slice of the L1 vertebra.
"""

from __future__ import annotations

from samv2_components.io.landmarks import LandmarkRule

__all__ = ["LANDMARK_RULES", "TEMPLATE_SAMPLE", "TEMPLATE_LANDMARKS_SAMPLE"]

#: the shipped template scan and its landmarks file (names of :mod:`samv2_components.sample_data`)
TEMPLATE_SAMPLE = "ct_abdomen"
TEMPLATE_LANDMARKS_SAMPLE = "ct_abdomen_landmarks"

_WHOLE = ["vertebrae_L1", "gallbladder", "pancreas", "adrenal_gland_right", "adrenal_gland_left",
          "portal_vein_and_splenic_vein", "rib_left_12", "rib_right_12"]
_AT_L1_LEVELS = ["aorta", "inferior_vena_cava", "spinal_cord"]
_AT_L1_CENTRE = ["kidney_right", "kidney_left", "autochthon_left", "autochthon_right", "spleen", "liver"]

LANDMARK_RULES = (
    [LandmarkRule(name, name) for name in _WHOLE]
    + [LandmarkRule(f"{s}_at_L1_{level}", s, "vertebrae_L1", level) for s in _AT_L1_LEVELS
       for level in ("lowest", "centre", "highest")]
    + [LandmarkRule(f"{s}_at_L1_centre", s, "vertebrae_L1", "centre") for s in _AT_L1_CENTRE]
    + [LandmarkRule("vertebrae_T12", "vertebrae_T12", None)]  # nearly whole in the slab (its top slice is cut)
    + [LandmarkRule("stomach_at_L1_highest", "stomach", "vertebrae_L1", "highest"),
       LandmarkRule("colon_at_L1_lowest", "colon", "vertebrae_L1", "lowest")]
)
