"""Pick one refined rigid candidate, or refuse: the ``samv2`` pipeline's confidence check.

Every refined candidate carries two scores measured on the same footing (:mod:`intensity_refinement` and
:func:`~samv2_components.registration.candidates.match_support`):

* ``mi``: Mattes mutual information (nats) on one common mask with full sampling;
* ``support``: the fraction of SAM's embedding matches that the transform maps within a few mm of their partner;
* ``edges``: edge agreement (normalised gradient fields on the same mask,
  :mod:`~samv2_components.registration.edge_agreement`; NaN where not measured).

Rules (a refusal is better than a confident wrong transform):

1. A candidate is **eligible** when its refinement ran, its body overlap fraction is at least ``min_overlap``, its
   ``mi`` at least ``min_mi`` and its support at least ``min_support``. No eligible candidate: refusal (the reason
   names the overlap when no candidate overlaps enough, the information when no candidate shares any: a scan of
   noise against a body scores ~0.002 nats, every right answer of the phantom benchmark 0.24 or more; the relative
   margin of rule 5 means nothing between two scores that small).
2. **Tilted answers compete only when they clearly win.** The pipeline's tilt search adds starts 20-40 deg around
   the headers' orientation, for a scan tilted beyond the refinement's reach from every other start. A thin slab
   constrains its tilt weakly: a tilted answer 10-25 mm wrong can score within a few % of the right one (on the
   validation draw, seed 1, a slab case: a tilt-born answer 15.9 mm off scored 1.7 % above one 6.0 mm off, and
   the run refused). When the best eligible tilt-born candidate (``tilt``) disagrees with the best other one and
   does not beat it by the factor ``1 + tilt_margin`` in ``mi``, every tilt-born candidate is set aside (the
   record lists them): below that margin the tilts add rivals, not answers.
3. The **winner** is the eligible candidate with the highest ``mi`` (equal ``mi``: the higher ``support``).
4. The **rival** is the best other eligible candidate whose transform *differs* from the winner's: the small-FOV
   scan's body points lie more than ``agreement_mm`` apart between the two **on average** (the TRE one transform has
   against the other; candidates that agree are one answer). Until 0.7 the largest distance at the corners of the
   body's box: on a thin slab a 2-3 deg tilt moves those corners, outside the body, by more than 8 mm between two
   answers 2-5 mm from the truth, and the run refused between two right answers (on the validation draw, seed 1,
   4 of 16 slab and hard cases).
5. With a rival, the winner must **clearly win**: ``mi`` higher by at least the factor ``1 + mi_margin``, or
   ``support`` higher by at least ``support_margin``, or (new in 0.10; not for a winner turned as in rule 6) ``mi``
   higher at all and ``edges`` higher by at least the factor ``1 + edge_margin``; and the rival's support must not
   be higher by ``support_margin`` (the two scores disagreeing is no clear win). Otherwise: refusal naming both.
   Why the edges: on a thin slab the right answer and the slab slid one level along the body can score within 1-3 %
   in MI; on the phantom benchmark's validation draw (seed 1) two such refusals had edge leads of 11 and 13 %, and
   the one wrong answer there ahead of every right one in both scores was turned 178 deg (rule 6).
5b. **The edges can veto** (new in 0.12): when a different answer's edge agreement exceeds the winner's by the
   factor ``1 + edges_against_margin``, the two scores disagree and the run refuses, as for a support lead (rule 5).
   Why: on four validation draws of the phantom benchmark (seeds 1-4, 136 cases) no right answer had a different
   answer with more than 8 % more edge agreement than its own, while a 180 deg turned answer, 145 mm wrong, won
   on MI (25 % ahead) with 41 % less edge agreement than the right-way-up answer it beat (a thin slab's outline
   matches turned; its inner edges do not).
6. **Overturning the headers takes more.** A winner whose rotation is more than ``turn_deg`` from the headers'
   orientation (identity) must beat the best eligible answer *at* the headers' orientation by the factor
   ``1 + turn_margin`` in ``mi``, and its rival (rule 5) by the same factor instead of ``1 + mi_margin``;
   otherwise: refusal (the rival's part new in 0.9: on the phantom benchmark's test run a 41 mm slab was turned
   90 deg by a winner 3.3 % ahead of another turned answer, 147 mm wrong). A thin slab of a roughly left-right symmetric body looks
   the same turned by 180 deg about the anterior axis, to mutual information and to the embeddings alike (on the
   phantom benchmark such a turned answer, 200 mm wrong, scored 7-9 % above the right one and had more SAM
   support); the headers are the only evidence left, and a turned answer must clearly outweigh them.

Matrices are 4x4 rigid **fixed -> moving**, LPS mm; the compared points ``(N, 3)`` are in the fixed scan's space.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from samv2_components.geometry import apply_matrix, rotation_angle_deg

__all__ = ["ScoredCandidate", "Selection", "rotation_angle_deg", "select_candidate", "transforms_agree"]


@dataclass
class ScoredCandidate:
    """A refined candidate with its scores.

    Attributes:
        name: the candidate's name.
        fixed_to_moving: 4x4 LPS mm (after refinement).
        mi: Mattes MI on the common mask (nats; NaN: not scored).
        support: fraction of SAM matches the transform agrees with.
        overlap_fraction: shared body volume / smaller body volume.
        error: why its refinement failed ("" if it did not).
        info: anything else for the record.
        start: 4x4 the refinement started from (not in the record), if known.
        tilt: born of a tilt of the tilt search (rule 2).
        edges: edge agreement on the common mask (NaN: not measured; rule 5).
    """

    name: str
    fixed_to_moving: np.ndarray
    mi: float
    support: float
    overlap_fraction: float
    error: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    start: np.ndarray | None = None
    tilt: bool = False
    edges: float = float("nan")

    def describe(self) -> dict[str, Any]:
        """JSON-ready record."""
        return {
            "name": self.name,
            "mi": None if not math.isfinite(self.mi) else round(self.mi, 4),
            "support": round(self.support, 3),
            "overlap_fraction": round(self.overlap_fraction, 3),
            "error": self.error,
            "fixed_to_moving": np.round(self.fixed_to_moving, 5).tolist(),
            "tilt": self.tilt,
            "edges": None if not math.isfinite(self.edges) else round(self.edges, 4),
            **self.info,
        }


@dataclass
class Selection:
    """Outcome of :func:`select_candidate`: ``winner`` (None on refusal), ``rival`` (the best different answer,
    if any), ``success``, ``reason`` (empty on success) and the JSON-ready ``record``."""

    success: bool
    reason: str
    winner: ScoredCandidate | None
    rival: ScoredCandidate | None
    record: dict[str, Any]


def _scores(c: ScoredCandidate) -> str:
    """A candidate's scores for a refusal's reason."""
    edges = f", edges {c.edges:.3f}" if math.isfinite(c.edges) else ""
    return f"MI {c.mi:.3f}, support {100 * c.support:.0f} %{edges}"


def transforms_agree(a: np.ndarray, b: np.ndarray, points: np.ndarray, agreement_mm: float) -> bool:
    """Whether two fixed -> moving matrices map the points ``(N, 3)`` (fixed space, LPS mm) within ``agreement_mm``
    of each other on average."""
    return float(np.mean(np.linalg.norm(apply_matrix(a, points) - apply_matrix(b, points), axis=1))) <= agreement_mm


def select_candidate(
    candidates: list[ScoredCandidate],
    points: np.ndarray,
    agreement_mm: float = 8.0,
    mi_margin: float = 0.03,
    support_margin: float = 0.1,
    min_support: float = 0.05,
    min_overlap: float = 0.3,
    turn_deg: float = 60.0,
    turn_margin: float = 0.1,
    min_mi: float = 0.05,
    tilt_margin: float = 0.05,
    edge_margin: float = 0.1,
    edges_against_margin: float = 0.3,
) -> Selection:
    """Choose the best refined candidate or refuse (module docstring for the rules).

    Args:
        candidates: the refined, scored candidates.
        points: ``(N, 3)`` fixed-space points (LPS mm) at which two transforms are compared (the small-FOV scan's
            body, in the fixed scan).
        agreement_mm: transforms this close on average over ``points`` are the same answer.
        mi_margin: relative MI lead that is a clear win.
        support_margin: support lead (fraction of matches) that is a clear win, or a clear loss.
        min_support: least support of an eligible candidate.
        min_overlap: least body overlap fraction of an eligible candidate.
        min_mi: least MI (nats) of an eligible candidate.
        tilt_margin: rule 2 (tilt-born candidates are set aside unless the best of them beats the best other one
            by the factor ``1 + tilt_margin``).
        turn_deg, turn_margin: rule 6 (a winner turned more than ``turn_deg`` from the headers must beat the best
            answer at the headers' orientation by the factor ``1 + turn_margin`` in MI).
        edge_margin: relative edge-agreement lead that, with any MI lead, is a clear win (rule 5; ``inf``: never).
        edges_against_margin: rule 5b: a different answer whose edge agreement exceeds the winner's by this factor
            makes the run refuse (``inf``: never).
    """
    points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    # highest MI first, equal MI broken by the higher support
    ranked = sorted(candidates, key=lambda c: (-c.mi if math.isfinite(c.mi) else math.inf, -c.support))
    record: dict[str, Any] = {
        "rules": {"agreement_mm": agreement_mm, "mi_margin": mi_margin, "support_margin": support_margin,
                  "min_support": min_support, "min_overlap": min_overlap, "min_mi": min_mi, "turn_deg": turn_deg,
                  "turn_margin": turn_margin, "tilt_margin": tilt_margin, "edge_margin": edge_margin,
                  "edges_against_margin": edges_against_margin},
        "candidates": [c.describe() for c in ranked],
    }

    def refuse(reason: str, winner=None, rival=None) -> Selection:
        record.update({"winner": None, "reason": reason})
        return Selection(False, reason, None, rival, record)

    scored = [c for c in ranked if not c.error and math.isfinite(c.mi)]
    overlapping = [c for c in scored if c.overlap_fraction >= min_overlap]
    if not overlapping:
        best = max((c.overlap_fraction for c in candidates), default=0.0)
        return refuse(f"the scans do not overlap: no candidate shares more than {100 * best:.0f} % of the smaller "
                      f"body (at least {100 * min_overlap:.0f} % needed)")
    informative = [c for c in overlapping if c.mi >= min_mi]
    if not informative:
        best = max(overlapping, key=lambda c: c.mi)
        return refuse(f"the scans share no information where they overlap: the best candidate, {best.name}, reaches a "
                      f"mutual information of {best.mi:.3f} nats (at least {min_mi:g} needed; noise or an empty scan?)")
    eligible = [c for c in informative if c.support >= min_support]
    if not eligible:
        best = max(informative, key=lambda c: c.support)
        return refuse(f"no candidate is supported by the embedding matches: best {best.name} agrees with "
                      f"{100 * best.support:.0f} % of them (at least {100 * min_support:.0f} % needed)")
    tilted, others = [c for c in eligible if c.tilt], [c for c in eligible if not c.tilt]
    if tilted and others and not transforms_agree(tilted[0].fixed_to_moving, others[0].fixed_to_moving, points, agreement_mm) \
            and not tilted[0].mi >= others[0].mi * (1.0 + tilt_margin):
        record["tilts_set_aside"] = [c.name for c in tilted]
        eligible = others
    winner = eligible[0]
    agrees = [transforms_agree(winner.fixed_to_moving, c.fixed_to_moving, points, agreement_mm) for c in eligible]
    record["agreeing"] = [c.name for c, agree in zip(eligible, agrees) if agree]
    rival = next((c for c, agree in zip(eligible[1:], agrees[1:]) if not agree), None)
    if math.isfinite(winner.edges):  # rule 5b
        edgier = max((c for c, agree in zip(eligible, agrees) if not agree and math.isfinite(c.edges)),
                     key=lambda c: c.edges, default=None)
        if edgier is not None and edgier.edges >= winner.edges * (1.0 + edges_against_margin):
            record["rival"] = edgier.name
            return refuse(
                f"no clear winner: {winner.name} ({_scores(winner)}) leads in MI, {edgier.name} ({_scores(edgier)}) "
                f"by far in edge agreement, and they disagree by more than {agreement_mm:g} mm", rival=edgier,
            )
    turned_deg = rotation_angle_deg(winner.fixed_to_moving)  # from the headers' orientation (rule 6)
    if rival is not None:
        record["rival"] = rival.name
        margin = turn_margin if turned_deg > turn_deg else mi_margin
        mi_clear = winner.mi >= rival.mi * (1.0 + margin) if rival.mi > 0 else winner.mi > rival.mi
        support_clear = winner.support >= rival.support + support_margin
        edges_clear = (turned_deg <= turn_deg and winner.mi > rival.mi and math.isfinite(winner.edges)
                       and math.isfinite(rival.edges) and winner.edges >= rival.edges * (1.0 + edge_margin))
        support_against = rival.support >= winner.support + support_margin
        if support_against or not (mi_clear or support_clear or edges_clear):
            return refuse(
                f"no clear winner: {winner.name} ({_scores(winner)}) and {rival.name} ({_scores(rival)}) disagree by "
                f"more than {agreement_mm:g} mm", rival=rival,
            )
    if turned_deg > turn_deg:
        upright = next((c for c, agree in zip(eligible, agrees) if not agree and rotation_angle_deg(c.fixed_to_moving) <= turn_deg), None)
        if upright is not None and not winner.mi >= upright.mi * (1.0 + turn_margin):
            record["rival"] = upright.name
            return refuse(
                f"no clear winner: {winner.name}, turned {turned_deg:.0f} deg from the "
                f"headers' orientation (MI {winner.mi:.3f}), does not beat {upright.name} at the headers' orientation "
                f"(MI {upright.mi:.3f}) by {100 * turn_margin:.0f} %", rival=upright,
            )
    record.update({"winner": winner.name, "reason": ""})
    return Selection(True, "", winner, rival, record)
