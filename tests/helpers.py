"""Plain helpers shared by several test modules (no fixtures: those live in ``conftest.py``; no tests).

Test modules import from here, never from each other.

* matching: a small real CT crop and its exactly translated copy (what the ``embedded`` fixture embeds), random
  interior points, fine-grid voxels inside the body;
* registration: a known rigid matrix, its SimpleITK transform, its TRE on the sample CT, the crosssam_registration
  bundle run as users run it;
* the upstream (mmcv) checkpoint layout: synthetic SAMv2 / SAM v1 checkpoints written out from the reference
  implementation's description (``docs/design.md`` section 2), *not* derived from the package's key mapping.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from samv2_components.geometry import voxel_to_world, world_to_voxel
from samv2_components.io.image import load_scan
from samv2_components.matching import query_descriptor_map
from samv2_components.sample_data import sample_path

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))

# ---------------------------------------------------------------------------------------------------------------
# Matching
# ---------------------------------------------------------------------------------------------------------------

#: LPS shift (mm) of the translated copy of the CT crop (``save_crop``, the ``embedded`` fixture)
SHIFT_LPS = np.array([8.0, -12.0, 4.0])


def interior_points(image, n: int, seed: int, max_margin: int = 20, margin_divisor: int = 4) -> np.ndarray:
    """``(n, 3)`` random world points (LPS mm) of ``image`` ``(1, X, Y, Z)``, at least
    ``min(max_margin, size // margin_divisor)`` voxels inside its grid on every axis (seeded)."""
    rng = np.random.default_rng(seed)
    size = np.asarray(image.shape[1:])
    margin = np.minimum(max_margin, size // margin_divisor)
    idx = np.stack([rng.uniform(m, s - 1 - m, n) for m, s in zip(margin, size)], axis=1)
    return voxel_to_world(idx, np.asarray(image.affine))


def save_crop(path, shift_lps=(0.0, 0.0, 0.0)):
    """A 64 x 64 x 24 crop (3 mm) of the sample CT, optionally with its origin moved by ``shift_lps`` mm."""
    src = nib.load(sample_path("ct_abdomen"))
    start = np.array([29, 18, 3])
    data = np.asarray(src.dataobj, dtype=np.float32)[29:93, 18:82, 3:27]
    affine = src.affine.copy()
    affine[:3, 3] = voxel_to_world(start[None], src.affine)[0] * [-1, -1, 1]  # RAS origin of the crop
    affine[:3, 3] += np.asarray(shift_lps) * [-1, -1, 1]  # LPS shift -> RAS
    nib.save(nib.Nifti1Image(data, affine), path)
    return str(path)


def body_fine_voxels(heads, path, n, seed=0):
    """``n`` fine-grid voxel centres (indices and LPS points) inside the body (> -300 HU) of the scan at ``path``."""
    dmap = query_descriptor_map(heads)
    scan = load_scan(path)
    shape = np.array(dmap.grid_shape)
    idx = np.stack(np.meshgrid(*[np.arange(1, s - 1) for s in shape], indexing="ij"), -1).reshape(-1, 3)
    pts = dmap.voxel_to_world(idx)
    vox = np.rint(world_to_voxel(pts, scan.affine)).astype(int)
    inside = np.all((vox >= 0) & (vox < np.array(scan.shape[1:])), axis=1)
    idx, pts, vox = idx[inside], pts[inside], vox[inside]
    hu = scan[0].numpy()[vox[:, 0], vox[:, 1], vox[:, 2]]
    keep = np.flatnonzero(hu > -300)
    chosen = np.random.default_rng(seed).choice(keep, size=n, replace=False)
    return idx[chosen], pts[chosen], dmap


# ---------------------------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------------------------

REGISTRATION_INFERENCE = os.path.join(ROOT, "bundles", "crosssam_registration", "configs", "inference.json")


def run_registration_bundle(*overrides):
    """``python -m monai.bundle run`` of the crosssam_registration inference config with ``overrides``."""
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", REGISTRATION_INFERENCE, *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, encoding="utf-8", errors="replace", timeout=600, env=env)


def rigid(angle_deg: float, axis, translation) -> np.ndarray:
    """4x4 rotation by ``angle_deg`` about ``axis`` through the origin, then ``translation`` (Rodrigues, written out
    independently of the package's own)."""
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    a = np.radians(angle_deg)
    matrix = np.eye(4)
    matrix[:3, :3] = np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k
    matrix[:3, 3] = translation
    return matrix


def sitk_affine(matrix):
    """The SimpleITK ``AffineTransform`` of a 4x4 matrix (needs SimpleITK)."""
    import SimpleITK as sitk

    t = sitk.AffineTransform(3)
    t.SetMatrix(matrix[:3, :3].ravel().tolist())
    t.SetTranslation(matrix[:3, 3].tolist())
    return t


def turned_sample_ct(path: str, rotation: np.ndarray) -> tuple[str, np.ndarray]:
    """The sample CT turned by ``rotation`` (plus a small oblique rotation and a shift) about its centre, on a 3 mm
    axis-aligned grid covering the turned scan, written to ``path``; returns it and the true fixed -> moving matrix."""
    import SimpleITK as sitk

    fixed = sitk.ReadImage(sample_path("ct_abdomen"), sitk.sitkFloat32)
    size = np.array(fixed.GetSize())
    centre = np.array(fixed.TransformContinuousIndexToPhysicalPoint(((size - 1) / 2.0).tolist()))
    turn = np.eye(4)
    turn[:3, :3] = rotation
    truth = rigid(7.0, (0.3, 1.0, 0.2), (6.0, -9.0, 4.0)) @ rigid(0.0, (0, 0, 1), centre) @ turn @ rigid(0.0, (0, 0, 1), -centre)
    corners = np.array([fixed.TransformIndexToPhysicalPoint([int(a), int(b), int(c)]) for a in (0, size[0] - 1) for b in (0, size[1] - 1) for c in (0, size[2] - 1)])
    moved = corners @ truth[:3, :3].T + truth[:3, 3]
    lo, hi = moved.min(0) - 3.0, moved.max(0) + 3.0
    grid = sitk.Image([int(v) for v in np.ceil((hi - lo) / 3.0) + 1], sitk.sitkFloat32)
    grid.SetSpacing((3.0, 3.0, 3.0))
    grid.SetOrigin(lo.tolist())
    moving = sitk.Resample(fixed, grid, sitk_affine(np.linalg.inv(truth)), sitk.sitkLinear, -1024.0)
    sitk.WriteImage(moving, path)
    return path, truth


def sample_ct_tre(estimate: np.ndarray, truth: np.ndarray, n: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """TRE (mm) of a fixed -> moving matrix against the truth on ``n`` random points of the sample CT's central
    region; returns the points (LPS) and their errors (needs SimpleITK)."""
    import SimpleITK as sitk

    fixed = sitk.ReadImage(sample_path("ct_abdomen"))
    rng = np.random.default_rng(seed)
    size = np.array(fixed.GetSize())
    points = np.array([fixed.TransformContinuousIndexToPhysicalPoint((rng.uniform(0.25, 0.75, 3) * (size - 1)).tolist()) for _ in range(n)])
    tre = np.linalg.norm(points @ estimate[:3, :3].T + estimate[:3, 3] - (points @ truth[:3, :3].T + truth[:3, 3]), axis=1)
    return points, tre


# ---------------------------------------------------------------------------------------------------------------
# The upstream layout (mmaction ResNet3d-18 with mmcv ConvModules + mmdet-style FPN necks), written out explicitly.
# ---------------------------------------------------------------------------------------------------------------

#: (layer, in channels, out channels, block kernel, first block stride) of ``backbone.layer1..4``
UPSTREAM_LAYERS = (
    (1, 64, 64, (1, 3, 3), (1, 2, 2)),
    (2, 64, 128, (1, 3, 3), (1, 2, 2)),
    (3, 128, 256, (3, 3, 3), (1, 2, 2)),
    (4, 256, 512, (3, 3, 3), (2, 2, 2)),
)
#: FPN necks: name -> lateral input channels (stages 1-3 for ``neck``/``semantic_head``, stage 4 for the read-out)
UPSTREAM_NECKS = {"neck": (64, 128, 256), "read_out_head": (512,), "semantic_head": (64, 128, 256)}
FPN_CHANNELS = 128
EMBEDDING_DIM = 128
BN_SUFFIXES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def upstream_shapes(semantic: bool = True) -> dict[str, tuple]:
    """Every tensor of an upstream SAMv2 (``semantic=True``) or SAM v1 checkpoint with its shape."""
    shapes: dict[str, tuple] = {}

    def conv_module(prefix: str, cout: int, weight_shape: tuple) -> None:
        shapes[f"{prefix}.conv.weight"] = weight_shape  # bias=False in every backbone ConvModule
        for suffix in BN_SUFFIXES:
            shapes[f"{prefix}.bn.{suffix}"] = () if suffix == "num_batches_tracked" else (cout,)

    conv_module("backbone.conv1", 64, (64, 1, 3, 7, 7))
    for layer, cin, cout, kernel, _ in UPSTREAM_LAYERS:
        for block in (0, 1):
            block_in = cin if block == 0 else cout
            conv_module(f"backbone.layer{layer}.{block}.conv1", cout, (cout, block_in, *kernel))
            conv_module(f"backbone.layer{layer}.{block}.conv2", cout, (cout, cout, *kernel))
        conv_module(f"backbone.layer{layer}.0.downsample", cout, (cout, cin, 1, 1, 1))
    for neck, in_channels in UPSTREAM_NECKS.items():
        if neck == "semantic_head" and not semantic:
            continue
        for i, cin in enumerate(in_channels):
            shapes[f"{neck}.lateral_convs.{i}.conv.weight"] = (FPN_CHANNELS, cin, 1, 1, 1)
            shapes[f"{neck}.lateral_convs.{i}.conv.bias"] = (FPN_CHANNELS,)
        shapes[f"{neck}.fpn_convs.0.conv.weight"] = (EMBEDDING_DIM, FPN_CHANNELS, 3, 3, 3)
        shapes[f"{neck}.fpn_convs.0.conv.bias"] = (EMBEDDING_DIM,)
    return shapes


def random_upstream_state_dict(semantic: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random but well-scaled values: He-initialised convs, BN with random affine and positive running var."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in upstream_shapes(semantic).items():
        if key.endswith("num_batches_tracked"):
            value = torch.randint(1, 20000, (), generator=g, dtype=torch.int64)
        elif key.endswith("running_var"):
            value = torch.rand(shape, generator=g) + 0.5
        elif key.endswith("running_mean"):
            value = 0.1 * torch.randn(shape, generator=g)
        elif ".bn.weight" in key:
            value = torch.rand(shape, generator=g) + 0.5
        elif key.endswith("bias"):
            value = 0.1 * torch.randn(shape, generator=g)
        else:  # conv weight
            fan_in = math.prod(shape[1:])
            value = torch.randn(shape, generator=g) * math.sqrt(2.0 / fan_in)
        state[key] = value
    return state


def save_mmcv_checkpoint(state_dict: dict, path: Path) -> Path:
    meta = {
        "mmcv_version": "1.4.0",
        "time": "Mon Jan  2 03:04:05 2023",
        "config": "model = dict(type='Sam', backbone=dict(type='ResNet3d', depth=18))",
        "iter": 20000,
        "hook_msgs": {"best_score": np.float64(0.5)},  # numpy scalars are why weights_only=False is needed
    }
    torch.save({"meta": meta, "state_dict": state_dict}, path)
    return path


# ---------------------------------------------------------------------------------------------------------------
# Bad scans (the reader's tests and the command-line harness)
# ---------------------------------------------------------------------------------------------------------------


def nifti_file(path: Path, array: np.ndarray) -> str:
    """Write ``array`` as NIfTI with 1.5 x 1.5 x 2 mm voxels; return the path."""
    nib.save(nib.Nifti1Image(array, np.diag([1.5, 1.5, 2.0, 1.0])), str(path))
    return str(path)


def nifti_bytes(array, zooms=(1.0, 1.0, 1.0)) -> bytes:
    """The bytes of a single-file NIfTI of ``array`` (float32) with voxel size ``zooms``."""
    import io as _io

    image = nib.Nifti1Image(np.asarray(array, np.float32), np.diag([*zooms, 1.0]))
    buffer = _io.BytesIO()
    file_map = image.make_file_map({"image": buffer, "header": buffer})
    image.to_file_map(file_map)
    return buffer.getvalue()


def unreadable_scans(tmp: Path) -> list[tuple[str, str]]:
    """(path, phrase expected in the message) for every kind of scan that cannot be read or holds no image."""
    import itk
    from PIL import Image

    rng = np.random.default_rng(2)
    cases = [(str(tmp / "missing.nii.gz"), "not found")]
    (tmp / "empty").mkdir()
    cases.append((str(tmp / "empty"), "folder is empty"))
    (tmp / "empty_file.nii.gz").write_bytes(b"")
    cases.append((str(tmp / "empty_file.nii.gz"), "empty file"))
    garbage = tmp / "x.nii.gz"
    garbage.write_bytes(bytes(rng.integers(0, 256, size=2048, dtype=np.uint8)))
    cases.append((str(garbage), "cannot be read as an image"))
    text = tmp / "notes.nii"
    text.write_text("patient 12, follow-up scan\n" * 40)
    cases.append((str(text), "cannot be read as an image"))
    png = tmp / "slice.png"
    Image.fromarray(rng.integers(0, 255, size=(24, 32), dtype=np.uint8)).save(png)
    cases.append((str(png), "2D"))
    cases.append((nifti_file(tmp / "one_slice.nii.gz", rng.normal(size=(12, 10, 1)).astype(np.float32)), "2D"))
    cases.append((nifti_file(tmp / "four_d.nii.gz", rng.normal(size=(8, 8, 8, 3)).astype(np.float32)), "4D"))
    cases.append((nifti_file(tmp / "constant.nii.gz", np.full((8, 8, 8), 7, np.int16)), "constant"))
    nan = rng.normal(size=(8, 8, 8)).astype(np.float32)
    nan[2, 3, 4] = np.nan
    nan[5, 1, 0] = np.nan
    cases.append((nifti_file(tmp / "nan.nii.gz", nan), "2 NaN"))
    inf = rng.normal(size=(8, 8, 8)).astype(np.float32)
    inf[1, 1, 1] = -np.inf
    cases.append((nifti_file(tmp / "inf.nii.gz", inf), "infinite"))
    mha_nan = tmp / "nan.mha"  # non-NIfTI path: ITK keeps the NaN and validate_scan sees it
    itk.imwrite(itk.image_from_array(nan), str(mha_nan))
    cases.append((str(mha_nan), "NaN"))
    return cases


def scans_with_bad_headers(tmp: Path) -> list[tuple[str, str]]:
    """(path, phrase) for files ITK would read silently wrong or that cannot be embedded: a truncated gzip stream, a
    short file, a zero voxel size, a singular sform, 50 mm voxels, a 3x3x3 image."""
    import gzip
    import struct

    rng = np.random.default_rng(5)
    good = nifti_bytes(rng.normal(size=(20, 20, 20)))
    cases = []
    (tmp / "cut.nii.gz").write_bytes(gzip.compress(good)[: len(gzip.compress(good)) // 2])
    cases.append((str(tmp / "cut.nii.gz"), "truncated or corrupt file"))
    (tmp / "short.nii").write_bytes(good[: len(good) // 2])
    cases.append((str(tmp / "short.nii"), "truncated file"))
    zero = bytearray(good)
    zero[80:84] = struct.pack("<f", 0.0)  # pixdim[1]
    (tmp / "zero_spacing.nii.gz").write_bytes(gzip.compress(bytes(zero)))
    cases.append((str(tmp / "zero_spacing.nii.gz"), "invalid voxel spacing"))
    singular = bytearray(good)
    singular[296:312] = singular[280:296]  # srow_y = srow_x: two axes along x, none along y
    singular[252:256] = struct.pack("<hh", 0, 1)  # qform_code 0, sform_code 1
    (tmp / "singular.nii.gz").write_bytes(gzip.compress(bytes(singular)))
    cases.append((str(tmp / "singular.nii.gz"), "invalid orientation"))
    (tmp / "coarse.nii.gz").write_bytes(gzip.compress(nifti_bytes(rng.normal(size=(4, 4, 4)), (50.0, 50.0, 50.0))))
    cases.append((str(tmp / "coarse.nii.gz"), "too coarse to embed"))
    (tmp / "tiny.nii.gz").write_bytes(gzip.compress(nifti_bytes(rng.normal(size=(3, 3, 3)))))
    cases.append((str(tmp / "tiny.nii.gz"), "too small to embed"))
    return cases
