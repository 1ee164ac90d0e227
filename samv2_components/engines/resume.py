"""Resuming a training run from the newest checkpoint in its folder."""

from __future__ import annotations

import copy
import glob
import logging
import os

from ignite.engine import Engine, Events
from monai.handlers import CheckpointLoader
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

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

    Learning-rate schedulers take only their progress (``last_epoch``) from the checkpoint; their settings
    (``t_total``, ``warmup_steps``, ``base_lrs``, ...) stay those of the current config, so a run resumed with a
    larger ``num_steps`` stretches its schedule to the new total instead of keeping the old one.
    """

    def __init__(self, folder: str, load_dict: dict, pattern: str = "checkpoint_*.pt"):
        self.folder, self.load_dict, self.pattern = folder, load_dict, pattern

    def attach(self, engine: Engine) -> None:
        path = latest_checkpoint(self.folder, self.pattern)
        if path is None:
            logger.info("no checkpoint in %s: training from scratch", self.folder)
            return
        logger.info("resuming from %s", path)
        schedulers = {k: v for k, v in self.load_dict.items() if isinstance(v, LRScheduler)}
        settings = {k: _schedule_settings(v) for k, v in schedulers.items()}
        CheckpointLoader(load_path=path, load_dict=self.load_dict, map_location="cpu").attach(engine)

        def restore_settings(_: Engine) -> None:  # runs after the loader (same event, attached later)
            for k, scheduler in schedulers.items():
                scheduler.__dict__.update(settings[k])
                if isinstance(scheduler, LambdaLR):  # the learning rate of the resumed step under these settings
                    lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
                    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
                        group["lr"] = lr

        engine.add_event_handler(Events.STARTED, restore_settings)


def _schedule_settings(scheduler: LRScheduler) -> dict:
    """The public, non-progress attributes of a scheduler's state (its constructor settings)."""
    return {
        k: copy.deepcopy(v)
        for k, v in scheduler.state_dict().items()
        if not k.startswith("_") and k not in ("last_epoch", "lr_lambdas")
    }
