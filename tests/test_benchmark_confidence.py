"""The confidence benchmark (``scripts/benchmark_confidence.py``), run on the shipped sample CT with few points."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from samv2_components.sample_data import sample_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "benchmark_confidence.py")
MODEL = os.path.join(ROOT, "bundles", "samv2_matching", "models", "model.pt")


@pytest.mark.skipif(not os.path.isfile(MODEL), reason="needs the shipped model")
def test_the_table_counts_every_point_once_and_the_checks_only_remove(tmp_path):
    output = tmp_path / "confidence.md"
    scan = sample_path("ct_abdomen")
    result = subprocess.run([sys.executable, SCRIPT, "--scans", f'["{scan}"]', "--num_points", "30",
                             "--output", str(output)], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in output.read_text().splitlines() if line.startswith("| ct_abdomen") or line.startswith("| **all**")}
    assert rows["ct_abdomen"] == rows["**all**"]  # one scan: the total is that scan
    points, before, wrong_before, after, wrong_after, right_unflagged, distinct = rows["ct_abdomen"]
    assert int(points) == 30
    assert int(after) <= int(before) <= 30 and int(wrong_after) <= int(wrong_before.split(" / ")[0])
    assert int(before) - int(after) >= int(right_unflagged)
    unflag_right, unflag_wrong = (int(v) for v in distinct.split(" / "))
    assert unflag_right + unflag_wrong <= int(before)
    assert int(before) >= 20  # the template against a small known transform of itself: most answers are confident
