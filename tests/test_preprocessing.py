"""Tests of the bundle's preprocessing (``bundles/semantic_sam/configs/inference.json#preprocessing``).

The Compose is built from the bundle config itself, so these tests check what the bundle runs: geometry against
a known transform (a ball at a known LPS world point in an oblique, flipped, anisotropic scan), the reference
intensity mapping (design notes §2, `docs/design.md`), and how the modality is chosen.
"""

from __future__ import annotations

import logging
from pathlib import Path

import itk
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import Compose

from samv2_components.errors import SAMv2InputError, find_samv2_error
from samv2_components.geometry import convert_affine, voxel_to_world
from samv2_components.transforms import NormalizeIntensityByModalityd

CONFIG = Path(__file__).resolve().parents[1] / "bundles" / "semantic_sam" / "configs" / "inference.json"
DIVISOR = (4, 16, 16)
PAD_VALUE = -50.0

# the synthetic scan: ITK (x, y, z) size, spacing (mm), a 20 degree rotation about x plus a flip of y
SIZE = (60, 70, 28)
SPACING = np.array([1.5, 1.2, 3.0])
_a = np.deg2rad(20.0)
DIRECTION = np.array([[1, 0, 0], [0, np.cos(_a), -np.sin(_a)], [0, np.sin(_a), np.cos(_a)]]) @ np.diag([1, -1, 1])
BALL_CENTRE_LPS = np.array([30.0, -20.0, 15.0])
BALL_RADIUS = 12.0
BALL_INDEX = np.array([31.3, 33.6, 13.45])  # continuous ITK index of the ball centre (not on a voxel centre)
ORIGIN = BALL_CENTRE_LPS - DIRECTION @ (SPACING * BALL_INDEX)


def reference_ct(hu) -> np.ndarray:
    """design notes §2: clip to [-1024, 3071] HU, map linearly to [0, 255], subtract 50."""
    hu = np.asarray(hu, dtype=np.float64)
    return (np.clip(hu, -1024.0, 3071.0) + 1024.0) / 4095.0 * 255.0 - 50.0


def reference_mr(x) -> np.ndarray:
    """design notes §2: clip to the 0.2 / 99.8 percentiles, map to [0, 255], subtract 50."""
    x = np.asarray(x, dtype=np.float64)
    lo, hi = np.percentile(x, [0.2, 99.8])
    return (np.clip(x, lo, hi) - lo) / (hi - lo) * 255.0 - 50.0


@pytest.fixture(scope="module")
def preprocessing() -> Compose:
    parser = ConfigParser()
    parser.read_config(str(CONFIG))
    pre = parser.get_parsed_content("preprocessing")
    assert isinstance(pre, Compose)
    return pre


@pytest.fixture(scope="module")
def normalize(preprocessing) -> NormalizeIntensityByModalityd:
    (step,) = [t for t in preprocessing.transforms if isinstance(t, NormalizeIntensityByModalityd)]
    return step


@pytest.fixture(scope="module")
def ball_scan(tmp_path_factory) -> str:
    """CT-like scan: air (-1000 HU) and a 1000 HU ball (smooth 3 mm edge) centred at BALL_CENTRE_LPS."""
    k, j, i = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in SIZE[::-1]), indexing="ij")
    index = np.stack([i, j, k], axis=-1)  # (z, y, x, 3) ITK indices
    world = ORIGIN + (index * SPACING) @ DIRECTION.T  # LPS, as ITK defines it
    r = np.linalg.norm(world - BALL_CENTRE_LPS, axis=-1)
    hu = -1000.0 + 2000.0 * np.clip((BALL_RADIUS - r) / 3.0 + 0.5, 0.0, 1.0)
    img = itk.image_from_array(hu.astype(np.float32))
    img.SetSpacing(SPACING.tolist())
    img.SetOrigin(ORIGIN.tolist())
    img.SetDirection(itk.matrix_from_array(np.ascontiguousarray(DIRECTION)))
    path = str(tmp_path_factory.mktemp("ball") / "ball_ct.nii.gz")
    itk.imwrite(img, path)
    return path


@pytest.fixture(scope="module")
def processed(preprocessing, ball_scan):
    data = {"image": ball_scan, "modality": "ct"}
    before_pad = Compose(preprocessing.transforms[:-1])(dict(data))["image"]
    out = preprocessing(dict(data))["image"]
    return before_pad, out


def test_output_axes_are_spl_at_2mm(processed):
    _, out = processed
    assert out.meta["space"] == "RAS"
    lps = convert_affine(out.affine, "RAS", "LPS")
    columns = lps[:3, :3]
    np.testing.assert_allclose(np.linalg.norm(columns, axis=0), [2.0, 2.0, 2.0], atol=1e-6)
    # axis 0 -> +S, axis 1 -> +P, axis 2 -> +L (LPS world: x=L, y=P, z=S); each column's dominant component
    for axis, world_axis in enumerate((2, 1, 0)):
        column = columns[:, axis]
        assert int(np.argmax(np.abs(column))) == world_axis, (axis, column)
        assert column[world_axis] > 0, (axis, column)
    # exactly: the scan's own direction columns, permuted/flipped, rotation kept (no resampling to axis-aligned)
    expected = 2.0 * np.stack([DIRECTION[:, 2], -DIRECTION[:, 1], DIRECTION[:, 0]], axis=1)
    np.testing.assert_allclose(columns, expected, atol=1e-5)


def test_ball_centre_lands_at_its_world_point(processed):
    _, out = processed
    image = out[0].numpy().astype(np.float64)
    air, bone = reference_ct(-1000.0), reference_ct(1000.0)
    assert image.max() == pytest.approx(bone, abs=1e-3)  # ball interior, mapped as design notes §2
    weights = np.clip(image - air, 0.0, None)  # padding (-50) and air weigh nothing
    idx = np.stack(np.meshgrid(*(np.arange(n) for n in image.shape), indexing="ij"), axis=-1)
    centroid = (weights[..., None] * idx).reshape(-1, 3).sum(0) / weights.sum()
    world = voxel_to_world(centroid, out.affine)[0]  # RAS affine -> LPS world point
    np.testing.assert_allclose(world, BALL_CENTRE_LPS, atol=1.0)
    # the ball's volume survives resampling (4/3 pi r^3 with a symmetric ramp, in 2 mm voxels)
    ball_voxels = weights.sum() / (bone - air)
    assert ball_voxels * 8.0 == pytest.approx(4.0 / 3.0 * np.pi * BALL_RADIUS**3, rel=0.05)


def test_divisible_padding_at_the_end_with_minus_50(processed):
    before, out = processed
    shape = tuple(out.shape[1:])
    assert all(s % d == 0 for s, d in zip(shape, DIVISOR)), shape
    inner = tuple(before.shape[1:])
    assert inner != shape  # the scan really needed padding, so the check below is not empty
    assert all(s - n < d for s, n, d in zip(shape, inner, DIVISOR))  # the smallest divisible size
    sl = (slice(None),) + tuple(slice(0, n) for n in inner)
    assert torch.equal(out[sl].as_tensor(), before.as_tensor())  # padding at the end, data untouched
    padded = torch.ones(out.shape, dtype=torch.bool)
    padded[sl] = False
    assert bool((out.as_tensor()[padded] == PAD_VALUE).all())
    # background inside the scan is normalised air, which is not the padding value
    assert float(before.min()) == pytest.approx(reference_ct(-1000.0), abs=1e-3)
    assert reference_ct(-1000.0) != pytest.approx(PAD_VALUE, abs=0.5)
    np.testing.assert_allclose(out.affine.numpy(), before.affine.numpy())  # end padding keeps the origin


# --------------------------------------------------------------------------------------------------------------
# intensity parity with the reference (design notes §2, `docs/design.md`), computed with numpy
# --------------------------------------------------------------------------------------------------------------


def _volume(values, shape=None) -> MetaTensor:
    arr = np.asarray(values, dtype=np.float32)
    if shape is not None:
        arr = arr.reshape(shape)
    return MetaTensor(torch.from_numpy(arr), meta={"filename_or_obj": "synthetic.nii.gz"})


def test_ct_intensity_parity(normalize):
    hu = np.array([-2000.0, -1024.0, 0.0, 3071.0, 4000.0, -1000.0, 40.0, 1500.0])
    out = normalize({"image": _volume(hu, (1, 2, 2, 2)), "modality": "ct"})["image"]
    got = out.as_tensor().numpy().reshape(-1)
    np.testing.assert_allclose(got, reference_ct(hu), atol=1e-4)
    np.testing.assert_allclose(got[:5], [-50.0, -50.0, 255.0 * 1024.0 / 4095.0 - 50.0, 205.0, 205.0], atol=1e-4)


def test_mr_intensity_parity(normalize):
    rng = np.random.default_rng(4)
    mr = rng.gamma(2.0, 150.0, size=(1, 24, 20, 16))
    mr.flat[rng.choice(mr.size, 12, replace=False)] = 1e5  # bright outliers the percentile clip must remove
    out = normalize({"image": _volume(mr), "modality": "mr"})["image"].as_tensor().numpy()
    expected = reference_mr(mr)
    np.testing.assert_allclose(out, expected, atol=2e-3)
    assert out.min() == pytest.approx(-50.0, abs=1e-4) and out.max() == pytest.approx(205.0, abs=1e-4)
    lo, hi = np.percentile(mr, [0.2, 99.8])
    assert np.all(out[mr >= hi] == pytest.approx(205.0, abs=1e-4))  # clipped at the 99.8th percentile
    assert np.all(out[mr <= lo] == pytest.approx(-50.0, abs=1e-4))  # and at the 0.2nd
    # not the CT window: the same values as CT would all be clipped near the top (the bundle refuses an "MR as
    # CT" by default, strict_modality_check; a lenient normaliser shows the window)
    lenient = NormalizeIntensityByModalityd(keys="image", strict_modality_check=False)
    as_ct = lenient({"image": _volume(mr), "modality": "ct"})["image"].as_tensor().numpy()
    assert not np.allclose(as_ct, out, atol=1.0)


# --------------------------------------------------------------------------------------------------------------
# modality
# --------------------------------------------------------------------------------------------------------------


def test_modality_argument_is_case_insensitive():
    hu = np.array([-1024.0, 0.0, 500.0, 3071.0])
    for name in ("CT", "ct", " Ct "):
        out = NormalizeIntensityByModalityd(keys="image", modality=name)({"image": _volume(hu, (1, 1, 2, 2))})
        np.testing.assert_allclose(out["image"].as_tensor().numpy().reshape(-1), reference_ct(hu), atol=1e-4)
    assert NormalizeIntensityByModalityd(keys="image", modality="MR").modality == "mr"


def test_unknown_modality_is_rejected(normalize):
    with pytest.raises(SAMv2InputError, match="pet"):
        NormalizeIntensityByModalityd(keys="image", modality="pet")
    with pytest.raises(SAMv2InputError) as info:
        normalize({"image": _volume(np.arange(8.0), (1, 2, 2, 2)), "modality": "pet"})
    assert "pet" in str(info.value) and "synthetic.nii.gz" in str(info.value)


def test_missing_modality_is_an_error(normalize, preprocessing, ball_scan):
    with pytest.raises(SAMv2InputError, match="modality"):
        normalize({"image": _volume(np.arange(8.0), (1, 2, 2, 2))})
    with pytest.raises(SAMv2InputError, match="modality"):
        NormalizeIntensityByModalityd(keys="image")({"image": _volume(np.arange(8.0), (1, 2, 2, 2))})
    # through the whole bundle preprocessing (MONAI wraps the error; the file name is kept)
    with pytest.raises(Exception) as info:
        preprocessing({"image": ball_scan})
    error = find_samv2_error(info.value)
    assert isinstance(error, SAMv2InputError), repr(info.value)
    assert "modality" in str(error) and ball_scan in str(error)


def test_per_sample_modality_from_the_data_dict(normalize):
    rng = np.random.default_rng(5)
    values = rng.uniform(-1000.0, 1500.0, size=(1, 10, 10, 10))
    lenient = NormalizeIntensityByModalityd(keys="image", strict_modality_check=False)  # one volume read both ways
    ct = normalize({"image": _volume(values), "modality": "CT"})["image"].as_tensor().numpy()
    mr = lenient({"image": _volume(values), "modality": "mr"})["image"].as_tensor().numpy()
    np.testing.assert_allclose(ct, reference_ct(values), atol=1e-4)
    np.testing.assert_allclose(mr, reference_mr(values), atol=2e-3)
    # a fixed modality overrides nothing per sample: the bundle's transform has none fixed
    assert normalize.modality is None


def test_ct_without_air_logs_a_warning(normalize, caplog):
    """The bundles refuse a "CT" without air (strict_modality_check, default true); with the check off it is a
    warning."""
    no_air = _volume(np.linspace(0.0, 900.0, 27), (1, 3, 3, 3))  # looks like an MR, not HU
    with pytest.raises(SAMv2InputError, match="is this really a CT"):
        normalize({"image": no_air, "modality": "ct"})
    normalize = NormalizeIntensityByModalityd(keys="image", strict_modality_check=False)
    with caplog.at_level(logging.WARNING, logger="samv2_components"):
        normalize({"image": no_air, "modality": "ct"})
    warnings = [r for r in caplog.records if r.name == "samv2_components" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "-200" in warnings[0].getMessage() and "synthetic.nii.gz" in warnings[0].getMessage()

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="samv2_components"):
        normalize({"image": _volume(np.linspace(-1000.0, 900.0, 27), (1, 3, 3, 3)), "modality": "ct"})
        normalize({"image": no_air, "modality": "mr"})  # MR intensities are not HU: no warning
    assert not [r for r in caplog.records if r.name == "samv2_components"]
