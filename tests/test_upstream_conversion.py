"""Tests of the upstream (mmcv) checkpoint conversion and of :func:`load_weights`.

The published checkpoints (ModelScope ``viggin/Self-supervised_Anatomical_Embeddings``) cannot be downloaded
here, so the tests build synthetic checkpoints with the exact upstream layout, written out in ``helpers.py`` from
the reference implementation's description (``docs/design.md`` section 2), *not* derived from our mapping. An
independent functional forward pass of the upstream architecture, reading the upstream-named tensors, checks
that the converted :class:`SAMv2Net` computes the same embeddings.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from samv2_components.errors import CheckpointError
from samv2_components.networks.samv2_net import SAMv2Net
from samv2_components.networks.upstream import (
    UPSTREAM_KEY_RULES,
    convert_upstream_checkpoint,
    convert_upstream_state_dict,
    load_upstream_checkpoint,
    samv2_to_upstream_key,
    upstream_to_samv2_key,
)
from samv2_components.networks.weights import check_state_dict, infer_network_kwargs, load_weights

from helpers import UPSTREAM_LAYERS, random_upstream_state_dict, save_mmcv_checkpoint, upstream_shapes

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "convert_upstream.py"


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """The synthetic SAMv2 (``v2``) and SAM v1 (``v1``) checkpoints: state dicts and files."""
    folder = tmp_path_factory.mktemp("upstream")
    out = {}
    for name, semantic in (("v2", True), ("v1", False)):
        state = random_upstream_state_dict(semantic, seed=1 if semantic else 2)
        out[name] = state
        out[name + "_path"] = save_mmcv_checkpoint(state, folder / f"sam_{name}.pth")
    return out


@pytest.fixture(scope="module")
def converted(upstream, tmp_path_factory):
    """Each synthetic checkpoint converted to a bundle ``model.pt``: variant -> (path, network kwargs)."""
    out = {}
    for variant in ("v2", "v1"):
        output = tmp_path_factory.mktemp(f"converted_{variant}") / "models" / "model.pt"
        out[variant] = (output, convert_upstream_checkpoint(upstream[variant + "_path"], output))
    return out


def test_synthetic_checkpoints_have_the_upstream_tensor_counts(upstream):
    assert len(upstream["v2"]) == 146
    assert len(upstream["v1"]) == 138
    assert not any(k.startswith("semantic_head.") for k in upstream["v1"])
    assert upstream["v2"]["backbone.conv1.conv.weight"].shape == (64, 1, 3, 7, 7)
    assert upstream["v2"]["read_out_head.lateral_convs.0.conv.weight"].shape == (128, 512, 1, 1, 1)


# ---------------------------------------------------------------------------------------------------------------
# key mapping and round trip
# ---------------------------------------------------------------------------------------------------------------

# hand-written examples of the mapping (the brief's table), independent of UPSTREAM_KEY_RULES
KNOWN_PAIRS = {
    "backbone.conv1.conv.weight": "encoder.stem.conv.weight",
    "backbone.conv1.bn.running_var": "encoder.stem.norm.running_var",
    "backbone.layer1.0.conv1.conv.weight": "encoder.stages.0.0.conv1.conv.weight",
    "backbone.layer2.1.conv2.bn.num_batches_tracked": "encoder.stages.1.1.conv2.norm.num_batches_tracked",
    "backbone.layer3.0.downsample.bn.running_mean": "encoder.stages.2.0.shortcut.norm.running_mean",
    "backbone.layer4.0.downsample.conv.weight": "encoder.stages.3.0.shortcut.conv.weight",
    "neck.lateral_convs.2.conv.bias": "heads.fine.lateral_convs.2.bias",
    "neck.fpn_convs.0.conv.weight": "heads.fine.output_conv.weight",
    "read_out_head.lateral_convs.0.conv.weight": "heads.coarse.lateral_convs.0.weight",
    "read_out_head.fpn_convs.0.conv.bias": "heads.coarse.output_conv.bias",
    "semantic_head.lateral_convs.0.conv.weight": "heads.semantic.lateral_convs.0.weight",
    "semantic_head.fpn_convs.0.conv.bias": "heads.semantic.output_conv.bias",
}


@pytest.mark.parametrize("upstream_key, ours", sorted(KNOWN_PAIRS.items()))
def test_known_key_pairs(upstream_key, ours):
    assert upstream_to_samv2_key(upstream_key) == ours
    assert samv2_to_upstream_key(ours) == upstream_key


def test_rules_map_every_upstream_key_onto_the_network_keys():
    assert all(isinstance(p, str) and isinstance(r, str) for p, r in UPSTREAM_KEY_RULES)
    for semantic, heads in ((True, ("fine", "coarse", "semantic")), (False, ("fine", "coarse"))):
        shapes = upstream_shapes(semantic)
        mapped = {upstream_to_samv2_key(k): shape for k, shape in shapes.items()}
        network = SAMv2Net(width=1.0, heads=heads)
        assert {k: tuple(v.shape) for k, v in network.state_dict().items()} == mapped
        assert all(samv2_to_upstream_key(upstream_to_samv2_key(k)) == k for k in shapes)
    assert upstream_to_samv2_key("backbone.fc.weight") is None
    assert upstream_to_samv2_key("neck.fpn_convs.1.conv.weight") is None


@pytest.mark.parametrize("variant, heads", [("v2", ("fine", "coarse", "semantic")), ("v1", ("fine", "coarse"))])
def test_round_trip(upstream, converted, variant, heads):
    output, kwargs = converted[variant]
    assert kwargs == {"width": 1.0, "heads": heads, "embedding_dim": 128}
    saved = torch.load(output, map_location="cpu", weights_only=True)  # a plain state dict: safe to load
    assert len(saved) == len(upstream[variant])
    assert infer_network_kwargs(saved) == kwargs
    network = SAMv2Net(**kwargs)
    assert load_weights(network, output) is True
    ours = network.state_dict()
    for key, value in upstream[variant].items():
        mapped = ours[upstream_to_samv2_key(key)]
        assert mapped.dtype == value.dtype, key
        assert torch.equal(mapped, value), key
    assert not [p for p in os.listdir(output.parent) if p != "model.pt"], "temporary file left behind"


def test_wrappers_and_dataparallel_prefix(upstream, tmp_path):
    prefixed = {f"module.{k}": v for k, v in upstream["v1"].items()}
    state, kwargs = convert_upstream_state_dict(prefixed)
    assert kwargs["heads"] == ("fine", "coarse") and len(state) == 138
    # a bare (prefixed) state dict file, and our own weights wrapped as {"model": ...}
    torch.save(prefixed, tmp_path / "bare.pth")
    assert set(load_upstream_checkpoint(tmp_path / "bare.pth")) == set(upstream["v1"])
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "wrapped.pt")
    assert load_weights(SAMv2Net(heads=("fine", "coarse")), tmp_path / "wrapped.pt")


# ---------------------------------------------------------------------------------------------------------------
# same outputs as the upstream architecture, written functionally from the upstream-named tensors
# ---------------------------------------------------------------------------------------------------------------


def upstream_forward(sd: dict[str, torch.Tensor], x: torch.Tensor, semantic: bool) -> dict[str, torch.Tensor]:
    """The upstream network in eval mode: ResNet3d-18 (mmaction/mmcv) + FPN3d necks, L2-normalised heads."""

    def conv_bn(x, prefix, stride, padding, relu):
        x = F.conv3d(x, sd[f"{prefix}.conv.weight"], None, stride=stride, padding=padding)
        x = F.batch_norm(
            x,
            sd[f"{prefix}.bn.running_mean"],
            sd[f"{prefix}.bn.running_var"],
            sd[f"{prefix}.bn.weight"],
            sd[f"{prefix}.bn.bias"],
            training=False,
            eps=1e-5,
        )
        return F.relu(x) if relu else x

    x = conv_bn(x, "backbone.conv1", (1, 1, 1), (1, 3, 3), relu=True)  # stem, no max-pool (with_pool1=False)
    features = []
    for layer, _, _, kernel, stride in UPSTREAM_LAYERS:
        padding = tuple(k // 2 for k in kernel)
        for block in (0, 1):
            prefix = f"backbone.layer{layer}.{block}"
            s = stride if block == 0 else (1, 1, 1)
            out = conv_bn(x, f"{prefix}.conv1", s, padding, relu=True)
            out = conv_bn(out, f"{prefix}.conv2", (1, 1, 1), padding, relu=False)
            identity = conv_bn(x, f"{prefix}.downsample", s, 0, relu=False) if block == 0 else x
            x = F.relu(out + identity)
        if layer == 1:
            x = F.max_pool3d(x, kernel_size=(2, 1, 1), stride=(2, 1, 1))  # pool2
        features.append(x)

    def fpn(neck, inputs):
        laterals = [
            F.conv3d(f, sd[f"{neck}.lateral_convs.{i}.conv.weight"], sd[f"{neck}.lateral_convs.{i}.conv.bias"])
            for i, f in enumerate(inputs)
        ]
        for i in range(len(laterals) - 1, 0, -1):
            top_down = F.interpolate(laterals[i], size=laterals[i - 1].shape[2:], mode="nearest")
            laterals[i - 1] = laterals[i - 1] + top_down
        weight, bias = sd[f"{neck}.fpn_convs.0.conv.weight"], sd[f"{neck}.fpn_convs.0.conv.bias"]
        out = F.conv3d(laterals[0], weight, bias, padding=1)
        return F.normalize(out, dim=1)

    heads = {"fine": fpn("neck", features[:3]), "coarse": fpn("read_out_head", features[3:])}
    if semantic:
        heads["semantic"] = fpn("semantic_head", features[:3])
    return heads


def test_converted_network_matches_the_upstream_architecture(upstream, converted):
    output, kwargs = converted["v2"]
    network = SAMv2Net(**kwargs).eval()
    load_weights(network, output)
    x = torch.randn(1, 1, 8, 32, 32, generator=torch.Generator().manual_seed(3)) * 50.0
    with torch.no_grad():
        ours = network.forward_heads(x)
        reference = upstream_forward(upstream["v2"], x, semantic=True)
    assert set(ours) == set(reference) == {"fine", "coarse", "semantic"}
    assert reference["fine"].shape == (1, 128, 4, 16, 16)
    assert reference["coarse"].shape == (1, 128, 2, 2, 2)
    for name in reference:
        assert ours[name].shape == reference[name].shape, name
        assert (ours[name] - reference[name]).abs().max().item() < 1e-4, name
    # the heads differ from each other (the test would be vacuous with identical heads)
    assert (ours["fine"] - ours["semantic"]).abs().max().item() > 0.1


# ---------------------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------------------


def test_missing_key_is_named(upstream):
    state = dict(upstream["v2"])
    del state["backbone.layer2.0.conv1.bn.running_var"]
    with pytest.raises(CheckpointError, match=r"missing keys: backbone\.layer2\.0\.conv1\.bn\.running_var") as info:
        convert_upstream_state_dict(state, "x.pth")
    assert str(info.value).startswith("x.pth: ") and "\n" not in str(info.value)


def test_extra_key_is_named(upstream):
    state = dict(upstream["v2"])
    state["backbone.fc.weight"] = torch.zeros(10, 512)
    with pytest.raises(CheckpointError, match=r"backbone\.fc\.weight"):
        convert_upstream_state_dict(state, "x.pth")
    # an extra key that a rule maps but the network lacks (a third block in layer 1)
    state = dict(upstream["v2"])
    state["backbone.layer1.2.conv1.conv.weight"] = torch.zeros(64, 64, 1, 3, 3)
    with pytest.raises(CheckpointError, match=r"unexpected keys: encoder\.stages\.0\.2\.conv1\.conv\.weight"):
        convert_upstream_state_dict(state, "x.pth")


def test_wrong_shape_is_named(upstream):
    state = dict(upstream["v2"])
    state["backbone.layer3.1.conv2.conv.weight"] = torch.zeros(256, 256, 1, 3, 3)
    with pytest.raises(CheckpointError) as info:
        convert_upstream_state_dict(state, "x.pth")
    assert (
        "wrong shapes: backbone.layer3.1.conv2.conv.weight (checkpoint (256,256,1,3,3) vs network (256,256,3,3,3))"
        in str(info.value)
    )


def test_many_problems_are_capped(upstream):
    state = {k: v for k, v in upstream["v2"].items() if not k.startswith("backbone.layer4.")}
    with pytest.raises(CheckpointError, match=r"\(\+\d+ more\)") as info:
        convert_upstream_state_dict(state, "x.pth")
    assert "\n" not in str(info.value)


def test_sam_v1_into_three_head_network(converted):
    output, _ = converted["v1"]
    with pytest.raises(CheckpointError) as info:
        load_weights(SAMv2Net(), output)
    message = str(info.value)
    assert message.startswith(f"{output}: does not fit the network (width=1.0, heads=(fine, coarse, semantic))")
    assert "missing keys: heads.semantic.lateral_convs.0.weight" in message
    assert "heads.semantic.output_conv.bias" in message
    assert "the checkpoint looks like width=1.0, heads=(fine, coarse): set network_def#heads" in message
    assert "\n" not in message


def test_width_hint():
    small = SAMv2Net(width=0.25, heads=("fine", "coarse")).state_dict()
    assert infer_network_kwargs(small) == {"width": 0.25, "heads": ("fine", "coarse"), "embedding_dim": 128}
    with pytest.raises(CheckpointError) as info:
        check_state_dict(SAMv2Net(width=0.5), small, "model.pt")
    message = str(info.value)
    assert "wrong shapes: encoder.stem.conv.weight (checkpoint (16,1,3,7,7) vs network (32,1,3,7,7))" in message
    hint = "the checkpoint looks like width=0.25, heads=(fine, coarse): set network_def#width / network_def#heads"
    assert hint in message


def test_requested_width_or_heads_must_match(upstream, tmp_path):
    output = tmp_path / "model.pt"
    with pytest.raises(CheckpointError, match="width=1.0.*requested width=0.5"):
        convert_upstream_checkpoint(upstream["v1_path"], output, width=0.5)
    with pytest.raises(CheckpointError, match="no semantic head"):
        convert_upstream_checkpoint(upstream["v1_path"], output, heads="['fine','coarse','semantic']")
    assert not output.exists()
    assert convert_upstream_checkpoint(upstream["v1_path"], output, width=1, heads=["coarse", "fine"])["width"] == 1.0


def test_unconverted_upstream_checkpoint_in_load_weights(upstream, tmp_path):
    # with numpy objects in its meta: refused by the safe loader
    with pytest.raises(CheckpointError, match="convert it with scripts/convert_upstream.py") as info:
        load_weights(SAMv2Net(), upstream["v2_path"])
    assert str(info.value).startswith(str(upstream["v2_path"]))
    assert "\n" not in str(info.value) and "\x1b" not in str(info.value)
    # with plain metadata: read, then recognised by its key names
    plain = tmp_path / "plain_meta.pth"
    torch.save({"meta": {"iter": 1}, "state_dict": upstream["v1"]}, plain)
    with pytest.raises(CheckpointError, match="upstream .mmcv. SAM/SAMv2 checkpoint: convert it first"):
        load_weights(SAMv2Net(), plain)


def test_unreadable_file(tmp_path):
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read as a PyTorch checkpoint"):
        load_weights(SAMv2Net(width=0.25), bad)
    with pytest.raises(CheckpointError, match="cannot be read as a PyTorch checkpoint"):
        load_upstream_checkpoint(bad)


def test_missing_weights_file(tmp_path, caplog):
    network = SAMv2Net(width=0.25)
    missing = tmp_path / "models" / "model.pt"
    with caplog.at_level(logging.WARNING, logger="samv2_components"):
        assert load_weights(network, missing, missing_ok=True) is False
    assert any("RANDOM weights" in r.getMessage() and r.name == "samv2_components" for r in caplog.records)
    with pytest.raises(CheckpointError, match="file not found") as info:
        load_weights(network, missing)
    assert str(info.value).startswith(str(missing))


# ---------------------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------------------


def run_script(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, encoding="utf-8", errors="replace", cwd=REPO, env=env, timeout=120
    )


def test_cli_converts(upstream, tmp_path):
    output = tmp_path / "bundle" / "models" / "model.pt"
    result = run_script("--checkpoint", str(upstream["v1_path"]), "--output", str(output))
    assert result.returncode == 0, result.stderr
    assert "--network_def#width 1.0" in result.stdout
    assert "--network_def#heads \"['fine','coarse']\"" in result.stdout
    assert load_weights(SAMv2Net(heads=("fine", "coarse")), output)


@pytest.mark.parametrize("content", ["garbage", "not_sam"])
@pytest.mark.slow
def test_cli_reports_bad_checkpoint(tmp_path, content):
    bad = tmp_path / "bad.pth"
    if content == "garbage":
        bad.write_bytes(b"\x00not a checkpoint")
    else:
        torch.save({"meta": {}, "state_dict": {"encoder.weight": torch.zeros(3)}}, bad)
    output = tmp_path / "out" / "model.pt"
    result = run_script("--checkpoint", str(bad), "--output", str(output))
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ERROR:") and str(bad) in last
    assert "Traceback" not in result.stderr
    assert not output.exists()
