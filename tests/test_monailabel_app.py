"""The MONAI Label app (``apps/samv2_label``) served for real: the ``monailabel`` server is started on loopback with
the app and a datastore of shipped sample scans, and answers real HTTP requests.

Matching answers are checked against the same bundle run in this process (the server must add nothing and lose
nothing), the coordinate system of the template points is honoured (RAS in, RAS out), and bad requests get a
400 with one line naming the problem. The server is started once (module fixture): the matching request is this
path's smoke test, the info and bad requests ask the same server; the registration request (CT-MR phantom,
minutes on a CPU) is slow.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("monailabel")
httpx = pytest.importorskip("httpx")

from samv2_components.bundle_support import run_bundle  # noqa: E402
from samv2_components.geometry import convert_points  # noqa: E402
from samv2_components.io.points import read_points, write_points  # noqa: E402
from samv2_components.sample_data import sample_path  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
APP = os.path.join(ROOT, "apps", "samv2_label")
STARTUP_TIMEOUT_S = 180


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A running MONAI Label server with the app; yields its base URL."""
    studies = tmp_path_factory.mktemp("studies")
    for name in ("ct_abdomen", "ct_abdomen_2", "phantom_ct", "phantom_mr"):
        src = sample_path(name)
        shutil.copy(src, studies / (name + ".nii.gz"))
    port = _free_port()
    log = open(tmp_path_factory.mktemp("server_log") / "server.log", "w+")
    env = {**os.environ, "MONAI_LABEL_TASKS_TRAIN": "false", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", APP, "--studies", str(studies),
           "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(studies))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    try:
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"MONAI Label server exited with {proc.returncode}:\n{log.read()[-3000:]}")
            try:
                if httpx.get(url + "/info/", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"MONAI Label server not up after {STARTUP_TIMEOUT_S} s:\n{log.read()[-3000:]}")
            time.sleep(1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _markups(points) -> dict:
    """The Slicer markups document of ``points``, as 3D Slicer saves it (written and read back as a file)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "points.mrk.json")
        write_points(points, path)
        with open(path, encoding="utf-8") as f:
            return json.load(f)


def _infer(url: str, model: str, image: str, params: dict) -> httpx.Response:
    return httpx.post(f"{url}/infer/{model}", params={"image": image, "output": "json"},
                      data={"params": json.dumps(params)}, timeout=900)


def _control_points(document: dict):
    (markup,) = document["markups"]
    names = [p["label"] for p in markup["controlPoints"]]
    return markup["coordinateSystem"], names, np.array([p["position"] for p in markup["controlPoints"]])


def test_info_lists_both_tasks(server):
    info = httpx.get(server + "/info/", timeout=30).json()
    assert set(info["models"]) == {"samv2_match", "crosssam_register"}
    assert info["datastore"]["total"] == 4


def test_match_request_equals_bundle_run_and_honours_ras(server, tmp_path):
    template_points = read_points(sample_path("ct_abdomen_points"))
    answer = _infer(server, "samv2_match", "ct_abdomen_2",
                    {"template_image": "ct_abdomen", "template_points": _markups(template_points)})
    assert answer.status_code == 200, answer.text
    system, names, served = _control_points(answer.json()["markups"])
    assert system == "LPS" and names == template_points.names

    # the same matching run directly through the bundle, in this process
    points_file = tmp_path / "template_points.mrk.json"
    write_points(template_points, points_file)
    run_bundle("samv2_matching", ["inference.json"], {
        "template_path": sample_path("ct_abdomen"), "template_points": str(points_file),
        "query_path": sample_path("ct_abdomen_2"), "output_dir": str(tmp_path / "out"), "write_qc": False})
    direct = read_points(tmp_path / "out" / "ct_abdomen_2" / "template_points.mrk.json")
    np.testing.assert_allclose(served, direct.coords, atol=1e-3)
    matches = answer.json()["matches"]
    assert matches["coordinate_system"] == "LPS" and len(matches["points"]) == len(names)

    # template points given in RAS: the answer comes back in RAS, the same physical points
    answer_ras = _infer(server, "samv2_match", "ct_abdomen_2",
                        {"template_image": "ct_abdomen", "template_points": _markups(template_points.to("RAS"))})
    assert answer_ras.status_code == 200, answer_ras.text
    system_ras, names_ras, served_ras = _control_points(answer_ras.json()["markups"])
    assert system_ras == "RAS" and names_ras == names
    np.testing.assert_allclose(convert_points(served_ras, "RAS", "LPS"), served, atol=1e-3)


@pytest.mark.parametrize(
    "params, fragment",
    [
        ({"template_image": "no_such_scan"}, "no image 'no_such_scan'"),
        ({"template_image": "ct_abdomen", "template_points": {"points": []}}, "template_points"),
        ({"template_image": "ct_abdomen", "modality": "pet"}, "modality"),
    ],
    ids=["unknown-template", "not-markups", "bad-modality"],
)
def test_bad_match_requests_get_one_line_400(server, params, fragment):
    if "template_points" not in params:
        params = {**params, "template_points": _markups(read_points(sample_path("ct_abdomen_points")))}
    answer = _infer(server, "samv2_match", "ct_abdomen_2", params)
    assert answer.status_code == 400, answer.text
    detail = answer.json()["detail"]
    assert fragment in detail and "\n" not in detail


@pytest.mark.slow
def test_register_request_returns_the_reference_transform_as_json_and_tfm(server, tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    answer = _infer(server, "crosssam_register", "phantom_mr", {"fixed_image": "phantom_ct"})
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert result["success"], result
    assert result["rigid"]["coordinate_system"] == "LPS"
    matrix = np.array(result["rigid"]["matrix_fixed_to_moving_lps"])
    # the .tfm Slicer loads maps points as the JSON matrix does
    (tmp_path / "rigid.tfm").write_text(result["tfm"], encoding="utf-8")
    transform = sitk.ReadTransform(str(tmp_path / "rigid.tfm"))
    point = np.array([10.0, -20.0, 30.0])
    np.testing.assert_allclose(transform.TransformPoint(point.tolist()), matrix[:3, :3] @ point + matrix[:3, 3], atol=1e-4)
    # and it is the phantom pair's reference transform (mutual information from many starts; bundle docs)
    with open(os.path.join(ROOT, "bundles", "crosssam_registration", "docs", "benchmark_registration_reference.json")) as f:
        reference = np.array(json.load(f)["fixed_to_moving"])
    ct = sitk.ReadImage(sample_path("phantom_ct"))
    centre = np.array(ct.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in ct.GetSize()]))
    offsets = np.array([[dx, dy, dz] for dx in (-30, 30) for dy in (-30, 30) for dz in (-30, 30)], dtype=float)
    points = centre + offsets
    tre = np.linalg.norm(points @ matrix[:3, :3].T + matrix[:3, 3] - (points @ reference[:3, :3].T + reference[:3, 3]), axis=1)
    assert tre.max() < 10.0, tre
