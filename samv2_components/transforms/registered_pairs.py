"""Registered CT-MR pairs for CrossSAM's cross-modal step (SAMv2 paper Sec. III-C, steps (3)-(4)).

After AdaReg has found the rigid transform between a CT and an MR of one subject, the *small*-field-of-view scan
``b`` is resampled onto the grid of the *large*-field-of-view scan ``a``, and ``a`` is cropped to ``b``'s body box
dilated by a margin (the AdaReg crop; the margin shrinks from round to round). Voxel ``p`` of both volumes is then
the same physical point (up to registration error), so a patch cut at the same place from both needs no
correspondence field: the correspondence is the identity.

* :func:`registered_pair`: resample + crop, from the preprocessed scans (network input, 2 mm, with affines) and the
  AdaReg transform; returns ``image_a``, ``image_b``, ``valid_b`` (where ``b`` has data), ``body_a``.
* :func:`save_registered_pair` / :func:`load_registered_datalist`: those volumes as NIfTI files (viewable in
  3D Slicer: ``image_b`` overlaid on ``image_a`` shows the registration) and a datalist of them.
* :class:`RandRegisteredPatchd`: one patch location per sample, shared by every key (same crop for ``a`` and ``b``),
  with light shared geometric jitter and independent intensity augmentation per modality.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, RandGaussianNoise, RandGaussianSmooth, Randomizable
from monai.utils import ensure_tuple

from samv2_components.errors import RegistrationFailed, SAMv2InputError
from samv2_components.geometry import affine_and_space, body_box_corners, body_mask, convert_affine, crop_index_range
from samv2_components.io.atomic import atomic_file
from samv2_components.io.image import plain_tensor
from samv2_components.transforms.aggressive_intensity import share_random_state
from samv2_components.transforms.patch_pairs import (
    VoxelSampler,
    _checked_offset,
    _checked_patch_size,
    _checked_scale_range,
    _symmetric_ranges,
    apply_affine,
    patch_affine,
    patch_voxel_grid,
    rotation_matrix,
    sample_at_voxels,
)

__all__ = [
    "RandRegisteredPatchd",
    "registered_pair",
    "save_registered_pair",
    "load_registered_datalist",
    "REGISTERED_KEYS",
]

logger = logging.getLogger("samv2_components")

#: the volumes of a registered pair, as :func:`registered_pair` returns and :func:`save_registered_pair` writes them
REGISTERED_KEYS = ("image_a", "image_b", "valid_b", "body_a")


# --------------------------------------------------------------------------------------------------------------
# building a registered pair
# --------------------------------------------------------------------------------------------------------------


def _lps_affine(image: MetaTensor) -> np.ndarray:
    affine, space = affine_and_space(image)
    return convert_affine(affine, space, "LPS")


def _with_affine(data: torch.Tensor, like: MetaTensor, affine_lps: np.ndarray) -> MetaTensor:
    """``data`` as a MetaTensor with ``affine_lps`` expressed in ``like``'s space (RAS for MONAI-loaded scans)."""
    _, space = affine_and_space(like)
    affine = torch.as_tensor(convert_affine(affine_lps, "LPS", space), dtype=torch.float64)
    meta = {k: v for k, v in like.meta.items() if k not in ("affine", "original_affine", "spatial_shape")}
    meta["space"] = space
    return MetaTensor(data, affine=affine, meta=meta)


def registered_pair(
    fixed_image: MetaTensor,
    moving_image: MetaTensor,
    fixed_to_moving: np.ndarray,
    margin_mm: float,
    small_fov: str = "moving",
    body_threshold: float = -25.0,
    pad_value: float = -50.0,
    chunk_voxels: int = 2_000_000,
    small_body_corners: np.ndarray | None = None,
) -> dict[str, Any]:
    """Resample the small-FOV scan onto the large-FOV scan's grid, cropped to the small scan's body + margin.

    Args:
        fixed_image, moving_image: preprocessed scans ``(1, D, H, W)`` (network input scale, e.g. 2 mm, with
            affines), the ones AdaReg registered.
        fixed_to_moving: 4x4 LPS matrix, fixed physical point -> moving physical point
            (:attr:`~samv2_components.registration.RigidRegistration.fixed_to_moving`).
        margin_mm: dilation of the small scan's body bounding box (mapped into the large scan) for the crop.
        small_fov: ``"moving"`` or ``"fixed"``: which scan has the small field of view
            (:attr:`~samv2_components.registration.RigidRegistration.small_fov`); the other one is ``a``.
        body_threshold: body threshold on the preprocessed intensity (AdaReg's ``body_threshold``).
        pad_value: value of ``image_b`` outside the small scan (-50: air / minimum after normalisation).
        chunk_voxels: resample this many output voxels at a time (bounds memory on large crops).
        small_body_corners: ``(8, 3)`` LPS corners of the small scan's body box, as AdaReg found them
            (:attr:`~samv2_components.registration.RigidRegistration.small_body_corners`); None: computed here.

    Returns:
        A dict with

        * ``image_a``: the large scan cropped, ``MetaTensor (1, d, h, w)`` with the crop's affine (same space as
          the input's);
        * ``image_b``: the small scan resampled (trilinear) onto that grid with the rigid transform;
        * ``valid_b``: ``(1, d, h, w)`` bool, where the resampled point lies inside the small scan's volume (where
          ``b`` has data);
        * ``body_a``: ``(1, d, h, w)`` bool, the large scan's body (intensity > ``body_threshold``) in the crop;
        * ``large``, ``small``: ``"fixed"`` / ``"moving"``;
        * ``crop_start``, ``crop_stop``: the crop as voxel index ranges of the large scan (stop exclusive);
        * ``large_to_small``: 4x4 LPS matrix mapping a physical point of ``a`` to the same point of ``b``.

    Raises:
        SAMv2InputError: no body in the small scan, or ``small_fov`` is not ``"fixed"`` / ``"moving"``.
        RegistrationFailed: the small scan's body box maps outside the large scan (no overlap).
    """
    if small_fov not in ("fixed", "moving"):
        raise SAMv2InputError("small_fov", f"must be 'fixed' or 'moving', got {small_fov!r}")
    large = "fixed" if small_fov == "moving" else "moving"
    images = {"fixed": fixed_image, "moving": moving_image}
    image_large, image_small = images[large], images[small_fov]
    matrix = np.asarray(fixed_to_moving, dtype=np.float64)
    large_to_small = matrix if large == "fixed" else np.linalg.inv(matrix)
    small_to_large = np.linalg.inv(large_to_small)
    aff_large, aff_small = _lps_affine(image_large), _lps_affine(image_small)

    # 1. crop box: the small scan's body box, mapped into the large scan, dilated by the margin
    if small_body_corners is None:
        small_body = body_mask(image_small, body_threshold)
        if not small_body.any():
            raise SAMv2InputError(small_fov, f"no body in the {small_fov} scan (intensity above {body_threshold})")
        small_body_corners = body_box_corners(image_small, small_body)
    corners = np.asarray(small_body_corners, dtype=np.float64) @ small_to_large[:3, :3].T + small_to_large[:3, 3]
    box = crop_index_range(corners, aff_large, image_large.shape[1:], margin_mm)
    if box is None:
        raise RegistrationFailed(f"the {small_fov} scan's body does not overlap the {large} scan after the rigid fit")
    start, stop = box
    crop = tuple(slice(int(a), int(b)) for a, b in zip(start, stop))
    image_a = plain_tensor(image_large)[(slice(None), *crop)].to(torch.float32).clone()
    shift = np.eye(4)
    shift[:3, 3] = start
    aff_crop = aff_large @ shift

    # 2. resample the small scan: crop voxel -> LPS (a) -> LPS (b) -> small voxel
    crop_to_small_voxel = np.linalg.solve(aff_small, large_to_small @ aff_crop)
    small = plain_tensor(image_small)
    small_size = torch.tensor(small.shape[1:], dtype=torch.float64)
    shape = tuple(int(n) for n in stop - start)
    image_b = torch.empty((small.shape[0], *shape), dtype=torch.float32)
    valid_b = torch.empty((1, *shape), dtype=torch.bool)
    rows = max(1, int(chunk_voxels) // max(1, shape[1] * shape[2]))
    for d0 in range(0, shape[0], rows):
        d1 = min(shape[0], d0 + rows)
        axes = [torch.arange(d0, d1, dtype=torch.float64)] + [torch.arange(n, dtype=torch.float64) for n in shape[1:]]
        grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)
        coords = apply_affine(crop_to_small_voxel, grid)
        image_b[:, d0:d1] = sample_at_voxels(small, coords, "bilinear", pad_value)
        valid_b[0, d0:d1] = ((coords >= -1e-6) & (coords <= small_size - 1 + 1e-6)).all(-1)

    body_a = body_mask(image_a, body_threshold)[None]
    return {
        "image_a": _with_affine(image_a, image_large, aff_crop),
        "image_b": _with_affine(image_b, image_large, aff_crop),
        "valid_b": _with_affine(valid_b, image_large, aff_crop),
        "body_a": _with_affine(body_a, image_large, aff_crop),
        "large": large,
        "small": small_fov,
        "crop_start": [int(v) for v in start],
        "crop_stop": [int(v) for v in stop],
        "large_to_small": large_to_small,
    }


def save_registered_pair(pair: Mapping[str, Any], folder: str | os.PathLike) -> dict[str, str]:
    """Write the volumes of :func:`registered_pair` as NIfTI (RAS affines, array axes kept) into ``folder``.

    Returns ``{key: path}`` for :data:`REGISTERED_KEYS` (a datalist entry; masks are written as uint8). Read them back
    with MONAI ``LoadImaged(reader="NibabelReader", ensure_channel_first=True)``.
    """
    import nibabel as nib

    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    paths = {}
    for key in REGISTERED_KEYS:
        value = pair[key]
        affine, space = affine_and_space(value)
        array = plain_tensor(value)[0].cpu().numpy()
        array = array.astype(np.uint8) if array.dtype == bool else array.astype(np.float32)
        path = os.path.join(folder, f"{key}.nii.gz")
        image = nib.Nifti1Image(array, convert_affine(affine, space, "RAS"))
        image.set_qform(image.affine, code=1)
        image.set_sform(image.affine, code=1)
        with atomic_file(path) as tmp:  # a temporary name of its own: two writers of one pair cannot collide
            nib.save(image, tmp)
        paths[key] = path
    return paths


def load_registered_datalist(path: str | os.PathLike, key: str = "registered") -> list[dict]:
    """Entries ``{image_a, image_b, valid_b, body_a, ...}`` of a registered-pairs datalist (JSON ``{key: [...]}``,
    relative paths resolved against the file's folder), checked to exist."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise SAMv2InputError(path, "registered-pairs datalist not found")
    with open(path, encoding="utf-8") as f:
        entries = json.load(f).get(key) or []
    if not entries:
        raise SAMv2InputError(path, f"no {key!r} entries (no registered pair)")
    base = os.path.dirname(os.path.abspath(path))
    out = []
    for entry in entries:
        item = dict(entry)
        for k in REGISTERED_KEYS:
            if k in item:
                item[k] = os.path.normpath(os.path.join(base, item[k]))
                if not os.path.exists(item[k]):
                    raise SAMv2InputError(item[k], f"file not found (listed in {path})")
            elif k != "body_a":
                raise SAMv2InputError(path, f"entry without {k!r}: {entry}")
        out.append(item)
    return out


# --------------------------------------------------------------------------------------------------------------
# the patch transform
# --------------------------------------------------------------------------------------------------------------


class RandRegisteredPatchd(MapTransform, Randomizable):
    """One patch of a registered pair, cut at the same place from every key: the voxel correspondence between
    the ``a`` and ``b`` patches is the identity.

    Input: a dict with ``image_a`` (large-FOV scan, ``(1, D, H, W)`` preprocessed, e.g. CT), ``image_b`` (the
    small-FOV scan already resampled onto that grid, e.g. MR), ``valid_b`` (``(1, D, H, W)`` bool, where ``b`` has
    data) and optionally ``body_a`` (bool), as :func:`registered_pair` makes them.

    Sampling:

    * a seed voxel is drawn inside ``valid_b`` (any voxel when it is empty, with one warning per scan); the patch
      centre is ``seed + U(-1, 1) * max_offset * patch_size`` per axis, so that patches often reach past the
      overlap (the large scan's surroundings supply the loss's FOV negatives), then clamped so that the patch
      stays inside the volume where it fits;
    * light geometric jitter, *shared* by all keys: isotropic scale ``U(scale_range)`` of the voxel size and
      rotation angles ``U(rotate_range)`` about D, H, W (physical, as
      :func:`~samv2_components.transforms.patch_pairs.patch_affine`);
    * images trilinear (outside the volume: ``pad_value``), masks nearest (outside: False);
    * per image key, *independently*: ``intensity_augmentation`` (e.g.
      :func:`~samv2_components.transforms.aggressive_intensity.aggressive_intensity_augmentation`), Gaussian noise
      (``noise_prob``) and blur (``blur_prob``), all drawn from this transform's random state.

    Output: the same keys as patches ``(1, d, h, w)`` (images float32, masks bool; ``MetaTensor`` with affine
    ``volume_affine @ M`` when the input is one) and ``affine_key``: ``M`` (4x4 float64, patch voxel -> volume
    voxel), from which a trainer gets the patch's voxel size.

    Args:
        keys: image keys (augmented independently); default ``("image_a", "image_b")``.
        valid_key: the overlap mask (seeds are drawn in it).
        mask_keys: other masks sampled nearest (e.g. ``"body_a"``), missing ones skipped.
        patch_size: ``(d, h, w)``; default ``(32, 96, 96)``.
        max_offset: largest offset of the centre from the seed, as a fraction of ``patch_size`` (number or 3).
        scale_range: ``(low, high)`` patch voxel size relative to the volume's.
        rotate_range: radians: a number ``r`` (``U(-r, r)`` per axis), 3 numbers or 3 ``(low, high)`` pairs.
        pad_value: image value outside the volume.
        intensity_augmentation: array transform applied to each image patch, independently; None: none.
        noise_prob, noise_std, blur_prob, blur_sigma_range: as in
            :class:`~samv2_components.transforms.patch_pairs.RandPatchPaird` (defaults: off).
        affine_key: output key of ``M``.
        name_key: key of a value naming the sample in messages.
        allow_missing_keys: don't raise for missing image keys.
    """

    def __init__(
        self,
        keys: KeysCollection = ("image_a", "image_b"),
        valid_key: str = "valid_b",
        mask_keys: KeysCollection | None = ("body_a",),
        patch_size: Sequence[int] = (32, 96, 96),
        max_offset: float | Sequence[float] = 0.25,
        scale_range: Sequence[float] = (0.9, 1.1),
        rotate_range: float | Sequence[Any] = float(np.deg2rad(5.0)),
        pad_value: float = -50.0,
        intensity_augmentation: Callable | None = None,
        noise_prob: float = 0.0,
        noise_std: float = 1.0,
        blur_prob: float = 0.0,
        blur_sigma_range: Sequence[float] = (0.25, 2.0),
        affine_key: str = "patch_affine",
        name_key: str | None = None,
        allow_missing_keys: bool = False,
    ):
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.valid_key = valid_key
        self.mask_keys = ensure_tuple(mask_keys) if mask_keys is not None else ()
        self.patch_size = _checked_patch_size(patch_size)
        self.max_offset = _checked_offset(max_offset, "max_offset")
        self.scale_range = _checked_scale_range(scale_range)
        self.rotate_range = _symmetric_ranges(rotate_range, "rotate_range")
        self.pad_value = float(pad_value)
        if intensity_augmentation is not None and not callable(intensity_augmentation):
            raise TypeError(f"intensity_augmentation must be callable or None, got {type(intensity_augmentation)}")
        self.intensity_augmentation = intensity_augmentation
        self.noise_prob, self.blur_prob = float(noise_prob), float(blur_prob)
        self._noise = RandGaussianNoise(prob=self.noise_prob, mean=0.0, std=float(noise_std), sample_std=True)
        sigma = (float(blur_sigma_range[0]), float(blur_sigma_range[1]))
        self._blur = RandGaussianSmooth(sigma_x=sigma, sigma_y=sigma, sigma_z=sigma, prob=self.blur_prob)
        self.affine_key, self.name_key = affine_key, name_key
        self.affine = np.eye(4)
        self._warned: set[str] = set()
        self.set_random_state(state=self.R)

    def set_random_state(
        self, seed: int | None = None, state: np.random.RandomState | None = None
    ) -> RandRegisteredPatchd:
        """Seed this transform; the intensity augmentation (if Randomizable), noise and blur share its state."""
        super().set_random_state(seed=seed, state=state)
        share_random_state(self.intensity_augmentation, self.R)
        self._noise.set_random_state(state=self.R)
        self._blur.set_random_state(state=self.R)
        return self

    def _draw_seed(self, valid: torch.Tensor | None, shape: Sequence[int], source: str) -> np.ndarray:
        numel = int(np.prod(shape))
        flat_index = None
        if valid is not None:
            flat = valid.reshape(-1)
            candidates = self.R.randint(0, numel, size=64)  # cheap rejection sampling first
            hits = flat[torch.from_numpy(candidates)].numpy()
            if hits.any():
                flat_index = int(candidates[int(np.argmax(hits))])
            else:
                inside = torch.nonzero(flat).reshape(-1)
                if inside.numel() > 0:
                    flat_index = int(inside[self.R.randint(0, inside.numel())])
        if flat_index is None:
            if source not in self._warned:
                self._warned.add(source)
                logger.warning("%s: %r is empty; sampling patches anywhere", source, self.valid_key)
            flat_index = int(self.R.randint(0, numel))
        return np.asarray(np.unravel_index(flat_index, tuple(shape)), dtype=np.float64)

    def randomize(
        self, valid: torch.Tensor | None, shape: Sequence[int], spacing: Sequence[float] = (1.0, 1.0, 1.0),
        source: str = "registered pair",
    ) -> None:
        """Draw the patch geometry in a volume of ``shape`` (D, H, W); sets ``self.affine`` (patch -> volume voxel)."""
        size = np.asarray(shape, dtype=np.float64)
        n = np.asarray(self.patch_size, dtype=np.float64)
        scale = self.R.uniform(*self.scale_range)
        angles = self.R.uniform(self.rotate_range[:, 0], self.rotate_range[:, 1])
        linear = patch_affine(np.zeros(3), self.patch_size, scale, rotation_matrix(angles), spacing)[:3, :3]
        seed = self._draw_seed(valid, shape, source)
        centre = seed + self.R.uniform(-1.0, 1.0, size=3) * self.max_offset * n
        half = np.abs(linear) @ ((n - 1.0) / 2.0)
        low, high = half, size - 1.0 - half
        centre = np.where(low <= high, np.clip(centre, low, np.maximum(low, high)), (size - 1.0) / 2.0)
        m = np.eye(4)
        m[:3, :3] = linear
        m[:3, 3] = centre - linear @ ((n - 1.0) / 2.0)
        self.affine = m

    def _augment(self, patch: torch.Tensor) -> torch.Tensor:
        if self.intensity_augmentation is not None:
            augmented = plain_tensor(self.intensity_augmentation(patch)).to(torch.float32)
            if augmented.shape != patch.shape:
                raise ValueError(f"intensity_augmentation changed the patch shape {tuple(patch.shape)}")
            patch = augmented
        if self.noise_prob > 0:
            patch = torch.as_tensor(self._noise(patch), dtype=torch.float32)
        if self.blur_prob > 0:
            patch = torch.as_tensor(self._blur(patch), dtype=torch.float32)
        return patch

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image_keys = list(self.key_iterator(d))
        if not image_keys:
            return d
        first = d[image_keys[0]]
        name = d.get(self.name_key) if self.name_key is not None else None
        meta = getattr(first, "meta", None) or {}
        source = str(name if name is not None else meta.get("filename_or_obj", image_keys[0]))
        volume = plain_tensor(first)
        if volume.ndim != 4:
            raise SAMv2InputError(source, f"expected an image of shape (C, D, H, W), got {tuple(volume.shape)}")
        shape = tuple(volume.shape[1:])
        spacing = (1.0, 1.0, 1.0)
        if isinstance(first, MetaTensor):
            affine = first.affine[0] if first.affine.ndim == 3 else first.affine
            spacing = tuple(float(x) for x in torch.linalg.norm(affine[:3, :3].to(torch.float64), dim=0))
        valid = None
        if self.valid_key in d:
            valid = plain_tensor(d[self.valid_key])
            if tuple(valid.shape) != (1, *shape):
                raise SAMv2InputError(source, f"{self.valid_key!r} has shape {tuple(valid.shape)}, expected (1, *{shape})")
            valid = valid[0] > 0.5 if valid.dtype != torch.bool else valid[0]
        elif not self.allow_missing_keys:
            raise KeyError(f"key {self.valid_key!r} is not in the data; set allow_missing_keys=True to skip it")
        self.randomize(valid, shape, spacing, source)

        sampler = VoxelSampler(apply_affine(self.affine, patch_voxel_grid(self.patch_size)), shape)
        masks = [k for k in (self.valid_key, *self.mask_keys) if k in d]
        for key, mode in [(k, "image") for k in image_keys] + [(k, "mask") for k in masks]:
            value = d[key]
            vol = plain_tensor(value)
            if vol.ndim != 4 or tuple(vol.shape[1:]) != shape:
                raise SAMv2InputError(source, f"{key!r} has shape {tuple(vol.shape)}, the image {tuple(volume.shape)}")
            if mode == "image":
                patch = self._augment(sampler(vol, "bilinear", self.pad_value))
            else:
                patch = sampler(vol.to(torch.float32), "nearest", 0.0) > 0.5
            if isinstance(value, MetaTensor):
                affine = value.affine[0] if value.affine.ndim == 3 else value.affine
                meta = {k: v for k, v in value.meta.items() if k != "affine"}
                patch = MetaTensor(patch, affine=affine.to(torch.float64) @ torch.from_numpy(self.affine), meta=meta)
            d[key] = patch
        d[self.affine_key] = torch.from_numpy(self.affine.copy())
        return d
