"""Sub-voxel refinement of matched points by local intensity registration at native resolution (beyond the paper).

The embedding matches live on the 4 mm fine grid, so their accuracy stops near the grid even when the two scans
are of the same subject. :class:`LocalIntensityRefiner` refines each match by intensity registration of a small
patch around the template point: an exhaustive translation search (steps 1-3), optionally followed by a local
affine registration per point (step 4, ``affine_levels``):

1. Sample the query scan on a cube of side ``patch_mm`` enlarged by ``trust_radius_mm`` around the embedding
   match, and the template scan on the corresponding cube around the template point: mapped through the local
   frame (the inverse of the local linear template -> query map, estimated from embedding matches of a wider grid
   of points, :meth:`LocalIntensityRefiner.local_frames`), so that both patches are compared in the query's frame
   with rotation and scale corrected. Both grids are axis-aligned in **world
   LPS** with step ``step_mm`` (default 1 mm; ``None``: the finest native voxel spacing of the two scans, within
   0.5-1 mm), so a grid shift is a physical shift; sampling is trilinear on the scans as read from disk (native resolution, not
   the 2 mm network input).
2. Score every shift of the patch within the enlarged cube, all at once (``conv3d``), with a local similarity:
   ``"ncc"`` (zero-normalised cross-correlation, same modality) or ``"mind"`` (MIND self-similarity descriptors on
   the 6-neighbourhood, Heinrich et al. 2012, compared by mean squared difference; across modalities). ``"auto"``
   picks NCC for a same-modality pair and MIND otherwise.
3. Take the best shift and refine it below the step by a parabola per axis.
4. Optionally (``affine_levels``), register a local affine map per point from there, coarse to fine
   (:mod:`samv2_components.matching.patch_affine`): a translation alone lets a patch on a boundary slide along it
   and cannot follow the local rotation, scale and deformation that the estimated frame gets only roughly.

A refinement is **accepted** only when the result lies within the trust radius (Euclidean) of the embedding match
(and, for the search alone, is an interior optimum of the search cube), improves the similarity at the embedding
match by at least ``min_improvement``, keeps a plausible local map (affine stage: no axis collapsed or stretched
beyond 1.5x, see :meth:`LocalIntensityRefiner.plausible_linear`), and keeps the point inside the query scan;
otherwise the embedding match is kept and the point is flagged with the reason. Both positions are returned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor

from samv2_components.geometry import affine_and_space, as_points, points_outside_scan
from samv2_components.matching.patch_affine import (
    DEFAULT_AFFINE_LEVELS,
    AffineLevel,
    cube_offsets,
    lps_to_sampling_grid,
    mind_descriptors,
    patch_similarity,
    register_patches,
    sample_world_points,
    smoothed_volume,
)

__all__ = ["LocalIntensityRefiner", "RefinementResult", "sample_lps_cubes", "SIMILARITIES", "DEFAULT_AFFINE_LEVELS"]

SIMILARITIES = ("auto", "ncc", "mind")


@dataclass
class RefinementResult:
    """Refinement of ``N`` matches.

    Attributes:
        points_lps: ``(N, 3)`` final points, world LPS mm: the refined point where accepted, else the embedding match.
        embedding_points_lps: ``(N, 3)`` the embedding matches it started from.
        accepted: ``(N,)`` bool.
        shift_mm: ``(N,)`` distance from the embedding match to the best local optimum found (accepted or not).
        similarity_before, similarity_after: ``(N,)`` local similarity at the embedding match and at the optimum.
        status: ``N`` strings: ``"refined"`` or why the embedding match was kept.
        similarity: the measure used (``"ncc"`` or ``"mind"``).
    """

    points_lps: np.ndarray
    embedding_points_lps: np.ndarray
    accepted: np.ndarray
    shift_mm: np.ndarray
    similarity_before: np.ndarray
    similarity_after: np.ndarray
    status: list
    similarity: str

    def columns(self) -> dict[str, list]:
        """Per-point output columns for a points file (the embedding match's coordinates are added by the caller,
        in the file's coordinate system)."""
        return {
            "refined": [bool(a) for a in self.accepted],
            "refine_status": list(self.status),
            "refine_shift_mm": [round(float(s), 3) for s in self.shift_mm],
        }


def _native_spacing(image: MetaTensor) -> np.ndarray:
    return np.linalg.norm(affine_and_space(image)[0][:3, :3], axis=0)


def sample_lps_cubes(image: MetaTensor, centres_lps, half_size: int, step_mm: float, linear=None) -> torch.Tensor:
    """Trilinear samples of ``image`` on cubes axis-aligned in world LPS (or mapped by a linear map per cube).

    Args:
        image: one scan ``(1, X, Y, Z)`` with its affine (MONAI ``MetaTensor``, RAS affine unless
            ``meta["space"]`` says LPS).
        centres_lps: ``(N, 3)`` cube centres, world LPS mm.
        half_size: the cube has ``2 * half_size + 1`` samples per axis.
        step_mm: sample spacing, mm.
        linear: optional ``(N, 3, 3)``: cube ``n`` samples ``centre_n + linear_n @ offset`` instead of
            ``centre_n + offset`` (a local rotation/scale/shear, LPS).

    Returns:
        ``(N, 1, S, S, S)`` float32, axes (L, P, S) world: element ``[n, 0, i, j, k]`` is the image at
        ``centre_n + step * (i - h, j - h, k - h)``. Outside the scan the nearest border value is used.
    """
    centres = as_points(centres_lps)
    maps = np.broadcast_to(np.eye(3), (len(centres), 3, 3)) if linear is None else np.asarray(linear, np.float64)
    offsets = cube_offsets(half_size, step_mm, dtype=torch.float64).numpy()
    world = centres[:, None, :] + np.einsum("mk,njk->nmj", offsets, maps)  # centre_n + linear_n @ offset_m
    samples = sample_world_points(smoothed_volume(image), lps_to_sampling_grid(image), torch.as_tensor(world))
    side = 2 * half_size + 1
    return samples.view(len(centres), 1, side, side, side)


def _window_sums(x: torch.Tensor, size: int) -> torch.Tensor:
    """Sum of ``x`` ``(1, C, ...)`` over every ``size``-cube window (valid positions)."""
    return F.avg_pool3d(x, size, stride=1) * size**3


def _ncc_maps(patches: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    """ZNCC of each patch ``(N, 1, S, S, S)`` at every shift within its region ``(N, 1, S + 2R, ...)``: ``(N, 2R+1, ...)``."""
    n, _, s = patches.shape[:3]
    t = patches - patches.mean(dim=(2, 3, 4), keepdim=True)
    t = t / t.flatten(1).norm(dim=1).clamp_min(1e-6).view(n, 1, 1, 1, 1)
    q = regions.reshape(1, n, *regions.shape[2:])
    numerator = F.conv3d(q, t, groups=n)[0]
    sums = _window_sums(q, s)[0]
    squares = _window_sums(q * q, s)[0]
    variance = (squares - sums * sums / s**3).clamp_min(0.0)
    return numerator / variance.sqrt().clamp_min(1e-6)


def _mind_maps(patches: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    """``1 - mean squared MIND difference`` of each patch at every shift within its region (higher is better)."""
    mt, mq = mind_descriptors(patches), mind_descriptors(regions)
    n, c, s = mt.shape[:3]
    q = mq.reshape(1, n * c, *mq.shape[2:])
    cross = F.conv3d(q, mt.reshape(n * c, 1, s, s, s), groups=n * c)[0].view(n, c, *[q.shape[-1] - s + 1] * 3).sum(1)
    q_squares = _window_sums(q * q, s)[0].view(n, c, *cross.shape[1:]).sum(1)
    t_squares = (mt * mt).flatten(1).sum(1).view(n, 1, 1, 1)
    return 1.0 - (t_squares - 2 * cross + q_squares) / (c * s**3)


def _parabola_offset(left: torch.Tensor, centre: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Sub-step position of a maximum from three samples (in steps, within [-0.5, 0.5])."""
    curvature = left - 2 * centre + right
    offset = torch.where(curvature < 0, 0.5 * (left - right) / curvature.clamp_max(-1e-12), torch.zeros_like(centre))
    return offset.clamp(-0.5, 0.5)


class LocalIntensityRefiner:
    """Refine embedding matches by local intensity registration (module docstring): a translation search in the
    local frame, then, with ``affine_levels``, a local affine registration per point.

    The defaults are the ``samv2_matching`` bundle's ``refiner`` settings, chosen on the intra-subject benchmark
    (bundle docs): a 24 mm patch searched on a 2 mm grid within 16 mm, then the two affine levels of
    :data:`DEFAULT_AFFINE_LEVELS`; the similarity must rise by 0.005.

    Args:
        patch_mm: side of the template patch, mm.
        trust_radius_mm: the refined point may move at most this far from the embedding match.
        step_mm: sampling step, mm; ``None``: the finest native voxel spacing of the two scans, kept within
            [``min_step_mm``, ``max_step_mm``] (a step finer than a thick-slice scan's spacing still helps: the
            parabola fit of the optimum is only as good as the samples around it).
        min_step_mm, max_step_mm: bounds of the automatic step.
        similarity: ``"auto"``, ``"ncc"`` or ``"mind"``.
        min_improvement: the similarity must rise by at least this much over the embedding match's.
        max_points_per_batch: points scored together (bounds memory).
        frame_spacing_mm, frame_steps, frame_inlier_mm: the local frame of :meth:`local_frames`: a grid of
            ``(2 * frame_steps + 1)^3`` template points ``frame_spacing_mm`` apart around each point, matched by
            nearest neighbour, and an affine fitted to them (trimming residuals above ``frame_inlier_mm``).
        affine_levels: local affine registration after the search (:func:`~samv2_components.matching.
            patch_affine.register_patches`): a list of :class:`~samv2_components.matching.patch_affine.AffineLevel`
            or mappings of its fields (``patch_mm``, ``step_mm``, ``iterations``, ``smoothing_mm``, ...), coarse
            to fine; empty or None: the translation search only. Each point's map starts from the search's optimum (the embedding match where the search found
            none) and the local frame; the similarity test then compares the last level's patch at the final map
            with the same patch at the embedding match and the local frame.
    """

    def __init__(
        self,
        patch_mm: float = 24.0,
        trust_radius_mm: float = 16.0,
        step_mm: float | None = 2.0,
        min_step_mm: float = 0.5,
        max_step_mm: float = 1.0,
        similarity: str = "auto",
        min_improvement: float = 0.005,
        max_points_per_batch: int = 64,
        frame_spacing_mm: float = 10.0,
        frame_steps: int = 2,
        frame_inlier_mm: float = 4.0,
        affine_levels=DEFAULT_AFFINE_LEVELS,
    ):
        if similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {', '.join(SIMILARITIES)}, got {similarity!r}")
        if patch_mm <= 0 or trust_radius_mm <= 0:
            raise ValueError("patch_mm and trust_radius_mm must be positive")
        self.patch_mm, self.trust_radius_mm = float(patch_mm), float(trust_radius_mm)
        self.step_mm = None if step_mm is None else float(step_mm)
        self.min_step_mm, self.max_step_mm = float(min_step_mm), float(max_step_mm)
        self.similarity, self.min_improvement = similarity, float(min_improvement)
        self.max_points_per_batch = int(max_points_per_batch)
        self.frame_spacing_mm, self.frame_steps, self.frame_inlier_mm = float(frame_spacing_mm), int(frame_steps), float(frame_inlier_mm)
        self.affine_levels = [AffineLevel.from_config(level) for level in (affine_levels or [])]

    def local_frames(self, matcher, template_scan, query_scan, template_points_lps, alignment=None) -> np.ndarray:
        """``(N, 3, 3)`` linear part of the local template -> query map around each point, from embeddings.

        A local rotation/scale between the scans makes a translation-only patch comparison biased; this estimates
        it from nearest-neighbour embedding matches of a grid of template points around each point (40 mm across
        by default: wide enough for a well-conditioned fit, while the fixed-point affine's 12 mm neighbourhood is
        not) with a robust affine fit. NaN where too few grid points match consistently.

        Args:
            matcher: a :class:`~samv2_components.matching.matcher.SAMv2Matcher`.
            template_scan, query_scan: the prepared :class:`~samv2_components.matching.embedded_scan.EmbeddedScan`.
            template_points_lps: ``(N, 3)``, LPS mm.
            alignment: the :class:`~samv2_components.matching.align_then_match.Alignment` of an aligned match
                (``MatchResult.alignment``): the embeddings are not rotation invariant, so under a large turn the
                frames are estimated against the aligned query (``alignment.scan``) and composed with the
                alignment's linear part; where no frame fits, the alignment's linear part itself (on the matching
                benchmark's +-30 deg set, frames from the turned pair left CPM@10 of the refined answers at 93.3 %,
                aligned frames reach 96.7 %).
        """
        if alignment is not None:
            linear = np.asarray(alignment.template_to_query, dtype=np.float64)[:3, :3]
            frames = self.local_frames(matcher, template_scan, alignment.scan, template_points_lps)
            frames[~np.isfinite(frames).all(axis=(1, 2))] = np.eye(3)  # no fit: the alignment's linear part alone
            return linear @ frames
        from samv2_components.matching.affine_fit import fit_affine_robust

        points = as_points(template_points_lps)
        steps = np.arange(-self.frame_steps, self.frame_steps + 1) * self.frame_spacing_mm
        grid = np.stack(np.meshgrid(steps, steps, steps, indexing="ij"), axis=-1).reshape(-1, 3)
        sources = (points[:, None, :] + grid[None]).reshape(-1, 3)
        targets = matcher.match(template_scan, query_scan, sources, method="nearest_neighbour").points_lps
        targets = targets.reshape(len(points), len(grid), 3)
        frames = np.full((len(points), 3, 3), np.nan)
        for i, point in enumerate(points):
            fit = fit_affine_robust(point + grid, targets[i], self.frame_inlier_mm, min_points=max(8, len(grid) // 4))
            if fit.inliers.sum() >= max(8, len(grid) // 4):
                frames[i] = fit.transform.matrix[:3, :3]
        return frames

    @staticmethod
    def plausible_linear(linear: np.ndarray, max_stretch: float = 1.5) -> np.ndarray:
        """``(N,)`` bool: finite maps whose singular values all lie in [1 / max_stretch, max_stretch] and that keep
        orientation (a local anatomy map between two scans is close to a rotation with mild scaling)."""
        linear = np.asarray(linear, np.float64).reshape(-1, 3, 3)
        finite = np.isfinite(linear).all(axis=(1, 2))
        safe = np.where(finite[:, None, None], linear, np.eye(3))
        singular = np.linalg.svd(safe, compute_uv=False)
        return finite & (np.linalg.det(safe) > 0) & (singular.min(1) >= 1 / max_stretch) & (singular.max(1) <= max_stretch)

    def step_for(self, template: MetaTensor, query: MetaTensor) -> float:
        """The sampling step (mm) used for this pair of scans."""
        if self.step_mm is not None:
            return self.step_mm
        finest = min(_native_spacing(template).min(), _native_spacing(query).min())
        return float(min(self.max_step_mm, max(self.min_step_mm, finest)))

    def refine(
        self,
        template: MetaTensor,
        template_points_lps,
        query: MetaTensor,
        matched_points_lps,
        same_modality: bool = True,
        inside_query=None,
        local_linear=None,
    ) -> RefinementResult:
        """Refine ``matched_points_lps`` (``(N, 3)``, LPS mm) of ``template_points_lps`` (``(N, 3)``, LPS mm).

        Args:
            template, query: the scans as read (``(1, X, Y, Z)`` with affines), not the network input.
            same_modality: chooses the similarity under ``"auto"``.
            inside_query: callable ``(M, 3) LPS -> (M,) bool``, where a point counts as inside the query scan
                (default: :func:`~samv2_components.geometry.points_outside_scan`, within the scan as read).
            local_linear: optional ``(N, 3, 3)`` linear part of the local template -> query map around each point
                (e.g. the fixed-point affine). The template patch is then sampled through its inverse, so that it
                is compared with the query in the query's frame (rotation and scale corrected); maps that are not
                plausible local anatomy maps (see :meth:`plausible_linear`) are replaced by the identity.
        """
        template_points, matched = as_points(template_points_lps), as_points(matched_points_lps)
        if len(template_points) != len(matched):
            raise ValueError(f"{len(template_points)} template points but {len(matched)} matches")
        measure = self.similarity if self.similarity != "auto" else ("ncc" if same_modality else "mind")
        step = self.step_for(template, query)
        half = max(1, int(round(self.patch_mm / (2 * step))))
        reach = max(1, int(math.ceil(self.trust_radius_mm / step)))
        margin = 1 if measure == "mind" else 0  # MIND loses one voxel on every side
        n = len(matched)
        best_shift = np.zeros((n, 3))
        before, after = np.full(n, np.nan), np.full(n, np.nan)
        interior = np.zeros(n, dtype=bool)
        score_maps = _ncc_maps if measure == "ncc" else _mind_maps
        frames = np.broadcast_to(np.eye(3), (n, 3, 3)).copy()  # template -> query linear part per point
        if local_linear is not None:
            local_linear = np.asarray(local_linear, np.float64)
            ok = self.plausible_linear(local_linear)
            frames[ok] = local_linear[ok]
        inverse = np.linalg.inv(frames)
        for start in range(0, n, self.max_points_per_batch):
            sl = slice(start, min(n, start + self.max_points_per_batch))
            patches = sample_lps_cubes(template, template_points[sl], half + margin, step, linear=inverse[sl])
            regions = sample_lps_cubes(query, matched[sl], half + reach + margin, step)
            with torch.no_grad():
                maps = score_maps(patches, regions)  # (b, 2R+1, 2R+1, 2R+1), index reach = no shift
            flat = maps.flatten(1)
            peak = flat.argmax(dim=1)
            idx = torch.stack(torch.unravel_index(peak, maps.shape[1:]), dim=1)  # (b, 3)
            before[sl] = maps[:, reach, reach, reach].numpy()
            after[sl] = flat.gather(1, peak[:, None])[:, 0].numpy()
            is_interior = ((idx > 0) & (idx < 2 * reach)).all(dim=1)
            shift = (idx - reach).double()
            rows = torch.arange(len(idx))
            for axis in range(3):
                lo, hi = idx.clone(), idx.clone()
                lo[:, axis] = (lo[:, axis] - 1).clamp_min(0)
                hi[:, axis] = (hi[:, axis] + 1).clamp_max(2 * reach)
                left = maps[rows, lo[:, 0], lo[:, 1], lo[:, 2]]
                right = maps[rows, hi[:, 0], hi[:, 1], hi[:, 2]]
                centre = maps[rows, idx[:, 0], idx[:, 1], idx[:, 2]]
                shift[:, axis] += torch.where(is_interior, _parabola_offset(left, centre, right), torch.zeros_like(centre)).double()
            best_shift[sl] = shift.numpy() * step
            interior[sl] = is_interior.numpy()
        refined = matched + best_shift
        distance = np.linalg.norm(best_shift, axis=1)
        implausible = np.zeros(n, dtype=bool)
        if self.affine_levels:
            searched = interior & (distance <= self.trust_radius_mm)
            start = np.where(searched[:, None], refined, matched)
            local = register_patches(template, template_points, query, start, frames, self.affine_levels, measure, self.max_points_per_batch)
            last = self.affine_levels[-1]
            before = patch_similarity(template, template_points, query, matched, frames, last, measure)
            after = local.similarity_final
            refined, interior = local.points_lps, np.ones(n, dtype=bool)
            distance = np.linalg.norm(refined - matched, axis=1)
            implausible = ~self.plausible_linear(local.linear)
        inside = ~points_outside_scan(query, refined) if inside_query is None else np.asarray(inside_query(refined), dtype=bool)
        status = []
        for i in range(n):
            if not interior[i]:
                status.append("kept: no optimum inside the trust radius")
            elif distance[i] > self.trust_radius_mm:
                status.append("kept: optimum beyond the trust radius")
            elif implausible[i]:
                status.append("kept: implausible local deformation")
            elif not after[i] >= before[i] + self.min_improvement:
                status.append("kept: no similarity gain")
            elif not inside[i]:
                status.append("kept: refined point outside the query scan")
            else:
                status.append("refined")
        accepted = np.array([s == "refined" for s in status], dtype=bool)
        points = np.where(accepted[:, None], refined, matched)
        return RefinementResult(points, matched.copy(), accepted, distance, before, after, status, measure)
