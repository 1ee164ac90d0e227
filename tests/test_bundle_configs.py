"""The two training configs (Semantic-SAM and CrossSAM's AggSAM) are one recipe with a few deliberate differences.

A bundle must stand alone (a user downloads one), so the shared settings cannot live in a common file that both
load; this test keeps them equal instead: any change to one train.json must be made to the other, or be added to
the list of intended differences below with its reason.
"""

from __future__ import annotations

import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEMANTIC = os.path.join(ROOT, "bundles", "semantic_sam", "configs", "train.json")
AGGSAM = os.path.join(ROOT, "bundles", "crosssam_registration", "configs", "train.json")

#: keys whose values differ on purpose, and why
INTENDED_DIFFERENCES = {
    "bundle_root": "each bundle resolves its own folder",
    "output_dir": "runs/train vs runs/aggsam",
    "pair_sampler": "AggSAM adds the aggressive intensity augmentation, a wider scale range and more blur",
    "rotate_degrees": "AggSAM views rotate by up to 15 degrees (Semantic-SAM: 5)",
    "isotropic_scale": "AggSAM keeps the reference's isotropic scales; Semantic-SAM draws one per axis",
    "deform_prob": "subject-variation deformation is part of the Semantic-SAM recipe only",
    "synth_prob": "synthetic-contrast views are AggSAM's (cross-modal); Semantic-SAM is single-modality and uses synthetic "
    "contrast only for its semantic crops (semantic_synth_prob)",
}
#: keys only the AggSAM config has
AGGSAM_ONLY = {"scale_range", "blur_prob", "aggressive_intensity"}


def load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def test_train_configs_share_every_setting_but_the_intended_differences():
    semantic, aggsam = load(SEMANTIC), load(AGGSAM)
    assert set(aggsam) - set(semantic) == AGGSAM_ONLY
    assert set(semantic) - set(aggsam) == set()
    differing = {k for k in semantic if semantic[k] != aggsam[k]}
    assert differing == set(INTENDED_DIFFERENCES), sorted(differing ^ set(INTENDED_DIFFERENCES))
    # even the differing pair samplers agree on everything but the AggSAM additions
    extra = {"scale_range", "blur_prob", "intensity_augmentation"}
    assert {k: v for k, v in aggsam["pair_sampler"].items() if k not in extra} == semantic["pair_sampler"]


def test_train_configs_build_their_parts_as_config_components():
    """Transforms and losses are `_target_` entries, so `--key#sub value` overrides reach them."""
    for path in (SEMANTIC, AGGSAM):
        config = load(path)
        for key in ("pair_sampler", "synth_contrast", "pair_keys", "prototype_loss", "fine_loss", "coarse_loss"):
            assert "_target_" in config[key], (path, key)
        assert all("_target_" in t for t in config["semantic_crop"]), path
        for key in ("train_transforms", "semantic_transforms"):
            assert "(" not in config[key]["transforms"], (path, key)  # references only, no inline constructors


def test_every_bundle_declares_the_package_its_configs_import():
    """A user who downloads one bundle learns from its metadata which package (and version) its configs need."""
    import configparser

    setup = configparser.ConfigParser()
    setup.read(os.path.join(ROOT, "setup.cfg"))
    name, version = setup["metadata"]["name"], setup["metadata"]["version"]
    for bundle in ("semantic_sam", "samv2_matching", "crosssam_registration"):
        folder = os.path.join(ROOT, "bundles", bundle, "configs")
        configs = [load(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".json") and f != "metadata.json"]
        assert any("samv2_components" in json.dumps(c) for c in configs)
        assert load(os.path.join(folder, "metadata.json"))["required_packages_version"][name] == version, bundle


def _literal_settings(entry: dict) -> dict:
    return {k: v for k, v in entry.items() if not k.startswith("_") and not (isinstance(v, str) and v[:1] in "@$")}


def test_class_defaults_are_the_shipped_bundle_settings():
    """Who builds a matcher, refiner or AdaReg in Python gets what the bundles ship (no silent second recipe)."""
    import inspect

    from samv2_components.matching import SAMv2Matcher
    from samv2_components.matching.patch_affine import AffineLevel
    from samv2_components.matching.refinement import LocalIntensityRefiner
    from samv2_components.registration import AdaReg, IntensityRefiner, IntensityTiltSearch, IntensityTurnSearch, SAMv2RigidPipeline
    from samv2_components.registration.translation_search import TranslationSearch

    def normal(value):
        if isinstance(value, (list, tuple)):
            if value and isinstance(value[0], (dict, AffineLevel)):
                return [AffineLevel.from_config(v) for v in value]
            return [normal(v) for v in value]
        return value

    matching = load(os.path.join(ROOT, "bundles", "samv2_matching", "configs", "inference.json"))
    registration = load(os.path.join(ROOT, "bundles", "crosssam_registration", "configs", "inference.json"))
    checked = 0
    # AdaReg matches its grid points by plain nearest neighbour (the paper's AdaReg) and fits its own robust rigid
    # transform to them, without the matching bundle's global check: choices of that bundle
    registration_matcher = {k: v for k, v in registration["matcher"].items() if k not in ("method", "global_consistency")}
    assert registration["matcher"]["global_consistency"] is False
    for cls, entry in ((SAMv2Matcher, matching["matcher"]), (LocalIntensityRefiner, matching["refiner"]),
                       (SAMv2Matcher, registration_matcher), (AdaReg, registration["adareg"]),
                       # the samv2 pipeline (the registration default) and its intensity refinement
                       (SAMv2RigidPipeline, {k: v for k, v in registration["samv2_pipeline"].items()
                                             if k not in ("refinement", "turn_search", "tilt_search", "translation_search")}),
                       (IntensityRefiner, registration["samv2_pipeline"]["refinement"]),
                       (IntensityTurnSearch, registration["samv2_pipeline"]["turn_search"]),
                       # the tilt search: its lattice, and the turn search's coarse ranking settings it inherits
                       (IntensityTiltSearch, {k: registration["samv2_pipeline"]["tilt_search"][k] for k in ("step_deg", "max_deg")}),
                       (IntensityTurnSearch, {k: v for k, v in registration["samv2_pipeline"]["tilt_search"].items()
                                              if k not in ("step_deg", "max_deg")}),
                       (TranslationSearch, registration["samv2_pipeline"]["translation_search"])):
        parameters = inspect.signature(cls.__init__).parameters
        for key, value in _literal_settings(entry).items():
            if key == "global_map_kwargs":  # None in the class: estimate_global_map's own defaults, written out
                from samv2_components.matching.global_map import estimate_global_map

                defaults = inspect.signature(estimate_global_map).parameters
                assert parameters[key].default is None and value == {k: normal(defaults[k].default) for k in value}
                assert set(value) == set(defaults) - {"template", "query"}
                continue
            assert normal(parameters[key].default) == normal(value), f"{cls.__name__}.{key}: {parameters[key].default!r} vs {value!r}"
            checked += 1
    assert checked >= 35
    assert registration["pipeline"] == "samv2"  # the new pipeline is what the bundle runs
