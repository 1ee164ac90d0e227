"""Write the shipped annotated template's named landmarks (``samv2_components/sample_data/ct_abdomen_landmarks.csv``).

The template is the sample abdominal CT (``ct_abdomen``, TotalSegmentator's ``example_ct_sm``: a 30-slice crop from
the lower thorax to L2) with its TotalSegmentator label map; every landmark is derived from that map by one rule of
:data:`samv2_components.matching.landmark_template.LANDMARK_RULES` and written with its definition. Only structures
wholly inside the crop give centroids; the others give points at a vertebral level.

    python scripts/make_landmarks.py
"""

from __future__ import annotations

import os
import sys

try:
    import samv2_components  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fire
import nibabel as nib
import numpy as np

from samv2_components.geometry import convert_affine
from samv2_components.io.label_vocabulary import TOTALSEGMENTATOR_CT
from samv2_components.io.landmarks import derive_landmarks, write_landmarks
from samv2_components.matching.landmark_template import LANDMARK_RULES
from samv2_components.sample_data import sample_path


def main(labels: str | None = None, output: str | None = None) -> str:
    """Derive the landmarks from ``labels`` (default: the sample CT's) and write them to ``output``."""
    labels = labels or sample_path("ct_abdomen_labels")
    output = output or os.path.join(os.path.dirname(sample_path("ct_abdomen")), "ct_abdomen_landmarks.csv")
    image = nib.load(labels)
    affine_lps = convert_affine(image.affine, "RAS", "LPS")
    landmarks = derive_landmarks(np.asarray(image.dataobj).astype(np.int64), affine_lps, TOTALSEGMENTATOR_CT.names,
                                 LANDMARK_RULES)
    write_landmarks(landmarks, output)
    print(f"{len(landmarks)} landmarks -> {output}")
    return output


if __name__ == "__main__":
    fire.Fire(main)
