"""Writing embedding maps: one NIfTI per head, each with the affine of its own grid, plus a preview and a
JSON summary. A case's files are written into a temporary folder and moved into place at the end, so a failure
never leaves a half-written result.

The writer takes plain data: each head's grid (stride and offset in input voxels) is read off its affine relative
to the input's (or given as ``head_grids``), so file writing needs neither the network nor the QC pictures.
"""

from __future__ import annotations

import json
import os
from collections.abc import Hashable, Mapping
from typing import Any

import nibabel as nib
import numpy as np
from monai.config import KeysCollection
from monai.data import MetaTensor, NibabelWriter
from monai.transforms import MapTransform
from monai.utils import convert_data_type

from samv2_components.geometry import affine_and_space, convert_affine, strided_grid_of
from samv2_components.io.atomic import atomic_directory
from samv2_components.io.embedding_preview import embedding_preview

__all__ = ["write_embedding_case", "SaveEmbeddingsd", "SliceWiseNibabelWriter", "case_name"]


def case_name(path: str | os.PathLike) -> str:
    """Output folder name of an input scan: its file name without image extensions (or the DICOM folder name)."""
    name = os.path.basename(os.path.normpath(os.fspath(path)))
    for ext in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".dcm", ".gz"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


class SliceWiseNibabelWriter(NibabelWriter):
    """MONAI's :class:`~monai.data.NibabelWriter` that converts to ``output_dtype`` while writing, one slice at a
    time (nibabel's array writer does this when the header's type differs from the array's), instead of converting
    the whole array first: a float16 map written as float32 NIfTI (which has no float16 type) no longer needs a
    float32 copy of itself (0.6 GB for a large CT's fine head). The file's content is the same.

    ``set_metadata(..., resample=False)`` only records the affine: MONAI's passes the array through
    ``SpatialResample`` even then, which returns a float32 copy."""

    def set_metadata(self, meta_dict, resample: bool = True, **options):
        if resample:
            return super().set_metadata(meta_dict, resample=resample, **options)
        self.affine = self.get_meta_info(meta_dict)[1]
        return None

    @classmethod
    def create_backend_obj(cls, data_array, affine=None, dtype=None, **kwargs):
        array = convert_data_type(data_array, np.ndarray)[0]
        header = kwargs.pop("header", None)
        header = nib.Nifti1Header() if header is None else header
        header.set_data_dtype(np.dtype(dtype) if dtype is not None else array.dtype)
        return super().create_backend_obj(array, affine=affine, dtype=None, header=header, **kwargs)


def _lps_affine(image: MetaTensor) -> list[list[float]]:
    affine, space = affine_and_space(image)
    return convert_affine(affine, space, "LPS").tolist()


def _head_grid(emb: MetaTensor, image: MetaTensor) -> tuple[tuple, tuple]:
    """``(stride, offset)`` of a head's grid in input voxels, from the two affines."""
    (emb_affine, emb_space), (image_affine, image_space) = affine_and_space(emb), affine_and_space(image)
    return strided_grid_of(convert_affine(image_affine, image_space, "LPS"), convert_affine(emb_affine, emb_space, "LPS"))


def write_embedding_case(
    heads: Mapping[str, MetaTensor],
    image: MetaTensor,
    output_dir: str | os.PathLike,
    name: str,
    output_ext: str = ".nii",
    preview: bool = True,
    info: Mapping[str, Any] | None = None,
    head_grids: Mapping[str, tuple] | None = None,
) -> str:
    """Write ``<output_dir>/<name>/`` with ``<head>.nii[.gz]``, ``preview.png`` and ``embeddings.json``.

    Args:
        heads: ``{head: (C, d, h, w) MetaTensor}`` with each grid's affine (channel-first, un-batched).
        image: the preprocessed input ``(1, D, H, W)`` (for the preview and the summary).
        output_dir: parent folder; created if needed.
        name: case folder name.
        output_ext: ``".nii"`` (fast, default) or ``".nii.gz"``.
        preview: also write the PCA-RGB ``preview.png``.
        info: extra entries for ``embeddings.json`` (model, modality, weights, ...).
        head_grids: ``{head: (stride, offset)}`` in input voxels (like the network's ``HEAD_GRIDS``); by default
            read off each head's affine relative to ``image``'s.

    Returns the case folder path. An existing case folder is replaced only once the new one is complete.
    """
    with atomic_directory(output_dir, name) as tmp:
        summary: dict[str, Any] = {
            "input": str(image.meta.get("filename_or_obj", "")),
            "coordinate_system": "LPS",
            "affine_convention": "4x4 voxel index (array axis order i, j, k) -> world mm; voxel centres",
            "input_grid": {"shape": list(image.shape[1:]), "affine_lps": _lps_affine(image)},
            "heads": {},
            **(dict(info) if info else {}),
        }
        writer = SliceWiseNibabelWriter()
        grids = {h: tuple(head_grids[h]) if head_grids is not None else _head_grid(e, image) for h, e in heads.items()}
        for head, emb in heads.items():
            affine, _ = affine_and_space(emb)
            file = f"{head}{output_ext}"
            writer.set_data_array(emb, channel_dim=0)
            # the array's own affine is written as is (no resampling to the input's)
            writer.set_metadata({"affine": affine, "original_affine": affine}, resample=False)
            writer.write(os.path.join(tmp, file), verbose=False)
            stride, offset = grids[head]
            summary["heads"][head] = {
                "file": file,
                "channels": int(emb.shape[0]),
                "shape": list(emb.shape[1:]),
                "affine_lps": _lps_affine(emb),
                "stride_in_input_voxels": list(stride),
                "offset_in_input_voxels": list(offset),
            }
        if preview:
            strides = {h: grids[h][0] for h in heads}
            embedding_preview(image[0].as_tensor(), {h: e.as_tensor() for h, e in heads.items()}, strides, os.path.join(tmp, "preview.png"))
        with open(os.path.join(tmp, "embeddings.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
    return os.path.join(output_dir, name)


class SaveEmbeddingsd(MapTransform):
    """Post-processing transform: write the embeddings under ``pred_key`` of each (decollated) item.

    Args:
        keys: the image key (the preprocessed input, used for the case name, preview and summary).
        pred_key: key of the ``{head: MetaTensor}`` dict produced by :class:`~samv2_components.inference.SAMv2Inferer`.
        output_dir: parent folder of the case folders.
        output_ext: ``".nii"`` or ``".nii.gz"``.
        preview: write ``preview.png``.
        info: extra entries for every ``embeddings.json``.
        head_grids: ``{head: (stride, offset)}`` in input voxels; by default read off the affines (see
            :func:`write_embedding_case`).
    """

    def __init__(
        self,
        keys: KeysCollection,
        output_dir: str,
        pred_key: str = "pred",
        output_ext: str = ".nii",
        preview: bool = True,
        info: Mapping[str, Any] | None = None,
        head_grids: Mapping[str, tuple] | None = None,
    ):
        super().__init__(keys)
        self.output_dir, self.pred_key, self.output_ext = output_dir, pred_key, output_ext
        self.preview, self.info = preview, dict(info or {})
        self.head_grids = None if head_grids is None else dict(head_grids)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            source = image.meta.get("filename_or_obj", "scan")
            info = {**self.info, **({"modality": d["modality"]} if "modality" in d else {})}
            d["output_path"] = write_embedding_case(
                d[self.pred_key], image, self.output_dir, case_name(source), self.output_ext, self.preview, info,
                head_grids=self.head_grids,
            )
        return d
