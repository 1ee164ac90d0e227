"""The ``samv2_matching`` bundle's moving parts: the template of a run and the per-query matching transform.

A run (``configs/inference.json``) embeds the template scan once (:class:`MatchingTemplate`), then an ignite
evaluator embeds each query scan through the same preprocessing and inferer, and :class:`MatchPointsd` (its
post-processing) matches the template points into it and writes, per query, into ``<output_dir>/<query case>/``:

* ``<points file name>``: the matched points in the **same format and coordinate system as the input points file**
  (CSV / JSON / Slicer ``.mrk.json``; the file states its system), with the columns ``score, method, confident,
  n_fixed_points, residual_mm`` (see :class:`~samv2_components.matching.matcher.MatchResult`);
* ``matches.json``: template, query, coordinate system, matcher parameters, per-point template and matched
  coordinates and flags;
* ``qc/<NNN>_<point>.png`` (optional): template point and match on axial, coronal and sagittal planes with the
  similarity heat map (:func:`~samv2_components.visualize.save_match_qc`).

A query's folder is written atomically. Problems a user can fix fail before anything is written, with one line
naming the file: an empty or unreadable points file, a point outside the template scan, a modality the model was
not trained on, or a CT/MR pair (Semantic-SAM embeddings are single-modality).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from samv2_components.errors import SAMv2InputError, parse_bool
from samv2_components.geometry import convert_affine, convert_points, points_outside_scan
from samv2_components.io.atomic import atomic_directory
from samv2_components.io.embeddings import case_name
from samv2_components.io.image import load_scan
from samv2_components.io.point_pairs import is_point_pairs_file, read_point_pairs
from samv2_components.io.points import PointSet, read_points, write_points
from samv2_components.matching.align_then_match import align_then_match
from samv2_components.matching.embedded_scan import EmbeddedScan
from samv2_components.matching.matcher import SAMv2Matcher
from samv2_components.matching.refinement import LocalIntensityRefiner
from samv2_components.modality import check_modality
from samv2_components.visualize import save_match_qc

__all__ = ["MatchingTemplate", "MatchPointsd", "points_outside_scan", "check_modality_pair"]

logger = logging.getLogger(__name__)


def check_modality_pair(
    template_modality: str, query_modality: str, model_modalities: Sequence[str], allow_cross_modality: bool, source
) -> None:
    """Raise :class:`SAMv2InputError` (naming ``source``) for a modality the model was not trained on, or for a
    template/query pair of different modalities unless ``allow_cross_modality``."""
    template_modality = check_modality(template_modality, "template modality")
    query_modality = check_modality(query_modality, "query modality")
    trained = [check_modality(m, "model modality") for m in model_modalities]
    for m in (template_modality, query_modality):
        if m not in trained:
            raise SAMv2InputError(source, f"modality {m!r} is not one the model was trained on ({', '.join(trained)})")
    if template_modality != query_modality and not allow_cross_modality:
        raise SAMv2InputError(
            source,
            f"query modality {query_modality!r} differs from the template's {template_modality!r}: Semantic-SAM "
            "embeddings are single-modality (use a CrossSAM model, or set allow_cross_modality to true)",
        )


class MatchingTemplate:
    """The template of a matching run: its scan, its points and its embedding, computed once.

    Args:
        image_path: the template scan (file or DICOM folder).
        points_path: its points (``.csv``, ``.json`` or ``.mrk.json``; any coordinate system the file states), or a
            ground-truth pairs CSV (:mod:`samv2_components.io.point_pairs`), whose template side is used.
        modality: ``"ct"`` or ``"mr"``.
        preprocessing: the bundle's preprocessing (dict transform on ``{"image", "modality"}``).
        network: the embedding network.
        inferer: the embedding inferer (``inferer(image (1, 1, D, H, W), network) -> {head: MetaTensor}``).
        matcher: the :class:`SAMv2Matcher` (to prepare the embedded scan with its search settings).
        device: where the network runs.

    Call :meth:`setup` before use (the bundle does it in ``initialize``): it reads and checks the points and
    embeds the scan, so that input errors surface before any query is processed.
    """

    def __init__(
        self,
        image_path: str,
        points_path: str,
        modality: str,
        preprocessing: Callable,
        network: torch.nn.Module,
        inferer: Callable,
        matcher: SAMv2Matcher,
        device: str | torch.device = "cpu",
    ):
        self.image_path, self.points_path = os.fspath(image_path), os.fspath(points_path)
        self.modality = check_modality(modality, "template modality")
        self.preprocessing, self.network, self.inferer = preprocessing, network, inferer
        self.matcher, self.device = matcher, torch.device(device)
        self.points: PointSet | None = None
        self.image: MetaTensor | None = None
        self.scan: EmbeddedScan | None = None
        self._native: MetaTensor | None = None

    @property
    def native_image(self) -> MetaTensor:
        """The template scan as read from disk (for the intensity refinement), loaded once."""
        if self._native is None:
            self._native = load_scan(self.image_path)
        return self._native

    @property
    def points_lps(self) -> np.ndarray:
        return self.points.to("LPS").coords

    @property
    def output_file_name(self) -> str:
        """Name of a query's matched-points file: the points file's name (``<stem>_matched.csv`` for pairs)."""
        name = os.path.basename(self.points_path)
        if is_point_pairs_file(self.points_path):
            return name[: -len(".csv")] + "_matched.csv"
        return name

    def setup(self) -> MatchingTemplate:
        """Read the points, embed the template and check that every point lies inside it. Returns ``self``."""
        if self.scan is not None:
            return self
        if is_point_pairs_file(self.points_path):
            self.points = read_point_pairs(self.points_path).template
        else:
            self.points = read_points(self.points_path)
        if not os.path.exists(self.image_path):
            raise SAMv2InputError(self.image_path, "template scan not found")
        self.image = self.preprocessing({"image": self.image_path, "modality": self.modality})["image"]
        outside = points_outside_scan(self.image, self.points_lps)
        if outside.any():
            names = [n for n, o in zip(self.points.names, outside) if o]
            raise SAMv2InputError(
                self.points_path,
                f"{len(names)} point(s) outside the template scan {os.path.basename(self.image_path)}: "
                f"{', '.join(names[:5])}{' ...' if len(names) > 5 else ''} (check the coordinate system: "
                f"the file says {self.points.coordinate_system})",
            )
        self.network.eval()
        with torch.no_grad():
            heads = self.inferer(self.image[None].to(self.device), self.network)
        self.scan = self.matcher.prepare({k: v[0] for k, v in heads.items()})
        return self

    def embed_image(self, image: MetaTensor) -> dict:
        """``{head: (C, d, h, w)}`` of a preprocessed image ``(1, D, H, W)`` with the template's network and inferer
        (the query resampled into the template's frame, :mod:`~samv2_components.matching.align_then_match`)."""
        with torch.no_grad():
            heads = self.inferer(image[None].to(self.device), self.network)
        return {k: v[0] for k, v in heads.items()}


def _heat_map(template_descriptor: torch.Tensor, query: EmbeddedScan) -> MetaTensor:
    """Similarity ``(1, d, h, w)`` of one template descriptor ``(C,)`` with every query fine voxel, on its grid."""
    scores = query.map.scores(template_descriptor)
    affine = convert_affine(query.map.affine, query.map.space, "RAS")
    return MetaTensor(scores.view(1, *query.map.grid_shape).cpu(), affine=torch.as_tensor(affine))


class MatchPointsd(MapTransform):
    """Post-processing transform: match the template points into each (decollated) query and write the results.

    Args:
        keys: the query image key (the preprocessed query, for its name and the QC pictures).
        template: the run's :class:`MatchingTemplate` (set up).
        matcher: the :class:`SAMv2Matcher`.
        output_dir: parent of the per-query folders.
        pred_key: key of the query's ``{head: MetaTensor}`` (the inferer's output).
        modality_key: key of the query's modality in the data.
        model_modalities: modalities the weights were trained on.
        allow_cross_modality: accept a query whose modality differs from the template's.
        write_qc: write ``qc/<point>.png`` per point.
        qc_field_of_view_mm: side of a QC panel, mm.
        info: extra entries for ``matches.json`` (weights, network...).
        refiner: a :class:`~samv2_components.matching.refinement.LocalIntensityRefiner` to refine every match by
            local intensity registration at native resolution (``None``: embedding matches only). The points file
            then holds the refined position (where accepted) and the embedding match in ``embedding_x/y/z``.
        report_absent: points whose anatomy is not in the query are reported as absent, not placed: those the
            global map puts outside the query's field of view (all of them when no global map could be fitted,
            i.e. the query shares too little with the template). They are left out of the points files and listed
            in ``matches.json`` under ``absent`` with the reason. Off: every point is placed (and flagged).
        write_markups: also write the matched points as a 3D Slicer markups file (``<stem>.mrk.json``).
        align_min_rotation_deg: when the global map turns the query by at least this much, match again with the
            query resampled into the template's frame (one more embedding) and map the answers back exactly
            (:mod:`~samv2_components.matching.align_then_match`); ``None``: never.
    """

    def __init__(
        self,
        keys: KeysCollection,
        template: MatchingTemplate,
        matcher: SAMv2Matcher,
        output_dir: str,
        pred_key: str = "pred",
        modality_key: str = "modality",
        model_modalities: Sequence[str] = ("ct", "mr"),
        allow_cross_modality: bool = False,
        write_qc: bool = True,
        qc_field_of_view_mm: float = 160.0,
        info: Mapping[str, Any] | None = None,
        refiner: LocalIntensityRefiner | None = None,
        report_absent: bool = False,
        write_markups: bool = False,
        align_min_rotation_deg: float | None = 15.0,
    ):
        super().__init__(keys)
        self.align_min_rotation_deg = None if align_min_rotation_deg is None else float(align_min_rotation_deg)
        self.report_absent = parse_bool(report_absent, "report_absent")
        self.write_markups = parse_bool(write_markups, "write_markups")
        self.refiner = refiner
        self.template, self.matcher, self.output_dir = template, matcher, output_dir
        self.pred_key, self.modality_key = pred_key, modality_key
        self.model_modalities, self.allow_cross_modality = tuple(model_modalities), bool(allow_cross_modality)
        self.write_qc, self.qc_field_of_view_mm = parse_bool(write_qc, "write_qc"), float(qc_field_of_view_mm)
        self.info = dict(info or {})

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            source = str(image.meta.get("filename_or_obj", "query"))
            modality = d.get(self.modality_key, self.template.modality)
            check_modality_pair(
                self.template.modality, modality, self.model_modalities, self.allow_cross_modality, source
            )
            template = self.template.setup()
            query = self.matcher.prepare(d[self.pred_key])
            result = self.matcher.match(template.scan, query, template.points_lps)
            aligned = False
            if self.align_min_rotation_deg is not None and self.matcher.global_consistency:
                result, aligned = align_then_match(
                    self.matcher, template.scan, template.image, image, template.points_lps, template.embed_image,
                    first_result=result, min_rotation_deg=self.align_min_rotation_deg,
                )
            refinement = None
            if self.refiner is not None:
                refinement = self.refiner.refine(
                    template.native_image, template.points_lps, load_scan(source), result.points_lps,
                    same_modality=modality == template.modality,
                    local_linear=self.refiner.local_frames(self.matcher, template.scan, query, template.points_lps,
                                                           alignment=result.alignment),
                )
            d["matches_path"] = self._write(template, query, image, source, result, refinement, aligned)
        return d

    def _presence(self, result, n: int) -> tuple[np.ndarray, list[tuple[int, str]]]:
        """``(present (N,) bool, [(index, reason)] of the absent points)``; everything is present unless
        ``report_absent``."""
        present = np.ones(n, dtype=bool)
        if not self.report_absent:
            return present, []
        absent = _absent_reasons(result, n)
        present[[i for i, _ in absent]] = False
        return present, absent

    def _write(self, template: MatchingTemplate, query: EmbeddedScan, image: MetaTensor, source: str, result,
               refinement=None, aligned: bool = False) -> str:
        points = template.points
        system = points.coordinate_system
        final_lps = result.points_lps if refinement is None else refinement.points_lps
        columns = result.columns()
        if refinement is not None:
            columns.update(refinement.columns())
            embedding = convert_points(refinement.embedding_points_lps, "LPS", system)  # in the file's system
            columns.update({f"embedding_{a}": [round(float(v), 3) for v in embedding[:, i]] for i, a in enumerate("xyz")})
        present, absent = self._presence(result, len(points))
        matched_all = convert_points(final_lps, "LPS", system)
        keep = np.flatnonzero(present)
        matched = PointSet([points.names[i] for i in keep], matched_all[keep], system,
                           {k: [v[i] for i in keep] for k, v in columns.items()})
        unconfident = [n for n, c, p in zip(points.names, result.confident, present) if not c and p]
        if unconfident:
            logger.warning(
                "%s: %d of %d matches below the confidence score %.2f (flagged confident=false): %s",
                source, len(unconfident), len(points), self.matcher.min_confident_score, ", ".join(unconfident[:10]),
            )
        name = case_name(source)
        with atomic_directory(self.output_dir, name) as folder:
            points_file = template.output_file_name
            write_points(matched, os.path.join(folder, points_file))
            if self.write_markups:
                stem = points_file[: -len(".csv")] if points_file.endswith(".csv") else os.path.splitext(points_file)[0]
                if not points_file.endswith(".mrk.json"):
                    write_points(matched, os.path.join(folder, stem + ".mrk.json"))
            summary = {
                "template": template.image_path,
                "template_points": template.points_path,
                "query": source,
                "coordinate_system": system,
                "units": "mm",
                "points_file": points_file,
                "method": self.matcher.method + ("" if refinement is None else "+refine"),
                "matcher": vars(self.matcher),
                "n_points": len(points),
                "n_confident": int(np.sum(result.confident)),
                "n_fixed_point": int(sum(m == "fixed_point" for m in result.methods)),
                "global_map": None if result.global_map is None else result.global_map.summary(),
                "aligned_to_template": aligned,
                "absent": [{"name": points.names[i], "reason": reason} for i, reason in absent],
                "refinement": None if refinement is None else {
                    **vars(self.refiner), "similarity": refinement.similarity, "n_refined": int(refinement.accepted.sum())
                },
                **self.info,
                "points": [
                    {
                        "name": n,
                        "template": [round(float(v), 3) for v in t],
                        "matched": [round(float(v), 3) for v in m],
                        "nearest_neighbour": [round(float(v), 3) for v in nn],
                        **{k: col[i] for k, col in columns.items()},
                    }
                    for i, (n, t, m, nn) in enumerate(
                        zip(points.names, points.coords, matched_all, convert_points(result.nn_points_lps, "LPS", system))
                    )
                    if present[i]
                ],
            }
            with open(os.path.join(folder, "matches.json"), "w", encoding="utf-8") as f:
                json.dump(summary, f, indent=2, default=str)
            if self.write_qc:
                descriptors = template.scan.descriptors_at(template.points_lps)
                for i, point_name in enumerate(points.names):
                    if not present[i]:
                        continue
                    title = (
                        f"{point_name}   score {result.scores[i]:.3f}   {result.methods[i]}"
                        f"{'' if result.confident[i] else '   LOW CONFIDENCE'}"
                    )
                    save_match_qc(
                        os.path.join(folder, "qc", f"{i + 1:03d}_{_safe_file_name(point_name)}.png"),
                        template.image,
                        template.points_lps[i],
                        image,
                        final_lps[i],
                        heat_map=_heat_map(descriptors[i], query),
                        title=title,
                        field_of_view_mm=self.qc_field_of_view_mm,
                    )
        return os.path.join(self.output_dir, name)


def _absent_reasons(result, n: int) -> list[tuple[int, str]]:
    """``(index, reason)`` of the points whose anatomy the global map says the query does not hold."""
    if result.global_map is None or not result.global_map.valid:
        return [(i, "no global map: the query shares too little consistent anatomy with the template") for i in range(n)]
    return [(i, "the global map puts it outside the query's field of view")
            for i in range(n) if not result.predicted_inside[i]]


def _safe_file_name(name: str) -> str:
    """A point name made safe as a file name (letters, digits, ``-_.`` kept, the rest ``_``)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip(".")
    return safe or "point"
