"""Checkpoints that appear complete or not at all."""

from __future__ import annotations

import os
from collections.abc import Mapping

import ignite.distributed as idist
import torch
from ignite.handlers.checkpoint import BaseSaveHandler
from monai.handlers import CheckpointSaver

from samv2_components.io.atomic import atomic_file

__all__ = ["AtomicCheckpointSaver"]


class _AtomicDiskWrites(BaseSaveHandler):
    """Wrap the disk saver of a MONAI ``CheckpointSaver``: ``torch.save`` into a temporary file renamed onto the
    checkpoint's name when complete (:func:`~samv2_components.io.atomic.atomic_file`); names, the fixed file name
    of a final model and removal of old checkpoints are the wrapped saver's. Saves on its ``save_on_rank`` only,
    as ignite's ``DiskSaver`` does (no TPU/XLA path)."""

    def __init__(self, disk_saver):
        self.disk_saver = disk_saver

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        if idist.get_rank() != self.disk_saver.save_on_rank:
            return
        name = getattr(self.disk_saver, "filename", None) or filename  # MONAI's fixed name (final model)
        with atomic_file(os.path.join(self.disk_saver.dirname, name)) as tmp:
            torch.save(checkpoint, tmp, **self.disk_saver.kwargs)

    def remove(self, filename: str) -> None:
        self.disk_saver.remove(filename)


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI's ``CheckpointSaver`` whose files appear complete or not at all.

    MONAI writes checkpoints in place (ignite's ``DiskSaver`` with ``atomic=False``): a run stopped while it writes
    one (Ctrl-C, SIGTERM, a full disk) leaves a torn file under the name of a good one, and the next run of the same
    command resumes from it (:class:`~samv2_components.engines.ResumeFromLatestCheckpoint`) and fails, found by the
    interrupted-run test when its SIGTERM landed inside ``torch.save``. Here each file is written next to its final
    name and renamed onto it when complete.

    Args: as ``CheckpointSaver``.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for checkpoint in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if checkpoint is not None:
                checkpoint.save_handler = _AtomicDiskWrites(checkpoint.save_handler)
