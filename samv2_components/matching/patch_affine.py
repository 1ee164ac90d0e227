"""Batched local affine intensity registration of small patches, one per matched point (beyond the paper).

The translation search of :mod:`samv2_components.matching.refinement` compares a rigidly shifted template patch
with the query. Between two scans of the same anatomy the local map is rather an affine (rotation, scale and the
first order of a deformation), and with only a translation a patch on a boundary slides along it. Here each
point gets its own 12-parameter map ``x -> t + A (x - p)`` (``p``: the template point, ``t``: its match, both world
LPS mm; ``A``: 3x3, LPS), optimised on a cube of template samples around ``p`` by gradient ascent (Adam) of a
patch similarity, all points of a batch at once through ``grid_sample``:

* ``"ncc"``: zero-normalised cross-correlation of the samples (same modality);
* ``"mind"``: ``1 - mean squared difference`` of MIND 6-neighbourhood descriptors (Heinrich et al. 2012) of the two
  sampled cubes (across modalities).

A level is one patch size / sampling step / smoothing; levels run coarse to fine, each starting from the last.
ITK's registration framework registers one image pair at a time; hundreds of 30 mm patches are far cheaper as one
batched tensor problem, which is why this is written here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.networks.layers import GaussianFilter

from samv2_components.geometry import affine_and_space, as_points, voxel_to_grid_sample_matrix, world_to_voxel

__all__ = [
    "AffineLevel",
    "CONVERGENCE_WINDOW",
    "DEFAULT_AFFINE_LEVELS",
    "PatchAffineResult",
    "cube_offsets",
    "lps_to_sampling_grid",
    "mind_descriptors",
    "patch_similarity",
    "register_patches",
    "sample_world_points",
    "smoothed_volume",
]


@dataclass(frozen=True)
class AffineLevel:
    """One level of :func:`register_patches`.

    Attributes:
        patch_mm: side of the template cube, mm.
        step_mm: spacing of its samples, mm.
        iterations: Adam steps (0: only score the start).
        smoothing_mm: Gaussian sigma applied to both scans before sampling, mm (0: none).
        learning_rate_mm: Adam step of the translation, mm (default ``step_mm / 4``).
        learning_rate_linear: Adam step of the entries of ``A`` (default ``step_mm / 200``: at 16 mm from the
            centre about a quarter of the translation step).
        tolerance_mm: a point stops early once its map moves its patch by less than this over
            :data:`CONVERGENCE_WINDOW` steps (the largest displacement of a patch corner, mm); 0: every point runs
            all ``iterations``. Points still moving follow exactly the steps they would take without it.
    """

    patch_mm: float
    step_mm: float
    iterations: int = 50
    smoothing_mm: float = 0.0
    learning_rate_mm: float | None = None
    learning_rate_linear: float | None = None
    tolerance_mm: float = 0.0

    @classmethod
    def from_config(cls, level: "AffineLevel | Mapping") -> "AffineLevel":
        level = level if isinstance(level, AffineLevel) else cls(**dict(level))
        if (level.patch_mm <= 0 or level.step_mm <= 0 or level.iterations < 0 or level.smoothing_mm < 0
                or level.tolerance_mm < 0):
            raise ValueError(f"affine level needs patch_mm, step_mm > 0 and iterations, smoothing_mm, tolerance_mm >= 0: {level}")
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
    with torch.no_grad():
        return GaussianFilter(3, [float(sigma_mm / s) for s in spacing])(volume)


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
    # on the CPU, grid_sample spreads a 3D volume's work over its batch entries only: the rows are dealt out to one
    # entry per thread of the (expanded, not copied) volume, so that every core samples; each sample is the same
    groups = max(1, min(torch.get_num_threads(), n)) if volume.device.type == "cpu" and volume.shape[0] == 1 else 1
    rows = -(-n // groups)
    if rows * groups > n:  # pad with copies of the last row, dropped below
        grid = torch.cat([grid, grid[-1:].expand(rows * groups - n, -1, -1)])
    samples = F.grid_sample(volume.expand(groups, -1, -1, -1, -1), grid.view(groups, rows, m, 1, 3),
                            mode="bilinear", padding_mode="border", align_corners=True)
    return samples[:, 0, :, :, 0].reshape(-1, m)[:n]


def _ncc(template: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """ZNCC ``(N,)`` of sample rows ``(N, M)``."""
    t = template - template.mean(dim=1, keepdim=True)
    q = query - query.mean(dim=1, keepdim=True)
    return (t * q).sum(1) / (t.norm(dim=1) * q.norm(dim=1)).clamp_min(1e-6)


def _mind_similarity(template: torch.Tensor, query: torch.Tensor, side: int) -> torch.Tensor:
    """``1 - mean squared MIND difference`` ``(N,)`` of sample rows ``(N, side^3)`` (cubes)."""
    mt = mind_descriptors(template.view(-1, 1, side, side, side))
    mq = mind_descriptors(query.view(-1, 1, side, side, side))
    return 1.0 - ((mt - mq) ** 2).flatten(1).mean(1)


def _similarity(measure: str, template: torch.Tensor, query: torch.Tensor, side: int) -> torch.Tensor:
    return _ncc(template, query) if measure == "ncc" else _mind_similarity(template, query, side)


#: Adam steps over which a point's movement is measured for :attr:`AffineLevel.tolerance_mm`
CONVERGENCE_WINDOW = 10

#: the samv2_matching bundle's local affine levels (the refiner's default): 32 mm patches on a 2 mm grid smoothed by
#: 1 mm for 200 Adam steps, then 16 mm on 1 mm for 100 (chosen on the intra-subject benchmark, bundle docs); a point
#: stops once its patch moves less than 0.02 mm in 10 steps (a fifth fewer steps; answers within 0.05 mm)
DEFAULT_AFFINE_LEVELS = (AffineLevel(32.0, 2.0, 200, 1.0, tolerance_mm=0.02), AffineLevel(16.0, 1.0, 100, tolerance_mm=0.02))


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
            with torch.no_grad():
                fixed = sample_world_points(fixed_volume, to_template, centre[:, None, :] + offsets[None])
            shift = torch.as_tensor(points[sl], dtype=torch.float32).requires_grad_(True)
            matrix = torch.as_tensor(linear[sl], dtype=torch.float32).requires_grad_(True)

            def score(rows=slice(None)) -> torch.Tensor:
                moved = shift[rows, None, :] + offsets[None] @ matrix[rows].transpose(1, 2)
                return _similarity(similarity, fixed[rows], sample_world_points(moving_volume, to_query, moved), side)

            optimiser = torch.optim.Adam([{"params": [shift], "lr": lr_t}, {"params": [matrix], "lr": lr_a}])
            with torch.no_grad():
                start_score[sl] = score().numpy()
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
            with torch.no_grad():
                final_score[sl] = score().numpy()
            points[sl], linear[sl] = shift.detach().double().numpy(), matrix.detach().double().numpy()
    return PatchAffineResult(points, linear, start_score, final_score)


def _corner_displacement(shift, matrix, shift_before, matrix_before, half_extent_mm: float) -> torch.Tensor:
    """``(N,)`` largest displacement (mm) of the 8 corners of a cube of half side ``half_extent_mm`` between two
    maps ``x -> shift + matrix (x - p)`` (``(N, 3)``, ``(N, 3, 3)``)."""
    signs = torch.tensor([[i, j, k] for i in (-1.0, 1.0) for j in (-1.0, 1.0) for k in (-1.0, 1.0)]) * half_extent_mm
    corners = (shift - shift_before)[:, None, :] + signs[None] @ (matrix - matrix_before).transpose(1, 2)
    return corners.norm(dim=2).amax(dim=1)


def patch_similarity(template, template_points_lps, query, points_lps, linear=None, level=AffineLevel(16.0, 1.0, 0), similarity="ncc"):
    """``(N,)`` patch similarity of the maps ``x -> points + linear @ (x - template_point)`` at one level (no
    optimisation; see :func:`register_patches` for the arguments)."""
    level = AffineLevel.from_config(level)
    probe = AffineLevel(level.patch_mm, level.step_mm, 0, level.smoothing_mm)
    return register_patches(template, template_points_lps, query, points_lps, linear, [probe], similarity).similarity_final
