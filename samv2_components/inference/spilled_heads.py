"""Embedding heads set aside in a temporary file while a long step does not need them.

The samv2 registration pipeline needs the fixed scan's embeddings twice: for AdaReg's fit at the start, and again
only if the orientation search runs, after the intensity refinement of the first candidates. On a full-resolution
CT those heads are about 0.55 GB (two 128-channel float16 maps on the 4 mm grid), held through a refinement that
never reads them; :class:`SpilledHeads` moves them to disk meanwhile and reads them back when asked.
"""

from __future__ import annotations

import os
import tempfile

import torch

__all__ = ["SpilledHeads"]


class SpilledHeads:
    """Write ``heads`` (``{head: tensor}``) to a private temporary file and **empty the dict**, so that a caller
    holding the only other reference to that dict lets the tensors' memory go. The file lives in a new folder under
    ``tempfile.gettempdir()`` (``$TMPDIR``; about 0.55 GB for a full-resolution CT's heads).

    The tensors come back from :meth:`load` as they were given, on the CPU: values, dtypes, shapes and, for a
    ``MetaTensor`` (what :class:`~samv2_components.inference.SAMv2Inferer` returns), its affine and metadata (the
    file is a pickle this object wrote itself, in a folder only this process's user can read, so it is read back
    with ``weights_only=False``). :meth:`close` (or leaving a ``with`` block) removes the file.

    Example::

        with SpilledHeads(fixed_heads) as spilled:   # fixed_heads is now {}
            ...                                       # memory-hungry work
            heads = spilled.load()
    """

    def __init__(self, heads: dict[str, torch.Tensor]):
        self._folder = tempfile.TemporaryDirectory(prefix="samv2_heads_")
        self.path = os.path.join(self._folder.name, "heads.pt")
        self.nbytes = sum(int(t.numel()) * t.element_size() for t in heads.values())
        torch.save({name: tensor.detach().cpu() for name, tensor in heads.items()}, self.path)
        heads.clear()

    def load(self) -> dict[str, torch.Tensor]:
        """The heads as they were given (on the CPU)."""
        return torch.load(self.path, map_location="cpu", weights_only=False)

    def close(self) -> None:
        self._folder.cleanup()

    def __enter__(self) -> "SpilledHeads":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
