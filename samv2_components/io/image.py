"""Reading scans: any ITK-readable file (NIfTI, NRRD, MHA, ...) or a DICOM series folder, through MONAI's loader.

Every scan is loaded with MONAI's ``ITKReader`` so that all formats share one geometry path: the result is a
channel-first ``MetaTensor`` ``(1, X, Y, Z)`` whose ``affine`` is RAS (``meta["space"] == "RAS"``), converted by
MONAI from ITK's LPS direction/origin/spacing. Problems become one-line :class:`SAMv2InputError` messages.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import ITKReader, MetaTensor
from monai.transforms import LoadImage, MapTransform

from samv2_components.errors import SAMv2InputError

__all__ = ["load_scan", "validate_scan", "LoadScand"]


def _short(exc: BaseException) -> str:
    """First line of an exception message: ITK errors span many lines."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip()


_NIFTI_SUFFIXES = (".nii", ".nii.gz", ".hdr", ".img", ".hdr.gz", ".img.gz")


def _nifti_nonfinite_count(path: str) -> int:
    """Number of NaN/infinite voxels stored in a floating-point NIfTI/Analyze file (0 for any other file).

    ITK reads NIfTI through the NIfTI C library, which silently replaces every NaN or infinite float by 0 on
    reading; so the loaded array cannot show them and the file itself is checked here, with nibabel.
    """
    if not os.path.isfile(path) or not path.lower().endswith(_NIFTI_SUFFIXES):
        return 0
    try:
        import nibabel as nib

        img = nib.load(path)
        if np.dtype(img.get_data_dtype()).kind not in "fc":
            return 0  # integer voxels (even scaled by finite scl_slope/scl_inter) are always finite
        data = np.asanyarray(img.dataobj)
    except Exception:  # not readable by nibabel: leave the verdict to ITK
        return 0
    return int(data.size - np.count_nonzero(np.isfinite(data)))


def validate_scan(image: torch.Tensor, source: str | os.PathLike | None, check_intensities: bool = True) -> None:
    """Raise :class:`SAMv2InputError` unless ``image`` is one finite, non-constant 3D volume.

    Args:
        image: channel-first tensor ``(C, *spatial)`` as produced by :func:`load_scan`.
        source: file name used in the message.
        check_intensities: also reject NaN/infinite voxels and constant images (off for label maps).
    """
    spatial = tuple(image.shape[1:])
    if image.ndim - 1 < 3 or (image.ndim - 1 == 3 and min(spatial) == 1):
        raise SAMv2InputError(source, f"image is 2D (size {spatial}); SAMv2 needs a 3D volume")
    if image.ndim - 1 > 3 or image.shape[0] != 1:
        n = image.shape[0] if image.ndim - 1 == 3 else spatial[3:]
        raise SAMv2InputError(
            source, f"image is 4D or multi-channel (size {tuple(image.shape)}, extra dimension {n}); give one 3D volume"
        )
    if image.numel() == 0:
        raise SAMv2InputError(source, "image is empty (no voxels)")
    if not check_intensities:
        return
    finite = torch.isfinite(image)
    if not bool(finite.all()):
        raise SAMv2InputError(source, f"image contains {int((~finite).sum())} NaN or infinite voxels")
    lo, hi = float(image.min()), float(image.max())
    if lo == hi:
        raise SAMv2InputError(source, f"image is constant (every voxel is {lo:g}); there is nothing to embed")


def load_scan(path: str | os.PathLike, check_intensities: bool = True) -> MetaTensor:
    """Load one 3D scan as a channel-first float ``MetaTensor`` ``(1, X, Y, Z)`` with a RAS affine.

    Args:
        path: an image file any ITK ImageIO reads, or a folder holding one DICOM series.
        check_intensities: reject NaN/infinite/constant images (see :func:`validate_scan`).

    Raises:
        SAMv2InputError: missing or unreadable file, not a single 3D volume, or bad intensities.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise SAMv2InputError(path, "file not found")
    if os.path.isdir(path) and not any(os.scandir(path)):
        raise SAMv2InputError(path, "folder is empty (expected a DICOM series)")
    if check_intensities:
        n_bad = _nifti_nonfinite_count(path)
        if n_bad:
            raise SAMv2InputError(path, f"image contains {n_bad} NaN or infinite voxels")
    loader = LoadImage(reader=ITKReader(), image_only=True, ensure_channel_first=True, dtype=torch.float32)
    try:
        image = loader(path)
    except Exception as exc:  # ITK/MONAI raise many types; the user needs the file and the reason
        raise SAMv2InputError(path, f"cannot be read as an image ({_short(exc)})") from exc
    validate_scan(image, path, check_intensities=check_intensities)
    return image


class LoadScand(MapTransform):
    """Dictionary version of :func:`load_scan`: replaces each path under ``keys`` by the loaded ``MetaTensor``.

    A value that is already an image in memory (a ``MetaTensor`` with its affine, as MONAI Deploy's operators and
    MONAI's ``LoadImaged`` produce) is checked the same way and kept; a channel axis is added to a 3D array
    ``(X, Y, Z)`` so that the result is always ``(1, X, Y, Z)``.

    Args:
        keys: keys holding file paths or in-memory images.
        check_intensities: see :func:`validate_scan` (set False for label maps).
    """

    def __init__(self, keys: KeysCollection, check_intensities: bool = True, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.check_intensities = check_intensities

    def _in_memory(self, image: MetaTensor) -> MetaTensor:
        source = str(image.meta.get("filename_or_obj") or "in-memory image")
        if image.ndim == 3:
            image = image[None]
        image = image.float() if not torch.is_floating_point(image) else image
        validate_scan(image, source, check_intensities=self.check_intensities)
        return image

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            value = d[key]
            if isinstance(value, MetaTensor):
                d[key] = self._in_memory(value)
            else:
                d[key] = load_scan(value, check_intensities=self.check_intensities)
        return d
