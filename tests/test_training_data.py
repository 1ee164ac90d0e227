"""Tests of the training-data preparation: the common label vocabulary, conversions, the catalogue, datalist checks.

Label id tables are checked on the shipped real label maps (organ positions: left/right, anterior/posterior);
conversions and the catalogue on small images the tests make.
"""

from __future__ import annotations

import json
import os

import itk
import nibabel as nib
import numpy as np
import pytest

from samv2_components import sample_data
from samv2_components.errors import SAMv2InputError
from samv2_components.geometry import label_centroids
from samv2_components.io.datalist import LABEL_VOCABULARY, labels_share_vocabulary, load_training_datalist
from samv2_components.io.image import load_scan
from samv2_components.io.label_vocabulary import (
    AMOS,
    SOURCE_ID_BLOCK,
    TOTALSEGMENTATOR_CT,
    TOTALSEGMENTATOR_MR,
    aal_source,
    common_id,
    common_name,
    freesurfer_source,
    harmonise_labels,
    slicer_segmentation_source,
    vocabulary_rows,
)
from samv2_components.io.training_data import (
    CatalogueScan,
    prepare_catalogue,
    read_slicer_segments,
    reverse_posterior,
    unit_range_to_hu,
)

# -- vocabulary ---------------------------------------------------------------------------------------------------


def test_one_structure_one_id_across_sources():
    liver = common_id("liver")
    assert TOTALSEGMENTATOR_CT.harmonised_id(5) == TOTALSEGMENTATOR_MR.harmonised_id(5) == AMOS.harmonised_id(6) == liver
    assert AMOS.harmonised_id(5) == TOTALSEGMENTATOR_CT.harmonised_id(15) == common_id("esophagus")
    # granularity the sources share: lobes -> lungs, every rib -> ribs, every vertebra -> vertebrae
    assert TOTALSEGMENTATOR_CT.harmonised_id(11) == TOTALSEGMENTATOR_MR.harmonised_id(10) == common_id("lung_left")
    assert {TOTALSEGMENTATOR_CT.harmonised_id(k) for k in range(92, 116)} == {common_id("ribs")}
    assert TOTALSEGMENTATOR_CT.harmonised_id(32) == TOTALSEGMENTATOR_MR.harmonised_id(19) == common_id("vertebrae")
    # no common name: a per-source id that cannot collide with another source's
    assert TOTALSEGMENTATOR_CT.harmonised_id(17) == SOURCE_ID_BLOCK * 1 + 17  # thyroid
    assert TOTALSEGMENTATOR_MR.harmonised_id(40) == SOURCE_ID_BLOCK * 2 + 40  # gluteus maximus (MR ids)
    assert common_name(liver) == "liver" and common_name(0) is None and common_name(1017) is None
    labels = np.array([[0, 5, 17], [92, 104, 3]], dtype=np.uint8)
    out = harmonise_labels(labels, TOTALSEGMENTATOR_CT)
    assert out.dtype == np.int16 and out.tolist() == [[0, liver, 1017], [common_id("ribs")] * 2 + [common_id("kidney_left")]]


@pytest.mark.parametrize(
    "name, source", [("ct_abdomen_labels", TOTALSEGMENTATOR_CT), ("mr_abdomen_labels", TOTALSEGMENTATOR_MR)]
)
def test_totalsegmentator_ids_match_the_anatomy_of_the_shipped_label_maps(name, source):
    """LPS: +x is the patient's left, +y posterior. Wrong id tables put the liver left or the spine in front."""
    labels = load_scan(sample_data.sample_path(name), check_intensities=False)
    by_name = {source.names[k]: c for k, c in label_centroids(labels, min_voxels=20).items()}
    assert by_name["liver"][0] < by_name["spleen"][0]
    assert by_name["kidney_right"][0] < by_name["kidney_left"][0]
    assert by_name["inferior_vena_cava"][0] < by_name["aorta"][0]
    assert by_name["autochthon_right"][0] < by_name["autochthon_left"][0]
    assert by_name["spinal_cord"][1] > by_name["aorta"][1] and by_name["stomach"][1] < by_name["spinal_cord"][1]


def test_named_sources_from_files(tmp_path):
    names = tmp_path / "aal.txt"
    names.write_text("1 Precentral_L 2001\n71 Caudate_L 7001\n72 Caudate_R 7002\n77 Thalamus_L 7101\n")
    aal = aal_source(names)
    assert aal.harmonised_id(71) == common_id("caudate_left") and aal.harmonised_id(72) == common_id("caudate_right")
    assert aal.harmonised_id(1) == SOURCE_ID_BLOCK * aal.block + 1
    lut = tmp_path / "lut.txt"
    lut.write_text("#No. Label Name: R G B A\n\n0 Unknown 0 0 0 0\n10 Left-Thalamus 0 118 14 0\n"
                   "49 Right-Thalamus 0 118 14 0\n4 Left-Lateral-Ventricle 120 18 134 0\n2000 ctx-lh-unknown 1 1 1 0\n")
    aseg = freesurfer_source(lut, ids=[0, 10, 4])
    assert set(aseg.names) == {10, 4}
    assert aseg.harmonised_id(10) == aal.harmonised_id(77) == common_id("thalamus_left")
    assert aseg.harmonised_id(4) == SOURCE_ID_BLOCK * aseg.block + 4
    slicer = slicer_segmentation_source({1: "ribs", 5: "right lung", 7: "tissue"})
    assert slicer.harmonised_id(1) == TOTALSEGMENTATOR_CT.harmonised_id(95)
    assert slicer.harmonised_id(5) == common_id("lung_right") and slicer.harmonised_id(7) == SOURCE_ID_BLOCK * 4 + 7
    rows = vocabulary_rows([slicer])
    assert ("slicer", 5, "right lung", common_id("lung_right"), "lung_right") in rows
    with pytest.raises(ValueError, match="no '<id> <name>' lines"):
        aal_source(lut.with_name("empty.txt")) if lut.with_name("empty.txt").write_text("# nothing\n") else None


# -- conversions --------------------------------------------------------------------------------------------------


def itk_image(array, spacing=(1.0, 1.0, 1.0), origin=(10.0, -20.0, 30.0)):
    image = itk.image_from_array(np.ascontiguousarray(array))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    return image


def test_unit_range_ct_is_mapped_from_air_and_soft_tissue():
    rng = np.random.default_rng(0)
    hu = np.full((40, 40, 40), -1000.0)
    hu[8:32, 8:32, 8:32] = rng.normal(40, 8, (24, 24, 24))  # soft tissue
    hu[10:14, 10:30, 10:30] = rng.normal(-100, 10, (4, 20, 20))  # fat
    hu[28:31, 10:30, 10:30] = 900.0  # bone
    stored = np.clip((hu + 1000.0) / 3000.0, 0, 1).astype(np.float32)  # an unknown linear window, air at 0
    image, peak, slope = unit_range_to_hu(itk_image(stored))
    out = itk.array_from_image(image)
    assert out.dtype == np.int16 and peak == pytest.approx(1040 / 3000, abs=0.006)
    assert slope == pytest.approx(3000, rel=0.02)
    assert out[0, 0, 0] == -1000 and abs(float(np.median(out[28:31, 10:30, 10:30])) - 900) < 25
    assert abs(float(np.median(out[10:14, 10:30, 10:30])) + 100) < 10
    assert tuple(image.GetOrigin()) == (10.0, -20.0, 30.0)
    with pytest.raises(ValueError, match="not \\[0, 1\\]"):
        unit_range_to_hu(itk_image(stored * 2.0))


def test_reverse_posterior_keeps_the_grid():
    array = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    image = itk_image(array, spacing=(0.9, 0.8, 1.5))
    out = reverse_posterior(image)
    assert np.array_equal(itk.array_from_image(out), array[:, ::-1, :])
    assert tuple(out.GetSpacing()) == (0.9, 0.8, 1.5) and tuple(out.GetOrigin()) == tuple(image.GetOrigin())


def test_slicer_segment_names_from_a_seg_nrrd(tmp_path):
    labels = itk_image(np.zeros((4, 5, 6), np.uint8))
    meta = labels.GetMetaDataDictionary()
    for k, (value, name) in enumerate([(1, "ribs"), (2, "left lung")]):
        meta[f"Segment{k}_Name"], meta[f"Segment{k}_LabelValue"], meta[f"Segment{k}_Layer"] = name, str(value), "0"
    path = str(tmp_path / "seg.seg.nrrd")
    itk.imwrite(labels, path)
    assert read_slicer_segments(itk.imread(path)) == {1: "ribs", 2: "left lung"}
    with pytest.raises(ValueError, match="not a 3D Slicer segmentation"):
        read_slicer_segments(itk_image(np.zeros((3, 3, 3), np.uint8)))


# -- the catalogue ------------------------------------------------------------------------------------------------


@pytest.fixture
def collection(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    rng = np.random.default_rng(1)
    ct = np.clip(rng.normal(-200, 400, (30, 30, 30)), -1024, 3071).astype(np.int16)
    labels = np.zeros((30, 30, 30), np.uint8)
    labels[5:15, 5:15, 5:15], labels[16:25, 5:15, 5:15] = 5, 17  # liver, thyroid (no common name)
    itk.imwrite(itk_image(ct), str(root / "ct.nii.gz"))
    itk.imwrite(itk_image(labels), str(root / "ct_labels.nii.gz"))
    itk.imwrite(itk_image(np.clip(rng.random((30, 30, 30)), 0, 1).astype(np.float32)), str(root / "unit.nii.gz"))
    return root


def test_prepare_catalogue_converts_harmonises_and_reports(collection, tmp_path):
    catalogue = [
        CatalogueScan("ct.nii.gz", "ct", "train", "CC BY 4.0", "ct_labels.nii.gz", "totalsegmentator_ct", weight=3.0),
        CatalogueScan("unit.nii.gz", "ct", "train", "MIT", conversion="reverse_posterior"),
        CatalogueScan("held.nii.gz", "ct", "held_out", "MIT", note="a benchmark scan"),
    ]
    out = tmp_path / "prepared"
    entries, report = prepare_catalogue(catalogue, str(collection), str(out))
    assert [r["role"] for r in report] == ["train", "train", "held_out"]  # every scan reported, held-out not read
    assert len(entries) == 2 and entries[0]["weight"] == 3.0 and entries[0]["image"] == str(collection / "ct.nii.gz")
    harmonised = itk.array_from_image(itk.imread(entries[0]["label"]))  # [k, j, i] like the array written above
    assert harmonised[10, 10, 10] == common_id("liver") and harmonised[20, 10, 10] == 1017 and harmonised[0, 0, 0] == 0
    assert np.allclose(nib.load(entries[0]["label"]).affine, nib.load(str(collection / "ct_labels.nii.gz")).affine)
    converted = itk.array_from_image(itk.imread(entries[1]["image"]))
    assert np.array_equal(converted, itk.array_from_image(itk.imread(str(collection / "unit.nii.gz")))[:, ::-1, :])
    # a datalist of these entries passes the full checks, and declares its vocabulary
    path = tmp_path / "list.json"
    path.write_text(json.dumps({"label_vocabulary": LABEL_VOCABULARY, "training": entries}))
    assert len(load_training_datalist(path, check_images=True)) == 2 and labels_share_vocabulary(path)
    missing = [CatalogueScan("gone.nii.gz", "ct", "train", "MIT")]
    with pytest.raises(SAMv2InputError, match="gone.nii.gz: file not found"):
        prepare_catalogue(missing, str(collection), str(out))


@pytest.mark.parametrize(
    "kwargs, message",
    [(dict(role="maybe"), "role must be one of"), (dict(conversion="magic"), "conversion must be one of"),
     (dict(role="left_out"), "needs a note"), (dict(weight=0.0), "weight must be > 0"),
     (dict(label="x.nii.gz"), "label and label_source go together")],
)
def test_catalogue_entries_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CatalogueScan(**{"image": "a.nii.gz", "modality": "ct", "role": "train", "licence": "MIT", **kwargs})


# -- datalist checks before training ------------------------------------------------------------------------------


def save(path, array, dtype=np.float32):
    nib.save(nib.Nifti1Image(np.asarray(array, dtype), np.diag([2.0, 2.0, 2.0, 1.0])), str(path))
    return str(path)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: {"image": save(d / "flat.nii.gz", np.full((20, 20, 20), 7.0))}, "flat.nii.gz: image is constant"),
        (lambda d: {"image": save(d / "slice.nii.gz", np.random.default_rng(0).random((20, 20, 1)))},
         "slice.nii.gz: image is 2D"),
        (lambda d: {"image": str(d / "bad.nii.gz")} if (d / "bad.nii.gz").write_bytes(b"not an image") else None,
         "bad.nii.gz: cannot be read"),
        (lambda d: {"image": save(d / "ok.nii.gz", np.random.default_rng(0).random((20, 20, 20))),
                    "label": save(d / "soft.nii.gz", np.full((20, 20, 20), 0.5))}, "soft.nii.gz: label map has non-integer"),
        (lambda d: {"image": save(d / "ok.nii.gz", np.random.default_rng(0).random((20, 20, 20))), "weight": -1},
         "entry 1: 'weight' must be a positive number"),
    ],
)
def test_bad_datalist_entries_are_refused_before_training(tmp_path, make, message):
    entry = {"modality": "ct", **make(tmp_path)}
    path = tmp_path / "list.json"
    path.write_text(json.dumps({"training": [entry]}))
    with pytest.raises(SAMv2InputError, match=message):
        load_training_datalist(path, check_images=True)


def test_resampled_copies_travel_with_relative_paths(collection, tmp_path):
    # a CT whose value is 10x its own LPS x coordinate (mm): any geometry error shows in the resampled values
    ramp = itk_image(np.zeros((30, 30, 30), np.int16), spacing=(1.0, 1.0, 1.0), origin=(-20.0, 5.0, 3.0))
    x_lps = -20.0 + np.arange(30)
    itk.imwrite(_with_values(ramp, np.broadcast_to(10 * x_lps, (30, 30, 30)).astype(np.int16)), str(collection / "ramp.nii.gz"))
    catalogue = [CatalogueScan("ramp.nii.gz", "ct", "train", "MIT"),
                 CatalogueScan("ct.nii.gz", "ct", "train", "MIT", "ct_labels.nii.gz", "totalsegmentator_ct")]
    entries, _ = prepare_catalogue(catalogue, str(collection), str(tmp_path / "prepared"))
    from samv2_components.geometry import voxel_to_world
    from samv2_components.io.training_data import resample_entries

    out = tmp_path / "cache"
    items = resample_entries(entries, str(out), 2.0)
    assert all(not os.path.isabs(i["image"]) and i["modality"] == "ct" for i in items)
    image, label = nib.load(str(out / items[1]["image"])), nib.load(str(out / items[1]["label"]))
    assert image.get_data_dtype() == np.int16 and np.allclose(image.header.get_zooms(), 2.0)
    assert image.shape == label.shape
    assert set(np.unique(np.asarray(label.dataobj))) <= {0, common_id("liver"), 1017}
    resampled = load_scan(str(out / items[0]["image"]))
    values = resampled[0].numpy()
    idx = np.argwhere(np.ones(values.shape, bool))
    world = voxel_to_world(idx.astype(float), resampled.affine)  # LPS mm of every 2 mm voxel centre
    inside = (world[:, 0] >= -20) & (world[:, 0] <= 9)
    assert inside.sum() > 100
    assert np.allclose(values[tuple(idx[inside].T)], 10 * world[inside, 0], atol=1.0)  # value = 10 x, rounded
    (path := out / "list.json").write_text(json.dumps({"training": items}))
    assert load_training_datalist(path, check_images=True)[0]["image"] == str(out / items[0]["image"])


def _with_values(reference, array):
    out = itk.image_from_array(np.ascontiguousarray(array))
    out.CopyInformation(reference)
    return out


def test_training_clock_stops_on_time_and_reports(caplog):
    import logging
    import time as _time

    from ignite.engine import Engine, Events

    from samv2_components.engines import TrainingClock

    engine = Engine(lambda e, b: _time.sleep(0.02))
    completed = []
    engine.add_event_handler(Events.COMPLETED, lambda e: completed.append(e.state.iteration))
    clock = TrainingClock(limit_seconds=0.2)
    clock.attach(engine)
    with caplog.at_level(logging.INFO, logger="samv2_components"):
        engine.run(range(1000), max_epochs=1)
    assert completed and 3 <= completed[0] < 100  # stopped early, and COMPLETED (final weights) still fired
    assert clock.steps_per_second and 10 < clock.steps_per_second < 60
    assert any("throughput:" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="max_train_seconds"):
        TrainingClock(limit_seconds=0)


def test_training_clock_reports_the_steady_throughput_after_the_warm_up(caplog):
    """Slow first iterations (kernel creation, compilation) count in the whole-run throughput only: the steady line
    counts the iterations after ``warmup_iterations``; a run no longer than the warm-up has no steady figure."""
    import logging
    import time as _time

    from ignite.engine import Engine

    from samv2_components.engines import TrainingClock

    engine = Engine(lambda e, b: _time.sleep(0.15 if e.state.iteration <= 3 else 0.01))
    clock = TrainingClock(warmup_iterations=3)
    clock.attach(engine)
    with caplog.at_level(logging.INFO, logger="samv2_components"):
        engine.run(range(23), max_epochs=1)
    assert 20 < clock.steady_steps_per_second < 110  # 20 iterations of ~0.01 s
    assert clock.steps_per_second < 0.4 * clock.steady_steps_per_second  # 23 in ~0.65 s
    assert any("steady throughput: 20 iterations after the first 3" in r.getMessage() for r in caplog.records)
    short = Engine(lambda e, b: None)
    short_clock = TrainingClock(warmup_iterations=5)
    short_clock.attach(short)
    short.run(range(5), max_epochs=1)
    assert short_clock.steps_per_second is not None and short_clock.steady_steps_per_second is None
    with pytest.raises(ValueError, match="warmup_iterations"):
        TrainingClock(warmup_iterations=-1)
