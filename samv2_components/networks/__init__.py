from samv2_components.networks.samv2_net import (
    HEAD_GRIDS,
    HEAD_NAMES,
    INPUT_DIVISOR,
    BasicBlock3d,
    ConvNorm3d,
    FPNEmbeddingHead,
    ResNet18Encoder3d,
    SAMv2Net,
    fuse_conv_norm,
    upsample_to_fine_grid,
)

__all__ = [
    "HEAD_GRIDS",
    "HEAD_NAMES",
    "INPUT_DIVISOR",
    "BasicBlock3d",
    "ConvNorm3d",
    "FPNEmbeddingHead",
    "ResNet18Encoder3d",
    "SAMv2Net",
    "fuse_conv_norm",
    "upsample_to_fine_grid",
]
