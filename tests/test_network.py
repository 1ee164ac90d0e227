"""SAMv2Net: shapes and grids, normalisation, head switches, width, the single-tensor descriptor, Zoo tooling."""

import json
import os

import pytest
import torch

from samv2_components.networks import HEAD_GRIDS, SAMv2Net, upsample_to_fine_grid

BUNDLE = os.path.join(os.path.dirname(__file__), "..", "bundles", "semantic_sam")


@pytest.fixture(scope="module")
def small_net():
    torch.manual_seed(0)
    return SAMv2Net(width=0.25).eval()


@pytest.mark.parametrize("size", [(32, 96, 96), (8, 32, 48)])
def test_head_shapes_follow_grids(small_net, size):
    with torch.no_grad():
        heads = small_net.forward_heads(torch.randn(2, 1, *size))
    assert set(heads) == {"fine", "coarse", "semantic"}
    for name, emb in heads.items():
        stride = HEAD_GRIDS[name][0]
        assert emb.shape == (2, 128, *[s // st for s, st in zip(size, stride)])
        # every voxel's embedding is unit length
        torch.testing.assert_close(emb.norm(dim=1), torch.ones_like(emb[:, 0]), atol=1e-5, rtol=0)


def test_published_architecture_size():
    net = SAMv2Net(width=1.0)
    n_params = sum(p.numel() for p in net.parameters())
    assert 33.0e6 < n_params < 33.6e6  # "about 33 M parameters" of the reference network
    assert len(net.state_dict()) == 146  # the upstream SAMv2 checkpoint has 146 tensors
    assert len(SAMv2Net(width=1.0, heads=("fine", "coarse")).state_dict()) == 138
    light = SAMv2Net(width=0.5)
    assert sum(p.numel() for p in light.parameters()) < n_params / 3
    assert light.out_channels == net.out_channels == 384


def test_heads_can_be_switched_off():
    net = SAMv2Net(width=0.25, heads=("coarse", "fine")).eval()
    assert net.head_names == ["fine", "coarse"]  # canonical order whatever the config order
    with torch.no_grad():
        out = net(torch.randn(1, 1, 8, 32, 32))
    assert out.shape == (1, 256, 4, 16, 16)
    for bad in [("coarse",), ("fine", "fine"), ("fine", "deep")]:
        with pytest.raises(ValueError):
            SAMv2Net(heads=bad)


def test_descriptor_gives_mean_cosine_score(small_net):
    x = torch.randn(1, 1, 16, 64, 64)
    with torch.no_grad():
        heads = small_net.forward_heads(x)
        desc = small_net(x)
    torch.testing.assert_close(desc[:, :128], heads["fine"])
    torch.testing.assert_close(desc[:, 256:], heads["semantic"])
    # descriptor dot product / number of heads == mean of the per-head cosines
    a, b = desc[0, :, 1, 2, 3], desc[0, :, 5, 6, 7]
    coarse_up = torch.nn.functional.normalize(
        upsample_to_fine_grid(heads["coarse"], list(heads["fine"].shape[2:]), small_net.coarse_to_fine_ratios), dim=1
    )[0]
    per_head = [
        heads["fine"][0, :, 1, 2, 3] @ heads["fine"][0, :, 5, 6, 7],
        coarse_up[:, 1, 2, 3] @ coarse_up[:, 5, 6, 7],
        heads["semantic"][0, :, 1, 2, 3] @ heads["semantic"][0, :, 5, 6, 7],
    ]
    torch.testing.assert_close((a @ b) / 3, sum(per_head) / 3)


def test_coarse_upsampling_matches_voxel_centres():
    """A coarse map holding each voxel's own position (in input voxels) must resample to the fine positions."""
    coarse_size, fine_size = (4, 3, 5), [8, 24, 40]
    (fs, fo), (cs, co) = HEAD_GRIDS["fine"], HEAD_GRIDS["coarse"]
    assert fo == co  # the offsets cancel, only the strides matter
    ramps = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) * s for n, s in zip(coarse_size, cs)], indexing="ij")
    coarse = torch.stack(ramps)[None]
    ratios = [f / c for f, c in zip(fs, cs)]
    up = upsample_to_fine_grid(coarse, fine_size, ratios)[0]
    for axis in range(3):
        expected = torch.arange(fine_size[axis], dtype=torch.float32) * fs[axis]
        last = (coarse_size[axis] - 1) * cs[axis]  # beyond the last coarse centre the border value is kept
        line = up[axis].movedim(axis, 0)[:, 0, 0]
        torch.testing.assert_close(line, expected.clamp(max=last))


def test_torchscript_matches_eager(small_net):
    x = torch.randn(1, 1, 8, 32, 32)
    scripted = torch.jit.script(small_net)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), small_net(x))
        sam_v1 = SAMv2Net(width=0.25, heads=("fine", "coarse")).eval()
        torch.testing.assert_close(torch.jit.script(sam_v1)(x), sam_v1(x))


def _config_and_meta():
    return os.path.join(BUNDLE, "configs", "inference.json"), os.path.join(BUNDLE, "configs", "metadata.json")


def test_verify_net_in_out_with_bundle_config():
    from monai.bundle import verify_net_in_out

    config, meta = _config_and_meta()
    # checks one tensor in and out, with out.shape[1] equal to the declared 384 channels
    verify_net_in_out(net_id="network_def", meta_file=meta, config_file=config, n=1, any=1, device="cpu")
    with open(meta) as f:
        assert json.load(f)["network_data_format"]["outputs"]["pred"]["num_channels"] == 384


def test_ckpt_export_torchscript_equals_eager(tmp_path):
    from monai.bundle import ckpt_export

    config, meta = _config_and_meta()
    torch.manual_seed(1)
    net = SAMv2Net(width=0.5).eval()
    ckpt = tmp_path / "model.pt"
    torch.save(net.state_dict(), ckpt)
    ts_path = tmp_path / "model.ts"
    ckpt_export(
        net_id="network_def",
        filepath=str(ts_path),
        ckpt_file=str(ckpt),
        meta_file=meta,
        config_file=config,
        **{"network_def#width": 0.5},
    )
    exported = torch.jit.load(str(ts_path))
    x = torch.randn(1, 1, 8, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), net(x))


def test_fused_inference_copy_matches_and_leaves_original_alone():
    from samv2_components.networks import fuse_conv_norm

    torch.manual_seed(3)
    net = SAMv2Net(width=0.25)
    for m in net.modules():  # non-trivial running statistics so that folding them matters
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    net.eval()
    keys = list(net.state_dict())
    fused = fuse_conv_norm(net)
    x = torch.randn(1, 1, 8, 32, 32)
    with torch.no_grad():
        for name, emb in net.forward_heads(x).items():
            torch.testing.assert_close(fused.forward_heads(x)[name], emb, atol=1e-4, rtol=1e-4)
    assert list(net.state_dict()) == keys  # the original still loads bundle checkpoints
    assert not any(isinstance(m, torch.nn.BatchNorm3d) for m in fused.modules())


def test_fpn_head_is_the_top_down_pyramid(small_net):
    """The head adds each coarser level, upsampled (nearest), to the next finer lateral, then the output conv."""
    head = small_net.heads["fine"]
    g = torch.Generator().manual_seed(1)
    features = [torch.randn(1, c, *s, generator=g) for c, s in zip([16, 32, 64], [(8, 16, 16), (4, 8, 8), (2, 4, 4)])]
    with torch.no_grad():
        laterals = [conv(f) for conv, f in zip(head.lateral_convs, features)]
        top = laterals[2]
        for level in (1, 0):
            top = laterals[level] + torch.nn.functional.interpolate(top, size=laterals[level].shape[2:], mode="nearest")
        expected = torch.nn.functional.normalize(head.output_conv(top), dim=1)
        assert torch.allclose(head(features), expected, atol=1e-6)


@pytest.mark.parametrize("depth", [8, 9])
def test_depth_max_pool_is_the_2x1x1_max_pool(depth):
    """Values and layout of ``nn.MaxPool3d((2, 1, 1))`` (an odd last slice dropped); its gradient too where the two
    slices of a pair differ (random values: no ties)."""
    from samv2_components.networks.samv2_net import depth_max_pool

    x = torch.randn(2, 3, depth, 5, 6).contiguous(memory_format=torch.channels_last_3d).requires_grad_(True)
    pooled = depth_max_pool(x)
    expected = torch.nn.MaxPool3d((2, 1, 1), (2, 1, 1))(x)
    assert pooled.shape == (2, 3, depth // 2, 5, 6) and torch.equal(pooled, expected)
    assert pooled.is_contiguous(memory_format=torch.channels_last_3d)
    weights = torch.randn_like(pooled)
    (grad,) = torch.autograd.grad((pooled * weights).sum(), x)
    (grad_expected,) = torch.autograd.grad((expected * weights).sum(), x)
    assert torch.equal(grad, grad_expected)
    if depth % 2:
        assert torch.count_nonzero(grad[:, :, -1]) == 0  # the dropped slice
