"""Error types of the project and the one-line error report used by the command-line entry points.

Every problem with user input (a file, a checkpoint, a points list) raises a :class:`SAMv2InputError` whose
message names the offending file and the problem in one line. ``python -m monai.bundle run`` shows a Python
traceback for any exception; :func:`install_cli_error_handler` (called from the bundle configs) replaces
that, for our errors only, by one readable line on stderr and exit code 1.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from types import TracebackType

__all__ = [
    "SAMv2Error",
    "SAMv2InputError",
    "CheckpointError",
    "RegistrationFailed",
    "DeformableStageFailed",
    "install_cli_error_handler",
    "find_samv2_error",
    "hide_reported_tracebacks",
    "interrupt_on_signals",
    "Interrupted",
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


class DeformableStageFailed(SAMv2Error):
    """The rigid registration succeeded and is written, but the optional deformable stage failed.

    Args:
        folder: the result folder, holding the rigid transform and outputs and ``summary.json`` (whose
            ``deformable`` entry records the failure).
        message: the one-line report.
    """

    def __init__(self, folder: str, message: str):
        self.folder = folder
        super().__init__(message)


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
    if isinstance(exc, (Interrupted, KeyboardInterrupt)):
        sys.stderr.write(f"ERROR: interrupted ({exc or 'Ctrl-C'}): nothing half-written; finished results are complete "
                         "(a training run resumes from its last checkpoint)\n")
        sys.stderr.flush()
        return
    error = find_samv2_error(exc)
    if error is None:
        (_previous_hook or sys.__excepthook__)(exc_type, exc, tb)
        return
    sys.stderr.write(f"ERROR: {error}\n")
    sys.stderr.flush()


class _DropReportedErrors(logging.Filter):
    """Drop log records carrying a :class:`SAMv2Error` or interruption traceback (MONAI's ``StatsHandler`` and
    ignite log the exception of a failed run before re-raising it); it is reported once, as the ``ERROR:`` line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None or debug_wanted():
            return True
        return not isinstance(exc, (Interrupted, KeyboardInterrupt)) and find_samv2_error(exc) is None


_DROP_REPORTED = _DropReportedErrors()


def debug_wanted() -> bool:
    """``SAMV2_DEBUG=1`` (or true/yes): show full tracebacks instead of the one ``ERROR:`` line."""
    return os.environ.get("SAMV2_DEBUG", "").strip().lower() in ("1", "true", "yes")


def hide_reported_tracebacks() -> None:
    """Attach :class:`_DropReportedErrors` to every logging handler that exists now (root's and each logger's).

    Called once logging is configured (the bundle's ``logging.conf`` or the CLI's); safe to call more than once.
    MONAI's ``StatsHandler`` gets its own handler only when the workflow is built, later: the filter sits on that
    logger itself too. ignite's one-line "Engine run is terminating due to exception" is left to the final report
    (the exception itself is raised on and reported, by the ``ERROR:`` line or Python's traceback)."""
    loggers = [logging.getLogger()] + [logging.getLogger(n) for n in list(logging.root.manager.loggerDict)]
    for logger in loggers:
        for handler in getattr(logger, "handlers", []):
            if _DROP_REPORTED not in handler.filters:
                handler.addFilter(_DROP_REPORTED)
    stats_logger = logging.getLogger("monai.handlers.StatsHandler")  # StatsHandler's default name
    if _DROP_REPORTED not in stats_logger.filters:
        stats_logger.addFilter(_DROP_REPORTED)
    if not stats_logger.handlers:
        # MONAI's get_logger, when StatsHandler is built later, turns propagation off and adds its stdout handler
        # only to a logger that does not exist yet: this one exists now, so it needs its own (stderr) handler
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s - %(levelname)s - %(message)s"))
        stats_logger.addHandler(handler)
    if not debug_wanted():
        logging.getLogger("ignite.engine.engine").setLevel(logging.CRITICAL)


class Interrupted(BaseException):
    """A run stopped by SIGTERM or SIGINT (see :func:`interrupt_on_signals`).

    A ``BaseException``, like ``KeyboardInterrupt``: no ``except Exception`` on the way turns it into a file error,
    and the atomic writers (which clean up on any exception) remove their temporary files."""


def _raise_interrupt(signum: int, frame) -> None:
    raise Interrupted(f"stopped by {signal.Signals(signum).name}")


def interrupt_on_signals() -> None:
    """Make SIGTERM (``kill``, a batch scheduler's time limit) and SIGINT (Ctrl-C) raise :class:`Interrupted`, so
    the atomic writers remove their temporary files and no half-written result is left (Python's default for
    SIGTERM ends the process at once, without any cleanup), and the command line can exit with its own status
    (a ``KeyboardInterrupt`` that passed through MONAI's ``eval``-ed config expressions makes Python end the
    process by SIGINT whatever it returns). Only the main thread can install them; elsewhere a no-op."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_interrupt)
        signal.signal(signal.SIGINT, _raise_interrupt)


def install_cli_error_handler() -> None:
    """Report :class:`SAMv2Error` exceptions as one line on stderr (the process still exits with code 1).

    Any other exception keeps Python's normal traceback (so does every exception with ``SAMV2_DEBUG=1``), and the
    tracebacks MONAI and ignite log for our errors are hidden. Safe to call more than once.
    """
    hide_reported_tracebacks()
    if debug_wanted():
        return
    global _previous_hook
    if sys.excepthook is not _one_line_hook:
        _previous_hook = sys.excepthook
        sys.excepthook = _one_line_hook
