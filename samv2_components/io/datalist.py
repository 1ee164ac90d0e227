"""Training datalists (Decathlon style): ``{"training": [{"image": ..., "label": ..., "modality": "ct"}, ...]}``.

Every entry is checked before training starts, so a typo fails in the first second with the file's name instead
of hours into a run: the image exists, the modality is ``ct`` or ``mr``, and a label map (optional) lies on the
image's grid; with ``check_images`` every image is also read in full and must be one finite, non-constant 3D
volume, and every label map integer-valued.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np
import torch

from samv2_components.errors import SAMv2InputError
from samv2_components.modality import check_modality

__all__ = ["LABEL_VOCABULARY", "load_training_datalist", "labels_share_vocabulary"]

#: value of a datalist's ``label_vocabulary`` field when its label maps use the common structure ids of
#: :mod:`samv2_components.io.label_vocabulary` (``scripts/prepare_training_data.py`` writes it)
LABEL_VOCABULARY = "samv2_common"


def labels_share_vocabulary(path: str | os.PathLike) -> bool:
    """Whether a datalist declares its label maps harmonised (``"label_vocabulary": "samv2_common"``): then one
    label id means one structure in every scan and semantic prototypes can be shared across a batch."""
    with open(path, encoding="utf-8") as f:
        return json.load(f).get("label_vocabulary") == LABEL_VOCABULARY


def _header_geometry(path: str) -> tuple[tuple[int, ...], np.ndarray]:
    """Size and LPS direction*spacing/origin of an image, read from its header only (ITK, lazily)."""
    import itk

    reader = itk.ImageFileReader.New(FileName=path) if os.path.isfile(path) else None
    if reader is None:  # DICOM folders: read fully (rare in training lists)
        from samv2_components.io.image import load_scan

        image = load_scan(path, check_intensities=False)
        return tuple(image.shape[1:]), np.asarray(image.affine)
    reader.UpdateOutputInformation()
    info = reader.GetOutput()
    size = tuple(int(s) for s in info.GetLargestPossibleRegion().GetSize())
    direction = np.asarray(info.GetDirection()) * np.asarray(info.GetSpacing())[None, :]
    affine = np.eye(4)
    affine[:3, :3], affine[:3, 3] = direction, np.asarray(info.GetOrigin())
    return size, affine


def load_training_datalist(
    path: str | os.PathLike,
    key: str = "training",
    base_dir: str | None = None,
    check_labels: bool = True,
    check_images: bool = False,
) -> list[dict]:
    """Read and check a datalist; relative paths are resolved against ``base_dir`` (default: the file's folder).

    ``check_images`` reads every image and label map in full (unreadable, 2D, constant or NaN images and
    non-integer label maps are refused); otherwise only headers are read.

    Returns the entries with absolute paths. Raises :class:`SAMv2InputError` naming the file at fault.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise SAMv2InputError(path, "datalist not found")
    try:
        with open(path, encoding="utf-8") as f:
            entries = json.load(f)[key]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise SAMv2InputError(path, f"not a datalist with a {key!r} list ({type(exc).__name__}: {exc})") from exc
    if not isinstance(entries, Sequence) or not entries:
        raise SAMv2InputError(path, f"datalist has no {key!r} entries")
    base = base_dir or os.path.dirname(os.path.abspath(path))
    checked = []
    for i, entry in enumerate(entries):
        where = f"{path} entry {i + 1}"
        if not isinstance(entry, dict) or "image" not in entry:
            raise SAMv2InputError(where, "entry has no 'image'")
        item = dict(entry)
        for k in ("image", "label"):
            if item.get(k):
                item[k] = os.path.normpath(os.path.join(base, item[k]))
                if not os.path.exists(item[k]):
                    raise SAMv2InputError(item[k], f"file not found (listed in {where})")
        item["modality"] = check_modality(item.get("modality"), where)
        if "weight" in item:
            weight = item["weight"]
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not np.isfinite(weight) or weight <= 0:
                raise SAMv2InputError(where, f"'weight' must be a positive number (sampling weight), got {weight!r}")
        if check_labels and item.get("label"):
            image_geom, label_geom = _header_geometry(item["image"]), _header_geometry(item["label"])
            if image_geom[0] != label_geom[0] or not np.allclose(image_geom[1], label_geom[1], atol=1e-3):
                raise SAMv2InputError(
                    item["label"], f"label map is not on the grid of its image {item['image']} (size/affine differ)"
                )
        if check_images:
            _check_voxels(item)
        checked.append(item)
    return checked


def _check_voxels(item: dict) -> None:
    from samv2_components.io.image import load_scan

    load_scan(item["image"])  # raises SAMv2InputError naming the file: unreadable, 2D/4D, NaN, constant
    if item.get("label"):
        label = load_scan(item["label"], check_intensities=False)
        if not bool(torch.equal(label, torch.round(label))):
            raise SAMv2InputError(item["label"], "label map has non-integer values")
