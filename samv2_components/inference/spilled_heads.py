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
from monai.data import MetaTensor

__all__ = ["SpilledHeads"]


class SpilledHeads:
    """Write ``heads`` (``{head: tensor}``) to a private temporary folder and **empty the dict**, so that a caller
    holding the only other reference to that dict lets the tensors' memory go. The folder is new, under
    ``tempfile.gettempdir()`` (``$TMPDIR``; about 0.55 GB for a full-resolution CT's heads).

    The tensors come back from :meth:`load` as they were given, on the CPU: values, dtypes, shapes, strides (a
    channels-last head stays channels-last; any other layout comes back dense) and, for a ``MetaTensor`` (what :class:`~samv2_components.inference.SAMv2Inferer` returns), its metadata (affine
    included), which stays in memory meanwhile. Each tensor's bytes are written raw and read back in one read
    (measured for 0.55 GB here: 0.1-0.3 s each way; ``torch.save`` took 1.25 s for one 275 MB head, ``np.fromfile``
    1.3 s to read it). :meth:`close` (or leaving a ``with`` block) removes the folder.

    Example::

        with SpilledHeads(fixed_heads) as spilled:   # fixed_heads is now {}
            ...                                       # memory-hungry work
            heads = spilled.load()
    """

    def __init__(self, heads: dict[str, torch.Tensor]):
        self._folder = tempfile.TemporaryDirectory(prefix="samv2_heads_")
        self.folder = self._folder.name
        self.nbytes = 0
        self._entries: dict[str, dict] = {}
        for i, (name, tensor) in enumerate(heads.items()):
            data = tensor.detach().cpu().as_subclass(torch.Tensor)
            # the axes in memory order (the inferer's heads are channels-last): written without a copy, read back
            # with the same strides
            order = sorted(range(data.ndim), key=lambda d: -data.stride(d))
            in_memory = data.permute(order).contiguous()  # a view when the strides are a permuted dense layout
            path = os.path.join(self.folder, f"{i}.raw")
            in_memory.view(torch.uint8).numpy().tofile(path)  # any dtype, bfloat16 included, as its bytes
            self.nbytes += in_memory.numel() * in_memory.element_size()
            entry = {"path": path, "dtype": data.dtype, "shape": tuple(in_memory.shape), "order": order}
            if isinstance(tensor, MetaTensor):
                entry["meta"] = dict(tensor.meta)
                entry["applied_operations"] = list(tensor.applied_operations)
            self._entries[name] = entry
        heads.clear()

    def load(self) -> dict[str, torch.Tensor]:
        """The heads as they were given (on the CPU)."""
        out: dict[str, torch.Tensor] = {}
        for name, entry in self._entries.items():
            raw = torch.empty(os.path.getsize(entry["path"]), dtype=torch.uint8)
            with open(entry["path"], "rb", buffering=0) as fh:  # one read into the tensor (np.fromfile: 10x slower)
                if fh.readinto(memoryview(raw.numpy())) != raw.numel():
                    raise OSError(f"{entry['path']}: the spilled heads came back short")
            inverse = sorted(range(len(entry["order"])), key=lambda d: entry["order"][d])
            tensor = raw.view(entry["dtype"]).reshape(entry["shape"]).permute(inverse)
            if "meta" in entry:
                tensor = MetaTensor(tensor, meta=dict(entry["meta"]), applied_operations=list(entry["applied_operations"]))
            out[name] = tensor
        return out

    def close(self) -> None:
        self._folder.cleanup()

    def __enter__(self) -> "SpilledHeads":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
