"""Model Zoo export checks for every bundle, and the MONAI Deploy way of loading the export.

* ``python -m monai.bundle ckpt_export`` (the Zoo's command) turns each bundle's shipped ``models/model.pt`` into
  ``model.ts``; the TorchScript model gives the eager model's outputs, and ``verify_net_in_out`` passes on
  ``network_def`` with the shapes ``metadata.json`` declares.
* The TorchScript file carries ``extra/metadata.json`` and ``extra/inference.json``; read back from the zip archive
  the way MONAI Deploy's bundle inference operator reads them, the declared pre-processing runs on an in-memory
  image (Deploy hands images over in memory, with an LPS affine) and gives the same tensor as the file route, and
  the declared inferer runs the TorchScript network to the eager network's embeddings.
* ``large_files.yml`` lists each bundle's weights with a hash that matches the file, so MONAI's
  ``download_large_files`` accepts the bundle offline.
* A bundle folder copied elsewhere on its own still runs (``samv2_components`` installed; ``slow``: the bundle
  runs of the default suite are in ``test_bundle_inference.py``, ``test_matching_bundle.py``, ``test_adareg.py``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

from samv2_components.networks import SAMv2Net
from samv2_components.networks.weights import load_weights
from samv2_components.sample_data import sample_path

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
BUNDLES = ["semantic_sam", "samv2_matching", "crosssam_registration"]


def _bundle(name: str, *parts: str) -> str:
    return os.path.join(ROOT, "bundles", name, *parts)


def _network_kwargs(bundle: str) -> dict:
    with open(_bundle(bundle, "configs", "inference.json")) as f:
        network_def = json.load(f)["network_def"]
    return {k: v for k, v in network_def.items() if k != "_target_"}


def _eager(bundle: str) -> SAMv2Net:
    net = SAMv2Net(**_network_kwargs(bundle))
    assert load_weights(net, _bundle(bundle, "models", "model.pt"))
    return net.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """``{bundle: path of model.ts}``, each made by the Zoo's ckpt_export command line."""
    out = tmp_path_factory.mktemp("exported")
    paths = {}
    for bundle in BUNDLES:
        ts = out / bundle / "model.ts"
        ts.parent.mkdir()
        cmd = [sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def", "--filepath", str(ts),
               "--ckpt_file", _bundle(bundle, "models", "model.pt"), "--meta_file", _bundle(bundle, "configs", "metadata.json"),
               "--config_file", _bundle(bundle, "configs", "inference.json")]
        result = subprocess.run(cmd, cwd=str(out), capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
        paths[bundle] = str(ts)
    return paths


@pytest.mark.parametrize("bundle", BUNDLES)
def test_torchscript_export_equals_eager_model(exported, bundle):
    scripted = torch.jit.load(exported[bundle]).eval()
    eager = _eager(bundle)
    torch.manual_seed(0)
    x = torch.randn(1, 1, 8, 32, 48) * 50
    with torch.no_grad():
        expected = eager(x)
        got = scripted(x)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
        for name, emb in eager.forward_heads(x).items():  # the heads the inferers use
            torch.testing.assert_close(scripted.forward_heads(x)[name], emb, rtol=1e-4, atol=1e-5)
    with open(_bundle(bundle, "configs", "metadata.json")) as f:
        assert got.shape[1] == json.load(f)["network_data_format"]["outputs"]["pred"]["num_channels"]


@pytest.mark.parametrize("bundle", BUNDLES)
def test_verify_net_in_out(bundle):
    from monai.bundle import verify_net_in_out

    verify_net_in_out(
        net_id="network_def", meta_file=_bundle(bundle, "configs", "metadata.json"),
        config_file=_bundle(bundle, "configs", "inference.json"), n=1, any=1, device="cpu",
    )


def _deploy_style_config(model_ts: str):
    """Parse the configs embedded in a TorchScript bundle as MONAI Deploy's operator does: from the zip archive,
    ``<file stem>/extra/metadata.json`` as metadata and ``<file stem>/extra/inference.json`` as config."""
    from monai.bundle import ConfigParser

    stem = os.path.splitext(os.path.basename(model_ts))[0]
    parser = ConfigParser()
    with zipfile.ZipFile(model_ts) as archive:
        names = archive.namelist()
        assert f"{stem}/extra/metadata.json" in names and f"{stem}/extra/inference.json" in names, names
        parser.read_meta(f=json.loads(archive.read(f"{stem}/extra/metadata.json")))
        parser.read_config(f=json.loads(archive.read(f"{stem}/extra/inference.json")))
    parser.parse()
    return parser


def _without_file_io(compose):
    """Deploy drops the loader and writer transforms whose class names say so (it hands images over in memory)."""
    compose.transforms = tuple(t for t in compose.transforms if not any(k in type(t).__name__ for k in ("LoadImage", "SaveImage")))
    return compose


@pytest.mark.parametrize("bundle", ["semantic_sam", "samv2_matching"])
def test_deploy_style_load_runs_declared_preprocessing_and_network(exported, bundle):
    from monai.data import MetaTensor

    from samv2_components.geometry import convert_affine
    from samv2_components.io.image import load_scan

    parser = _deploy_style_config(exported[bundle])
    assert parser.get("_meta_")["version"] == json.load(open(_bundle(bundle, "configs", "metadata.json")))["version"]
    preprocessing = _without_file_io(parser.get_parsed_content("preprocessing"))
    inferer = parser.get_parsed_content("embedding_inferer" if bundle == "samv2_matching" else "inferer")

    # the file route (what the bundle does) and the in-memory route (what Deploy does: an (X, Y, Z) array with its
    # LPS affine) must give the same network input
    from_file = parser.get_parsed_content("preprocessing")({"image": sample_path("ct_abdomen"), "modality": "ct"})["image"]
    loaded = load_scan(sample_path("ct_abdomen"))
    lps_affine = convert_affine(loaded.affine.numpy(), "RAS", "LPS")
    in_memory = MetaTensor(loaded[0].clone(), affine=torch.as_tensor(lps_affine), meta={"space": "LPS"})
    image = preprocessing({"image": in_memory, "modality": "ct"})["image"]
    torch.testing.assert_close(image.as_tensor(), from_file.as_tensor())
    np.testing.assert_allclose(convert_affine(image.affine.numpy(), "LPS", "RAS"), from_file.affine.numpy(), atol=1e-6)

    scripted = torch.jit.load(exported[bundle]).eval()
    inferer.bf16, inferer.output_dtype = False, torch.float32  # compare in fp32 (rounding to float16 hides nothing)
    with torch.no_grad():
        heads = inferer(from_file[None], scripted)
        expected = inferer(from_file[None], _eager(bundle))
    for name, emb in expected.items():
        torch.testing.assert_close(heads[name].as_tensor(), emb.as_tensor(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(heads[name].affine.numpy(), emb.affine.numpy())


def _sha256(path: str) -> str:
    import hashlib

    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.mark.parametrize("bundle", BUNDLES)
def test_large_files_yml_lists_the_weights_with_their_hash(bundle, tmp_path):
    import yaml

    from monai.bundle import download_large_files

    with open(_bundle(bundle, "large_files.yml")) as f:
        entries = yaml.safe_load(f)["large_files"]
    by_path = {e["path"]: e for e in entries}
    entry = by_path["models/model.pt"]
    # the weights ship in the repository; the url is filled in when they are published (see the file's comment)
    assert "url" in entry and entry["hash_type"] == "sha256"
    assert entry["hash_val"] == _sha256(_bundle(bundle, "models", "model.pt"))
    # MONAI's own downloader finds the file present with the right hash and fetches nothing ...
    copy = tmp_path / bundle
    shutil.copytree(_bundle(bundle), copy, ignore=shutil.ignore_patterns("outputs", "eval", "runs"))
    download_large_files(bundle_path=str(copy))
    # ... and refuses a file whose hash does not match (a corrupt or wrong download is not used silently)
    with open(copy / "models" / "model.pt", "r+b") as f:
        f.seek(1000)
        f.write(b"\x00corrupt\x00")
    from monai.apps.utils import HashCheckError

    with pytest.raises(HashCheckError, match="hash check of existing file failed"):
        download_large_files(bundle_path=str(copy))


@pytest.mark.slow
@pytest.mark.parametrize("bundle", BUNDLES)
def test_bundle_folder_copied_elsewhere_runs(bundle, tmp_path):
    copy = tmp_path / "somewhere" / bundle
    shutil.copytree(_bundle(bundle), copy, ignore=shutil.ignore_patterns("outputs", "eval", "runs"))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(copy / "configs" / "inference.json"),
           "--output_dir", str(out)]
    result = subprocess.run(cmd, cwd=str(tmp_path), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"loaded weights from {copy / 'models' / 'model.pt'}" in result.stdout + result.stderr
    assert any(out.rglob("*.json")), list(out.rglob("*"))


@pytest.mark.parametrize("bundle", ["semantic_sam", "samv2_matching"])
def test_inference_config_has_monai_infer_workflow_properties(bundle):
    """MONAI's standard ``infer`` properties (what MONAI Label's bundle tasks and other tools look up)."""
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(
        config_file=_bundle(bundle, "configs", "inference.json"), meta_file=_bundle(bundle, "configs", "metadata.json"),
        workflow_type="infer", logging_file=False, bundle_root=_bundle(bundle),
    )
    workflow.initialize()
    assert not workflow.check_properties()
    assert workflow.dataset_dir == os.path.dirname(sample_path("ct_abdomen"))
    assert isinstance(workflow.network_def, SAMv2Net)
