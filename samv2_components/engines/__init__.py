from samv2_components.engines.checkpoints import AtomicCheckpointSaver
from samv2_components.engines.clock import TrainingClock
from samv2_components.engines.crosssam import CrossSAMTrainer
from samv2_components.engines.final_model import FinalModelSaver
from samv2_components.engines.resume import ResumeFromLatestCheckpoint, latest_checkpoint
from samv2_components.engines.trainer import HeadsModel, SAMv2Trainer

__all__ = ["AtomicCheckpointSaver", "CrossSAMTrainer", "FinalModelSaver", "HeadsModel", "ResumeFromLatestCheckpoint", "SAMv2Trainer", "TrainingClock", "latest_checkpoint"]
