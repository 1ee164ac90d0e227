"""SAMv2 training losses: voxel-wise InfoNCE (appearance heads), prototypical contrastive loss (semantic head) and
cross-modal InfoNCE (CrossSAM)."""

from samv2_components.losses.appearance import (
    COARSE_INFONCE_DEFAULTS,
    FINE_INFONCE_DEFAULTS,
    VoxelInfoNCELoss,
    coarse_infonce_loss,
    fine_infonce_loss,
    head_grid_positions,
    voxel_rows,
)
from samv2_components.losses.cross_modal import (
    CROSS_COARSE_DEFAULTS,
    CROSS_FINE_DEFAULTS,
    CrossModalInfoNCELoss,
    cross_modal_coarse_loss,
    cross_modal_fine_loss,
)
from samv2_components.losses.semantic import PrototypeContrastiveLoss, labels_to_grid

__all__ = [
    "COARSE_INFONCE_DEFAULTS",
    "CROSS_COARSE_DEFAULTS",
    "CROSS_FINE_DEFAULTS",
    "CrossModalInfoNCELoss",
    "FINE_INFONCE_DEFAULTS",
    "PrototypeContrastiveLoss",
    "VoxelInfoNCELoss",
    "coarse_infonce_loss",
    "cross_modal_coarse_loss",
    "cross_modal_fine_loss",
    "fine_infonce_loss",
    "head_grid_positions",
    "voxel_rows",
    "labels_to_grid",
]
