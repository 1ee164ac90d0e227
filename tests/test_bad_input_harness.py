"""The bad-input harness: every bundle's main command, through the ``samv2`` command line (the same code as
``python -m monai.bundle run``: the CLI runs the bundle's config), over a table of bad scans the test makes.

For each (command, bad scan): exit status 1, exactly one ``ERROR:`` line naming the file and the problem, no
traceback, nothing on stdout, and no result (nor a temporary file) in the output folder. The table is listed in
``docs/bad_input.md``; the option values, output folders, checkpoints and interruptions are in
``test_bad_input.py``.

The runs are in-process (``samv2_components.cli.main``): the bad file is refused before any embedding, so each takes
the time of reading the bundle config and the model (about a second). ``embed`` runs in the default suite over the
whole table; ``match`` (bad template and bad query) and ``register`` (bad fixed, bad moving) are ``slow``.
"""

from __future__ import annotations

import os

import pytest

from samv2_components.cli import EXIT_ERROR, main
from samv2_components.sample_data import sample_path

from helpers import scans_with_bad_headers, unreadable_scans

CT, CT2, POINTS = sample_path("ct_abdomen"), sample_path("ct_abdomen_2"), sample_path("ct_abdomen_points")
COMMANDS = {
    # role of the bad scan -> the command line with BAD in its place
    "embed": ["embed", "--input_path", "BAD"],
    "match template": ["match", "--template", "BAD", "--points", POINTS, "--query", CT2],
    "match query": ["match", "--template", CT, "--points", POINTS, "--query", "BAD"],
    "register fixed": ["register", "--fixed", "BAD", "--moving", sample_path("phantom_mr"), "--deformable", "false"],
    "register moving": ["register", "--fixed", sample_path("phantom_ct"), "--moving", "BAD", "--deformable", "false"],
}
DEFAULT_SUITE = ("embed",)


@pytest.fixture(scope="module")
def bad_scans(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad_scans")
    return dict((os.path.basename(path), (path, phrase)) for path, phrase in unreadable_scans(folder) + scans_with_bad_headers(folder))


SCAN_NAMES = [
    "missing.nii.gz", "empty", "empty_file.nii.gz", "x.nii.gz", "notes.nii", "slice.png", "one_slice.nii.gz",
    "four_d.nii.gz", "constant.nii.gz", "nan.nii.gz", "inf.nii.gz", "nan.mha", "cut.nii.gz", "short.nii",
    "zero_spacing.nii.gz", "singular.nii.gz", "coarse.nii.gz", "tiny.nii.gz",
]  # fmt: skip


def test_the_table_covers_every_bad_scan_the_helpers_make(bad_scans):
    assert sorted(bad_scans) == sorted(SCAN_NAMES)


@pytest.mark.parametrize(
    "command",
    [pytest.param(c, marks=() if c in DEFAULT_SUITE else pytest.mark.slow) for c in COMMANDS],
)
def test_every_bad_scan_is_one_error_line_and_nothing_written(bad_scans, command, tmp_path, capsys):
    failures = []
    for name in SCAN_NAMES:
        path, phrase = bad_scans[name]
        out = tmp_path / name.replace(".", "_")
        args = [path if a == "BAD" else a for a in COMMANDS[command]] + ["--output_dir", str(out)]
        status = main(args)
        captured = capsys.readouterr()
        errors = [line for line in captured.err.splitlines() if line.startswith("ERROR:")]
        left = [p.name for p in out.rglob("*")] if out.exists() else []
        ok = (status == EXIT_ERROR and len(errors) == 1 and path in errors[0] and phrase in errors[0]
              and "Traceback" not in captured.err and captured.out == "" and not left)
        if not ok:
            failures.append(f"{name}: status {status}, errors {errors}, left {left}, stdout {captured.out!r}")
    assert not failures, "\n".join(failures)
