"""Write the Decathlon-style training datalist of the real scans in the shared data folder.

Usage::

    python scripts/prepare_training_data.py --data_root ../shared/data --output datalists/shared_data.json

The list holds every CT and MR volume of the collection except the held-out evaluation scans (kept out of
training so that the evaluation and benchmark scripts measure generalisation):

* ``body_ct/lung2_image.nrrd`` (chest CT) — the known-transform evaluation of the training issue;
* ``body_ct/example_ct_dicom`` + ``example_seg_dicom.nii.gz`` — the inter-subject query of the matching issue.

Labelled scans (organ label maps) feed the semantic head. Paths are written absolute, so the list works from any
working directory on the machine that wrote it. Each entry is checked (file exists, label on its image's grid).
"""

from __future__ import annotations

import json
import os
import sys

try:
    import samv2_components  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fire

from samv2_components.errors import SAMv2Error
from samv2_components.io.datalist import load_training_datalist

#: (image, label or None, modality), relative to the data root
TRAINING_SCANS = [
    ("body_ct/example_ct.nii.gz", None, "ct"),
    ("body_ct/example_ct_sm.nii.gz", "body_ct/example_seg.nii.gz", "ct"),
    ("body_ct/lung1_image.nrrd", None, "ct"),
    ("ct_mr_phantom/ct_2mm.nii.gz", None, "ct"),
    ("body_ct/example_mr_sm.nii.gz", "body_ct/example_seg_mr.nii.gz", "mr"),
    ("brain_mr/T1.nii.gz", None, "mr"),
    ("brain_mr/T2.nii.gz", None, "mr"),
    ("brain_mr/FLAIR.nii.gz", None, "mr"),
    ("brain_mr/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz", None, "mr"),
    ("ct_mr_phantom/mr_t2_2mm.nii.gz", None, "mr"),
]

#: not used: ``head_ct/totalseg_ct_brain_atlas_1mm.nii.gz`` is a brain template whose background is 0, not air at
#: -1000 HU, so CT normalisation would turn its air into soft tissue.

#: held out of training: used by the evaluation and benchmark scripts
HELD_OUT = ["body_ct/lung2_image.nrrd", "body_ct/example_ct_dicom", "body_ct/example_seg_dicom.nii.gz"]


def main(data_root: str = "../shared/data", output: str = "datalists/shared_data.json") -> None:
    """Write the datalist of ``data_root`` to ``output`` and check every entry."""
    root = os.path.abspath(data_root)
    entries = []
    for image, label, modality in TRAINING_SCANS:
        entry = {"image": os.path.join(root, image), "modality": modality}
        if label:
            entry["label"] = os.path.join(root, label)
        entries.append(entry)
    datalist = {"description": f"SAMv2 training scans from {root}", "held_out": HELD_OUT, "training": entries}
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    tmp = output + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(datalist, f, indent=2)
    try:
        load_training_datalist(tmp)
    except SAMv2Error as error:
        os.remove(tmp)
        sys.stderr.write(f"ERROR: {error}\n")
        sys.exit(1)
    os.replace(tmp, output)
    n_labelled = sum("label" in e for e in entries)
    print(f"wrote {output}: {len(entries)} scans ({n_labelled} labelled)")


if __name__ == "__main__":
    fire.Fire(main)
