"""Small helpers around the bundles: where a bundle lives, the datalist of an inference run, the one-line error
report, and running a bundle workflow from Python (what the ``samv2`` command line and the MONAI Label app do).
They hold no method logic (that lives in the other modules)."""

from __future__ import annotations

import ast
import glob
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from samv2_components.errors import (
    SAMv2InputError,
    hide_reported_tracebacks,
    install_cli_error_handler,
    interrupt_on_signals,
)
from samv2_components.modality import check_modality

__all__ = [
    "resolve_bundle_root",
    "expand_input_paths",
    "inference_datalist",
    "install_cli_error_handler",
    "setup_run_output",
    "move_stdout_logs_to_stderr",
    "find_bundles_dir",
    "run_bundle",
    "result_folders",
    "print_result_folders",
    "BUNDLE_NAMES",
    "BUNDLES_DIR_ENV",
]

BUNDLE_NAMES = ("semantic_sam", "samv2_matching", "crosssam_registration")
BUNDLES_DIR_ENV = "SAMV2_BUNDLES_DIR"


def _config_files_from_argv(argv: Sequence[str]) -> list[str]:
    for i, arg in enumerate(argv):
        value = None
        if arg.startswith("--config_file="):
            value = arg.split("=", 1)[1]
        elif arg == "--config_file" and i + 1 < len(argv):
            value = argv[i + 1]
        if value is not None:
            try:
                parsed = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                parsed = value
            return [parsed] if isinstance(parsed, str) else list(parsed)
    return []


def resolve_bundle_root(bundle_name: str, argv: Sequence[str] | None = None) -> str:
    """Find the folder of bundle ``bundle_name`` (the one holding ``configs/``).

    MONAI bundle configs conventionally say ``"bundle_root": "."`` and are run from inside the bundle. This
    also supports running from anywhere with ``--config_file <bundle>/configs/x.json``: the bundle root is the
    parent of the config file's ``configs`` folder. Override with ``--bundle_root`` to skip the search.
    """
    candidates = [os.path.dirname(os.path.dirname(os.path.abspath(f))) for f in _config_files_from_argv(argv or sys.argv)]
    candidates.append(os.getcwd())
    for root in candidates:
        if os.path.isfile(os.path.join(root, "configs", "metadata.json")):
            return root
    raise SAMv2InputError(bundle_name, "cannot find the bundle folder: run from inside it or pass --bundle_root <folder>")


def expand_input_paths(input_path: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """The scan paths named by ``input_path``: a file, a DICOM series folder, a glob pattern or a list of them.

    Raises :class:`SAMv2InputError` for a path that does not exist or a pattern that matches nothing, before any
    work starts (so no output is written for a partly valid request).
    """
    paths = [input_path] if isinstance(input_path, (str, os.PathLike)) else list(input_path)
    if not paths:
        raise SAMv2InputError("input_path", "no input scan given")
    found = []
    for p in paths:
        p = os.fspath(p)
        matches = sorted(glob.glob(p)) if glob.has_magic(p) else [p]
        if not matches:
            raise SAMv2InputError(p, "pattern matches no file")
        for m in matches:
            if not os.path.exists(m):
                raise SAMv2InputError(m, "file not found")
            found.append(m)
    return found


def inference_datalist(input_path: str | Sequence[str], modality: str) -> list[dict[str, str]]:
    """Datalist ``[{"image": path, "modality": m}, ...]`` for an inference run.

    Args:
        input_path: a scan file, a DICOM series folder, a glob pattern (``"scans/*.nii.gz"``) or a list of them
            (see :func:`expand_input_paths`).
        modality: ``"ct"`` or ``"mr"`` for all scans.
    """
    modality = check_modality(modality, "modality")
    return [{"image": path, "modality": modality} for path in expand_input_paths(input_path)]


def move_stdout_logs_to_stderr() -> None:
    """Point every logging handler that writes to stdout at stderr (MONAI's loggers hold their own stdout handler,
    created at import), so that stdout carries only the results."""
    import logging

    for logger in [logging.getLogger()] + [logging.getLogger(n) for n in list(logging.root.manager.loggerDict)]:
        for handler in getattr(logger, "handlers", []):
            if isinstance(handler, logging.StreamHandler) and handler.stream in (sys.stdout, sys.__stdout__):
                handler.setStream(sys.stderr)


def setup_run_output() -> None:
    """What a bundle run shows, set at its ``initialize``: results (the result folders) on stdout, logs on
    stderr, our errors as one ``ERROR:`` line without the tracebacks MONAI and ignite log for them
    (``SAMV2_DEBUG=1`` shows them), and SIGTERM or Ctrl-C ending the run without a half-written result."""
    interrupt_on_signals()
    move_stdout_logs_to_stderr()
    hide_reported_tracebacks()
    install_cli_error_handler()


def result_folders(output_dir: str, inputs: Sequence[str | Mapping[str, Any]]) -> list[str]:
    """The per-scan result folders ``<output_dir>/<case>`` of a run over ``inputs`` (paths, or datalist entries
    ``{"image": path, ...}``)."""
    from samv2_components.io.embeddings import case_name

    paths = [item["image"] if isinstance(item, Mapping) else item for item in inputs]
    return [os.path.join(output_dir, case_name(p)) for p in paths]


def print_result_folders(folders: str | Sequence[str]) -> None:
    """Print a bundle run's result folder(s) on stdout, one per line, for a shell script to read (the logs go to
    stderr). The ``samv2`` command line runs bundles with stdout sent to stderr and prints these itself."""
    for folder in [folders] if isinstance(folders, str) else folders:
        sys.stdout.write(f"{folder}\n")
    sys.stdout.flush()


def find_bundles_dir(bundles_dir: str | os.PathLike | None = None) -> Path:
    """The folder that holds the three bundles.

    Search order: ``bundles_dir``, ``$SAMV2_BUNDLES_DIR``, the ``bundles/`` folder of the checkout this package is
    installed from (``pip install -e .``), ``./bundles``.
    """
    candidates = [bundles_dir, os.environ.get(BUNDLES_DIR_ENV), Path(__file__).resolve().parents[1] / "bundles", Path.cwd() / "bundles"]
    for candidate in candidates:
        if candidate and all((Path(candidate) / name / "configs" / "metadata.json").is_file() for name in BUNDLE_NAMES):
            return Path(candidate).resolve()
    given = bundles_dir or os.environ.get(BUNDLES_DIR_ENV) or "bundles"
    raise SAMv2InputError(given, f"no SAMv2 bundles found ({', '.join(BUNDLE_NAMES)}); pass --bundles_dir or set {BUNDLES_DIR_ENV}")


def run_bundle(
    bundle: str,
    configs: Sequence[str],
    overrides: Mapping[str, Any],
    bundles_dir: str | os.PathLike | None = None,
    progress: bool = False,
) -> Any:
    """Run ``bundle``'s workflow from its ``configs`` (merged in order) with config ``overrides``, in this process.

    The same as ``python -m monai.bundle run --config_file "[...]" --key value ...`` except that logging is left to
    the caller (the bundle's ``logging.conf`` is not applied). Overrides whose value is ``None`` are dropped, so
    the bundle default applies. With ``progress``, a per-scan progress bar is attached to the bundle's evaluator.

    Returns what the config's ``run`` section returned (a list, one entry per expression).
    """
    import logging

    from monai.bundle import ConfigWorkflow

    root = find_bundles_dir(bundles_dir) / bundle
    # MONAI says on every run that no workflow type and no logging file were given: both on purpose here
    workflows_logger = logging.getLogger("monai.bundle.workflows")
    level = workflows_logger.level
    workflows_logger.setLevel(logging.ERROR)
    try:
        workflow = ConfigWorkflow(
            config_file=[str(root / "configs" / name) for name in configs],
            meta_file=str(root / "configs" / "metadata.json"),
            logging_file=False,
            workflow_type=None,
            bundle_root=str(root),
            **{k: v for k, v in overrides.items() if v is not None},
        )
    finally:
        workflows_logger.setLevel(level)
    workflow.initialize()
    if progress and "evaluator" in workflow.parser:
        from ignite.handlers import ProgressBar

        ProgressBar(persist=True, desc="scans").attach(workflow.parser.get_parsed_content("evaluator"))
    try:
        return workflow.run()
    finally:
        workflow.finalize()
