"""The semantic_sam inference bundle, run as users run it: ``python -m monai.bundle run``.

The default suite makes one bundle run, the smoke test of this path (``sample_ct_run``, checked by
``test_writes_every_head_preview_and_summary`` and ``test_embedding_grids_sit_on_the_input_scan``); every other
run (random weights, bad inputs) is ``slow`` (``pytest -m slow``).
"""

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from samv2_components.geometry import voxel_to_world
from samv2_components.io.image import load_scan
from samv2_components.networks import SAMv2Net
from samv2_components.sample_data import sample_path

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
CONFIG = os.path.join("bundles", "semantic_sam", "configs", "inference.json")
LIGHT = ["--network_def#width", "0.25"]  # the test checks the workflow, not the network size


def run_bundle(*overrides, cwd=ROOT):
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", CONFIG, *overrides]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, encoding="utf-8", errors="replace", timeout=300)


@pytest.fixture(scope="module")
def sample_ct_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("embeddings")
    result = run_bundle("--output_dir", str(out), *LIGHT)
    assert result.returncode == 0, result.stderr[-3000:]
    return out / "ct_abdomen", result


def test_writes_every_head_preview_and_summary(sample_ct_run):
    case, result = sample_ct_run
    assert sorted(os.listdir(case)) == ["coarse.nii", "embeddings.json", "fine.nii", "preview.png", "semantic.nii"]
    shipped = os.path.isfile(os.path.join(ROOT, "bundles", "semantic_sam", "models", "model.pt"))
    assert ("RANDOM weights" in result.stdout + result.stderr) is not shipped
    summary = json.loads((case / "embeddings.json").read_text())
    assert summary["coordinate_system"] == "LPS"
    assert summary["trained_weights_loaded"] is shipped
    fine = nib.load(case / "fine.nii")
    assert fine.shape[-1] == 128 and fine.shape[:3] == tuple(summary["heads"]["fine"]["shape"])
    data = np.asarray(fine.dataobj[..., :])
    # float16 maps (the bundles' default), written as float32: unit length to float16 precision
    np.testing.assert_allclose(np.linalg.norm(data, axis=-1), 1.0, atol=5e-4)


@pytest.mark.slow
def test_random_weights_are_announced(tmp_path):
    """A bundle without its shipped models/model.pt still runs, and says on every run that its weights are random;
    a checkpoint given explicitly that does not exist is an error instead (one line, nothing written)."""
    import shutil

    bundle = tmp_path / "bundle_without_weights"
    shutil.copytree(os.path.join(ROOT, "bundles", "semantic_sam", "configs"), bundle / "configs")
    out = tmp_path / "out"
    result = run_bundle("--bundle_root", str(bundle), "--output_dir", str(out), *LIGHT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "RANDOM weights" in result.stdout + result.stderr
    assert json.loads((out / "ct_abdomen" / "embeddings.json").read_text())["trained_weights_loaded"] is False
    missing = tmp_path / "none" / "model.pt"
    refused = run_bundle("--ckpt_path", str(missing), "--output_dir", str(tmp_path / "out2"), *LIGHT)
    assert refused.returncode != 0 and f"ERROR: {missing}" in refused.stderr and not (tmp_path / "out2").exists()


def test_embedding_grids_sit_on_the_input_scan(sample_ct_run):
    """Each head's first and last voxel lie within half a voxel of that head of the scan's physical extent."""
    case, _ = sample_ct_run
    scan = load_scan(sample_path("ct_abdomen"))
    n = np.array(scan.shape[1:]) - 1
    corners = np.array([[i, j, k] for i in (0, n[0]) for j in (0, n[1]) for k in (0, n[2])], float)
    scan_world = voxel_to_world(corners, scan.affine)  # LPS
    lo, hi = scan_world.min(0), scan_world.max(0)
    for head in ("fine", "coarse", "semantic"):
        img = nib.load(case / f"{head}.nii")
        half_voxel = np.abs(voxel_to_world(np.eye(3), img.affine) - voxel_to_world(np.zeros(3), img.affine)).max(0) / 2
        first = voxel_to_world(np.zeros(3), img.affine)[0]
        # axes (S, P, L): the grid starts at the scan's inferior, anterior, right corner, i.e. the smallest LPS
        # coordinates (1 mm slack: the 2 mm resampling grid starts on the scan's first voxel centre) ...
        assert np.all(np.abs(first - lo) <= half_voxel + 1.0), (head, first, lo)
        # ... and its last voxel reaches the far corner (the input is padded up to a multiple of the coarse stride)
        last = voxel_to_world((np.array(img.shape[:3]) - 1.0)[None], img.affine)[0]
        # (2 mm slack: the 2 mm resampling grid may stop up to one of its voxels short of the last scan voxel)
        assert np.all(last + half_voxel >= hi - 2.0), (head, last, hi)


def test_physically_identical_scans_give_identical_embeddings(tmp_path):
    """The same scan stored with reversed axes (and the matching affine) embeds identically, affine included."""
    src = nib.load(sample_path("ct_abdomen"))
    n = np.array(src.shape) - 1
    reverse = np.diag([-1.0, 1.0, -1.0, 1.0])
    reverse[:3, 3] = [n[0], 0, n[2]]  # stored index i -> original index n - i along axes 0 and 2
    flipped = nib.Nifti1Image(np.asarray(src.dataobj)[::-1, :, ::-1].copy(), src.affine @ reverse)
    path = tmp_path / "ct_flipped.nii.gz"
    nib.save(flipped, path)
    parser = ConfigParser()
    parser.read_config(os.path.join(ROOT, CONFIG))
    parser["bundle_root"] = os.path.join(ROOT, "bundles", "semantic_sam")
    preprocessing = parser.get_parsed_content("preprocessing")
    inferer = parser.get_parsed_content("inferer")
    torch.manual_seed(0)
    net = SAMv2Net(width=0.25).eval()
    outs = []
    for p in (sample_path("ct_abdomen"), str(path)):
        image = preprocessing({"image": p, "modality": "ct"})["image"]
        outs.append(inferer(image[None], net)["fine"])
    torch.testing.assert_close(outs[0].as_tensor(), outs[1].as_tensor())
    np.testing.assert_allclose(outs[0].affine.numpy(), outs[1].affine.numpy(), atol=1e-4)


def _assert_clean_failure(result, out_dir, *phrases):
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ERROR: "), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    for phrase in phrases:
        assert phrase in last, last
    assert not os.path.exists(out_dir) or not os.listdir(out_dir)  # nothing half-written


@pytest.mark.slow
def test_missing_input_file(tmp_path):
    out = tmp_path / "out"
    missing = str(tmp_path / "nope.nii.gz")
    _assert_clean_failure(run_bundle("--input_path", missing, "--output_dir", str(out), *LIGHT), out, missing, "not found")


@pytest.mark.slow
def test_2d_input(tmp_path):
    path = tmp_path / "slice.nii.gz"
    nib.save(nib.Nifti1Image(np.random.rand(64, 64).astype(np.float32) * 1000 - 1000, np.eye(4)), path)
    out = tmp_path / "out"
    _assert_clean_failure(run_bundle("--input_path", str(path), "--output_dir", str(out), *LIGHT), out, str(path), "2D")


@pytest.mark.slow
def test_unknown_modality(tmp_path):
    out = tmp_path / "out"
    _assert_clean_failure(run_bundle("--modality", "pet", "--output_dir", str(out), *LIGHT), out, "modality")


@pytest.mark.slow
def test_checkpoint_of_wrong_architecture(tmp_path):
    ckpt = tmp_path / "model.pt"
    torch.save(SAMv2Net(width=0.5, heads=("fine", "coarse")).state_dict(), ckpt)
    out = tmp_path / "out"
    result = run_bundle("--ckpt_path", str(ckpt), "--output_dir", str(out), *LIGHT)
    _assert_clean_failure(result, out, str(ckpt), "semantic")
