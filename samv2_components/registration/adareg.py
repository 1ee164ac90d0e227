"""AdaReg (SAMv2 paper, Sec. III-C): CT–MR registration from anatomical-embedding matches, robust to large
field-of-view differences.

1. **Body masks and roles.** Each scan's body is its preprocessed (network-input) intensity above
   ``body_threshold`` (-25 on the [-50, 205] scale, as the reference code), largest connected component. The scan
   with the smaller body volume is the *small-FOV* scan (or as configured).
2. **Matches.** Points on a regular ``grid_spacing_mm`` grid inside the small scan's body are matched into the
   large scan with the embeddings (:class:`~samv2_components.matching.SAMv2Matcher`; NN by default, like the
   reference's single forward pass).
3. **Rigid fit.** Arun/Kabsch SVD with the reflection fix, RANSAC on minimal samples and trimming on the residual,
   after dropping matches below ``min_match_score``
   (:func:`~samv2_components.registration.rigid.fit_rigid_robust`). The reference clamps each rotation-vector
   component to 0.2 rad instead; outlier rejection makes that unnecessary and would forbid real large rotations.
4. **Crop.** The large scan is cropped to the small scan's body bounding box mapped through the rigid transform and
   dilated by ``crop_margin_mm`` (what the deformable stage and the cross-modal training see).
5. **Deformable refinement** (optional): elastix B-spline with mutual information, started from the rigid
   transform (:func:`~samv2_components.registration.deformable.refine_deformable`).

Conventions: every transform maps **fixed** physical points to **moving** physical points (LPS mm; the ITK
resampling convention): ``moving_point = T @ fixed_point``. The result carries a confidence summary, and a
registration whose matches do not support a rigid transform is reported as failed with the reason, never returned
as a confident transform.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor

from samv2_components.geometry import (  # the body box geometry lives in geometry; re-exported here
    affine_and_space,
    body_box_corners,
    body_mask,
    crop_index_range,
    voxel_to_world,
)
from samv2_components.matching import SAMv2Matcher
from samv2_components.registration.rigid import fit_rigid_robust

__all__ = ["AdaReg", "RigidRegistration", "body_mask", "body_box_corners", "crop_index_range", "grid_points_in_mask"]


def transform_summary(fixed_to_moving: np.ndarray) -> dict[str, Any]:
    """``rotation_deg`` (angle about the rotation axis) and ``translation_mm`` (LPS) of a 4x4 rigid matrix, for
    the confidence summary."""
    rotation = np.asarray(fixed_to_moving, dtype=np.float64)[:3, :3]
    angle = float(np.degrees(np.arccos(np.clip((np.trace(rotation) - 1.0) / 2.0, -1.0, 1.0))))
    return {"rotation_deg": round(angle, 2), "translation_mm": [round(float(v), 2) for v in np.asarray(fixed_to_moving)[:3, 3]]}


def _voxel_volume_mm3(image: MetaTensor) -> float:
    affine, _ = affine_and_space(image)
    return abs(float(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3])))


def grid_points_in_mask(image: MetaTensor, mask: torch.Tensor, spacing_mm: float) -> np.ndarray:
    """World points ``(N, 3)`` (LPS mm) of a regular grid, ``spacing_mm`` apart, on the voxels of ``mask``.

    The grid is in the image's voxel index space (stride ``round(spacing_mm / voxel size)`` per axis), offset by
    half a stride so that it does not hug the volume border.
    """
    affine, space = affine_and_space(image)
    voxel_mm = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    stride = np.maximum(1, np.rint(spacing_mm / voxel_mm)).astype(int)
    axes = [np.arange(s // 2, n, s) for s, n in zip(stride, mask.shape)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    keep = mask.cpu().numpy()[grid[:, 0], grid[:, 1], grid[:, 2]]
    return voxel_to_world(grid[keep].astype(np.float64), affine, affine_space=space, world_space="LPS")


@dataclass
class RigidRegistration:
    """Result of :meth:`AdaReg.rigid`.

    Attributes:
        success: whether the matches support a rigid transform (see ``reason``).
        reason: why not (empty on success).
        fixed_to_moving: 4x4 LPS matrix, fixed point -> moving point (identity when not successful).
        small_fov: ``"fixed"`` or ``"moving"``: which scan the grid points came from.
        points_small, points_large: ``(N, 3)`` grid points in the small scan and their matches in the large one (LPS).
        scores: ``(N,)`` match scores; inliers: ``(N,)`` bool, the pairs the final fit used.
        summary: the confidence summary (JSON-ready).
        small_body_corners: ``(8, 3)`` LPS corners of the small scan's body box (what the large scan is cropped
            to, after mapping and the margin), in the small scan's space; empty when there is no body.
    """

    success: bool
    reason: str
    fixed_to_moving: np.ndarray
    small_fov: str
    points_small: np.ndarray
    points_large: np.ndarray
    scores: np.ndarray
    inliers: np.ndarray
    summary: dict[str, Any] = field(default_factory=dict)
    small_body_corners: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))

    def small_body_corners_in_large(self) -> np.ndarray:
        """:attr:`small_body_corners` mapped into the large scan with the rigid transform ``(8, 3)`` (LPS)."""
        m = self.fixed_to_moving if self.small_fov == "fixed" else np.linalg.inv(self.fixed_to_moving)
        return self.small_body_corners @ m[:3, :3].T + m[:3, 3]


class AdaReg:
    """Rigid CT–MR registration from embedding matches, plus the crop of the large-FOV scan (module docstring).

    Args:
        matcher: the point matcher (its search settings; ``match_method`` selects NN or fixed-point).
        small_fov: ``"auto"`` (smaller body volume), ``"fixed"`` or ``"moving"``.
        grid_spacing_mm: spacing of the points sampled in the small scan's body.
        body_threshold: body threshold on the preprocessed intensity ([-50, 205] scale).
        match_method: ``"nearest_neighbour"`` or ``"fixed_point"``.
        min_match_score: matches scoring lower are not used.
        inlier_threshold_mm, ransac_iterations, seed: the robust rigid fit.
        min_inliers: fewest inlier pairs for a successful registration.
        min_inlier_fraction: fewest inliers as a fraction of the score-filtered matches.
        max_rms_residual_mm: largest RMS residual of the inliers for a successful registration.
        crop_margin_mm: dilation of the small scan's body box in the large scan.
        min_body_voxels: fewer body voxels means "no body in this scan".
        ransac_consensus: how the robust rigid fit ranks its RANSAC hypotheses (``fit_rigid_robust``'s
            ``consensus``): ``"lo-msac"`` (default since crosssam_registration 0.13.0; nearly independent of
            ``seed``) or ``"count"`` (most inliers of the samples; the answer then depends on the seed).
    """

    def __init__(
        self,
        matcher: SAMv2Matcher,
        small_fov: str = "auto",
        grid_spacing_mm: float = 12.0,
        body_threshold: float = -25.0,
        match_method: str = "nearest_neighbour",
        min_match_score: float = 0.3,
        inlier_threshold_mm: float = 10.0,
        ransac_iterations: int = 5000,
        min_inliers: int = 12,
        min_inlier_fraction: float = 0.11,
        max_rms_residual_mm: float = 10.0,
        crop_margin_mm: float = 30.0,
        min_body_voxels: int = 1000,
        seed: int = 0,
        ransac_consensus: str = "lo-msac",
    ):
        if small_fov not in ("auto", "fixed", "moving"):
            raise ValueError(f"small_fov must be 'auto', 'fixed' or 'moving', got {small_fov!r}")
        self.matcher, self.small_fov = matcher, small_fov
        self.grid_spacing_mm, self.body_threshold = float(grid_spacing_mm), float(body_threshold)
        self.match_method, self.min_match_score = match_method, float(min_match_score)
        self.inlier_threshold_mm, self.ransac_iterations = float(inlier_threshold_mm), int(ransac_iterations)
        self.min_inliers, self.min_inlier_fraction = int(min_inliers), float(min_inlier_fraction)
        self.max_rms_residual_mm, self.crop_margin_mm = float(max_rms_residual_mm), float(crop_margin_mm)
        self.min_body_voxels, self.seed = int(min_body_voxels), int(seed)
        if ransac_consensus not in ("count", "lo-msac"):
            raise ValueError(f"ransac_consensus must be 'count' or 'lo-msac', got {ransac_consensus!r}")
        self.ransac_consensus = ransac_consensus

    def _failure(self, reason: str, small: str, summary: dict, n: int = 0) -> RigidRegistration:
        empty = np.zeros((n, 3))
        summary.update({"success": False, "reason": reason})
        return RigidRegistration(False, reason, np.eye(4), small, empty, empty, np.zeros(n), np.zeros(n, bool), summary)

    def rigid(
        self, fixed_image: MetaTensor, fixed_heads: dict, moving_image: MetaTensor, moving_heads: dict
    ) -> RigidRegistration:
        """Rigid fixed -> moving transform from embedding matches.

        Args:
            fixed_image, moving_image: preprocessed scans ``(1, D, H, W)`` (network input, with affines).
            fixed_heads, moving_heads: their embeddings ``{head: MetaTensor (C, d, h, w)}`` (or prepared scans).
        """
        t0 = time.perf_counter()
        masks = {"fixed": body_mask(fixed_image, self.body_threshold), "moving": body_mask(moving_image, self.body_threshold)}
        images = {"fixed": fixed_image, "moving": moving_image}
        volumes = {k: float(masks[k].sum()) * _voxel_volume_mm3(images[k]) for k in masks}
        summary: dict[str, Any] = {
            "body_volume_ml": {k: round(v / 1000.0, 1) for k, v in volumes.items()},
            "grid_spacing_mm": self.grid_spacing_mm,
            "match_method": self.match_method,
            "min_match_score": self.min_match_score,
        }
        small = self.small_fov if self.small_fov != "auto" else min(volumes, key=volumes.get)
        summary["small_fov"] = small
        for name, mask in masks.items():
            if int(mask.sum()) < self.min_body_voxels:
                return self._failure(f"no body found in the {name} scan (intensity above the body threshold)", small, summary)
        large = "moving" if small == "fixed" else "fixed"
        heads = {"fixed": fixed_heads, "moving": moving_heads}
        corners = body_box_corners(images[small], masks[small])
        points = grid_points_in_mask(images[small], masks[small], self.grid_spacing_mm)
        summary["n_points"] = int(len(points))
        if len(points) < self.min_inliers:
            return self._failure(f"only {len(points)} grid points in the {small} scan's body", small, summary)
        result = self.matcher.match(heads[small], heads[large], points, method=self.match_method)
        matched, scores = result.points_lps, np.asarray(result.scores, dtype=np.float64)
        summary["score_percentiles_10_50_90"] = [round(float(v), 3) for v in np.percentile(scores, [10, 50, 90])]
        fit = fit_rigid_robust(
            points,
            matched,
            scores=scores,
            min_score=self.min_match_score,
            inlier_threshold_mm=self.inlier_threshold_mm,
            ransac_iterations=self.ransac_iterations,
            min_inliers=self.min_inliers,
            seed=self.seed,
            consensus=self.ransac_consensus,
        )
        n_used = int(np.sum(scores >= self.min_match_score))
        fraction = fit.n_inliers / max(n_used, 1)
        summary.update(
            {
                "n_matches_above_score": n_used,
                "n_inliers": int(fit.n_inliers),
                "inlier_fraction": round(float(fraction), 3),
                "rms_residual_mm": round(float(fit.rms_residual_mm), 3),
                "median_residual_mm": round(float(fit.median_residual_mm), 3),
                "rigid_seconds": round(time.perf_counter() - t0, 2),
            }
        )
        reason = ""
        if not fit.success:
            reason = fit.reason
        elif fraction < self.min_inlier_fraction:
            reason = f"too few consistent matches: {fit.n_inliers} inliers of {n_used} ({100 * fraction:.0f} %)"
        elif fit.rms_residual_mm > self.max_rms_residual_mm:
            reason = f"inlier residual {fit.rms_residual_mm:.1f} mm above {self.max_rms_residual_mm:g} mm"
        if reason:
            failed = self._failure(reason, small, summary, len(points))
            failed.points_small, failed.points_large, failed.scores = points, matched, scores
            failed.small_body_corners = corners
            return failed
        small_to_large = fit.transform.matrix
        fixed_to_moving = small_to_large if small == "fixed" else np.linalg.inv(small_to_large)
        summary.update({"success": True, "reason": "", **transform_summary(fixed_to_moving)})
        return RigidRegistration(True, "", fixed_to_moving, small, points, matched, scores, np.asarray(fit.inliers), summary, corners)
