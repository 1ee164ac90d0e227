"""MONAI Label infer tasks: SAMv2 point matching and CrossSAM rigid registration, served to 3D Slicer.

Each task runs the corresponding bundle workflow (``samv2_matching`` or ``crosssam_registration``) on the scans the
MONAI Label server resolves from its datastore, in a temporary folder, and answers with JSON only (no label image):

* ``samv2_match`` — request ``image``: the query scan (datastore id); ``params``: ``template_image`` (the datastore
  id of the annotated scan), ``template_points`` (a 3D Slicer markups document, ``{"markups": [...]}`` with
  ``coordinateSystem`` LPS or RAS, as Slicer saves ``.mrk.json``), optional ``modality``, ``query_modality``,
  ``method``. Answer: ``{"markups": <Slicer markups document of the matched points, in the template points'
  coordinate system>, "matches": <the bundle's matches.json: per point score, method, confident flag>}``.
* ``crosssam_register`` — request ``image``: the moving scan; ``params``: ``fixed_image`` (datastore id), optional
  ``fixed_modality`` (default ct), ``moving_modality`` (default mr), ``deformable`` (default false: the answer is
  the rigid transform), ``orientation_search``. Answer: ``{"success": true, "rigid": <rigid.json: 4x4
  fixed-to-moving matrix, LPS mm>, "tfm": <rigid.tfm text, ITK format>, "summary": <confidence summary>}``, or
  ``{"success": false, "reason": ..., "summary": ...}`` with no transform when the fit is not confident.

Bad requests (an unknown image id, missing points, a wrong modality, an unreadable scan) are answered with HTTP 400
and ``{"detail": "<value>: <problem>"}``, one line naming the value and the problem.

``monailabel`` (and its ``fastapi``) is an optional dependency, imported only here.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

from fastapi import HTTPException
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from samv2_components.bundle_support import run_bundle
from samv2_components.errors import DeformableStageFailed, RegistrationFailed, find_samv2_error
from samv2_components.io.embeddings import case_name

__all__ = ["MatchPointsTask", "RegisterTask"]

#: resolves a datastore image id to a file path (the app passes ``datastore.get_image_uri``)
ImageResolver = Callable[[str], str]


def _bad_request(message: str) -> HTTPException:
    """A 400 answer whose ``detail`` is the one-line reason (MONAI Label turns any other exception into a bare 500)."""
    return HTTPException(status_code=400, detail=message)


def _resolve(resolve_image: ImageResolver, request: Mapping[str, Any], key: str) -> str:
    """The file of the datastore image named by ``request[key]``."""
    image_id = request.get(key)
    if not image_id or not isinstance(image_id, str):
        raise _bad_request(f"{key}: missing (give the datastore id of the image)")
    try:
        path = resolve_image(image_id)
    except Exception as exc:  # datastores raise various errors for unknown ids
        raise _bad_request(f"{key}: no image '{image_id}' in the datastore ({exc})") from exc
    if not path or not os.path.exists(path):
        raise _bad_request(f"{key}: no image '{image_id}' in the datastore")
    return path


def _request_image(request: Mapping[str, Any], role: str) -> str:
    """The request's own image (MONAI Label has resolved it to a file)."""
    path = request.get("image")
    if not path or not os.path.exists(str(path)):
        raise _bad_request(f"image: {role} image '{path}' not found")
    return str(path)


def _run(bundle: str, overrides: Mapping[str, Any], bundles_dir: str | None) -> None:
    """Run a bundle; our own input errors become a one-line bad-request error. A refused registration
    (:class:`~samv2_components.errors.RegistrationFailed`) and a rigid-only one
    (:class:`~samv2_components.errors.DeformableStageFailed`) are re-raised as they are: they are answers."""
    try:
        run_bundle(bundle, ["inference.json"], overrides, bundles_dir)
    except Exception as exc:
        error = find_samv2_error(exc)
        if error is None:
            raise
        if isinstance(error, (RegistrationFailed, DeformableStageFailed)):
            raise error from exc
        raise _bad_request(str(error)) from exc


def _read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class MatchPointsTask(InferTask):
    """Match template points into the request's image with the ``samv2_matching`` bundle (module docstring).

    Args:
        resolve_image: datastore id -> file path.
        bundles_dir: folder holding the bundles (default: see :func:`~samv2_components.bundle_support.find_bundles_dir`).
        cache_dir: embedding cache shared by requests, so a template used again is not embedded again.
        modality: default modality of the template and query scans.
    """

    def __init__(self, resolve_image: ImageResolver, bundles_dir: str | None = None, cache_dir: str | None = None, modality: str = "ct"):
        super().__init__(
            type=InferType.OTHERS,
            labels=None,
            dimension=3,
            description="SAMv2: find the template's points on this image (one-shot landmark matching)",
            config={"template_image": "", "modality": modality, "query_modality": "", "method": "fixed_point"},
        )
        self.resolve_image, self.bundles_dir, self.cache_dir = resolve_image, bundles_dir, cache_dir

    def is_valid(self) -> bool:
        return True

    def __call__(self, request: Mapping[str, Any]) -> tuple[None, dict]:
        query = _request_image(request, "query")
        template = _resolve(self.resolve_image, request, "template_image")
        points = request.get("template_points")
        if not isinstance(points, dict) or not isinstance(points.get("markups"), list):
            raise _bad_request("template_points: missing or not a 3D Slicer markups document ({'markups': [...]})")
        with tempfile.TemporaryDirectory(prefix="samv2_match_") as tmp:
            points_path = os.path.join(tmp, "template_points.mrk.json")
            with open(points_path, "w", encoding="utf-8") as f:
                json.dump(points, f)
            output_dir = os.path.join(tmp, "out")
            overrides = {
                "template_path": template,
                "template_points": points_path,
                "query_path": query,
                "modality": request.get("modality") or self.config()["modality"],
                "query_modality": request.get("query_modality") or None,
                "matcher#method": request.get("method") or "fixed_point",
                "output_dir": output_dir,
                "cache_dir": self.cache_dir,
                "write_qc": False,
            }
            _run("samv2_matching", overrides, self.bundles_dir)
            folder = os.path.join(output_dir, case_name(query))
            return None, {
                "markups": _read_json(os.path.join(folder, "template_points.mrk.json")),
                "matches": _read_json(os.path.join(folder, "matches.json")),
            }


class RegisterTask(InferTask):
    """Register the request's image (moving) to a fixed image with the ``crosssam_registration`` bundle.

    Args:
        resolve_image: datastore id -> file path.
        bundles_dir: folder holding the bundles.
    """

    def __init__(self, resolve_image: ImageResolver, bundles_dir: str | None = None):
        super().__init__(
            type=InferType.OTHERS,
            labels=None,
            dimension=3,
            description="CrossSAM AdaReg: rigid CT-MR registration of this image (moving) to a fixed image",
            config={"fixed_image": "", "fixed_modality": "ct", "moving_modality": "mr", "deformable": False, "orientation_search": "auto"},
        )
        self.resolve_image, self.bundles_dir = resolve_image, bundles_dir

    def is_valid(self) -> bool:
        return True

    def __call__(self, request: Mapping[str, Any]) -> tuple[None, dict]:
        moving = _request_image(request, "moving")
        fixed = _resolve(self.resolve_image, request, "fixed_image")
        defaults = self.config()
        with tempfile.TemporaryDirectory(prefix="samv2_register_") as tmp:
            overrides = {
                "fixed_path": fixed,
                "moving_path": moving,
                "fixed_modality": request.get("fixed_modality") or defaults["fixed_modality"],
                "moving_modality": request.get("moving_modality") or defaults["moving_modality"],
                "deformable": request.get("deformable", defaults["deformable"]),  # "false" too: parsed by the workflow
                "orientation_search": request.get("orientation_search") or defaults["orientation_search"],
                "write_qc": False,
                "output_dir": tmp,
            }
            folder = os.path.join(tmp, f"{case_name(fixed)}__{case_name(moving)}")
            try:
                _run("crosssam_registration", overrides, self.bundles_dir)
            except RegistrationFailed as error:  # a refusal is an answer, not an error
                summary = _read_json(os.path.join(folder, "summary.json"))
                return None, {"success": False, "reason": summary["confidence"].get("reason", str(error)), "summary": summary}
            except DeformableStageFailed:  # the rigid result is written; summary.json says what failed
                pass
            with open(os.path.join(folder, "rigid.tfm"), encoding="utf-8") as f:
                tfm = f.read()
            return None, {
                "success": True,
                "rigid": _read_json(os.path.join(folder, "rigid.json")),
                "tfm": tfm,
                "summary": _read_json(os.path.join(folder, "summary.json")),
            }
