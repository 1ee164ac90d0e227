"""Reading and writing named landmark points: CSV, JSON and 3D Slicer markups (``.mrk.json``).

Points are physical positions in **millimetres**, in **LPS** (ITK/DICOM) by default or **RAS** (NIfTI/Slicer
display) when a file says so. Every reader returns a :class:`PointSet` in the coordinate system the file states
(or converted to the one asked for); every writer records the system in the file, so a file never holds
coordinates whose system is unknown. Conversions go through :func:`samv2_components.geometry.convert_points`.

Formats (extension decides; ``.mrk.json`` is checked before ``.json``):

* ``.csv``::

      # coordinate_system: LPS, units: mm
      name,x,y,z,score,method
      liver_dome,-12.5,40.0,101.25,0.93,fixed_point

  The comment line is optional on reading: without it the file is taken to be in the ``coordinate_system``
  argument of :func:`read_points` if given, else LPS. Extra columns are kept as strings, except ``score``
  (a float; an empty cell is NaN).
* ``.json``: ``{"coordinate_system": "LPS", "units": "mm", "points": [{"name": ..., "position": [x, y, z],
  ...extra keys...}]}``. ``coordinate_system`` and ``units`` are optional with the same defaults as CSV.
* ``.mrk.json``: 3D Slicer Markups JSON (schema v1.0.3). Control points of every ``Fiducial`` markup are read,
  honouring each markup's ``coordinateSystem`` (LPS when absent, as in Slicer); points whose
  ``positionStatus`` is ``undefined`` or ``missing`` are skipped with a warning. Extra columns travel in each
  control point's ``description`` as ``"score=0.93; method=fixed_point"``.

Every problem with a file raises :class:`~samv2_components.errors.SAMv2InputError` naming the file. A points
file always holds at least one point, and point names are unique (they are how points are matched between
images). Writes are atomic: a failed write leaves any previous file untouched and no partial file behind.
"""

from __future__ import annotations

import csv
import json
import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from samv2_components.errors import SAMv2InputError
from samv2_components.geometry import check_coordinate_system, convert_points
from samv2_components.io.atomic import atomic_file

__all__ = ["PointSet", "read_points", "write_points", "SLICER_MARKUPS_SCHEMA"]

SLICER_MARKUPS_SCHEMA = (
    "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/Schema/"
    "markups-schema-v1.0.3.json#"
)
# Orientation Slicer writes for an un-rotated control point (an LPS<->RAS flip matrix, row-major).
_SLICER_ORIENTATION = [-1.0, -0.0, 0.0, -0.0, -1.0, 0.0, 0.0, 0.0, 1.0]
_SLICER_SKIPPED_STATUS = ("undefined", "missing")
# Column/key names an extra column may not take, since the formats use them for name and position.
_RESERVED_KEYS = ("name", "x", "y", "z", "position")
_UNITS = "mm"
_PathLike = str | os.PathLike


def _parse_score(value: Any) -> float:
    """Return a score as float: ``None`` and ``""`` mean "no score" (NaN); anything else must be a number."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return math.nan
    if isinstance(value, bool):
        raise ValueError(f"score value {value!r} is not a number")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"score value {value!r} is not a number") from None


@dataclass
class PointSet:
    """Named points in physical millimetres.

    Args:
        names: one unique, non-empty name per point.
        coords: ``(N, 3)`` float64 world coordinates in mm, in ``coordinate_system``; must be finite.
        coordinate_system: ``"LPS"`` (the default) or ``"RAS"``.
        extra: optional per-point columns, each a list of length ``N``, e.g. ``score`` (float, NaN when unknown)
            and ``method`` (str). Keys may not be ``name``, ``x``, ``y``, ``z`` or ``position``.

    The constructor copies its inputs and raises :class:`SAMv2InputError` (without a file) when they do not fit.
    """

    names: list[str]
    coords: np.ndarray
    coordinate_system: str = "LPS"
    extra: dict[str, list] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.coordinate_system = check_coordinate_system(self.coordinate_system)
        self.names = list(self.names)
        self.coords = self._checked_coords(self.coords)
        self._check_names()
        self.extra = self._checked_extra(self.extra)

    def _checked_coords(self, coords) -> np.ndarray:
        arr = np.array(coords, dtype=np.float64)  # a copy: the PointSet owns its data
        if arr.ndim != 2 or arr.shape[1] != 3:
            raise SAMv2InputError(None, f"point coordinates must have shape (N, 3), got {arr.shape}")
        if not np.all(np.isfinite(arr)):
            bad = int(np.flatnonzero(~np.all(np.isfinite(arr), axis=1))[0])
            raise SAMv2InputError(None, f"point {bad + 1} has non-finite coordinates {arr[bad].tolist()}")
        return arr

    def _check_names(self) -> None:
        if len(self.names) != len(self.coords):
            raise SAMv2InputError(None, f"{len(self.names)} names for {len(self.coords)} points")
        seen: set[str] = set()
        for i, name in enumerate(self.names):
            if not isinstance(name, str) or not name.strip():
                raise SAMv2InputError(None, f"point {i + 1} has no name (got {name!r})")
            if name in seen:
                raise SAMv2InputError(None, f"duplicate point name {name!r}; point names must be unique")
            seen.add(name)

    def _checked_extra(self, extra: Mapping[str, Sequence]) -> dict[str, list]:
        checked = {}
        for key, values in dict(extra).items():
            if not isinstance(key, str) or not key.strip():
                raise SAMv2InputError(None, f"extra column names must be non-empty strings, got {key!r}")
            if key in _RESERVED_KEYS:
                raise SAMv2InputError(None, f"extra column {key!r} clashes with a reserved column name")
            values = list(values)
            if len(values) != len(self.names):
                raise SAMv2InputError(None, f"extra column {key!r} has {len(values)} values for {len(self)} points")
            if key == "score":
                try:
                    values = [_parse_score(v) for v in values]
                except ValueError as e:
                    raise SAMv2InputError(None, str(e)) from None
            checked[key] = values
        return checked

    def __len__(self) -> int:
        return len(self.names)

    def to(self, coordinate_system: str) -> PointSet:
        """Return a copy with ``coords`` converted to ``coordinate_system`` (``"LPS"`` or ``"RAS"``)."""
        target = check_coordinate_system(coordinate_system)
        coords = convert_points(self.coords, self.coordinate_system, target)
        return PointSet(list(self.names), coords, target, {k: list(v) for k, v in self.extra.items()})


# ----------------------------------------------------------------------------------------------------------------
# shared helpers


def _point_set(path: _PathLike, names, coords, system: str, extra: dict[str, list]) -> PointSet:
    """Build a :class:`PointSet` read from ``path``; its validation errors are re-raised naming the file."""
    if not names:
        raise SAMv2InputError(path, "no points in file")
    try:
        return PointSet(names, np.asarray(coords, dtype=np.float64).reshape(-1, 3), system, extra)
    except SAMv2InputError as e:
        raise SAMv2InputError(path, e.problem) from None


def _collect_extras(path: _PathLike, rows: list[dict[str, Any]], where: list[str]) -> dict[str, list]:
    """Turn per-point extra dicts into columns; a key some points lack is filled with NaN (score) or ``""``."""
    keys: list[str] = []
    for row in rows:
        keys.extend(k for k in row if k not in keys)
    columns: dict[str, list] = {}
    for key in keys:
        values = [row.get(key, "") for row in rows]
        if key == "score":
            values = [_parse_field(path, w, _parse_score, v) for w, v in zip(where, values)]
        columns[key] = values
    return columns


def _parse_field(path: _PathLike, where: str, parse: Callable[[Any], Any], value: Any) -> Any:
    """Apply ``parse`` to ``value``; a ``ValueError`` becomes an input error saying where in the file it was."""
    try:
        return parse(value)
    except ValueError as e:
        raise SAMv2InputError(path, f"{where}: {e}") from None


def _check_units(path: _PathLike, units: Any) -> None:
    if units is not None and str(units).strip() != _UNITS:
        raise SAMv2InputError(path, f"units {units!r} are not supported; points must be in {_UNITS}")


def _position(value: Any) -> list[float]:
    """Return a JSON ``position`` as three floats, or raise ``ValueError``."""
    ok = isinstance(value, (list, tuple)) and len(value) == 3
    ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    if not ok:
        raise ValueError(f"position must be 3 finite numbers, got {value!r}")
    return [float(v) for v in value]


def _json_value(value: Any) -> Any:
    """Make an extra value JSON-safe: numpy scalars become Python ones and a NaN score becomes ``null``."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _load_json(path: _PathLike) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise SAMv2InputError(path, f"not valid JSON ({e})") from None


def _atomic_write(path: Path, write: Callable[[IO[str]], None]) -> None:
    """Call ``write`` on a temporary text file (UTF-8) next to ``path``, then move it over ``path`` in one step
    (:func:`~samv2_components.io.atomic.atomic_file`): readers only ever see the old file or the complete new one.
    """
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        write(f)


# ----------------------------------------------------------------------------------------------------------------
# CSV


def _csv_comment_system(path: _PathLike, line: str) -> str:
    """Parse ``# coordinate_system: LPS, units: mm`` and return the system; other keys are ignored."""
    fields = {}
    for part in line.lstrip("#").split(","):
        key, sep, value = part.partition(":")
        if sep:
            fields[key.strip().lower()] = value.strip()
    if "coordinate_system" not in fields:
        raise SAMv2InputError(path, f"comment line {line.strip()!r} does not state 'coordinate_system: LPS|RAS'")
    _check_units(path, fields.get("units"))
    return check_coordinate_system(fields["coordinate_system"], path)


def _csv_xyz(path: _PathLike, where: str, cells: dict[str, str]) -> list[float]:
    """Return the ``x, y, z`` cells of one CSV row as finite floats."""
    xyz = []
    for axis in "xyz":
        text = cells[axis].strip()
        try:
            value = float(text)
        except ValueError:
            raise SAMv2InputError(path, f"{where}: {axis} value {text!r} is not a number") from None
        if not math.isfinite(value):
            raise SAMv2InputError(path, f"{where}: {axis} value {text!r} is not a finite number")
        xyz.append(value)
    return xyz


def _read_csv(path: _PathLike, default_system: str) -> PointSet:
    with open(path, encoding="utf-8-sig", newline="") as f:  # -sig: tolerate the BOM spreadsheets write
        lines = f.read().splitlines(keepends=True)
    system, offset = default_system, 0
    if lines and lines[0].lstrip().startswith("#"):
        system, offset = _csv_comment_system(path, lines[0]), 1
    reader = csv.reader(lines[offset:])
    header = next((row for row in reader if row), None)
    if header is None:
        raise SAMv2InputError(path, "no header line 'name,x,y,z' and no points")
    header = [h.strip() for h in header]
    missing = [c for c in ("name", "x", "y", "z") if c not in header]
    if missing:
        raise SAMv2InputError(path, f"missing columns: {', '.join(missing)} (found: {', '.join(header)})")
    duplicated = sorted({h for h in header if header.count(h) > 1})
    if duplicated:
        raise SAMv2InputError(path, f"duplicate columns: {', '.join(duplicated)}")
    names, coords, extras = [], [], {h: [] for h in header if h not in ("name", "x", "y", "z")}
    for row in reader:
        if not any(cell.strip() for cell in row):
            continue  # blank lines carry no point
        where = f"line {reader.line_num + offset}"  # counted from the file's first line, so users can find it
        if len(row) != len(header):
            raise SAMv2InputError(path, f"{where}: expected {len(header)} values, found {len(row)}")
        cells = dict(zip(header, row))
        names.append(cells["name"].strip())
        coords.append(_csv_xyz(path, where, cells))
        for key in extras:
            parse = _parse_score if key == "score" else str
            extras[key].append(_parse_field(path, where, parse, cells[key]))
    return _point_set(path, names, coords, system, extras)


def _csv_cell(key: str, value: Any) -> str:
    if isinstance(value, np.generic):
        value = value.item()
    if value is None:
        return ""
    return repr(float(value)) if key == "score" else str(value)


def _write_csv(points: PointSet, f: IO[str]) -> None:
    f.write(f"# coordinate_system: {points.coordinate_system}, units: {_UNITS}\n")
    writer = csv.writer(f, lineterminator="\n")
    writer.writerow(["name", "x", "y", "z", *points.extra])
    for i, name in enumerate(points.names):
        xyz = [repr(float(v)) for v in points.coords[i]]  # repr: shortest text that reads back exactly
        writer.writerow([name, *xyz, *(_csv_cell(k, v[i]) for k, v in points.extra.items())])


# ----------------------------------------------------------------------------------------------------------------
# JSON


def _read_json(path: _PathLike, default_system: str) -> PointSet:
    data = _load_json(path)
    if not isinstance(data, dict):
        raise SAMv2InputError(path, f"expected a JSON object with a 'points' list, found {type(data).__name__}")
    system = check_coordinate_system(data.get("coordinate_system", default_system), path)
    _check_units(path, data.get("units"))
    if not isinstance(data.get("points"), list):
        raise SAMv2InputError(path, "missing 'points' list")
    names, coords, extra_rows, where = [], [], [], []
    for i, point in enumerate(data["points"], start=1):
        if not isinstance(point, dict):
            raise SAMv2InputError(path, f"point {i}: expected an object with 'name' and 'position'")
        if not isinstance(point.get("name"), str):
            raise SAMv2InputError(path, f"point {i}: 'name' must be a string, got {point.get('name')!r}")
        names.append(point["name"])
        coords.append(_parse_field(path, f"point {i} ({point['name']})", _position, point.get("position")))
        extra_rows.append({k: v for k, v in point.items() if k not in ("name", "position")})
        where.append(f"point {i} ({point['name']})")
    return _point_set(path, names, coords, system, _collect_extras(path, extra_rows, where))


def _write_json(points: PointSet, f: IO[str]) -> None:
    records = []
    for i, name in enumerate(points.names):
        record = {"name": name, "position": points.coords[i].tolist()}
        record.update({k: _json_value(v[i]) for k, v in points.extra.items()})
        records.append(record)
    data = {"coordinate_system": points.coordinate_system, "units": _UNITS, "points": records}
    json.dump(data, f, indent=2, allow_nan=False)
    f.write("\n")


# ----------------------------------------------------------------------------------------------------------------
# 3D Slicer markups (.mrk.json)


def _parse_description(text: Any) -> dict[str, str]:
    """Parse ``"score=0.93; method=fixed_point"``; free text that is not ``key=value`` pairs is kept whole."""
    if not isinstance(text, str) or not text.strip():
        return {}
    parts = [p.strip() for p in text.split(";") if p.strip()]
    pairs = [p.partition("=") for p in parts]
    if not all(sep and key.strip() for key, sep, _ in pairs):
        return {"description": text}
    return {key.strip(): value.strip() for key, _, value in pairs}


def _format_description(points: PointSet, i: int) -> str:
    return "; ".join(f"{k}={_csv_cell(k, v[i])}" for k, v in points.extra.items())


def _check_description_safe(path: _PathLike, points: PointSet) -> None:
    """Refuse extras that ``key=value; ...`` cannot carry back unchanged, rather than corrupt them silently."""
    for key, values in points.extra.items():
        if any(c in key for c in "=;"):
            raise SAMv2InputError(path, f"extra column {key!r} contains '=' or ';', not allowed in .mrk.json")
        for value in values:
            if ";" in _csv_cell(key, value):
                raise SAMv2InputError(path, f"extra column {key!r} value {value!r} contains ';', not allowed here")


def _read_markup_points(path: _PathLike, markup: dict, number: int, system: str):
    """Yield ``(name, position in system, extras, where)`` of one Fiducial markup's defined control points."""
    own_system = check_coordinate_system(markup.get("coordinateSystem", "LPS"), path)
    _check_units(path, markup.get("coordinateUnits"))
    control_points = markup.get("controlPoints", [])
    if not isinstance(control_points, list):
        raise SAMv2InputError(path, f"markup {number}: 'controlPoints' must be a list")
    for j, cp in enumerate(control_points, start=1):
        if not isinstance(cp, dict):
            raise SAMv2InputError(path, f"markup {number}, control point {j}: expected an object")
        label = str(cp.get("label") or cp.get("id") or "")
        where = f"markup {number}, control point {j} ({label})"
        if cp.get("positionStatus") in _SLICER_SKIPPED_STATUS:
            warnings.warn(f"{os.fspath(path)}: skipping {where}: position is {cp['positionStatus']}", stacklevel=4)
            continue
        position = _parse_field(path, where, _position, cp.get("position"))
        yield label, convert_points(position, own_system, system)[0], _parse_description(cp.get("description")), where


def _read_markups(path: _PathLike) -> PointSet:
    data = _load_json(path)
    markups = data.get("markups") if isinstance(data, dict) else None
    if not isinstance(markups, list):
        raise SAMv2InputError(path, "not a Slicer markups file: missing 'markups' list")
    fiducials = [(n, m) for n, m in enumerate(markups, start=1) if isinstance(m, dict) and m.get("type") == "Fiducial"]
    if not fiducials:
        found = ", ".join(str(m.get("type")) for m in markups if isinstance(m, dict)) or "none"
        raise SAMv2InputError(path, f"no Fiducial markup (found markup types: {found})")
    # Several markups may differ in system; all are returned in the first one's.
    system = check_coordinate_system(fiducials[0][1].get("coordinateSystem", "LPS"), path)
    names, coords, extra_rows, where = [], [], [], []
    for number, markup in fiducials:
        for name, position, extras, place in _read_markup_points(path, markup, number, system):
            names.append(name)
            coords.append(position)
            extra_rows.append(extras)
            where.append(place)
    return _point_set(path, names, coords, system, _collect_extras(path, extra_rows, where))


def _markups_document(points: PointSet) -> dict:
    control_points = [
        {
            "id": str(i + 1),
            "label": name,
            "description": _format_description(points, i),
            "associatedNodeID": "",
            "position": points.coords[i].tolist(),
            "orientation": list(_SLICER_ORIENTATION),
            "selected": True,
            "locked": False,
            "visibility": True,
            "positionStatus": "defined",
        }
        for i, name in enumerate(points.names)
    ]
    markup = {
        "type": "Fiducial",
        "coordinateSystem": points.coordinate_system,
        "coordinateUnits": _UNITS,
        "locked": False,
        "fixedNumberOfControlPoints": False,
        "labelFormat": "%N-%d",
        "lastUsedControlPointNumber": len(points),
        "controlPoints": control_points,
        "measurements": [],
    }
    return {"@schema": SLICER_MARKUPS_SCHEMA, "markups": [markup]}


def _write_markups(points: PointSet, f: IO[str]) -> None:
    json.dump(_markups_document(points), f, indent=4, allow_nan=False)
    f.write("\n")


# ----------------------------------------------------------------------------------------------------------------
# public API


def _format_of(path: Path) -> str:
    """Return ``"mrk"``, ``"json"`` or ``"csv"`` from the file name, or raise for any other extension."""
    name = path.name.lower()
    if name.endswith(".mrk.json"):
        return "mrk"
    if name.endswith(".json"):
        return "json"
    if name.endswith(".csv"):
        return "csv"
    raise SAMv2InputError(path, f"unknown points file extension {path.suffix!r}; expected .csv, .json or .mrk.json")


def read_points(path: _PathLike, coordinate_system: str | None = None) -> PointSet:
    """Read named points from a ``.csv``, ``.json`` or Slicer ``.mrk.json`` file.

    Args:
        path: the points file; the extension selects the format (see the module docstring).
        coordinate_system: ``"LPS"`` or ``"RAS"``. When given, the result is converted to it; it is also the
            system assumed for a CSV/JSON file that does not state one (LPS otherwise). ``None`` returns the
            points in the file's own system.

    Returns:
        a :class:`PointSet` with ``coords`` of shape ``(N, 3)`` in mm, ``N >= 1``.

    Raises:
        SAMv2InputError: the file is missing, has an unknown extension or does not follow its format.
    """
    path = Path(path)
    fmt = _format_of(path)
    target = None if coordinate_system is None else check_coordinate_system(coordinate_system)
    if not path.is_file():
        raise SAMv2InputError(path, "points file does not exist")
    try:
        if fmt == "csv":
            points = _read_csv(path, target or "LPS")
        elif fmt == "json":
            points = _read_json(path, target or "LPS")
        else:
            points = _read_markups(path)
    except UnicodeDecodeError:
        raise SAMv2InputError(path, "not a UTF-8 text file") from None
    return points if target is None else points.to(target)


def write_points(points: PointSet, path: _PathLike, coordinate_system: str | None = None) -> None:
    """Write ``points`` to a ``.csv``, ``.json`` or Slicer ``.mrk.json`` file, creating its parent directory.

    Args:
        points: the points to write; at least one.
        path: the target file; the extension selects the format (see the module docstring).
        coordinate_system: ``"LPS"`` or ``"RAS"`` to write in (the file records it); ``None`` keeps
            ``points.coordinate_system``.

    The write is atomic: on failure an existing file at ``path`` is left unchanged and no partial file remains.

    Raises:
        SAMv2InputError: unknown extension, an empty point set, or (``.mrk.json``) extras the format cannot hold.
    """
    path = Path(path)
    fmt = _format_of(path)
    if not isinstance(points, PointSet):
        raise TypeError(f"points must be a PointSet, got {type(points).__name__}")
    if not len(points):
        raise SAMv2InputError(path, "no points to write; a points file holds at least one point")
    if coordinate_system is not None:
        points = points.to(coordinate_system)
    if fmt == "mrk":
        _check_description_safe(path, points)
    writer = {"csv": _write_csv, "json": _write_json, "mrk": _write_markups}[fmt]
    _atomic_write(path, lambda f: writer(points, f))
