"""Scans under a known transform, for measuring point matching and refinement against exact ground truth.

Two builders:

* :class:`KnownTransform` / :func:`random_transform` / :func:`resample_query`: a random smooth transform of a
  template scan (rotation, isotropic scale, translation and an elastic sine-wave displacement) and the **query**
  scan resampled with it (``scripts/evaluate_known_transform.py``, ``scripts/benchmark_matching.py``,
  ``scripts/evaluate_checkpoint.py``);
* :func:`moved_scan`: the same voxels on a grid moved by a rigid transform, no resampling
  (``scripts/evaluate_refinement_cross_modal.py``'s control).

Coordinates: every point is world **LPS mm**, arrays ``(N, 3)``; images are MONAI ``MetaTensor`` ``(1, X, Y, Z)``
with a **RAS** affine (as :func:`samv2_components.io.image.load_scan` gives); voxel indices are voxel centres.

The transform (``c`` = centre of the rotation and scaling, by default the centre of the template's voxel grid)::

    G(p)  = c + t + s R (p - c)                        affine part, template -> query
    u(x)  = per component i: sum_k a_ik sin(w_ik . x + phi_ik)    smooth displacement, defined on query points
    T(x)  = G^-1(x + u(x))                             query point -> template point (what resampling needs)
    gt(p) = T^-1(p) = the x with x + u(x) = G(p)       solved by the fixed-point iteration x <- G(p) - u(x)

* ``R = Rz(gamma) Ry(beta) Rx(alpha)`` about the LPS axes (:func:`rotation_zyx`); :func:`random_transform` draws
  each angle uniform in ``+-max_rotation_deg``, ``s`` uniform in ``scale_range`` and ``t`` uniform in
  ``+-max_translation_mm`` per axis.
* Elastic part: ``n_modes`` sine waves per displacement component, random directions, wavelengths uniform in
  ``wavelength_mm``, random phases, amplitudes scaled so that ``sum_k |a_ik| = elastic_mm / sqrt(3)``, hence
  ``|u(x)| <= elastic_mm`` everywhere; ``|du/dx| <= sqrt(3) (elastic_mm / sqrt(3)) 2 pi / min(wavelength)``, and
  a bound >= 0.9 is refused, so ``x + u(x)`` stays invertible and the fixed-point iteration contracts.

The query (:func:`query_grid`, :func:`resample_query`) has the template's voxel spacing and axis directions, with
its origin and size chosen to cover the whole transformed template (mapped corners plus the elastic bound); each
query voxel ``x`` takes the template's trilinear value at ``T(x)``, the template minimum (air) outside it.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor

from samv2_components.geometry import convert_affine, points_outside_scan, voxel_to_world, world_to_voxel
from samv2_components.transforms.patch_pairs import sample_at_voxels

__all__ = [
    "KnownTransform",
    "random_transform",
    "rotation_zyx",
    "grid_centre_lps",
    "sample_volume",
    "query_grid",
    "resample_query",
    "save_nifti",
    "sample_template_points",
    "moved_scan",
    "mapped_body_points",
]


def rotation_zyx(angles_rad) -> np.ndarray:
    """3x3 ``Rz(g) @ Ry(b) @ Rx(a)`` for ``angles_rad = (a, b, g)`` (radians) about the LPS x, y, z axes."""
    a, b, g = angles_rad
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = np.array([[math.cos(g), -math.sin(g), 0], [math.sin(g), math.cos(g), 0], [0, 0, 1]])
    return rz @ ry @ rx


@dataclass
class KnownTransform:
    """A known smooth transform between a template and a query scan (see the module doc for the formulas).

    All points are world LPS mm, arrays ``(N, 3)``.

    Attributes:
        centre: ``c`` ``(3,)``, the centre of the rotation and scaling.
        angles_deg: rotation angles ``(3,)`` (degrees about x, y, z; ``R = Rz Ry Rx``).
        scale: isotropic scale ``s``.
        translation: ``t`` ``(3,)`` (mm).
        amplitudes: ``a`` ``(3, K)``: mode amplitudes (mm) per displacement component.
        wavevectors: ``w`` ``(3, K, 3)`` (rad/mm).
        phases: ``phi`` ``(3, K)`` (rad).
    """

    centre: np.ndarray
    angles_deg: np.ndarray
    scale: float
    translation: np.ndarray
    amplitudes: np.ndarray = field(default_factory=lambda: np.zeros((3, 0)))
    wavevectors: np.ndarray = field(default_factory=lambda: np.zeros((3, 0, 3)))
    phases: np.ndarray = field(default_factory=lambda: np.zeros((3, 0)))

    @property
    def rotation(self) -> np.ndarray:
        """``R`` (3x3)."""
        return rotation_zyx(np.deg2rad(self.angles_deg))

    def affine_forward(self, points) -> np.ndarray:
        """``G(p) = c + t + s R (p - c)``: template -> query, affine part; ``(N, 3)`` -> ``(N, 3)``."""
        p = np.asarray(points, dtype=np.float64)
        return self.centre + self.translation + self.scale * (p - self.centre) @ self.rotation.T

    def affine_inverse(self, points) -> np.ndarray:
        """``G^-1(y) = c + R^T (y - c - t) / s``; ``(N, 3)`` -> ``(N, 3)``."""
        y = np.asarray(points, dtype=np.float64)
        return self.centre + (y - self.centre - self.translation) @ self.rotation / self.scale

    def displacement(self, points) -> np.ndarray:
        """``u(x)`` ``(N, 3)`` mm at query points ``x`` ``(N, 3)``."""
        x = np.asarray(points, dtype=np.float64)
        u = np.zeros_like(x)
        for i in range(3):
            for k in range(self.amplitudes.shape[1]):
                u[:, i] += self.amplitudes[i, k] * np.sin(x @ self.wavevectors[i, k] + self.phases[i, k])
        return u

    def lipschitz_bound(self) -> float:
        """Upper bound of the Frobenius (hence spectral) norm of ``du/dx`` anywhere."""
        per_component = (np.abs(self.amplitudes) * np.linalg.norm(self.wavevectors, axis=2)).sum(axis=1)
        return float(np.linalg.norm(per_component))

    def displacement_bound(self) -> float:
        """Upper bound of ``|u(x)|`` anywhere (mm)."""
        return float(np.linalg.norm(np.abs(self.amplitudes).sum(axis=1)))

    def query_to_template(self, points) -> np.ndarray:
        """``T(x) = G^-1(x + u(x))``: the template point shown at query point ``x`` (what resampling uses)."""
        x = np.asarray(points, dtype=np.float64)
        return self.affine_inverse(x + self.displacement(x))

    def template_to_query(self, points, tol_mm: float = 1e-6, max_iter: int = 500) -> np.ndarray:
        """Ground truth ``T^-1(p)``: the query point ``(N, 3)`` showing template point ``p`` ``(N, 3)``.

        Solves ``x + u(x) = G(p)`` by ``x <- G(p) - u(x)`` (a contraction: ``|du/dx| < 1``) until every point
        moves less than ``tol_mm``.

        Raises:
            RuntimeError: no convergence within ``max_iter`` iterations.
        """
        target = self.affine_forward(points)
        x = target.copy()
        for _ in range(max_iter):
            new = target - self.displacement(x)
            step = np.abs(new - x).max() if len(x) else 0.0
            x = new
            if step < tol_mm:
                return x
        raise RuntimeError(
            f"the inverse did not converge (last step {step:.3g} mm; |du/dx| <= {self.lipschitz_bound():.3g})"
        )

    def describe(self) -> dict:
        """JSON-ready summary (rounded): rotation, scale, translation, centre and the elastic part's bounds."""
        wavelengths = 2 * np.pi / np.linalg.norm(self.wavevectors, axis=2) if self.amplitudes.size else np.zeros(0)
        return {
            "rotation_deg_xyz": [round(float(a), 3) for a in self.angles_deg],
            "scale": round(float(self.scale), 4),
            "translation_mm_lps": [round(float(t), 3) for t in self.translation],
            "centre_mm_lps": [round(float(c), 3) for c in self.centre],
            "elastic_bound_mm": round(self.displacement_bound(), 3),
            "elastic_modes_per_axis": int(self.amplitudes.shape[1]),
            "elastic_wavelengths_mm": [round(float(wavelengths.min()), 1), round(float(wavelengths.max()), 1)]
            if wavelengths.size
            else [],
            "elastic_gradient_bound": round(self.lipschitz_bound(), 3),
        }


def random_transform(
    seed: int,
    centre,
    max_rotation_deg: float = 10.0,
    scale_range=(0.9, 1.1),
    max_translation_mm: float = 20.0,
    elastic_mm: float = 5.0,
    wavelength_mm=(80.0, 160.0),
    n_modes: int = 4,
) -> KnownTransform:
    """Draw a :class:`KnownTransform` with ``seed`` about ``centre`` (LPS mm; see the module doc for the
    distributions).

    Raises:
        ValueError: the elastic part could fold (gradient bound >= 0.9): lower ``elastic_mm`` or raise the
            wavelengths.
    """
    rng = np.random.default_rng(seed)
    angles = rng.uniform(-max_rotation_deg, max_rotation_deg, 3)
    scale = float(rng.uniform(*scale_range))
    translation = rng.uniform(-max_translation_mm, max_translation_mm, 3)
    weights = rng.uniform(0.5, 1.0, (3, n_modes)) * rng.choice([-1.0, 1.0], (3, n_modes))
    amplitudes = weights / np.abs(weights).sum(axis=1, keepdims=True) * (elastic_mm / math.sqrt(3.0))
    directions = rng.normal(size=(3, n_modes, 3))
    directions /= np.linalg.norm(directions, axis=2, keepdims=True)
    wavelengths = rng.uniform(*wavelength_mm, (3, n_modes))
    wavevectors = directions * (2 * np.pi / wavelengths)[..., None]
    phases = rng.uniform(0, 2 * np.pi, (3, n_modes))
    tf = KnownTransform(np.asarray(centre, float), angles, scale, translation, amplitudes, wavevectors, phases)
    if tf.lipschitz_bound() >= 0.9:
        raise ValueError(
            f"elastic part too strong for its smoothness (|du/dx| bound {tf.lipschitz_bound():.2f} >= 0.9): "
            "lower elastic_mm or raise wavelength_mm"
        )
    return tf


def grid_centre_lps(image: MetaTensor) -> np.ndarray:
    """World (LPS mm) position ``(3,)`` of the centre of ``image``'s voxel grid (``(1, X, Y, Z)``, RAS affine)."""
    centre = (np.asarray(image.shape[1:], float) - 1.0) / 2.0
    return voxel_to_world(centre, image.affine)[0]


def sample_volume(volume: torch.Tensor, voxels: np.ndarray, fill: float) -> np.ndarray:
    """Trilinear values ``(N,)`` of ``volume`` ``(X, Y, Z)`` at fractional voxel coordinates ``(N, 3)`` (voxel
    centres at integers); ``fill`` outside."""
    return sample_at_voxels(volume[None], torch.as_tensor(voxels), "bilinear", fill)[0].numpy()


def query_grid(image: MetaTensor, transform: KnownTransform) -> tuple[np.ndarray, np.ndarray]:
    """The query grid: ``(affine_lps (4, 4) voxel -> LPS mm, shape (3,))``, with ``image``'s spacing and
    directions, covering ``G`` of the template's corner voxel centres widened by the elastic bound plus 1 mm on
    every side."""
    affine_lps = convert_affine(image.affine, "RAS", "LPS")
    shape = np.asarray(image.shape[1:])
    corners = np.array(list(itertools.product(*[(0, n - 1) for n in shape])), dtype=float)
    mapped = transform.affine_forward(voxel_to_world(corners, affine_lps, affine_space="LPS"))
    margin = transform.displacement_bound() + 1.0
    signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], float)
    idx = world_to_voxel((mapped[:, None, :] + margin * signs).reshape(-1, 3), affine_lps, affine_space="LPS")
    lo, hi = np.floor(idx.min(0)), np.ceil(idx.max(0))
    shift = np.eye(4)
    shift[:3, 3] = lo
    return affine_lps @ shift, (hi - lo + 1).astype(int)


def resample_query(image: MetaTensor, transform: KnownTransform, chunk_voxels: int = 2_000_000):
    """Apply ``transform`` to ``image`` (``(1, X, Y, Z)`` MetaTensor with a RAS affine, as ``load_scan`` gives).

    Returns:
        ``(query, info)``: the query ``MetaTensor`` ``(1, X', Y', Z')`` float32 with a RAS affine (same spacing
        and directions as ``image``, origin and size covering the transformed template): voxel ``x`` holds the
        template's value at ``T(x)``; and ``{"max_displacement_mm", "rms_displacement_mm"}`` of ``|u|`` over the
        query grid.
    """
    affine_lps = convert_affine(image.affine, "RAS", "LPS")
    q_affine_lps, q_shape = query_grid(image, transform)

    volume = image[0].as_tensor().float() if isinstance(image, MetaTensor) else torch.as_tensor(image[0]).float()
    fill = float(volume.min())
    out = np.empty(int(np.prod(q_shape)), dtype=np.float32)
    sq_sum, max_u = 0.0, 0.0
    for start in range(0, out.size, chunk_voxels):
        lin = np.arange(start, min(start + chunk_voxels, out.size))
        voxels = np.stack(np.unravel_index(lin, q_shape), axis=1).astype(np.float64)
        x = voxel_to_world(voxels, q_affine_lps, affine_space="LPS")
        u = transform.displacement(x)
        norms = np.linalg.norm(u, axis=1)
        sq_sum += float((norms**2).sum())
        max_u = max(max_u, float(norms.max()))
        p = transform.affine_inverse(x + u)
        out[start : start + len(lin)] = sample_volume(volume, world_to_voxel(p, affine_lps, affine_space="LPS"), fill)
    query = MetaTensor(
        torch.from_numpy(out.reshape(q_shape))[None],
        affine=torch.as_tensor(convert_affine(q_affine_lps, "LPS", "RAS")),
        meta={"space": "RAS"},
    )
    return query, {"max_displacement_mm": max_u, "rms_displacement_mm": math.sqrt(sq_sum / out.size)}


def save_nifti(image: MetaTensor, path: str) -> str:
    """Write ``(1, X, Y, Z)`` with its RAS affine as NIfTI (read back by ``load_scan`` with the same geometry);
    returns ``path``."""
    nib.save(nib.Nifti1Image(image[0].cpu().numpy().astype(np.float32), np.asarray(image.affine, np.float64)), path)
    return path


def sample_template_points(
    image: MetaTensor, num_points: int, seed: int, min_value: float = -300.0, border_mm: float = 10.0
) -> np.ndarray:
    """``num_points`` voxel centres (world LPS mm, ``(N, 3)``) of ``image`` (``(1, X, Y, Z)``, RAS affine) with
    intensity > ``min_value``, >= ``border_mm`` from the grid border (measured along each voxel axis), drawn
    without replacement with ``seed`` (fewer if fewer qualify).

    Raises:
        ValueError: no voxel qualifies.
    """
    data = image[0].cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image[0])
    spacing = np.linalg.norm(np.asarray(image.affine, float)[:3, :3], axis=0)
    mask = data > min_value
    for axis, (n, sp) in enumerate(zip(data.shape, spacing)):
        idx = np.arange(n) * sp
        keep = (idx >= border_mm) & (idx <= (n - 1) * sp - border_mm)
        shape = [1, 1, 1]
        shape[axis] = n
        mask &= keep.reshape(shape)
    candidates = np.argwhere(mask)
    if len(candidates) == 0:
        raise ValueError(f"no voxel has intensity > {min_value} and lies {border_mm} mm inside the border")
    rng = np.random.default_rng(seed)
    chosen = candidates[rng.choice(len(candidates), size=min(num_points, len(candidates)), replace=False)]
    return voxel_to_world(chosen.astype(np.float64), image.affine)


# ---------------------------------------------------------------------------------------------- rigid grid move
def moved_scan(image: MetaTensor, fixed_to_moving_lps: np.ndarray) -> MetaTensor:
    """The same voxels with the grid moved by a rigid 4x4 LPS transform: anatomical point ``p`` (LPS mm) of
    ``image`` (``(C, X, Y, Z)``, RAS affine) goes to ``T p`` exactly (no resampling)."""
    affine_lps = convert_affine(np.asarray(image.affine, np.float64), "RAS", "LPS")
    moved = convert_affine(fixed_to_moving_lps @ affine_lps, "LPS", "RAS")
    return MetaTensor(image.as_tensor().clone(), affine=torch.as_tensor(moved))


def mapped_body_points(
    ct: MetaTensor, query: MetaTensor, transform: np.ndarray, n: int, seed: int, min_value: float = -300.0,
    inside_voxels: float = 8.0,
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` voxel centres of ``ct`` (``(1, X, Y, Z)``, RAS affine) with intensity > ``min_value`` (LPS mm,
    ``(n, 3)``), drawn with ``seed``, whose images under the 4x4 LPS ``transform`` lie ``inside_voxels`` voxels
    inside ``query``, and those images ``(n, 3)`` (fewer than ``n`` if fewer qualify among ``50 n`` candidates)."""
    rng = np.random.default_rng(seed)
    candidates = np.argwhere(ct[0].numpy() > min_value)
    candidates = candidates[rng.permutation(len(candidates))[: 50 * n]].astype(np.float64)
    points = voxel_to_world(candidates, np.asarray(ct.affine))
    truth = points @ transform[:3, :3].T + transform[:3, 3]
    keep = ~points_outside_scan(query, truth, tolerance_voxels=-inside_voxels)
    return points[keep][:n], truth[keep][:n]
