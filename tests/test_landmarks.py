"""Named landmarks: derived from a label map by stated rules (``samv2_components.io.landmarks``), the shipped
annotated template (``ct_abdomen_landmarks.csv``), and ``samv2 landmarks`` (the matching bundle with
``configs/landmarks.json``): found on a known transform of the template, reported absent where the query does not
hold their anatomy."""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest

from samv2_components.cli import main
from samv2_components.errors import SAMv2InputError
from samv2_components.geometry import convert_affine
from samv2_components.io.label_vocabulary import TOTALSEGMENTATOR_CT
from samv2_components.io.landmarks import LandmarkRule, derive_available_landmarks, derive_landmarks, read_landmarks
from samv2_components.matching.landmark_template import LANDMARK_RULES, TEMPLATE_LANDMARKS_SAMPLE, TEMPLATE_SAMPLE
from samv2_components.sample_data import sample_path


def test_rules_give_centroids_and_level_cross_sections_in_lps():
    """A 'vertebra' (label 1) in z 4..8 and a 'vessel' (label 2) running through every slice at a slope: the
    vessel at the vertebra's centre / lowest / highest slice is the vessel's cross-section there."""
    labels = np.zeros((20, 20, 12), np.int64)
    labels[8:12, 8:12, 4:9] = 1
    for z in range(12):
        labels[2 + z // 2, 3, z] = 2
    affine_ras = np.diag([2.0, 2.0, 3.0, 1.0])
    affine_lps = convert_affine(affine_ras, "RAS", "LPS")
    names = {1: "vertebra", 2: "vessel"}
    rules = [LandmarkRule("v", "vertebra"), LandmarkRule("vessel_low", "vessel", "vertebra", "lowest"),
             LandmarkRule("vessel_mid", "vessel", "vertebra", "centre"), LandmarkRule("vessel_high", "vessel", "vertebra", "highest")]
    v, low, mid, high = derive_landmarks(labels, affine_lps, names, rules)

    def lps(i, j, k):  # voxel -> LPS: x = -2i, y = -2j, z = 3k
        return (-2.0 * i, -2.0 * j, 3.0 * k)

    np.testing.assert_allclose(v.position_lps, lps(9.5, 9.5, 6.0))
    np.testing.assert_allclose(low.position_lps, lps(2 + 4 // 2, 3, 4))
    np.testing.assert_allclose(mid.position_lps, lps(2 + 6 // 2, 3, 6))
    np.testing.assert_allclose(high.position_lps, lps(2 + 8 // 2, 3, 8))
    assert high.definition == "centroid of the vessel label in the axial slice at the highest (most superior) slice of the vertebra label"
    # the index axis running downwards: lowest and highest follow the world, not the index
    flipped = derive_landmarks(labels[:, :, ::-1], affine_lps @ np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, -1, 11], [0, 0, 0, 1.0]]),
                               names, rules)
    for a, b in zip(flipped, (v, low, mid, high)):
        np.testing.assert_allclose(a.position_lps, b.position_lps, atol=1e-9)
    with pytest.raises(SAMv2InputError, match="liver: not in the label map"):
        derive_landmarks(labels, affine_lps, {**names, 3: "liver"}, [LandmarkRule("l", "liver")])



def test_available_landmarks_are_derived_and_missing_ones_are_none():
    """On another scan's label map (the truth of a landmark search): every rule whose structures are there gives the
    point derive_landmarks gives; a missing structure or a reference level without the structure gives None."""
    labels = np.zeros((20, 20, 12), np.int64)
    labels[8:12, 8:12, 4:9] = 1  # "vertebra" in z 4..8
    labels[3, 3, 0:3] = 2  # "vessel" only below the vertebra
    affine_lps = convert_affine(np.diag([2.0, 2.0, 3.0, 1.0]), "RAS", "LPS")
    names = {1: "vertebra", 2: "vessel", 3: "liver"}
    rules = [LandmarkRule("v", "vertebra"), LandmarkRule("liver", "liver"),
             LandmarkRule("vessel_mid", "vessel", "vertebra", "centre"), LandmarkRule("vessel", "vessel")]
    found = derive_available_landmarks(labels, affine_lps, names, rules)
    assert list(found) == ["v", "liver", "vessel_mid", "vessel"]
    assert found["liver"] is None and found["vessel_mid"] is None
    np.testing.assert_allclose(found["v"], derive_landmarks(labels, affine_lps, names, rules[:1])[0].position_lps)
    np.testing.assert_allclose(found["vessel"], (-6.0, -6.0, 3.0))

def test_the_shipped_template_landmarks_are_what_the_rules_derive():
    landmarks = read_landmarks(sample_path(TEMPLATE_LANDMARKS_SAMPLE))
    assert len(landmarks) >= 20 and len({lm.name for lm in landmarks}) == len(landmarks)
    image = nib.load(sample_path("ct_abdomen_labels"))
    derived = derive_landmarks(np.asarray(image.dataobj).astype(np.int64), convert_affine(image.affine, "RAS", "LPS"),
                               TOTALSEGMENTATOR_CT.names, LANDMARK_RULES)
    assert [lm.name for lm in landmarks] == [lm.name for lm in derived]
    for shipped, fresh in zip(landmarks, derived):
        np.testing.assert_allclose(shipped.position_lps, fresh.position_lps, atol=1e-3)
        assert shipped.definition == fresh.definition and shipped.definition.startswith("centroid of the")
    assert TEMPLATE_SAMPLE == "ct_abdomen"


def _run_landmarks(query, out, capsys):
    status = main(["landmarks", "--query", str(query), "--output_dir", str(out), "--write_qc", "false"])
    captured = capsys.readouterr()
    assert status == 0, captured.err[-2000:]
    (folder,) = captured.out.splitlines()
    with open(os.path.join(folder, "matches.json"), encoding="utf-8") as f:
        return folder, json.load(f)


def test_landmarks_outside_a_slab_are_absent_not_placed(tmp_path, capsys):
    """The template's own upper 12 slices (36 mm, from the top of L1 up) as the query: the landmarks at L1's lowest
    slice and the gallbladder below it are not in it and are reported absent; those in it are placed."""
    image = nib.load(sample_path("ct_abdomen"))
    top = image.slicer[:, :, 18:]
    path = tmp_path / "upper_slab.nii.gz"
    nib.save(top, str(path))
    folder, record = _run_landmarks(path, tmp_path / "out", capsys)
    absent = {a["name"] for a in record["absent"]}
    placed = {p["name"] for p in record["points"]}
    assert {"aorta_at_L1_lowest", "inferior_vena_cava_at_L1_lowest", "spinal_cord_at_L1_lowest", "gallbladder"} <= absent
    assert {"adrenal_gland_left", "spinal_cord_at_L1_highest"} <= placed
    assert absent.isdisjoint(placed) and len(absent) + len(placed) == 26
    for suffix in (".csv", ".mrk.json"):
        assert os.path.isfile(os.path.join(folder, "ct_abdomen_landmarks" + suffix))
    with open(os.path.join(folder, "ct_abdomen_landmarks.mrk.json"), encoding="utf-8") as f:
        markups = json.load(f)
    assert len(markups["markups"][0]["controlPoints"]) == len(placed)


@pytest.mark.slow
def test_landmarks_are_found_on_a_known_transform_of_the_template(tmp_path, capsys):
    """>= 80 % of the landmarks within 10 mm on the template under a known random transform (+-10 deg, scale,
    translation, smooth elastic deformation: exact ground truth)."""
    from samv2_components.io.image import load_scan
    from samv2_components.transforms import known_transform as known

    template = load_scan(sample_path("ct_abdomen"))
    tf = known.random_transform(3, known.grid_centre_lps(template), max_translation_mm=10.0)
    query, _ = known.resample_query(template, tf)
    path = known.save_nifti(query, str(tmp_path / "moved.nii"))
    _, record = _run_landmarks(path, tmp_path / "out", capsys)
    landmarks = {lm.name: np.array(lm.position_lps) for lm in read_landmarks(sample_path(TEMPLATE_LANDMARKS_SAMPLE))}
    errors = {p["name"]: float(np.linalg.norm(np.array(p["matched"]) - tf.template_to_query(landmarks[p["name"]][None])[0]))
              for p in record["points"]}
    within = sum(e <= 10.0 for e in errors.values())
    assert within >= 0.8 * len(landmarks), (within, errors, record["absent"])
