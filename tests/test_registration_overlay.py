"""Tests of :func:`samv2_components.visualize.registration_overlay_image` / :func:`save_registration_overlay`.

Phantoms are built with numpy from an LPS voxel-to-world matrix, independently of the code under test, and handed
over as SimpleITK images (oblique direction) or MONAI MetaTensors (RAS affine). Panels are located from the output
size alone: three square panels of ``2 * round(fov / (2 * pixel_mm)) + 1`` pixels side by side, equal gaps, the
panel row at the bottom.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from PIL import Image

from samv2_components.visualize import registration_overlay_image, save_registration_overlay

sitk = pytest.importorskip("SimpleITK")

FLIP_XY = np.diag([-1.0, -1.0, 1.0, 1.0])
P = np.array([35.0, -60.0, 120.0])  # LPS mm, far from the origin so that an L/P sign error misses the phantom
FOV = 80.0
WINDOW = (0.0, 1000.0)
VIEWS = ("axial", "coronal", "sagittal")


def _rotation(axis, angle: float) -> np.ndarray:
    axis = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


def lps_affine(shape, spacing, centre=P, axis=(1.0, 2.0, 3.0), angle=0.0) -> np.ndarray:
    aff = np.eye(4)
    aff[:3, :3] = _rotation(axis, angle) @ np.diag(spacing)
    aff[:3, 3] = np.asarray(centre) - aff[:3, :3] @ ((np.asarray(shape) - 1) / 2.0)
    return aff


def world_of(aff: np.ndarray, shape) -> np.ndarray:
    idx = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), axis=-1)
    return idx @ aff[:3, :3].T + aff[:3, 3]


def ball(aff, shape, centre, radius=6.0, value=1000.0) -> np.ndarray:
    dist = np.linalg.norm(world_of(aff, shape) - np.asarray(centre), axis=-1)
    return (value / (1.0 + np.exp((dist - radius) / 0.7))).astype(np.float32)


def to_sitk(arr: np.ndarray, aff: np.ndarray) -> "sitk.Image":
    """``arr`` indexed (i, j, k) along the affine's columns -> SimpleITK image (array order (k, j, i))."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(arr, (2, 1, 0))))
    spacing = np.linalg.norm(aff[:3, :3], axis=0)
    img.SetSpacing(spacing.tolist())
    img.SetDirection((aff[:3, :3] / spacing).flatten().tolist())
    img.SetOrigin(aff[:3, 3].tolist())
    return img


def to_metatensor(arr: np.ndarray, aff: np.ndarray) -> MetaTensor:
    return MetaTensor(torch.from_numpy(arr)[None], affine=torch.as_tensor(FLIP_XY @ aff), meta={"space": "RAS"})


# fixed: oblique anisotropic SimpleITK grid; moving: axis-aligned MetaTensor grid with another spacing
F_SHAPE, F_SPACING = (56, 60, 40), (1.5, 1.25, 2.0)
F_AFF = lps_affine(F_SHAPE, F_SPACING, angle=0.4)
M_SHAPE, M_SPACING = (90, 90, 70), (1.0, 1.0, 1.2)
M_AFF = lps_affine(M_SHAPE, M_SPACING)


def panels(img: np.ndarray, fov=FOV, pixel_mm=1.0) -> dict[str, np.ndarray]:
    size = 2 * int(round(fov / (2 * pixel_mm))) + 1
    height, width, _ = img.shape
    gap = (width - 3 * size) // 4
    assert width == 3 * size + 4 * gap
    top = height - gap - size
    lefts = [gap + c * (size + gap) for c in range(3)]
    return {v: img[top : top + size, left : left + size] for v, left in zip(VIEWS, lefts)}


def centroid(channel: np.ndarray, threshold: float = 128, reach: int = 25) -> np.ndarray:
    """Centroid (row, col) of the bright pixels within ``reach`` px of the panel centre (the edge letters are
    orange, i.e. bright in red and green)."""
    mid = channel.shape[0] // 2
    window = channel[mid - reach : mid + reach + 1, mid - reach : mid + reach + 1]
    rows, cols = np.nonzero(window > threshold)
    assert rows.size > 10
    return np.array([rows.mean(), cols.mean()]) + mid - reach


def render(fixed_centre=P, moving_centre=P, **kwargs):
    fixed = to_sitk(ball(F_AFF, F_SHAPE, fixed_centre), F_AFF)
    moving = to_metatensor(ball(M_AFF, M_SHAPE, moving_centre), M_AFF)
    kwargs = {"point_lps": P, "field_of_view_mm": FOV, "fixed_window": WINDOW, "moving_window": WINDOW, **kwargs}
    return registration_overlay_image(fixed, moving, **kwargs)


def test_aligned_balls_are_yellow_at_panel_centres():
    img = render()
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    half = int(FOV / 2)
    for view, tile in panels(img).items():
        r, g, b = (int(v) for v in tile[half, half])
        assert r > 240 and g > 240 and b == 0, (view, r, g, b)
        np.testing.assert_allclose(centroid(tile[..., 0]), [half, half], atol=0.5)
        np.testing.assert_allclose(centroid(tile[..., 1]), [half, half], atol=0.5)
        assert tile[2, 2].tolist() == [0, 0, 0]  # far from the ball: dark


@pytest.mark.parametrize(
    "offset, expected",
    [
        # LPS offset of the moving ball -> (row, col) offset in px of the green blob per view (None: not in plane)
        ((10.0, 0.0, 0.0), {"axial": (0, 10), "coronal": (0, 10), "sagittal": None}),  # left -> image right
        ((0.0, 10.0, 0.0), {"axial": (10, 0), "coronal": None, "sagittal": (0, 10)}),  # posterior -> down / right
        ((0.0, 0.0, 10.0), {"axial": None, "coronal": (-10, 0), "sagittal": (-10, 0)}),  # superior -> up
    ],
)
def test_moving_offset_shows_as_green_shift(offset, expected):
    img = render(moving_centre=P + np.asarray(offset))
    half = int(FOV / 2)
    for view, tile in panels(img).items():
        np.testing.assert_allclose(centroid(tile[..., 0]), [half, half], atol=0.5)  # red: the fixed ball, centred
        if expected[view] is None:
            mid = tile.shape[0] // 2  # (the edge letters are orange: skip the border)
            assert tile[mid - 25 : mid + 26, mid - 25 : mid + 26, 1].max() < 60, view  # ball 10 mm off the plane
        else:
            np.testing.assert_allclose(centroid(tile[..., 1]), np.add([half, half], expected[view]), atol=0.5)
            r, g, _ = (int(v) for v in tile[half + expected[view][0], half + expected[view][1]])
            assert g > 240 and r < 30, (view, r, g)  # green alone where only the moving ball is
        assert tile[..., 2].max() == 0


@pytest.mark.parametrize("dtype", [np.float32, np.int16])
@pytest.mark.parametrize(
    "offset, expected",
    [((10.0, 0.0, 0.0), {"axial": (0, 10), "coronal": (0, 10)}), ((0.0, 0.0, 10.0), {"coronal": (-10, 0), "sagittal": (-10, 0)})],
)
def test_fixed_sitk_offset_shows_as_red_shift(offset, expected, dtype):
    """The SimpleITK fixed image (oblique, anisotropic; read without a copy when float32) is placed by its own geometry:
    its ball moved off the grid centre moves the red blob."""
    fixed = to_sitk(ball(F_AFF, F_SHAPE, P + np.asarray(offset)).astype(dtype), F_AFF)
    moving = to_metatensor(ball(M_AFF, M_SHAPE, P), M_AFF)
    img = registration_overlay_image(fixed, moving, point_lps=P, field_of_view_mm=FOV, fixed_window=WINDOW,
                                     moving_window=WINDOW)
    half = int(FOV / 2)
    for view, shift in expected.items():
        tile = panels(img)[view]
        np.testing.assert_allclose(centroid(tile[..., 0]), np.add([half, half], shift), atol=0.6)
        np.testing.assert_allclose(centroid(tile[..., 1]), [half, half], atol=0.5)


def test_red_is_fixed_intensity_and_green_moving_intensity():
    """A ramp along LPS x in each image: the channels are the windowed intensities at the pixels' world points."""
    fixed = to_sitk(world_of(F_AFF, F_SHAPE)[..., 0].astype(np.float32), F_AFF)
    moving = to_metatensor((2.0 * world_of(M_AFF, M_SHAPE)[..., 0]).astype(np.float32), M_AFF)
    lo, hi = P[0] - 20.0, P[0] + 20.0
    img = registration_overlay_image(
        fixed, moving, point_lps=P, field_of_view_mm=FOV, fixed_window=(lo, hi), moving_window=(2 * lo, 2 * hi)
    )
    half = int(FOV / 2)
    axial = panels(img)["axial"]
    cols = np.arange(half - 15, half + 16)
    expected = np.clip((P[0] + (cols - half) - lo) / (hi - lo), 0, 1) * 255.0
    np.testing.assert_allclose(axial[half, cols, 0], expected, atol=1.5)
    np.testing.assert_allclose(axial[half, cols, 1], expected, atol=1.5)


def test_defaults_centre_and_field_of_view():
    fixed_arr = ball(F_AFF, F_SHAPE, P)
    img = registration_overlay_image(to_sitk(fixed_arr, F_AFF), to_sitk(fixed_arr, F_AFF), title="defaults")
    # default point: the fixed grid's centre (= P here); default FOV: largest side of the fixed world bounding box
    corners = np.array(list(np.ndindex(2, 2, 2)), dtype=np.float64) * np.asarray(F_SHAPE) - 0.5
    world = corners @ F_AFF[:3, :3].T + F_AFF[:3, 3]
    fov = float(np.max(world.max(0) - world.min(0)))
    tiles = panels(img, fov=fov)
    half = tiles["axial"].shape[0] // 2
    for tile in tiles.values():
        assert tile[half, half, 0] > 240 and tile[half, half, 1] > 240


def test_bad_inputs():
    vector = sitk.Image([8, 8, 8], sitk.sitkVectorFloat32, 3)
    scalar = to_sitk(ball(F_AFF, F_SHAPE, P), F_AFF)
    with pytest.raises(ValueError, match="scalar"):
        registration_overlay_image(scalar, vector)
    with pytest.raises(ValueError, match="single"):
        registration_overlay_image(scalar, scalar, point_lps=np.zeros((2, 3)))
    with pytest.raises(TypeError):
        registration_overlay_image(scalar, np.zeros((8, 8, 8)))


def test_save_registration_overlay_writes_png_atomically(tmp_path):
    fixed = to_sitk(ball(F_AFF, F_SHAPE, P), F_AFF)
    moving = to_metatensor(ball(M_AFF, M_SHAPE, P + [0.0, 0.0, 5.0]), M_AFF)
    path = tmp_path / "qc" / "overlay.png"
    save_registration_overlay(path, fixed, moving, point_lps=P, field_of_view_mm=FOV, title="case 1")
    assert sorted(os.listdir(path.parent)) == ["overlay.png"]  # no temporary file left behind
    expected = registration_overlay_image(fixed, moving, point_lps=P, field_of_view_mm=FOV, title="case 1")
    np.testing.assert_array_equal(np.asarray(Image.open(path).convert("RGB")), expected)
    # a failing render leaves neither the target nor a temporary file
    with pytest.raises(ValueError):
        save_registration_overlay(tmp_path / "bad" / "x.png", fixed, moving, pixel_mm=-1.0)
    assert not (tmp_path / "bad").exists() or os.listdir(tmp_path / "bad") == []
