"""The ``preview.png`` of an embedding case: PCA-to-RGB maps of every head next to the input (as in the SAMv2 paper's
Fig. 4). Part of the embedding file format written by :mod:`samv2_components.io.embeddings`; also importable from
:mod:`samv2_components.visualize` with the other QC pictures.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageDraw

__all__ = ["PCAColours", "fit_pca_colours", "pca_rgb", "embedding_preview"]


class PCAColours(NamedTuple):
    """A map's first three principal components and their display range: ``rgb = (x - mean) @ components.T``,
    stretched from ``low`` to ``high``. ``mean`` ``(C,)``, ``components`` ``(3, C)``, ``low``/``high`` ``(3,)``."""

    mean: torch.Tensor
    components: torch.Tensor
    low: torch.Tensor
    high: torch.Tensor

    def __call__(self, vectors: torch.Tensor) -> torch.Tensor:
        """``(C, *spatial)`` vectors to ``(3, *spatial)`` float32 colours in [0, 1]."""
        flat = vectors.reshape(vectors.shape[0], -1).T.float()
        rgb = ((flat - self.mean) @ self.components.T - self.low) / (self.high - self.low).clamp_min(1e-6)
        return rgb.clamp(0, 1).T.reshape(3, *vectors.shape[1:])


def fit_pca_colours(embedding: torch.Tensor, max_samples: int = 20000, seed: int = 0) -> PCAColours:
    """Fit :class:`PCAColours` to at most ``max_samples`` random voxels of a ``(C, D, H, W)`` embedding; each
    component is stretched between its 1st and 99th percentile over those voxels. Only the sampled voxels are
    copied (the whole map in float32 would be gigabytes for a large scan)."""
    c = embedding.shape[0]
    n = int(np.prod(embedding.shape[1:]))
    gen = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(n, generator=gen)[:max_samples]
    sample = embedding[(slice(None), *torch.unravel_index(chosen, tuple(embedding.shape[1:])))].T.float()  # (S, C)
    mean = sample.mean(0)
    _, _, v = torch.linalg.svd(sample - mean, full_matrices=False)
    projected = (sample - mean) @ v[:3].T
    return PCAColours(mean, v[:3], torch.quantile(projected, 0.01, dim=0), torch.quantile(projected, 0.99, dim=0))


def pca_rgb(embedding: torch.Tensor, max_samples: int = 20000, seed: int = 0) -> torch.Tensor:
    """Project a ``(C, D, H, W)`` embedding onto its first three principal components, scaled to [0, 1]
    (:func:`fit_pca_colours` on at most ``max_samples`` random voxels). Returns ``(3, D, H, W)`` float32."""
    return fit_pca_colours(embedding, max_samples, seed)(embedding)


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
    colours = {name: fit_pca_colours(emb) for name, emb in heads.items()}  # fitted on the whole map

    def head_tile(name: str, d: int) -> np.ndarray:
        """The head's slice nearest to input slice ``d``, coloured and nearest-upsampled in-plane: (H, W, 3)."""
        stride_d, stride_h, stride_w = (int(s) for s in head_strides[name])
        emb = heads[name]
        rgb = colours[name](emb[:, min(d // stride_d, emb.shape[1] - 1)])  # (3, h, w)
        up = rgb.repeat_interleave(stride_h, dim=1).repeat_interleave(stride_w, dim=2)[:, :height, :width]
        return (up.permute(1, 2, 0) * 255).byte().cpu().numpy()

    columns = ["image", *heads]
    label_h = 14
    canvas = Image.new("RGB", (width * len(columns), label_h + height * len(slice_fractions)), "black")
    draw = ImageDraw.Draw(canvas)
    for col, name in enumerate(columns):
        draw.text((col * width + 3, 1), name, fill="white")
    for row, frac in enumerate(slice_fractions):
        d = min(depth - 1, int(round(frac * (depth - 1))))
        tiles = [Image.fromarray(_to_uint8_gray(image[d])).convert("RGB")]
        tiles += [Image.fromarray(head_tile(name, d), "RGB") for name in heads]
        for col, tile in enumerate(tiles):
            pad = Image.new("RGB", (width, height))
            pad.paste(tile, (0, 0))
            canvas.paste(pad, (col * width, label_h + row * height))
    canvas.save(path)
