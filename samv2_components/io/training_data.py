"""Turning a collection of real scans into a training datalist: conversions, harmonised labels, the catalogue.

A :class:`CatalogueScan` says what one scan of a collection is for (``train``, ``held_out`` for evaluation,
``evaluation_only`` for data whose licence forbids shipping weights trained on it, or ``left_out`` with the
reason) and how it must be converted before training. :func:`prepare_catalogue` writes the converted images and
the label maps harmonised to :mod:`~samv2_components.io.label_vocabulary` and returns the datalist entries.

Conversions (each keeps the image's grid, i.e. size, spacing, origin and direction, unless it says otherwise):

* ``unit_range_to_hu``: a CT stored rescaled to [0, 1] gets a linear Hounsfield mapping from two tissues the
  histogram shows: 0 is air (-1000 HU), the strongest peak above 0.15 is soft tissue (:data:`SOFT_TISSUE_HU`).
* ``reverse_posterior``: the array is reversed along the ITK ``j`` (posterior) axis; for a volume stored bottom-up
  (VTK convention) under an identity direction, which puts the face at the back of the head.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from samv2_components.errors import SAMv2InputError
from samv2_components.io.atomic import atomic_file
from samv2_components.io.label_vocabulary import (
    AMOS,
    TOTALSEGMENTATOR_CT,
    TOTALSEGMENTATOR_MR,
    LabelSource,
    aal_source,
    freesurfer_source,
    harmonise_labels,
    slicer_segmentation_source,
)

__all__ = [
    "CatalogueScan",
    "SOFT_TISSUE_HU",
    "ROLES",
    "unit_range_to_hu",
    "reverse_posterior",
    "read_slicer_segments",
    "label_source_for",
    "prepare_catalogue",
    "resample_entries",
]

ROLES = ("train", "held_out", "evaluation_only", "left_out")
#: Hounsfield value given to the soft-tissue histogram peak of a unit-range CT (brain and muscle: 20-50 HU).
SOFT_TISSUE_HU = 40.0
AIR_HU = -1000.0
CONVERSIONS = ("unit_range_to_hu", "reverse_posterior")


@dataclass(frozen=True)
class CatalogueScan:
    """One scan of a collection, paths relative to its root.

    ``label_source`` names the label vocabulary: ``totalsegmentator_ct``, ``totalsegmentator_mr``, ``amos``,
    ``slicer`` (segment names from the ``.seg.nrrd`` header), ``aal:<names file>`` or ``freesurfer:<LUT file>``.
    """

    image: str
    modality: str
    role: str
    licence: str
    label: str | None = None
    label_source: str | None = None
    conversion: str | None = None
    note: str = ""
    weight: float = 1.0

    def __post_init__(self):
        if not self.weight > 0:
            raise ValueError(f"{self.image}: weight must be > 0, got {self.weight!r}")
        if self.role not in ROLES:
            raise ValueError(f"{self.image}: role must be one of {ROLES}, got {self.role!r}")
        if self.conversion not in (None, *CONVERSIONS):
            raise ValueError(f"{self.image}: conversion must be one of {CONVERSIONS}, got {self.conversion!r}")
        if (self.label is None) != (self.label_source is None):
            raise ValueError(f"{self.image}: label and label_source go together")
        if self.role in ("left_out", "held_out", "evaluation_only") and not self.note:
            raise ValueError(f"{self.image}: a {self.role} scan needs a note saying why")


# ---------------------------------------------------------------------------------------------------------------
# conversions (ITK images in, ITK images out, same grid)
# ---------------------------------------------------------------------------------------------------------------


def _with_array(reference, array: np.ndarray):
    import itk

    out = itk.image_from_array(np.ascontiguousarray(array))
    out.CopyInformation(reference)
    return out


def unit_range_to_hu(image, soft_tissue_hu: float = SOFT_TISSUE_HU) -> tuple[object, float, float]:
    """Map a CT stored in [0, 1] to HU: ``hu = AIR_HU + value * (soft_tissue_hu - AIR_HU) / peak``.

    ``peak`` is the histogram mode of the values in (0.15, 0.85) (soft tissue dominates a head or body CT; air
    sits at 0, fat and bone on either side). Returns ``(int16 ITK image clipped to [-1024, 3071], peak, slope)``.
    Raises ValueError if the values are not in [0, 1] or show no peak.
    """
    import itk

    values = itk.array_view_from_image(image).astype(np.float64)
    if values.min() < 0.0 or values.max() > 1.0:
        raise ValueError(f"values span [{values.min():g}, {values.max():g}], not [0, 1]")
    inside = values[(values > 0.15) & (values < 0.85)]
    if inside.size < 1000:
        raise ValueError("no soft-tissue histogram peak in (0.15, 0.85)")
    counts, edges = np.histogram(inside, bins=140, range=(0.15, 0.85))
    peak = float(0.5 * (edges[np.argmax(counts)] + edges[np.argmax(counts) + 1]))
    slope = (soft_tissue_hu - AIR_HU) / peak
    hu = np.clip(np.rint(AIR_HU + values * slope), -1024, 3071).astype(np.int16)
    return _with_array(image, hu), peak, slope


def reverse_posterior(image):
    """The same grid with the array reversed along ITK's ``j`` axis (numpy axis 1 of ``[k, j, i]``)."""
    import itk

    return _with_array(image, itk.array_view_from_image(image)[:, ::-1, :].copy())


def read_slicer_segments(image) -> dict[int, str]:
    """``{label value: segment name}`` of a 3D Slicer ``.seg.nrrd`` read by ITK (one layer only)."""
    meta = image.GetMetaDataDictionary()
    keys = set(meta.GetKeys())
    segments, layers = {}, set()
    k = 0
    while f"Segment{k}_Name" in keys:
        value = int(meta[f"Segment{k}_LabelValue"]) if f"Segment{k}_LabelValue" in keys else k + 1
        layers.add(meta[f"Segment{k}_Layer"] if f"Segment{k}_Layer" in keys else "0")
        segments[value] = str(meta[f"Segment{k}_Name"])
        k += 1
    if not segments:
        raise ValueError("no Segment<k>_Name entries: not a 3D Slicer segmentation")
    if len(layers) > 1:
        raise ValueError(f"{len(layers)} layers (overlapping segments) cannot become one label map")
    return segments


def label_source_for(spec: str, data_root: str, label_image=None) -> LabelSource:
    """The :class:`LabelSource` named by a catalogue ``label_source`` string (files relative to ``data_root``)."""
    fixed = {s.name: s for s in (TOTALSEGMENTATOR_CT, TOTALSEGMENTATOR_MR, AMOS)}
    if spec in fixed:
        return fixed[spec]
    kind, _, path = spec.partition(":")
    if kind == "slicer":
        if label_image is None:
            raise ValueError("a slicer label source needs the segmentation image")
        return slicer_segmentation_source(read_slicer_segments(label_image))
    if kind == "aal":
        return aal_source(os.path.join(data_root, path))
    if kind == "freesurfer":
        import itk

        ids = np.unique(itk.array_view_from_image(label_image)) if label_image is not None else None
        return freesurfer_source(os.path.join(data_root, path), ids=ids)
    raise ValueError(f"unknown label source {spec!r}")


def _stem(path: str) -> str:
    name = os.path.basename(path.rstrip("/"))
    for ext in (".seg.nrrd", ".nii.gz", ".nrrd", ".nii", ".mha", ".mhd"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def _write(image, path: str) -> None:
    import itk

    with atomic_file(path) as tmp:
        itk.imwrite(image, tmp, compression=True)


def prepare_catalogue(
    catalogue: Sequence[CatalogueScan], data_root: str, output_dir: str, roles: Iterable[str] = ("train",)
) -> tuple[list[dict], list[dict]]:
    """Convert and harmonise the scans of ``roles``; return ``(datalist entries, report rows)``.

    Images without a conversion are referenced in place; converted images go to ``<output_dir>/images/`` and
    every label map, harmonised to the common vocabulary (int16), to ``<output_dir>/labels/``. A report row
    (``image``, ``modality``, ``role``, ``licence``, ``label``, ``conversion``, ``note``, ``classes``) is returned
    for *every* catalogue scan, so the docs can list what was used and why the rest was not.

    Raises:
        SAMv2InputError: a listed file is missing, unreadable, or its label map is not on the image's grid.
    """
    import itk

    roles = set(roles)
    entries, report = [], []
    for scan in catalogue:
        row = {"image": scan.image, "modality": scan.modality, "role": scan.role, "licence": scan.licence, "weight": scan.weight,
               "label": scan.label or "", "conversion": scan.conversion or "", "note": scan.note, "classes": ""}
        report.append(row)
        if scan.role not in roles:
            continue
        image_path = os.path.join(data_root, scan.image)
        if not os.path.exists(image_path):
            raise SAMv2InputError(image_path, "file not found (listed in the training catalogue)")
        entry = {"image": image_path, "modality": scan.modality, "weight": scan.weight}
        if scan.conversion:
            try:
                image = itk.imread(image_path)
                if scan.conversion == "unit_range_to_hu":
                    image, peak, slope = unit_range_to_hu(image)
                    row["conversion"] = f"unit_range_to_hu (soft-tissue peak {peak:.3f} -> {SOFT_TISSUE_HU:g} HU, {slope:.0f} HU per unit)"
                else:
                    image = reverse_posterior(image)
            except (RuntimeError, ValueError) as exc:
                raise SAMv2InputError(image_path, f"cannot convert ({scan.conversion}): {exc}") from exc
            entry["image"] = os.path.join(output_dir, "images", _stem(scan.image) + ".nii.gz")
            _write(image, entry["image"])
        if scan.label:
            label_path = os.path.join(data_root, scan.label)
            try:
                label = itk.imread(label_path)
                source = label_source_for(scan.label_source, data_root, label)
            except (RuntimeError, ValueError, OSError) as exc:
                raise SAMv2InputError(label_path, f"cannot read the label map ({exc})") from exc
            labels = itk.array_view_from_image(label)
            if labels.dtype.kind not in "iu":
                raise SAMv2InputError(label_path, f"label map has non-integer voxels ({labels.dtype})")
            harmonised = harmonise_labels(labels, source)
            if scan.conversion == "reverse_posterior":
                harmonised = harmonised[:, ::-1, :]
            entry["label"] = os.path.join(output_dir, "labels", _stem(scan.label) + "_labels.nii.gz")
            _write(_with_array(label, harmonised), entry["label"])
            present = [int(k) for k in np.unique(labels) if k]
            row["classes"] = f"{len(present)} ({source.name})"
        entries.append(entry)
    return entries, report


def resample_entries(entries: Sequence[dict], output_dir: str, spacing_mm: float = 2.0) -> list[dict]:
    """Copies of the datalist's scans resampled to ``spacing_mm`` isotropic (linear; labels nearest), stored as
    int16 NIfTI in ``output_dir`` (``images/``, ``labels/``), with entries whose paths are relative to it.

    The training preprocessing resamples to 2 mm anyway, so a 2 mm copy trains identically (up to one more
    interpolation) and is small enough to travel to another machine (the 23 shared training scans: a few tens of
    MB). Intensities are rounded to integers (CT in HU, MR in its own units; percentiles normalise MR later).
    """
    import nibabel as nib
    from monai.transforms import Spacingd

    from samv2_components.io.image import LoadScand

    load_image, load_label = LoadScand("image"), LoadScand("label", check_intensities=False, allow_missing_keys=True)
    spacing = Spacingd(["image", "label"], pixdim=spacing_mm, mode=["bilinear", "nearest"], padding_mode="border",
                       allow_missing_keys=True)
    out, names = [], set()
    for entry in entries:
        data = spacing(load_label(load_image({k: entry[k] for k in ("image", "label") if k in entry})))
        stem = _stem(entry["image"])
        while stem in names:  # two scans with one file name
            stem += "_"
        names.add(stem)
        item = {k: v for k, v in entry.items() if k not in ("image", "label")}
        for key, folder in (("image", "images"), ("label", "labels")):
            if key not in data:
                continue
            volume = data[key]
            array = np.clip(np.rint(volume[0].cpu().numpy()), -32768, 32767).astype(np.int16)
            relative = os.path.join(folder, f"{stem}.nii.gz")
            path = os.path.join(output_dir, relative)
            with atomic_file(path) as tmp:
                nib.save(nib.Nifti1Image(array, np.asarray(volume.affine, dtype=np.float64)), tmp)
            item[key] = relative
        out.append(item)
    return out
