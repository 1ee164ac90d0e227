"""Atomic outputs: a file or a case's folder appears complete or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator

__all__ = ["atomic_directory", "atomic_file"]


@contextlib.contextmanager
def atomic_directory(output_dir: str | os.PathLike, name: str) -> Iterator[str]:
    """Write a folder ``<output_dir>/<name>`` atomically.

    Yields a temporary folder next to the final one; on normal exit it replaces ``<output_dir>/<name>`` (an
    existing folder is removed only then), on an exception it is deleted and any previous result stays untouched.
    """
    os.makedirs(output_dir, exist_ok=True)
    final = os.path.join(output_dir, name)
    tmp = tempfile.mkdtemp(prefix=f".{name}.", dir=output_dir)
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
    """Write the file ``path`` atomically.

    Yields a temporary path in the same folder that ends like ``path`` (writers that choose the format by the
    extension, e.g. ITK's, still work); on normal exit it is renamed onto ``path``, on an exception it is removed
    and an existing ``path`` stays untouched. Parent folders are created.
    """
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=f".tmp{_extension(name)}", dir=folder)
    os.close(handle)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def _extension(name: str) -> str:
    """``.nii.gz`` for ``scan.nii.gz``, ``.json`` for ``list.json``, ``""`` for no extension."""
    for double in (".nii.gz", ".seg.nrrd", ".mrk.json"):
        if name.lower().endswith(double):
            return name[-len(double):]
    return os.path.splitext(name)[1]
