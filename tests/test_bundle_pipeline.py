"""The one "bundle config -> preprocessing, network with weights, inferer, embeddings" helper
(:mod:`samv2_components.inference.bundle_pipeline`) that the scripts, the benchmarks and CrossSAM's rounds use."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from samv2_components.inference import BundlePipeline, CachedEmbeddingInferer, SAMv2Inferer, read_bundle_config, section_settings
from samv2_components.networks import INPUT_DIVISOR, SAMv2Net
from samv2_components.networks.weights import load_weights
from samv2_components.sample_data import sample_path

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
BUNDLES = os.path.join(ROOT, "bundles")


def test_read_bundle_config_sets_the_root_and_overrides():
    root = os.path.join(BUNDLES, "samv2_matching")
    parser = read_bundle_config(root, overrides={"network_def#width": 0.5, "matcher#top_k": 3})
    assert parser["bundle_root"] == root
    assert parser["network_def"]["width"] == 0.5
    settings = section_settings(parser, "matcher")
    assert "_target_" not in settings and settings["top_k"] == 3
    assert "top_k" not in section_settings(parser, "matcher", exclude=("top_k",))
    # several files merge in order, relative names are looked up in <bundle>/configs
    root = os.path.join(BUNDLES, "crosssam_registration")
    merged = read_bundle_config(root, ["train.json", os.path.join(root, "configs", "crosssam_round.json")])
    assert "cross_prob" in merged and merged["bundle_root"] == root


def test_embeds_like_the_bundle_parts_by_hand():
    """A given (random) network, no weights loaded: the pipeline's heads equal preprocessing + inferer by hand."""
    root = os.path.join(BUNDLES, "semantic_sam")
    torch.manual_seed(0)
    net = SAMv2Net(width=0.25)
    reference = {k: v.clone() for k, v in net.state_dict().items()}
    pipe = BundlePipeline(root, network=net)
    assert pipe.ckpt is None and pipe.network is net and not pipe.network.training
    assert all(torch.equal(v, reference[k]) for k, v in pipe.network.state_dict().items())  # no weights loaded
    assert isinstance(pipe.inferer, SAMv2Inferer) and pipe.inferer_key == "inferer"
    path = sample_path("ct_abdomen")
    heads = pipe.embed(path, "ct")
    assert set(heads) == {"fine", "coarse", "semantic"}
    parser = read_bundle_config(root)
    image = parser.get_parsed_content("preprocessing")({"image": path, "modality": "ct"})["image"]
    by_hand = parser.get_parsed_content("inferer")(image[None], net)
    for name, head in heads.items():
        assert head.shape == by_hand[name].shape[1:] and head.shape[0] == 128
        torch.testing.assert_close(head.as_tensor(), by_hand[name][0].as_tensor())
        np.testing.assert_allclose(np.asarray(head.affine), np.asarray(by_hand[name][0].affine))


def test_config_network_gets_the_bundle_weights_and_overrides():
    root = os.path.join(BUNDLES, "samv2_matching")
    pipe = BundlePipeline(root)
    assert pipe.ckpt == os.path.join(root, "models", "model.pt")
    assert pipe.inferer_key == "embedding_inferer" and isinstance(pipe.inferer, SAMv2Inferer)
    assert not isinstance(pipe.inferer, CachedEmbeddingInferer)
    shipped = SAMv2Net(width=0.25)
    load_weights(shipped, pipe.ckpt)
    assert all(torch.equal(v, shipped.state_dict()[k]) for k, v in pipe.network.state_dict().items())
    assert pipe.parsed("refiner") is pipe.parsed("refiner")  # cached by the parser
    assert pipe.settings("matcher")["method"] == "fixed_point"
    wider = BundlePipeline(root, ckpt=None, overrides={"network_def#width": 0.5, "ckpt_path": os.path.join(ROOT, "no_such_model.pt")},
                           network=SAMv2Net(width=0.5))
    assert wider.ckpt is None  # a given network without ckpt: nothing loaded, the config's ckpt_path unused
    with pytest.raises(Exception):
        BundlePipeline(root, overrides={"ckpt_path": os.path.join(ROOT, "no_such_model.pt")})


def test_drop_preprocessing_leaves_out_the_padding():
    root = os.path.join(BUNDLES, "crosssam_registration")
    padded = BundlePipeline(root, network=SAMv2Net(width=0.25))
    unpadded = BundlePipeline(root, network=SAMv2Net(width=0.25), drop_preprocessing=("DivisiblePadd",))
    a = padded.preprocess(sample_path("phantom_mr"), "mr")
    b = unpadded.preprocess(sample_path("phantom_mr"), "mr")
    assert tuple(a.shape) != tuple(b.shape)
    divisor = INPUT_DIVISOR
    assert all(n % k == 0 for n, k in zip(a.shape[1:], divisor)) and any(n % k for n, k in zip(b.shape[1:], divisor))
    assert all(x >= y for x, y in zip(a.shape[1:], b.shape[1:]))
