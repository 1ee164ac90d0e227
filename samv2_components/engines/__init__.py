from samv2_components.engines.resume import ResumeFromLatestCheckpoint, latest_checkpoint
from samv2_components.engines.trainer import HeadsModel, SAMv2Trainer

__all__ = ["HeadsModel", "ResumeFromLatestCheckpoint", "SAMv2Trainer", "latest_checkpoint"]
