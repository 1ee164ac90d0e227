"""``scripts/reference_uncertainty.py`` on a synthetic CT and its rigidly moved copy: a reference 4 mm off shows as
about 4 mm in every slab's row; a reference file without a matrix is one clear error line and no output."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

sitk = pytest.importorskip("SimpleITK")

from samv2_components.geometry import apply_matrix, axis_angle_rotation, rigid_matrix  # noqa: E402
from samv2_components.registration import benchmark_cases as bc  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "reference_uncertainty.py")


def _pair(tmp_path):
    """A 3 mm "CT" (-1000 HU air, a 0 HU box body with asymmetric inner structures) and the "MR": the CT + 1000
    moved by a known rigid ``truth`` (CT LPS -> MR LPS)."""
    size, spacing = 40, 3.0
    z, y, x = np.meshgrid(*[np.arange(size)] * 3, indexing="ij")
    origin = -spacing * (size - 1) / 2.0
    X, Y, Z = origin + spacing * x, origin + spacing * y, origin + spacing * z
    a = np.full((size, size, size), -1000.0, np.float32)
    a[(abs(X) < 45) & (abs(Y) < 35) & (abs(Z) < 50)] = 0.0
    a[(abs(X + 20) < 8) & (abs(Y - 10) < 12) & (abs(Z) < 30)] = 400.0
    a[(abs(X - 15) < 10) & (abs(Y + 15) < 6) & (abs(Z - 20) < 10)] = -300.0
    a[(X - 12) ** 2 + (Y + 10) ** 2 + (Z - 15) ** 2 <= 36.0] = 3000.0
    ct = sitk.GetImageFromArray(a)
    ct.SetSpacing([spacing] * 3)
    ct.SetOrigin([origin] * 3)
    truth = rigid_matrix(axis_angle_rotation([0.2, 1, 0.3], 6.0), translation=(5.0, -4.0, 3.0))
    corners = apply_matrix(truth, bc.box_corners(*bc.grid_box(ct)))
    mr = bc.case_image(ct + 1000.0, truth, corners.min(0), corners.max(0), 3.0)
    ct_path, mr_path = str(tmp_path / "ct.nii.gz"), str(tmp_path / "mr.nii.gz")
    sitk.WriteImage(ct, ct_path)
    sitk.WriteImage(mr, mr_path)
    return ct_path, mr_path, truth


def _run(*args):
    return subprocess.run([sys.executable, SCRIPT, *args, "--deformable_grids", "", "--starts", "2", "--thickness_mm",
                           "45", "--step_mm", "25"], capture_output=True, text=True, cwd=ROOT)


def test_a_reference_4_mm_off_shows_in_every_slab(tmp_path):
    ct_path, mr_path, truth = _pair(tmp_path)
    reference = tmp_path / "reference.json"
    reference.write_text(json.dumps({"fixed_to_moving": (rigid_matrix(translation=(0.0, 4.0, 0.0)) @ truth).tolist()}))
    output = tmp_path / "table.md"
    result = _run("--ct", ct_path, "--mr", mr_path, "--reference", str(reference), "--output", str(output))
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in output.read_text().splitlines()
            if line.startswith("| ") and " .. " in line]
    assert len(rows) >= 2
    for row in rows:
        assert 2.5 < float(row[2]) < 5.5  # the optimum sits at the truth, 4 mm from this reference
        assert abs(float(row[4].split()[1]) + 4.0) < 1.5  # and the shift is the reference's error, undone (LPS y)


def test_a_reference_without_a_matrix_is_one_clear_line(tmp_path):
    ct_path, mr_path, _ = _pair(tmp_path)
    reference = tmp_path / "reference.json"
    reference.write_text(json.dumps({"convention": "no matrix here"}))
    output = tmp_path / "table.md"
    result = _run("--ct", ct_path, "--mr", mr_path, "--reference", str(reference), "--output", str(output))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert str(reference) in result.stderr and "fixed_to_moving" in result.stderr
    assert not output.exists()
