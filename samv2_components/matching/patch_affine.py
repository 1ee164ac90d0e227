"""Batched local affine intensity registration of small patches, one per matched point (beyond the paper).

The translation search of :mod:`samv2_components.matching.refinement` compares a rigidly shifted template patch
with the query. Between two scans of the same anatomy the local map is rather an affine (rotation, scale and the
first order of a deformation), and with only a translation a patch on a boundary slides along it. Here each
point gets its own 12-parameter map ``x -> t + A (x - p)`` (``p``: the template point, ``t``: its match, both world
LPS mm; ``A``: 3x3, LPS), optimised on a cube of template samples around ``p``, all points of a batch at once through
``grid_sample``, either by gradient ascent (Adam) of a patch similarity or by Gauss-Newton steps (Levenberg-Marquardt
damped) on the same similarity written as a sum of squares:

* ``"ncc"``: zero-normalised cross-correlation of the samples (same modality);
* ``"mind"``: ``1 - mean squared difference`` of MIND 6-neighbourhood descriptors (Heinrich et al. 2012) of the two
  sampled cubes (across modalities).

Both are sums of squares of differences of per-patch features: ``|t_hat - q_hat|^2 = 2 - 2 ZNCC`` for unit
zero-mean sample rows, ``1 - MIND similarity`` for the descriptors scaled by ``1 / sqrt(D)``. The Gauss-Newton step
takes the exact derivative of each sample with respect to its location (``grid_sample``'s own gradient, one backward
pass) and the features' derivatives by forward-mode differentiation along the 12 parameters; it needs tens of
iterations where Adam takes hundreds of steps, each of about the same cost.

A level is one patch size / sampling step / smoothing; levels run coarse to fine, each starting from the last.
ITK's registration framework registers one image pair at a time; hundreds of 30 mm patches are far cheaper as one
batched tensor problem, which is why this is written here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.networks.layers import GaussianFilter
from torch.func import jvp, vmap

from samv2_components.geometry import affine_and_space, as_points, grid_sample_points, voxel_to_grid_sample_matrix, world_to_voxel

__all__ = [
    "AffineLevel",
    "CONVERGENCE_WINDOW",
    "DEFAULT_AFFINE_LEVELS",
    "OPTIMIZERS",
    "PatchAffineResult",
    "cube_offsets",
    "lps_to_sampling_grid",
    "mind_descriptors",
    "patch_similarity",
    "register_patches",
    "sample_world_points",
    "smoothed_volume",
]


#: optimisers of a level: gradient ascent, or damped Gauss-Newton on the sum-of-squares form of the similarity
OPTIMIZERS = ("adam", "gauss_newton")


@dataclass(frozen=True)
class AffineLevel:
    """One level of :func:`register_patches`.

    Attributes:
        patch_mm: side of the template cube, mm.
        step_mm: spacing of its samples, mm.
        iterations: Adam steps or Gauss-Newton iterations (0: only score the start).
        smoothing_mm: Gaussian sigma applied to both scans before sampling, mm (0: none).
        learning_rate_mm: Adam step of the translation, mm (default ``step_mm / 4``).
        learning_rate_linear: Adam step of the entries of ``A`` (default ``step_mm / 200``: at 16 mm from the
            centre about a quarter of the translation step).
        tolerance_mm: a point stops early once its map moves its patch by less than this (the largest displacement
            of a patch corner, mm): over :data:`CONVERGENCE_WINDOW` Adam steps, or in one Gauss-Newton step; 0:
            every point runs all ``iterations``. Under Adam, points still moving follow exactly the steps they
            would take without it.
        optimizer: ``"adam"`` or ``"gauss_newton"`` (Levenberg-Marquardt damped; the learning rates are unused).
        linear_prior: Gauss-Newton only: weight of ``|A - A_start|^2`` (Frobenius, ``A_start``: the level's
            starting linear part) added to the dissimilarity, which keeps the local map near the local frame where
            the patch does not determine all 12 parameters (without it, maps on weakly textured patches collapse
            along one axis). Adam's small ``learning_rate_linear`` plays that part there.
    """

    patch_mm: float
    step_mm: float
    iterations: int = 50
    smoothing_mm: float = 0.0
    learning_rate_mm: float | None = None
    learning_rate_linear: float | None = None
    tolerance_mm: float = 0.0
    optimizer: str = "adam"
    linear_prior: float = 0.1

    @classmethod
    def from_config(cls, level: "AffineLevel | Mapping") -> "AffineLevel":
        level = level if isinstance(level, AffineLevel) else cls(**dict(level))
        if (level.patch_mm <= 0 or level.step_mm <= 0 or level.iterations < 0 or level.smoothing_mm < 0
                or level.tolerance_mm < 0 or level.linear_prior < 0):
            raise ValueError(f"affine level needs patch_mm, step_mm > 0 and iterations, smoothing_mm, tolerance_mm, linear_prior >= 0: {level}")
        if level.optimizer not in OPTIMIZERS:
            raise ValueError(f"affine level optimizer must be one of {', '.join(OPTIMIZERS)}, got {level.optimizer!r}")
        return level

    @property
    def half_size(self) -> int:
        return max(1, int(round(self.patch_mm / (2 * self.step_mm))))


@dataclass
class PatchAffineResult:
    """``N`` local maps ``x -> points + linear @ (x - template_point)``.

    Attributes:
        points_lps: ``(N, 3)`` the matched points (the maps' translation), world LPS mm.
        linear: ``(N, 3, 3)`` the maps' linear parts (template LPS -> query LPS).
        similarity_start, similarity_final: ``(N,)`` patch similarity before and after the last level.
    """

    points_lps: np.ndarray
    linear: np.ndarray
    similarity_start: np.ndarray
    similarity_final: np.ndarray


def lps_to_sampling_grid(image: MetaTensor) -> torch.Tensor:
    """``(4, 4)`` float64 matrix from world LPS mm to ``grid_sample`` coordinates of ``image`` ``(1, X, Y, Z)``.

    ``grid_sample`` (``align_corners=True``) reads a location as ``(x, y, z)`` in ``[-1, 1]`` along the **last,
    middle, first** array axes; the rows are ordered that way
    (:func:`~samv2_components.geometry.voxel_to_grid_sample_matrix` after world -> voxel).
    """
    affine, space = affine_and_space(image)
    basis = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    voxels = world_to_voxel(basis, affine, affine_space=space, world_space="LPS")
    to_voxel = np.eye(4)
    to_voxel[:3, :3], to_voxel[:3, 3] = (voxels[1:] - voxels[0]).T, voxels[0]
    return torch.as_tensor(voxel_to_grid_sample_matrix(image.shape[1:], align_corners=True) @ to_voxel)


def smoothed_volume(image: MetaTensor, sigma_mm: float = 0.0) -> torch.Tensor:
    """``(1, 1, X, Y, Z)`` float32 volume of ``image``, Gaussian-smoothed by ``sigma_mm`` (0: as it is; per-axis
    sigma in voxels)."""
    volume = torch.as_tensor(image.as_tensor() if isinstance(image, MetaTensor) else image, dtype=torch.float32)[None]
    if sigma_mm <= 0:
        return volume
    spacing = np.linalg.norm(affine_and_space(image)[0][:3, :3], axis=0)
    # oneDNN's conv3d with the filter's 1D kernels is slow on whole native scans on the CPU (10.8 s against 2.2 s
    # for a 717 x 654 x 80 CT, same values to 2e-7): the native convolution is used (set directly: the flags()
    # context manager also resets oneDNN's TF32 setting, which warns on every call)
    onednn = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        with torch.no_grad():
            return GaussianFilter(3, [float(sigma_mm / s) for s in spacing])(volume)
    finally:
        torch.backends.mkldnn.enabled = onednn


#: 6-neighbourhood offsets of the MIND descriptor (voxels of the sampling grid)
_MIND_OFFSETS = ((1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1))


def mind_descriptors(volume: torch.Tensor) -> torch.Tensor:
    """MIND descriptors ``(N, 6, ...)`` of ``(N, 1, ...)`` volumes (one voxel lost on every side)."""
    inner = volume[:, :, 1:-1, 1:-1, 1:-1]
    shape = inner.shape[2:]
    distances = []
    for dx, dy, dz in _MIND_OFFSETS:
        shifted = volume[:, :, 1 + dx : 1 + dx + shape[0], 1 + dy : 1 + dy + shape[1], 1 + dz : 1 + dz + shape[2]]
        # patch distance: squared difference averaged over a 3-voxel box
        distances.append(F.avg_pool3d(F.pad((inner - shifted) ** 2, (1, 1, 1, 1, 1, 1), mode="replicate"), 3, stride=1))
    d = torch.cat(distances, dim=1)
    variance = d.mean(dim=1, keepdim=True)
    variance = variance.clamp_min(1e-3 * variance.mean(dim=(1, 2, 3, 4), keepdim=True).clamp_min(1e-12))
    mind = torch.exp(-d / variance)
    return mind / mind.amax(dim=1, keepdim=True).clamp_min(1e-12)


def cube_offsets(half_size: int, step_mm: float, dtype=torch.float32) -> torch.Tensor:
    """``(S^3, 3)`` offsets (LPS mm) of a cube of ``S = 2 * half_size + 1`` samples per axis, in (L, P, S) index order."""
    axis = torch.arange(-half_size, half_size + 1, dtype=dtype) * step_mm
    return torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)


def sample_world_points(volume: torch.Tensor, to_grid: torch.Tensor, world: torch.Tensor) -> torch.Tensor:
    """Trilinear samples ``(N, M)`` of ``volume`` ``(1, 1, X, Y, Z)`` at world LPS points ``(N, M, 3)`` (mm; border
    value outside); ``to_grid``: :func:`lps_to_sampling_grid` of the volume's image. Differentiable in ``world``."""
    grid = (world @ to_grid[:3, :3].T.to(world.dtype) + to_grid[:3, 3].to(world.dtype)).to(volume.dtype)
    n, m = grid.shape[:2]
    return grid_sample_points(volume, grid.reshape(n * m, 3), "bilinear", "border", align_corners=True)[0].view(n, m)


def _features(measure: str, samples: torch.Tensor, side: int) -> torch.Tensor:
    """``(N, D)`` rows whose squared distance is the patches' dissimilarity, from sample rows ``(N, side^3)``:
    unit zero-mean rows for NCC (``|a - b|^2 = 2 - 2 ZNCC``), MIND descriptors over ``sqrt(D)`` for MIND
    (``|a - b|^2 = 1 - similarity``)."""
    if measure == "ncc":
        centred = samples - samples.mean(dim=1, keepdim=True)
        return centred / centred.norm(dim=1, keepdim=True).clamp_min(1e-6)
    mind = mind_descriptors(samples.view(-1, 1, side, side, side)).flatten(1)
    return mind / math.sqrt(mind.shape[1])


def _similarity(measure: str, template: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """``(N,)`` patch similarity of two rows of :func:`_features`: ZNCC (the dot product of the unit rows) or
    ``1 - mean squared MIND difference``."""
    return (template * query).sum(1) if measure == "ncc" else 1.0 - ((template - query) ** 2).sum(1)


#: Adam steps over which a point's movement is measured for :attr:`AffineLevel.tolerance_mm`
CONVERGENCE_WINDOW = 10

#: the samv2_matching bundle's local affine levels (the refiner's default): 32 mm patches on a 2 mm grid smoothed by
#: 1 mm, then 16 mm on 1 mm (patches chosen on the intra-subject benchmark, bundle docs), 30 and 20 Gauss-Newton
#: iterations (a point stops once a step moves its patch by less than 0.02 mm); before 2026-12-06: 200 and 100
#: Adam steps, about 4x slower for the same or worse accuracy (bundle docs)
DEFAULT_AFFINE_LEVELS = (AffineLevel(32.0, 2.0, 30, 1.0, tolerance_mm=0.02, optimizer="gauss_newton"),
                         AffineLevel(16.0, 1.0, 20, tolerance_mm=0.02, optimizer="gauss_newton"))


def register_patches(
    template: MetaTensor,
    template_points_lps,
    query: MetaTensor,
    start_points_lps,
    start_linear=None,
    levels=DEFAULT_AFFINE_LEVELS,
    similarity: str = "ncc",
    max_points_per_batch: int = 64,
) -> PatchAffineResult:
    """Optimise a local affine map per point, coarse to fine (module docstring).

    Args:
        template, query: the scans as read, ``(1, X, Y, Z)`` with affines (RAS unless ``meta["space"]`` says LPS).
        template_points_lps: ``(N, 3)`` template points, world LPS mm (the centres of the template cubes).
        start_points_lps: ``(N, 3)`` their starting matches in the query, world LPS mm.
        start_linear: optional ``(N, 3, 3)`` (or one ``(3, 3)``) starting linear parts; identity where omitted or not finite.
        levels: :class:`AffineLevel` s (or mappings of their fields), coarse to fine.
        similarity: ``"ncc"`` or ``"mind"``.
        max_points_per_batch: points optimised together (bounds memory; the result does not depend on it).
    """
    if similarity not in ("ncc", "mind"):
        raise ValueError(f"similarity must be 'ncc' or 'mind', got {similarity!r}")
    levels = [AffineLevel.from_config(level) for level in levels]
    if not levels:
        raise ValueError("register_patches needs at least one level")
    centres, points = as_points(template_points_lps), as_points(start_points_lps).copy()
    n = len(centres)
    if len(points) != n:
        raise ValueError(f"{n} template points but {len(points)} start points")
    linear = np.broadcast_to(np.eye(3), (n, 3, 3)).copy()
    if start_linear is not None:
        start_linear = np.broadcast_to(np.asarray(start_linear, np.float64), (n, 3, 3))
        finite = np.isfinite(start_linear).all(axis=(1, 2))
        linear[finite] = start_linear[finite]
    to_template, to_query = lps_to_sampling_grid(template), lps_to_sampling_grid(query)
    for level in levels:
        fixed_volume, moving_volume = smoothed_volume(template, level.smoothing_mm), smoothed_volume(query, level.smoothing_mm)
        offsets = cube_offsets(level.half_size, level.step_mm)
        side = 2 * level.half_size + 1
        lr_t = level.learning_rate_mm if level.learning_rate_mm is not None else level.step_mm / 4
        lr_a = level.learning_rate_linear if level.learning_rate_linear is not None else level.step_mm / 200
        start_score, final_score = np.full(n, np.nan), np.full(n, np.nan)
        for first in range(0, n, max_points_per_batch):
            sl = slice(first, min(n, first + max_points_per_batch))
            centre = torch.as_tensor(centres[sl], dtype=torch.float32)
            features = partial(_features, similarity, side=side)
            with torch.no_grad():  # the template's side is fixed: its features once per batch
                fixed = features(sample_world_points(fixed_volume, to_template, centre[:, None, :] + offsets[None]))
            shift = torch.as_tensor(points[sl], dtype=torch.float32)
            matrix = torch.as_tensor(linear[sl], dtype=torch.float32)
            sample = partial(sample_world_points, moving_volume, to_query)

            def score(rows=slice(None)) -> torch.Tensor:
                moved = shift[rows, None, :] + offsets[None] @ matrix[rows].transpose(1, 2)
                return _similarity(similarity, fixed[rows], features(sample(moved)))

            with torch.no_grad():
                start_score[sl] = score().numpy()
            if level.optimizer == "adam":
                _adam(score, shift, matrix, level, lr_t, lr_a)
            else:
                _gauss_newton(fixed, sample, offsets, shift, matrix, level, features)
            with torch.no_grad():
                final_score[sl] = score().numpy()
            points[sl], linear[sl] = shift.detach().double().numpy(), matrix.detach().double().numpy()
    return PatchAffineResult(points, linear, start_score, final_score)


def _adam(score, shift: torch.Tensor, matrix: torch.Tensor, level: AffineLevel, lr_t: float, lr_a: float) -> None:
    """Adam ascent of ``score(rows) -> (len(rows),)`` in the maps ``shift`` ``(N, 3)`` and ``matrix`` ``(N, 3, 3)``
    (updated in place), with :attr:`AffineLevel.tolerance_mm`'s early stop every :data:`CONVERGENCE_WINDOW` steps."""
    shift.requires_grad_(True)
    matrix.requires_grad_(True)
    optimiser = torch.optim.Adam([{"params": [shift], "lr": lr_t}, {"params": [matrix], "lr": lr_a}])
    active = torch.ones(len(shift), dtype=torch.bool)
    checkpoint = (shift.detach().clone(), matrix.detach().clone())
    for step in range(level.iterations):
        rows = active.nonzero()[:, 0]
        optimiser.zero_grad()
        (-score(rows).sum()).backward()  # points are independent: the sum's gradient is each point's own
        optimiser.step()
        with torch.no_grad():
            # stopped points keep their map (Adam's momentum would still move them)
            shift[~active], matrix[~active] = checkpoint[0][~active], checkpoint[1][~active]
            if level.tolerance_mm > 0 and (step + 1) % CONVERGENCE_WINDOW == 0:
                moved = _corner_displacement(shift, matrix, *checkpoint, level.half_size * level.step_mm)
                active &= moved >= level.tolerance_mm
                if not active.any():
                    break
                checkpoint = (shift.detach().clone(), matrix.detach().clone())
    shift.requires_grad_(False)
    matrix.requires_grad_(False)


#: Levenberg-Marquardt damping (a multiple of the diagonal of ``J^T J``) of a point's first Gauss-Newton step; divided
#: by :data:`DAMPING_DOWN` after a step that lowers the point's residual, multiplied by :data:`DAMPING_UP` after one
#: that does not (the step is then retaken, shorter, from the same map)
INITIAL_DAMPING, DAMPING_DOWN, DAMPING_UP = 1e-3, 3.0, 4.0
#: a point whose damping grew past this has no step left that lowers its residual: it stops
MAX_DAMPING = 1e8
#: the longest Gauss-Newton step, as the largest displacement of a patch corner in sampling steps of the level
MAX_STEP_SAMPLES = 1.0


def _gauss_newton(fixed_features: torch.Tensor, sample, offsets: torch.Tensor, shift: torch.Tensor, matrix: torch.Tensor,
                  level: AffineLevel, features) -> None:
    """Levenberg-Marquardt minimisation of ``|features(sample(maps)) - fixed_features|^2`` per point, in the maps
    ``shift`` ``(N, 3)`` and ``matrix`` ``(N, 3, 3)`` (updated in place).

    ``sample``: world LPS points ``(N, M, 3)`` -> samples ``(N, M)``, differentiable in the points; ``offsets``:
    ``(M, 3)`` template cube offsets (LPS mm); ``features``: samples ``(N, M)`` -> ``(N, D)``.
    The 12 parameters are ``shift`` and ``matrix`` row by row; each sample ``q_k`` at ``y_k = shift + matrix o_k``
    has ``dq_k/dshift = g_k`` and ``dq_k/dmatrix_ij = g_ki o_kj``, ``g_k`` the interpolated volume's gradient at
    ``y_k`` (every sample depends on its own location only, so one backward pass of their sum gives every ``g_k``).
    """
    if level.iterations == 0:
        return
    n = len(shift)
    params = torch.cat([shift, matrix.flatten(1)], dim=1).double()  # (N, 12)
    start_linear = params[:, 3:].clone()
    extent = level.half_size * level.step_mm
    offsets64 = offsets.double()

    def evaluate(p: torch.Tensor, target: torch.Tensor, linear_start: torch.Tensor):
        """Cost ``(n,)``, ``J^T J`` ``(n, 12, 12)`` and ``J^T r`` ``(n, 12)`` of ``n`` points at the maps ``p``
        ``(n, 12)``, against their fixed features ``target`` ``(n, D)`` and linear start ``(n, 9)``."""
        world = (p[:, None, :3] + offsets64[None] @ p[:, 3:].view(-1, 3, 3).transpose(1, 2)).float().requires_grad_(True)
        samples = sample(world)
        (slope,) = torch.autograd.grad(samples.sum(), world)  # (n, M, 3): each sample's derivative in its location
        samples = samples.detach()
        tangents = torch.cat([slope, (slope[..., :, None] * offsets[None, :, None, :]).flatten(2)], dim=2)  # (n, M, 12)
        with torch.no_grad():
            residual = features(samples) - target
            jacobian = vmap(lambda v: jvp(features, (samples,), (v,))[1])(tangents.permute(2, 0, 1))  # (12, n, D)
            jacobian, residual = jacobian.double(), residual.double()
            # the prior: linear_prior * |matrix - its start|^2, 9 more residuals
            departure = p[:, 3:] - linear_start
            normal = torch.einsum("and,bnd->nab", jacobian, jacobian)
            normal[:, 3:, 3:] += level.linear_prior * torch.eye(9, dtype=normal.dtype)
            descent = torch.einsum("and,nd->na", jacobian, residual)
            descent[:, 3:] += level.linear_prior * departure
            return (residual**2).sum(1) + level.linear_prior * (departure**2).sum(1), normal, descent

    cost, normal, gradient = evaluate(params, fixed_features, start_linear)
    damping = torch.full((n,), INITIAL_DAMPING, dtype=torch.float64)
    active = torch.ones(n, dtype=torch.bool)
    for _ in range(level.iterations):
        rows = active.nonzero()[:, 0]
        if len(rows) == 0:
            break
        diagonal = torch.diag_embed(normal[rows].diagonal(dim1=1, dim2=2).clamp_min(1e-12))
        step = torch.linalg.solve(normal[rows] + damping[rows, None, None] * diagonal, -gradient[rows])
        # a step moves the patch's corners by at most one sample spacing, so that a point follows its own basin of
        # the similarity (as Adam's short steps do) instead of jumping to another, lower one
        reach = _corner_displacement(step[:, :3], step[:, 3:].view(-1, 3, 3), 0.0, 0.0, extent)
        step *= (MAX_STEP_SAMPLES * level.step_mm / reach.clamp_min(1e-12)).clamp_max(1.0)[:, None]
        trial_cost, trial_normal, trial_gradient = evaluate(params[rows] + step, fixed_features[rows], start_linear[rows])
        better = trial_cost < cost[rows]
        kept = rows[better]
        params[kept] += step[better]
        cost[kept], normal[kept], gradient[kept] = trial_cost[better], trial_normal[better], trial_gradient[better]
        damping[kept] /= DAMPING_DOWN
        damping[rows[~better]] *= DAMPING_UP
        moved = reach.clamp_max(MAX_STEP_SAMPLES * level.step_mm)
        active[rows] = ~((moved < level.tolerance_mm) | (damping[rows] > MAX_DAMPING))
    shift.copy_(params[:, :3])
    matrix.copy_(params[:, 3:].view(-1, 3, 3))


def _corner_displacement(shift, matrix, shift_before, matrix_before, half_extent_mm: float) -> torch.Tensor:
    """``(N,)`` largest displacement (mm) of the 8 corners of a cube of half side ``half_extent_mm`` between two
    maps ``x -> shift + matrix (x - p)`` (``(N, 3)``, ``(N, 3, 3)``)."""
    signs = torch.tensor([[i, j, k] for i in (-1.0, 1.0) for j in (-1.0, 1.0) for k in (-1.0, 1.0)], dtype=shift.dtype) * half_extent_mm
    corners = (shift - shift_before)[:, None, :] + signs[None] @ (matrix - matrix_before).transpose(1, 2)
    return corners.norm(dim=2).amax(dim=1)


def patch_similarity(template, template_points_lps, query, points_lps, linear=None, level=AffineLevel(16.0, 1.0, 0), similarity="ncc"):
    """``(N,)`` patch similarity of the maps ``x -> points + linear @ (x - template_point)`` at one level (no
    optimisation; see :func:`register_patches` for the arguments)."""
    level = AffineLevel.from_config(level)
    probe = AffineLevel(level.patch_mm, level.step_mm, 0, level.smoothing_mm)
    return register_patches(template, template_points_lps, query, points_lps, linear, [probe], similarity).similarity_final
