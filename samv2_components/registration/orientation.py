"""Orientation search for AdaReg: register scans whose headers disagree by a large rotation.

Anatomical embeddings are not rotation invariant (training sees rotations of about ±20°), and neither is an
intensity registration started from the headers. A phantom, a patient scanned feet-first or prone, or a
mislabelled orientation therefore defeats every method that trusts the header. The search tries the 24
axis-aligned rotations of the moving scan (the rotation group of the cube), runs AdaReg's robust rigid fit for
each on a sparser point grid (``search_grid_spacing_mm``, 24 mm: 8x fewer points than AdaReg's 12 mm, so matching
and RANSAC cost an eighth) and keeps the orientation whose matches are the most consistent: the largest fraction of
grid points that are inliers of the rigid fit. The winner is then registered again with the full AdaReg settings;
the residual rotation (up to ~45° from the nearest axis-aligned one) is what the rigid fit itself recovers.

How a candidate is built: the preprocessed moving scan (isotropic voxels, as the bundle's ``Spacingd`` makes it)
is rotated by a signed permutation of its array axes, an exact voxel shuffle without interpolation, and keeps its
affine ``A`` (LPS). A voxel map ``V`` (``i' = V i``) then moves the content at world point ``x`` to
``T x`` with ``T = A V A^-1``, a rotation in world space when the voxels are cubes. AdaReg on (fixed, rotated)
gives ``fixed -> rotated`` = ``M``; the answer is ``fixed -> moving = T^-1 M``.

Ambiguity: candidates that reach the same final transform (within ``agreement_mm`` at the fixed scan's corners)
are one answer. When the best answer's score is not clearly above the best *different* answer's
(``score_2 >= ambiguity_ratio * score_1``), the search reports a failure naming both candidates and their scores
instead of silently picking one.
"""

from __future__ import annotations

import copy
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor

from samv2_components.geometry import affine_and_space, convert_affine, voxel_to_world
from samv2_components.registration.adareg import AdaReg, RigidRegistration, transform_summary

__all__ = [
    "ORIENTATION_SEARCH_MODES",
    "axis_aligned_rotations",
    "rotate_volume",
    "turn_world_rotation",
    "OrientationCandidate",
    "OrientationSearch",
    "register_rigid_with_orientation_search",
]

ORIENTATION_SEARCH_MODES = ("auto", "always", "off")


def axis_aligned_rotations() -> list[np.ndarray]:
    """The 24 proper rotations of the cube as 3x3 integer matrices (signed permutations with determinant +1),
    the identity first."""
    rotations = []
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1, -1), repeat=3):
            m = np.zeros((3, 3), dtype=np.int64)
            for row, (col, sign) in enumerate(zip(perm, signs)):
                m[row, col] = sign
            if round(np.linalg.det(m)) == 1:
                rotations.append(m)
    rotations.sort(key=lambda m: -int(np.trace(m)))  # identity (trace 3) first
    return rotations


def rotate_volume(image: MetaTensor, voxel_rotation: np.ndarray) -> tuple[MetaTensor, np.ndarray]:
    """Rotate a volume ``(C, D, H, W)`` by a signed permutation of its array axes (exact, no interpolation).

    Args:
        image: a MetaTensor with an affine and cubic voxels (equal spacing on the three axes).
        voxel_rotation: 3x3 signed permutation matrix ``S`` with determinant +1 (one of
            :func:`axis_aligned_rotations`): output index ``i'_k = S[k] . i + (n'_k - 1 if S[k] is negative)``.

    Returns:
        ``(rotated, world_map)``: the rotated MetaTensor (same affine, permuted shape) and the 4x4 LPS matrix
        ``T`` that takes a world point of the input to the world point where the rotated volume shows the same
        voxel (a rotation when the voxels are cubes).
    """
    s = np.asarray(voxel_rotation)
    if s.shape != (3, 3) or not np.array_equal(np.abs(s).sum(0), np.ones(3)) or round(np.linalg.det(s)) != 1:
        raise ValueError(f"voxel_rotation must be a 3x3 signed permutation with determinant +1, got {s.tolist()}")
    affine, space = affine_and_space(image)
    affine_lps = convert_affine(affine, space, "LPS")
    spacing = np.linalg.norm(affine_lps[:3, :3], axis=0)
    if not np.allclose(spacing, spacing[0], rtol=1e-3):
        raise ValueError(f"an axis-aligned rotation needs cubic voxels, got spacing {np.round(spacing, 4).tolist()} mm")
    perm = [int(np.nonzero(row)[0][0]) for row in s]
    signs = [int(row[col]) for row, col in zip(s, perm)]
    data = image.as_tensor() if isinstance(image, MetaTensor) else torch.as_tensor(image)
    out = data.permute(0, *[p + 1 for p in perm])
    flips = [k + 1 for k, sign in enumerate(signs) if sign < 0]
    if flips:
        out = torch.flip(out, dims=flips)
    out = out.contiguous()
    voxel_map = np.eye(4)
    voxel_map[:3, :3] = s
    voxel_map[:3, 3] = [(out.shape[k + 1] - 1) if sign < 0 else 0 for k, sign in enumerate(signs)]
    world_map = affine_lps @ voxel_map @ np.linalg.inv(affine_lps)
    meta = {k: v for k, v in image.meta.items() if k not in ("affine", "original_affine", "spatial_shape")}
    rotated = MetaTensor(out, affine=torch.as_tensor(affine, dtype=torch.float64), meta=meta)
    return rotated, world_map


def turn_world_rotation(image: MetaTensor, voxel_rotation: np.ndarray) -> np.ndarray:
    """The 3x3 world rotation (LPS) that :func:`rotate_volume` applies to ``image`` for ``voxel_rotation``:
    ``A S A^-1`` with ``A`` the affine's linear part (a rotation when the voxels are cubes)."""
    affine, space = affine_and_space(image)
    linear = convert_affine(affine, space, "LPS")[:3, :3]
    return linear @ np.asarray(voxel_rotation, dtype=np.float64) @ np.linalg.inv(linear)


@dataclass
class OrientationCandidate:
    """One tried orientation: ``rotation`` (3x3, the world rotation applied to the moving scan), its rigid result
    (already composed back to the original moving scan) and ``score`` (inliers / grid points)."""

    index: int
    rotation: np.ndarray
    result: RigidRegistration
    score: float
    seconds: float

    def describe(self) -> dict[str, Any]:
        s = self.result.summary
        return {
            "candidate": self.index,
            "rotation": np.round(self.rotation, 3).tolist(),
            "score": round(self.score, 3),
            "n_inliers": s.get("n_inliers", 0),
            "inlier_fraction": s.get("inlier_fraction", 0.0),
            "rms_residual_mm": s.get("rms_residual_mm"),
            "success": bool(self.result.success),
            "reason": self.result.reason,
        }


class OrientationSearch:
    """Try the 24 axis-aligned orientations of the moving scan with AdaReg and keep the most consistent one
    (module docstring).

    Args:
        adareg: the AdaReg settings used for every candidate.
        embed: ``embed(image (1, D, H, W) MetaTensor) -> {head: MetaTensor (C, d, h, w)}``: the network and
            inferer of the bundle.
        agreement_mm: two candidates whose final transforms map the fixed scan's corners within this distance
            (largest displacement) are the same answer.
        ambiguity_ratio: the best answer must score above this multiple of the best different answer.
        search_grid_spacing_mm: point grid of the candidates' scoring fits (the winner is refitted with AdaReg's
            own ``grid_spacing_mm``); None: AdaReg's.
    """

    def __init__(
        self,
        adareg: AdaReg,
        embed: Callable,
        agreement_mm: float = 10.0,
        ambiguity_ratio: float = 0.8,
        search_grid_spacing_mm: float | None = 24.0,
    ):
        if not 0.0 < ambiguity_ratio <= 1.0:
            raise ValueError(f"ambiguity_ratio must be in (0, 1], got {ambiguity_ratio}")
        self.adareg, self.embed = adareg, embed
        self.agreement_mm, self.ambiguity_ratio = float(agreement_mm), float(ambiguity_ratio)
        self.scoring = copy.copy(adareg)
        if search_grid_spacing_mm is not None:
            self.scoring.grid_spacing_mm = float(search_grid_spacing_mm)
            # fewer points: the inlier count check scales with them (the fraction checks are unchanged)
            ratio = (adareg.grid_spacing_mm / self.scoring.grid_spacing_mm) ** 3
            self.scoring.min_inliers = max(6, int(round(adareg.min_inliers * ratio)))

    def try_turn(self, index, s, fixed_image, fixed_heads, moving_image, adareg: AdaReg | None = None,
                   embedded: tuple | None = None) -> tuple[OrientationCandidate, tuple]:
        """Register the moving scan turned by ``s`` (AdaReg's fit on the search grid, or ``adareg``'s own); returns
        the candidate, its result composed back to the moving scan (matched points in the moving scan's space
        too), and ``(rotated, heads, world_map)`` (``embedded``: that triple from an earlier call, to refit
        without embedding again)."""
        t0 = time.perf_counter()
        if embedded is None:
            rotated, world_map = rotate_volume(moving_image, s)
            embedded = (rotated, self.embed(rotated), world_map)
        rotated, heads, world_map = embedded
        result = (adareg or self.scoring).rigid(fixed_image, fixed_heads, rotated, heads)
        back = np.linalg.inv(world_map)
        result.fixed_to_moving = back @ result.fixed_to_moving if result.success else np.eye(4)
        if result.success:
            result.summary.update(transform_summary(result.fixed_to_moving))
        to_moving = lambda p: p @ back[:3, :3].T + back[:3, 3]  # noqa: E731  rotated scan -> moving scan (LPS)
        if result.small_fov == "moving":
            result.points_small = to_moving(result.points_small)
            result.small_body_corners = to_moving(result.small_body_corners)
        else:
            result.points_large = to_moving(result.points_large)
        n_points = max(int(result.summary.get("n_points", 0)), 1)
        score = float(result.summary.get("n_inliers", 0)) / n_points
        return OrientationCandidate(index, world_map[:3, :3].copy(), result, score, time.perf_counter() - t0), embedded

    def _same_answer(self, a: RigidRegistration, b: RigidRegistration, corners: np.ndarray) -> bool:
        pa = corners @ a.fixed_to_moving[:3, :3].T + a.fixed_to_moving[:3, 3]
        pb = corners @ b.fixed_to_moving[:3, :3].T + b.fixed_to_moving[:3, 3]
        return float(np.max(np.linalg.norm(pa - pb, axis=1))) <= self.agreement_mm

    def __call__(
        self, fixed_image: MetaTensor, fixed_heads: dict, moving_image: MetaTensor, moving_heads: dict | None = None
    ) -> tuple[RigidRegistration, list[OrientationCandidate]]:
        """Search; returns the chosen registration (or a failure naming the best two candidates) and every
        candidate, best first. The chosen result's ``summary["orientation_search"]`` records the search.
        ``moving_heads``: the moving scan's embeddings as it comes, if already computed (the identity candidate
        then needs no embedding)."""
        t0 = time.perf_counter()
        rotations = axis_aligned_rotations()
        candidates, kept = [], None  # kept: (score, embedded) of the best successful candidate, for its refit
        for i, s in enumerate(rotations):
            embedded = (moving_image, moving_heads, np.eye(4)) if i == 0 and moving_heads is not None else None
            candidate, embedded = self.try_turn(i, s, fixed_image, fixed_heads, moving_image, embedded=embedded)
            if candidate.result.success and (kept is None or candidate.score > kept[0]):
                kept = (candidate.score, embedded)
            candidates.append(candidate)
        candidates.sort(key=lambda c: -c.score)
        record: dict[str, Any] = {
            "n_candidates": len(candidates),
            "search_grid_spacing_mm": self.scoring.grid_spacing_mm,
            "ambiguity_ratio": self.ambiguity_ratio,
            "best_two": [c.describe() for c in candidates[:2]],
        }
        good = [c for c in candidates if c.result.success]
        if not good:
            best = candidates[0].result
            record["seconds"] = round(time.perf_counter() - t0, 2)
            best.summary["orientation_search"] = record
            best.summary["reason"] = best.reason = f"no orientation gives a consistent registration (best: {best.reason})"
            return best, candidates
        best = good[0]
        corners = _box_corners(fixed_image)
        rival = next((c for c in candidates if c is not best and not (c.result.success and self._same_answer(best.result, c.result, corners))), None)
        record["chosen"] = best.describe()
        if rival is not None:
            record["best_two"] = [best.describe(), rival.describe()]
            if rival.score >= self.ambiguity_ratio * best.score:
                failed = best.result
                failed.success, failed.fixed_to_moving = False, np.eye(4)
                failed.reason = (
                    f"orientation search has no clear winner: candidate {best.index} scores {best.score:.3f}, "
                    f"candidate {rival.index} (a different transform) {rival.score:.3f}"
                )
                record["seconds"] = round(time.perf_counter() - t0, 2)
                failed.summary.update({"success": False, "reason": failed.reason, "orientation_search": record})
                return failed, candidates
        final = best
        if self.scoring.grid_spacing_mm != self.adareg.grid_spacing_mm:  # refit the winner with the full settings
            final, _ = self.try_turn(best.index, rotations[best.index], fixed_image, fixed_heads, moving_image,
                                       self.adareg, embedded=kept[1])
        record["seconds"] = round(time.perf_counter() - t0, 2)
        final.result.summary["orientation_search"] = record
        return final.result, candidates


def _box_corners(image: MetaTensor) -> np.ndarray:
    """The 8 corner voxel centres ``(8, 3)`` of a volume ``(C, D, H, W)``, LPS mm."""
    affine, space = affine_and_space(image)
    n = np.asarray(image.shape[1:]) - 1
    corners = np.array([[a, b, c] for a in (0, n[0]) for b in (0, n[1]) for c in (0, n[2])], dtype=np.float64)
    return voxel_to_world(corners, affine, affine_space=space, world_space="LPS")


def register_rigid_with_orientation_search(
    adareg: AdaReg,
    embed: Callable,
    fixed_image: MetaTensor,
    fixed_heads: dict,
    moving_image: MetaTensor,
    moving_heads: dict,
    mode: str = "auto",
    confirm_below_fraction: float | None = None,
    **search_kwargs,
) -> RigidRegistration:
    """AdaReg rigid at the header orientation, then :class:`OrientationSearch` when ``mode`` says so.

    Args:
        mode: ``"auto"``: search only when the header orientation gives no consistent registration although both
            scans have a body (the common case costs nothing extra); ``"always"``: search in any case; ``"off"``:
            trust the headers.
        confirm_below_fraction: under ``"auto"``, also search when the header fit succeeds with an inlier fraction
            below this (a marginal fit may be a wrong orientation that just passed the check); the header
            orientation then competes with the others, and an ambiguous search is a refusal. ``None``: never.
        search_kwargs: arguments of :class:`OrientationSearch`.

    The result's ``summary["orientation_search"]`` (when a search ran) lists its time, the best two candidates
    with their scores and the header orientation's outcome.
    """
    if mode not in ORIENTATION_SEARCH_MODES:
        raise ValueError(f"orientation search mode must be 'auto', 'always' or 'off', got {mode!r}")
    rigid = adareg.rigid(fixed_image, fixed_heads, moving_image, moving_heads)
    matched = "n_matches_above_score" in rigid.summary  # both scans had a body and points were matched
    marginal = (
        confirm_below_fraction is not None and rigid.success
        and float(rigid.summary.get("inlier_fraction", 1.0)) < float(confirm_below_fraction)
    )
    if mode == "always" or (mode == "auto" and matched and (not rigid.success or marginal)):
        header = {k: rigid.summary.get(k) for k in ("success", "reason", "n_inliers", "inlier_fraction")}
        rigid, _ = OrientationSearch(adareg, embed, **search_kwargs)(fixed_image, fixed_heads, moving_image, moving_heads)
        rigid.summary["orientation_search"]["header_orientation"] = header
    return rigid
