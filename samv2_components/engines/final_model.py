"""Saving the trained model only when the run completes."""

from __future__ import annotations

from ignite.engine import Engine

from samv2_components.engines.checkpoints import AtomicCheckpointSaver

__all__ = ["FinalModelSaver"]


class FinalModelSaver(AtomicCheckpointSaver):
    """MONAI's ``CheckpointSaver`` with ``save_final``, minus the save on an exception, written atomically
    (:class:`~samv2_components.engines.AtomicCheckpointSaver`).

    MONAI writes the final file also when the run raises (Ctrl-C included), under the same name as a completed
    run's (``model.pt``): a half-trained model that looks finished. Here an interrupted or failed run writes
    nothing final; it resumes from its last epoch checkpoint (:class:`ResumeFromLatestCheckpoint`) instead.

    Args: as ``CheckpointSaver`` (``save_final`` is forced on; ``final_filename`` names the file).
    """

    def __init__(self, save_dir: str, save_dict: dict, final_filename: str = "model.pt", **kwargs):
        super().__init__(save_dir=save_dir, save_dict=save_dict, save_final=True, final_filename=final_filename, **kwargs)

    def exception_raised(self, engine: Engine, e: Exception) -> None:
        raise e
