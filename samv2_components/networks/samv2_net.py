"""SAMv2 network: a 3D ResNet18 encoder with fine, coarse and semantic FPN embedding heads.

Architecture (upstream SAMv2/UAE reference implementation, see the bundle docs):

* Input ``(B, 1, D, H, W)``: one scan at 2 mm isotropic, tensor axes (S, P, L) = (depth, height, width).
* Encoder: stem conv (3,7,7), stride 1, no pooling; four stages of two basic blocks with channels
  64/128/256/512 (times ``width``); in-plane stride 2 in every stage, depth stride 1,1,1,2; a (2,1,1) depth
  max-pool after stage 1; stages 1-2 use (1,3,3) kernels, stages 3-4 (3,3,3); each stage's first block has a
  1x1x1 projection shortcut.
* Heads, each ``embedding_dim`` channels and L2-normalised per voxel:
  ``fine`` (FPN over stages 1-3, grid D/2 x H/2 x W/2: 4 mm), ``coarse`` (stage 4, grid D/4 x H/16 x W/16:
  8 mm in depth, 32 mm in-plane), ``semantic`` (a second FPN like ``fine``). SAM v1 has no semantic head.

``forward`` returns one tensor (what MONAI's ``verify_net_in_out`` and ``ckpt_export`` need): the *matching
descriptor* on the fine grid, i.e. the heads concatenated along channels with the coarse head resampled to the
fine grid and re-normalised. Because every head is unit-length, ``<a, b> / n_heads`` of two descriptors is the
SAMv2 similarity score (the mean of per-head cosines). ``forward_heads`` returns each head on its own grid.
"""

import copy
from collections.abc import Sequence
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

__all__ = ["SAMv2Net", "HEAD_NAMES", "HEAD_GRIDS", "INPUT_DIVISOR", "upsample_to_fine_grid", "fuse_conv_norm", "depth_max_pool"]

HEAD_NAMES = ("fine", "coarse", "semantic")

#: per head: (stride, offset) in input voxels along (D, H, W): output voxel ``i`` is centred on input voxel
#: ``stride * i + offset``. Derived from the receptive-field centres: strided 3x3 convs and 1x1 shortcuts
#: centre output i on input 2i; the (2,1,1) max-pool centres it on 2i + 0.5.
HEAD_GRIDS: Dict[str, tuple] = {
    "fine": ((2, 2, 2), (0.5, 0.0, 0.0)),
    "coarse": ((4, 16, 16), (0.5, 0.0, 0.0)),
    "semantic": ((2, 2, 2), (0.5, 0.0, 0.0)),
}

#: input sizes (D, H, W) must be multiples of this for all grids to line up (the coarse stride).
INPUT_DIVISOR = (4, 16, 16)

_STAGE_CHANNELS = (64, 128, 256, 512)
_STAGE_STRIDES = ((1, 2, 2), (1, 2, 2), (1, 2, 2), (2, 2, 2))
_STAGE_KERNELS = ((1, 3, 3), (1, 3, 3), (3, 3, 3), (3, 3, 3))
_FPN_CHANNELS = 128


class ConvNorm3d(nn.Module):
    """Bias-free 3D convolution followed by batch norm (no activation)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.norm = nn.BatchNorm3d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


def fuse_conv_norm(network: nn.Module) -> nn.Module:
    """An inference copy of ``network`` with every :class:`ConvNorm3d`'s batch norm folded into its conv.

    Same outputs in eval mode (up to float rounding), about 15% less time on the CPU. The original is untouched,
    so its state dict stays loadable and trainable.
    """
    fused = copy.deepcopy(network).eval()
    for module in fused.modules():
        if isinstance(module, ConvNorm3d) and isinstance(module.norm, nn.BatchNorm3d):
            module.conv = fuse_conv_bn_eval(module.conv, module.norm)
            module.norm = nn.Identity()
    return fused


class BasicBlock3d(nn.Module):
    """ResNet basic block: two convs of the same kernel, stride on the first, projection shortcut if needed."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Sequence[int], stride: Sequence[int]):
        super().__init__()
        padding = tuple(k // 2 for k in kernel_size)
        self.conv1 = ConvNorm3d(in_channels, out_channels, kernel_size, stride, padding)
        self.conv2 = ConvNorm3d(out_channels, out_channels, kernel_size, 1, padding)
        needs_projection = in_channels != out_channels or any(s != 1 for s in stride)
        self.shortcut = ConvNorm3d(in_channels, out_channels, 1, stride) if needs_projection else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.conv1(x), inplace=True)
        out = self.conv2(out)
        out += self.shortcut(x)
        return F.relu(out, inplace=True)


def depth_max_pool(x: torch.Tensor) -> torch.Tensor:
    """Max-pool ``(B, C, D, H, W)`` over pairs of depth slices (kernel and stride (2, 1, 1); an odd last slice is
    dropped, as ``nn.MaxPool3d`` does): ``(B, C, D // 2, H, W)``.

    The elementwise maximum of the even and odd slices gives the same values as ``nn.MaxPool3d((2, 1, 1))`` and
    keeps the memory layout; on the CPU it takes 3 ms where the pooling kernel took 27 ms (light network,
    192 x 192 x 160 input, bf16 channels-last; the pooling kernel tracks the indices of every maximum). In training
    a tie sends half the gradient to each slice (the pooling kernel: all to one); ties are zeros after the ReLU
    that precedes it, whose own gradient there is zero.
    """
    depth = x.shape[2] // 2 * 2
    return torch.maximum(x[:, :, 0:depth:2], x[:, :, 1:depth:2])


class ResNet18Encoder3d(nn.Module):
    """The SAMv2 3D ResNet18 encoder. Returns the four stage outputs (stage 1 after its depth max-pool).

    Shapes for input ``(B, C, D, H, W)`` and ``c = round(64 * width)``:
    ``(B, c, D/2, H/2, W/2)``, ``(B, 2c, D/2, H/4, W/4)``, ``(B, 4c, D/2, H/8, W/8)``, ``(B, 8c, D/4, H/16, W/16)``.
    """

    def __init__(self, in_channels: int = 1, width: float = 1.0):
        super().__init__()
        channels = [max(1, round(c * width)) for c in _STAGE_CHANNELS]
        self.out_channels = channels
        self.stem = ConvNorm3d(in_channels, channels[0], (3, 7, 7), 1, (1, 3, 3))
        stages = []
        previous = channels[0]
        for out_ch, kernel, stride in zip(channels, _STAGE_KERNELS, _STAGE_STRIDES):
            stages.append(
                nn.Sequential(BasicBlock3d(previous, out_ch, kernel, stride), BasicBlock3d(out_ch, out_ch, kernel, (1, 1, 1)))
            )
            previous = out_ch
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        x = F.relu(self.stem(x), inplace=True)
        features: List[torch.Tensor] = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i == 0:
                x = depth_max_pool(x)
            features.append(x)
        return features


class FPNEmbeddingHead(nn.Module):
    """Top-down feature pyramid reduced to one L2-normalised embedding at its finest input level.

    1x1x1 lateral convs bring every input level to ``fpn_channels``; coarser levels are upsampled (nearest) to
    the next finer one and summed; one 3x3x3 conv gives ``embedding_dim`` channels; each voxel's vector is
    L2-normalised. With one input level this is the coarse "read-out" head.
    """

    def __init__(self, in_channels: Sequence[int], fpn_channels: int, embedding_dim: int):
        super().__init__()
        self.lateral_convs = nn.ModuleList([nn.Conv3d(c, fpn_channels, 1) for c in in_channels])
        self.output_conv = nn.Conv3d(fpn_channels, embedding_dim, 3, padding=1)

    def forward(self, features: List[torch.Tensor], normalize: bool = True) -> torch.Tensor:
        """``normalize=False`` returns the output conv's raw vectors (the inferer normalises them in float32 in
        cache-sized blocks, cheaper than one pass over a whole map)."""
        # the finest lateral is computed last and the upsampled coarser sum added to it in place: holding it beside
        # the other laterals and a fresh sum was 0.2 GB of a large CT's inference peak (the coarser levels are small)
        coarser: List[torch.Tensor] = []
        for i, lateral in enumerate(self.lateral_convs):
            if i > 0:
                coarser.append(lateral(features[i]))
        x = self.lateral_convs[0](features[0])
        if len(coarser) > 0:
            top = coarser[-1]
            for i in range(len(coarser) - 2, -1, -1):
                top = coarser[i] + F.interpolate(top, size=coarser[i].shape[2:], mode="nearest")
            x = x.add_(F.interpolate(top, size=x.shape[2:], mode="nearest"))
        x = self.output_conv(x)
        return F.normalize(x, dim=1) if normalize else x


def upsample_to_fine_grid(coarse: torch.Tensor, fine_size: List[int], ratios: List[float]) -> torch.Tensor:
    """Resample the coarse head ``(B, C, d, h, w)`` trilinearly onto the fine grid ``fine_size`` (not normalised).

    Voxel centres are matched physically (see :data:`HEAD_GRIDS`): fine voxel ``f`` sits at coarse voxel
    ``f * ratio`` along each axis, ``ratios = fine_stride / coarse_stride`` (the offsets are equal). A plain
    ``interpolate(align_corners=False)`` would shift the coarse map by up to 7/16 of a coarse voxel (14 mm
    in-plane). Beyond the last coarse voxel the border value is used.
    """
    # The package's one grid_sample conversion that does not call samv2_components.geometry.voxel_to_grid_sample, on
    # purpose: it runs inside SAMv2Net.forward, which torch.jit.script compiles (the bundles' ckpt_export -> model.ts
    # for MONAI Deploy; tests/test_network.py, tests/test_bundle_export.py), so everything it calls must be
    # TorchScript (tensors on the features' device, List[int]/List[float] arguments). The geometry helper takes numpy
    # arrays or tensors (isinstance, np.asarray, float64) and is not scriptable. The map is the same as the helper's
    # with align_corners=True, evaluated on the fine grid's voxel centres in coarse voxels (f * ratio).
    coords: List[torch.Tensor] = []
    for axis in range(3):
        ratio = ratios[axis]
        n_coarse = coarse.shape[2 + axis]
        pos = torch.arange(fine_size[axis], dtype=torch.float32, device=coarse.device) * ratio
        # grid_sample with align_corners=True maps -1 / +1 to the first / last voxel centre
        coords.append(pos * (2.0 / max(n_coarse - 1, 1)) - 1.0 if n_coarse > 1 else torch.zeros_like(pos))
    zz, yy, xx = torch.meshgrid(coords[0], coords[1], coords[2], indexing="ij")
    grid = torch.stack((xx, yy, zz), dim=-1).unsqueeze(0).expand(coarse.shape[0], -1, -1, -1, -1)
    return F.grid_sample(coarse, grid.to(coarse.dtype), mode="bilinear", padding_mode="border", align_corners=True)


class SAMv2Net(nn.Module):
    """SAMv2 embedding network (Semantic-SAM): ResNet18 encoder + fine/coarse/semantic embedding heads.

    Args:
        in_channels: input channels (1: one CT or MR volume).
        width: channel multiplier of the encoder and of the FPN inner channels (1.0 = the published network,
            about 33 M parameters; smaller values give a lighter CPU variant). The embedding size is unaffected.
        embedding_dim: channels of every head's embedding (128 in the paper).
        heads: which heads to build, a subset of ``("fine", "coarse", "semantic")``; ``fine`` is required.
            SAM v1 checkpoints have ``("fine", "coarse")``.

    Input ``(B, in_channels, D, H, W)`` with ``(D, H, W)`` multiples of :data:`INPUT_DIVISOR`, axes (S, P, L).
    """

    head_levels: Dict[str, List[int]]
    coarse_to_fine_ratios: List[float]

    def __init__(
        self,
        in_channels: int = 1,
        width: float = 1.0,
        embedding_dim: int = 128,
        heads: Sequence[str] = HEAD_NAMES,
    ):
        super().__init__()
        heads = tuple(heads)
        unknown = [h for h in heads if h not in HEAD_NAMES]
        if unknown or "fine" not in heads or len(set(heads)) != len(heads):
            raise ValueError(f"heads must be distinct names from {HEAD_NAMES} including 'fine', got {heads}")
        self.head_names: List[str] = [h for h in HEAD_NAMES if h in heads]  # canonical order
        self.width = float(width)
        self.embedding_dim = int(embedding_dim)
        self.encoder = ResNet18Encoder3d(in_channels, width)
        enc = self.encoder.out_channels
        fpn_channels = max(1, round(_FPN_CHANNELS * width))
        self.heads = nn.ModuleDict()
        self.head_levels = {}  # which encoder stages feed each head
        self.coarse_to_fine_ratios = [f / c for f, c in zip(HEAD_GRIDS["fine"][0], HEAD_GRIDS["coarse"][0])]
        for name in self.head_names:
            levels = [3] if name == "coarse" else [0, 1, 2]
            self.head_levels[name] = levels
            self.heads[name] = FPNEmbeddingHead([enc[i] for i in levels], fpn_channels, embedding_dim)

    @property
    def out_channels(self) -> int:
        """Channels of :meth:`forward`'s descriptor: ``embedding_dim`` per head."""
        return self.embedding_dim * len(self.head_names)

    def forward_heads(
        self, x: torch.Tensor, heads: Optional[List[str]] = None, normalize: bool = True
    ) -> Dict[str, torch.Tensor]:
        """Each head's L2-normalised embedding on its own grid (see :data:`HEAD_GRIDS`); ``heads`` picks a subset
        (a training step needs only the heads its loss uses: each FPN head costs about a third of the pass);
        ``normalize=False`` leaves the vectors unnormalised (:class:`~samv2_components.inference.SAMv2Inferer`)."""
        features = self.encoder(x)
        out: Dict[str, torch.Tensor] = {}
        for name, head in self.heads.items():
            if heads is None or name in heads:  # (TorchScript unrolls this loop: no `continue`)
                levels = self.head_levels[name]
                out[name] = head([features[i] for i in levels], normalize)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Matching descriptor ``(B, embedding_dim * n_heads, D/2, H/2, W/2)``: heads concatenated on the fine grid."""
        heads = self.forward_heads(x)
        fine = heads["fine"]
        parts: List[torch.Tensor] = []
        for name in self.head_names:
            emb = heads[name]
            if name == "coarse":
                # trilinear blends of unit vectors are shorter than 1: re-normalise
                emb = F.normalize(upsample_to_fine_grid(emb, list(fine.shape[2:]), self.coarse_to_fine_ratios), dim=1)
            parts.append(emb)
        return torch.cat(parts, dim=1)
