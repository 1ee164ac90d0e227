"""Reading and writing ground-truth point pairs (template point -> query point) for lesion tracking / landmarks.

A pairs file lists, per named point, its position in the **template** image and the corresponding position in
the **query** image, both in physical **millimetres** in one coordinate system (**LPS** by default, or **RAS**),
and optionally the lesion radius used by CPM@Radius (:func:`samv2_components.metrics.cpm_at_radius`)::

    # coordinate_system: LPS, units: mm
    name,template_x,template_y,template_z,query_x,query_y,query_z,radius_mm
    lesion_1,-12.5,40.0,101.25,-10.0,38.5,99.0,6.5

* Extension ``.csv`` only. The comment line is optional, as in :mod:`samv2_components.io.points` (whose parser
  it uses): without it the file is taken to be in the ``coordinate_system`` argument of
  :func:`read_point_pairs` if given, else LPS.
* The ``radius_mm`` column is optional; when it is present every row needs a positive finite radius (mm).
  Without it :attr:`PointPairs.radii_mm` is ``None``. Other columns are not allowed (a misspelt
  ``radius_mm`` would otherwise be dropped silently). Blank lines are skipped.
* At least one pair; names are unique.

Every problem with a file raises :class:`~samv2_components.errors.SAMv2InputError` naming the file, in one line.
Writes are atomic (the helper of :mod:`samv2_components.io.points`).
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

from samv2_components.errors import SAMv2InputError
from samv2_components.geometry import check_coordinate_system
from samv2_components.io.points import (
    _UNITS,
    PointSet,
    _atomic_write,
    _csv_comment_system,
    _csv_xyz,
    _PathLike,
    _point_set,
)

__all__ = ["PointPairs", "read_point_pairs", "write_point_pairs", "is_point_pairs_file", "POINT_PAIRS_COLUMNS"]

POINT_PAIRS_COLUMNS = ("name", "template_x", "template_y", "template_z", "query_x", "query_y", "query_z")
_RADIUS = "radius_mm"


def _checked_radii(source, radii, n: int) -> np.ndarray | None:
    if radii is None:
        return None
    arr = np.array(radii, dtype=np.float64)  # a copy
    if arr.shape != (n,):
        raise SAMv2InputError(source, f"radii_mm must have shape ({n},), one radius per pair, got {arr.shape}")
    bad = ~(np.isfinite(arr) & (arr > 0))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise SAMv2InputError(source, f"radius of pair {i + 1} must be a positive number of mm, got {arr[i]!r}")
    return arr


@dataclass
class PointPairs:
    """Corresponding named points in a template and a query image, with optional per-pair radii.

    Args:
        template: the template points, ``(N, 3)`` mm.
        query: the corresponding query points, ``(N, 3)`` mm, with the same names in the same order. If its
            coordinate system differs from the template's it is converted to it, so both always share one.
        radii_mm: ``None`` or ``(N,)`` float64 positive finite radii in mm (e.g. lesion radius, for CPM@Radius).

    Raises :class:`SAMv2InputError` (without a file) when the parts do not fit together.
    """

    template: PointSet
    query: PointSet
    radii_mm: np.ndarray | None = None

    def __post_init__(self) -> None:
        for value, label in ((self.template, "template"), (self.query, "query")):
            if not isinstance(value, PointSet):
                raise TypeError(f"{label} must be a PointSet, got {type(value).__name__}")
        if list(self.template.names) != list(self.query.names):
            raise SAMv2InputError(None, "template and query points must have the same names in the same order")
        if self.query.coordinate_system != self.template.coordinate_system:
            self.query = self.query.to(self.template.coordinate_system)
        self.radii_mm = _checked_radii(None, self.radii_mm, len(self.template))

    def __len__(self) -> int:
        return len(self.template)

    @property
    def names(self) -> list[str]:
        """The pair names, in file order."""
        return list(self.template.names)

    @property
    def coordinate_system(self) -> str:
        """``"LPS"`` or ``"RAS"``, shared by template and query."""
        return self.template.coordinate_system

    def to(self, coordinate_system: str) -> PointPairs:
        """Return a copy with both point sets converted to ``coordinate_system`` (radii are unchanged)."""
        radii = None if self.radii_mm is None else self.radii_mm.copy()
        return PointPairs(self.template.to(coordinate_system), self.query.to(coordinate_system), radii)


# ----------------------------------------------------------------------------------------------------------------
# reading


def _check_extension(path: Path) -> None:
    if not path.name.lower().endswith(".csv"):
        raise SAMv2InputError(path, f"unknown point-pairs file extension {path.suffix!r}; expected .csv")


def _split_header(path: _PathLike, default_system: str) -> tuple[str, int, list[str]]:
    """Return ``(coordinate system, number of comment lines, remaining lines)`` of a CSV file."""
    with open(path, encoding="utf-8-sig", newline="") as f:  # -sig: tolerate the BOM spreadsheets write
        lines = f.read().splitlines(keepends=True)
    if lines and lines[0].lstrip().startswith("#"):
        return _csv_comment_system(path, lines[0]), 1, lines[1:]
    return default_system, 0, lines


def _parse_radius(path: _PathLike, where: str, text: str) -> float:
    text = text.strip()
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise SAMv2InputError(path, f"{where}: {_RADIUS} value {text!r} is not a positive number of mm")
    return value


def _read_pairs_csv(path: Path, default_system: str) -> PointPairs:
    system, offset, lines = _split_header(path, default_system)
    reader = csv.reader(lines)
    header = next((row for row in reader if row), None)
    if header is None:
        raise SAMv2InputError(path, f"no header line '{','.join(POINT_PAIRS_COLUMNS)}' and no point pairs")
    header = [h.strip() for h in header]
    missing = [c for c in POINT_PAIRS_COLUMNS if c not in header]
    if missing:
        raise SAMv2InputError(path, f"missing columns: {', '.join(missing)} (found: {', '.join(header)})")
    duplicated = sorted({h for h in header if header.count(h) > 1})
    if duplicated:
        raise SAMv2InputError(path, f"duplicate columns: {', '.join(duplicated)}")
    unknown = [h for h in header if h not in (*POINT_PAIRS_COLUMNS, _RADIUS)]
    if unknown:
        raise SAMv2InputError(path, f"unexpected columns: {', '.join(unknown)} (only {_RADIUS} is optional)")
    with_radius = _RADIUS in header
    names, template, query, radii = [], [], [], []
    for row in reader:
        if not any(cell.strip() for cell in row):
            continue  # blank lines carry no pair
        where = f"line {reader.line_num + offset}"  # counted from the file's first line
        if len(row) != len(header):
            raise SAMv2InputError(path, f"{where}: expected {len(header)} values, found {len(row)}")
        cells = dict(zip(header, row))
        names.append(cells["name"].strip())
        for side, coords in (("template", template), ("query", query)):
            coords.append(_csv_xyz(path, f"{where} ({side})", {a: cells[f"{side}_{a}"] for a in "xyz"}))
        if with_radius:
            radii.append(_parse_radius(path, where, cells[_RADIUS]))
    if not names:
        raise SAMv2InputError(path, "no point pairs in file")
    try:
        return PointPairs(
            _point_set(path, names, template, system, {}),
            _point_set(path, names, query, system, {}),
            radii if with_radius else None,
        )
    except SAMv2InputError as e:
        raise SAMv2InputError(path, e.problem) from None


def is_point_pairs_file(path: _PathLike) -> bool:
    """Whether ``path`` is a ``.csv`` file whose header has point-pair columns (``template_x`` or ``query_x``).

    A cheap check to choose between :func:`read_point_pairs` and
    :func:`~samv2_components.io.points.read_points`; it never raises (an unreadable file gives ``False``, and
    the reader then reports the problem).
    """
    path = Path(path)
    if not path.name.lower().endswith(".csv") or not path.is_file():
        return False
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            for line in f:
                if line.strip() and not line.lstrip().startswith("#"):
                    header = {h.strip() for h in next(csv.reader([line]))}
                    return bool(header & {"template_x", "query_x"})
    except (OSError, UnicodeDecodeError, csv.Error):
        return False
    return False


def read_point_pairs(path: _PathLike, coordinate_system: str | None = None) -> PointPairs:
    """Read a ground-truth point-pairs ``.csv`` file (format in the module docstring).

    Args:
        path: the pairs file.
        coordinate_system: ``"LPS"`` or ``"RAS"``. When given, the result is converted to it; it is also the
            system assumed for a file without the comment line (LPS otherwise). ``None`` returns the points in
            the file's own system.

    Returns:
        :class:`PointPairs` with ``N >= 1`` pairs, coordinates ``(N, 3)`` in mm; ``radii_mm`` is ``(N,)`` mm or
        ``None`` when the file has no ``radius_mm`` column.

    Raises:
        SAMv2InputError: the file is missing, not ``.csv``, empty, lacks or repeats columns, has a non-numeric
            coordinate, a duplicate or empty name, or a missing / non-positive radius.
    """
    path = Path(path)
    _check_extension(path)
    target = None if coordinate_system is None else check_coordinate_system(coordinate_system)
    if not path.is_file():
        raise SAMv2InputError(path, "point-pairs file does not exist")
    try:
        pairs = _read_pairs_csv(path, target or "LPS")
    except UnicodeDecodeError:
        raise SAMv2InputError(path, "not a UTF-8 text file") from None
    except csv.Error as e:
        raise SAMv2InputError(path, f"not a valid CSV file ({e})") from None
    return pairs if target is None else pairs.to(target)


# ----------------------------------------------------------------------------------------------------------------
# writing


def _write_pairs_csv(pairs: PointPairs, f: IO[str]) -> None:
    f.write(f"# coordinate_system: {pairs.coordinate_system}, units: {_UNITS}\n")
    writer = csv.writer(f, lineterminator="\n")
    with_radius = pairs.radii_mm is not None
    writer.writerow([*POINT_PAIRS_COLUMNS, *([_RADIUS] if with_radius else [])])
    for i, name in enumerate(pairs.names):
        values = [*pairs.template.coords[i], *pairs.query.coords[i], *([pairs.radii_mm[i]] if with_radius else [])]
        writer.writerow([name, *(repr(float(v)) for v in values)])  # repr: shortest text that reads back exactly


def write_point_pairs(pairs: PointPairs, path: _PathLike, coordinate_system: str | None = None) -> None:
    """Write ``pairs`` to a ``.csv`` pairs file (format in the module docstring), creating its parent directory.

    Args:
        pairs: the pairs to write (``extra`` columns of its point sets are not written).
        path: the target ``.csv`` file.
        coordinate_system: ``"LPS"`` or ``"RAS"`` to write in (the file records it); ``None`` keeps the pairs'.

    The write is atomic: on failure an existing file at ``path`` is left unchanged and no partial file remains.

    Raises:
        SAMv2InputError: the extension is not ``.csv``, or there are no pairs.
    """
    path = Path(path)
    _check_extension(path)
    if not isinstance(pairs, PointPairs):
        raise TypeError(f"pairs must be a PointPairs, got {type(pairs).__name__}")
    if not len(pairs):
        raise SAMv2InputError(path, "no point pairs to write; a pairs file holds at least one pair")
    if coordinate_system is not None:
        pairs = pairs.to(coordinate_system)
    _atomic_write(path, lambda f: _write_pairs_csv(pairs, f))
