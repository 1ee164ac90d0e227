"""Reading scans: any ITK-readable file (NIfTI, NRRD, MHA, ...) or a DICOM series folder, through MONAI's loader.

Every scan becomes a channel-first ``MetaTensor`` ``(1, X, Y, Z)`` whose ``affine`` is RAS
(``meta["space"] == "RAS"``). Scans are read with MONAI's ``ITKReader`` (MONAI converts ITK's LPS
direction/origin/spacing), except NIfTI files whose header states one unambiguous geometry, which MONAI's
``NibabelReader`` reads to the same array and affine: ITK's Python modules alone add 0.26 GB to a process, a sixth of
the 1.5 GB a large CT may take. Problems become one-line :class:`SAMv2InputError` messages.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import ITKReader, MetaTensor, NibabelReader
from monai.transforms import LoadImage, MapTransform

from samv2_components.errors import SAMv2InputError

__all__ = ["load_scan", "validate_scan", "LoadScand", "plain_tensor", "MIN_VOXELS_PER_AXIS", "MAX_SPACING_MM"]


def plain_tensor(x: Any) -> torch.Tensor:
    """``x`` as a plain ``torch.Tensor``: a MetaTensor's data (same storage, memory layout and autograd graph, no
    copy), a tensor as it is, anything else through NumPy. Per-sample views of a *batched* MetaTensor try to split
    its metadata, and MONAI's ``convert_to_tensor`` would also make the data contiguous (a copy)."""
    if isinstance(x, MetaTensor):
        return x.as_tensor()
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))


_itk_loader_instance: LoadImage | None = None
_nifti_loader_instance: LoadImage | None = None
#: how far (mm, or unitless in the direction cosines) a NIfTI header's sform and qform may differ and still be one
#: geometry that nibabel reads as ITK does
_NIFTI_GEOMETRY_TOLERANCE = 1e-4


def _quiet_loader(reader) -> LoadImage:
    """MONAI's ``LoadImage`` with ``reader``, the file's own data type (dtype None: :func:`load_scan` converts once
    the reader's buffer is gone; a conversion here would hold the buffer, a float32 copy and a contiguous copy of it
    at once). ``LoadImage`` also builds every default reader, and the GPU DICOM one then warns twice that
    nvImageCodec is missing on every run: irrelevant here, so that construction is kept quiet."""
    plugin_logger = logging.getLogger("monai.data.nvimgcodec_pydicom_plugin")
    level = plugin_logger.level
    plugin_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")
            return LoadImage(reader=reader, image_only=True, ensure_channel_first=True, dtype=None)
    finally:
        plugin_logger.setLevel(level)


def _itk_loader() -> LoadImage:
    """The loader with ITK's reader, built once per process."""
    global _itk_loader_instance
    if _itk_loader_instance is None:
        _itk_loader_instance = _quiet_loader(ITKReader())
    return _itk_loader_instance


def _nifti_loader() -> LoadImage:
    """The loader with nibabel's reader (no memory map: the array is read into memory as ITK's is), built once per
    process."""
    global _nifti_loader_instance
    if _nifti_loader_instance is None:
        _nifti_loader_instance = _quiet_loader(NibabelReader(mmap=False))
    return _nifti_loader_instance


def _nifti_geometry_is_unambiguous(path: str) -> bool:
    """Whether ``path`` is a NIfTI file that nibabel and ITK place identically: the sform or the qform (or both,
    agreeing) gives the geometry, it has no shear, and the header's voxel sizes are those of that geometry.
    Elsewhere (no geometry code, a sheared sform, sform and qform that disagree, voxel sizes that MONAI's nibabel
    reader would "correct" by replacing the sform with the qform) the libraries follow different rules, and ITK's
    stays the reference."""
    if not os.path.isfile(path) or not path.lower().endswith((".nii", ".nii.gz")):
        return False
    try:
        import nibabel as nib

        header = nib.load(path).header
        if not isinstance(header, nib.Nifti1Header):  # Nifti2Header derives from it
            return False
        sform_code, qform_code = int(header["sform_code"]), int(header["qform_code"])
        sform = np.asarray(header.get_sform(), dtype=np.float64)
        qform = np.asarray(header.get_qform(), dtype=np.float64)
        zooms = np.asarray(header.get_zooms()[:3], dtype=np.float64)
    except Exception:  # not readable by nibabel: ITK says what is wrong
        return False
    if sform_code <= 0:
        return qform_code > 0
    if qform_code > 0 and not np.allclose(sform, qform, atol=_NIFTI_GEOMETRY_TOLERANCE):
        return False
    linear = sform[:3, :3]
    gram = linear.T @ linear
    tolerance = _NIFTI_GEOMETRY_TOLERANCE * np.diag(gram).max()
    return bool(np.allclose(gram - np.diag(np.diag(gram)), 0.0, atol=tolerance)
                and len(zooms) == 3 and np.allclose(np.sqrt(np.diag(gram)), zooms, atol=_NIFTI_GEOMETRY_TOLERANCE))


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


#: fewest voxels along any axis of a scan (3 x 3 x 3 carries no anatomy to embed)
MIN_VOXELS_PER_AXIS = 4
#: coarsest voxel (mm) a scan may have: the network works on 2 mm voxels and its coarse head on 8-32 mm cells
MAX_SPACING_MM = 20.0


def _file_problem(path: str) -> str | None:
    """What is wrong with a file ITK would read without complaint, or None: a truncated or corrupt gzip stream
    (ITK decodes what it can and fills the rest), a NIfTI file shorter than its header says, a NIfTI header with
    a zero voxel size, or a singular sform orientation (ITK's NIfTI reader then silently falls back to
    other geometry)."""
    if not os.path.isfile(path):
        return None
    if os.path.getsize(path) == 0:
        return "empty file (0 bytes)"
    if path.lower().endswith(".gz"):
        import gzip
        import zlib

        try:
            with gzip.open(path, "rb") as f:
                while f.read(1 << 22):
                    pass
        except gzip.BadGzipFile as exc:
            if "Not a gzipped file" not in str(exc):  # not gzip at all: ITK says what it is not
                return f"truncated or corrupt file ({_short(exc)})"
        except (EOFError, OSError, zlib.error) as exc:
            return f"truncated or corrupt file ({_short(exc)})"
    if not path.lower().endswith(_NIFTI_SUFFIXES):
        return None
    try:
        import nibabel as nib

        nib_logger = logging.getLogger("nibabel.global")  # it prints its header fixes ("setting 0 dims to 1")
        level = nib_logger.level
        nib_logger.setLevel(logging.CRITICAL)  # the problem is reported below, in one line
        try:
            img = nib.load(path)
        finally:
            nib_logger.setLevel(level)
        header = img.header
        zooms = _raw_nifti_pixdim(path)
        zooms = np.asarray(header["pixdim"][1:4], dtype=np.float64) if zooms is None else zooms
        sform = np.asarray(header.get_sform(), dtype=np.float64)
        sform_code = int(header["sform_code"])
        expected = int(header["vox_offset"]) + int(np.prod(img.shape)) * np.dtype(header.get_data_dtype()).itemsize
    except Exception:  # not readable by nibabel: leave the verdict to ITK
        return None
    if not path.lower().endswith(".gz") and os.path.getsize(path) < expected:
        return f"truncated file ({os.path.getsize(path)} bytes, its header needs {expected})"
    if not np.all(np.isfinite(zooms)) or np.any(zooms[: min(3, len(img.shape))] == 0):
        return f"invalid voxel spacing {zooms.tolist()} mm in the NIfTI header (zero)"
    if sform_code > 0:
        det = np.linalg.det(sform[:3, :3]) if np.all(np.isfinite(sform)) else np.nan
        if not np.isfinite(det) or abs(det) < 1e-6:
            return "invalid orientation: the NIfTI sform matrix is singular (no direction for some axis)"
    return None


def _raw_nifti_pixdim(path: str) -> np.ndarray | None:
    """``pixdim[1:4]`` exactly as stored in a NIfTI-1/2 header (nibabel and ITK both replace zeros by 1 on
    reading, which hides the problem), or None if the header is not recognised."""
    import gzip
    import struct

    opener = gzip.open if path.lower().endswith(".gz") else open
    with opener(path, "rb") as f:
        head = f.read(540)
    for order in "<>":
        if len(head) >= 348 and struct.unpack(order + "i", head[:4])[0] == 348:
            return np.asarray(struct.unpack(order + "8f", head[76:108])[1:4], dtype=np.float64)
        if len(head) >= 540 and struct.unpack(order + "i", head[:4])[0] == 540:
            return np.asarray(struct.unpack(order + "8d", head[104:168])[1:4], dtype=np.float64)
    return None


def _check_geometry(image: torch.Tensor, source) -> None:
    spatial = tuple(image.shape[1:4])
    if min(spatial) < MIN_VOXELS_PER_AXIS:
        raise SAMv2InputError(
            source, f"image is too small to embed (size {spatial}; at least {MIN_VOXELS_PER_AXIS} voxels per axis)"
        )
    affine = getattr(image, "affine", None)
    if affine is None:
        return
    linear = np.asarray(affine, dtype=np.float64)[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    if not np.all(np.isfinite(linear)) or abs(np.linalg.det(linear)) < 1e-9:
        raise SAMv2InputError(source, "invalid orientation: the image's direction matrix is singular")
    if spacing.max() > MAX_SPACING_MM:
        raise SAMv2InputError(
            source,
            f"voxels of {np.round(spacing, 2).tolist()} mm are too coarse to embed (at most {MAX_SPACING_MM:g} mm; "
            "the network works on 2 mm voxels)",
        )


def validate_scan(image: torch.Tensor, source: str | os.PathLike | None, check_intensities: bool = True) -> None:
    """Raise :class:`SAMv2InputError` unless ``image`` is one finite, non-constant 3D volume.

    Also refused: fewer than :data:`MIN_VOXELS_PER_AXIS` voxels along an axis, and (for images with an affine)
    a singular direction matrix or voxels coarser than :data:`MAX_SPACING_MM`.

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
    _check_geometry(image, source)
    if not check_intensities:
        return
    # min and max carry any NaN or infinity: no voxel-sized temporaries (a 512 x 512 x 600 CT would need 300 MB more)
    lo, hi = (float(v) for v in torch.aminmax(image.detach()))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        n_bad = sum(int((~torch.isfinite(part)).sum()) for part in image.detach().reshape(-1).split(1 << 24))
        raise SAMv2InputError(source, f"image contains {n_bad} NaN or infinite voxels")
    if lo == hi:
        raise SAMv2InputError(source, f"image is constant (every voxel is {lo:g}); there is nothing to embed")


def load_scan(path: str | os.PathLike, check_intensities: bool = True, float32: bool = True) -> MetaTensor:
    """Load one 3D scan as a channel-first float ``MetaTensor`` ``(1, X, Y, Z)`` with a RAS affine.

    Args:
        path: an image file any ITK ImageIO reads, or a folder holding one DICOM series.
        check_intensities: reject NaN/infinite/constant images (see :func:`validate_scan`).
        float32: convert to float32; False keeps the file's own type (an int16 CT stays half the size until
            :class:`~samv2_components.transforms.SlabResampled` converts it slab by slab).

    Raises:
        SAMv2InputError: missing or unreadable file, not a single 3D volume, or bad intensities.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise SAMv2InputError(path, "file not found")
    if os.path.isdir(path) and not any(os.scandir(path)):
        raise SAMv2InputError(path, "folder is empty (expected a DICOM series)")
    problem = _file_problem(path)
    if problem:
        raise SAMv2InputError(path, problem)
    if check_intensities:
        n_bad = _nifti_nonfinite_count(path)
        if n_bad:
            raise SAMv2InputError(path, f"image contains {n_bad} NaN or infinite voxels")
    loader = _nifti_loader() if _nifti_geometry_is_unambiguous(path) else _itk_loader()
    try:
        image = loader(path)
        if image.dtype == torch.float64:  # nibabel applies a header's scl_slope in float64
            image = image.float()
    except Exception as exc:  # ITK/MONAI raise many types; the user needs the file and the reason
        raise SAMv2InputError(path, f"cannot be read as an image ({_short(exc)})") from exc
    if float32 and image.dtype != torch.float32:
        image = image.float()
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
        float32: see :func:`load_scan` (False: the file's own type, for
            :class:`~samv2_components.transforms.SlabResampled`; an in-memory image is kept as it is).
    """

    def __init__(self, keys: KeysCollection, check_intensities: bool = True, float32: bool = True,
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.check_intensities = check_intensities
        self.float32 = float32

    def _in_memory(self, image: MetaTensor) -> MetaTensor:
        source = str(image.meta.get("filename_or_obj") or "in-memory image")
        if image.ndim == 3:
            image = image[None]
        if self.float32 and not torch.is_floating_point(image):
            image = image.float()
        validate_scan(image, source, check_intensities=self.check_intensities)
        return image

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            value = d[key]
            if isinstance(value, MetaTensor):
                d[key] = self._in_memory(value)
            else:
                d[key] = load_scan(value, check_intensities=self.check_intensities, float32=self.float32)
        return d
