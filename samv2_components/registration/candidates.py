"""Rigid starting points of the ``samv2`` registration pipeline: what SAM proposes before intensity refines.

Kinds of candidate, all sharing one embedding of each scan (the moving scan is embedded once more for each turn
the pipeline looks at):

* ``header``: the scans' headers trusted for the orientation (identity rotation) and the body centres aligned
  (a pure translation): the start an intensity registration takes;
* ``adareg``: AdaReg's robust rigid fit of the embedding matches at the header orientation
  (:meth:`~samv2_components.registration.adareg.AdaReg.rigid`);
* ``vote``: the translation most embedding matches agree on, the rotation given (:func:`translation_vote`). One
  correct match in ten is enough: a translation has three unknowns and every match proposes it alone, so the
  correct ones pile up at one spot while wrong ones scatter; AdaReg's rigid fit needs 3 matches at once to be
  right and fails first when the embeddings of two modalities agree poorly;
* ``classical`` (optional, off in the bundle): the classical intensity registration alone, as a user would run it
  without SAM (:func:`classical_candidate`: SimpleITK rigid Mattes MI from the centres of mass on the whole scans;
  the benchmark's SimpleITK baseline), one more candidate judged like the others (on the phantom's validation
  draw it changed no answer and cost ~15 s per case);
* ``turn_<k>``, ``adareg_turn_<k>``, ``vote_turn_<k>``: the same for the moving scan turned by the ``k``-th of the
  24 axis-aligned rotations that the coarse intensity ranking
  (:class:`~samv2_components.registration.turn_search.IntensityTurnSearch`) puts first: its coarse pose, AdaReg's
  fit and the translation vote of the turned scan's matches.

Every candidate's embedding matches are kept as a :class:`MatchSet`, so a refined transform can later be checked
against what SAM saw (:func:`match_support`), whichever candidate it came from.

Conventions: world points are **LPS mm** ``(N, 3)``; every matrix is a 4x4 rigid **fixed -> moving** map
(``moving_point = M[:3, :3] @ fixed_point + M[:3, 3]``), as everywhere in the package.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor

from samv2_components.geometry import affine_and_space, apply_matrix, voxel_to_world
from samv2_components.registration.adareg import RigidRegistration
from samv2_components.registration.intensity_baselines import register_intensity, sitk_transform_to_matrix

__all__ = ["MatchSet", "RigidCandidate", "body_centre", "classical_candidate", "header_candidate", "match_set", "match_support", "translation_vote", "vote_candidate"]


@dataclass
class MatchSet:
    """The embedding matches of one pair of embeddings.

    Attributes:
        name: where they come from (the candidate's name).
        fixed_points, moving_points: ``(N, 3)`` corresponding points, LPS mm, fixed scan and moving scan.
        scores: ``(N,)`` match scores (mean cosine).
    """

    name: str
    fixed_points: np.ndarray
    moving_points: np.ndarray
    scores: np.ndarray


@dataclass
class RigidCandidate:
    """A rigid starting point.

    Attributes:
        name: ``"header"``, ``"adareg"``, ``"vote"``, ``"classical"``, ``"turn_<k>"``, ``"adareg_turn_<k>"``,
            ``"vote_turn_<k>"`` (``k``: the turn's index in the 24 axis-aligned rotations), ``"tilt_<k>"`` (``k``: the
            tilt's index in the tilt lattice) or ``"shift_<source>_<peak>"`` (the translation search around
            ``source``'s rotation).
        fixed_to_moving: 4x4 LPS mm, fixed point -> moving point.
        info: what produced it (JSON-ready: inliers, search score, ...).
        tilt: born of a tilt (a tilt of the tilt search, or a translation search around one's refined rotation):
            such answers compete only when they clearly win
            (:func:`~samv2_components.registration.selection.select_candidate`, rule 2).
    """

    name: str
    fixed_to_moving: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)
    tilt: bool = False


def body_centre(image: MetaTensor, mask: torch.Tensor) -> np.ndarray:
    """Centroid ``(3,)`` (LPS mm) of the body ``mask`` ``(D, H, W)`` of ``image`` ``(1, D, H, W)``; the centre of
    the voxel grid when the mask is empty."""
    affine, space = affine_and_space(image)
    idx = torch.nonzero(mask).double().mean(0).numpy() if bool(mask.any()) else (np.asarray(mask.shape) - 1) / 2.0
    return voxel_to_world(np.asarray(idx, dtype=np.float64)[None], affine, affine_space=space, world_space="LPS")[0]


def header_candidate(fixed_image: MetaTensor, fixed_mask: torch.Tensor, moving_image: MetaTensor,
                     moving_mask: torch.Tensor) -> RigidCandidate:
    """The header start: identity rotation, the fixed body centre moved onto the moving body centre (LPS mm)."""
    shift = body_centre(moving_image, moving_mask) - body_centre(fixed_image, fixed_mask)
    matrix = np.eye(4)
    matrix[:3, 3] = shift
    return RigidCandidate("header", matrix, {"translation_mm": np.round(shift, 2).tolist()})


def classical_candidate(fixed, moving, settings: dict[str, Any]) -> RigidCandidate:
    """The classical intensity registration as a candidate: :func:`~samv2_components.registration.register_intensity`
    rigid (Mattes MI, its defaults: centres of mass start, pyramid 4/2/1, 20 % sampling, 200 iterations), the bundle's
    fixed scan as ITK's fixed image, no mask, ``settings`` overriding its keyword arguments.

    Args:
        fixed, moving: the scans as SimpleITK images (LPS), without the network's padding
            (:class:`~samv2_components.registration.intensity_refinement.ScanPair`'s ``fixed`` and ``moving``).
        settings: keyword arguments of ``register_intensity`` (``transform`` stays ``"rigid"``).

    Raises:
        SAMv2InputError: when the registration fails (every sample left the moving scan).
    """
    result = register_intensity(fixed, moving, **{**settings, "transform": "rigid"})
    return RigidCandidate("classical", sitk_transform_to_matrix(result.transform),
                          {"metric": round(result.final_metric, 4), "seconds": round(result.wall_time_s, 2)})


def match_set(name: str, result: RigidRegistration, min_score: float) -> MatchSet | None:
    """The matches of an AdaReg result (small scan's grid points -> large scan) as fixed/moving pairs, those
    scoring at least ``min_score``; None when it matched nothing."""
    if len(result.points_small) == 0:
        return None
    keep = np.asarray(result.scores, dtype=np.float64) >= float(min_score)
    small, large = np.asarray(result.points_small)[keep], np.asarray(result.points_large)[keep]
    fixed, moving = (small, large) if result.small_fov == "fixed" else (large, small)
    return MatchSet(name, fixed, moving, np.asarray(result.scores)[keep])


def match_support(fixed_to_moving: np.ndarray, match_sets: list[MatchSet], tolerance_mm: float) -> tuple[float, str]:
    """How well SAM's matches support a transform: the largest, over the match sets, fraction of matches that
    the transform maps within ``tolerance_mm`` of their partner (``|M fixed - moving|``, LPS mm).

    The best set rather than all sets pooled: a scan turned the wrong way gives matches that support nothing, and
    they must not dilute the set that was embedded the right way round. Returns ``(fraction, set name)``;
    ``(0.0, "")`` without matches.
    """
    best, name = 0.0, ""
    for s in match_sets:
        if len(s.fixed_points) == 0:
            continue
        residual = np.linalg.norm(apply_matrix(fixed_to_moving, s.fixed_points) - s.moving_points, axis=1)
        fraction = float(np.mean(residual <= float(tolerance_mm)))
        if fraction > best:
            best, name = fraction, s.name
    return best, name


def translation_vote(matches: MatchSet, rotation: np.ndarray, bandwidth_mm: float = 10.0,
                     chunk: int = 512) -> tuple[np.ndarray, int]:
    """The translation most matches agree on, the rotation given.

    Each match ``(f, m)`` votes ``t = m - R f``; the vote with the most others within ``bandwidth_mm`` wins and
    the mean of those is the answer (one mean-shift step from the densest vote).

    Args:
        matches: fixed/moving point pairs ``(N, 3)`` (LPS mm).
        rotation: 3x3 rotation of the fixed -> moving map.
        bandwidth_mm: votes this close agree.
        chunk: rows of the pairwise distance matrix computed at once (memory bound).

    Returns:
        ``(translation (3,), number of agreeing votes)``; ``(zeros, 0)`` without matches.
    """
    votes = np.asarray(matches.moving_points, dtype=np.float64) - np.asarray(matches.fixed_points, dtype=np.float64) @ np.asarray(rotation, dtype=np.float64).T
    if len(votes) == 0:
        return np.zeros(3), 0
    counts = np.concatenate([(np.linalg.norm(votes[i:i + chunk, None] - votes[None], axis=2) <= bandwidth_mm).sum(1)
                             for i in range(0, len(votes), chunk)])
    best = int(np.argmax(counts))
    near = np.linalg.norm(votes - votes[best], axis=1) <= bandwidth_mm
    return votes[near].mean(0), int(counts[best])


def vote_candidate(name: str, matches: MatchSet, rotation: np.ndarray, bandwidth_mm: float) -> RigidCandidate:
    """A candidate with ``rotation`` (3x3, fixed -> moving) and the translation of :func:`translation_vote`."""
    translation, count = translation_vote(matches, rotation, bandwidth_mm)
    matrix = np.eye(4)
    matrix[:3, :3], matrix[:3, 3] = rotation, translation
    return RigidCandidate(name, matrix, {"votes": count, "of": int(len(matches.fixed_points))})
