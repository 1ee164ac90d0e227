"""Error types of the project and the one-line error report used by the command-line entry points.

Every problem with user input (a file, a checkpoint, a points list) raises a :class:`SAMv2InputError` whose
message names the offending file and the problem in one line. ``python -m monai.bundle run`` shows a Python
traceback for any exception; :func:`install_cli_error_handler` (called from the bundle configs) replaces
that, for our errors only, by one readable line on stderr and exit code 1.
"""

from __future__ import annotations

import os
import sys
from types import TracebackType

__all__ = [
    "SAMv2Error",
    "SAMv2InputError",
    "CheckpointError",
    "RegistrationFailed",
    "install_cli_error_handler",
    "find_samv2_error",
]


class SAMv2Error(Exception):
    """Base class of the errors this project raises on purpose."""


class SAMv2InputError(SAMv2Error, ValueError):
    """A user-supplied file or value cannot be used.

    Args:
        source: the file (or the name of the value) at fault; shown first in the message.
        problem: what is wrong, in a few words a user can act on.
    """

    def __init__(self, source: str | os.PathLike | None, problem: str):
        self.source = None if source is None else os.fspath(source)
        self.problem = problem
        super().__init__(problem if self.source is None else f"{self.source}: {problem}")


class MissingExtraError(SAMv2InputError):
    """An optional dependency is not installed; the message names the package and the extra that installs it."""

    def __init__(self, package: str, extra: str, purpose: str):
        super().__init__(package, f"not installed ({purpose} needs it): pip install -e \".[{extra}]\"")


class CheckpointError(SAMv2InputError):
    """A checkpoint does not fit the network: missing, unexpected or wrongly shaped tensors."""


class RegistrationFailed(SAMv2Error):
    """The scans could not be registered with confidence (the message says why).

    Raised by the registration workflow and by CrossSAM's registered pairs; the command line and the MONAI Label
    app report it as an answer (not confident), not as an error. Also importable from
    :mod:`samv2_components.registration`.
    """


_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def parse_bool(value: object, name: str) -> bool:
    """A yes/no setting as given in a config or on a command line: ``True``/``False``, 1/0, or the strings
    true/false, 1/0, yes/no, on/off in any case. Anything else raises :class:`SAMv2InputError` naming ``name``.

    Needed because ``--deformable false`` arrives as the string "false", which plain ``bool()`` makes True.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise SAMv2InputError(name, f"must be true or false (or 1/0, yes/no), got {value!r}")


def find_samv2_error(exc: BaseException | None) -> SAMv2Error | None:
    """Return the first :class:`SAMv2Error` in ``exc``'s cause/context chain (MONAI wraps transform errors)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, SAMv2Error):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


_previous_hook = None


def _one_line_hook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    error = find_samv2_error(exc)
    if error is None:
        (_previous_hook or sys.__excepthook__)(exc_type, exc, tb)
        return
    sys.stderr.write(f"ERROR: {error}\n")
    sys.stderr.flush()


def install_cli_error_handler() -> None:
    """Report :class:`SAMv2Error` exceptions as one line on stderr (the process still exits with code 1).

    Any other exception keeps Python's normal traceback. Safe to call more than once.
    """
    global _previous_hook
    if sys.excepthook is not _one_line_hook:
        _previous_hook = sys.excepthook
        sys.excepthook = _one_line_hook
