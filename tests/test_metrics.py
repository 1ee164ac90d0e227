"""Tests of the landmark / lesion-tracking metrics, the point-pairs CSV and ``scripts/evaluate_matches.py`` (run
as a script once in the default suite, ``test_cli_pairs_truth``; its other runs are ``slow``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from samv2_components.errors import SAMv2InputError
from samv2_components.geometry import convert_points
from samv2_components.io import PointPairs, is_point_pairs_file, read_point_pairs, write_point_pairs
from samv2_components.io import point_pairs as point_pairs_module
from samv2_components.io.points import PointSet, write_points
from samv2_components.metrics import (
    cpm,
    cpm_at_radius,
    evaluate_point_sets,
    format_metrics_table,
    landmark_summary,
    summarize_errors,
)

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "evaluate_matches.py"

# Hand-made case: four points whose errors are 3-4-5 and 5-12-13 triangles, so every distance is exact.
NAMES = ["a", "b", "c", "d"]
TRUTH = np.array([[10.0, 20.0, 30.0], [-5.0, 0.0, 7.5], [100.0, -50.0, 25.0], [0.0, 1.0, 2.0]])  # LPS mm
ERRORS = np.array([[3.0, -4.0, 0.0], [0.0, 3.0, 4.0], [5.0, 0.0, 12.0], [0.0, -12.0, -5.0]])  # |e| = 5, 5, 13, 13
PRED = TRUTH + ERRORS
RADII = np.array([5.0, 6.0, 14.0, 12.0])  # 5 <= 5 (boundary counts), 5 <= 6, 13 <= 14, 13 > 12 -> 3 of 4
# Expected values, by hand:
#   distances 5, 5, 13, 13 -> MED = 36 / 4 = 9; population std = sqrt((16 + 16 + 16 + 16) / 4) = 4 (ddof=1: 4.62)
#   median = (5 + 13) / 2 = 9; p90: sorted 5, 5, 13, 13, position 0.9 * 3 = 2.7 -> 13; max = 13
#   MEDx = (3 + 0 + 5 + 0) / 4 = 2; MEDy = (4 + 3 + 0 + 12) / 4 = 4.75; MEDz = (0 + 4 + 12 + 5) / 4 = 5.25
#   CPM@10 = 2 of 4 = 50 %; CPM@5 = 50 % (5 <= 5); CPM@4.99 = 0 %; CPM@Radius = 75 %
EXPECTED = {
    "n": 4,
    "med": 9.0,
    "std": 4.0,
    "med_x": 2.0,
    "med_y": 4.75,
    "med_z": 5.25,
    "median": 9.0,
    "p90": 13.0,
    "max": 13.0,
    "cpm": 50.0,
    "cpm_radius_mm": 10.0,
}


def assert_metrics(actual: dict, expected: dict) -> None:
    assert set(actual) == set(expected), set(actual) ^ set(expected)
    for key, value in expected.items():
        if isinstance(value, str):
            assert actual[key] == value, key
        else:
            assert actual[key] == pytest.approx(value, abs=1e-9), key


# ------------------------------------------------------------------------------------------------- array metrics
def test_cpm_at_radius_by_hand():
    assert cpm_at_radius(PRED, TRUTH, RADII) == pytest.approx(75.0)
    assert cpm_at_radius(PRED, TRUTH, [5.0, 5.0, 13.0, 13.0]) == pytest.approx(100.0)  # <= is inclusive
    assert cpm_at_radius(PRED, TRUTH, [4.99, 4.99, 12.99, 12.99]) == pytest.approx(0.0)
    assert cpm_at_radius(PRED, TRUTH, np.full(4, 10.0)) == pytest.approx(cpm(PRED, TRUTH, 10.0))


@pytest.mark.parametrize(
    "radii", [[5.0, 6.0, 14.0], [[5.0, 6.0, 14.0, 12.0]], [5.0, 0.0, 14.0, 12.0], [5.0, -1.0, 14.0, 12.0],
              [5.0, np.nan, 14.0, 12.0], [5.0, np.inf, 14.0, 12.0]]
)
def test_cpm_at_radius_rejects_bad_radii(radii):
    with pytest.raises(ValueError, match="radi"):
        cpm_at_radius(PRED, TRUTH, radii)


def test_landmark_summary_by_hand():
    summary = landmark_summary(PRED, TRUTH)
    assert_metrics(summary, {"n": 4, "mean": 9.0, "std": 4.0, "median": 9.0, "max": 13.0})
    # population std (ddof=0), not the sample std sqrt(64 / 3) = 4.62
    assert summary["std"] != pytest.approx(float(np.std([5, 5, 13, 13], ddof=1)))


def test_summarize_errors_by_hand():
    assert_metrics(summarize_errors(PRED, TRUTH), EXPECTED)
    assert_metrics(
        summarize_errors(PRED, TRUTH, cpm_radius_mm=5.0, radii_mm=RADII),
        {**EXPECTED, "cpm": 50.0, "cpm_radius_mm": 5.0, "cpm_radius": 75.0},
    )
    assert summarize_errors(PRED, TRUTH, cpm_radius_mm=4.99)["cpm"] == pytest.approx(0.0)
    assert summarize_errors(PRED, TRUTH, cpm_radius_mm=13.0)["cpm"] == pytest.approx(100.0)
    with pytest.raises(ValueError):
        summarize_errors(PRED, TRUTH, radii_mm=RADII[:3])


# ------------------------------------------------------------------------------------------------- point sets
def test_evaluate_point_sets_aligns_by_name():
    order = [2, 0, 3, 1]
    predicted = PointSet([NAMES[i] for i in order] + ["extra"], np.vstack([PRED[order], [[1e3, 1e3, 1e3]]]))
    truth = PointSet(NAMES, TRUTH)
    assert_metrics(evaluate_point_sets(predicted, truth), {**EXPECTED, "coordinate_system": "LPS"})
    # radii: in truth order, or by name
    by_seq = evaluate_point_sets(predicted, truth, radii_mm=RADII)
    by_name = evaluate_point_sets(predicted, truth, radii_mm={n: r for n, r in zip(NAMES[::-1], RADII[::-1])})
    assert by_seq["cpm_radius"] == pytest.approx(75.0) and by_name["cpm_radius"] == pytest.approx(75.0)
    assert evaluate_point_sets(predicted, truth, cpm_radius_mm=13.0)["cpm"] == pytest.approx(100.0)


@pytest.mark.parametrize("truth_system, predicted_system", [("RAS", "LPS"), ("LPS", "RAS"), ("RAS", "RAS")])
def test_evaluate_point_sets_converts_to_truth_system(truth_system, predicted_system):
    truth = PointSet(NAMES, convert_points(TRUTH, "LPS", truth_system), truth_system)
    predicted = PointSet(NAMES[::-1], convert_points(PRED, "LPS", predicted_system)[::-1], predicted_system)
    metrics = evaluate_point_sets(predicted, truth, radii_mm=RADII)
    assert_metrics(metrics, {**EXPECTED, "cpm_radius": 75.0, "coordinate_system": truth_system})


def test_evaluate_point_sets_missing_names():
    predicted = PointSet(["b", "d", "zzz"], PRED[[1, 3, 0]])
    with pytest.raises(SAMv2InputError) as info:
        evaluate_point_sets(predicted, PointSet(NAMES, TRUTH))
    assert info.value.source is None
    assert "'a'" not in str(info.value) and "a, c" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(SAMv2InputError, match="no radius for truth point.*: c"):
        evaluate_point_sets(PointSet(NAMES, PRED), PointSet(NAMES, TRUTH), radii_mm={"a": 1, "b": 1, "d": 1})
    with pytest.raises(TypeError):
        evaluate_point_sets(PRED, PointSet(NAMES, TRUTH))


# ------------------------------------------------------------------------------------------------- table
def test_format_metrics_table():
    plain = summarize_errors(PRED, TRUTH)
    with_r = summarize_errors(PRED, TRUTH, radii_mm=RADII)
    table = format_metrics_table({"method_a": plain, "long_method_b": with_r})
    lines = table.split("\n")
    assert len(lines) == 4
    header, units, row_a, row_b = lines
    assert header.split() == ["name", "n", "MED", "MEDx", "MEDy", "MEDz", "mean±std", "median", "p90", "max",
                              "CPM@10", "CPM@r"]
    assert units.split() == ["mm"] * 8 + ["%", "%"]
    assert row_b.split() == ["long_method_b", "4", "9.00", "2.00", "4.75", "5.25", "9.00±4.00", "9.00", "13.00",
                             "13.00", "50.00", "75.00"]
    assert row_a.split()[-1] == "-" and row_a.split()[-2] == "50.00"
    # fixed width: every value ends where its header ends
    assert header.index("CPM@10") + len("CPM@10") == row_a.index("50.00") + len("50.00")
    assert header.index("CPM@r") + len("CPM@r") == len(row_b)
    assert len({len(line) for line in (header, row_b)}) == 1
    # no CPM@Radius column when no row has it; the header shows the CPM radius used
    only = format_metrics_table({"x": summarize_errors(PRED, TRUTH, cpm_radius_mm=5)})
    assert only.split("\n")[0].split()[-1] == "CPM@5" and "CPM@r" not in only and "@10" not in only
    # rows from landmark_summary lack some keys
    assert "9.00±4.00" in format_metrics_table({"lm": landmark_summary(PRED, TRUTH)})
    with pytest.raises(ValueError):
        format_metrics_table({})


# ------------------------------------------------------------------------------------------------- pairs CSV
PAIRS_TEXT = """# coordinate_system: LPS, units: mm
name,template_x,template_y,template_z,query_x,query_y,query_z,radius_mm
lesion_1,-12.5,40.0,101.25,-10.0,38.5,99.0,6.5

lesion_2,1,2,3,4,5,6,2
"""


def test_read_point_pairs_example(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text(PAIRS_TEXT)
    pairs = read_point_pairs(path)
    assert pairs.names == ["lesion_1", "lesion_2"] and pairs.coordinate_system == "LPS" and len(pairs) == 2
    np.testing.assert_array_equal(pairs.template.coords, [[-12.5, 40.0, 101.25], [1, 2, 3]])
    np.testing.assert_array_equal(pairs.query.coords, [[-10.0, 38.5, 99.0], [4, 5, 6]])
    np.testing.assert_array_equal(pairs.radii_mm, [6.5, 2.0])
    ras = read_point_pairs(path, coordinate_system="RAS")
    assert ras.coordinate_system == "RAS" and ras.query.coordinate_system == "RAS"
    np.testing.assert_array_equal(ras.template.coords[0], [12.5, -40.0, 101.25])
    np.testing.assert_array_equal(ras.query.coords[1], [-4, -5, 6])
    np.testing.assert_array_equal(ras.radii_mm, [6.5, 2.0])
    assert is_point_pairs_file(path)


def test_read_point_pairs_without_comment_or_radius(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("name,template_x,template_y,template_z,query_x,query_y,query_z\np,1,2,3,4,5,6\n")
    pairs = read_point_pairs(path)
    assert pairs.radii_mm is None and pairs.coordinate_system == "LPS"
    ras = read_point_pairs(path, coordinate_system="RAS")  # no comment: the file is taken to be in RAS already
    np.testing.assert_array_equal(ras.query.coords, [[4, 5, 6]])


@pytest.mark.parametrize("system", ["LPS", "RAS"])
@pytest.mark.parametrize("with_radius", [True, False])
def test_point_pairs_round_trip(tmp_path, system, with_radius):
    template = PointSet(NAMES, convert_points(TRUTH - 1.0 / 3.0, "LPS", system), system)
    query = PointSet(NAMES, convert_points(PRED * np.pi, "LPS", system), system)
    pairs = PointPairs(template, query, RADII * 1.1 if with_radius else None)
    path = tmp_path / "sub" / "pairs.csv"
    write_point_pairs(pairs, path)
    assert path.read_text().startswith(f"# coordinate_system: {system}, units: mm\n")
    back = read_point_pairs(path)
    assert back.names == NAMES and back.coordinate_system == system
    np.testing.assert_array_equal(back.template.coords, template.coords)  # exact: repr round-trips floats
    np.testing.assert_array_equal(back.query.coords, query.coords)
    if with_radius:
        np.testing.assert_array_equal(back.radii_mm, RADII * 1.1)
    else:
        assert back.radii_mm is None and "radius_mm" not in path.read_text()
    # write converted: the file states the other system, the points are the same places
    other = "RAS" if system == "LPS" else "LPS"
    write_point_pairs(pairs, path, coordinate_system=other)
    back = read_point_pairs(path)
    assert back.coordinate_system == other
    np.testing.assert_allclose(back.to(system).query.coords, query.coords)
    assert list(path.parent.iterdir()) == [path]  # no temporary file left


def test_point_pairs_construction():
    query_ras = PointSet(NAMES, convert_points(PRED, "LPS", "RAS"), "RAS")
    pairs = PointPairs(PointSet(NAMES, TRUTH), query_ras)
    assert pairs.query.coordinate_system == "LPS"
    np.testing.assert_allclose(pairs.query.coords, PRED)
    with pytest.raises(SAMv2InputError, match="same names"):
        PointPairs(PointSet(NAMES, TRUTH), PointSet(NAMES[::-1], PRED))
    with pytest.raises(SAMv2InputError, match="positive"):
        PointPairs(PointSet(NAMES, TRUTH), PointSet(NAMES, PRED), [1.0, 2.0, 0.0, 1.0])
    with pytest.raises(SAMv2InputError, match="shape"):
        PointPairs(PointSet(NAMES, TRUTH), PointSet(NAMES, PRED), [1.0, 2.0])


def test_write_point_pairs_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "pairs.csv"
    path.write_text(PAIRS_TEXT)
    pairs = PointPairs(PointSet(NAMES, TRUTH), PointSet(NAMES, PRED))

    def broken(pairs, f):
        f.write("partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(point_pairs_module, "_write_pairs_csv", broken)
    with pytest.raises(RuntimeError):
        write_point_pairs(pairs, path)
    assert path.read_text() == PAIRS_TEXT and list(tmp_path.iterdir()) == [path]


def test_write_point_pairs_rejects(tmp_path):
    pairs = PointPairs(PointSet(NAMES, TRUTH), PointSet(NAMES, PRED))
    with pytest.raises(SAMv2InputError, match="extension"):
        write_point_pairs(pairs, tmp_path / "pairs.json")
    with pytest.raises(TypeError):
        write_point_pairs(PointSet(NAMES, TRUTH), tmp_path / "pairs.csv")
    assert list(tmp_path.iterdir()) == []


HEADER = "name,template_x,template_y,template_z,query_x,query_y,query_z"
BAD_FILES = {
    "empty": ("", "no header"),
    "comment only": ("# coordinate_system: LPS, units: mm\n", "no header"),
    "no rows": (HEADER + ",radius_mm\n\n", "no point pairs"),
    "missing columns": (HEADER.rsplit(",", 1)[0] + "\np,1,2,3,4,5\n", "missing columns: query_z"),
    "points file": ("name,x,y,z\np,1,2,3\n", "missing columns: template_x"),
    "duplicate columns": (HEADER + ",query_z\np,1,2,3,4,5,6,6\n", "duplicate columns: query_z"),
    "unknown column": (HEADER + ",radius\np,1,2,3,4,5,6,6\n", "unexpected columns: radius"),
    "non-numeric template": (HEADER + "\np,1,two,3,4,5,6\n", r"line 2 \(template\): y value 'two' is not a number"),
    "non-numeric query": (HEADER + "\np,1,2,3,4,5,\n", r"line 2 \(query\): z value '' is not a number"),
    "infinite": (HEADER + "\np,1,2,3,inf,5,6\n", "not a finite number"),
    "short row": (HEADER + "\np,1,2,3,4,5\n", "line 2: expected 7 values, found 6"),
    "duplicate names": (HEADER + "\np,1,2,3,4,5,6\np,1,2,3,4,5,6\n", "duplicate point name 'p'"),
    "empty name": (HEADER + "\n ,1,2,3,4,5,6\n", "no name"),
    "empty radius": (HEADER + ",radius_mm\np,1,2,3,4,5,6,1\nq,1,2,3,4,5,6,\n", "line 3: radius_mm value ''"),
    "zero radius": (HEADER + ",radius_mm\np,1,2,3,4,5,6,0\n", "radius_mm value '0' is not a positive"),
    "negative radius": (HEADER + ",radius_mm\np,1,2,3,4,5,6,-2\n", "radius_mm value '-2'"),
    "nan radius": (HEADER + ",radius_mm\np,1,2,3,4,5,6,nan\n", "radius_mm value 'nan'"),
    "text radius": (HEADER + ",radius_mm\np,1,2,3,4,5,6,big\n", "radius_mm value 'big'"),
    "bad system": ("# coordinate_system: XYZ, units: mm\n" + HEADER + "\np,1,2,3,4,5,6\n", "unknown coordinate system"),
    "bad units": ("# coordinate_system: LPS, units: cm\n" + HEADER + "\np,1,2,3,4,5,6\n", "units 'cm'"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_read_point_pairs_bad_files(tmp_path, case):
    text, message = BAD_FILES[case]
    path = tmp_path / "pairs.csv"
    path.write_text(text)
    with pytest.raises(SAMv2InputError, match=message) as info:
        read_point_pairs(path)
    assert info.value.source == str(path) and "\n" not in str(info.value)


def test_read_point_pairs_bad_paths(tmp_path):
    with pytest.raises(SAMv2InputError, match="does not exist") as info:
        read_point_pairs(tmp_path / "missing.csv")
    assert info.value.source == str(tmp_path / "missing.csv")
    wrong = tmp_path / "pairs.txt"
    wrong.write_text(PAIRS_TEXT)
    with pytest.raises(SAMv2InputError, match="extension '.txt'"):
        read_point_pairs(wrong)
    binary = tmp_path / "binary.csv"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(SAMv2InputError, match="UTF-8"):
        read_point_pairs(binary)
    assert not is_point_pairs_file(wrong) and not is_point_pairs_file(binary)
    assert not is_point_pairs_file(tmp_path / "missing.csv")


# ------------------------------------------------------------------------------------------------- CLI
def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, encoding="utf-8", errors="replace", cwd=REPO, env=env, timeout=120
    )


@pytest.fixture
def cli_files(tmp_path):
    pairs = PointPairs(PointSet(NAMES, TRUTH - 7.0), PointSet(NAMES, TRUTH), RADII)
    write_point_pairs(pairs, tmp_path / "pairs.csv")
    order = [3, 1, 0, 2]  # shuffled, in RAS, with an extra point and extra columns
    predicted = PointSet(
        [NAMES[i] for i in order] + ["unrelated"],
        convert_points(np.vstack([PRED[order], [[0.0, 0.0, 0.0]]]), "LPS", "RAS"),
        "RAS",
        {"score": [0.9, 0.8, 0.7, 0.6, 0.5], "method": ["nn"] * 5},
    )
    write_points(predicted, tmp_path / "matched.csv")
    write_points(PointSet(NAMES, convert_points(TRUTH, "LPS", "RAS"), "RAS"), tmp_path / "truth.mrk.json")
    return tmp_path


def test_cli_pairs_truth(cli_files):
    output = cli_files / "out" / "metrics.json"
    result = run_cli("--predicted", str(cli_files / "matched.csv"), "--truth", str(cli_files / "pairs.csv"),
                     "--output", str(output))
    assert result.returncode == 0, result.stderr
    row = next(line for line in result.stdout.splitlines() if line.startswith("matched.csv"))
    assert row.split() == ["matched.csv", "4", "9.00", "2.00", "4.75", "5.25", "9.00±4.00", "9.00", "13.00",
                           "13.00", "50.00", "75.00"]
    metrics = json.loads(output.read_text())
    assert_metrics(metrics, {**EXPECTED, "cpm_radius": 75.0, "coordinate_system": "LPS",
                             "predicted": str(cli_files / "matched.csv"), "truth": str(cli_files / "pairs.csv")})


@pytest.mark.slow
def test_cli_points_truth_and_radius(cli_files):
    result = run_cli("--predicted", str(cli_files / "matched.csv"), "--truth", str(cli_files / "truth.mrk.json"),
                     "--cpm_radius_mm", "13")
    assert result.returncode == 0, result.stderr
    header = result.stdout.splitlines()[0]
    assert "CPM@13" in header and "CPM@r" not in header
    row = next(line for line in result.stdout.splitlines() if line.startswith("matched.csv"))
    assert row.split()[1:3] == ["4", "9.00"] and row.split()[-1] == "100.00"
    assert "RAS" in result.stdout


@pytest.mark.parametrize(
    "case", ["missing predicted", "bad pairs", "bad points truth", "missing names", "bad radius option"]
)
@pytest.mark.slow
def test_cli_reports_bad_input(cli_files, case):
    predicted, truth, extra = cli_files / "matched.csv", cli_files / "pairs.csv", []
    if case == "missing predicted":
        predicted = bad = cli_files / "nothing.csv"
    elif case == "bad pairs":
        truth = bad = cli_files / "bad_pairs.csv"
        bad.write_text(HEADER + ",radius_mm\np,1,2,3,4,5,x,1\n")
    elif case == "bad points truth":
        truth = bad = cli_files / "bad.json"
        bad.write_text("{not json")
    elif case == "missing names":
        predicted = bad = cli_files / "few.csv"
        write_points(PointSet(["a", "b"], PRED[:2]), predicted)
    else:
        bad, extra = "--cpm_radius_mm", ["--cpm_radius_mm", "-1"]
    output = cli_files / "metrics.json"
    result = run_cli("--predicted", str(predicted), "--truth", str(truth), "--output", str(output), *extra)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ERROR: {bad}: "), result.stderr
    assert "Traceback" not in result.stderr and not output.exists()
    if case == "missing names":
        assert "c, d" in lines[0]
