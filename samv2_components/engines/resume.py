"""Resuming a training run from the newest checkpoint in its folder."""

from __future__ import annotations

import glob
import logging
import os

from ignite.engine import Engine
from monai.handlers import CheckpointLoader

__all__ = ["latest_checkpoint", "ResumeFromLatestCheckpoint"]

logger = logging.getLogger("samv2_components")


def latest_checkpoint(folder: str, pattern: str = "checkpoint_*.pt") -> str | None:
    """The most recently written file matching ``pattern`` in ``folder`` (None if there is none)."""
    files = glob.glob(os.path.join(folder, pattern))
    return max(files, key=os.path.getmtime) if files else None


class ResumeFromLatestCheckpoint:
    """Attach MONAI's ``CheckpointLoader`` for the newest checkpoint in ``folder``, if there is one.

    With ``load_dict`` holding the model, optimiser, scheduler and trainer, killing a run and starting the same
    command again continues it: same iteration count, optimiser momentum and learning-rate schedule. A fresh
    folder starts from scratch.
    """

    def __init__(self, folder: str, load_dict: dict, pattern: str = "checkpoint_*.pt"):
        self.folder, self.load_dict, self.pattern = folder, load_dict, pattern

    def attach(self, engine: Engine) -> None:
        path = latest_checkpoint(self.folder, self.pattern)
        if path is None:
            logger.info("no checkpoint in %s: training from scratch", self.folder)
            return
        logger.info("resuming from %s", path)
        CheckpointLoader(load_path=path, load_dict=self.load_dict, map_location="cpu").attach(engine)
