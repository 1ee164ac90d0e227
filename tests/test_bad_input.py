"""Bad input on the command line and through ``python -m monai.bundle run``: each is answered by one
``ERROR: <file or option>: <problem>`` line with the documented exit status, before any work, nothing written.

The command-line refusals stop before any work (a few seconds each) and stay in the default suite; the full
``python -m monai.bundle run`` is ``slow`` (``pytest -m slow``; the default suite's smoke test of that path is in
``test_matching_bundle.py``).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from samv2_components.errors import SAMv2InputError, parse_bool
from samv2_components.io.atomic import check_output_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, cwd, module="samv2_components.cli"):
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=str(cwd), capture_output=True, text=True,
                          encoding="utf-8", timeout=900, env=env)


def inputs(command):
    """The shipped sample inputs a command requires (the tests here are about the other arguments)."""
    from samv2_components.sample_data import sample_path

    return {
        "embed": ["--input_path", sample_path("ct_abdomen")],
        "match": ["--template", sample_path("ct_abdomen"), "--points", sample_path("ct_abdomen_points"),
                  "--query", sample_path("ct_abdomen_2")],
        "register": ["--fixed", sample_path("phantom_ct"), "--moving", sample_path("phantom_mr")],
        "evaluate": ["--template", sample_path("ct_abdomen"), "--pairs", sample_path("ct_abdomen_pairs"),
                     "--query", sample_path("ct_abdomen_2")],
    }[command]


def errors(result):
    return [line for line in result.stderr.splitlines() if line.startswith("ERROR:")]


@pytest.mark.parametrize("text, value", [("false", False), ("FALSE", False), ("0", False), ("no", False),
                                         ("True", True), ("1", True), ("yes", True), (True, True), (0, False)])
def test_booleans_as_users_write_them(text, value):
    assert parse_bool(text, "deformable") is value


@pytest.mark.parametrize("text", ["maybe", "", "2", 0.5, None])
def test_other_booleans_are_refused_by_name(text):
    with pytest.raises(SAMv2InputError, match="^deformable: must be true or false"):
        parse_bool(text, "deformable")


def test_output_folder_is_checked_before_work(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SAMv2InputError, match="is a file, not a folder"):
        check_output_dir(tmp_path / "file" / "out")
    assert check_output_dir(tmp_path / "new" / "deeper") == str(tmp_path / "new" / "deeper")
    assert not (tmp_path / "new").exists()  # nothing created by the check


@pytest.mark.parametrize(
    "args, status, message",
    [
        (["match", "--tempalte", "x.nii.gz"], 2, "ERROR: --tempalte: unknown option (did you mean --template?)"),
        (["register", "--orientation_serch", "off"], 2, "unknown option (did you mean --orientation_search?)"),
        (["match", "--refine", "maybe"], 1, "ERROR: --refine: must be true or false"),
        (["register", "--deformable", "sometimes"], 1, "ERROR: --deformable: must be true or false"),
        (["embed", "--output_dir", "FILE/out"], 1, "is a file, not a folder"),
    ],
)
def test_command_line_refusals_come_before_any_work(tmp_path, args, status, message):
    (tmp_path / "FILE").write_text("not a folder")
    args = [a.replace("FILE", str(tmp_path / "FILE")) for a in args] + inputs(args[0])
    if "--output_dir" not in args:
        args += ["--output_dir", str(tmp_path / "out")]
    result = run(*args, cwd=tmp_path)
    assert result.returncode == status, result.stderr[-2000:]
    lines = errors(result)
    assert len(lines) == 1 and message in lines[0], result.stderr[-2000:]
    assert not (tmp_path / "out").exists() and result.stdout == ""


@pytest.mark.slow
def test_bundle_run_reads_false_as_false_and_refuses_nonsense(tmp_path):
    """``python -m monai.bundle run`` passes ``--write_qc false`` as the string "false": no QC pictures then."""
    config = os.path.join(ROOT, "bundles", "samv2_matching", "configs", "inference.json")
    out = tmp_path / "out"
    done = run("run", "--config_file", config, "--output_dir", str(out), "--write_qc", "false", "--refine", "FALSE",
               cwd=tmp_path, module="monai.bundle")
    assert done.returncode == 0, done.stderr[-3000:]
    (case,) = os.listdir(out)
    assert not (out / case / "qc").exists() and (out / case / "matches.json").is_file()
    refused = run("run", "--config_file", config, "--output_dir", str(tmp_path / "out2"), "--write_qc", "perhaps",
                  cwd=tmp_path, module="monai.bundle")
    assert refused.returncode != 0
    assert "write_qc: must be true or false" in refused.stderr and not (tmp_path / "out2").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["match", "--matcher#method", "bogus"], "ERROR: matcher#method: must be one of fixed_point, nearest_neighbour"),
        (["register", "--orientation_search", "sometimes"], "ERROR: orientation_search: must be one of auto, always, off"),
        (["evaluate", "--cpm_radius_mm", "-5"], "ERROR: cpm_radius_mm: must be a positive radius"),
        (["evaluate", "--pairs", "POINTS"], "POINTS"),
        (["embed", "--ckpt_path", "NOWHERE.pt"], "NOWHERE.pt"),
        (["register", "--deformable_kwargs#iterations", "0"], "ERROR: deformable_kwargs#iterations: must be >= 1"),
        (["register", "--deformable_kwargs#grid_spacng_mm", "20"], "ERROR: deformable_kwargs#grid_spacng_mm: unknown setting"),
        (["register", "--deformable_kwargs#backend", "bogus"], "ERROR: deformable_kwargs#backend: unknown value 'bogus'"),
    ],
)
def test_bad_settings_are_one_line_before_the_work(tmp_path, args, message):
    from samv2_components.sample_data import sample_path

    points = sample_path("ct_abdomen_points")  # a plain points file, not a pairs file
    args = [a.replace("POINTS", points).replace("NOWHERE.pt", str(tmp_path / "missing.pt")) for a in args]
    given = {a for a in args if a.startswith("--")}
    extra = inputs(args[0])
    args += [v for i, v in enumerate(extra) if not (v.startswith("--") and v in given) and not (i and extra[i - 1] in given)]
    message = message.replace("POINTS", points).replace("NOWHERE.pt", str(tmp_path / "missing.pt"))
    result = run(*args, "--output_dir", str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 1, result.stderr[-2000:]
    lines = errors(result)
    assert len(lines) == 1 and message in lines[0], result.stderr[-2000:]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_missing_extra_is_named_before_the_work(tmp_path):
    """Without SimpleITK (the registration extra) ``samv2 register`` names it and the pip command, exit 1."""
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "SimpleITK.py").write_text("raise ImportError('blocked by the test')\n")
    env = {**os.environ, "PYTHONPATH": str(blocker) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "samv2_components.cli", "register", *inputs("register"),
                             "--output_dir", str(tmp_path / "out")],
                            cwd=str(tmp_path), capture_output=True, text=True, encoding="utf-8", timeout=600, env=env)
    assert result.returncode == 1, result.stderr[-2000:]
    lines = errors(result)
    assert lines == ['ERROR: SimpleITK: not installed (intensity registration needs it): pip install -e ".[registration]"']
    assert not (tmp_path / "out").exists()


def test_an_mr_given_as_ct_is_refused_unless_the_user_says_so(tmp_path):
    """The shipped abdominal MR (no voxel below -200) as --modality ct: refused like register refuses it; the
    user who knows better overrides the check explicitly and gets the embedding."""
    from samv2_components.sample_data import sample_path

    mr = sample_path("mr_abdomen")
    refused = run("embed", "--input_path", mr, "--modality", "ct", "--output_dir", str(tmp_path / "out"), cwd=tmp_path)
    assert refused.returncode == 1, refused.stderr[-2000:]
    (line,) = errors(refused)
    assert mr in line and "is this really a CT" in line and not (tmp_path / "out").exists()
    forced = run("embed", "--input_path", mr, "--modality", "ct", "--strict_modality_check", "false",
                 "--output_dir", str(tmp_path / "forced"), cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr[-2000:]
    assert "is this really a CT" in forced.stderr  # still said, as a warning


def _wait_for(condition, process, timeout=300.0):
    import time

    start = time.monotonic()
    while not condition():
        assert process.poll() is None, "the run ended before it could be interrupted"
        assert time.monotonic() - start < timeout, "timed out waiting for the run"
        time.sleep(0.2)


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_an_interrupted_run_leaves_nothing_half_written(tmp_path, signal_name):
    """Killed (SIGTERM, as a batch scheduler does) or Ctrl-C'd (SIGINT) once the first of three scans is done: exit
    130, one ERROR line, the finished scan's folder complete, no other folder, no temporary file anywhere."""
    import signal

    from samv2_components.sample_data import sample_path

    scans = [str(tmp_path / f"scan{i}.nii.gz") for i in range(3)]
    for path in scans:
        os.symlink(sample_path("ct_abdomen"), path)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "samv2_components.cli", "embed", "--input_path", str(scans),
                                "--output_dir", str(out), "--write_preview", "false"],
                               cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    _wait_for(lambda: (out / "scan0").is_dir(), process)
    process.send_signal(getattr(signal, signal_name))
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    lines = [line for line in stderr.splitlines() if line.startswith("ERROR:")]
    assert len(lines) == 1 and "interrupted" in lines[0] and "Traceback" not in stderr, stderr[-2000:]
    assert stdout == ""  # no result folders promised
    finished = sorted(os.listdir(out))
    assert finished in (["scan0"], ["scan0", "scan1"]), finished  # a whole folder per finished scan, nothing else
    for case in finished:
        assert len([f for f in os.listdir(out / case) if f.endswith((".nii", ".nii.gz"))]) == 3
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]
