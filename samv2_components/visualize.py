"""Pictures for quality control: PCA-to-RGB previews of embedding maps (as in the SAMv2 paper's Fig. 4) and
per-landmark match pictures (template vs. query, three orthogonal world-space planes through each point)."""

from __future__ import annotations

import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from samv2_components.geometry import affine_and_space, as_points, voxel_to_grid_sample, voxel_to_world, world_to_voxel
from samv2_components.io.atomic import atomic_file
from samv2_components.io.embedding_preview import embedding_preview, pca_rgb  # re-exported: written with the embeddings

__all__ = [
    "pca_rgb",
    "embedding_preview",
    "match_qc_image",
    "save_match_qc",
    "registration_overlay_image",
    "save_registration_overlay",
    "write_boxplot",
]


# ----------------------------------------------------------------------------------------------------------------
# Match QC picture
# ----------------------------------------------------------------------------------------------------------------

# (name, LPS direction of +column (image right), LPS direction of +row (image down), letters top/bottom/left/right).
# Radiological display as in 3D Slicer: axial anterior up, patient right on the image left; coronal superior up,
# patient right on the left; sagittal superior up, anterior on the left.
_QC_VIEWS = (
    ("axial", (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), ("A", "P", "R", "L")),
    ("coronal", (1.0, 0.0, 0.0), (0.0, 0.0, -1.0), ("S", "I", "R", "L")),
    ("sagittal", (0.0, 1.0, 0.0), (0.0, 0.0, -1.0), ("S", "I", "A", "P")),
)
_QC_ROWS = ("template", "query")
_QC_TITLE_H = 18
_QC_HEADER_H = 14
_QC_GAP = 2
_QC_MARKER = {"template": (0, 255, 0), "query": (255, 48, 48)}
_QC_LETTER = (255, 170, 0)
_QC_ALPHA = 0.7

# viridis, sampled at 9 evenly spaced positions (interpolated linearly in between)
_VIRIDIS = np.array(
    [
        [68, 1, 84],
        [71, 44, 122],
        [59, 81, 139],
        [44, 113, 142],
        [33, 144, 141],
        [39, 173, 129],
        [92, 200, 99],
        [170, 220, 50],
        [253, 231, 37],
    ],
    dtype=np.float64,
)


def _colormap(t: np.ndarray) -> np.ndarray:
    """Viridis-like RGB in [0, 255] (float) for ``t`` in [0, 1]; output shape ``t.shape + (3,)``."""
    x = np.clip(np.nan_to_num(t, nan=0.0), 0.0, 1.0) * (len(_VIRIDIS) - 1)
    lo = np.floor(x).astype(int).clip(0, len(_VIRIDIS) - 2)
    frac = (x - lo)[..., None]
    return _VIRIDIS[lo] * (1.0 - frac) + _VIRIDIS[lo + 1] * frac


def _qc_panel_half(field_of_view_mm: float, pixel_mm: float) -> int:
    if not (field_of_view_mm > 0 and pixel_mm > 0):
        raise ValueError(f"field_of_view_mm and pixel_mm must be positive, got {field_of_view_mm}, {pixel_mm}")
    return max(1, int(round(field_of_view_mm / (2.0 * pixel_mm))))


def _qc_layout(panel: int) -> tuple[int, int, dict[tuple[str, str], tuple[int, int]]]:
    """``(height, width, {(row, view): (top, left)})`` of the match QC canvas with ``panel`` x ``panel`` tiles."""
    width = 3 * panel + 4 * _QC_GAP
    boxes = {}
    for r, row in enumerate(_QC_ROWS):
        top = _QC_TITLE_H + r * (_QC_HEADER_H + panel + _QC_GAP) + _QC_HEADER_H
        for c, (view, *_rest) in enumerate(_QC_VIEWS):
            boxes[(row, view)] = (top, _QC_GAP + c * (panel + _QC_GAP))
    height = _QC_TITLE_H + len(_QC_ROWS) * (_QC_HEADER_H + panel + _QC_GAP)
    return height, width, boxes


def _qc_world_grid(point: np.ndarray, half: int, pixel_mm: float) -> np.ndarray:
    """World LPS points ``(3 views, n, n, 3)`` of the panel pixels; pixel ``(half, half)`` is ``point``."""
    off = (np.arange(2 * half + 1, dtype=np.float64) - half) * pixel_mm
    rows, cols = np.meshgrid(off, off, indexing="ij")
    grids = []
    for _name, col_dir, row_dir, _letters in _QC_VIEWS:
        grids.append(point + cols[..., None] * np.asarray(col_dir) + rows[..., None] * np.asarray(row_dir))
    return np.stack(grids)


def _volume_of(image, name: str) -> tuple[torch.Tensor, np.ndarray, str]:
    """``(D, H, W)`` float32 CPU tensor, 4x4 affine and its space of a ``(1, D, H, W)`` / ``(D, H, W)`` MetaTensor."""
    if not hasattr(image, "affine"):
        raise TypeError(f"{name} must be a MetaTensor with an affine, got {type(image).__name__}")
    affine, space = affine_and_space(image)
    data = image.as_tensor() if hasattr(image, "as_tensor") else torch.as_tensor(image)
    data = data.detach().to("cpu", torch.float32)
    if data.ndim == 4:
        if data.shape[0] != 1:
            raise ValueError(f"{name} must have one channel, got shape {tuple(data.shape)}")
        data = data[0]
    if data.ndim != 3:
        raise ValueError(f"{name} must be (1, D, H, W) or (D, H, W), got shape {tuple(data.shape)}")
    return data, affine, space


def _sample_world(volume: torch.Tensor, affine: np.ndarray, space: str, world: np.ndarray):
    """Trilinear samples of ``volume`` at LPS points ``world (..., 3)`` and a mask of points inside the volume.

    Voxel index ``i`` is the centre of voxel ``i`` (``align_corners=True``); a point counts as inside when it lies
    within the voxels' extent (index in ``[-0.5, size - 0.5]``); between the outermost voxel centres and that edge
    the border value is used.
    """
    shape = world.shape[:-1]
    idx = world_to_voxel(world.reshape(-1, 3), affine, affine_space=space, world_space="LPS").reshape(*shape, 3)
    sizes = np.asarray(volume.shape[-3:], dtype=np.float64)
    inside = np.all((idx >= -0.5) & (idx <= sizes - 0.5), axis=-1)
    norm = voxel_to_grid_sample(idx, volume.shape[-3:], align_corners=True)  # (x=W, y=H, z=D)
    norm = np.clip(np.nan_to_num(norm, nan=-3.0), -3.0, 3.0)  # far-away points: clamped, masked out anyway
    grid = torch.from_numpy(norm.astype(np.float32)).reshape(1, 1, -1, 1, 3)
    vals = F.grid_sample(volume[None, None], grid, mode="bilinear", padding_mode="border", align_corners=True)
    return vals.reshape(shape).numpy().astype(np.float64), inside


def _window(volume: torch.Tensor, intensity_window) -> tuple[float, float]:
    if intensity_window is not None:
        lo, hi = float(intensity_window[0]), float(intensity_window[1])
    else:
        flat = volume.reshape(-1).numpy()
        flat = flat[:: max(1, flat.size // 2_000_000)]
        flat = flat[np.isfinite(flat)]
        lo, hi = (float(v) for v in np.percentile(flat, [1.0, 99.0])) if flat.size else (0.0, 1.0)
    if not hi > lo:
        hi = lo + 1e-6
    return lo, hi


def _render_row(image, point: np.ndarray, half: int, pixel_mm: float, intensity_window, name: str):
    volume, affine, space = _volume_of(image, name)
    lo, hi = _window(volume, intensity_window)
    vals, inside = _sample_world(volume, affine, space, _qc_world_grid(point, half, pixel_mm))
    gray = np.clip(np.nan_to_num((vals - lo) / (hi - lo), nan=0.0), 0.0, 1.0) * 255.0
    gray = np.where(inside, gray, 0.0)
    vox = world_to_voxel(point, affine, affine_space=space, world_space="LPS")[0]
    point_inside = bool(np.all((vox >= -0.5) & (vox <= np.asarray(volume.shape) - 0.5)))
    return np.repeat(gray[..., None], 3, axis=-1), point_inside


def _heat_overlay(rgb: np.ndarray, heat_map, point: np.ndarray, half: int, pixel_mm: float):
    volume, affine, space = _volume_of(heat_map, "heat_map")
    finite = volume[torch.isfinite(volume)]
    if finite.numel() == 0:
        return rgb, None
    lo, hi = max(0.0, float(finite.min())), float(finite.max())
    volume = torch.nan_to_num(volume, nan=lo, posinf=hi, neginf=lo)
    scores, inside = _sample_world(volume, affine, space, _qc_world_grid(point, half, pixel_mm))
    t = np.clip((scores - lo) / max(hi - lo, 1e-6), 0.0, 1.0) if hi > lo else (scores >= hi).astype(np.float64)
    alpha = np.where(inside, _QC_ALPHA * t, 0.0)[..., None]
    return rgb * (1.0 - alpha) + _colormap(t) * alpha, (lo, hi)


def _text_width(draw: ImageDraw.ImageDraw, text: str, font) -> float:
    return float(draw.textlength(text, font=font))


def _draw_panel_letters(draw: ImageDraw.ImageDraw, view: str, letters, left: int, top: int, panel: int, font) -> None:
    """Orientation letters (top, bottom, left, right) at a square panel's edges and the view's name."""
    t_l, b_l, l_l, r_l = letters
    right, bottom, mid = left + panel - 1, top + panel - 1, panel // 2
    draw.text((left + mid, top + 1), t_l, fill=_QC_LETTER, font=font, anchor="mt")
    draw.text((left + mid, bottom - 1), b_l, fill=_QC_LETTER, font=font, anchor="mb")
    draw.text((left + 2, top + mid), l_l, fill=_QC_LETTER, font=font, anchor="lm")
    draw.text((right - 1, top + mid), r_l, fill=_QC_LETTER, font=font, anchor="rm")
    draw.text((left + 2, bottom - 1), view, fill=_QC_LETTER, font=font, anchor="lb")


def _draw_crosshair(draw: ImageDraw.ImageDraw, x: float, y: float, box: tuple[int, int, int, int], colour) -> None:
    """Crosshair with an open centre at ``(x, y)``, clipped to ``box = (x0, y0, x1, y1)`` (inclusive)."""
    gap, arm = 4, 12
    x0, y0, x1, y1 = box
    if y0 <= y <= y1:  # horizontal arms
        for a, b in ((x - gap - arm, x - gap), (x + gap, x + gap + arm)):
            a, b = max(a, x0), min(b, x1)
            if a < b:
                draw.line([(a, y), (b, y)], fill=colour, width=1)
    if x0 <= x <= x1:  # vertical arms
        for a, b in ((y - gap - arm, y - gap), (y + gap, y + gap + arm)):
            a, b = max(a, y0), min(b, y1)
            if a < b:
                draw.line([(x, a), (x, b)], fill=colour, width=1)


def match_qc_image(
    template_image,
    template_point_lps,
    query_image,
    match_point_lps,
    heat_map=None,
    title: str = "",
    field_of_view_mm: float = 160.0,
    pixel_mm: float = 1.0,
    intensity_window: tuple[float, float] | None = None,
) -> np.ndarray:
    """Quality-control picture of one matched point: template (top row) vs. query (bottom row).

    Each row shows the axial, coronal and sagittal plane through its point, resampled in world coordinates (so any
    scan orientation and spacing works): a ``field_of_view_mm`` square of ``pixel_mm`` pixels centred on the point,
    sampled trilinearly with each image's own affine; whatever lies outside the scan is black. Display is
    radiological (3D Slicer): axial anterior up and patient right on the image left, coronal superior up and
    patient right on the left, sagittal superior up and anterior on the left. Points are marked with a crosshair
    (green template, red match).

    Args:
        template_image: ``(1, D, H, W)`` or ``(D, H, W)`` MetaTensor (affine in RAS unless ``meta["space"]`` is
            ``"LPS"``).
        template_point_lps: ``(3,)`` world point, LPS mm.
        query_image: same conventions as ``template_image``.
        match_point_lps: ``(3,)`` world point in the query scan, LPS mm.
        heat_map: optional ``(1, d, h, w)`` / ``(d, h, w)`` MetaTensor of similarity scores on its own grid,
            overlaid on the query row with a viridis colour map from ``max(0, min)`` (transparent) to ``max``.
        title: text of the title strip.
        field_of_view_mm: side of each square panel in mm.
        pixel_mm: panel pixel size in mm.
        intensity_window: ``(low, high)`` display window; ``None``: 1st-99th percentile of each scan.

    Returns:
        ``(H, W, 3)`` uint8 RGB array.
    """
    half = _qc_panel_half(field_of_view_mm, pixel_mm)
    panel = 2 * half + 1
    points = {
        "template": as_points(template_point_lps, "template_point_lps"),
        "query": as_points(match_point_lps, "match_point_lps"),
    }
    for key, pts in points.items():
        if pts.shape[0] != 1:
            raise ValueError(f"{key} point must be a single (3,) point, got {pts.shape}")
    images = {"template": template_image, "query": query_image}
    height, width, boxes = _qc_layout(panel)
    canvas = np.zeros((height, width, 3), dtype=np.float64)
    inside_flags, heat_range = {}, None
    for row in _QC_ROWS:
        point = points[row][0]
        rgb, inside_flags[row] = _render_row(images[row], point, half, pixel_mm, intensity_window, f"{row}_image")
        if row == "query" and heat_map is not None:
            rgb, heat_range = _heat_overlay(rgb, heat_map, point, half, pixel_mm)
        for v, (view, *_rest) in enumerate(_QC_VIEWS):
            top, left = boxes[(row, view)]
            canvas[top : top + panel, left : left + panel] = rgb[v]

    img = Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    draw.text((_QC_GAP + 2, 3), title, fill=(255, 255, 255), font=font)
    for r, row in enumerate(_QC_ROWS):
        header_y = boxes[(row, "axial")][0] - _QC_HEADER_H + 1
        x, y, z = points[row][0]
        label = f"{row}  LPS ({x:.1f}, {y:.1f}, {z:.1f}) mm" + ("" if inside_flags[row] else "  [outside scan]")
        draw.text((_QC_GAP + 2, header_y), label, fill=(255, 255, 255), font=font)
        for view, _col_dir, _row_dir, (t_l, b_l, l_l, r_l) in _QC_VIEWS:
            top, left = boxes[(row, view)]
            _draw_panel_letters(draw, view, (t_l, b_l, l_l, r_l), left, top, panel, font)
            right, bottom = left + panel - 1, top + panel - 1
            _draw_crosshair(draw, left + half, top + half, (left, top, right, bottom), _QC_MARKER[row])
    if heat_range is not None:
        lo, hi = heat_range
        header_y = boxes[("query", "axial")][0] - _QC_HEADER_H
        bar_w, bar_h = min(100, panel), 8
        hi_txt, lo_txt = f"{hi:.2f}", f"heat  {lo:.2f}"
        x_hi = width - _QC_GAP - 2 - _text_width(draw, hi_txt, font)
        bar_x1 = int(x_hi) - 4
        bar_x0 = bar_x1 - bar_w
        x_lo = bar_x0 - 4 - _text_width(draw, lo_txt, font)
        bar_y0 = header_y + (_QC_HEADER_H - bar_h) // 2
        ramp = _colormap(np.linspace(0.0, 1.0, bar_w))
        bar = np.repeat(np.rint(ramp)[None].astype(np.uint8), bar_h, axis=0)
        img.paste(Image.fromarray(bar, "RGB"), (bar_x0, bar_y0))
        draw.text((x_lo, header_y + 1), lo_txt, fill=(255, 255, 255), font=font)
        draw.text((x_hi, header_y + 1), hi_txt, fill=(255, 255, 255), font=font)
    return np.asarray(img, dtype=np.uint8).copy()


def save_match_qc(path: str | os.PathLike, *args, **kwargs) -> None:
    """Write :func:`match_qc_image` ``(*args, **kwargs)`` to ``path`` as PNG, atomically, creating parent folders."""
    _save_png_atomic(match_qc_image(*args, **kwargs), path)


# ----------------------------------------------------------------------------------------------------------------
# Registration overlay picture
# ----------------------------------------------------------------------------------------------------------------

_REG_FIXED_RGB = np.array([1.0, 0.0, 0.0])  # fixed image -> red
_REG_MOVING_RGB = np.array([0.0, 1.0, 0.0])  # moving image -> green (overlap of bright structures: yellow)


def _is_sitk_image(image) -> bool:
    return all(hasattr(image, attr) for attr in ("GetSpacing", "GetDirection", "GetOrigin", "GetPixelIDValue"))


def _sitk_volume(image, name: str) -> tuple[torch.Tensor, np.ndarray, str]:
    """``(Z, Y, X)`` float32 tensor (NumPy's order of the ITK buffer) and the 4x4 LPS affine from that index order
    to world, of a SimpleITK image.

    A float32 image is not copied: the tensor is a view of the image's own buffer, valid while the image lives (the
    QC picture of a 512 x 488 x 187 registration held three float32 copies of each of its two volumes, 1.1 GB).
    """
    import SimpleITK as sitk  # only reached with a SimpleITK image, so the package is installed

    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(
            f"{name} must be a 3D scalar image, got {image.GetDimension()}D with "
            f"{image.GetNumberOfComponentsPerPixel()} components"
        )
    array = sitk.GetArrayViewFromImage(image)  # (z, y, x), read-only view
    if array.dtype != np.float32:
        array = array.astype(np.float32)
    with warnings.catch_warnings():  # the view is read-only; the picture only reads it
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        volume = torch.from_numpy(array)
    affine = np.eye(4)
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    # ITK index (x, y, z) -> world is direction @ diag(spacing); the tensor's index is (z, y, x): columns reversed
    affine[:3, :3] = (direction * np.asarray(image.GetSpacing(), dtype=np.float64)[None, :])[:, ::-1]
    affine[:3, 3] = np.asarray(image.GetOrigin(), dtype=np.float64)
    return volume, affine, "LPS"


def _overlay_volume(image, name: str) -> tuple[torch.Tensor, np.ndarray, str]:
    """Volume, affine and its space of a MONAI MetaTensor or a SimpleITK image."""
    if _is_sitk_image(image):
        return _sitk_volume(image, name)
    return _volume_of(image, name)


def _volume_centre_and_extent(volume: torch.Tensor, affine: np.ndarray, space: str) -> tuple[np.ndarray, float]:
    """World LPS centre of the voxel grid and the largest side (mm) of its world bounding box (voxel edges)."""
    sizes = np.asarray(volume.shape[-3:], dtype=np.float64)
    corners = np.array(list(np.ndindex(2, 2, 2)), dtype=np.float64) * sizes - 0.5
    world = voxel_to_world(corners, affine, affine_space=space, world_space="LPS")
    centre = voxel_to_world((sizes - 1.0) / 2.0, affine, affine_space=space, world_space="LPS")[0]
    return centre, float(np.max(world.max(0) - world.min(0)))


def registration_overlay_image(
    fixed,
    moving_resampled,
    point_lps=None,
    title: str = "",
    field_of_view_mm: float | None = None,
    pixel_mm: float = 1.0,
    fixed_window: tuple[float, float] | None = None,
    moving_window: tuple[float, float] | None = None,
) -> np.ndarray:
    """Registration check picture: fixed image in red, moving image in green (as in the SAMv2 paper's Fig. 11).

    The axial, coronal and sagittal planes through ``point_lps`` are sampled in world coordinates from both images
    (trilinear, each image with its own geometry), so ``moving_resampled`` may be the moving image resampled onto
    the fixed grid (e.g. ``DeformableResult.resampled_moving``) or any image already in the fixed image's world
    frame. The red channel is the windowed fixed intensity, the green channel the windowed moving intensity at the
    same world position; well-aligned bright structures appear yellow, misaligned ones as separate red and green
    edges. Outside an image its channel is 0. Display as :func:`match_qc_image` (radiological, 3D Slicer): axial
    anterior up and patient right on the left, coronal superior up and right on the left, sagittal superior up
    and anterior on the left; pixel ``(half, half)`` of each panel is ``point_lps``, image right / down in a panel
    is +x / +y (axial), +x / -z (coronal), +y / -z (sagittal) in LPS, ``pixel_mm`` per pixel.

    Args:
        fixed: ``SimpleITK.Image`` or MONAI ``MetaTensor`` ``(1, D, H, W)`` / ``(D, H, W)`` (affine in RAS unless
            ``meta["space"]`` is ``"LPS"``).
        moving_resampled: same kinds as ``fixed``.
        point_lps: ``(3,)`` world point (LPS mm) the planes pass through; ``None``: the centre of the fixed grid.
        title: text of the title strip.
        field_of_view_mm: side of each square panel in mm; ``None``: the largest side of the fixed image's world
            bounding box.
        pixel_mm: panel pixel size in mm.
        fixed_window, moving_window: ``(low, high)`` display windows; ``None``: 1st-99th percentile of that image.

    Returns:
        ``(H, W, 3)`` uint8 RGB array.
    """
    f_vol, f_aff, f_space = _overlay_volume(fixed, "fixed")
    m_vol, m_aff, m_space = _overlay_volume(moving_resampled, "moving_resampled")
    centre, extent = _volume_centre_and_extent(f_vol, f_aff, f_space)
    if point_lps is None:
        point = centre
    else:
        pts = as_points(point_lps, "point_lps")
        if pts.shape[0] != 1:
            raise ValueError(f"point_lps must be a single (3,) point, got {pts.shape}")
        point = pts[0]
    half = _qc_panel_half(extent if field_of_view_mm is None else float(field_of_view_mm), pixel_mm)
    panel = 2 * half + 1
    world = _qc_world_grid(point, half, pixel_mm)

    rgb = np.zeros(world.shape[:-1] + (3,), dtype=np.float64)
    for volume, affine, space, window, colour in (
        (f_vol, f_aff, f_space, fixed_window, _REG_FIXED_RGB),
        (m_vol, m_aff, m_space, moving_window, _REG_MOVING_RGB),
    ):
        lo, hi = _window(volume, window)
        vals, inside = _sample_world(volume, affine, space, world)
        level = np.where(inside, np.clip(np.nan_to_num((vals - lo) / (hi - lo), nan=0.0), 0.0, 1.0), 0.0)
        rgb += level[..., None] * colour * 255.0

    top = _QC_TITLE_H + _QC_HEADER_H
    width = 3 * panel + 4 * _QC_GAP
    height = top + panel + _QC_GAP
    canvas = np.zeros((height, width, 3), dtype=np.float64)
    lefts = [_QC_GAP + c * (panel + _QC_GAP) for c in range(len(_QC_VIEWS))]
    for v, left in enumerate(lefts):
        canvas[top : top + panel, left : left + panel] = rgb[v]

    img = Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    draw.text((_QC_GAP + 2, 3), title, fill=(255, 255, 255), font=font)
    x, y, z = point
    header_y = top - _QC_HEADER_H + 1
    draw.text((_QC_GAP + 2, header_y), f"LPS ({x:.1f}, {y:.1f}, {z:.1f}) mm   ", fill=(255, 255, 255), font=font)
    legend_x = _QC_GAP + 2 + _text_width(draw, f"LPS ({x:.1f}, {y:.1f}, {z:.1f}) mm   ", font)
    draw.text((legend_x, header_y), "fixed", fill=(255, 64, 64), font=font)
    legend_x += _text_width(draw, "fixed ", font)
    draw.text((legend_x, header_y), "moving", fill=(64, 255, 64), font=font)
    for (view, _col_dir, _row_dir, (t_l, b_l, l_l, r_l)), left in zip(_QC_VIEWS, lefts):
        _draw_panel_letters(draw, view, (t_l, b_l, l_l, r_l), left, top, panel, font)
    return np.asarray(img, dtype=np.uint8).copy()


def _save_png_atomic(rgb: np.ndarray, path: str | os.PathLike) -> None:
    with atomic_file(path) as tmp, open(tmp, "wb") as fh:
        Image.fromarray(rgb, "RGB").save(fh, format="PNG")


def save_registration_overlay(path: str | os.PathLike, *args, **kwargs) -> None:
    """Write :func:`registration_overlay_image` ``(*args, **kwargs)`` to ``path`` as PNG, atomically, creating
    parent folders."""
    _save_png_atomic(registration_overlay_image(*args, **kwargs), path)


# ----------------------------------------------------------------------------------------------------------------
# Box plot of per-case errors (the registration benchmark's figure, paper Fig. 7 style)
# ----------------------------------------------------------------------------------------------------------------


def _default_font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def write_boxplot(path: str, data: dict[str, list[float]], threshold_mm: float | None = 10.0,
                  title: str = "CT-MR rigid registration, TRE per case", y_min: float = 0.5, seed: int = 0,
                  failed: dict[str, list[bool]] | None = None) -> str:
    """Box plot PNG (Pillow only): one box per method (quartiles, median, whiskers to the furthest point within
    1.5 IQR), every case as a jittered dot, log y axis in mm with 1-2-5 ticks, the success threshold dashed.
    Values below ``y_min`` are drawn at ``y_min``; the axis ends at the first of 20, 50, 100, 200, ... mm above the
    largest finite value (inf, e.g. a failure without a transform, is drawn at the top). ``failed`` (per method,
    per value) marks reported failures, drawn as crosses."""
    names = list(data)
    values = [np.clip(np.asarray(v, dtype=np.float64), y_min, None) for v in data.values()]
    finite = np.concatenate([v[np.isfinite(v)] for v in values] + [np.array([10.0])])
    nice = [t * 10.0**e for e in range(1, 6) for t in (2, 5, 10)]
    y_max = next((t for t in nice if t >= finite.max() * 1.05), nice[-1])
    values = [np.clip(v, None, y_max) for v in values]  # beyond the axis (and inf): drawn at the top
    W, H = max(520, 150 * len(names) + 140), 520
    left, right, top, bottom = 70, 30, 60, 90
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    f_small, f_mid = _default_font(13), _default_font(16)
    lo_log, hi_log = np.log10(y_min), np.log10(y_max)

    def y_of(v):
        return top + (H - top - bottom) * (1.0 - (np.log10(v) - lo_log) / (hi_log - lo_log))

    ticks = [t * 10.0**e for e in range(-2, 6) for t in (1, 2, 5) if y_min <= t * 10.0**e <= y_max]
    for t in ticks:
        y = y_of(t)
        d.line([left + 1, y, W - right - 1, y], fill=(230, 230, 230))
        d.line([left - 5, y, left, y], fill="black")
        label = f"{t:g}"
        d.text((left - 8 - d.textlength(label, font=f_small), y - 7), label, fill="black", font=f_small)
    d.rectangle([left, top, W - right, H - bottom], outline="black")
    d.text((left - 50, top - 24), "TRE (mm, log scale)", fill="black", font=f_small)
    d.text((left, 12), title, fill="black", font=f_mid)
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (148, 103, 189), (140, 86, 75), (227, 119, 194)]
    rng = np.random.default_rng(seed)
    step = (W - left - right) / max(len(names), 1)
    if failed and any(any(f) for f in failed.values()):
        note = "x: reported failure (scored with the identity)"
        d.text((W - right - d.textlength(note, font=f_small), top - 24), note, fill="black", font=f_small)
    for i, (name, v) in enumerate(zip(names, values)):
        cx, colour = left + step * (i + 0.5), colours[i % len(colours)]
        marks = np.asarray((failed or {}).get(name, [False] * len(v)), dtype=bool)
        marks = marks[np.isfinite(v)] if len(marks) == len(v) else np.zeros(int(np.isfinite(v).sum()), bool)
        v = v[np.isfinite(v)]
        if len(v):
            q1, med, q3 = np.percentile(v, [25, 50, 75])
            iqr = q3 - q1
            lo_w, hi_w = v[v >= q1 - 1.5 * iqr].min(), v[v <= q3 + 1.5 * iqr].max()
            bw = min(60, step * 0.4)
            d.line([cx, y_of(lo_w), cx, y_of(q1)], fill="black")
            d.line([cx, y_of(q3), cx, y_of(hi_w)], fill="black")
            for w in (lo_w, hi_w):
                d.line([cx - bw / 3, y_of(w), cx + bw / 3, y_of(w)], fill="black")
            d.rectangle([cx - bw / 2, y_of(q3), cx + bw / 2, y_of(q1)], outline=colour, fill=tuple(int(c * 0.35 + 255 * 0.65) for c in colour), width=2)
            d.line([cx - bw / 2, y_of(med), cx + bw / 2, y_of(med)], fill="black", width=3)
            for val, mark in zip(v, marks):
                x, y = cx + rng.uniform(-bw / 2, bw / 2), y_of(val)
                if mark:
                    d.line([x - 4, y - 4, x + 4, y + 4], fill="black", width=2)
                    d.line([x - 4, y + 4, x + 4, y - 4], fill="black", width=2)
                else:
                    d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour, outline="black")
        # method label, wrapped
        words, lines, line = name.split(), [], ""
        for w in words:
            if d.textlength((line + " " + w).strip(), font=f_small) > step - 8 and line:
                lines.append(line)
                line = w
            else:
                line = (line + " " + w).strip()
        lines.append(line)
        for k, text in enumerate(lines[:4]):
            d.text((cx - d.textlength(text, font=f_small) / 2, H - bottom + 8 + 16 * k), text, fill="black", font=f_small)
    if threshold_mm:
        y = y_of(threshold_mm)
        for x in range(left, W - right, 12):
            d.line([x, y, min(x + 6, W - right), y], fill=(200, 0, 0), width=2)
        label = f"success < {threshold_mm:g} mm"
        d.rectangle([left + 4, y - 19, left + 8 + d.textlength(label, font=f_small), y - 4], fill="white")
        d.text((left + 6, y - 18), label, fill=(200, 0, 0), font=f_small)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img.save(path, format="PNG")
    return path
