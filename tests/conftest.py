"""Fixtures shared by several test modules (plain helpers are in ``helpers.py``; test modules import neither
conftest nor each other).

* ``embedded``: a small real CT crop and an exactly translated copy, embedded by one random width-0.25 network
  through the semantic_sam bundle's preprocessing and inferer (module scope: built once per module that uses it).
  Matching identities (a scan against itself or an exact translation of itself) hold for any weights.
"""

from __future__ import annotations

import os

import pytest
import torch
from monai.bundle import ConfigParser

from helpers import ROOT, SHIFT_LPS, save_crop
from samv2_components.networks import SAMv2Net

SEMANTIC_SAM_INFERENCE = os.path.join(ROOT, "bundles", "semantic_sam", "configs", "inference.json")


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """Template crop, its translated copy (by ``helpers.SHIFT_LPS``), both embedded by one random width-0.25
    network through the bundle: ``{"template", "shifted": heads, "template_path", "shifted_path": str}``."""
    tmp = tmp_path_factory.mktemp("crops")
    parser = ConfigParser()
    parser.read_config(SEMANTIC_SAM_INFERENCE)
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
