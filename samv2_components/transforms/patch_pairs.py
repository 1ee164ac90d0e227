"""Paired, overlapping, differently augmented patches of one scan for SAMv2's self-supervised (appearance) step.

Each patch ``k`` (``a`` and ``b``) is defined by one affine ``M_k`` (4x4) that maps *patch* voxel coordinates
``(d, h, w)`` (voxel centres, array axis order D, H, W = S, P, L) to continuous *volume* voxel coordinates.
The patch is resampled from the volume through ``M_k`` (trilinear for images, nearest for labels), and the
voxel-wise correspondence between the patches is ``M_b^-1 M_a`` applied to patch ``a``'s voxel grid: exact by
construction, whatever the scales and rotations (see :func:`patch_affine`).

Sampling follows the reference implementation's ``ComputeAugParam_sample`` (design notes §2, `docs/design.md`): patches of 96x96x32
(in-plane x depth) at 2 mm, each view with its own isotropic scale U(0.8, 1.2) of the voxel spacing; with
probability 0.8 the two views are drawn around a shared seed point (else independently). Improvements over the
reference: the geometry is one affine per view (no crop-resample-crop chain and no separate coordinate
meshgrids to carry along), rotations are optional and physical, and centres prefer the body.

**Simulated subject variation** (optional, ``deform_prob``): patch a is additionally warped by a smooth random
displacement ``w`` given in its own voxel frame, ``v = M_a (p + w(p))``, so that its partner in patch b is
``M_b^-1 M_a (p + w(p))``: still exact, with no field inversion. With per-axis scales (``isotropic_scale=False``)
this gives positive pairs across a large-scale elastic deformation plus anisotropic scaling, the shape difference
between two bodies that a few training subjects cannot show (see :func:`smooth_displacement`).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, RandGaussianNoise, RandGaussianSmooth, Randomizable
from monai.utils import ensure_tuple

from samv2_components.errors import SAMv2InputError
from samv2_components.geometry import grid_sample_points, voxel_to_grid_sample_matrix
from samv2_components.io.image import plain_tensor
from samv2_components.transforms.aggressive_intensity import share_random_state

__all__ = [
    "RandPatchPaird",
    "rotation_matrix",
    "patch_affine",
    "patch_voxel_grid",
    "apply_affine",
    "patch_correspondence",
    "sample_at_voxels",
    "VoxelSampler",
    "smooth_displacement",
]

logger = logging.getLogger("samv2_components")

#: default rotation half-range per axis in radians (5 degrees): the reference's AggSAM/CrossSAM intra-modality
#: views use ``RandomAffine3d(degrees=(-5, 5, -5, 5, -5, 5))``; its plain Semantic-SAM views use no rotation.
DEFAULT_ROTATE_RANGE = float(np.deg2rad(5.0))


# --------------------------------------------------------------------------------------------------------------
# geometry: the one place where a patch's affine and the a -> b correspondence are defined
# --------------------------------------------------------------------------------------------------------------


def rotation_matrix(angles: Sequence[float]) -> np.ndarray:
    """3x3 rotation ``R_D(a) @ R_H(b) @ R_W(c)`` for angles ``(a, b, c)`` in radians about the D, H, W axes.

    The rotation "about D" turns the (H, W) plane (an in-plane, axial rotation for (S, P, L) volumes); "about
    H" turns the (D, W) plane and "about W" the (D, H) plane. Angles can be recovered from ``R`` as
    ``b = asin(R[0, 2])``, ``c = atan2(-R[0, 1], R[0, 0])``, ``a = atan2(-R[1, 2], R[2, 2])`` for ``|b| < pi/2``.
    """
    a, b, c = (float(x) for x in angles)
    ca, sa, cb, sb, cc, sc = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(c), np.sin(c)
    r_d = np.array([[1.0, 0.0, 0.0], [0.0, ca, -sa], [0.0, sa, ca]])
    r_h = np.array([[cb, 0.0, sb], [0.0, 1.0, 0.0], [-sb, 0.0, cb]])
    r_w = np.array([[cc, -sc, 0.0], [sc, cc, 0.0], [0.0, 0.0, 1.0]])
    return r_d @ r_h @ r_w


def patch_affine(
    centre: Sequence[float],
    patch_size: Sequence[int],
    scale: Sequence[float] | float = 1.0,
    rotation: np.ndarray | None = None,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
) -> np.ndarray:
    """4x4 matrix ``M`` mapping patch voxel coordinates ``p = (d, h, w)`` to volume voxel coordinates ``v``.

    ``v = centre + L (p - (n - 1) / 2)`` with ``L = diag(1 / spacing) @ R @ diag(spacing * scale)``: the patch
    centre lands on ``centre`` (volume voxels), patch axis ``i`` steps ``spacing[i] * scale[i]`` mm along the
    physical direction ``R[:, i]``. For an isotropic volume (the 2 mm input) ``L = s R`` (isotropic scale ``s``).
    Rotating in millimetres (not in voxels) keeps anisotropic volumes free of shear.

    Args:
        centre: volume voxel coordinate ``(D, H, W)`` of the patch centre.
        patch_size: ``(d, h, w)`` patch shape.
        scale: patch voxel size relative to the volume voxel size; > 1 covers a larger field of view.
        rotation: 3x3 rotation (e.g. :func:`rotation_matrix`); identity if None.
        spacing: the volume's voxel size per array axis (mm); only its ratios matter.
    """
    n = np.asarray(patch_size, dtype=np.float64)
    sp = np.asarray(spacing, dtype=np.float64)
    s = np.broadcast_to(np.asarray(scale, dtype=np.float64), (3,))
    rot = np.eye(3) if rotation is None else np.asarray(rotation, dtype=np.float64)
    linear = np.diag(1.0 / sp) @ rot @ np.diag(sp * s)
    m = np.eye(4)
    m[:3, :3] = linear
    m[:3, 3] = np.asarray(centre, dtype=np.float64) - linear @ ((n - 1.0) / 2.0)
    return m


@functools.lru_cache(maxsize=8)
def patch_voxel_grid(patch_size: tuple[int, int, int]) -> torch.Tensor:
    """``(d, h, w, 3)`` float64 tensor of every patch voxel's own coordinate ``(D, H, W)`` (cached: read only)."""
    axes = [torch.arange(int(n), dtype=torch.float64) for n in patch_size]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)


def apply_affine(affine: np.ndarray | torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Apply a 4x4 affine to coordinates ``(..., 3)``; float64 result."""
    m = torch.as_tensor(np.asarray(affine, dtype=np.float64) if not isinstance(affine, torch.Tensor) else affine)
    m = m.to(torch.float64)
    return coords.to(torch.float64) @ m[:3, :3].T + m[:3, 3]


def patch_correspondence(affine_a: np.ndarray, affine_b: np.ndarray, patch_size: Sequence[int]) -> torch.Tensor:
    """``(3, d, h, w)`` float64: for each voxel of patch a, the voxel coordinate (D, H, W) in patch b of the same
    volume point, i.e. ``M_b^-1 M_a p``."""
    a_to_b = np.linalg.solve(np.asarray(affine_b, dtype=np.float64), np.asarray(affine_a, dtype=np.float64))
    grid = patch_voxel_grid(tuple(int(n) for n in patch_size))
    return apply_affine(a_to_b, grid).permute(3, 0, 1, 2)


class VoxelSampler:
    """Samples volumes of one spatial size ``(D, H, W)`` at one set of continuous voxel coordinates ``(..., 3)``
    (D, H, W order; voxel index ``i`` is the centre of voxel ``i``): the points' bounding box and
    ``grid_sample``'s normalised grid are computed once, then every volume sampled there (a patch's image and its
    labels) reuses them.

    Only the bounding box of the points is read, so the cost does not grow with the volume size.

    Args:
        coords: ``(..., 3)`` voxel coordinates, float (computed in float64).
        spatial_shape: ``(D, H, W)`` of the volumes to sample.
    """

    def __init__(self, coords: torch.Tensor, spatial_shape: Sequence[int]):
        self.spatial_shape = tuple(int(n) for n in spatial_shape)
        self.out_shape = tuple(coords.shape[:-1])
        spatial = torch.tensor(self.spatial_shape, dtype=torch.float64)
        flat = coords.reshape(-1, 3).to(torch.float64)
        # every voxel a point can read (floor and floor + 1) lies in [lo, hi] or outside the volume
        low, high = torch.aminmax(flat, dim=0)
        lo = torch.minimum(torch.clamp(torch.floor(low), min=0), spatial - 1)
        hi = torch.minimum(torch.clamp(torch.floor(high) + 1, min=0), spatial - 1)
        self.box = tuple(slice(int(a), int(b) + 1) for a, b in zip(lo, hi))
        # box voxel (D, H, W) -> grid_sample's normalised (x, y, z): one small affine, applied as one matrix product
        box_shape = [int(b) - int(a) + 1 for a, b in zip(lo, hi)]
        to_grid = torch.from_numpy(voxel_to_grid_sample_matrix(box_shape, align_corners=False))
        self.grid = torch.addmm(to_grid[:3, 3] - to_grid[:3, :3] @ lo, flat, to_grid[:3, :3].T).to(torch.float32)

    def __call__(self, volume: torch.Tensor, mode: str = "bilinear", pad_value: float = 0.0) -> torch.Tensor:
        """``(C, ...)`` float32 samples of a ``(C, D, H, W)`` volume: trilinear (``mode="bilinear"``) or nearest;
        points (or trilinear neighbours) outside the volume take ``pad_value``."""
        if tuple(volume.shape[1:]) != self.spatial_shape:
            raise ValueError(f"volume of spatial shape {tuple(volume.shape[1:])}, the sampler's is {self.spatial_shape}")
        crop = volume[(slice(None), *self.box)].to(torch.float32)
        if pad_value != 0.0:
            crop = crop - pad_value  # zero padding in grid_sample == pad_value after the shift back
        out = grid_sample_points(crop[None], self.grid, mode=mode, padding_mode="zeros", align_corners=False)
        if pad_value != 0.0:
            out = out + pad_value
        return out.reshape(volume.shape[0], *self.out_shape)


def sample_at_voxels(
    volume: torch.Tensor, coords: torch.Tensor, mode: str = "bilinear", pad_value: float = 0.0
) -> torch.Tensor:
    """Sample a ``(C, D, H, W)`` volume at continuous voxel coordinates ``(..., 3)`` (D, H, W order).

    Trilinear (``mode="bilinear"``) or nearest interpolation with ``torch.nn.functional.grid_sample``; points
    (or trilinear neighbours) outside the volume take ``pad_value``. Only the bounding box of the points is
    touched, so the cost does not grow with the volume size. Returns ``(C, ...)`` float32. Several volumes at the
    same points: :class:`VoxelSampler`.
    """
    return VoxelSampler(coords, volume.shape[1:])(volume, mode, pad_value)


def smooth_displacement(
    patch_size: Sequence[int],
    voxel_mm: Sequence[float],
    sigma_mm: float,
    control_spacing_mm: float,
    rng: np.random.RandomState,
) -> torch.Tensor:
    """A smooth random displacement ``(3, d, h, w)`` float64, in voxels of a patch whose voxels are ``voxel_mm``.

    Random vectors (each component ``N(0, sigma_mm)``, clipped to 3 sigma) on a lattice of control points
    ``control_spacing_mm`` apart that spans the patch, interpolated trilinearly to every voxel: a large-scale
    elastic field (the lattice spacing sets its scale). The largest displacement gradient is about
    ``2 * 3 * sigma_mm / control_spacing_mm``, so ``sigma_mm <= control_spacing_mm / 8`` keeps the map one-to-one
    (the check in :class:`RandPatchPaird`).
    """
    size = np.asarray(patch_size, dtype=np.int64)
    vox = np.asarray(voxel_mm, dtype=np.float64)
    extent_mm = (size - 1) * vox
    lattice = np.maximum(2, np.ceil(extent_mm / control_spacing_mm).astype(np.int64) + 1)
    vectors_mm = np.clip(rng.normal(0.0, sigma_mm, size=(3, *lattice)), -3 * sigma_mm, 3 * sigma_mm)
    vectors_vox = torch.from_numpy(vectors_mm / vox.reshape(3, 1, 1, 1))
    field = F.interpolate(vectors_vox[None], size=tuple(int(n) for n in size), mode="trilinear", align_corners=True)
    return field[0]


# --------------------------------------------------------------------------------------------------------------
# the transform
# --------------------------------------------------------------------------------------------------------------


def _checked_patch_size(patch_size: Sequence[int]) -> tuple[int, int, int]:
    size = tuple(int(n) for n in ensure_tuple(patch_size))
    if len(size) != 3 or min(size) < 1:
        raise ValueError(f"patch_size must be 3 positive integers (D, H, W), got {patch_size!r}")
    return size


def _checked_offset(value: float | Sequence[float], name: str) -> np.ndarray:
    offset = np.broadcast_to(np.asarray(value, dtype=np.float64), (3,))
    if (offset < 0).any():
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return offset.copy()


def _checked_scale_range(scale_range: Sequence[float]) -> tuple[float, float]:
    lo, hi = (float(x) for x in scale_range)
    if not 0.0 < lo <= hi:
        raise ValueError(f"scale_range must be (low, high) with 0 < low <= high, got {scale_range!r}")
    return lo, hi


def _symmetric_ranges(value: float | Sequence[Any], name: str) -> np.ndarray:
    """``r`` -> ``[(-r, r)] * 3``; ``(r0, r1, r2)`` -> per-axis ``(-ri, ri)``; ``((lo, hi), ...)`` kept."""
    items = ensure_tuple(value)
    if len(items) == 1:
        items = items * 3
    if len(items) != 3:
        raise ValueError(f"{name} must be a number or 3 numbers / (low, high) pairs, got {value!r}")
    out = []
    for item in items:
        pair = ensure_tuple(item)
        if len(pair) == 1:
            out.append((-abs(float(pair[0])), abs(float(pair[0]))))
        elif len(pair) == 2 and float(pair[0]) <= float(pair[1]):
            out.append((float(pair[0]), float(pair[1])))
        else:
            raise ValueError(f"{name}: bad range {item!r}")
    return np.asarray(out, dtype=np.float64)


def _source_name(image: Any) -> str | None:
    meta = getattr(image, "meta", None)
    name = None if meta is None else meta.get("filename_or_obj")
    return None if name is None else str(name)


class RandPatchPaird(MapTransform, Randomizable):
    """Draw two randomly scaled, rotated and intensity-augmented patches of one scan and their exact voxel-wise
    correspondence, for Semantic-SAM's self-supervised (InfoNCE) step.

    Input: a dict whose ``keys`` entry is a preprocessed scan ``(C, D, H, W)`` at 2 mm, axes (S, P, L), values
    in the network's range (CT -50..205; a MONAI ``MetaTensor`` or a tensor/array). Other keys sampled with the
    same geometry: ``label_keys`` (nearest, dtype kept, e.g. organ labels) and ``interpolated_keys`` (trilinear,
    no intensity augmentation, e.g. coordinate ramps or a second modality).

    Output (keys added; the source volumes are removed unless ``keep_source``, as they cannot be collated):

    * ``<key>_a``, ``<key>_b`` for every image key: ``(C, d, h, w)`` float32 patches (default ``(1, 32, 96, 96)``);
      ``MetaTensor`` with affine ``volume_affine @ M_k`` when the input is one (so every patch voxel's physical
      position is known), otherwise plain tensors. Same for ``label_keys`` (nearest) and ``interpolated_keys``.
    * ``corr_ab``: ``(3, d, h, w)`` float32, for each voxel of patch a the continuous voxel coordinate (D, H, W)
      of the same physical point in patch b (``M_b^-1 M_a p``).
    * ``valid_ab``: ``(1, d, h, w)`` bool, True where that point lies inside patch b (``0 <= corr <= n - 1``) and
      inside the volume (``0 <= M_a p <= size - 1``), i.e. both patches saw real data there.
    * ``overlap``: 0-d bool tensor, whether the pair was drawn around a shared seed.
    * ``affine_a``, ``affine_b``: ``(4, 4)`` float64 ``M_k``, patch voxel -> volume voxel (see :func:`patch_affine`).
      When patch a is deformed, ``M_a`` (and its ``MetaTensor`` affine) is the grid *before* the displacement;
      ``corr_ab`` and ``valid_ab`` include it.

    Sampling (defaults follow the reference's ``ComputeAugParam_sample``, design notes §2):

    * With probability ``overlap_prob`` a seed voxel is drawn, patch a is centred on it and patch b on
      ``seed + U(-1, 1) * overlap_max_offset * patch_size`` per axis (default: up to half a patch; with the
      default scales and rotations about half of patch a's voxels then have a valid partner on average, rarely
      under 10%; the reference lets *each* centre move up to half a crop from the seed, a larger spread).
      Otherwise the two centres are drawn independently (and rarely overlap much in a large scan).
    * Seeds prefer the body: voxels of channel 0 ``> foreground_threshold`` (default -25, the reference AdaReg's
      body threshold in normalised intensity); a scan without any such voxel is sampled anywhere, with one
      warning per file name. ``foreground_threshold=None`` samples anywhere.
    * Centres are then clamped so that each (rotated, scaled) patch stays inside the volume where it fits; so the
      offset of an overlapping pair can only shrink.
    * Each patch gets its own scale ``U(scale_range)`` (reference: (0.8, 1.2), isotropic; ``isotropic_scale=False``
      draws one factor per axis) and rotation with angles ``U(rotate_range)`` about the D, H and W axes
      (:func:`rotation_matrix`); default +-5 degrees per axis, from the reference's AggSAM/CrossSAM intra views
      (its plain SAM config uses none: ``rotate_range=0`` for parity). Rotations are physical (mm), using the
      volume spacing from the ``MetaTensor`` affine (isotropic if a plain tensor).
    * After geometry, per patch and image key: the optional ``intensity_augmentation`` (e.g. CrossSAM's
      :func:`~samv2_components.transforms.aggressive_intensity.aggressive_intensity_augmentation`), drawn
      independently for each patch, then MONAI ``RandGaussianNoise`` (``noise_prob``, std ~ U(0,
      ``noise_std``)) then ``RandGaussianSmooth`` (``blur_prob``, sigma per axis ~ U(``blur_sigma_range``) patch
      voxels), both driven by this transform's random state. Reference: noise std U(0, 0.001) (a no-op at the
      -50..205 scale, so ``noise_std`` defaults to 1.0, about 16 HU) and blur std U(0, 4) mm, i.e. up to 2 voxels
      at 2 mm (used in its AggSAM and semantic views, not its plain SAM views).

    Args:
        keys: image key(s); the first one decides the foreground and names the scan in messages.
        label_keys: keys sampled with nearest interpolation, padded with ``label_pad_value``.
        interpolated_keys: keys sampled with trilinear interpolation, without intensity augmentation.
        patch_size: ``(d, h, w)`` patch shape; default ``(32, 96, 96)`` (reference: 96x96x32 in-plane x depth).
        overlap_prob: probability that the pair is drawn around a shared seed (reference: 0.8).
        overlap_max_offset: largest offset of patch b's centre from the seed, as a fraction of ``patch_size``
            (number or one per axis).
        scale_range: ``(low, high)`` patch voxel size relative to the volume's (reference: (0.8, 1.2)).
        isotropic_scale: one scale per patch (reference) or one per axis.
        rotate_range: angle range(s) in radians about D, H, W: a number ``r`` (``U(-r, r)`` on every axis), three
            numbers, or three ``(low, high)`` pairs.
        foreground_threshold: body threshold for seeds (normalised intensity), or None.
        pad_value: intensity outside the volume for image and interpolated keys; None: each volume's minimum.
        label_pad_value: value outside the volume for label keys.
        noise_prob, noise_std: Gaussian noise probability and largest standard deviation (intensity units).
        blur_prob, blur_sigma_range: Gaussian blur probability and sigma range (patch voxels, every axis).
        intensity_augmentation: array transform applied to each image patch ``(C, d, h, w)`` float32 after
            geometry and before noise and blur (once per patch, so a and b get independent draws); it must keep
            the shape. If it is ``Randomizable`` (a ``Compose`` of them included) it draws from this transform's
            random state, set in :meth:`set_random_state` without drawing, so the pair geometry of a seed does not
            depend on it. None (default): no such step.
        deform_prob: probability that patch a is warped by a smooth random displacement (:func:`smooth_displacement`).
        deform_sigma_mm: standard deviation of the displacement at the control points (mm), at most
            ``deform_control_spacing_mm / 8``.
        deform_control_spacing_mm: distance of the displacement's control points (mm): the field's scale.
        suffixes: output key suffixes of the two patches.
        corr_key, valid_key, overlap_key: output keys of the correspondence, its validity and the overlap flag.
        affine_key: prefix of the ``M_k`` outputs (``affine_key + suffix``).
        keep_source: keep the input volumes in the output dict.
        name_key: key of a value naming the scan in messages (e.g. its file path, copied before loading, for
            pipelines that drop the ``MetaTensor`` metadata); default: the image's ``filename_or_obj``, else its key.
        allow_missing_keys: don't raise for missing keys.

    Raises:
        SAMv2InputError: the image is not ``(C, D, H, W)``, another key's shape differs, or the scan is smaller
            than half the patch along some axis (a smaller scan is padded with ``pad_value``).
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        label_keys: KeysCollection | None = None,
        interpolated_keys: KeysCollection | None = None,
        patch_size: Sequence[int] = (32, 96, 96),
        overlap_prob: float = 0.8,
        overlap_max_offset: float | Sequence[float] = 0.5,
        scale_range: Sequence[float] = (0.8, 1.2),
        isotropic_scale: bool = True,
        rotate_range: float | Sequence[Any] = DEFAULT_ROTATE_RANGE,
        foreground_threshold: float | None = -25.0,
        pad_value: float | None = -50.0,
        label_pad_value: float = 0.0,
        noise_prob: float = 0.3,
        noise_std: float = 1.0,
        blur_prob: float = 0.3,
        blur_sigma_range: Sequence[float] = (0.25, 2.0),
        intensity_augmentation: Callable | None = None,
        deform_prob: float = 0.0,
        deform_sigma_mm: float = 4.0,
        deform_control_spacing_mm: float = 40.0,
        suffixes: Sequence[str] = ("_a", "_b"),
        corr_key: str = "corr_ab",
        valid_key: str = "valid_ab",
        overlap_key: str = "overlap",
        affine_key: str = "affine",
        keep_source: bool = False,
        name_key: str | None = None,
        allow_missing_keys: bool = False,
    ):
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.label_keys = ensure_tuple(label_keys) if label_keys is not None else ()
        self.interpolated_keys = ensure_tuple(interpolated_keys) if interpolated_keys is not None else ()
        self.patch_size = _checked_patch_size(patch_size)
        if not 0.0 <= float(overlap_prob) <= 1.0:
            raise ValueError(f"overlap_prob must be in [0, 1], got {overlap_prob!r}")
        self.overlap_prob = float(overlap_prob)
        self.overlap_max_offset = _checked_offset(overlap_max_offset, "overlap_max_offset")
        self.scale_range = _checked_scale_range(scale_range)
        self.isotropic_scale = bool(isotropic_scale)
        self.rotate_range = _symmetric_ranges(rotate_range, "rotate_range")
        self.foreground_threshold = None if foreground_threshold is None else float(foreground_threshold)
        self.pad_value = None if pad_value is None else float(pad_value)
        self.label_pad_value = float(label_pad_value)
        if len(suffixes) != 2 or suffixes[0] == suffixes[1]:
            raise ValueError(f"suffixes must be two different strings, got {suffixes!r}")
        self.suffixes = (str(suffixes[0]), str(suffixes[1]))
        self.corr_key, self.valid_key, self.overlap_key, self.affine_key = corr_key, valid_key, overlap_key, affine_key
        self.keep_source = bool(keep_source)
        self.name_key = name_key
        self.noise_prob, self.blur_prob = float(noise_prob), float(blur_prob)
        self._noise = RandGaussianNoise(prob=self.noise_prob, mean=0.0, std=float(noise_std), sample_std=True)
        sigma = (float(blur_sigma_range[0]), float(blur_sigma_range[1]))
        self._blur = RandGaussianSmooth(sigma_x=sigma, sigma_y=sigma, sigma_z=sigma, prob=self.blur_prob)
        if intensity_augmentation is not None and not callable(intensity_augmentation):
            raise TypeError(f"intensity_augmentation must be callable or None, got {type(intensity_augmentation)}")
        self.intensity_augmentation = intensity_augmentation
        if not 0.0 <= float(deform_prob) <= 1.0:
            raise ValueError(f"deform_prob must be in [0, 1], got {deform_prob!r}")
        if not float(deform_control_spacing_mm) > 0.0:
            raise ValueError(f"deform_control_spacing_mm must be > 0, got {deform_control_spacing_mm!r}")
        if not 0.0 <= float(deform_sigma_mm) <= float(deform_control_spacing_mm) / 8.0:
            raise ValueError(
                f"deform_sigma_mm must be in [0, deform_control_spacing_mm / 8 = {float(deform_control_spacing_mm) / 8:g}] "
                f"(a larger field can fold), got {deform_sigma_mm!r}"
            )
        self.deform_prob = float(deform_prob)
        self.deform_sigma_mm = float(deform_sigma_mm)
        self.deform_control_spacing_mm = float(deform_control_spacing_mm)
        self.displacement: torch.Tensor | None = None
        self._warned_no_foreground: set[str] = set()
        self._foreground_tries = 64
        self.affines: list[np.ndarray] = []
        self.overlap = False
        self.set_random_state(state=self.R)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> RandPatchPaird:
        """Seed this transform; the intensity augmentation (if Randomizable), noise and blur transforms share its
        random state."""
        super().set_random_state(seed=seed, state=state)
        share_random_state(self.intensity_augmentation, self.R)
        self._noise.set_random_state(state=self.R)
        self._blur.set_random_state(state=self.R)
        return self

    # -- random draws -------------------------------------------------------------------------------------------

    def _draw_seed(self, volume: torch.Tensor, source: str, cache: dict) -> np.ndarray:
        """A volume voxel ``(D, H, W)``: preferably one whose channel 0 exceeds ``foreground_threshold``."""
        shape = volume.shape[1:]
        numel = int(np.prod(shape))
        flat_index = None
        if self.foreground_threshold is not None:
            values = volume[0].reshape(-1)
            # cheap rejection sampling first; the full mask only if that fails (little or no foreground)
            candidates = self.R.randint(0, numel, size=self._foreground_tries)
            hits = (values[torch.from_numpy(candidates)] > self.foreground_threshold).numpy()
            if hits.any():
                flat_index = int(candidates[int(np.argmax(hits))])
            else:
                if "foreground" not in cache:
                    cache["foreground"] = torch.nonzero(values > self.foreground_threshold).reshape(-1)
                foreground = cache["foreground"]
                if foreground.numel() > 0:
                    flat_index = int(foreground[self.R.randint(0, foreground.numel())])
                elif source not in self._warned_no_foreground:
                    self._warned_no_foreground.add(source)
                    logger.warning(
                        "%s: no voxel above the foreground threshold %s; sampling patches anywhere",
                        source,
                        self.foreground_threshold,
                    )
        if flat_index is None:
            flat_index = int(self.R.randint(0, numel))
        return np.asarray(np.unravel_index(flat_index, shape), dtype=np.float64)

    def _draw_linear(self, spacing: np.ndarray) -> np.ndarray:
        """Scale and rotation of one patch as the 3x3 part of its affine (centre still to be chosen)."""
        lo, hi = self.scale_range
        scale = self.R.uniform(lo, hi) if self.isotropic_scale else self.R.uniform(lo, hi, size=3)
        angles = self.R.uniform(self.rotate_range[:, 0], self.rotate_range[:, 1])
        return patch_affine(np.zeros(3), self.patch_size, scale, rotation_matrix(angles), spacing)

    def randomize(self, data: torch.Tensor, spacing: Sequence[float] = (1.0, 1.0, 1.0), source: str = "image") -> None:
        """Draw the pair's geometry for a volume ``data`` ``(C, D, H, W)``: sets ``self.overlap``,
        ``self.affines`` (``[M_a, M_b]``) and ``self.displacement`` (patch a's, in its voxels, or None)."""
        spacing = np.asarray(spacing, dtype=np.float64)
        size = np.asarray(data.shape[1:], dtype=np.float64)
        n = np.asarray(self.patch_size, dtype=np.float64)
        self.overlap = bool(self.R.rand() < self.overlap_prob)
        linears = [self._draw_linear(spacing), self._draw_linear(spacing)]
        cache: dict = {}
        seed = self._draw_seed(data, source, cache)
        if self.overlap:
            centres = [seed, seed + self.R.uniform(-1.0, 1.0, size=3) * self.overlap_max_offset * n]
        else:
            centres = [seed, self._draw_seed(data, source, cache)]
        self.affines = []
        for linear, centre in zip(linears, centres):
            # half extent of the patch's bounding box in volume voxels; keep the whole patch inside where it fits
            half = np.abs(linear[:3, :3]) @ ((n - 1.0) / 2.0)
            low, high = half, size - 1.0 - half
            centre = np.where(low <= high, np.clip(centre, low, np.maximum(low, high)), (size - 1.0) / 2.0)
            m = linear.copy()
            m[:3, 3] = centre - linear[:3, :3] @ ((n - 1.0) / 2.0)
            self.affines.append(m)
        self.displacement = None
        if self.deform_prob > 0 and self.R.rand() < self.deform_prob:
            voxel_mm = np.linalg.norm(spacing[:, None] * linears[0][:3, :3], axis=0)  # patch a's voxel size (mm)
            self.displacement = self.draw_displacement(voxel_mm)

    def draw_displacement(self, voxel_mm: np.ndarray) -> torch.Tensor:
        """Patch a's displacement ``(3, d, h, w)`` in its own voxels (overridable, e.g. by a test's known field)."""
        return smooth_displacement(
            self.patch_size, voxel_mm, self.deform_sigma_mm, self.deform_control_spacing_mm, self.R
        )

    # -- application --------------------------------------------------------------------------------------------

    def _augment(self, patch: torch.Tensor) -> torch.Tensor:
        if self.intensity_augmentation is not None:
            augmented = plain_tensor(self.intensity_augmentation(patch)).to(torch.float32)
            if augmented.shape != patch.shape:
                raise ValueError(
                    f"intensity_augmentation changed the patch shape {tuple(patch.shape)} to {tuple(augmented.shape)}"
                )
            patch = augmented
        if self.noise_prob > 0:
            patch = torch.as_tensor(self._noise(patch), dtype=torch.float32)
        if self.blur_prob > 0:
            patch = torch.as_tensor(self._blur(patch), dtype=torch.float32)
        return patch

    @staticmethod
    def _wrap(patch: torch.Tensor, source: Any, m: np.ndarray) -> torch.Tensor:
        if not isinstance(source, MetaTensor):
            return patch
        affine = source.affine
        affine = affine[0] if affine.ndim == 3 else affine
        meta = {k: v for k, v in source.meta.items() if k != "affine"}
        return MetaTensor(patch, affine=affine.to(torch.float64) @ torch.from_numpy(m), meta=meta)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image_keys = list(self.key_iterator(d))
        if not image_keys:
            return d
        first = d[image_keys[0]]
        name = d.get(self.name_key) if self.name_key is not None else None
        source = str(name) if name is not None else _source_name(first) or str(image_keys[0])
        volume = plain_tensor(first)
        if volume.ndim != 4:
            raise SAMv2InputError(source, f"expected an image of shape (C, D, H, W), got {tuple(volume.shape)}")
        size = volume.shape[1:]
        if any(s < p / 2.0 for s, p in zip(size, self.patch_size)):
            raise SAMv2InputError(
                source,
                f"scan is smaller than half the training patch: shape (D, H, W) {tuple(size)}, patch {self.patch_size}",
            )
        spacing = (1.0, 1.0, 1.0)
        if isinstance(first, MetaTensor):
            affine = first.affine[0] if first.affine.ndim == 3 else first.affine
            spacing = tuple(float(x) for x in torch.linalg.norm(affine[:3, :3].to(torch.float64), dim=0))
        self.randomize(volume, spacing, source)

        grid = patch_voxel_grid(self.patch_size)
        grid_a = grid if self.displacement is None else grid + self.displacement.permute(1, 2, 3, 0)
        coords = [apply_affine(self.affines[0], grid_a), apply_affine(self.affines[1], grid)]
        samplers = [VoxelSampler(c, size) for c in coords]

        jobs = [(k, "image") for k in image_keys]
        for keys, mode in ((self.label_keys, "nearest"), (self.interpolated_keys, "bilinear")):
            for key in keys:
                if key in d:
                    jobs.append((key, mode))
                elif not self.allow_missing_keys:
                    raise KeyError(f"key {key!r} is not in the data; set allow_missing_keys=True to skip it")
        for key, mode in jobs:
            value = d[key]
            vol = plain_tensor(value)
            if vol.ndim != 4 or tuple(vol.shape[1:]) != tuple(size):
                raise SAMv2InputError(source, f"{key!r} has shape {tuple(vol.shape)}, the image {tuple(volume.shape)}")
            if mode == "nearest":
                pad = self.label_pad_value
            else:
                pad = float(vol.min()) if self.pad_value is None else self.pad_value
            for suffix, m, sampler in zip(self.suffixes, self.affines, samplers):
                patch = sampler(vol, "nearest" if mode == "nearest" else "bilinear", pad)
                if mode == "image":
                    patch = self._augment(patch)
                elif mode == "nearest" and not torch.is_floating_point(vol):
                    patch = torch.round(patch).to(vol.dtype)
                d[f"{key}{suffix}"] = self._wrap(patch, value, m)
            if not self.keep_source:
                d.pop(key)

        if self.displacement is None:
            corr = patch_correspondence(self.affines[0], self.affines[1], self.patch_size)
        else:  # the partner in b of the displaced point v = M_a (p + w(p)): M_b^-1 v
            corr = apply_affine(np.linalg.inv(self.affines[1]), coords[0]).permute(3, 0, 1, 2)
        n = torch.tensor(self.patch_size, dtype=torch.float64).reshape(3, 1, 1, 1)
        vol_size = torch.tensor(size, dtype=torch.float64).reshape(3, 1, 1, 1)
        in_b = ((corr >= -1e-6) & (corr <= n - 1 + 1e-6)).all(0)
        point = coords[0].permute(3, 0, 1, 2)
        in_volume = ((point >= -1e-6) & (point <= vol_size - 1 + 1e-6)).all(0)
        d[self.corr_key] = corr.to(torch.float32)
        d[self.valid_key] = (in_b & in_volume)[None]
        d[self.overlap_key] = torch.tensor(self.overlap)
        for suffix, m in zip(self.suffixes, self.affines):
            d[f"{self.affine_key}{suffix}"] = torch.from_numpy(m.copy())
        return d
