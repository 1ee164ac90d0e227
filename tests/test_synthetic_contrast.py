"""Tests of synthetic contrast from label maps (:mod:`samv2_components.transforms.synthetic_contrast`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from samv2_components.transforms.synthetic_contrast import ORGAN_OFFSET, RandSynthContrastd, TissueClassesd


def hu_to_input(hu):
    return (np.asarray(hu, float) + 1024.0) / 4095.0 * 255.0 - 50.0


def test_ct_tissue_classes_follow_hounsfield_bands_and_organs_win():
    hu = torch.tensor([-1000.0, -700.0, -300.0, -100.0, 40.0, 150.0, 400.0, 1200.0]).reshape(1, 8, 1, 1)
    image = torch.from_numpy(hu_to_input(hu)).float().expand(1, 8, 2, 2)
    label = torch.zeros(1, 8, 2, 2)
    label[0, 4, 0, 0] = 5  # a liver voxel in soft tissue
    label[0, 5, 0, 0] = 5017  # a per-source class (no common name): stays a tissue class
    classes = TissueClassesd(keys="image")({"image": image, "label": label, "modality": "ct"})["classes"]
    assert classes.dtype == torch.int32
    assert classes[0, :, 1, 1].tolist() == [0, 1, 2, 3, 4, 5, 6, 7]
    assert int(classes[0, 4, 0, 0]) == ORGAN_OFFSET + 5 and int(classes[0, 5, 0, 0]) == 5


def test_mr_tissue_classes_are_quantiles_inside_the_body():
    rng = np.random.default_rng(0)
    image = torch.full((1, 20, 20, 20), -50.0)
    image[0, 4:16, 4:16, 4:16] = torch.from_numpy(rng.uniform(0, 200, (12, 12, 12))).float()
    classes = TissueClassesd(keys="image", mr_classes=4)({"image": image, "modality": "mr"})["classes"]
    assert int(classes[0, 0, 0, 0]) == 0
    inside = classes[0, 4:16, 4:16, 4:16]
    counts = torch.bincount(inside.reshape(-1).long(), minlength=5)[1:]
    assert counts.min() > 0.2 * inside.numel() / 4  # four roughly equal bands
    order = image[0, 4:16, 4:16, 4:16][inside == 1].max() < image[0, 4:16, 4:16, 4:16][inside == 4].min()
    assert bool(order)


def two_tissue_volume():
    rng = np.random.default_rng(1)
    classes = torch.zeros(1, 16, 32, 32, dtype=torch.int32)
    classes[0, 2:14, 4:28, 4:16], classes[0, 2:14, 4:28, 16:28] = 3, 4  # fat | muscle, air around
    image = torch.where(classes == 3, 10.0, torch.where(classes == 4, 20.0, -50.0)).float()
    image = image + torch.from_numpy(rng.normal(0, 1, image.shape)).float() * (classes > 0)
    return image, classes


def test_synthetic_contrasts_differ_keep_the_anatomy_and_the_range():
    image, classes = two_tissue_volume()
    t = RandSynthContrastd(keys=["a", "b"], class_keys=["ca", "cb"], prob=1.0, bias_coeff=0.0, noise_std=0.0,
                           blur_sigma=0.0, low_resolution_prob=0.0)
    t.set_random_state(3)
    orders = []
    for _ in range(12):
        out = t({"a": image, "b": image, "ca": classes, "cb": classes})
        for key in ("a", "b"):
            x = out[key]
            assert x.shape == image.shape and float(x.min()) >= -50.0 and float(x.max()) <= 205.0
            air, fat, muscle = (x[classes == k] for k in (0, 3, 4))
            assert float(air.max()) <= -40.0  # the air around the body stays dark
            assert abs(float(fat.mean()) - float(muscle.mean())) > 0.5  # the two tissues stay apart
            orders.append(float(fat.mean()) > float(muscle.mean()))
        assert not torch.allclose(out["a"], out["b"])  # independent draws per view
    assert 2 <= sum(orders) <= len(orders) - 2  # contrast order is random: fat sometimes brighter, sometimes darker


def test_synthesis_is_seeded_keeps_metadata_and_respects_prob():
    image, classes = two_tissue_volume()
    meta_image = MetaTensor(image, affine=torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0])))
    runs = []
    for _ in range(2):
        t = RandSynthContrastd(keys=["a"], class_keys=["ca"], prob=1.0)
        t.set_random_state(7)
        runs.append(t({"a": meta_image, "ca": classes})["a"])
    assert torch.equal(runs[0].as_tensor(), runs[1].as_tensor()) and isinstance(runs[0], MetaTensor)
    assert torch.equal(runs[0].affine, meta_image.affine)
    never = RandSynthContrastd(keys=["a"], class_keys=["ca"], prob=0.0)
    assert never({"a": image, "ca": classes})["a"] is image


@pytest.mark.parametrize(
    "kwargs, key",
    [(dict(prob=1.5), "synth_prob"), (dict(bias_coeff=-0.1), "synth_bias_coeff"), (dict(noise_std=-1.0), "synth_noise_std"),
     (dict(low_resolution_prob=2.0), "synth_low_resolution_prob"), (dict(texture_range=9.0), "synth_texture_range"),
     (dict(blur_sigma=-1.0), "synth_blur_sigma")],
)
def test_out_of_range_settings_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key):
        RandSynthContrastd(**kwargs)
