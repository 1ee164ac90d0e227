"""SAMv2Inferer: grid affines, padding, tiling with a halo, bf16 precision."""

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from samv2_components.geometry import voxel_to_world
from samv2_components.inference import SAMv2Inferer, bf16_supported
from samv2_components.networks import HEAD_GRIDS, SAMv2Net


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return SAMv2Net(width=0.25).eval()


def smooth_volume(shape, seed=0):
    """Random blobs: a smooth, image-like input in the network's range."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 1, *[s // 4 for s in shape], generator=g)
    x = torch.nn.functional.interpolate(x, size=shape, mode="trilinear", align_corners=False)
    return (x - x.min()) / (x.max() - x.min()) * 255 - 50


def test_output_affines_place_grid_voxels_at_their_input_positions(net):
    rot = np.array([[0.0, 0.0, -1.5], [0.0, -1.2, 0.0], [2.0, 0.0, 0.0]])  # permuted, flipped, anisotropic
    affine = np.eye(4)
    affine[:3, :3], affine[:3, 3] = rot, [10.0, -20.0, 30.0]
    image = MetaTensor(smooth_volume((16, 32, 48)), affine=torch.as_tensor(affine), meta={"space": "RAS"})
    heads = SAMv2Inferer(bf16=False)(image, net)
    for name, emb in heads.items():
        stride, offset = HEAD_GRIDS[name]
        idx = np.array([[0, 0, 0], [1, 2, 3], [emb.shape[2] - 1, emb.shape[3] - 1, emb.shape[4] - 1]], float)
        got = voxel_to_world(idx, emb.affine)
        want = voxel_to_world(idx * np.array(stride) + np.array(offset), affine)
        np.testing.assert_allclose(got, want, atol=1e-9)
        assert emb.meta["space"] == "RAS"


def test_non_divisible_input_is_padded_and_cropped(net):
    heads = SAMv2Inferer(bf16=False)(smooth_volume((10, 40, 50)), net)
    assert heads["fine"].shape[2:] == (5, 20, 25)
    assert heads["coarse"].shape[2:] == (3, 3, 4)  # ceil(10/4), ceil(40/16), ceil(50/16)


def test_tiles_cover_the_volume_exactly_once():
    inferer = SAMv2Inferer(max_tile_voxels=20_000, halo=(4, 16, 16))
    size = (24, 64, 96)
    cover = torch.zeros(size, dtype=torch.int32)
    tiles = inferer.tile_starts(size)
    assert len(tiles) > 1
    for (d0, d1), (h0, h1), (w0, w1) in tiles:
        assert d0 % 4 == 0 and h0 % 16 == 0 and w0 % 16 == 0
        cover[d0:d1, h0:h1, w0:w1] += 1
    assert bool((cover == 1).all())


def test_tiled_pass_equals_whole_volume_pass(net):
    size = (48, 192, 224)
    x = smooth_volume(size)
    whole = SAMv2Inferer(bf16=False, max_tile_voxels=None)(x, net)
    # default halo; a budget that forces a split along depth and in-plane
    tiled_inferer = SAMv2Inferer(bf16=False, max_tile_voxels=48 * 192 * 224 * 3 // 4)
    tiles = tiled_inferer.tile_starts(size)
    assert len(tiles) > 1
    tiled = tiled_inferer(x, net)
    for name in whole:
        cosine = (whole[name].float() * tiled[name].float()).sum(1)
        assert float(cosine.mean()) > 0.999, name
        assert float(torch.quantile(cosine.flatten(), 0.01)) > 0.99, name


@pytest.mark.skipif(not bf16_supported(torch.device("cpu")), reason="this CPU has no fast bf16")
def test_bf16_embeddings_within_cosine_099_of_fp32(net):
    x = smooth_volume((32, 64, 64))
    fp32 = SAMv2Inferer(bf16=False, output_dtype="float32")(x, net)
    bf16 = SAMv2Inferer(bf16=True, output_dtype="float32")(x, net)
    for name in fp32:
        assert bf16[name].dtype == torch.float32
        assert float((fp32[name] * bf16[name]).sum(1).min()) > 0.99, name


def test_float16_maps_are_unit_vectors_within_cosine_09999_of_float32(net):
    x = smooth_volume((32, 64, 64))
    full = SAMv2Inferer(bf16=False, output_dtype="float32")(x, net)
    half = SAMv2Inferer(bf16=False)(x, net)  # float16 is the default
    for name in full:
        assert half[name].dtype == torch.float16 and half[name].shape == full[name].shape, name
        assert half[name].stride() == full[name].stride(), name  # same (channels-last) layout
        h = half[name].float()
        np.testing.assert_allclose(h.norm(dim=1).numpy(), 1.0, atol=5e-4)
        np.testing.assert_allclose(full[name].norm(dim=1).numpy(), 1.0, atol=1e-5)
        assert float(torch.nn.functional.cosine_similarity(full[name], h, dim=1).min()) > 0.9999, name


def test_bad_arguments():
    with pytest.raises(ValueError):
        SAMv2Inferer(halo=(3, 16, 16))
    with pytest.raises(ValueError):
        SAMv2Inferer(bf16="sometimes")  # true/false/1/0/yes/no and "auto" are accepted
    with pytest.raises(ValueError, match="output_dtype"):
        SAMv2Inferer(output_dtype="bfloat16")
    with pytest.raises(ValueError):
        SAMv2Inferer()(torch.zeros(1, 2, 8, 16, 16), SAMv2Net(width=0.25))


def test_bf16_heads_normalised_in_their_own_storage_equal_a_plain_normalisation(net):
    """bf16 heads and float16 output have one element size: the inferer writes the unit vectors over the raw
    vectors (no second map); the values must be those of normalising the raw vectors, rounded once."""
    x = smooth_volume((32, 64, 64))
    inferer = SAMv2Inferer(bf16=True)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        raw = net.forward_heads(x.contiguous(memory_format=torch.channels_last_3d), normalize=False)
    expected = {k: torch.nn.functional.normalize(v.float(), dim=1).half() for k, v in raw.items()}
    raw_copy = {k: v.clone() for k, v in raw.items()}
    out = {k: inferer._finish(v, consume=True) for k, v in raw.items()}
    for name, emb in out.items():
        assert emb.dtype == torch.float16 and emb.data_ptr() == raw[name].data_ptr(), name  # written in place
        assert (emb.float() - expected[name].float()).abs().max() <= 1e-3, name  # one float16 rounding
    # without consume the raw vectors are left alone
    kept = inferer._finish(raw_copy["fine"])
    assert kept.data_ptr() != raw_copy["fine"].data_ptr() and torch.equal(kept, out["fine"])


def test_prepared_network_is_reused_until_the_weights_change(monkeypatch):
    """The folded channels-last copy is made once per network and weights: a second scan reuses it, and a weight
    changed in place, reloaded weights or another network each give a fresh copy with their own results."""
    import pickle

    import samv2_components.inference.embedder as embedder

    torch.manual_seed(3)
    network = SAMv2Net(width=0.25).eval()
    folds = []
    real_fuse = embedder.fuse_conv_norm
    monkeypatch.setattr(embedder, "fuse_conv_norm", lambda n: folds.append(n) or real_fuse(n))
    inferer = SAMv2Inferer(bf16=False, max_tile_voxels=None, output_dtype="float32")
    image = smooth_volume((16, 32, 32))

    first = inferer(image, network)["fine"]
    second = inferer(image, network)["fine"]
    assert len(folds) == 1 and torch.equal(first, second)

    with torch.no_grad():  # an optimiser step or a manual edit changes a weight in place
        network.heads["fine"].output_conv.weight.mul_(-1.0)
    flipped = inferer(image, network)["fine"]
    assert len(folds) == 2
    assert not torch.allclose(flipped, first, atol=1e-3)  # the stale copy would have given `first` again
    fresh = SAMv2Inferer(bf16=False, max_tile_voxels=None, output_dtype="float32")(image, network)["fine"]
    assert torch.equal(flipped, fresh) and len(folds) == 3  # (the fresh inferer folds its own copy)

    other = SAMv2Net(width=0.25).eval()
    other.load_state_dict(network.state_dict())
    assert torch.equal(inferer(image, other)["fine"], fresh) and len(folds) == 4
    network.load_state_dict(SAMv2Net(width=0.25).state_dict())  # copied into the same tensors: versions move
    assert not torch.equal(inferer(image, network)["fine"], fresh) and len(folds) == 5

    # training mode runs the caller's network itself (batch statistics), never a cached copy
    network.train()
    inferer(image, network)
    assert len(folds) == 5

    # the inferer stays picklable (bundle workers, MONAI Label) and its copy starts empty
    restored = pickle.loads(pickle.dumps(inferer))
    assert restored._prepared is None and inferer._prepared is not None
