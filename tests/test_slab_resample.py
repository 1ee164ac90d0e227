"""SlabResampled: the output of MONAI's Orientationd + Spacingd, slab by slab, from a scan of any dtype."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Orientationd, Spacingd

from samv2_components.io.image import LoadScand
from samv2_components.sample_data import sample_path
from samv2_components.transforms import SlabResampled


def _eager(image: MetaTensor, pixdim) -> MetaTensor:
    data = Orientationd("image", axcodes="SPL", labels=None)({"image": image.float()})
    return Spacingd("image", pixdim=pixdim, mode="bilinear", padding_mode="border", dtype=torch.float32)(data)["image"]


def _turned(image: MetaTensor, degrees: float) -> MetaTensor:
    """The same voxels with a header turned by ``degrees`` about the first world axis (an oblique acquisition)."""
    a = np.deg2rad(degrees)
    turn = np.eye(4)
    turn[1:3, 1:3] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
    return MetaTensor(image.as_tensor().clone(), affine=torch.as_tensor(turn @ image.affine.double().numpy()),
                      meta={k: v for k, v in image.meta.items() if k != "affine"})


@pytest.fixture(scope="module")
def sample_ct() -> MetaTensor:
    image = LoadScand("image", float32=False)({"image": sample_path("ct_abdomen")})["image"]
    assert image.dtype == torch.int16  # the file's own type is kept: converted only slab by slab
    return image


@pytest.mark.parametrize("degrees, pixdim, slab_voxels", [
    (0.0, (2.0, 2.0, 2.0), 1 << 20),  # the bundles' setting: one slab
    (0.0, (2.0, 2.0, 2.0), 3000),  # a slab of one output plane: every crop's bounds matter
    (23.0, (2.0, 2.0, 2.0), 20000),  # oblique header: slabs are tilted boxes in the input
    (23.0, (0.9, 1.3, 2.5), 50000),  # finer than the input along one axis
])
def test_equals_monai_orientation_and_spacing(sample_ct, degrees, pixdim, slab_voxels):
    image = _turned(sample_ct, degrees)
    expected = _eager(image, pixdim)
    out = SlabResampled("image", axcodes="SPL", pixdim=pixdim, slab_voxels=slab_voxels)({"image": image})["image"]
    assert out.dtype == torch.float32 and out.shape == expected.shape
    np.testing.assert_array_equal(out.affine.numpy(), expected.affine.numpy())
    # same samples up to float32 rounding of the sampling coordinates (values span 2,000 HU)
    assert float((out - expected).abs().max()) < 0.05
    assert out.meta["filename_or_obj"] == sample_ct.meta["filename_or_obj"]
    assert out.meta["space"] == "RAS"
    np.testing.assert_array_equal(out.meta["original_affine"], sample_ct.meta["original_affine"])


def test_a_blob_keeps_its_world_position():
    """A smooth blob of a synthetic int16 scan (oblique, anisotropic) lands at its own world point."""
    centre = np.array([17.3, 21.6, 9.2])  # voxel coordinates, between voxel centres
    grid = np.stack(np.meshgrid(*(np.arange(n) for n in (40, 50, 30)), indexing="ij"), axis=-1)
    blob = 1000.0 * np.exp(-0.5 * (((grid - centre) / (3.0, 5.0, 2.0)) ** 2).sum(-1))  # about 5 mm wide
    volume = torch.as_tensor(np.rint(blob).astype(np.int16))[None]
    a = np.deg2rad(30.0)
    affine = np.diag([1.5, 0.8, 3.0, 1.0])
    affine[:3, :3] = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]]) @ affine[:3, :3]
    affine[:3, 3] = (-20.0, 35.0, 12.0)
    image = MetaTensor(volume, affine=torch.as_tensor(affine), meta={"space": "RAS"})
    out = SlabResampled("image", axcodes="SPL", pixdim=1.0, slab_voxels=4000)({"image": image})["image"]
    weights = out[0].numpy().astype(np.float64)
    grid = np.stack(np.meshgrid(*(np.arange(n) for n in weights.shape), indexing="ij"), axis=-1)
    centroid = (weights[..., None] * grid).reshape(-1, 3).sum(0) / weights.sum()
    world = out.affine.numpy() @ np.r_[centroid, 1.0]
    np.testing.assert_allclose(world[:3], (affine @ np.r_[centre, 1.0])[:3], atol=0.05)


def test_rejects_unknown_modes():
    with pytest.raises(ValueError, match="mode"):
        SlabResampled("image", axcodes="SPL", pixdim=2.0, mode="bicubic")


def test_one_scan_stored_in_another_axis_order_gives_identical_slabs(sample_ct):
    """Axes reversed and swapped on disk, the affine saying so: the same physical scan, so the same output, bit for
    bit (each crop is reoriented exactly before it is resampled, as Orientationd does)."""
    n = np.array(sample_ct.shape[1:]) - 1
    stored_from_original = np.zeros((4, 4))  # stored (i, j, k) = original (n0 - k', ...): a swap and two flips
    stored_from_original[0, 2], stored_from_original[1, 1], stored_from_original[2, 0] = -1.0, 1.0, -1.0
    stored_from_original[:3, 3] = (n[2], 0, n[0])
    stored_from_original[3, 3] = 1.0
    array = sample_ct.as_tensor().permute(0, 3, 2, 1).flip(1, 3)  # original[k', j, i'] order, reversed
    affine = sample_ct.affine.double().numpy() @ np.linalg.inv(stored_from_original)
    other = MetaTensor(array.contiguous(), affine=torch.as_tensor(affine), meta={"space": "RAS"})
    transform = SlabResampled("image", axcodes="SPL", pixdim=2.0, slab_voxels=20000)
    first, second = (transform({"image": image})["image"] for image in (sample_ct, other))
    np.testing.assert_allclose(first.affine.numpy(), second.affine.numpy(), atol=1e-9)
    assert torch.equal(first.as_tensor(), second.as_tensor())
