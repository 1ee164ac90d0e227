"""Render a PNG grid of CrossSAM's (AggSAM) training augmentations on the shipped CT and MR samples.

Usage::

    python scripts/augmentation_grid.py [--seed 0] [--output bundles/crosssam_registration/docs/augmentation_grid.png]

Rows: the CT sample ``ct_abdomen``, the MR sample ``mr_abdomen`` and the CT-MR phantom pair, preprocessed like the bundles (``load_scan``,
MONAI ``Orientation`` to SPL, ``Spacing`` to 2 mm, ``NormalizeIntensityByModalityd`` to [-50, 205]). Columns: the
original mid-axial slice, then augmented versions of the 3D volume (each on its own, mid-axial slice shown):
random Bezier intensity map, intensity inversion, both (the paper's ``aggressive_intensity_augmentation``), the
project's body remap (rank-equalised body, then reversed: ``RandBodyContrastRemap``), MONAI ``RandAffine``
(rotation up to 15 degrees about every axis, scale 0.8-1.2), ``RandZoom`` (resizing, 0.8-1.2, size kept) and
``RandGaussianSmooth`` (blur, sigma 1-2 voxels = 2-4 mm). Every tile is shown with the same fixed window [-50, 205]
(so inversions and curves are visible as such), anterior up and patient left on the right (radiological view);
the intensity columns show their drawn map (output vs input over [-50, 205], grey: identity) as an inset.
"""

from __future__ import annotations

import os
import sys

try:
    import samv2_components  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fire
import numpy as np
import torch
from monai.transforms import Compose, Orientation, RandAffine, RandGaussianSmooth, RandZoom, Spacing
from PIL import Image, ImageDraw, ImageFont

from samv2_components.io.image import load_scan
from samv2_components.sample_data import sample_path
from samv2_components.transforms import (
    NormalizeIntensityByModalityd,
    RandBezierIntensity,
    RandBodyContrastRemap,
    RandIntensityInversion,
    aggressive_intensity_augmentation,
)

VALUE_RANGE = (-50.0, 205.0)
DEFAULT_OUTPUT = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bundles", "crosssam_registration", "docs",
    "augmentation_grid.png",
)


def preprocess(name: str, modality: str, spacing_mm: float = 2.0) -> torch.Tensor:
    """``(1, D, H, W)`` volume (axes S, P, L) at ``spacing_mm``, intensities in [-50, 205]."""
    image = load_scan(sample_path(name))
    image = Orientation(axcodes="SPL", labels=None)(image)
    image = Spacing(pixdim=spacing_mm, mode="bilinear", padding_mode="border")(image)
    image = NormalizeIntensityByModalityd("image", modality=modality)({"image": image})["image"]
    return torch.as_tensor(image).float()


def augmentations(seed: int) -> list[tuple[str, object]]:
    """(label, transform) per augmented column; every transform seeded from ``seed``."""
    deg15 = float(np.deg2rad(15.0))
    columns = [
        ("Bezier", RandBezierIntensity(prob=1.0, value_range=VALUE_RANGE)),
        ("inversion", RandIntensityInversion(prob=1.0, value_range=VALUE_RANGE)),
        ("Bezier+inversion", aggressive_intensity_augmentation(1.0, 1.0, VALUE_RANGE)),
        ("body remap (rank)", RandBodyContrastRemap(prob=1.0, reverse_prob=0.0, value_range=VALUE_RANGE)),
        ("body remap reversed", RandBodyContrastRemap(prob=1.0, reverse_prob=1.0, value_range=VALUE_RANGE)),
        (
            "RandAffine 15deg 0.8-1.2",
            RandAffine(prob=1.0, rotate_range=(deg15,) * 3, scale_range=(0.2,) * 3, padding_mode="border"),
        ),
        ("RandZoom 0.8-1.2", RandZoom(prob=1.0, min_zoom=0.8, max_zoom=1.2, keep_size=True, padding_mode="edge")),
        (
            "blur sigma 1-2 vox",
            RandGaussianSmooth(prob=1.0, sigma_x=(1.0, 2.0), sigma_y=(1.0, 2.0), sigma_z=(1.0, 2.0)),
        ),
    ]
    for i, (_, transform) in enumerate(columns):
        transform.set_random_state(seed=seed + i)
    return columns


def intensity_map(transform: object, n: int = 256) -> np.ndarray | None:
    """The last drawn intensity map of an intensity-only column, on ``n`` inputs spanning ``VALUE_RANGE``
    (None for spatial transforms)."""
    members = list(transform.transforms) if isinstance(transform, Compose) else [transform]
    if not all(isinstance(m, (RandBezierIntensity, RandIntensityInversion)) for m in members):
        return None
    values = np.linspace(*VALUE_RANGE, n)
    for member in members:
        values = member(values, randomize=False)
    return np.asarray(values)


def draw_map(tile_img: Image.Image, mapping: np.ndarray, size: int = 48) -> None:
    """Inset plot of ``mapping`` (output vs input, both over ``VALUE_RANGE``) in the tile's lower right corner."""
    low, high = VALUE_RANGE
    draw = ImageDraw.Draw(tile_img)
    x0, y0 = tile_img.size[0] - size - 3, tile_img.size[1] - size - 3
    draw.rectangle((x0, y0, x0 + size, y0 + size), fill=255, outline=0)
    draw.line((x0, y0 + size, x0 + size, y0), fill=190)  # identity
    u = np.linspace(0.0, 1.0, len(mapping))
    v = (mapping - low) / (high - low)
    draw.line([(x0 + float(a) * size, y0 + (1.0 - float(b)) * size) for a, b in zip(u, v)], fill=0, width=2)


def to_tile(volume: torch.Tensor, tile: int) -> Image.Image:
    """Mid-axial slice of ``(1, D, H, W)`` in the fixed window, letterboxed into a ``tile`` x ``tile`` square."""
    sl = np.asarray(volume[0, volume.shape[1] // 2], dtype=np.float64)
    low, high = VALUE_RANGE
    grey = np.clip((sl - low) / (high - low) * 255.0, 0, 255).astype(np.uint8)
    img = Image.fromarray(grey, mode="L")
    scale = tile / max(img.size)
    img = img.resize((max(1, round(img.size[0] * scale)), max(1, round(img.size[1] * scale))), Image.BILINEAR)
    canvas = Image.new("L", (tile, tile), 0)
    canvas.paste(img, ((tile - img.size[0]) // 2, (tile - img.size[1]) // 2))
    return canvas


def main(output: str = DEFAULT_OUTPUT, seed: int = 0, tile: int = 180) -> str:
    """Write the grid PNG to ``output`` and return its path.

    Args:
        output: PNG path (folders are created).
        seed: random seed of the augmentations (column ``i`` uses ``seed + i``; both rows share the draws).
        tile: tile size in pixels.
    """
    torch.manual_seed(seed)
    rows = [
        ("CT", preprocess("ct_abdomen", "ct")),
        ("MR", preprocess("mr_abdomen", "mr")),
        ("CT ph", preprocess("phantom_ct", "ct")),
        ("MR ph", preprocess("phantom_mr", "mr")),
    ]
    font = ImageFont.load_default()
    label_h, margin = 16, 34
    n_cols = 9
    sheet = Image.new("L", (margin + n_cols * tile, label_h + len(rows) * tile), 255)
    draw = ImageDraw.Draw(sheet)
    labels = ["original"]
    for r, (row_name, volume) in enumerate(rows):
        tiles = [(to_tile(volume, tile))]
        for label, transform in augmentations(seed):  # same seeds, so both rows get the same draws
            out = torch.as_tensor(transform(volume)).float()
            image = to_tile(out, tile)
            mapping = intensity_map(transform)
            if mapping is not None:
                draw_map(image, mapping)
            tiles.append(image)
            if r == 0:
                labels.append(label)
        y = label_h + r * tile
        draw.text((4, y + tile // 2 - 6), row_name, fill=0, font=font)
        for c, image in enumerate(tiles):
            sheet.paste(image, (margin + c * tile, y))
    for c, label in enumerate(labels):
        draw.text((margin + c * tile + 3, 2), label, fill=0, font=font)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    sheet.save(output)
    return output


if __name__ == "__main__":
    fire.Fire(main)
