"""The embedding preview (``preview.png``): PCA colours fitted on samples, only the displayed slices projected."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from samv2_components.io.embedding_preview import embedding_preview, fit_pca_colours, pca_rgb


def _embedding(channels=8, shape=(5, 6, 7), seed=0) -> torch.Tensor:
    """Smooth random unit vectors with a strong first component (a gradient along depth)."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(channels, *shape, generator=g) * 0.1
    emb[0] += torch.linspace(-1, 1, shape[0])[:, None, None]
    return F.normalize(emb, dim=0)


def test_pca_colours_follow_the_dominant_direction_and_stay_in_range():
    emb = _embedding()
    rgb = pca_rgb(emb)
    assert rgb.shape == (3, 5, 6, 7) and float(rgb.min()) >= 0.0 and float(rgb.max()) <= 1.0
    # the first component is the depth gradient: its colour is monotonic along depth (either sign of the axis)
    first = rgb[0].mean(dim=(1, 2))
    steps = first[1:] - first[:-1]
    assert bool((steps >= 0).all()) or bool((steps <= 0).all())
    assert float(first.max() - first.min()) > 0.9
    # fitting on a subset of the voxels projects every voxel the same way as the whole-map call
    colours = fit_pca_colours(emb)
    torch.testing.assert_close(colours(emb[:, 2]), rgb[:, 2])
    # float16 maps (the inferer's default) give the same colours to float16 precision
    torch.testing.assert_close(pca_rgb(emb.half()), rgb, atol=2e-2, rtol=0)


def test_preview_tiles_are_the_heads_slices_nearest_upsampled(tmp_path):
    image = torch.linspace(0, 1, 10 * 24 * 28).reshape(10, 24, 28)
    heads = {"fine": _embedding(shape=(5, 6, 7)), "coarse": _embedding(shape=(3, 2, 2), seed=1)}
    strides = {"fine": (2, 4, 4), "coarse": (4, 16, 16)}
    path = tmp_path / "preview.png"
    embedding_preview(image, heads, strides, path, slice_fractions=(0.5,))
    picture = np.asarray(Image.open(path).convert("RGB"))
    assert picture.shape == (14 + 24, 28 * 3, 3)  # label row + one slice; image, fine, coarse columns
    d = int(round(0.5 * 9))
    for column, name in enumerate(heads, start=1):
        # reference: colour the whole head, upsample it to the input grid (nearest), take input slice d
        full = F.interpolate(pca_rgb(heads[name])[None], scale_factor=tuple(float(s) for s in strides[name]),
                             mode="nearest")[0][:, :10, :24, :28]
        expected = (full[:, d].permute(1, 2, 0) * 255).byte().numpy()
        tile = picture[14:, column * 28 : (column + 1) * 28]
        np.testing.assert_array_equal(tile, expected, err_msg=name)
