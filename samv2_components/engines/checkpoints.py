"""Checkpoints that appear complete or not at all."""

from __future__ import annotations

from ignite.handlers import DiskSaver
from monai.handlers import CheckpointSaver

__all__ = ["AtomicCheckpointSaver"]


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI's ``CheckpointSaver`` whose files appear complete or not at all.

    MONAI builds its disk savers with ignite's ``DiskSaver(atomic=False)`` (atomic files used to be readable by
    their owner only; ignite now adds group and others' read permission): a run stopped while it writes a checkpoint
    (Ctrl-C, SIGTERM, a full disk) leaves a torn file under the name of a good one, and the next run of the same
    command resumes from it (:class:`~samv2_components.engines.ResumeFromLatestCheckpoint`) and fails, as the
    interrupted-run test found when its SIGTERM landed inside ``torch.save``. Here the same savers run in ignite's
    atomic mode: a temporary file in the checkpoint folder, renamed onto the checkpoint's name when complete and
    removed on any error.

    Args: as ``CheckpointSaver``.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for checkpoint in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if checkpoint is None:
                continue
            saver = checkpoint.save_handler
            if not (isinstance(saver, DiskSaver) and hasattr(saver, "_atomic")):  # an ignite or MONAI we do not know
                raise TypeError(f"expected MONAI's ignite DiskSaver with an atomic mode, got {type(saver).__name__}")
            saver._atomic = True  # ignite's own option, which MONAI's saver passes as False
