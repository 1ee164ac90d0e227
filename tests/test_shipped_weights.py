"""The weights shipped in every bundle have not collapsed: embeddings of different voxels of a real scan differ.

A contrastive embedding can fall into the trivial solution where every voxel gets (almost) the same vector: the
InfoNCE loss then sits at ``log(1 + n_negatives)`` (6.22 for 500 negatives) and matching returns random points
with high scores. An earlier AggSAM model did exactly that under the aggressive intensity augmentation (fine head:
mean cosine 0.996 between random voxels). This test embeds the shipped CT and MR phantom samples with each
bundle's weights and checks the appearance heads' (fine, coarse) mean pairwise cosine between random voxels of the
body. The semantic head is left out on purpose: it is trained to give one organ one embedding, and the phantom is
mostly one tissue (0.78 on the MR with healthy weights).
"""

from __future__ import annotations

import os

import pytest
import torch

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
BUNDLES = ("semantic_sam", "samv2_matching", "crosssam_registration")
MAX_MEAN_COSINE = 0.6  # healthy appearance heads measure 0.02-0.45 here; a collapsed head ~1.0
APPEARANCE_HEADS = ("fine", "coarse")


@pytest.mark.parametrize("bundle", BUNDLES)
def test_shipped_heads_are_not_collapsed(bundle):
    from monai.bundle import ConfigParser

    from samv2_components.networks.weights import load_weights
    from samv2_components.registration import body_mask
    from samv2_components.sample_data import sample_path

    model = os.path.join(ROOT, "bundles", bundle, "models", "model.pt")
    if not os.path.isfile(model):
        pytest.skip(f"{model} not shipped")
    parser = ConfigParser()
    parser.read_config(os.path.join(ROOT, "bundles", "crosssam_registration", "configs", "inference.json"))
    parser["bundle_root"] = os.path.join(ROOT, "bundles", "crosssam_registration")
    preprocessing, inferer = parser.get_parsed_content("preprocessing"), parser.get_parsed_content("inferer")
    network = parser.get_parsed_content("network_def").eval()
    load_weights(network, model)
    generator = torch.Generator().manual_seed(0)
    for sample, modality in (("phantom_ct", "ct"), ("phantom_mr", "mr")):
        image = preprocessing({"image": sample_path(sample), "modality": modality})["image"]
        with torch.no_grad():
            heads = inferer(image[None], network)
        body = body_mask(image)[None, None].float()
        for name in APPEARANCE_HEADS:
            emb = heads[name]
            inside = torch.nn.functional.interpolate(body, size=emb.shape[2:], mode="nearest")[0, 0] > 0
            vectors = emb[0].permute(1, 2, 3, 0)[inside]
            pick = vectors[torch.randperm(len(vectors), generator=generator)[:1500]]
            mean_cos = float((pick @ pick.T).mean())
            assert mean_cos < MAX_MEAN_COSINE, f"{bundle} {name} head on {sample}: mean cosine {mean_cos:.3f} (collapsed)"
