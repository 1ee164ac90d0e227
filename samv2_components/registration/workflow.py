"""The ``crosssam_registration`` bundle's run: embed a fixed and a moving scan, AdaReg, write every output.

Outputs (``<output_dir>/<fixed case>__<moving case>/``, written atomically):

* ``rigid.tfm`` — the rigid transform as an ITK transform file (3D Slicer, ANTs, SimpleITK, ITK), and
  ``rigid.json`` — the same as 4x4 matrices (fixed -> moving and moving -> fixed, LPS and RAS) with the convention
  spelled out and the confidence summary;
* ``<large scan>_cropped.nii.gz`` — the large-FOV scan cropped to the small scan's body plus the margin;
* ``moving_rigid.nii.gz`` / ``moving_deformable.nii.gz`` — the moving scan resampled onto the fixed grid (the
  cropped fixed grid when the fixed scan is the large one) with the rigid / rigid + B-spline transform;
* ``deformable_field.nii.gz`` (fixed -> moving displacement, LPS mm) and ``deformable_elastix.txt``;
* ``summary.json`` — inputs, settings, confidence summary (points, matches above score, inliers, residuals),
  timings; ``qc_rigid.png`` / ``qc_deformable.png`` — fixed in red, moving in green (paper Fig. 11).

When the matches do not support a rigid transform (no body, no overlap, too few consistent matches), only
``summary.json`` is written, with ``success: false`` and the reason, and the run ends with a one-line error.
When only the optional deformable stage fails (elastix can), the rigid outputs are written all the same,
``summary.json`` holds ``deformable: {success: false, error}``, and the run ends with
:class:`~samv2_components.errors.DeformableStageFailed` (one line; ``samv2 register`` exit status 4).
"""

from __future__ import annotations

import gc
import inspect
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from samv2_components.errors import DeformableStageFailed, RegistrationFailed, SAMv2InputError, parse_bool
from samv2_components.allocator import return_freed_heap_memory
from samv2_components.io.atomic import atomic_directory
from samv2_components.io.embeddings import case_name
from samv2_components.io.transforms import write_itk_transform, write_transform_json
from samv2_components.modality import check_modality
from samv2_components.registration.adareg import AdaReg
from samv2_components.registration.intensity_baselines import _sitk, matrix_to_sitk_transform, read_sitk_crop, read_sitk_image

__all__ = ["AdaRegWorkflow", "RegistrationFailed"]  # RegistrationFailed lives in samv2_components.errors

logger = logging.getLogger(__name__)


def _resample(moving, reference, matrix: np.ndarray):
    sitk = _sitk()

    stats = sitk.MinimumMaximumImageFilter()
    stats.Execute(moving)
    return sitk.Resample(moving, reference, matrix_to_sitk_transform(matrix), sitk.sitkLinear, stats.GetMinimum(), sitk.sitkFloat32)


class AdaRegWorkflow:
    """Register ``moving`` to ``fixed`` with AdaReg and write the outputs (module docstring).

    Args:
        fixed_path, moving_path: the scans (files or DICOM folders).
        fixed_modality, moving_modality: ``"ct"`` or ``"mr"`` each (never guessed).
        preprocessing: the bundle preprocessing (dict transform on ``{"image", "modality"}``).
        network, inferer, device: the embedding network and inferer.
        adareg: the :class:`~samv2_components.registration.adareg.AdaReg` settings.
        output_dir: parent of the result folder.
        deformable: run the elastix B-spline refinement.
        deformable_kwargs: arguments of :func:`~samv2_components.registration.deformable.refine_deformable`.
        write_qc: write the overlay pictures.
        info: extra entries for ``summary.json``.
        orientation_search: ``"auto"`` (default): when the scans' header orientations give no consistent
            registration, try the 24 axis-aligned orientations of the moving scan
            (:class:`~samv2_components.registration.orientation.OrientationSearch`); ``"always"``: search even
            when the header orientation succeeds; ``"off"``: trust the headers.
        orientation_kwargs: arguments of :class:`~samv2_components.registration.orientation.OrientationSearch`.
        progress: show a progress bar over the stages (embedding, rigid fit, deformable refinement, writing).
        pipeline: ``"samv2"`` (default): candidates from the embeddings and the headers, refined by mutual
            information and checked (:class:`~samv2_components.registration.pipeline.SAMv2RigidPipeline`, given as
            ``samv2_pipeline``); ``"adareg"``: the paper's AdaReg alone (with ``orientation_search``).
        samv2_pipeline: the pipeline object used when ``pipeline`` is ``"samv2"``.
    """

    def __init__(
        self,
        fixed_path: str,
        moving_path: str,
        fixed_modality: str,
        moving_modality: str,
        preprocessing: Callable,
        network: torch.nn.Module,
        inferer: Callable,
        adareg: AdaReg,
        output_dir: str,
        device: str | torch.device = "cpu",
        deformable: bool = True,
        deformable_kwargs: Mapping[str, Any] | None = None,
        write_qc: bool = True,
        info: Mapping[str, Any] | None = None,
        orientation_search: str = "auto",
        orientation_kwargs: Mapping[str, Any] | None = None,
        progress: bool = False,
        pipeline: str = "samv2",
        samv2_pipeline=None,
    ):
        from samv2_components.registration.orientation import ORIENTATION_SEARCH_MODES
        from samv2_components.registration.pipeline import PIPELINES

        if pipeline not in PIPELINES:
            raise SAMv2InputError("pipeline", f"must be one of {', '.join(PIPELINES)}; got {pipeline!r}")
        if pipeline == "samv2" and samv2_pipeline is None:
            raise SAMv2InputError("samv2_pipeline", "the samv2 pipeline needs its settings (samv2_pipeline)")
        self.pipeline, self.samv2_pipeline = pipeline, samv2_pipeline

        if orientation_search not in ORIENTATION_SEARCH_MODES:
            raise SAMv2InputError("orientation_search", f"must be one of auto, always, off; got {orientation_search!r}")
        self.orientation_search, self.orientation_kwargs = orientation_search, dict(orientation_kwargs or {})
        self.paths = {"fixed": os.fspath(fixed_path), "moving": os.fspath(moving_path)}
        self.modalities = {
            "fixed": check_modality(fixed_modality, "fixed_modality"),
            "moving": check_modality(moving_modality, "moving_modality"),
        }
        self.preprocessing, self.network, self.inferer = preprocessing, network, inferer
        self.adareg, self.output_dir, self.device = adareg, os.fspath(output_dir), torch.device(device)
        self.deformable, self.deformable_kwargs = parse_bool(deformable, "deformable"), dict(deformable_kwargs or {})
        self.write_qc, self.info = parse_bool(write_qc, "write_qc"), dict(info or {})
        self.progress = bool(progress)
        # the optional packages are checked now, not after minutes of embedding and fitting
        _sitk()
        if self.deformable:
            from samv2_components.registration.deformable import check_deformable_settings, require_elastix

            unknown = set(self.deformable_kwargs) - set(inspect.signature(check_deformable_settings).parameters) - {"prefix"}
            if unknown:
                raise SAMv2InputError(f"deformable_kwargs#{sorted(unknown)[0]}", "unknown setting of the deformable stage")
            check_deformable_settings(**self.deformable_kwargs, prefix="deformable_kwargs#")
            # checked, not loaded: the deformable stage loads the wrapping (itk-elastix's modules: 0.95 GB)
            require_elastix(self.deformable_kwargs.get("backend", "auto"))

    def _embed(self, which: str):
        path = self.paths[which]
        if not os.path.exists(path):
            raise SAMv2InputError(path, f"{which} scan not found")
        image = self.preprocessing({"image": path, "modality": self.modalities[which]})["image"]
        return image, self._embed_image(image)

    def _embed_image(self, image) -> dict:
        """Embeddings ``{head: (C, d, h, w)}`` of a preprocessed scan ``(1, D, H, W)``."""
        with torch.no_grad():
            heads = self.inferer(image[None].to(self.device), self.network.eval())
        return {k: v[0] for k, v in heads.items()}

    def _register_rigid(self, fixed_image, fixed_heads, moving_image, moving_heads):
        """The ``samv2`` pipeline, or AdaReg rigid at the header orientation then the orientation search where
        configured."""
        from samv2_components.registration.orientation import register_rigid_with_orientation_search

        if self.pipeline == "samv2":
            # release_heads: this workflow holds no other use for them (freed after the rigid fit anyway)
            return self.samv2_pipeline.rigid(fixed_image, fixed_heads, moving_image, moving_heads, embed=self._embed_image,
                                             same_modality=self.modalities["fixed"] == self.modalities["moving"],
                                             release_heads=True)

        return register_rigid_with_orientation_search(
            self.adareg, self._embed_image, fixed_image, fixed_heads, moving_image, moving_heads,
            mode=self.orientation_search, **self.orientation_kwargs,
        )

    def run(self) -> str:
        """Register and write; returns the result folder. Raises :class:`RegistrationFailed` on failure."""
        # stages: embed fixed, embed moving, rigid fit, [deformable,] write
        with tqdm(total=5 if self.deformable else 4, desc="AdaReg", unit="stage", disable=not self.progress) as bar:
            return self._run(bar)

    def _run(self, bar: tqdm) -> str:
        def stage(name: str) -> None:  # the bar counts finished stages and names the running one
            bar.update(0 if bar.n == 0 and name == "embed fixed" else 1)
            bar.set_postfix_str(name)

        t0 = time.perf_counter()
        stage("embed fixed")
        fixed_image, fixed_heads = self._embed("fixed")
        stage("embed moving")
        moving_image, moving_heads = self._embed("moving")
        embed_s = time.perf_counter() - t0
        stage("rigid fit")
        rigid = self._register_rigid(fixed_image, fixed_heads, moving_image, moving_heads)
        # the embeddings and preprocessed scans are not needed after the rigid fit: freed before ITK's modules and the
        # full-resolution images of the deformable stage come in
        del fixed_image, fixed_heads, moving_image, moving_heads
        gc.collect()
        return_freed_heap_memory()
        name = f"{case_name(self.paths['fixed'])}__{case_name(self.paths['moving'])}"
        summary: dict[str, Any] = {
            "fixed": self.paths["fixed"],
            "moving": self.paths["moving"],
            "modalities": self.modalities,
            "coordinate_system": "LPS",
            "convention": "transforms map a physical point of the fixed scan to the corresponding point of the moving scan",
            "confidence": rigid.summary,
            "embedding_seconds": round(embed_s, 2),
            **self.info,
        }
        folder = os.path.join(self.output_dir, name)
        if not rigid.success:
            with atomic_directory(self.output_dir, name) as tmp:
                self._write_json(os.path.join(tmp, "summary.json"), summary)
            raise RegistrationFailed(f"{self.paths['moving']}: registration failed: {rigid.reason} (see {folder}/summary.json)")

        small = rigid.small_fov
        box_large = rigid.small_body_corners_in_large()
        # the large-FOV scan is read as its crop around the small scan's body mapped into it (region first)
        if small == "fixed":
            fixed = read_sitk_image(self.paths["fixed"], "fixed")
            moving = read_sitk_crop(self.paths["moving"], box_large, self.adareg.crop_margin_mm, "moving")
            cropped, cropped_name = moving, "moving_cropped.nii.gz"
        else:
            fixed = read_sitk_crop(self.paths["fixed"], box_large, self.adareg.crop_margin_mm, "fixed")
            moving = read_sitk_image(self.paths["moving"], "moving")
            cropped, cropped_name = fixed, "fixed_cropped.nii.gz"
        matrix = rigid.fixed_to_moving
        if cropped is None:
            rigid.summary.update({"success": False, "reason": "the scans do not overlap after the rigid fit"})
            with atomic_directory(self.output_dir, name) as tmp:
                self._write_json(os.path.join(tmp, "summary.json"), summary)
            raise RegistrationFailed(f"{self.paths['moving']}: registration failed: the scans do not overlap")

        sitk = _sitk()

        deformable = None
        if self.deformable:
            from samv2_components.registration.deformable import refine_deformable

            stage("deformable")
            try:
                deformable = refine_deformable(fixed, moving, initial_fixed_to_moving=matrix, **self.deformable_kwargs)
            except Exception as exc:  # noqa: BLE001 - elastix fails in many ways; the rigid result must survive it
                reason = " ".join(str(exc).split())[:300] or type(exc).__name__
                summary["deformable"] = {"success": False, "error": f"{type(exc).__name__}: {reason}"}
                logger.warning("%s: the deformable stage failed (%s); writing the rigid registration", self.paths["moving"], reason)
            else:
                summary["deformable"] = {"success": True, "elastix": deformable.backend}
                summary["deformable_seconds"] = round(deformable.wall_time_s, 2)
        stage("write")
        if self.write_qc:
            from samv2_components.visualize import save_registration_overlay
        with atomic_directory(self.output_dir, name) as tmp:
            write_itk_transform(matrix, os.path.join(tmp, "rigid.tfm"), transform_type="rigid")
            write_transform_json(
                matrix,
                os.path.join(tmp, "rigid.json"),
                fixed=self.paths["fixed"],
                moving=self.paths["moving"],
                extra={"confidence": rigid.summary},
            )
            sitk.WriteImage(cropped, os.path.join(tmp, cropped_name), True)
            centre = rigid.small_body_corners.mean(0) if small == "fixed" else box_large.mean(0)
            # one copy of the moving scan on the fixed grid at a time (each is the fixed scan's size: 0.7 GB in all
            # for a 512 x 512 x 600 CT), so the rigid copy is made here, after the deformable stage, and dropped
            moving_rigid = _resample(moving, fixed, matrix)
            sitk.WriteImage(moving_rigid, os.path.join(tmp, "moving_rigid.nii.gz"), True)
            if self.write_qc:
                save_registration_overlay(os.path.join(tmp, "qc_rigid.png"), fixed, moving_rigid, point_lps=centre,
                                          title=f"{self._title(rigid)} rigid: fixed red, moving green")
            del moving_rigid
            if deformable is not None:
                from samv2_components.registration.deformable import write_displacement_field

                write_displacement_field(deformable, os.path.join(tmp, "deformable_field.nii.gz"))
                with open(os.path.join(tmp, "deformable_elastix.txt"), "w", encoding="utf-8") as f:
                    f.write(deformable.elastix_parameters)
                sitk.WriteImage(deformable.resampled_moving, os.path.join(tmp, "moving_deformable.nii.gz"), True)
                if self.write_qc:
                    save_registration_overlay(
                        os.path.join(tmp, "qc_deformable.png"), fixed, deformable.resampled_moving, point_lps=centre,
                        title=f"{self._title(rigid)} rigid + B-spline: fixed red, moving green",
                    )
            summary["total_seconds"] = round(time.perf_counter() - t0, 2)
            self._write_json(os.path.join(tmp, "summary.json"), summary)
        bar.update(1)
        logger.info("registered %s to %s: %s", self.paths["moving"], self.paths["fixed"], rigid.summary)
        if summary.get("deformable", {}).get("success") is False:
            raise DeformableStageFailed(folder, f"{self.paths['moving']}: the deformable stage failed "
                                                f"({summary['deformable']['error']}); the rigid registration is written in "
                                                f"{folder} (see summary.json)")
        return folder

    def _title(self, rigid) -> str:
        """QC title: the pipeline and, for ``samv2``, the winning candidate shown."""
        if self.pipeline == "adareg":
            return "AdaReg"
        return f"SAMv2 pipeline (winner: {rigid.summary.get('winner', '?')})"

    @staticmethod
    def _write_json(path: str, record: Mapping[str, Any]) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
