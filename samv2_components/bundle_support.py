"""Small helpers the bundle configs call: where the bundle lives, the datalist of an inference run, and the
one-line error report. They hold no method logic (that lives in the other modules)."""

from __future__ import annotations

import ast
import glob
import os
import sys
from collections.abc import Sequence

from samv2_components.errors import SAMv2InputError, install_cli_error_handler
from samv2_components.transforms.intensity import check_modality

__all__ = ["resolve_bundle_root", "inference_datalist", "install_cli_error_handler"]


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


def inference_datalist(input_path: str | Sequence[str], modality: str) -> list[dict[str, str]]:
    """Datalist ``[{"image": path, "modality": m}, ...]`` for an inference run.

    Args:
        input_path: a scan file, a DICOM series folder, a glob pattern (``"scans/*.nii.gz"``) or a list of them.
        modality: ``"ct"`` or ``"mr"`` for all scans.

    Raises :class:`SAMv2InputError` for a path that does not exist or a pattern that matches nothing, before any
    work starts (so no output is written for a partly valid request).
    """
    modality = check_modality(modality, "modality")
    paths = [input_path] if isinstance(input_path, (str, os.PathLike)) else list(input_path)
    if not paths:
        raise SAMv2InputError("input_path", "no input scan given")
    items = []
    for p in paths:
        p = os.fspath(p)
        matches = sorted(glob.glob(p)) if glob.has_magic(p) else [p]
        if not matches:
            raise SAMv2InputError(p, "pattern matches no file")
        for m in matches:
            if not os.path.exists(m):
                raise SAMv2InputError(m, "file not found")
            items.append({"image": m, "modality": modality})
    return items
