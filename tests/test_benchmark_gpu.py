"""The GPU timing command (``scripts/benchmark_gpu.py``), smoke-tested on the CPU with a tiny volume."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "benchmark_gpu.py")


def test_cpu_smoke_run_prints_both_widths_and_the_speed_up(tmp_path):
    output = tmp_path / "gpu.md"
    result = subprocess.run([sys.executable, SCRIPT, "--device", "cpu", "--size", "16,32,32", "--repeats", "1",
                             "--train_steps", "0", "--output", str(output)], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    table = output.read_text()
    rows = [line for line in table.splitlines() if line.startswith("| 1 |") or line.startswith("| 0.25 |")]
    assert len(rows) == 4 and not any("failed" in row for row in rows)  # fp32 and bf16 for each width
    # which bf16 row is fastest on a 16 x 32 x 32 volume depends on the machine's load (no timing asserted here)
    assert re.search(r"Speed-up in this run: width (1|0\.25) in bf16 \([0-9.]+ s\) is [0-9.]+x faster than the "
                     r"full-width fp32 pass \([0-9.]+ s\)", table), table[-400:]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_requested_without_cuda_is_one_clear_line():
    result = subprocess.run([sys.executable, SCRIPT, "--train_steps", "0"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        "benchmark_gpu: --device cuda requested but CUDA is not available on this machine")
