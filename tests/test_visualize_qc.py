"""Tests of :func:`samv2_components.visualize.match_qc_image` / :func:`save_match_qc` on synthetic phantoms.

The phantoms are built directly from an LPS voxel-to-world matrix with numpy (independently of the code under test)
on oblique, anisotropic grids, and handed over as MONAI MetaTensors with RAS (default) or LPS affines.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from PIL import Image

from samv2_components.visualize import _qc_layout, match_qc_image, save_match_qc

FLIP_XY = np.diag([-1.0, -1.0, 1.0, 1.0])
SHAPE = (64, 96, 40)
SPACING = (1.5, 1.0, 2.5)
CENTRE = np.array([35.0, -60.0, 120.0])  # LPS mm; far from the origin so that an L/P sign error misses the phantom


def _rotation(axis, angle: float) -> np.ndarray:
    axis = np.asarray(axis, dtype=np.float64)
    axis = axis / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


def oblique_lps_affine(centre=CENTRE, shape=SHAPE, spacing=SPACING, axis=(1.0, 2.0, 3.0), angle=0.45) -> np.ndarray:
    """Rotated, anisotropic LPS affine whose middle voxel sits at ``centre``."""
    aff = np.eye(4)
    aff[:3, :3] = _rotation(axis, angle) @ np.diag(spacing)
    aff[:3, 3] = np.asarray(centre) - aff[:3, :3] @ ((np.asarray(shape) - 1) / 2.0)
    return aff


def phantom(lps_affine: np.ndarray, shape, balls) -> np.ndarray:
    """Sum of soft-edged balls ``(centre_lps, radius_mm, value)`` sampled at the voxel centres of the grid."""
    idx = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), axis=-1)
    world = idx @ lps_affine[:3, :3].T + lps_affine[:3, 3]
    out = np.zeros(shape, dtype=np.float64)
    for centre, radius, value in balls:
        dist = np.linalg.norm(world - np.asarray(centre, dtype=np.float64), axis=-1)
        out += value / (1.0 + np.exp((dist - radius) / 0.7))
    return out.astype(np.float32)


def to_metatensor(arr: np.ndarray, lps_affine: np.ndarray, space: str = "RAS", channel: bool = True) -> MetaTensor:
    affine = FLIP_XY @ lps_affine if space == "RAS" else lps_affine
    data = torch.from_numpy(np.ascontiguousarray(arr))
    if channel:
        data = data[None]
    return MetaTensor(data, affine=torch.as_tensor(affine, dtype=torch.float64), meta={"space": space})


def reoriented(arr: np.ndarray, lps_affine: np.ndarray, flip_axes=(0, 2), perm=(2, 0, 1)):
    """The same phantom stored differently: axes reversed and permuted, affine updated to match."""
    aff = lps_affine.copy()
    for ax in flip_axes:  # old index i = (n - 1) - new index
        m = np.eye(4)
        m[ax, ax] = -1.0
        m[ax, 3] = arr.shape[ax] - 1
        aff = aff @ m
        arr = np.flip(arr, axis=ax)
    m = np.zeros((4, 4))  # new index j[a] = old index i[perm[a]]
    m[3, 3] = 1.0
    for a, p in enumerate(perm):
        m[p, a] = 1.0
    return np.ascontiguousarray(np.transpose(arr, perm)), aff @ m


def panel(img: np.ndarray, row: str, view: str, size: int) -> np.ndarray:
    top, left = _qc_layout(size)[2][(row, view)]
    return img[top : top + size, left : left + size].astype(np.float64)


def gray_values(tile: np.ndarray) -> np.ndarray:
    """Grey level of the image pixels, NaN where annotations (coloured markers / letters) are drawn."""
    grey = (tile[..., 0] == tile[..., 1]) & (tile[..., 1] == tile[..., 2])
    return np.where(grey, tile[..., 0], np.nan)


def blob_centroid(values: np.ndarray, threshold: float) -> np.ndarray:
    w = np.where(np.nan_to_num(values, nan=0.0) > threshold, np.nan_to_num(values, nan=0.0), 0.0)
    assert w.sum() > 0, "no blob visible in panel"
    rows, cols = np.indices(w.shape)
    return np.array([(rows * w).sum() / w.sum(), (cols * w).sum() / w.sum()])


VIEWS = ("axial", "coronal", "sagittal")


@pytest.mark.parametrize("space", ["RAS", "LPS"])
@pytest.mark.parametrize("pixel_mm", [1.0, 1.7])
def test_ball_centre_lands_on_panel_centre(space, pixel_mm):
    aff = oblique_lps_affine()
    ball = CENTRE + np.array([7.0, -5.0, 9.0])
    img_t = to_metatensor(phantom(aff, SHAPE, [(ball, 9.0, 1.0)]), aff, space)
    q_aff = oblique_lps_affine(centre=CENTRE + 20.0, axis=(-2.0, 1.0, 0.5), angle=1.1, spacing=(2.0, 0.9, 1.3))
    q_ball = CENTRE + np.array([-4.0, 12.0, 25.0])
    img_q = to_metatensor(phantom(q_aff, SHAPE, [(q_ball, 9.0, 1.0)]), q_aff, space, channel=False)
    out = match_qc_image(img_t, ball, img_q, q_ball, field_of_view_mm=120.0, pixel_mm=pixel_mm, intensity_window=(0, 1))
    half = int(round(120.0 / (2 * pixel_mm)))
    size = 2 * half + 1
    assert out.dtype == np.uint8 and out.shape == (*_qc_layout(size)[:2], 3)
    for row in ("template", "query"):
        for view in VIEWS:
            vals = gray_values(panel(out, row, view, size))
            np.testing.assert_allclose(blob_centroid(vals, 128), [half, half], atol=1.0, err_msg=f"{row} {view}")
            # the ball (radius 9 mm) is bright at the centre pixels left uncovered by the open crosshair
            assert np.nanmax(vals[half - 3 : half + 4, half - 3 : half + 4]) > 240
            # and dark well outside it
            assert np.nanmax(vals[half, : max(0, half - int(14 / pixel_mm))], initial=0) < 30


def test_orientation_independence():
    aff = oblique_lps_affine()
    balls = [(CENTRE + [-20.0, 10.0, 5.0], 7.0, 1.0), (CENTRE + [15.0, -18.0, -10.0], 5.0, 0.6), (CENTRE, 4.0, 0.3)]
    arr = phantom(aff, SHAPE, balls)
    point = CENTRE + [2.0, -3.0, 1.5]
    ref = match_qc_image(to_metatensor(arr, aff), point, to_metatensor(arr, aff, "LPS"), point, pixel_mm=1.3)
    arr2, aff2 = reoriented(arr, aff)
    assert arr2.shape != arr.shape
    img2 = to_metatensor(arr2, aff2)
    out = match_qc_image(img2, point, to_metatensor(arr2, aff2, "LPS", channel=False), point, pixel_mm=1.3)
    assert np.abs(out.astype(int) - ref.astype(int)).max() <= 1
    # template and query rows show the same scan at the same point, once via a RAS and once via an LPS affine
    size = 2 * int(round(160 / 2.6)) + 1
    for view in VIEWS:
        # (NaN = annotation pixels, which sit at the same places in both rows)
        np.testing.assert_array_equal(gray_values(panel(ref, "template", view, size)), gray_values(panel(ref, "query", view, size)))


@pytest.mark.parametrize("space", ["RAS", "LPS"])
def test_every_pixel_samples_its_world_point(space):
    """A volume linear in the voxel index is reproduced exactly by trilinear sampling, so each panel pixel must show
    the ramp value at the voxel position of its own world point (voxel index = voxel centre), black outside."""
    shape, spacing = (12, 9, 7), (4.0, 5.0, 6.0)
    lps = oblique_lps_affine(shape=shape, spacing=spacing, axis=(2.0, -1.0, 1.0), angle=0.7)
    ii, jj, kk = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    ramp = (10 * ii + 7 * jj + 5 * kk).astype(np.float32)
    img = to_metatensor(ramp, lps, space)
    point = lps[:3, :3] @ [5.3, 4.1, 2.7] + lps[:3, 3]
    pixel_mm, half = 2.0, 25
    out = match_qc_image(img, point, img, point, field_of_view_mm=100.0, pixel_mm=pixel_mm, intensity_window=(0, 255))
    offs = (np.arange(2 * half + 1) - half) * pixel_mm
    rows, cols = np.meshgrid(offs, offs, indexing="ij")  # mm down / mm right of the point
    zero = np.zeros_like(rows)
    # LPS displacement per pixel: image right = patient left (+x) / posterior (+y); image down = posterior / inferior
    displacement = {
        "axial": np.stack([cols, rows, zero], -1),
        "coronal": np.stack([cols, zero, -rows], -1),
        "sagittal": np.stack([zero, cols, -rows], -1),
    }
    inv = np.linalg.inv(lps)
    for view, disp in displacement.items():
        idx = (point + disp) @ inv[:3, :3].T + inv[:3, 3]
        expected = 10 * idx[..., 0] + 7 * idx[..., 1] + 5 * idx[..., 2]
        inside = np.all((idx >= 0) & (idx <= np.array(shape) - 1), axis=-1)
        outside = np.any((idx < -0.5) | (idx > np.array(shape) - 0.5), axis=-1)
        assert inside.sum() > 200 and outside.sum() > 200
        for row in ("template", "query"):
            vals = gray_values(panel(out, row, view, 2 * half + 1))
            ok = ~np.isnan(vals)
            np.testing.assert_array_less(np.abs(vals - expected)[inside & ok], 1.01, err_msg=f"{row} {view}")
            assert np.all(vals[outside & ok] == 0)


@pytest.mark.parametrize("pixel_mm", [1.0, 2.0])
def test_radiological_display_convention(pixel_mm):
    aff = oblique_lps_affine()
    off = 30.0
    # LPS: patient right = -x, anterior = -y, superior = +z; distinct brightness per ball
    balls = [(CENTRE + [-off, 0, 0], 6.0, 1.0), (CENTRE + [0, -off, 0], 6.0, 0.6), (CENTRE + [0, 0, off], 6.0, 0.3)]
    img = to_metatensor(phantom(aff, SHAPE, balls), aff)
    out = match_qc_image(img, CENTRE, img, CENTRE, field_of_view_mm=100.0, pixel_mm=pixel_mm, intensity_window=(0, 1))
    half = int(round(100.0 / (2 * pixel_mm)))
    size, d = 2 * half + 1, int(round(off / pixel_mm))
    right, anterior, superior = 255.0, 0.6 * 255, 0.3 * 255
    expected = {  # (row offset, col offset) in pixels from the panel centre -> grey value
        "axial": {(0, -d): right, (0, d): 0, (-d, 0): anterior, (d, 0): 0},
        "coronal": {(0, -d): right, (0, d): 0, (-d, 0): superior, (d, 0): 0},
        "sagittal": {(0, -d): anterior, (0, d): 0, (-d, 0): superior, (d, 0): 0},
    }
    for row in ("template", "query"):
        for view, checks in expected.items():
            vals = gray_values(panel(out, row, view, size))
            for (dr, dc), value in checks.items():
                got = np.nanmedian(vals[half + dr - 1 : half + dr + 2, half + dc - 1 : half + dc + 2])
                assert abs(got - value) < 8, f"{row} {view} at {(dr, dc)}: {got} != {value}"


@pytest.mark.parametrize(
    "offset, view, expected_offset_px",
    [
        ((20.0, -15.0, 0.0), "axial", (-15, 20)),  # patient left -> image right, anterior -> up
        ((-12.0, 0.0, 18.0), "coronal", (-18, -12)),  # patient right -> image left, superior -> up
        ((0.0, 10.0, -16.0), "sagittal", (16, 10)),  # posterior -> image right, inferior -> down
    ],
)
def test_heat_map_overlay_on_query_row(offset, view, expected_offset_px):
    aff = oblique_lps_affine()
    template = to_metatensor(phantom(aff, SHAPE, [(CENTRE, 9.0, 1.0)]), aff)
    query = to_metatensor(np.zeros(SHAPE, np.float32), aff)
    match = CENTRE + [3.0, 4.0, -2.0]
    peak = match + np.asarray(offset)  # lies in the `view` plane through the match
    # similarity map on its own coarser, differently oriented grid, no channel axis
    h_shape = (36, 30, 28)
    h_aff = oblique_lps_affine(centre=match, shape=h_shape, spacing=(2.5, 3.0, 2.0), axis=(0.3, -1.0, 2.0), angle=0.8)
    idx = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in h_shape], indexing="ij"), axis=-1)
    world = idx @ h_aff[:3, :3].T + h_aff[:3, 3]
    scores = 1.1 * np.exp(-np.sum((world - peak) ** 2, axis=-1) / (2 * 7.0**2)) - 0.2
    heat = to_metatensor(scores.astype(np.float32), h_aff, "RAS", channel=False)

    kwargs = dict(field_of_view_mm=120.0, intensity_window=(0.0, 1.0), title="liver_dome  score 0.83")
    plain = match_qc_image(template, CENTRE, query, match, **kwargs)
    out = match_qc_image(template, CENTRE, query, match, heat_map=heat, **kwargs)
    half, size = 60, 121
    strengths = {}
    for v in VIEWS:
        np.testing.assert_array_equal(panel(out, "template", v, size), panel(plain, "template", v, size))
        plain_tile = panel(plain, "query", v, size)
        assert np.nanmax(gray_values(plain_tile)) == 0  # black query scan
        strength = panel(out, "query", v, size).sum(-1)
        strength[(plain_tile != 0).any(-1)] = 0  # ignore the annotations (crosshair, letters) drawn on top
        strengths[v] = strength
    assert max(strengths, key=lambda v: strengths[v].max()) == view  # the plane through the peak is the brightest
    r, c = half + expected_offset_px[0], half + expected_offset_px[1]
    strength = strengths[view]
    np.testing.assert_allclose(blob_centroid(strength, 0.6 * strength.max()), [r, c], atol=1.5)
    top = panel(out, "query", view, size)[r, c]  # the top of the colour map (yellow) at the peak
    assert top[0] > 100 and top[1] > 100 and top[2] < 60, top


def test_point_outside_scan_and_default_window():
    aff = oblique_lps_affine()
    img = to_metatensor(phantom(aff, SHAPE, [(CENTRE, 9.0, 1.0)]) + 0.1, aff)
    far = CENTRE + [500.0, 0.0, 0.0]
    out = match_qc_image(img, far, img, CENTRE, field_of_view_mm=60.0, pixel_mm=1.0)
    size, half = 61, 30
    for view in VIEWS:
        far_tile = panel(out, "template", view, size)
        assert np.nanmax(gray_values(far_tile)) == 0  # nothing of the scan there: black
        assert (far_tile[half, half - 10] == [0, 255, 0]).all()  # the green crosshair is still drawn
        near = gray_values(panel(out, "query", view, size))
        assert np.nanmax(near) == 255 and np.nanmin(near) == 0  # 1st-99th percentile window stretches the scan
        assert (panel(out, "query", view, size)[half, half - 10] == [255, 48, 48]).all()
    # near the edge: the part of the panel beyond the scan is black, the part inside is not
    aff_axis = oblique_lps_affine(axis=(0, 0, 1), angle=0.0)  # axis-aligned: voxel axes = L, P, S
    img2 = to_metatensor(np.ones(SHAPE, np.float32), aff_axis)
    edge = CENTRE + [SPACING[0] * SHAPE[0] / 2, 0.0, 0.0]  # on the patient-left face of the scan
    out2 = match_qc_image(img2, edge, img2, edge, field_of_view_mm=60.0, intensity_window=(0, 2))
    axial = gray_values(panel(out2, "template", "axial", size))
    assert np.nanmin(axial[half, : half - 5]) > 100  # patient right of the point (image left): inside
    assert np.nanmax(axial[half, half + 5 :]) == 0  # patient left (image right): outside


def test_bad_inputs():
    aff = oblique_lps_affine()
    img = to_metatensor(np.zeros(SHAPE, np.float32), aff)
    with pytest.raises(ValueError):
        match_qc_image(img, [1.0, 2.0], img, CENTRE)
    with pytest.raises(ValueError):
        match_qc_image(MetaTensor(torch.zeros(2, *SHAPE)), CENTRE, img, CENTRE)
    with pytest.raises(ValueError):
        match_qc_image(img, CENTRE, img, CENTRE, pixel_mm=0.0)


def test_save_match_qc_writes_png_atomically(tmp_path):
    aff = oblique_lps_affine()
    img = to_metatensor(phantom(aff, SHAPE, [(CENTRE, 9.0, 1.0)]), aff)
    target = tmp_path / "qc" / "nested" / "liver_dome.png"
    save_match_qc(target, img, CENTRE, img, CENTRE, title="liver_dome", field_of_view_mm=80.0)
    expected = match_qc_image(img, CENTRE, img, CENTRE, title="liver_dome", field_of_view_mm=80.0)
    assert os.listdir(target.parent) == ["liver_dome.png"]
    with Image.open(target) as png:
        assert png.format == "PNG" and png.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(png), expected)
    # a failure while rendering leaves neither the file nor a temp file behind
    bad = tmp_path / "bad" / "x.png"
    with pytest.raises(ValueError):
        save_match_qc(bad, img, [0.0, 0.0], img, CENTRE)
    assert not bad.exists() and (not bad.parent.exists() or os.listdir(bad.parent) == [])
