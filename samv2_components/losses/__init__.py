"""SAMv2 training losses: voxel-wise InfoNCE (appearance heads) and prototypical contrastive loss (semantic head)."""

from samv2_components.losses.appearance import (
    COARSE_INFONCE_DEFAULTS,
    FINE_INFONCE_DEFAULTS,
    VoxelInfoNCELoss,
    coarse_infonce_loss,
    fine_infonce_loss,
    head_grid_positions,
)
from samv2_components.losses.semantic import PrototypeContrastiveLoss, labels_to_grid

__all__ = [
    "COARSE_INFONCE_DEFAULTS",
    "FINE_INFONCE_DEFAULTS",
    "PrototypeContrastiveLoss",
    "VoxelInfoNCELoss",
    "coarse_infonce_loss",
    "fine_infonce_loss",
    "head_grid_positions",
    "labels_to_grid",
]
