"""Shared fixtures of the matching tests: a small real CT crop and an exactly translated copy, embedded by one
random width-0.25 network through the semantic_sam bundle's preprocessing and inferer.

Matching identities (a scan against itself or an exact translation of itself) hold for any weights.
"""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from samv2_components.geometry import voxel_to_world, world_to_voxel
from samv2_components.io.image import load_scan
from samv2_components.matching import query_descriptor_map
from samv2_components.networks import SAMv2Net
from samv2_components.sample_data import sample_path

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
CONFIG = os.path.join(ROOT, "bundles", "semantic_sam", "configs", "inference.json")
SHIFT_LPS = np.array([8.0, -12.0, 4.0])


def interior_points(image, n: int, seed: int, max_margin: int = 20, margin_divisor: int = 4) -> np.ndarray:
    """``(n, 3)`` random world points (LPS mm) of ``image`` ``(1, X, Y, Z)``, at least
    ``min(max_margin, size // margin_divisor)`` voxels inside its grid on every axis (seeded)."""
    rng = np.random.default_rng(seed)
    size = np.asarray(image.shape[1:])
    margin = np.minimum(max_margin, size // margin_divisor)
    idx = np.stack([rng.uniform(m, s - 1 - m, n) for m, s in zip(margin, size)], axis=1)
    return voxel_to_world(idx, np.asarray(image.affine))


# ------------------------------------------------------------------------------------------- embedded scans
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


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """Template crop, its translated copy, both embedded by one random width-0.25 network through the bundle."""
    tmp = tmp_path_factory.mktemp("crops")
    parser = ConfigParser()
    parser.read_config(CONFIG)
    parser["bundle_root"] = os.path.join(ROOT, "bundles", "semantic_sam")
    preprocessing = parser.get_parsed_content("preprocessing")
    inferer = parser.get_parsed_content("inferer")
    torch.manual_seed(0)
    net = SAMv2Net(width=0.25).eval()
    out = {}
    for key, shift in (("template", (0.0, 0.0, 0.0)), ("shifted", SHIFT_LPS)):
        path = save_crop(tmp / f"{key}.nii.gz", shift)
        out[key] = inferer(preprocessing({"image": path, "modality": "ct"})["image"][None], net)
        out[key + "_path"] = path
    return out


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
