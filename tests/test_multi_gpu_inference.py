"""Cohort-scale inference under torchrun (``configs/multi_gpu_inference.json``, ``inference/sharding.py``), on CPU
with the gloo backend: each rank embeds its share of the scans, the outputs equal a single-process run's, rank 0
prints every result folder and writes one ``run_summary.json``; more ranks than scans and a bad scan on one rank
are handled. The 2-process run is the default suite's smoke test; the rest is ``slow``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from samv2_components.inference.sharding import rank_share
from samv2_components.sample_data import sample_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {b: [os.path.join(ROOT, "bundles", b, "configs", n) for n in ("inference.json", "multi_gpu_inference.json")]
           for b in ("semantic_sam", "samv2_matching")}
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _scans(folder, n, bad=()):
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(n):
        path = os.path.join(folder, f"scan{i}.nii.gz")
        if i in bad:
            open(path, "wb").close()  # an empty file: a bad scan
        else:
            shutil.copy(sample_path("ct_abdomen"), path)
        paths.append(path)
    return paths


def _run(configs, nproc, *args):
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone"] if nproc else [sys.executable]
    config = str(configs) if nproc else configs[0]
    cmd = [*launcher, "-m", "monai.bundle", "run", "--config_file", config, *args]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)


def test_rank_share_without_a_process_group_is_everything():
    data = [{"image": f"s{i}"} for i in range(5)]
    assert rank_share(data) == data


def test_two_ranks_embed_their_shares_and_equal_one_process(tmp_path):
    scans = _scans(tmp_path / "scans", 3)
    common = ["--input_path", str(scans), "--write_preview", "false"]
    single = _run(CONFIGS["semantic_sam"], None, *common, "--output_dir", str(tmp_path / "one"))
    assert single.returncode == 0, single.stderr[-3000:]
    multi = _run(CONFIGS["semantic_sam"], 2, *common, "--output_dir", str(tmp_path / "two"))
    assert multi.returncode == 0, multi.stderr[-3000:]
    folders = [line for line in multi.stdout.splitlines() if line.startswith(str(tmp_path))]
    assert folders == [str(tmp_path / "two" / f"scan{i}") for i in range(3)]  # once each, in input order
    summary = json.loads((tmp_path / "two" / "run_summary.json").read_text())
    assert summary["ranks"] == 2 and summary["done"] == 3 and not summary["failed_ranks"]
    assert sorted({r["rank"] for r in summary["results"]}) == [0, 1]
    for i in range(3):
        one, two = tmp_path / "one" / f"scan{i}", tmp_path / "two" / f"scan{i}"
        names = sorted(os.listdir(one))
        assert names == sorted(os.listdir(two)) and names
        for name in names:
            if name.endswith((".nii", ".nii.gz")):
                a, b = nib.load(str(one / name)), nib.load(str(two / name))
                np.testing.assert_array_equal(a.affine, b.affine)
                np.testing.assert_allclose(np.asarray(a.dataobj), np.asarray(b.dataobj), atol=1e-5)


@pytest.mark.slow
def test_more_ranks_than_queries_and_a_bad_scan_on_one_rank(tmp_path):
    """Matching: 3 ranks, 2 queries (one rank idle), the second query an empty file: the good one is complete, the
    summary names the bad one, the run's exit status is not 0, nothing half-written."""
    queries = _scans(tmp_path / "queries", 2, bad=(1,))
    result = _run(CONFIGS["samv2_matching"], 3, "--query_path", str(queries), "--write_qc", "false",
                  "--output_dir", str(tmp_path / "out"))
    assert result.returncode != 0
    assert f"ERROR: rank 1: {queries[1]}: empty file (0 bytes)" in result.stderr, result.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "run_summary.json").read_text())
    assert summary["scans"] == 2 and summary["done"] == 1 and summary["ranks"] == 3
    assert summary["failed_ranks"] == [{"rank": 1, "error": f"{queries[1]}: empty file (0 bytes)", "unfinished": [queries[1]]}]
    assert sorted(os.listdir(tmp_path / "out")) == ["run_summary.json", "scan0"]
    assert (tmp_path / "out" / "scan0" / "matches.json").is_file()
