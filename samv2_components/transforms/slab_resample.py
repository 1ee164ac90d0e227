"""Reorientation and resampling of a large scan one slab at a time: ``Orientationd`` + ``Spacingd`` in bounded memory.

A 512 x 512 x 600 CT is 300 MB as int16 but 630 MB as float32, and MONAI's eager ``Orientationd`` and ``Spacingd``
each make a whole-volume copy of it (a flip, then the float32 input of the resampler): 1.9 GB at the peak for an
output of 30 MB on the 2 mm grid. This transform gives the same output grid and the same values while converting
only the input voxels one output slab needs:

1. the output geometry is MONAI's own: ``Orientation`` and ``Spacing`` run *lazily* (``lazy=True``), so they only
   compute the output affine and shape (``peek_pending_affine`` / ``peek_pending_shape``);
2. the output is filled slab by slab along its first axis: for each slab the input voxels it samples (its corners
   mapped through the two affines, plus one voxel for the linear kernel) are cropped, reoriented exactly (a flip
   and a transpose of the small crop, as ``Orientationd`` does to the whole volume), converted to float32 and
   resampled by MONAI's ``SpatialResample`` onto the slab's own affine.

Linear interpolation reads only the 2 x 2 x 2 input voxels around each sample point, and with ``border`` padding a
point beyond the scan takes the value of the scan's outer voxels: a crop that holds every point's neighbours (and
touches the scan's border wherever a point lies beyond it) gives the whole-volume values. Tested against
``Orientationd`` + ``Spacingd`` on a real scan.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Orientation, Spacing, SpatialResample

__all__ = ["SlabResampled"]


def _translation(voxels) -> np.ndarray:
    shift = np.eye(4)
    shift[:3, 3] = voxels
    return shift


class SlabResampled(MapTransform):
    """``Orientationd(axcodes)`` followed by ``Spacingd(pixdim)``, computed slab by slab of the output.

    Args:
        keys: image keys; each a ``MetaTensor`` ``(1, X, Y, Z)`` of any dtype (an int16 CT need not be converted to
            float first: only each slab's input is) with its affine (MONAI: RAS).
        axcodes: output orientation, as ``Orientation`` (e.g. ``"SPL"``).
        pixdim: output voxel size in mm, as ``Spacing``.
        mode: ``"bilinear"`` (trilinear in 3D) or ``"nearest"``.
        padding_mode: as ``Spacing`` (``"border"``: points beyond the scan take its outer voxels' values).
        slab_voxels: output voxels per slab (bounds the float32 input crop to roughly as many voxels times the
            cube of the output-to-input spacing ratio).

    Returns the image as float32 ``MetaTensor`` ``(1, D, H, W)`` with the output affine; the reader's metadata
    (``original_affine``, ``spatial_shape``, file name) is kept.
    """

    def __init__(
        self,
        keys: KeysCollection,
        axcodes: str,
        pixdim: Sequence[float] | float,
        mode: str = "bilinear",
        padding_mode: str = "border",
        slab_voxels: int = 1 << 20,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        if mode not in ("bilinear", "nearest"):
            raise ValueError(f"mode must be 'bilinear' or 'nearest', got {mode!r}")
        self.orientation = Orientation(axcodes=axcodes, labels=None, lazy=True)
        self.spacing = Spacing(pixdim=pixdim, mode=mode, padding_mode=padding_mode, dtype=torch.float32, lazy=True)
        self.resample = SpatialResample(mode=mode, padding_mode=padding_mode, dtype=torch.float32)
        self.slab_voxels = max(1, int(slab_voxels))

    def _resampled(self, image: MetaTensor) -> MetaTensor:
        oriented = self.orientation(image)  # lazy: geometry only, no voxel is touched
        oriented_affine = oriented.peek_pending_affine().double().numpy()
        planned = self.spacing(oriented)
        out_affine = planned.peek_pending_affine().double().numpy()
        out_shape = tuple(int(n) for n in planned.peek_pending_shape())
        # the reorientation is a flip and a transpose of the stored array: oriented axis j is stored axis axes[j],
        # reversed where flips[j]; applied exactly to each crop, as Orientationd does to the whole volume, so two
        # files storing one scan in different axis orders give identical slabs
        stored_from_oriented = np.linalg.solve(image.affine.double().numpy(), oriented_affine)[:3, :3]
        axes = np.abs(stored_from_oriented).argmax(axis=0)
        flips = stored_from_oriented[axes, range(3)] < 0
        stored_shape = np.array(image.shape[1:])
        oriented_shape = stored_shape[axes]
        out_to_oriented = np.linalg.solve(oriented_affine, out_affine)  # output voxel -> oriented input voxel
        source = image.as_tensor()
        out = torch.empty((image.shape[0], *out_shape), dtype=torch.float32)
        step = max(1, self.slab_voxels // max(out_shape[1] * out_shape[2], 1))
        for z0 in range(0, out_shape[0], step):
            z1 = min(z0 + step, out_shape[0])
            corners = np.array([[z, y, x] for z in (z0, z1 - 1) for y in (0, out_shape[1] - 1)
                                for x in (0, out_shape[2] - 1)], dtype=np.float64)
            reach = corners @ out_to_oriented[:3, :3].T + out_to_oriented[:3, 3]  # a slab is a box: corners bound it
            low = np.clip(np.floor(reach.min(0)).astype(int) - 1, 0, oriented_shape - 1)
            high = np.clip(np.ceil(reach.max(0)).astype(int) + 1, 0, oriented_shape - 1)
            crop = self._oriented_crop(source, axes, flips, stored_shape, low, high).float()
            slab = self.resample(
                MetaTensor(crop, affine=torch.as_tensor(oriented_affine @ _translation(low))),
                dst_affine=torch.as_tensor(out_affine @ _translation((z0, 0, 0))),
                spatial_size=(z1 - z0, *out_shape[1:]),
            )
            out[:, z0:z1] = slab.as_tensor()
        meta = {k: v for k, v in image.meta.items() if k != "affine"}
        return MetaTensor(out, affine=torch.as_tensor(out_affine), meta=meta)

    @staticmethod
    def _oriented_crop(source: torch.Tensor, axes, flips, stored_shape, low, high) -> torch.Tensor:
        """Voxels ``low..high`` (inclusive, oriented index space) of the oriented volume, read from the stored
        array ``source`` ``(C, *stored_shape)``: the stored block, transposed and flipped (a small copy)."""
        block = [slice(None)] * 3
        for j in range(3):
            n = int(stored_shape[axes[j]])
            first, last = (n - 1 - int(high[j]), n - 1 - int(low[j])) if flips[j] else (int(low[j]), int(high[j]))
            block[axes[j]] = slice(first, last + 1)
        crop = source[(slice(None), *block)].permute(0, *(1 + int(a) for a in axes))
        flipped = [1 + j for j in range(3) if flips[j]]
        return crop.flip(flipped) if flipped else crop

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self._resampled(d[key])
        return d
