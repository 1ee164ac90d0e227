"""The ``samv2`` command line as a shell script uses it: commands, result paths on stdout, exit codes, one-line
errors with nothing written, overrides passed through to the bundle, progress bars on request.

The default suite runs the command once, the smoke test of this path
(``test_match_prints_the_result_folder_and_passes_overrides``); every other run is ``slow`` (``pytest -m slow``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from samv2_components.sample_data import sample_path

from helpers import random_upstream_state_dict, save_mmcv_checkpoint

COMMANDS = ("embed", "match", "landmarks", "register", "evaluate", "convert_upstream")


def samv2(*args, cwd, env=None):
    """Run ``samv2 ARGS`` (the console script's entry point) in ``cwd``."""
    cmd = [sys.executable, "-m", "samv2_components.cli", *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), **(env or {})}
    return subprocess.run(cmd, cwd=str(cwd), capture_output=True, text=True, timeout=900, env=full_env)


def error_lines(result):
    return [line for line in result.stderr.splitlines() if line.startswith("ERROR:")]


def test_console_script_is_installed():
    script = shutil.which("samv2", path=os.path.dirname(sys.executable))
    assert script, "the samv2 console script is not installed next to this Python (pip install -e .)"


@pytest.mark.slow
@pytest.mark.parametrize("given,expected", [(None, "1"), ("0", "0")])
def test_cli_turns_on_huge_pages_for_torch_unless_the_user_chose(given, expected):
    """The switch must be set before torch is imported (torch reads it once): importing the CLI module in a fresh
    process sets it, before torch is in sys.modules, and keeps a value the user gave."""
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if given is not None:
        env["THP_MEM_ALLOC_ENABLE"] = given
    probe = ("import builtins, os\n"
             "seen = {}\n"
             "real_import = builtins.__import__\n"
             "def spy(name, *a, **k):\n"
             "    if name == 'torch' and 'torch' not in seen:\n"
             "        seen['torch'] = os.environ.get('THP_MEM_ALLOC_ENABLE')\n"
             "    return real_import(name, *a, **k)\n"
             "builtins.__import__ = spy\n"
             "import samv2_components.cli\n"
             "print(seen.get('torch'), os.environ.get('THP_MEM_ALLOC_ENABLE'))\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True).stdout
    assert out.split() == [expected, expected]  # set when torch is first imported, and still set


def test_help_lists_every_command_and_the_exit_codes(tmp_path):
    result = samv2("--help", cwd=tmp_path)
    assert result.returncode == 0
    text = result.stdout + result.stderr
    for command in COMMANDS:
        assert command in text
    assert "Exit status: 0 done" in text and "3 registration not confident" in text


@pytest.mark.slow
def test_unknown_command_is_a_usage_error(tmp_path):
    assert samv2("segment", cwd=tmp_path).returncode == 2


def test_match_prints_the_result_folder_and_passes_overrides(tmp_path):
    result = samv2("match", "--template", sample_path("ct_abdomen"), "--points", sample_path("ct_abdomen_points"),
                   "--query", sample_path("ct_abdomen_2"), "--output_dir", "out", "--matcher#method", "nearest_neighbour",
                   cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines() == [os.path.join("out", "ct_abdomen_2")]  # nothing else on stdout
    folder = tmp_path / "out" / "ct_abdomen_2"
    assert (folder / "ct_abdomen_points.csv").is_file()
    with open(folder / "matches.json") as f:
        assert json.load(f)["method"] == "nearest_neighbour"


@pytest.mark.slow
def test_embed_takes_a_glob_and_shows_progress_when_asked(tmp_path):
    scans = tmp_path / "scans"
    scans.mkdir()
    for name in ("ct_abdomen", "ct_abdomen_2"):
        shutil.copy(sample_path(name), scans / f"{name}.nii.gz")
    result = samv2("embed", "--input_path", str(scans / "*.nii.gz"), "--output_dir", "emb", "--write_preview", "false",
                   cwd=tmp_path, env={"SAMV2_PROGRESS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines() == [os.path.join("emb", "ct_abdomen"), os.path.join("emb", "ct_abdomen_2")]
    for line in result.stdout.splitlines():
        assert any((tmp_path / line).glob("*fine*")), list((tmp_path / line).iterdir())
    assert "scans" in result.stderr and "2/2" in result.stderr  # the per-scan progress bar


@pytest.mark.slow
def test_missing_input_is_one_error_line_and_writes_nothing(tmp_path):
    result = samv2("match", "--template", sample_path("ct_abdomen"), "--points", sample_path("ct_abdomen_points"),
                   "--query", "no_such_scan.nii.gz", "--output_dir", "out", cwd=tmp_path)
    assert result.returncode == 1
    assert error_lines(result) == ["ERROR: no_such_scan.nii.gz: file not found"]
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command, first_missing", [("match", "--template"), ("embed", "--input_path"),
                                                    ("register", "--fixed"), ("evaluate", "--pairs")])
def test_inputs_are_required_not_taken_from_the_samples(tmp_path, command, first_missing):
    """A forgotten input is a usage error naming it (and the bundle's demo run), not a silent run on a sample."""
    result = samv2(command, "--output_dir", "out", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    (line,) = error_lines(result)
    assert line.startswith(f"ERROR: {first_missing}: required") and "python -m monai.bundle run" in line
    assert result.stdout == "" and not (tmp_path / "out").exists()
    if command == "match":  # the others given, the last one still named
        partial = samv2("match", "--template", sample_path("ct_abdomen"), "--points", sample_path("ct_abdomen_points"),
                        "--output_dir", "out", cwd=tmp_path)
        assert partial.returncode == 2 and error_lines(partial)[0].startswith("ERROR: --query: required")


@pytest.mark.slow
def test_wrong_modality_is_one_error_line(tmp_path):
    result = samv2("embed", "--input_path", sample_path("ct_abdomen"), "--modality", "pet", "--output_dir", "out", cwd=tmp_path)
    assert result.returncode == 1
    (line,) = error_lines(result)
    assert "modality" in line and "pet" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    "pipeline, impossible",
    [
        ("adareg", ("--adareg#min_inliers", "100000")),  # an inlier count no fit can reach: AdaReg must refuse
        ("samv2", ("--samv2_pipeline#min_overlap", "1.01")),  # an overlap no candidate can reach: the pipeline too
    ],
)
def test_registration_not_confident_exits_3_with_summary_and_no_transform(tmp_path, pipeline, impossible):
    result = samv2("register", "--fixed", sample_path("phantom_ct"), "--moving", sample_path("phantom_mr"),
                   "--output_dir", "reg", "--deformable", "false", "--orientation_search", "off",
                   "--pipeline", pipeline, *impossible, cwd=tmp_path)
    assert result.returncode == 3, result.stderr[-2000:]
    (line,) = error_lines(result)
    assert "registration failed" in line and "summary.json" in line
    folder = tmp_path / "reg" / "phantom_ct_3mm__phantom_mr_t2_3mm"
    assert (folder / "summary.json").is_file()
    assert not (folder / "rigid.tfm").exists() and not (folder / "rigid.json").exists()
    with open(folder / "summary.json") as f:
        assert json.load(f)["confidence"]["success"] is False


@pytest.mark.slow
def test_convert_upstream_writes_weights_the_bundle_loads(tmp_path):
    from samv2_components.networks import SAMv2Net
    from samv2_components.networks.upstream import convert_upstream_checkpoint
    from samv2_components.networks.weights import load_weights, read_state_dict

    checkpoint = save_mmcv_checkpoint(random_upstream_state_dict(semantic=True), tmp_path / "upstream.pth")
    result = samv2("convert-upstream", str(checkpoint), "converted.pt", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "converted.pt"
    assert "--network_def#width 1.0" in result.stderr
    assert load_weights(SAMv2Net(width=1.0), tmp_path / "converted.pt")  # every tensor fits the network
    convert_upstream_checkpoint(checkpoint, tmp_path / "direct.pt")
    written, direct = read_state_dict(tmp_path / "converted.pt"), read_state_dict(tmp_path / "direct.pt")
    assert written.keys() == direct.keys() and all(torch.equal(written[k], direct[k]) for k in direct)


@pytest.mark.slow
def test_convert_upstream_of_a_bad_file_is_one_error_line(tmp_path):
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    result = samv2("convert-upstream", "bad.pth", "out.pt", cwd=tmp_path)
    assert result.returncode == 1
    (line,) = error_lines(result)
    assert line.startswith("ERROR: bad.pth")
    assert not (tmp_path / "out.pt").exists()


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, tmp_path):
    result = samv2(command.replace("_", "-"), "--help", cwd=tmp_path)
    assert result.returncode == 0
    text = result.stdout + result.stderr
    assert f"samv2 {command.replace('_', '-')} - " in text and "FLAGS" in text  # help, not a run
    assert not (tmp_path / "samv2_output").exists()
