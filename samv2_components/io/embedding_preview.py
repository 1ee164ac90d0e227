"""The ``preview.png`` of an embedding case: PCA-to-RGB maps of every head next to the input (as in the SAMv2 paper's
Fig. 4). Part of the embedding file format written by :mod:`samv2_components.io.embeddings`; also importable from
:mod:`samv2_components.visualize` with the other QC pictures.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

__all__ = ["pca_rgb", "embedding_preview"]


def pca_rgb(embedding: torch.Tensor, max_samples: int = 20000, seed: int = 0) -> torch.Tensor:
    """Project a ``(C, D, H, W)`` embedding onto its first three principal components, scaled to [0, 1].

    The components are fitted on at most ``max_samples`` random voxels; each is stretched between its 1st and
    99th percentile. Returns ``(3, D, H, W)`` float32.
    """
    c = embedding.shape[0]
    flat = embedding.reshape(c, -1).T.float()
    gen = torch.Generator().manual_seed(seed)
    sample = flat[torch.randperm(flat.shape[0], generator=gen)[:max_samples]]
    mean = sample.mean(0, keepdim=True)
    _, _, v = torch.linalg.svd(sample - mean, full_matrices=False)
    proj = (flat - mean) @ v[:3].T
    lo = torch.quantile(proj[:max_samples], 0.01, dim=0)
    hi = torch.quantile(proj[:max_samples], 0.99, dim=0)
    rgb = ((proj - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1)
    return rgb.T.reshape(3, *embedding.shape[1:])


def _to_uint8_gray(slice_2d: torch.Tensor) -> np.ndarray:
    lo, hi = float(slice_2d.min()), float(slice_2d.max())
    return (((slice_2d - lo) / max(hi - lo, 1e-6)).clamp(0, 1) * 255).byte().cpu().numpy()


def embedding_preview(
    image: torch.Tensor,
    heads: Mapping[str, torch.Tensor],
    head_strides: Mapping[str, Sequence[int]],
    path: str | os.PathLike,
    slice_fractions: Sequence[float] = (0.3, 0.5, 0.7),
) -> None:
    """Write a PNG: one row per axial slice, columns = the input slice and the PCA-RGB map of every head.

    Args:
        image: the preprocessed network input ``(D, H, W)`` (axes S, P, L: an axial slice ``image[d]`` shows
            anterior at the top and the patient's right on the left, the radiological convention).
        heads: ``{name: (C, d, h, w)}`` embeddings; each is shown nearest-upsampled to the input grid.
        head_strides: ``{name: (sD, sH, sW)}`` output strides of the heads in input voxels.
        path: output PNG path.
        slice_fractions: relative depth positions of the axial slices shown.
    """
    depth, height, width = image.shape
    rgb_maps = {}
    for name, emb in heads.items():
        rgb = pca_rgb(emb)
        up = F.interpolate(rgb[None], scale_factor=tuple(float(s) for s in head_strides[name]), mode="nearest")[0]
        rgb_maps[name] = up[:, :depth, :height, :width]
    columns = ["image", *rgb_maps]
    label_h = 14
    canvas = Image.new("RGB", (width * len(columns), label_h + height * len(slice_fractions)), "black")
    draw = ImageDraw.Draw(canvas)
    for col, name in enumerate(columns):
        draw.text((col * width + 3, 1), name, fill="white")
    for row, frac in enumerate(slice_fractions):
        d = min(depth - 1, int(round(frac * (depth - 1))))
        tiles = [Image.fromarray(_to_uint8_gray(image[d])).convert("RGB")]
        for rgb in rgb_maps.values():
            m = rgb[:, min(d, rgb.shape[1] - 1)]
            tiles.append(Image.fromarray((m.permute(1, 2, 0) * 255).byte().cpu().numpy(), "RGB"))
        for col, tile in enumerate(tiles):
            pad = Image.new("RGB", (width, height))
            pad.paste(tile, (0, 0))
            canvas.paste(pad, (col * width, label_h + row * height))
    canvas.save(path)
