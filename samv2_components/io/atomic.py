"""Atomic output folders: a case's files appear all together or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator

__all__ = ["atomic_directory"]


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
