"""Embedding files: float16 maps written as float32 NIfTI slice by slice, with their own affines."""

import tracemalloc

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor

from samv2_components.io.embeddings import SliceWiseNibabelWriter, write_embedding_case


def _map(shape=(16, 40, 48, 56), seed=0):
    """A channels-last float16 ``(C, d, h, w)`` map like the inferer's, with a strided grid affine (RAS)."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(1, *shape, generator=g).half().contiguous(memory_format=torch.channels_last_3d)[0]
    affine = torch.tensor([[-4.0, 0, 0, 10], [0, -4.0, 0, 20], [0, 0, 2.5, -30], [0, 0, 0, 1]], dtype=torch.float64)
    return MetaTensor(emb, affine=affine)


def test_float16_map_is_written_as_float32_without_a_float32_copy(tmp_path):
    emb = _map()  # 3.4 MB as float16; a float32 copy would be 6.9 MB
    writer = SliceWiseNibabelWriter()
    writer.set_data_array(emb, channel_dim=0)
    writer.set_metadata({"affine": emb.affine, "original_affine": emb.affine}, resample=False)
    # MONAI's writer passes the array through SpatialResample here (a float32 copy) even without resampling
    data = np.asarray(writer.data_obj)
    assert data.dtype == np.float16 and np.shares_memory(data, emb.numpy())
    tracemalloc.start()
    writer.write(str(tmp_path / "fine.nii"))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < emb.numel() * 2, peak  # converting the whole array first would take twice the float16 map
    image = nib.load(tmp_path / "fine.nii")
    assert image.get_data_dtype() == np.float32 and image.shape == (40, 48, 56, 16)
    np.testing.assert_array_equal(np.asarray(image.dataobj), emb.permute(1, 2, 3, 0).float().numpy())
    np.testing.assert_allclose(image.affine, emb.affine.numpy())
    assert int(image.header["sform_code"]) == 1 and int(image.header["qform_code"]) == 1


def test_embedding_case_files_hold_the_maps_and_their_grids(tmp_path):
    image = MetaTensor(torch.zeros(1, 80, 96, 112), affine=torch.diag(torch.tensor([-2.0, -2.0, 1.25, 1.0], dtype=torch.float64)))
    heads = {"fine": _map(), "semantic": _map(seed=1)}
    folder = write_embedding_case(heads, image, tmp_path, "case", preview=False)
    for name, emb in heads.items():
        written = nib.load(f"{folder}/{name}.nii")
        np.testing.assert_array_equal(np.asarray(written.dataobj), emb.permute(1, 2, 3, 0).float().numpy())
        np.testing.assert_allclose(written.affine, emb.affine.numpy())
