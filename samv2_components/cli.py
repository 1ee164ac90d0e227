"""``samv2``: the project's command line (a thin ``fire`` wrapper over the three MONAI bundles).

Every command runs one bundle workflow, exactly as ``python -m monai.bundle run --config_file ...`` would, with the
command's arguments turned into the bundle's config overrides. Anything else given as ``--key value`` is passed on
as a config override too (``--network_def#width 1.0``, ``--matcher#method nearest_neighbour``, ...).

Every command requires its inputs (a forgotten ``--query`` is an error, not a silent run on a sample); the demo on
the small real scans shipped with the package is the bundles' own run, e.g.
``python -m monai.bundle run --config_file bundles/samv2_matching/configs/inference.json``.

Exit status, for shell scripts:

* ``0``: done; the output folder(s) are printed on stdout, one per line;
* ``1``: bad input (a missing or unreadable file, a wrong modality, a checkpoint that does not fit...): one line
  ``ERROR: <file>: <problem>`` on stderr, nothing written;
* ``2``: the command line itself is wrong (unknown command, a required input missing, an option no command or
  bundle setting has: ``unknown option --tempalte (did you mean --template?)``);
* ``3``: the registration ran but could not be made confident: ``ERROR: ...`` names the reason and the
  ``summary.json`` that holds the confidence figures; no transform is written;
* ``4``: the registration is written, rigid only: the optional deformable stage failed (``ERROR: ...`` says why,
  ``summary.json`` records it); the result folder is printed on stdout;
* ``130``: interrupted (Ctrl-C or SIGTERM): scans finished before are complete, the one in progress left nothing.

``--debug`` (or ``SAMV2_DEBUG=1``) shows the full traceback instead of the one ``ERROR:`` line. The output folder
is checked for writing before any work starts.

Bundles are found in ``$SAMV2_BUNDLES_DIR``, else the ``bundles/`` folder of the checkout the package is installed
from (``pip install -e .``), else ``./bundles``. Progress bars go to stderr when it is a terminal
(``SAMV2_PROGRESS=1`` or ``0`` forces them on or off).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

# Before torch is first imported (below): torch's CPU allocator then asks for transparent huge pages on large
# tensors (its THP_MEM_ALLOC_ENABLE switch, read once per process). Fresh large tensors are otherwise faulted in
# 4 KB page by page; measured on 2 cores, runs alternating: the light embedding pass 1.22-1.28 -> 0.86-1.01 s. A
# value the user set is kept; `python -m monai.bundle run` imports torch first, so there set it in the environment.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from samv2_components.bundle_support import move_stdout_logs_to_stderr, result_folders as _output_folders, run_bundle  # noqa: E402
from samv2_components.errors import (  # noqa: E402
    DeformableStageFailed,
    Interrupted,
    RegistrationFailed,
    SAMv2InputError,
    debug_wanted,
    find_samv2_error,
    hide_reported_tracebacks,
    interrupt_on_signals,
    parse_bool,
)
from samv2_components.io.atomic import check_output_dir  # noqa: E402

__all__ = ["SAMv2Command", "main", "EXIT_ERROR", "EXIT_USAGE", "EXIT_NOT_CONFIDENT", "EXIT_RIGID_ONLY", "EXIT_INTERRUPTED"]

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NOT_CONFIDENT = 3
EXIT_RIGID_ONLY = 4
EXIT_INTERRUPTED = 130  # the shell's status for Ctrl-C (128 + SIGINT)

PROGRESS_ENV = "SAMV2_PROGRESS"
DEBUG_ENV = "SAMV2_DEBUG"


def _log_to_stderr() -> None:
    """Bundle log lines go to stderr, so that a script can read the result paths from stdout."""
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s - %(name)s - %(levelname)s - %(message)s")


def _progress_wanted() -> bool:
    """Progress bars on stderr: on a terminal by default; ``SAMV2_PROGRESS=1`` or ``0`` forces them on or off."""
    forced = os.environ.get(PROGRESS_ENV)
    return sys.stderr.isatty() if forced is None else forced.strip().lower() not in ("0", "false", "no", "")


class UsageError(SAMv2InputError):
    """The command line names an option no command or bundle setting has (exit status 2)."""


def _check_options(bundle: str, configs: Sequence[str], overrides: Mapping[str, Any], bundles_dir) -> None:
    """Refuse an override whose first key is neither a command argument nor a setting of the bundle's configs
    (a misspelt ``--tempalte`` would otherwise be taken as a setting nothing reads), suggesting the closest one."""
    import difflib
    import json

    from samv2_components.bundle_support import find_bundles_dir

    known: set[str] = set()
    for name in configs:
        with open(find_bundles_dir(bundles_dir) / bundle / "configs" / name, encoding="utf-8") as f:
            known |= set(json.load(f))
    command_args = {p for method in ("embed", "match", "landmarks", "register", "evaluate")
                    for p in inspect.signature(getattr(SAMv2Command, method)).parameters if p not in ("self", "overrides")}
    for key in overrides:
        root = str(key).split("#")[0]
        if root not in known:
            close = difflib.get_close_matches(root, sorted(known | command_args), n=1)
            hint = f" (did you mean --{close[0]}?)" if close else ""
            raise UsageError(f"--{key}", f"unknown option{hint}; 'samv2 COMMAND --help' lists the arguments")


def _check_required(bundle: str, required: Mapping[str, Any]) -> None:
    """Refuse a command whose input is missing (exit status 2), pointing at the bundle's demo run."""
    for option, value in required.items():
        if value is None or (isinstance(value, (list, tuple, str)) and len(value) == 0):
            raise UsageError(
                f"--{option}", f"required (the demo on the shipped sample scans is: python -m monai.bundle run "
                f"--config_file bundles/{bundle}/configs/inference.json)")


class SAMv2Command:
    """SAMv2 anatomical embeddings: embed scans, match points between scans, find named landmarks, register CT and MR.

    Points are physical millimetres, LPS unless a points file says RAS. Run "samv2 COMMAND --help" for a command's
    arguments; any other --key value is passed to the bundle config as an override. Inputs are required; the demo
    on the shipped sample scans is the bundle run (python -m monai.bundle run --config_file bundles/.../inference.json).
    Exit status: 0 done (result folders printed on stdout), 1 bad input (one ERROR line on stderr),
    2 bad command line, 3 registration not confident (nothing written but summary.json), 4 registration written
    rigid only (the deformable stage failed), 130 interrupted.
    Environment: SAMV2_BUNDLES_DIR (where the bundles are; default: the source checkout, then ./bundles),
    SAMV2_PROGRESS=1/0 (progress bars on stderr; default: when stderr is a terminal).
    """

    def __init__(self, bundles_dir: str | None = None, progress: bool | None = None):
        self._bundles_dir = bundles_dir
        self._progress = _progress_wanted() if progress is None else bool(progress)

    def _run(self, bundle: str, configs: Sequence[str], overrides: Mapping[str, Any], required: Mapping[str, Any]) -> Any:
        """Check the command line (unknown options, then the required inputs, then the output folder) and run the
        bundle's workflow with ``overrides``; ``required`` maps each required option to its given value."""
        import monai.bundle  # noqa: F401 - creates MONAI's loggers, whose stdout handlers are moved next

        _check_options(bundle, configs, overrides, self._bundles_dir)
        _check_required(bundle, required)
        if overrides.get("output_dir") is not None:
            check_output_dir(overrides["output_dir"])
        move_stdout_logs_to_stderr()
        hide_reported_tracebacks()
        with contextlib.redirect_stdout(sys.stderr):  # printed tables too: stdout is for the result paths
            return run_bundle(bundle, configs, overrides, self._bundles_dir, self._progress)

    @staticmethod
    def _paths(value: str | Sequence[str] | None) -> list[str]:
        """The scans a command runs on: ``value`` expanded (globs, lists); empty when not given."""
        from samv2_components.bundle_support import expand_input_paths

        return [] if value is None else expand_input_paths(value)

    def embed(self, input_path=None, modality: str = "ct", output_dir: str = "samv2_output/embeddings", **overrides):
        """Compute the fine, coarse and semantic embeddings of one or more scans (bundle semantic_sam).

        Writes, per scan, <output_dir>/<case>/: one NIfTI per head (its own grid and affine, LPS) and a preview PNG.

        Args:
            input_path: scan file(s) any ITK reader takes (NIfTI, NRRD, MHA, ...), a DICOM series folder, a glob
                pattern, or a list "['a.nii.gz','b.nrrd']". Required.
            modality: ct or mr, for all scans (never guessed).
            output_dir: parent folder of the results.
            overrides: more bundle config overrides, e.g. --network_def#width 1.0 --inferer#bf16 false.
        """
        paths = self._paths(input_path)
        self._run("semantic_sam", ["inference.json"], {"input_path": paths, "modality": modality, "output_dir": output_dir, **overrides},
                  required={"input_path": input_path})
        return "\n".join(_output_folders(output_dir, paths))

    def match(
        self,
        template=None,
        points=None,
        query=None,
        modality: str = "ct",
        query_modality: str | None = None,
        output_dir: str = "samv2_output/matches",
        method: str = "fixed_point",
        cache_dir: str | None = None,
        refine: bool = False,
        **overrides,
    ):
        """Find the points of a template scan on other scans (bundle samv2_matching).

        Writes, per query scan, <output_dir>/<case>/: the matched points in the format and coordinate system of
        the points file (with score and a 'confident' flag per point), matches.json and QC pictures.

        Args:
            template: the annotated scan. Required.
            points: its points (CSV, JSON or 3D Slicer .mrk.json; LPS or RAS as the file says). Required.
            query: scan(s) to find the points on (file, DICOM folder, glob or list). Required.
            modality: ct or mr, the template's modality.
            query_modality: the queries' modality (default: same as the template).
            output_dir: parent folder of the results.
            method: fixed_point (SAMv2, default) or nearest_neighbour.
            cache_dir: keep embeddings here between runs (the template is embedded once).
            refine: refine each match by local intensity registration at native resolution (sub-voxel; best for
                scans of the same patient); the points file then also holds the embedding match.
            overrides: more bundle config overrides, e.g. --matcher#min_confident_score 0.7.
        """
        queries = self._paths(query)
        values = {"template_path": template, "template_points": points, "query_path": queries, "modality": modality,
                  "query_modality": query_modality, "output_dir": output_dir, "matcher#method": method, "cache_dir": cache_dir,
                  "refine": parse_bool(refine, "--refine")}
        self._run("samv2_matching", ["inference.json"], {**values, **overrides},
                  required={"template": template, "points": points, "query": query})
        return "\n".join(_output_folders(output_dir, queries))

    def landmarks(
        self,
        query=None,
        modality: str = "ct",
        output_dir: str = "samv2_output/landmarks",
        cache_dir: str | None = None,
        **overrides,
    ):
        """Find the shipped template's 26 named landmarks on CT scans (bundle samv2_matching, configs/landmarks.json).

        The template is the sample abdominal CT with landmarks derived from its organ label map (each with its
        definition: samv2_components/sample_data/ct_abdomen_landmarks.csv). Writes, per query scan,
        <output_dir>/<case>/: ct_abdomen_landmarks.csv and .mrk.json (3D Slicer) with score and confident flag per
        landmark, matches.json (the landmarks whose anatomy is outside the scan are listed there as absent, not
        placed) and a QC picture per landmark.

        Args:
            query: scan(s) to find the landmarks on (file, DICOM folder, glob or list). Required.
            modality: the queries' modality (the template is a CT).
            output_dir: parent folder of the results.
            cache_dir: keep embeddings here between runs.
            overrides: more bundle config overrides, e.g. --matcher#global_radius_mm 15.
        """
        queries = self._paths(query)
        values = {"query_path": queries, "query_modality": modality, "output_dir": output_dir, "cache_dir": cache_dir}
        self._run("samv2_matching", ["inference.json", "landmarks.json"], {**values, **overrides}, required={"query": query})
        return "\n".join(_output_folders(output_dir, queries))

    def register(
        self,
        fixed=None,
        moving=None,
        fixed_modality: str = "ct",
        moving_modality: str = "mr",
        output_dir: str = "samv2_output/registration",
        deformable: bool = True,
        orientation_search: str = "auto",
        **overrides,
    ):
        """Register a moving scan to a fixed scan with CrossSAM AdaReg (bundle crosssam_registration).

        Either scan may have the smaller field of view. Writes <output_dir>/<fixed case>__<moving case>/: rigid.tfm
        (ITK, loads in 3D Slicer and ANTs), rigid.json (4x4 fixed-to-moving matrix, LPS mm), the cropped scan, the
        moving scan resampled rigidly (and deformably), the B-spline field, summary.json and QC overlays.
        Exit status 3 (and no transform) when the registration is not confident.

        Args:
            fixed: the fixed scan. Required.
            moving: the moving scan. Required.
            fixed_modality: ct or mr.
            moving_modality: ct or mr.
            output_dir: parent folder of the results.
            deformable: refine with an elastix B-spline (mutual information) after the rigid fit.
            orientation_search: auto (try the 24 axis-aligned orientations when the headers give no confident
                fit), always, or off.
            overrides: more bundle config overrides, e.g. --adareg#crop_margin_mm 40.
        """
        from samv2_components.io.embeddings import case_name

        values = {"fixed_path": fixed, "moving_path": moving, "fixed_modality": fixed_modality,
                  "moving_modality": moving_modality, "output_dir": output_dir, "deformable": parse_bool(deformable, "--deformable"),
                  "orientation_search": orientation_search, "workflow#progress": self._progress}
        self._run("crosssam_registration", ["inference.json"], {**values, **overrides},
                  required={"fixed": fixed, "moving": moving})
        return os.path.join(output_dir, f"{case_name(fixed)}__{case_name(moving)}")

    def evaluate(
        self,
        pairs=None,
        query=None,
        template=None,
        modality: str = "ct",
        output_dir: str = "samv2_output/evaluation",
        cpm_radius_mm: float = 10.0,
        **overrides,
    ):
        """Match the template points of a ground-truth pairs file and report the accuracy (bundle samv2_matching).

        Prints CPM@radius, MED and per-axis errors for SAMv2 and plain nearest-neighbour matching, and writes them
        to <output_dir>/<query case>/metrics.json.

        Args:
            pairs: CSV of point pairs (template x,y,z and true query x,y,z, LPS mm). Required.
            query: the one query scan the pairs refer to. Required.
            template: the template scan. Required.
            modality: ct or mr.
            output_dir: parent folder of the results.
            cpm_radius_mm: radius of the CPM metric (paper: 10 mm).
            overrides: more bundle config overrides.
        """
        queries = self._paths(query)
        values = {"pairs_path": pairs, "query_path": queries[0] if queries else None, "template_path": template, "modality": modality,
                  "output_dir": output_dir, "cpm_radius_mm": cpm_radius_mm}
        self._run("samv2_matching", ["inference.json", "evaluate.json"], {**values, **overrides},
                  required={"pairs": pairs, "query": query, "template": template})
        return _output_folders(output_dir, queries)[0]

    def convert_upstream(self, checkpoint: str, output: str, width: float | None = None, heads=None):
        """Convert a published upstream SAM/SAMv2 checkpoint (mmcv .pth) into a bundle model.pt.

        Every tensor is checked by loading it into a fresh network; prints the network_def overrides the bundle
        needs for it. The .pth is a full Python pickle: convert only files you trust.

        Args:
            checkpoint: the upstream .pth file.
            output: the weights file to write, e.g. bundles/semantic_sam/models/model.pt.
            width: fail unless the checkpoint has this width (1.0 for the published networks).
            heads: fail unless it has these heads, e.g. "['fine','coarse']" for SAM v1.
        """
        from samv2_components.networks.upstream import convert_upstream_checkpoint
        from samv2_components.networks.weights import format_network_kwargs, network_def_overrides

        kwargs = convert_upstream_checkpoint(checkpoint, output, width=width, heads=heads)
        sys.stderr.write(f"wrote {output} ({format_network_kwargs(kwargs)}); run the bundles with:\n  {network_def_overrides(kwargs)}\n")
        return output


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``samv2`` console script; returns the exit status (see the module docstring)."""
    import fire

    _log_to_stderr()
    args = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in args:
        os.environ[DEBUG_ENV] = "1"  # also read by the log filter that hides the tracebacks of reported errors
    debug = debug_wanted()
    args = [a for a in args if a != "--debug"]
    if any(a in ("--help", "-h") for a in args) and "--" not in args:
        # the commands take **overrides, so fire would read a plain --help as an override named "help"
        args = [a for a in args if a not in ("--help", "-h")] + ["--", "--help"]
    interrupt_on_signals()
    try:
        fire.Fire(SAMv2Command(), command=args, name="samv2")
    except fire.core.FireExit as exit_:
        return int(exit_.code or 0)
    except (Interrupted, KeyboardInterrupt) as stop:  # Ctrl-C or SIGTERM: the atomic writers removed their temporary files
        if debug:
            raise
        sys.stderr.write(f"ERROR: interrupted ({stop or 'Ctrl-C'}): nothing half-written; the results of the scans "
                         "finished before are complete\n")
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - only our own errors become one line; anything else keeps its traceback
        error = find_samv2_error(exc)  # MONAI and ignite wrap the errors raised inside a workflow
        if error is None or debug:
            raise
        sys.stderr.write(f"ERROR: {error}\n")
        if isinstance(error, DeformableStageFailed):
            sys.stdout.write(f"{error.folder}\n")  # the rigid result is there
            return EXIT_RIGID_ONLY
        if isinstance(error, UsageError):
            return EXIT_USAGE
        return EXIT_NOT_CONFIDENT if isinstance(error, RegistrationFailed) else EXIT_ERROR
    finally:
        logging.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
