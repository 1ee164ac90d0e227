"""The ``samv2`` rigid registration pipeline (the ``crosssam_registration`` bundle default): SAM proposes,
intensity refines, the bundle checks.

1. **Preconditions.** Both scans have a body; their fields of view, as the headers place them, come within
   ``header_overlap_margin_mm`` of each other (scans two metres apart are refused, not "registered" by anatomy
   alone; set a large margin for headers in unrelated frames of reference).
2. **Candidates at the header orientation** (:mod:`~samv2_components.registration.candidates`): the header start
   (identity rotation, body centres aligned), AdaReg's robust rigid fit of the embedding matches, the
   translation those matches vote for; optionally (``classical``, off in the bundle) the classical intensity
   registration alone (SimpleITK from the centres of mass on the whole scans).
3. **Candidates at other orientations**, under ``orientation_search`` (``"auto"``: only when step 2 gives no
   well-supported answer, ``"always"``, ``"off"``): the 24 axis-aligned turns of the moving scan ranked cheaply by
   intensity at a coarse level (:mod:`~samv2_components.registration.turn_search`); the ``search_top_k`` best give
   their coarse pose, and those ranked above the headers' orientation (embedded already) are embedded and give
   AdaReg's fit and the translation vote of their matches too. With them, the
   ``tilt_top_k`` best **tilts** of the small scan around the headers' orientation (a lattice of rotations up to
   40 deg, ranked the same way; :class:`~samv2_components.registration.turn_search.IntensityTiltSearch`): a scan
   turned 30-45 deg about an oblique axis is beyond the refinement's reach from every other candidate.
4. **Refinement** (:mod:`~samv2_components.registration.intensity_refinement`): rigid Mattes-MI registration from
   every candidate on the small-FOV scan's footprint, on the coarser pyramid levels, on the scans without the
   padding the network needed.
5. **Translation search** (:mod:`~samv2_components.registration.translation_search`): for the rotations of the
   ``search_rotations`` best distinct refined candidates, every translation within ±80 mm is scored by MI at 4 mm;
   the ``translation_top_k`` best poses of all become candidates too and are refined from the 4 mm level (the
   embeddings give the rotation roughly, intensity registration cannot cross the 2-5 cm a loose candidate leaves).
   Then the finest level for the ``refine_top_k`` best distinct answers.
6. **Selection** (:mod:`~samv2_components.registration.selection`): every refined candidate scored by MI on the
   small scan's footprint (the same samples for all), by the support of SAM's matches (within
   ``support_tolerance_mm``) and, for the finished ones, by edge agreement on the same footprint
   (:mod:`~samv2_components.registration.edge_agreement`; it settles near ties in MI); the best wins, or the run
   refuses when the best two answers disagree (the small body's points, every ``AGREEMENT_STEP_MM``, more than
   ``agreement_mm`` apart on average) and neither
   clearly wins (after the rival, if it had only the coarser levels, got the finest one too: ``settle_rivals``),
   when nothing overlaps, or when SAM supports none of them.

The result is a :class:`~samv2_components.registration.adareg.RigidRegistration` (the workflow crops and refines
deformably from it as from AdaReg's); ``summary["candidates"]`` names every candidate, its refined scores and the
winner. Matrices are 4x4 rigid **fixed -> moving**, LPS mm.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from monai.data import MetaTensor

from samv2_components.errors import SAMv2InputError
from samv2_components.geometry import apply_matrix, body_box_corners, body_mask, body_points, rotation_angle_deg
from samv2_components.inference.spilled_heads import SpilledHeads
from samv2_components.registration.adareg import AdaReg, RigidRegistration, transform_summary
from samv2_components.registration.candidates import (
    MatchSet,
    RigidCandidate,
    classical_candidate,
    header_candidate,
    match_set,
    match_support,
    vote_candidate,
)
from samv2_components.registration.edge_agreement import footprint_edge_agreement
from samv2_components.registration.intensity_refinement import IntensityRefiner, ScanPair
from samv2_components.registration.selection import (
    ScoredCandidate,
    Selection,
    select_candidate,
    transforms_agree,
)
from samv2_components.registration.translation_search import TranslationSearch
from samv2_components.registration.turn_search import IntensityTiltSearch, IntensityTurnSearch

__all__ = ["PIPELINES", "SAMv2RigidPipeline", "fov_gap_mm"]

#: the bundle's ``pipeline`` setting: the new default, or the paper's AdaReg alone
PIPELINES = ("samv2", "adareg")
#: spacing (mm) of the small body's points at which two answers are compared (the benchmark's TRE grid)
AGREEMENT_STEP_MM = 8.0


def _fov_box(image: MetaTensor) -> tuple[np.ndarray, np.ndarray]:
    from samv2_components.registration.orientation import _box_corners

    corners = _box_corners(image)
    return corners.min(0), corners.max(0)


def fov_gap_mm(fixed_image: MetaTensor, moving_image: MetaTensor) -> float:
    """Distance (mm) between the two scans' voxel-grid bounding boxes in world space (LPS), as the headers place
    them; 0 when they intersect."""
    (lo_f, hi_f), (lo_m, hi_m) = _fov_box(fixed_image), _fov_box(moving_image)
    gap = np.maximum(0.0, np.maximum(lo_f - hi_m, lo_m - hi_f))
    return float(np.linalg.norm(gap))


class SAMv2RigidPipeline:
    """Candidates from the embeddings, intensity refinement, selection with refusal (module docstring).

    Args:
        adareg: the AdaReg settings (body masks, matches, its fits).
        orientation_search: ``"auto"``, ``"always"`` or ``"off"``.
        search_top_k: turns of the coarse intensity ranking that give candidates: their coarse pose, and where
            they are embedded (below), AdaReg's fit and the translation vote of their matches.
        embed_turns_below_header: embed also the turns among them that rank below the headers' orientation (turn
            0, embedded already). Off in the bundle: embedding a turn costs a network pass and AdaReg's fit
            (~2.7 s each); on the validation draw (seed 1) every right answer from an embedded turn came from a
            turn ranked above the headers' orientation, and an aligned case spent 10.6 s embedding four turns
            ranked below it.
        tilt_top_k: tilts of the coarse tilt ranking that become candidates, where the orientation search runs (0:
            none). Measured on the validation draw (seed 1): the tilt nearest the truth ranked first on the hard
            cases offset 26-39 deg, where no other candidate reached the truth's basin.
        refine_top_k: every candidate is refined on the coarser pyramid levels; the finest level runs for this many
            best distinct answers only (the others stay as they are: they lose no race they could have won by more
            than the last level's polish, and the refinement costs a third of what it did).
        settle_rivals: before refusing because a rival answer is not clearly beaten, give a rival that had only the
            coarser levels the finest level too and select again, at most this many times (0: refuse at once).
            Measured on the validation draw (seed 1): an aligned case was refused between its right answer (1.2 mm
            off) and a candidate 9.3 mm off whose refinement had stopped at 4 mm voxels.
        search_rotations: the translation search runs for the rotations of this many best refined candidates whose
            rotations differ by more than ``rotation_separation_deg`` (0: no translation search).
        translation_top_k: the best poses of the translation search (over all its rotations) that become candidates.
        search_below_support: under ``"auto"``, look at other orientations when the header orientation's winner is
            supported by less than this fraction of the matches (or when it gives no winner).
        vote_bandwidth_mm: translation votes this close agree (:func:`~samv2_components.registration.candidates.translation_vote`).
        support_tolerance_mm: a match supports a transform when it maps within this distance.
        agreement_mm, mi_margin, support_margin, min_support, min_overlap, min_mi, turn_deg, turn_margin, tilt_margin,
            edge_margin, edges_against_margin: the selection rules
            (:func:`~samv2_components.registration.selection.select_candidate`); ``min_support`` applies to a pair
            of one modality, ``min_support_cross_modality`` to a CT-MR pair, whose embeddings agree far less.
            Measured with the shipped weights: a wrong CT-CT answer (a CT turned by 180 deg, search off, refined
            from the header) had 7.4 % support; right CT-MR phantom answers 1.6-15.5 % and wrong ones up to 28 %,
            so for CT-MR support is no gate (0: it only decides ties and clear wins); on a validation draw of the
            phantom benchmark (seed 1), a 5 % gate turned right answers into 1 wrong transform and 1 refusal.
        header_overlap_margin_mm: the headers' fields of view must come this close (mm).
        classical: the ``classical`` candidate (:func:`~samv2_components.registration.candidates.classical_candidate`):
            True for ``register_intensity``'s defaults, a dict of its keyword arguments to override them, False for
            none.
        classical_rescue: the same candidate, added only when the selection would refuse (then the selection runs
            again): True (``register_intensity``'s defaults), a dict of its settings, or False (refuse at once).
            Ignored when ``classical`` is set (the candidate is there from the start).
        refinement: arguments of :class:`~samv2_components.registration.intensity_refinement.IntensityRefiner`.
        turn_search: arguments of :class:`~samv2_components.registration.turn_search.IntensityTurnSearch`.
        tilt_search: arguments of :class:`~samv2_components.registration.turn_search.IntensityTiltSearch`.
        translation_search: arguments of :class:`~samv2_components.registration.translation_search.TranslationSearch`.
    """

    def __init__(
        self,
        adareg: AdaReg,
        orientation_search: str = "auto",
        search_top_k: int = 5,
        embed_turns_below_header: bool = False,
        tilt_top_k: int = 3,
        refine_top_k: int = 3,
        settle_rivals: int = 3,
        search_rotations: int = 4,
        rotation_separation_deg: float = 10.0,
        translation_top_k: int = 3,
        search_below_support: float = 0.2,
        vote_bandwidth_mm: float = 10.0,
        support_tolerance_mm: float = 10.0,
        agreement_mm: float = 8.0,
        mi_margin: float = 0.03,
        support_margin: float = 0.1,
        min_support: float = 0.2,
        min_support_cross_modality: float = 0.0,
        min_overlap: float = 0.3,
        min_mi: float = 0.05,
        turn_deg: float = 60.0,
        turn_margin: float = 0.1,
        tilt_margin: float = 0.05,
        edge_margin: float = 0.1,
        edges_against_margin: float = 0.3,
        header_overlap_margin_mm: float = 100.0,
        classical: bool | dict[str, Any] = False,
        classical_rescue: bool | dict[str, Any] = True,
        refinement: dict[str, Any] | None = None,
        turn_search: dict[str, Any] | None = None,
        tilt_search: dict[str, Any] | None = None,
        translation_search: dict[str, Any] | None = None,
    ):
        if orientation_search not in ("auto", "always", "off"):
            raise SAMv2InputError("orientation_search", f"must be one of auto, always, off; got {orientation_search!r}")
        self.adareg, self.orientation_search = adareg, orientation_search
        self.search_top_k, self.vote_bandwidth_mm = int(search_top_k), float(vote_bandwidth_mm)
        self.embed_turns_below_header = bool(embed_turns_below_header)
        self.refine_top_k, self.settle_rivals = int(refine_top_k), int(settle_rivals)
        self.search_below_support, self.support_tolerance_mm = float(search_below_support), float(support_tolerance_mm)
        self.rules = {"agreement_mm": float(agreement_mm), "mi_margin": float(mi_margin), "support_margin": float(support_margin),
                      "min_support": float(min_support), "min_overlap": float(min_overlap), "min_mi": float(min_mi),
                      "turn_deg": float(turn_deg), "turn_margin": float(turn_margin), "tilt_margin": float(tilt_margin),
                      "edge_margin": float(edge_margin), "edges_against_margin": float(edges_against_margin)}
        self.min_support_cross_modality = float(min_support_cross_modality)
        self.header_overlap_margin_mm = float(header_overlap_margin_mm)
        self.classical = dict(classical) if isinstance(classical, dict) else ({} if classical else None)
        self.classical_rescue = (dict(classical_rescue) if isinstance(classical_rescue, dict)
                                 else ({} if classical_rescue else None))
        self.refiner = IntensityRefiner(**dict(refinement or {}))
        self.turn_search = IntensityTurnSearch(**dict(turn_search or {}))
        self.tilt_search, self.tilt_top_k = IntensityTiltSearch(**dict(tilt_search or {})), int(tilt_top_k)
        self.translation_search = TranslationSearch(**dict(translation_search or {}))
        self.search_rotations, self.translation_top_k = int(search_rotations), int(translation_top_k)
        self.rotation_separation_deg = float(rotation_separation_deg)
        # the translation search's poses are refined from the pyramid level at or below its own voxel size
        self._shift_levels = slice(next((i for i, f in enumerate(self.refiner.shrink_factors)
                                         if f <= self.translation_search.shrink_factor), 0), -1)

    # ------------------------------------------------------------------------------------------------ steps
    def _score(self, pair: ScanPair, candidates: list[RigidCandidate], match_sets: list[MatchSet],
               levels: slice = slice(0, -1)) -> list[ScoredCandidate]:
        """Refine every candidate on ``levels`` of the pyramid (all but the finest by default) and score it
        (:meth:`_finish` does the rest for the best few)."""
        scored = []
        for c in candidates:
            refined = self.refiner(pair, c.name, c.fixed_to_moving, min_overlap=0.0, levels=levels)
            support, source = match_support(refined.fixed_to_moving, match_sets, self.support_tolerance_mm)
            scored.append(ScoredCandidate(c.name, refined.fixed_to_moving, refined.mi, support, refined.overlap_fraction,
                                          refined.error, {**c.info, "support_from": source, "finest_level": False,
                                                          "refinement_moved_mm": _moved_mm(pair, c.fixed_to_moving, refined.fixed_to_moving),
                                                          "refinement_seconds": round(refined.seconds, 2)},
                                          start=c.fixed_to_moving, tilt=c.tilt))
        return scored

    def _finish(self, pair: ScanPair, scored: list[ScoredCandidate], points: np.ndarray, match_sets: list[MatchSet]) -> None:
        """Run the finest pyramid level once for the ``refine_top_k`` best *distinct* answers (by MI; candidates
        within ``agreement_mm`` of a better one are the same answer and wait), then its restarts
        (:meth:`~samv2_components.registration.intensity_refinement.IntensityRefiner.restart`) for the
        ``refine_top_k`` best answers that are still distinct after it, in place.

        Why the restarts come second: candidates of one basin often stand more than ``agreement_mm`` apart after
        the coarser levels and meet after one finest run; restarting each of them polished one answer several
        times (measured on an aligned case of the validation draw: 5 finest runs with restarts, 22 s, all five
        ending within 2 mm of each other)."""
        for c in _distinct(scored, points, self.rules["agreement_mm"])[: self.refine_top_k]:
            if not c.info["finest_level"]:
                self._refine_finest(pair, c, match_sets, restarts=0)
        finished = [c for c in scored if c.info["finest_level"]]
        for c in _distinct(finished, points, self.rules["agreement_mm"])[: self.refine_top_k]:
            if not c.info.get("restarted"):
                self._restart(pair, c, match_sets)

    def _refine_finest(self, pair: ScanPair, c: ScoredCandidate, match_sets: list[MatchSet], restarts: int | None = None) -> None:
        """The finest pyramid level for one candidate refined so far (then ``restarts`` restarts at most; None:
        the refiner's), rescored, in place."""
        refined = self.refiner(pair, c.name, c.fixed_to_moving, min_overlap=0.0, levels=slice(-1, None), restarts=restarts)
        c.fixed_to_moving, c.mi, c.overlap_fraction, c.error = refined.fixed_to_moving, refined.mi, refined.overlap_fraction, refined.error
        c.info.update({"finest_level": True, "restarted": restarts != 0,
                       "refinement_seconds": round(c.info["refinement_seconds"] + refined.seconds, 2)})
        self._moved(pair, c, match_sets)

    def _restart(self, pair: ScanPair, c: ScoredCandidate, match_sets: list[MatchSet]) -> None:
        """The finest level's restarts for one candidate that had it, rescored, in place."""
        t0 = time.perf_counter()
        if not c.error:
            c.fixed_to_moving, c.mi, c.overlap_fraction = self.refiner.restart(pair, c.fixed_to_moving, c.mi, c.overlap_fraction)
        c.info.update({"restarted": True, "refinement_seconds": round(c.info["refinement_seconds"] + time.perf_counter() - t0, 2)})
        self._moved(pair, c, match_sets)

    def _moved(self, pair: ScanPair, c: ScoredCandidate, match_sets: list[MatchSet]) -> None:
        """Support and distance moved from the start, after a candidate's pose changed."""
        c.support, c.info["support_from"] = match_support(c.fixed_to_moving, match_sets, self.support_tolerance_mm)
        c.info["refinement_moved_mm"] = _moved_mm(pair, c.start, c.fixed_to_moving)

    def _translation_candidates(self, pair: ScanPair, scored: list[ScoredCandidate]) -> tuple[list[RigidCandidate], dict]:
        """Step 5: the translation search for the rotations of the best distinct refined candidates; the
        ``translation_top_k`` best poses over all of them, as candidates named ``shift_<source>_<peak>``."""
        t0 = time.perf_counter()
        sources: list[ScoredCandidate] = []
        for c in _by_mi(scored):
            if len(sources) == self.search_rotations:
                break
            if all(rotation_angle_deg(c.fixed_to_moving[:3, :3] @ s.fixed_to_moving[:3, :3].T) > self.rotation_separation_deg
                   for s in sources):
                sources.append(c)
        peaks = []
        for c in sources:
            try:
                found = self.translation_search(pair, c.fixed_to_moving, self.refiner.overlap_margin_mm)
                peaks += [(p, c, k) for k, p in enumerate(found)]
            except SAMv2InputError:  # no footprint at the search's level: the other candidates stand
                break
        peaks.sort(key=lambda t: -t[0].score)
        candidates = [RigidCandidate(f"shift_{c.name}_{k}", p.fixed_to_moving, {"search_score": round(p.score, 4),
                                                                                "shift_mm": np.round(p.shift_mm, 1).tolist()}, tilt=c.tilt)
                      for p, c, k in peaks[: self.translation_top_k]]
        record = {"seconds": round(time.perf_counter() - t0, 2), "rotations_from": [c.name for c in sources],
                  "best": [c.name for c in candidates]}
        return candidates, record

    def _select(self, pair: ScanPair, scored: list[ScoredCandidate], points: np.ndarray, match_sets: list[MatchSet],
                same_modality: bool) -> Selection:
        """Select (:func:`~samv2_components.registration.selection.select_candidate`); a refusal whose rival had only
        the coarser levels gives the rival the finest level and selects again (``settle_rivals`` times at most):
        two answers are compared fully refined, or the rival is a start that stopped short of the same basin."""
        rules = dict(self.rules)
        if not same_modality:
            rules["min_support"] = self.min_support_cross_modality
        _measure_edges(pair, scored, self.refiner.overlap_margin_mm)
        selection = select_candidate(scored, points, **rules)
        for _ in range(self.settle_rivals):
            rival = selection.rival
            if selection.success or rival is None or rival.info.get("finest_level", True):
                break
            self._refine_finest(pair, rival, match_sets)
            _measure_edges(pair, scored, self.refiner.overlap_margin_mm)
            selection = select_candidate(scored, points, **rules)
        return selection

    def _header_candidates(self, adareg: RigidRegistration, fixed_image, fixed_mask, moving_image, moving_mask, pair: ScanPair):
        """Step 2: ``header``, ``adareg`` (when its fit passed its checks), ``vote`` and ``classical`` (when set and
        it ran); and the header match set."""
        candidates = [header_candidate(fixed_image, fixed_mask, moving_image, moving_mask)]
        if self.classical is not None:
            try:
                candidates.append(classical_candidate(pair.fixed, pair.moving, self.classical))
            except SAMv2InputError:  # every sample left the moving scan: the other candidates stand
                pass
        if adareg.success:
            candidates.append(RigidCandidate("adareg", adareg.fixed_to_moving.copy(), {"n_inliers": adareg.summary.get("n_inliers")}))
        matches = match_set("adareg", adareg, self.adareg.min_match_score)
        if matches is None:
            return candidates, []
        candidates.append(vote_candidate("vote", matches, np.eye(3), self.vote_bandwidth_mm))
        return candidates, [matches]

    def _turn_candidates(self, pair: ScanPair, fixed_image, fixed_heads, moving_image, embed) -> tuple[list[RigidCandidate], list[MatchSet], dict]:
        """Step 3: the coarse intensity ranking of the 24 turns; the best ``search_top_k`` embedded."""
        from samv2_components.registration.orientation import OrientationSearch

        t0 = time.perf_counter()
        ranked, record = self.turn_search(pair, moving_image, self.refiner)
        fits = OrientationSearch(self.adareg, embed, search_grid_spacing_mm=None)  # AdaReg's own settings per turn
        header_rank = next((i for i, t in enumerate(ranked) if t.index == 0), len(ranked))
        candidates, sets, embedded = [], [], []
        for rank, turn in enumerate(ranked[: self.search_top_k]):
            k = turn.index
            candidates.append(RigidCandidate(f"turn_{k}", turn.fixed_to_moving.copy(), {"coarse_score": round(turn.score, 4)}))
            if k == 0:  # the header orientation: its matches are already there (step 2)
                continue
            if rank > header_rank and not self.embed_turns_below_header:
                continue
            embedded.append(k)
            tried, _ = fits.try_turn(k, turn.voxel_rotation, fixed_image, fixed_heads, moving_image, adareg=self.adareg)
            if tried.result.success:
                candidates.append(RigidCandidate(f"adareg_turn_{k}", tried.result.fixed_to_moving.copy(),
                                                 {"n_inliers": tried.result.summary.get("n_inliers")}))
            matches = match_set(f"turn_{k}", tried.result, self.adareg.min_match_score)
            if matches is not None:
                sets.append(matches)
                # the turned scan is embedded in the fixed scan's orientation: its rotation back is the turn's inverse
                candidates.append(vote_candidate(f"vote_turn_{k}", matches, tried.rotation.T, self.vote_bandwidth_mm))
        record.update({"seconds": round(time.perf_counter() - t0, 2), "embedded_turns": embedded})
        return candidates, sets, record

    def _tilt_candidates(self, pair: ScanPair) -> tuple[list[RigidCandidate], dict]:
        """Step 3, tilts: the ``tilt_top_k`` best of the coarse tilt ranking, as candidates named ``tilt_<index>``."""
        ranked, record = self.tilt_search(pair, self.refiner)
        return [RigidCandidate(f"tilt_{t.index}", t.fixed_to_moving.copy(),
                               {"coarse_score": round(t.score, 4),
                                "tilt_deg": round(rotation_angle_deg(self.tilt_search.rotations[t.index]), 1)}, tilt=True)
                for t in ranked[: self.tilt_top_k]], record

    # ------------------------------------------------------------------------------------------------ run
    def rigid(self, fixed_image: MetaTensor, fixed_heads: dict, moving_image: MetaTensor, moving_heads: dict,
              embed: Callable | None = None, same_modality: bool = False, release_heads: bool = False) -> RigidRegistration:
        """Register (module docstring).

        Args:
            fixed_image, moving_image: preprocessed scans ``(1, D, H, W)`` (network input, with affines).
            fixed_heads, moving_heads: their embeddings ``{head: (C, d, h, w)}``.
            embed: ``embed(image) -> heads`` for the turned moving scan (None: header orientation only).
            same_modality: both scans of one modality (``min_support`` applies, else ``min_support_cross_modality``).
            release_heads: **empty both heads dicts** once AdaReg's fit has read them, so that a caller passing
                its only references lets their memory go during the refinement (on a full-resolution CT the fixed
                scan's heads are 0.55 GB): the moving scan's are not read again (turns are embedded afresh); the
                fixed scan's wait in a temporary file (:class:`~samv2_components.inference.spilled_heads.SpilledHeads`)
                until the orientation search needs them. The result is the same either way.
        """
        with contextlib.ExitStack() as cleanup:  # removes the spilled heads' file, however the method ends
            return self._rigid(fixed_image, fixed_heads, moving_image, moving_heads, embed, same_modality,
                               release_heads, cleanup)

    def _rigid(self, fixed_image, fixed_heads, moving_image, moving_heads, embed, same_modality, release_heads,
               cleanup: contextlib.ExitStack) -> RigidRegistration:
        t0 = time.perf_counter()
        summary: dict[str, Any] = {"pipeline": "samv2"}
        gap = fov_gap_mm(fixed_image, moving_image)
        summary["header_fov_gap_mm"] = round(gap, 1)
        adareg = self.adareg.rigid(fixed_image, fixed_heads, moving_image, moving_heads)
        spilled = None
        if release_heads:
            moving_heads.clear()
            if embed is not None and self.orientation_search != "off":
                spilled = cleanup.enter_context(SpilledHeads(fixed_heads))  # empties fixed_heads
            else:
                fixed_heads.clear()
        summary["adareg"] = {k: adareg.summary.get(k) for k in ("success", "reason", "n_points", "n_inliers", "inlier_fraction", "rms_residual_mm")}
        for k in ("body_volume_ml", "small_fov"):
            summary[k] = adareg.summary.get(k)
        small = adareg.small_fov

        def failed(reason: str) -> RigidRegistration:
            summary.update({"success": False, "reason": reason, "rigid_seconds": round(time.perf_counter() - t0, 2)})
            return RigidRegistration(False, reason, np.eye(4), small, adareg.points_small, adareg.points_large,
                                     adareg.scores, adareg.inliers, summary, adareg.small_body_corners)

        if gap > self.header_overlap_margin_mm:
            return failed(f"the scans do not overlap: their fields of view are {gap:.0f} mm apart in the headers "
                          f"(at most {self.header_overlap_margin_mm:g} mm allowed: samv2_pipeline#header_overlap_margin_mm)")
        if "n_points" not in adareg.summary:
            return failed(adareg.reason)  # no body in a scan: nothing to register
        fixed_mask, moving_mask = body_mask(fixed_image, self.adareg.body_threshold), body_mask(moving_image, self.adareg.body_threshold)
        images, masks = {"fixed": fixed_image, "moving": moving_image}, {"fixed": fixed_mask, "moving": moving_mask}
        small_corners = body_box_corners(images[small], masks[small])
        small_points = body_points(images[small], masks[small], AGREEMENT_STEP_MM)
        pair = ScanPair.from_metatensors(fixed_image, fixed_mask, moving_image, moving_mask, small=small)

        candidates, match_sets = self._header_candidates(adareg, fixed_image, fixed_mask, moving_image, moving_mask, pair)
        scored = self._score(pair, candidates, match_sets)
        selection = self._finish_and_select(pair, scored, small, small_points, match_sets, same_modality)
        weak = not selection.success or selection.winner.support < self.search_below_support
        if embed is not None and (self.orientation_search == "always" or (self.orientation_search == "auto" and weak)):
            heads = fixed_heads if spilled is None else spilled.load()
            found, sets, record = self._turn_candidates(pair, fixed_image, heads, moving_image, embed)
            del heads
            summary["orientation_search"] = record
            if self.tilt_top_k > 0:
                tilts, summary["tilt_search"] = self._tilt_candidates(pair)
                found += tilts
            match_sets += sets
            # the earlier candidates' support is re-measured with the new match sets too: the same footing
            scored = [self._rescore(c, match_sets) for c in scored] + self._score(pair, found, match_sets)
        if self.search_rotations > 0 and self.translation_top_k > 0:
            shifted, summary["translation_search"] = self._translation_candidates(pair, scored)
            scored += self._score(pair, shifted, match_sets, levels=self._shift_levels)
        selection = self._finish_and_select(pair, scored, small, small_points, match_sets, same_modality)
        if not selection.success and self.classical_rescue is not None and self.classical is None and scored:
            selection = self._rescue(pair, scored, small, small_points, match_sets, same_modality, summary) or selection
        summary["candidates"] = selection.record
        if not selection.success:
            return failed(selection.reason)
        win = selection.winner
        summary.update({"success": True, "reason": "", "winner": win.name, "mi": round(win.mi, 4),
                        "support": round(win.support, 3), "overlap_fraction": round(win.overlap_fraction, 3),
                        **transform_summary(win.fixed_to_moving), "rigid_seconds": round(time.perf_counter() - t0, 2)})
        return RigidRegistration(True, "", win.fixed_to_moving, small, adareg.points_small, adareg.points_large,
                                 adareg.scores, adareg.inliers, summary, small_corners)

    def _finish_and_select(self, pair: ScanPair, scored: list[ScoredCandidate], small: str, small_points: np.ndarray,
                           match_sets: list[MatchSet], same_modality: bool) -> Selection:
        """The finest level for the best distinct answers (:meth:`_finish`), then the selection (:meth:`_select`),
        the answers compared at the small body's points in the fixed scan."""
        points = self._compared_points(small, small_points, scored)
        self._finish(pair, scored, points, match_sets)
        return self._select(pair, scored, points, match_sets, same_modality)

    def _rescue(self, pair: ScanPair, scored: list[ScoredCandidate], small: str, small_points: np.ndarray,
                match_sets: list[MatchSet], same_modality: bool, summary: dict) -> Selection | None:
        """Before refusing: the classical intensity registration (SimpleITK rigid Mattes MI from the centres of mass
        on the whole scans, ``classical_rescue``'s settings) as one more candidate, refined and scored like the
        others, and the selection again (None when it could not run). Only after a refusal, so every answer the
        pipeline gives without it stays as it is; ~15-20 s on a refused case."""
        t0 = time.perf_counter()
        try:
            found = classical_candidate(pair.fixed, pair.moving, self.classical_rescue)
        except SAMv2InputError as exc:  # every sample left the moving scan: the refusal stands
            summary["classical_rescue"] = {"ran": False, "reason": str(exc)}
            return None
        scored += self._score(pair, [found], match_sets)
        selection = self._finish_and_select(pair, scored, small, small_points, match_sets, same_modality)
        summary["classical_rescue"] = {"ran": True, "success": selection.success,
                                       "seconds": round(time.perf_counter() - t0, 2)}
        return selection

    def _rescore(self, c: ScoredCandidate, match_sets: list[MatchSet]) -> ScoredCandidate:
        support, source = match_support(c.fixed_to_moving, match_sets, self.support_tolerance_mm)
        c.support, c.info = support, {**c.info, "support_from": source}
        return c

    @staticmethod
    def _compared_points(small: str, small_points: np.ndarray, scored: list[ScoredCandidate]) -> np.ndarray:
        """The small body's points in the fixed scan, where two answers are compared (for a small moving scan:
        mapped back through the candidate with the best MI, the one every other is compared with)."""
        if small == "fixed" or not scored:
            return small_points
        best = max(scored, key=lambda c: c.mi if math.isfinite(c.mi) else -math.inf)
        return apply_matrix(np.linalg.inv(best.fixed_to_moving), small_points)


def _measure_edges(pair: ScanPair, scored: list[ScoredCandidate], margin_mm: float) -> None:
    """Edge agreement (:func:`~samv2_components.registration.edge_agreement.footprint_edge_agreement`) of every
    candidate that had the finest level, on the footprint the MI is measured on, in place (``nan`` for the rest:
    the selection compares finished answers only); each pose measured once per pair."""
    measured = pair.cache.setdefault("edges", {})
    for c in scored:
        if c.error or not c.info.get("finest_level"):
            c.edges = math.nan
            continue
        key = np.round(c.fixed_to_moving, 6).tobytes()
        if key not in measured:
            measured[key] = footprint_edge_agreement(pair, c.fixed_to_moving, pair.footprint(margin_mm))
        c.edges = measured[key]


def _by_mi(scored: list[ScoredCandidate]) -> list[ScoredCandidate]:
    """The candidates whose refinement ran and scored, best MI first."""
    return sorted((c for c in scored if not c.error and math.isfinite(c.mi)), key=lambda c: -c.mi)


def _distinct(scored: list[ScoredCandidate], points: np.ndarray, agreement_mm: float) -> list[ScoredCandidate]:
    """The distinct answers among the scored candidates, best MI first: each one that does not agree
    (:func:`~samv2_components.registration.selection.transforms_agree` over ``points``) with a better one."""
    distinct: list[ScoredCandidate] = []
    for c in _by_mi(scored):
        if not any(transforms_agree(c.fixed_to_moving, d.fixed_to_moving, points, agreement_mm) for d in distinct):
            distinct.append(c)
    return distinct


def _moved_mm(pair: ScanPair, before: np.ndarray, after: np.ndarray) -> float:
    """How far (mm, the largest over the fixed grid's corners) ``after`` maps a point away from ``before``."""
    corners = _centre_points(pair)
    return round(float(np.max(np.linalg.norm(apply_matrix(after, corners) - apply_matrix(before, corners), axis=1))), 2)


def _centre_points(pair: ScanPair) -> np.ndarray:
    """The 8 corners of the fixed grid (LPS mm), to measure how far refinement moved a candidate."""
    image = pair.fixed
    size = np.asarray(image.GetSize()) - 1
    return np.array([image.TransformContinuousIndexToPhysicalPoint([float(a), float(b), float(c)])
                     for a in (0, size[0]) for b in (0, size[1]) for c in (0, size[2])])
