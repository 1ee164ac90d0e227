"""Rigid starting points of the ``samv2`` registration pipeline: what SAM proposes before intensity refines.

Three kinds of candidate, all sharing one embedding of each scan (the orientation search embeds the moving scan
once per turn, the candidates it yields reuse those):

* ``header``: the scans' headers trusted for the orientation (identity rotation) and the body centres aligned
  (a pure translation): the start an intensity registration takes;
* ``adareg``: AdaReg's robust rigid fit of the embedding matches at the header orientation
  (:meth:`~samv2_components.registration.adareg.AdaReg.rigid`);
* ``orientation_<k>``: the best few successful fits of the orientation search over the 24 axis-aligned turns of
  the moving scan (:class:`~samv2_components.registration.orientation.OrientationSearch`, scored as there).

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

__all__ = ["MatchSet", "RigidCandidate", "body_centre", "header_candidate", "match_set", "match_support"]


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
        name: ``"header"``, ``"adareg"`` or ``"orientation_<k>"`` (``k``: the search's rotation index).
        fixed_to_moving: 4x4 LPS mm, fixed point -> moving point.
        info: what produced it (JSON-ready: inliers, search score, ...).
    """

    name: str
    fixed_to_moving: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)


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
