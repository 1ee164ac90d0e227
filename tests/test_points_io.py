"""Tests of :mod:`samv2_components.io.points`: CSV, JSON and Slicer ``.mrk.json`` points files."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from samv2_components.errors import SAMv2InputError
from samv2_components.io import points as points_module
from samv2_components.io.points import PointSet, read_points, write_points

EXTENSIONS = (".csv", ".json", ".mrk.json")

# A file as 3D Slicer 5 saves it: a Fiducial markup in RAS, with one point whose position was never placed.
SLICER_RAS_FILE = """{
    "@schema": "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/Schema/markups-schema-v1.0.3.json#",
    "markups": [
        {
            "type": "Fiducial",
            "coordinateSystem": "RAS",
            "coordinateUnits": "mm",
            "locked": false,
            "fixedNumberOfControlPoints": false,
            "labelFormat": "%N-%d",
            "lastUsedControlPointNumber": 3,
            "controlPoints": [
                {
                    "id": "1",
                    "label": "F-1",
                    "description": "",
                    "associatedNodeID": "vtkMRMLScalarVolumeNode1",
                    "position": [12.5, -40.0, 101.25],
                    "orientation": [-1.0, -0.0, 0.0, -0.0, -1.0, 0.0, 0.0, 0.0, 1.0],
                    "selected": true,
                    "locked": false,
                    "visibility": true,
                    "positionStatus": "defined"
                },
                {
                    "id": "2",
                    "label": "F-2",
                    "description": "left kidney, upper pole",
                    "associatedNodeID": "vtkMRMLScalarVolumeNode1",
                    "position": [-3.0, 7.0, -9.5],
                    "orientation": [-1.0, -0.0, 0.0, -0.0, -1.0, 0.0, 0.0, 0.0, 1.0],
                    "selected": true,
                    "locked": false,
                    "visibility": true,
                    "positionStatus": "defined"
                },
                {
                    "id": "3",
                    "label": "F-3",
                    "description": "",
                    "associatedNodeID": "",
                    "position": [0.0, 0.0, 0.0],
                    "orientation": [-1.0, -0.0, 0.0, -0.0, -1.0, 0.0, 0.0, 0.0, 1.0],
                    "selected": true,
                    "locked": false,
                    "visibility": true,
                    "positionStatus": "undefined"
                }
            ],
            "measurements": [],
            "display": {
                "visibility": true,
                "opacity": 1.0,
                "color": [0.4, 1.0, 1.0],
                "glyphType": "Sphere3D",
                "glyphScale": 3.0
            }
        }
    ]
}
"""


@pytest.fixture
def lps_points() -> PointSet:
    return PointSet(
        names=["liver_dome", "left kidney, upper pole", "aortic_bifurcation"],
        coords=np.array([[-12.5, 40.0, 101.25], [3.0, -7.0, -9.5], [0.1, 1e-7, -1234.5678901234]]),
        coordinate_system="LPS",
        extra={"score": [0.93, 0.5, math.nan], "method": ["fixed_point", "semantic", "cross_sam"]},
    )


def _write_text(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


def _assert_error(path, match: str, coordinate_system=None):
    """``read_points`` raises an input error naming the file and saying ``match``."""
    with pytest.raises(SAMv2InputError) as info:
        read_points(path, coordinate_system)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert re.search(match, message), message
    assert "\n" not in message
    return message


def _assert_same_extras(actual: dict, expected: dict):
    assert list(actual) == list(expected)
    np.testing.assert_array_equal(actual["score"], expected["score"])  # equal_nan by default
    assert actual["method"] == expected["method"]


# ----------------------------------------------------------------------------------------------------------------
# PointSet


def test_pointset_validates_and_copies(lps_points):
    assert len(lps_points) == 3
    assert lps_points.coords.dtype == np.float64 and lps_points.coords.shape == (3, 3)
    coords = np.zeros((1, 3))
    ps = PointSet(["a"], coords, "ras")
    coords[0, 0] = 5.0
    assert ps.coords[0, 0] == 0.0 and ps.coordinate_system == "RAS" and ps.extra == {}


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"names": ["a"], "coords": [1.0, 2.0, 3.0]}, "shape"),
        ({"names": ["a"], "coords": [[1.0, 2.0]]}, "shape"),
        ({"names": ["a"], "coords": [[1.0, np.nan, 3.0]]}, "non-finite"),
        ({"names": ["a", "b"], "coords": [[1.0, 2.0, 3.0]]}, "2 names for 1 points"),
        ({"names": ["a", "a"], "coords": np.zeros((2, 3))}, "duplicate point name 'a'"),
        ({"names": [""], "coords": np.zeros((1, 3))}, "no name"),
        ({"names": ["a"], "coords": np.zeros((1, 3)), "coordinate_system": "XYZ"}, "unknown coordinate system"),
        ({"names": ["a"], "coords": np.zeros((1, 3)), "extra": {"score": [1.0, 2.0]}}, "2 values for 1 points"),
        ({"names": ["a"], "coords": np.zeros((1, 3)), "extra": {"x": ["?"]}}, "reserved"),
        ({"names": ["a"], "coords": np.zeros((1, 3)), "extra": {"score": ["high"]}}, "not a number"),
    ],
)
def test_pointset_rejects(kwargs, match):
    with pytest.raises(SAMv2InputError, match=match):
        PointSet(**kwargs)


def test_pointset_to(lps_points):
    ras = lps_points.to("RAS")
    assert ras.coordinate_system == "RAS" and lps_points.coordinate_system == "LPS"
    np.testing.assert_allclose(ras.coords, lps_points.coords * [-1, -1, 1])
    np.testing.assert_allclose(ras.to("LPS").coords, lps_points.coords)
    ras.extra["method"][0] = "changed"
    assert lps_points.extra["method"][0] == "fixed_point"  # a copy, not a view


# ----------------------------------------------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("ext", EXTENSIONS)
@pytest.mark.parametrize("system", ["LPS", "RAS"])
def test_round_trip(tmp_path, lps_points, ext, system):
    path = tmp_path / f"points{ext}"
    write_points(lps_points, path, coordinate_system=system)
    back = read_points(path)
    assert back.coordinate_system == system
    assert back.names == lps_points.names
    np.testing.assert_array_equal(back.to("LPS").coords, lps_points.coords)  # exact: no text rounding
    _assert_same_extras(back.extra, lps_points.extra)
    # asking for a system on read converts
    np.testing.assert_array_equal(read_points(path, "LPS").coords, lps_points.coords)
    assert read_points(path, "RAS").coordinate_system == "RAS"


@pytest.mark.parametrize("ext", EXTENSIONS)
def test_write_keeps_own_system_by_default(tmp_path, lps_points, ext):
    path = tmp_path / f"points{ext}"
    write_points(lps_points.to("RAS"), path)
    back = read_points(path)
    assert back.coordinate_system == "RAS"
    np.testing.assert_array_equal(back.coords, lps_points.to("RAS").coords)


@pytest.mark.parametrize("ext", EXTENSIONS)
def test_round_trip_without_extras(tmp_path, ext):
    ps = PointSet(["p1"], [[1.0, 2.0, 3.0]], "LPS")
    path = tmp_path / "sub" / "dir" / f"p{ext}"  # parent directories are created
    write_points(ps, path)
    back = read_points(path)
    assert back.names == ["p1"] and back.extra == {}
    np.testing.assert_array_equal(back.coords, ps.coords)


def test_csv_layout(tmp_path, lps_points):
    path = tmp_path / "p.csv"
    write_points(lps_points, path, "RAS")
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "# coordinate_system: RAS, units: mm"
    assert lines[1] == "name,x,y,z,score,method"
    assert lines[2] == "liver_dome,12.5,-40.0,101.25,0.93,fixed_point"
    assert lines[3].startswith('"left kidney, upper pole",')  # a comma in a name is quoted


def test_json_layout(tmp_path, lps_points):
    path = tmp_path / "p.json"
    write_points(lps_points, path)
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["coordinate_system"] == "LPS" and data["units"] == "mm"
    assert data["points"][0] == {"name": "liver_dome", "position": [-12.5, 40.0, 101.25], "score": 0.93,
                                 "method": "fixed_point"}
    assert data["points"][2]["score"] is None  # NaN is not valid JSON


def test_markups_layout(tmp_path, lps_points):
    path = tmp_path / "p.mrk.json"
    write_points(lps_points, path)
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["@schema"].endswith("markups-schema-v1.0.3.json#")
    (markup,) = data["markups"]
    assert markup["type"] == "Fiducial"
    assert markup["coordinateSystem"] == "LPS" and markup["coordinateUnits"] == "mm"
    cp = markup["controlPoints"][0]
    assert cp["id"] == "1" and cp["label"] == "liver_dome"
    assert cp["position"] == [-12.5, 40.0, 101.25]
    assert cp["orientation"] == [-1.0, -0.0, 0.0, -0.0, -1.0, 0.0, 0.0, 0.0, 1.0]
    assert cp["description"] == "score=0.93; method=fixed_point"
    assert cp["positionStatus"] == "defined" and cp["visibility"] is True
    assert markup["controlPoints"][2]["id"] == "3"


# ----------------------------------------------------------------------------------------------------------------
# reading hand-written files


def test_slicer_ras_file_read_as_lps(tmp_path):
    path = _write_text(tmp_path / "from_slicer.mrk.json", SLICER_RAS_FILE)
    with pytest.warns(UserWarning, match="undefined"):
        ras = read_points(path)
    assert ras.coordinate_system == "RAS"
    assert ras.names == ["F-1", "F-2"]  # F-3 has no position
    np.testing.assert_array_equal(ras.coords, [[12.5, -40.0, 101.25], [-3.0, 7.0, -9.5]])
    assert ras.extra == {"description": ["", "left kidney, upper pole"]}  # free text is kept whole
    with pytest.warns(UserWarning):
        lps = read_points(path, "LPS")
    assert lps.coordinate_system == "LPS"
    np.testing.assert_array_equal(lps.coords, [[-12.5, 40.0, 101.25], [3.0, -7.0, -9.5]])


def test_slicer_defaults_and_several_markups(tmp_path):
    data = {
        "markups": [
            # no coordinateSystem: Slicer's default is LPS
            {"type": "Fiducial", "controlPoints": [{"id": "1", "label": "a", "position": [1, 2, 3],
                                                   "description": "score=0.5; method=manual"}]},
            {"type": "Line", "controlPoints": [{"id": "1", "label": "l", "position": [9, 9, 9]}]},
            {"type": "Fiducial", "coordinateSystem": "RAS", "controlPoints": [
                {"id": "1", "label": "b", "position": [1, 2, 3], "positionStatus": "missing"},
                {"id": "2", "label": "c", "position": [4, 5, 6], "description": "method=auto"}]},
        ]
    }
    path = _write_text(tmp_path / "multi.mrk.json", json.dumps(data))
    with pytest.warns(UserWarning, match="missing"):
        ps = read_points(path)
    assert ps.coordinate_system == "LPS" and ps.names == ["a", "c"]  # the Line markup is not read
    np.testing.assert_array_equal(ps.coords, [[1.0, 2.0, 3.0], [-4.0, -5.0, 6.0]])
    np.testing.assert_array_equal(ps.extra["score"], [0.5, math.nan])
    assert ps.extra["method"] == ["manual", "auto"]


def test_csv_without_comment(tmp_path):
    path = _write_text(tmp_path / "plain.csv", "name,x,y,z,note\np1, 1.5 ,2,3,hello\n\np2,4,5,6,\n")
    ps = read_points(path)
    assert ps.coordinate_system == "LPS" and ps.names == ["p1", "p2"]
    np.testing.assert_array_equal(ps.coords, [[1.5, 2.0, 3.0], [4.0, 5.0, 6.0]])
    assert ps.extra == {"note": ["hello", ""]}
    # without a comment the file is taken to be in the requested system: no conversion happens
    ras = read_points(path, "RAS")
    assert ras.coordinate_system == "RAS"
    np.testing.assert_array_equal(ras.coords, ps.coords)


def test_csv_comment_overrides_requested_system(tmp_path):
    path = _write_text(tmp_path / "p.csv", "# coordinate_system: RAS, units: mm\nname,x,y,z\np1,1,2,3\n")
    np.testing.assert_array_equal(read_points(path, "LPS").coords, [[-1.0, -2.0, 3.0]])


def test_csv_columns_in_any_order_and_bom(tmp_path):
    path = tmp_path / "p.csv"
    path.write_bytes("\ufeffz,score,name,y,x\n3,,p1,2,1\n".encode())
    ps = read_points(path)
    np.testing.assert_array_equal(ps.coords, [[1.0, 2.0, 3.0]])
    assert math.isnan(ps.extra["score"][0])


def test_json_defaults(tmp_path):
    path = _write_text(tmp_path / "p.json", json.dumps({"points": [{"name": "p1", "position": [1, 2, 3]}]}))
    assert read_points(path).coordinate_system == "LPS"
    assert read_points(path, "RAS").coordinate_system == "RAS"
    np.testing.assert_array_equal(read_points(path, "RAS").coords, [[1.0, 2.0, 3.0]])


# ----------------------------------------------------------------------------------------------------------------
# bad inputs


@pytest.mark.parametrize(
    "text,match",
    [
        ("name,x,q\np1,1,2\n", r"missing columns: y, z \(found: name, x, q\)"),
        (
            "# coordinate_system: LPS, units: mm\nname,x,y,z\np1,1,2,3\np2,abc,2,3\n",
            r"line 4: x value 'abc' is not a number",  # line numbers count the comment line
        ),
        ("name,x,y,z\np1,1,2,inf\n", r"line 2: z value 'inf' is not a finite number"),
        ("name,x,y,z\np1,1,2,3\np2,1,2\n", r"line 3: expected 4 values, found 3"),
        ("name,x,y,z\np1,1,2,3,4\n", r"line 2: expected 4 values, found 5"),
        ("# coordinate_system: XYZ, units: mm\nname,x,y,z\np1,1,2,3\n", r"unknown coordinate system 'XYZ'"),
        ("# coordinate system: RAS\nname,x,y,z\np1,1,2,3\n", r"does not state 'coordinate_system"),
        ("# coordinate_system: LPS, units: cm\nname,x,y,z\np1,1,2,3\n", r"units 'cm' are not supported"),
        ("# coordinate_system: LPS, units: mm\nname,x,y,z\n", r"no points"),
        ("", r"no header"),
        ("name,x,y,z,score\np1,1,2,3,high\n", r"line 2: score value 'high' is not a number"),
        ("name,x,y,z\np1,1,2,3\np1,4,5,6\n", r"duplicate point name 'p1'"),
        ("name,x,y,z\n,1,2,3\n", r"no name"),
        ("name,x,x,y,z\np1,1,1,2,3\n", r"duplicate columns: x"),
    ],
)
def test_bad_csv(tmp_path, text, match):
    _assert_error(_write_text(tmp_path / "bad.csv", text), match)


@pytest.mark.parametrize(
    "data,match",
    [
        ({"coordinate_system": "LPS"}, r"missing 'points' list"),
        ([1, 2, 3], r"expected a JSON object"),
        ({"points": [{"name": "p1", "position": [1, 2]}]}, r"point 1 \(p1\): position must be 3 finite numbers"),
        ({"points": [{"name": "p1", "position": [1, "2", 3]}]}, r"position must be 3 finite numbers"),
        ({"points": [{"name": "p1", "position": [1, True, 3]}]}, r"position must be 3 finite numbers"),
        ({"points": [{"name": "p1"}]}, r"position must be 3 finite numbers, got None"),
        ({"points": [{"position": [1, 2, 3]}]}, r"point 1: 'name' must be a string"),
        ({"points": ["p1"]}, r"point 1: expected an object"),
        ({"units": "cm", "points": [{"name": "p1", "position": [1, 2, 3]}]}, r"units 'cm' are not supported"),
        ({"coordinate_system": "XYZ", "points": [{"name": "p1", "position": [1, 2, 3]}]}, r"unknown coordinate system"),
        ({"points": []}, r"no points"),
        ({"points": [{"name": "p1", "position": [1, 2, 3], "score": "high"}]}, r"score value 'high' is not a number"),
    ],
)
def test_bad_json(tmp_path, data, match):
    _assert_error(_write_text(tmp_path / "bad.json", json.dumps(data)), match)


def test_invalid_json_text(tmp_path):
    _assert_error(_write_text(tmp_path / "bad.json", "{not json"), r"not valid JSON")
    _assert_error(_write_text(tmp_path / "bad.mrk.json", "{not json"), r"not valid JSON")


def _markups(**markup) -> str:
    base = {"type": "Fiducial", "coordinateSystem": "LPS", "coordinateUnits": "mm",
            "controlPoints": [{"id": "1", "label": "F-1", "position": [1, 2, 3], "positionStatus": "defined"}]}
    base.update(markup)
    return json.dumps({"@schema": points_module.SLICER_MARKUPS_SCHEMA, "markups": [base]})


@pytest.mark.parametrize(
    "text,match",
    [
        (_markups(type="Curve"), r"no Fiducial markup \(found markup types: Curve\)"),
        (json.dumps({"@schema": "x"}), r"missing 'markups' list"),
        (_markups(coordinateUnits="um"), r"units 'um' are not supported"),
        (_markups(coordinateSystem="XYZ"), r"unknown coordinate system"),
        (_markups(controlPoints=[{"id": "1", "label": "F-1", "position": [1, 2]}]), r"control point 1 \(F-1\)"),
        (_markups(controlPoints=[]), r"no points"),
        (_markups(controlPoints=[{"label": "F-1", "description": "score=x", "position": [1, 2, 3]}]),
         r"score value 'x' is not a number"),
    ],
)
def test_bad_markups(tmp_path, text, match):
    _assert_error(_write_text(tmp_path / "bad.mrk.json", text), match)


@pytest.mark.parametrize("name", ["points.txt", "points.fcsv", "points"])
def test_unknown_extension(tmp_path, lps_points, name):
    path = _write_text(tmp_path / name, "name,x,y,z\np1,1,2,3\n")
    _assert_error(path, r"unknown points file extension")
    with pytest.raises(SAMv2InputError, match=r"unknown points file extension"):
        write_points(lps_points, tmp_path / f"out_{name}")
    assert not (tmp_path / f"out_{name}").exists()


def test_missing_file(tmp_path):
    _assert_error(tmp_path / "nope.csv", r"does not exist")


def test_not_utf8(tmp_path):
    path = tmp_path / "p.csv"
    path.write_bytes(b"name,x,y,z\n\xff\xfe,1,2,3\n")
    _assert_error(path, r"not a UTF-8 text file")


def test_bad_requested_system(tmp_path, lps_points):
    path = tmp_path / "p.csv"
    write_points(lps_points, path)
    with pytest.raises(SAMv2InputError, match="unknown coordinate system"):
        read_points(path, "XYZ")
    with pytest.raises(SAMv2InputError, match="unknown coordinate system"):
        write_points(lps_points, tmp_path / "q.csv", "XYZ")


def test_write_empty_point_set(tmp_path):
    path = tmp_path / "empty.csv"
    with pytest.raises(SAMv2InputError, match="no points to write"):
        write_points(PointSet([], np.zeros((0, 3))), path)
    assert not path.exists()


def test_markups_refuses_unencodable_extras(tmp_path):
    ps = PointSet(["p1"], [[1.0, 2.0, 3.0]], extra={"method": ["a; b"]})
    path = tmp_path / "p.mrk.json"
    with pytest.raises(SAMv2InputError, match=r"contains ';'"):
        write_points(ps, path)
    assert not path.exists()


# ----------------------------------------------------------------------------------------------------------------
# atomic writes


def _fail_after_partial_write(*args, **kwargs):
    f = args[1] if len(args) > 1 else args[0]
    f.write('{"partial": ')
    raise RuntimeError("disk full")


@pytest.mark.parametrize("ext", [".json", ".mrk.json"])
def test_failed_json_write_leaves_nothing(tmp_path, lps_points, monkeypatch, ext):
    monkeypatch.setattr(points_module.json, "dump", _fail_after_partial_write)
    path = tmp_path / "out" / f"points{ext}"
    with pytest.raises(RuntimeError, match="disk full"):
        write_points(lps_points, path)
    assert list((tmp_path / "out").iterdir()) == []  # neither the target nor a temporary file


def test_failed_csv_write_leaves_nothing(tmp_path, lps_points, monkeypatch):
    class _BrokenWriter:
        def __init__(self, f, **kwargs):
            self.f = f

        def writerow(self, row):
            self.f.write("name,x")
            raise OSError("disk full")

    monkeypatch.setattr(points_module.csv, "writer", _BrokenWriter)
    with pytest.raises(OSError, match="disk full"):
        write_points(lps_points, tmp_path / "points.csv")
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_previous_file(tmp_path, lps_points, monkeypatch):
    path = tmp_path / "points.json"
    write_points(lps_points, path)
    before = path.read_bytes()
    monkeypatch.setattr(points_module.json, "dump", _fail_after_partial_write)
    with pytest.raises(RuntimeError):
        write_points(lps_points.to("RAS"), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["points.json"]


def test_overwrite(tmp_path, lps_points):
    path = tmp_path / "points.csv"
    write_points(lps_points, path)
    write_points(PointSet(["only"], [[0.0, 0.0, 1.0]]), path)
    assert read_points(path).names == ["only"]
    assert [p.name for p in tmp_path.iterdir()] == ["points.csv"]
