"""Named anatomical landmarks derived from an organ label map, with their definitions (the annotated template).

A landmark is a point with a name and a one-line definition of how it was derived from the label map, so that a
user can tell what "aorta at L1" means on their own scans:

* ``centroid``: the centroid of one structure's voxels (for structures wholly inside the scan);
* ``level``: the centroid of one structure's voxels in the axial slice (or slices) at a given height, the height
  being that of another structure's centroid or of its lowest / highest slice ("the aorta at the level of the L1
  vertebra's centre").

Heights are along the scan's superior axis (the axial slices of an axial scan; the label map must be axial:
one voxel axis along S). Points are world LPS millimetres, like every point in the package.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from samv2_components.errors import SAMv2InputError
from samv2_components.geometry import voxel_to_world

__all__ = ["Landmark", "LandmarkRule", "derive_available_landmarks", "derive_landmarks", "write_landmarks", "read_landmarks"]


@dataclass(frozen=True)
class LandmarkRule:
    """How one landmark is derived from a label map.

    Attributes:
        name: the landmark's name (``aorta_at_L1_centre``).
        structure: the structure whose voxels give the point (a name of the label source).
        level_of: ``None`` for a centroid of the whole structure; else the structure whose height sets the slice.
        level: with ``level_of``: ``"centre"`` (its centroid's height), ``"lowest"`` or ``"highest"`` slice.
    """

    name: str
    structure: str
    level_of: str | None = None
    level: str = "centre"

    def definition(self) -> str:
        if self.level_of is None:
            return f"centroid of the {self.structure} label"
        where = {"centre": "centroid", "lowest": "lowest (most inferior) slice", "highest": "highest (most superior) slice"}
        return f"centroid of the {self.structure} label in the axial slice at the {where[self.level]} of the {self.level_of} label"


@dataclass(frozen=True)
class Landmark:
    """A named point: ``position_lps`` (3,) world LPS mm and its ``definition``."""

    name: str
    position_lps: tuple
    definition: str


def _superior_axis(affine_lps: np.ndarray) -> tuple[int, float]:
    """The voxel axis closest to S and the sign of S along it (+1: index grows upwards). In LPS, +z is superior."""
    s_component = affine_lps[2, :3]
    axis = int(np.argmax(np.abs(s_component)))
    others = np.delete(np.abs(s_component), axis)
    if np.abs(s_component[axis]) < 2.0 * max(others.max(), 1e-9) and others.max() > 1e-6:
        raise SAMv2InputError(None, "the label map is not axial: no voxel axis runs head to foot")
    return axis, float(np.sign(s_component[axis]))


def derive_landmarks(labels: np.ndarray, affine_lps: np.ndarray, names: Mapping[int, str],
                     rules: Sequence[LandmarkRule]) -> list[Landmark]:
    """Apply ``rules`` to an integer label map.

    Args:
        labels: ``(X, Y, Z)`` integer label map (voxel axes as stored).
        affine_lps: 4x4 voxel -> world LPS mm affine of ``labels``.
        names: label id -> structure name.
        rules: the landmarks to derive.

    Raises:
        SAMv2InputError: a rule names a structure absent from the map, or its level slice holds none of it.
    """
    ids = {name: i for i, name in names.items()}
    axis, up = _superior_axis(affine_lps)

    def voxels(structure: str) -> np.ndarray:
        if structure not in ids or not np.any(labels == ids[structure]):
            raise SAMv2InputError(structure, "not in the label map")
        return np.argwhere(labels == ids[structure]).astype(np.float64)

    out = []
    for rule in rules:
        points = voxels(rule.structure)
        if rule.level_of is not None:
            reference = voxels(rule.level_of)[:, axis]
            low, high = (reference.min(), reference.max()) if up > 0 else (reference.max(), reference.min())
            height = {"centre": reference.mean(), "lowest": low, "highest": high}[rule.level]
            points = points[np.abs(points[:, axis] - round(height)) < 0.5]
            if len(points) == 0:
                raise SAMv2InputError(rule.structure, f"no voxel in the slice of rule {rule.name}")
        centre = voxel_to_world(points.mean(0, keepdims=True), affine_lps, affine_space="LPS", world_space="LPS")[0]
        out.append(Landmark(rule.name, tuple(round(float(c), 3) for c in centre), rule.definition()))
    return out


def derive_available_landmarks(labels: np.ndarray, affine_lps: np.ndarray, names: Mapping[int, str],
                               rules: Sequence[LandmarkRule]) -> dict[str, tuple[float, float, float] | None]:
    """:func:`derive_landmarks` rule by rule on another scan's label map (the ground truth of a landmark search):
    ``{rule name: LPS mm point, or None where the map lacks the rule's structure or level}``."""
    out: dict[str, tuple[float, float, float] | None] = {}
    for rule in rules:
        try:
            out[rule.name] = derive_landmarks(labels, affine_lps, names, [rule])[0].position_lps
        except SAMv2InputError:
            out[rule.name] = None
    return out


def write_landmarks(landmarks: Sequence[Landmark], path: str | os.PathLike) -> None:
    """Write a landmarks CSV: ``# coordinate_system: LPS, units: mm`` then ``name,x,y,z,definition`` rows (the points
    reader of :mod:`samv2_components.io.points` reads it; the definition travels as an extra column)."""
    from samv2_components.io.atomic import atomic_file

    with atomic_file(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        f.write("# coordinate_system: LPS, units: mm\n")
        writer = csv.writer(f)
        writer.writerow(["name", "x", "y", "z", "definition"])
        for lm in landmarks:
            writer.writerow([lm.name, *lm.position_lps, lm.definition])


def read_landmarks(path: str | os.PathLike) -> list[Landmark]:
    """Read a landmarks CSV written by :func:`write_landmarks`."""
    rows = []
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if not line.startswith("#")]
    for row in csv.DictReader(lines):
        rows.append(Landmark(row["name"], (float(row["x"]), float(row["y"]), float(row["z"])), row.get("definition", "")))
    return rows
