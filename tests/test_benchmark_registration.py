"""The registration benchmark's pieces (``scripts/benchmark_registration.py``; :mod:`~samv2_components.registration.
benchmark_cases`, :mod:`~samv2_components.registration.benchmark_reference`,
:mod:`~samv2_components.registration.benchmark_methods`): the case composition (T_case = D @ T_ref agrees with how
the moving image is resampled), the TRE, the reference derivation on a synthetic pair, transform conventions
(SimpleITK, elastix parameter maps, the ANTs helper on a synthetic known transform) and the box-plot writer. No
network and no real data: synthetic images only."""

from __future__ import annotations

import os

import numpy as np
import pytest

sitk = pytest.importorskip("SimpleITK")

from samv2_components.geometry import apply_matrix, axis_angle_rotation, rigid_matrix  # noqa: E402
from samv2_components.registration import benchmark_cases as bc  # noqa: E402
from samv2_components.registration import benchmark_methods as methods  # noqa: E402
from samv2_components.registration.intensity_baselines import (  # noqa: E402
    matrix_to_sitk_transform,
    sitk_transform_to_matrix,
)
from samv2_components.visualize import write_boxplot  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
ANTS_PYTHON = os.path.join(ROOT, ".venv-ants", "bin", "python")
ANTS_HELPER = os.path.join(ROOT, "scripts", "_ants_rigid.py")


def _synthetic_ct(ball_lps, size=48, spacing=3.0) -> "sitk.Image":
    """A -1000 HU volume with a 0 HU box 'body' (with a few inner structures) and a 3000 HU ball at ``ball_lps``."""
    z, y, x = np.meshgrid(*[np.arange(size)] * 3, indexing="ij")
    origin = -spacing * (size - 1) / 2.0
    X, Y, Z = origin + spacing * x, origin + spacing * y, origin + spacing * z
    a = np.full((size, size, size), -1000.0, np.float32)
    a[(abs(X) < 45) & (abs(Y) < 35) & (abs(Z) < 50)] = 0.0
    a[(abs(X + 20) < 8) & (abs(Y - 10) < 12) & (abs(Z) < 30)] = 400.0  # asymmetric structures
    a[(abs(X - 15) < 10) & (abs(Y + 15) < 6) & (abs(Z - 20) < 10)] = -300.0
    bx, by, bz = ball_lps
    a[(X - bx) ** 2 + (Y - by) ** 2 + (Z - bz) ** 2 <= 6.0**2] = 3000.0
    img = sitk.GetImageFromArray(a)
    img.SetSpacing([spacing] * 3)
    img.SetOrigin([origin] * 3)
    return img


def _bright_centroid(image, threshold=1500.0) -> np.ndarray:
    a = sitk.GetArrayFromImage(image)
    idx = np.argwhere(a > threshold)
    w = a[tuple(idx.T)]
    return (bc.voxel_centres(image, idx) * w[:, None]).sum(0) / w.sum()


def test_tre_on_hand_computed_matrices():
    points = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    shift = rigid_matrix(translation=(3.0, 4.0, 0.0))
    assert bc.tre(shift, np.eye(4), points) == pytest.approx(5.0)
    rot = rigid_matrix(np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]))  # 90 deg about z
    # (1,0,0) -> (0,1,0): sqrt(2); (0,2,0) -> (-2,0,0): 2 sqrt(2)
    assert bc.tre(rot, np.eye(4), points) == pytest.approx(1.5 * np.sqrt(2.0))
    assert bc.tre(rot, rot, points) == pytest.approx(0.0)
    # rotation about a centre: the centre stays put
    about = rigid_matrix(axis_angle_rotation([0, 0, 1], 90.0), centre=(1.0, 0.0, 0.0))
    assert np.allclose(apply_matrix(about, [1.0, 0.0, 0.0]), [[1.0, 0.0, 0.0]])
    assert np.allclose(apply_matrix(about, [2.0, 0.0, 0.0]), [[1.0, 1.0, 0.0]])


def test_matrix_transform_round_trip_and_cube_rotations():
    m = rigid_matrix(axis_angle_rotation([1, 2, 3], 33.0), translation=(5, -7, 2), centre=(10, 20, -30))
    t = matrix_to_sitk_transform(m)
    assert np.allclose(sitk_transform_to_matrix(t), m)
    p = np.array([[1.0, 2.0, 3.0], [-40.0, 5.0, 60.0]])
    assert np.allclose([t.TransformPoint(q) for q in p.tolist()], apply_matrix(m, p))
    rots = bc.cube_rotations()
    assert len(rots) == 24 and np.allclose(rots[0], np.eye(3))
    assert all(np.isclose(np.linalg.det(r), 1.0) for r in rots)
    assert len({tuple(r.astype(int).ravel()) for r in rots}) == 24


def test_case_image_moves_a_ball_to_the_case_transform():
    """case_image resamples M(y) = MR(D^-1(y)): a ball at q in the MR appears at D(q)."""
    ball = np.array([10.0, -6.0, 12.0])
    mr = _synthetic_ct(ball)
    offset = rigid_matrix(axis_angle_rotation([0.3, -1.0, 0.4], 17.0), translation=(25.0, -12.0, 30.0), centre=(0, 0, 0))
    corners = apply_matrix(offset, bc.box_corners(*bc.grid_box(mr)))
    moving = bc.case_image(mr, offset, corners.min(0), corners.max(0), 2.0)
    assert np.linalg.norm(_bright_centroid(moving) - apply_matrix(offset, ball)[0]) < 1.0


def _write_ct_and_mr(tmp_path, ct, reference):
    """The "MR" (the CT resampled on a 3 mm grid so that the CT point p shows at reference(p), air 0 like an MR)
    and the two files; returns ``(mr, ct_path, mr_path)``."""
    corners = apply_matrix(reference, bc.box_corners(*bc.grid_box(ct)))
    mr = bc.case_image(ct + 1000.0, reference, corners.min(0), corners.max(0), 3.0)
    ct_path, mr_path = str(tmp_path / "ct.nii.gz"), str(tmp_path / "mr.nii.gz")
    sitk.WriteImage(ct, ct_path)
    sitk.WriteImage(mr, mr_path)
    return mr, ct_path, mr_path


def test_make_cases_truth_composes_offset_and_reference(tmp_path):
    """A bright ball at p in the fixed image appears in each case's moving image at T_case(p) = D(T_ref(p))."""
    ball = np.array([-5.0, 8.0, -4.0])
    ct = _synthetic_ct(ball)
    reference = rigid_matrix(axis_angle_rotation([0, 1, 0], 180.0) @ axis_angle_rotation([1, 0, 0], 8.0),
                                translation=(6.0, -9.0, 4.0))
    mr, ct_path, mr_path = _write_ct_and_mr(tmp_path, ct, reference)
    assert np.linalg.norm(_bright_centroid(mr, 2500) - apply_matrix(reference, ball)[0]) < 1.0
    cases = bc.make_cases(3, seed=1, reference=reference, work_dir=str(tmp_path / "cases"), ct_path=ct_path,
                          mr_path=mr_path, keep_range=(0.9, 0.95), tre_spacing_mm=6.0, min_points=20)
    assert len(cases) == 3
    for case in cases:
        assert np.allclose(case.truth, case.offset @ reference)
        pts = np.array([[0.0, 0.0, 0.0], [30.0, -20.0, 10.0]])
        assert np.allclose(apply_matrix(case.truth, pts), apply_matrix(case.offset, apply_matrix(reference, pts)))
        moving = sitk.ReadImage(case.moving_path)
        expected = apply_matrix(case.truth, ball)[0]
        assert bc.image_box_contains(moving, [expected], -4.0)[0], "the ball was cropped away"
        assert np.linalg.norm(_bright_centroid(moving, 2500) - expected) < 1.5, case.name
        # the TRE points map inside the moving image
        assert len(case.points) >= 20 and bc.image_box_contains(moving, apply_matrix(case.truth, case.points), 0.0).all()
        assert case.info["rotation_deg"] <= 20.0 and np.all(np.abs(case.info["translation_mm"]) <= 40.0)


def test_slab_cases_cut_the_moving_scan_to_an_axial_slab(tmp_path):
    """``slab_mm``: the moving image spans only the drawn thickness along z (LPS), and the truth still composes."""
    ball = np.array([-5.0, 8.0, -4.0])
    ct = _synthetic_ct(ball)
    reference = rigid_matrix(axis_angle_rotation([1, 0, 0], 8.0), translation=(6.0, -9.0, 4.0))
    mr, ct_path, mr_path = _write_ct_and_mr(tmp_path, ct, reference)
    cases = bc.make_cases(2, seed=3, reference=reference, work_dir=str(tmp_path / "cases"), ct_path=ct_path,
                          mr_path=mr_path, slab_mm=(30.0, 40.0), tre_spacing_mm=6.0, min_points=20, spacing_mm=3.0)
    for case in cases:
        thickness = case.info["crop_keep"]["slab_mm"]
        assert 30.0 <= thickness <= 40.0 and set(case.info["crop_keep"]) == {"slab_mm"}
        lo, hi = bc.grid_box(sitk.ReadImage(case.moving_path))
        assert thickness - 3.0 <= hi[2] - lo[2] <= thickness + 3.0 + 1e-6  # one 3 mm voxel of rounding either side
        assert np.allclose(case.truth, case.offset @ reference)
        assert bc.image_box_contains(sitk.ReadImage(case.moving_path), apply_matrix(case.truth, case.points), 0.0).all()


def test_case_sets_draw_what_their_names_say(monkeypatch):
    drawn = {}
    monkeypatch.setattr(bc, "make_cases", lambda n, seed, reference, work_dir, **kw: drawn.setdefault(kw["prefix"], kw) and [])
    reference = rigid_matrix(axis_angle_rotation([0, 1, 0], 178.0), translation=(1.0, 2.0, 3.0))
    for kind in ("aligned", "acquired", "slab", "hard"):
        bc.make_case_set(kind, 2, 0, reference, "/unused", "ct.nii.gz", "mr.nii.gz")
    assert drawn["acquired_"]["pre_rotation"] is None and drawn["aligned_"]["pre_rotation"] is not None
    assert drawn["slab_"]["slab_mm"] == (30.0, 60.0) and "max_rotation_deg" not in drawn["slab_"]
    assert drawn["hard_"]["max_rotation_deg"] == 45.0 and drawn["hard_"]["max_translation_mm"] == 80.0
    with pytest.raises(ValueError, match="case set must be one of"):
        bc.make_case_set("sideways", 2, 0, reference, "/unused", "ct.nii.gz", "mr.nii.gz")


def test_native_case_is_the_pair_as_it_comes(tmp_path):
    """The 'native' set: no offset and no crop, so the truth is the reference and the moving image spans the MR."""
    ball = np.array([-5.0, 8.0, -4.0])
    ct = _synthetic_ct(ball)
    reference = rigid_matrix(axis_angle_rotation([0, 1, 0], 180.0), translation=(6.0, -9.0, 4.0))
    mr, ct_path, mr_path = _write_ct_and_mr(tmp_path, ct, reference)
    (case,) = bc.make_cases(1, seed=0, reference=reference, work_dir=str(tmp_path / "cases"), ct_path=ct_path,
                            mr_path=mr_path, max_rotation_deg=0.0, max_translation_mm=0.0, crop=False,
                            tre_spacing_mm=6.0, min_points=20, spacing_mm=3.0)
    np.testing.assert_allclose(case.offset, np.eye(4), atol=1e-9)
    np.testing.assert_allclose(case.truth, reference, atol=1e-9)
    assert case.info["crop_keep"] == {}
    moving = sitk.ReadImage(case.moving_path)
    lo, hi = bc.grid_box(moving)
    mr_lo, mr_hi = bc.grid_box(mr)
    np.testing.assert_allclose(lo, mr_lo, atol=1e-6)
    np.testing.assert_allclose(hi, mr_hi, atol=1e-6)


def test_elastix_euler_map_to_matrix():
    c, t = np.array([10.0, -5.0, 3.0]), np.array([1.0, 2.0, -3.0])
    pmap = {"Transform": ("EulerTransform",), "TransformParameters": ("0", "0", str(np.pi / 2), *map(str, t)),
            "CenterOfRotationPoint": tuple(map(str, c)), "ComputeZYX": ("false",)}
    expected = rigid_matrix(axis_angle_rotation([0, 0, 1], 90.0), translation=t, centre=c)
    assert np.allclose(methods.elastix_to_matrix(pmap), expected, atol=1e-9)
    # Euler order (ITK Euler3D, ZXY): R = Rz Rx Ry
    rx, ry, rz = 0.1, -0.2, 0.3
    pmap["TransformParameters"] = tuple(map(str, (rx, ry, rz, 0, 0, 0)))
    expected = axis_angle_rotation([0, 0, 1], np.degrees(rz)) @ axis_angle_rotation([1, 0, 0], np.degrees(rx)) @ axis_angle_rotation([0, 1, 0], np.degrees(ry))
    assert np.allclose(methods.elastix_to_matrix(pmap)[:3, :3], expected, atol=1e-9)


def _known_pair(tmp_path):
    ct = _synthetic_ct([12.0, -10.0, 15.0]) + 1000.0
    truth = rigid_matrix(axis_angle_rotation([1.0, 2.0, 0.5], 8.0), translation=(6.0, -4.0, 5.0), centre=(0, 0, 0))
    moving = bc.case_image(ct, truth, *bc.grid_box(ct), 3.0)
    fixed_path, moving_path = str(tmp_path / "f.nii.gz"), str(tmp_path / "m.nii.gz")
    sitk.WriteImage(ct, fixed_path)
    sitk.WriteImage(moving, moving_path)
    points = bc.body_grid_points(ct - 1000.0, 6.0)
    assert bc.tre(np.eye(4), truth, points) > 8.0 and bc.tre(np.linalg.inv(truth), truth, points) > 8.0
    return fixed_path, moving_path, truth, points


@pytest.mark.skipif(methods.ants_available(ANTS_PYTHON) != "", reason="no ANTs environment (.venv-ants with antspyx)")
def test_ants_helper_recovers_a_known_fixed_to_moving_transform(tmp_path):
    fixed_path, moving_path, truth, points = _known_pair(tmp_path)
    out = methods.ants_rigid(fixed_path, moving_path, ANTS_PYTHON, ANTS_HELPER, threads=1)
    assert bc.tre(np.asarray(out["fixed_to_moving"]), truth, points) < 1.0


def test_simpleitk_matrix_convention_on_a_known_transform(tmp_path):
    fixed_path, moving_path, truth, points = _known_pair(tmp_path)
    res = methods.SimpleITKMethod()(bc.Case("x", fixed_path, moving_path, truth, truth, points))
    assert bc.tre(res.matrix, truth, points) < 1.0


@pytest.mark.slow
def test_elastix_matrix_convention_on_a_known_transform(tmp_path):  # ~10 s of ITK lazy loading
    pytest.importorskip("itk")
    fixed_path, moving_path, truth, points = _known_pair(tmp_path)
    res = methods.ElastixMethod(threads=1)(bc.Case("x", fixed_path, moving_path, truth, truth, points))
    assert not res.failed and bc.tre(res.matrix, truth, points) < 1.0


def test_boxplot_writer_makes_a_png(tmp_path):
    from PIL import Image

    path = write_boxplot(str(tmp_path / "box.png"), {
        "SAMv2 AdaReg rigid": [2.1, 3.5, 4.0, 5.2, 80.0],
        "SimpleITK rigid (Mattes MI)": [1.0, 150.0, 160.0, 0.2, np.inf],
        "one case": [7.0],
        "no cases": [],
    }, failed={"SAMv2 AdaReg rigid": [False, False, False, False, True]})
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size[0] >= 520 and img.size[1] == 520
        colours = img.convert("RGB").getcolors(maxcolors=100000)
        assert colours is not None and len(colours) > 5  # not blank


def test_derive_reference_recovers_a_known_rigid_transform(tmp_path):
    """Multi-start Mattes MI on a small synthetic pair (the "MR" is the CT turned head-to-foot plus 7 deg and
    moved, air 0) finds the transform that made it: within 2 mm over the body and 2 deg."""
    from samv2_components.registration.benchmark_reference import derive_reference

    ct = _synthetic_ct([12.0, -10.0, 15.0], size=40)
    truth = rigid_matrix(axis_angle_rotation([0, 1, 0], 180.0) @ axis_angle_rotation([1, 0.3, 0], 7.0),
                         translation=(8.0, -6.0, 5.0))
    corners = apply_matrix(truth, bc.box_corners(*bc.grid_box(ct)))
    mr = bc.case_image(ct + 1000.0, truth, corners.min(0), corners.max(0), 3.0)
    ct_path, mr_path = str(tmp_path / "ct.nii.gz"), str(tmp_path / "mr.nii.gz")
    sitk.WriteImage(ct, ct_path)
    sitk.WriteImage(mr, mr_path)
    ref = derive_reference(ct_path, mr_path, ct_path, mr_path, top_k=2, n_perturbed=1, log=lambda msg: None)
    found = np.asarray(ref["fixed_to_moving"])
    points = bc.body_grid_points(ct, 6.0)
    assert bc.tre(found, truth, points) < 2.0
    assert bc.rotation_angle_deg(found[:3, :3].T @ truth[:3, :3]) < 2.0
    assert len(ref["starts"]) == 24 and ref["fiducial_check"]["possible"]  # the 3000 HU ball is a "marker"


def test_slab_optima_find_the_truth_beside_a_wrong_reference(tmp_path):
    """Each axial slab registered alone lands on the transform that made the pair (within 1.5 mm over its points),
    so a reference 4 mm off shows as 4 mm in every slab, and the starts agree."""
    from samv2_components.registration.benchmark_reference import slab_optima

    ct = _synthetic_ct([12.0, -10.0, 15.0], size=40)
    truth = rigid_matrix(axis_angle_rotation([0.2, 1, 0.3], 6.0), translation=(5.0, -4.0, 3.0))
    mr, _, _ = _write_ct_and_mr(tmp_path, ct, truth)
    wrong = rigid_matrix(translation=(4.0, 0.0, 0.0)) @ truth
    rows = slab_optima(ct, mr, wrong, thickness_mm=45.0, step_mm=25.0, starts=3, point_spacing_mm=6.0)
    assert [r["z_mm"][1] - r["z_mm"][0] for r in rows] == [45.0] * len(rows) and len(rows) >= 2
    for r in rows:
        points = r["points"]
        assert len(points) >= 4 and (points[:, 2] >= r["z_mm"][0]).all() and (points[:, 2] <= r["z_mm"][1]).all()
        assert bc.tre(r["optimum"], truth, points) < 1.5
        assert 2.5 < r["to_reference_mm"] < 5.5
        assert r["start_spread_mm"] < 1.5
        assert r["mi_optimum"] < r["mi_reference"]  # Mattes MI: lower is better
        assert abs(r["shift_mm"][0] + 4.0) < 1.5


def test_summary_merges_runs_and_counts_refusals_apart_from_wrong_transforms(tmp_path):
    """``scripts/summarize_registration_benchmark.py``: two runs' CSVs over the same cases become one table per
    set and method; a refusal is not a wrong transform; the same case twice is an error."""
    import subprocess
    import sys

    header = "set,case,method,tre_mm,success,reported_failure,wall_s,offset_rotation_deg,offset_translation_mm,crop_keep,n_points,note\n"
    a = tmp_path / "a.csv"
    a.write_text(header + "aligned,aligned_00,identity (no registration),50.0,,0,,1.0,0 0 0,,100,\n"
                 "aligned,aligned_00,m,2.0,1,0,10.0,1.0,0 0 0,,100,\n"
                 "aligned,aligned_01,m,60.0,0,1,20.0,1.0,0 0 0,,100,refused\n")
    b = tmp_path / "b.csv"
    b.write_text(header + "aligned,aligned_02,m,30.0,0,0,30.0,1.0,0 0 0,,100,\n"
                 "slab,slab_00,m,4.0,1,0,5.0,1.0,0 0 0,,100,\n")
    script = os.path.join(os.path.dirname(__file__), "..", "scripts", "summarize_registration_benchmark.py")
    out = subprocess.run([sys.executable, script, "--csv", f"{a},{b}"], capture_output=True, text=True, check=True).stdout
    rows = [line for line in out.splitlines() if line.startswith("| aligned") or line.startswith("| slab")]
    # aligned: 1 of 3 within 10 mm (33 %), its TRE 2.0, 1 refusal, 1 wrong transform written, 20 s per case
    assert rows == ["| aligned | m | 3 | 33 | 2.0 | 1 | 1 | 20.0 |", "| slab | m | 1 | 100 | 4.0 | 0 | 0 | 5.0 |"]
    overlap = subprocess.run([sys.executable, script, "--csv", f"{a},{a}"], capture_output=True, text=True)
    assert overlap.returncode == 2 and overlap.stderr.startswith("ERROR: --csv: case aligned_00") and "appears twice" in overlap.stderr


def test_dumped_case_replays_the_selection_with_changed_rules(tmp_path):
    """``run_cases --dump_dir`` writes each candidate's TRE against the case's truth; ``scripts/replay_selection.py``
    replays the selection from that record: as recorded a near tie between the right answer and one 20 mm off is a
    refusal, with no MI margin the right answer (higher MI) is written."""
    import subprocess
    import sys

    from samv2_components.registration.selection import ScoredCandidate, select_candidate

    truth = rigid_matrix(axis_angle_rotation([0, 0, 1], 10.0), [5.0, -3.0, 2.0])
    points = np.stack(np.meshgrid(*[np.linspace(-40, 40, 5)] * 3, indexing="ij"), -1).reshape(-1, 3)
    shifted = truth.copy()
    shifted[2, 3] += 20.0
    candidates = [ScoredCandidate("header", truth, mi=0.50, support=0.1, overlap_fraction=0.9, edges=0.30),
                  ScoredCandidate("adareg", shifted, mi=0.49, support=0.1, overlap_fraction=0.9, edges=0.30)]
    selection = select_candidate(candidates, points, min_support=0.0)
    assert not selection.success  # 2 % apart in MI: refused

    class Runner:
        name = "pipeline"

        def __call__(self, case):
            return methods.MethodResult(None, 1.0, True, selection.reason, record={"candidates": selection.record})

    case = bc.Case("slab_00", "f.nii.gz", "m.nii.gz", np.eye(4), truth, points, {"rotation_deg": 10.0})
    rows = methods.run_cases([case], [Runner()], 10.0, log=lambda m: None, dump_dir=str(tmp_path / "dump"))
    assert rows[-1]["failed"]
    (dumped,) = (tmp_path / "dump").glob("*.json")
    import json

    record = json.loads(dumped.read_text())
    tres = {c["name"]: c["tre_mm"] for c in record["record"]["candidates"]["candidates"]}
    assert tres["header"] == pytest.approx(0.0, abs=1e-3) and tres["adareg"] == pytest.approx(20.0, abs=1e-3)
    assert np.allclose(record["truth"], truth)

    script = os.path.join(ROOT, "scripts", "replay_selection.py")
    out = subprocess.run([sys.executable, script, str(tmp_path / "dump"), "--rules", "{'mi_margin': 0.0}", "--cases"],
                         capture_output=True, text=True, check=True).stdout
    rows = [line for line in out.splitlines() if line.startswith("| ")][1:]
    assert rows[0].startswith("| as recorded | 0 / 1 / 0 |")
    assert rows[1].startswith('| {"mi_margin": 0.0} | 1 / 0 / 0 |') and rows[1].endswith("| 0.00 |")
    assert "slab_00: refused None (- mm) -> solved header (0.0 mm)" in out
    for bad, why in (("{'mi_marign': 0.0}", "unknown rule(s) mi_marign"), ("{oops", "not a Python dict")):
        run = subprocess.run([sys.executable, script, str(tmp_path / "dump"), "--rules", bad], capture_output=True, text=True)
        assert run.returncode == 1 and run.stderr.startswith("ERROR: --rules: ") and why in run.stderr
        assert len(run.stderr.strip().splitlines()) == 1 and run.stdout == ""
