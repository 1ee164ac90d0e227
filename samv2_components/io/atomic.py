"""Atomic outputs: a file or a case's folder appears complete or not at all."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator

__all__ = ["atomic_directory", "atomic_file", "check_output_dir"]


@contextlib.contextmanager
def atomic_directory(output_dir: str | os.PathLike, name: str) -> Iterator[str]:
    """Write a folder ``<output_dir>/<name>`` atomically.

    Yields a temporary folder next to the final one; on normal exit it replaces ``<output_dir>/<name>`` (an
    existing folder is removed only then), on an exception it is deleted and any previous result stays untouched.
    The folder gets the permissions of any new folder (``0o777`` less the umask), not the ``0700`` of
    :func:`tempfile.mkdtemp`.
    """
    os.makedirs(output_dir, exist_ok=True)
    final = os.path.join(output_dir, name)
    tmp = _new_temporary(os.fspath(output_dir), name, folder=True)
    try:
        yield tmp
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[str]:
    """Write the file ``path`` atomically: readers see the previous file or the complete new one, never a part.

    Yields the path of an empty temporary file in the same folder that ends like ``path`` (writers that choose the
    format by the extension, e.g. ITK's or nibabel's, still work; open it with ``"w"``/``"wb"``, not ``"x"``). On
    normal exit the temporary file is flushed to disk (:func:`os.fsync`: after a crash ``path`` holds the old or
    the new content, never an empty file) and renamed onto ``path`` (:func:`os.replace`); on an exception it is
    removed and an existing ``path`` stays untouched. Parent folders are created.

    Every call gets its own temporary name (concurrent writers of one path never share a temporary file; the last
    to finish wins), and the file gets the permissions of any new file (``0o666`` less the umask), not the
    ``0600`` of :func:`tempfile.mkstemp`.
    """
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = _new_temporary(folder, name)
    try:
        yield tmp
        if not os.path.isfile(tmp):
            raise FileNotFoundError(f"the writer left no file at {tmp}")
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def check_output_dir(path: str | os.PathLike) -> str:
    """Make sure results can be written under ``path`` before any work starts; return it.

    ``path`` need not exist: its nearest existing ancestor must be a folder this process can write into. Nothing is
    created. Raises :class:`~samv2_components.errors.SAMv2InputError` "cannot write to <path>: <reason>".
    """
    from samv2_components.errors import SAMv2InputError

    target = os.path.abspath(os.fspath(path))
    probe = target
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise SAMv2InputError(f"cannot write to {target}", f"{probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise SAMv2InputError(f"cannot write to {target}", f"no permission to write in {probe}")
    return os.fspath(path)


def _new_temporary(parent: str, name: str, folder: bool = False) -> str:
    """Create an empty, uniquely named file ``<parent>/.<name>.<random>.tmp<extension of name, lower case>`` (or
    folder ``<parent>/.<name>.<random>.tmp``) and return its path.

    Created exclusively (never an existing one) and as :func:`open` / :func:`os.makedirs` create them: mode
    ``0o666`` (folder ``0o777``) less the umask, applied by the system.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = os.path.join(parent, f".{name}.{secrets.token_hex(8)}.tmp")
        try:
            if folder:
                os.mkdir(tmp, 0o777)
            else:
                tmp += _extension(name).lower()
                os.close(os.open(tmp, flags, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"no free temporary name for {os.path.join(parent, name)}")


def _extension(name: str) -> str:
    """``.nii.gz`` for ``scan.nii.gz``, ``.json`` for ``list.json``, ``""`` for no extension."""
    for double in (".nii.gz", ".seg.nrrd", ".mrk.json"):
        if name.lower().endswith(double):
            return name[-len(double):]
    return os.path.splitext(name)[1]
