"""Tests of :class:`samv2_components.transforms.patch_pairs.RandPatchPaird` (paired training patches).

The correspondence is checked against known transforms: volumes whose values are linear functions of the voxel
coordinates (trilinear interpolation reproduces them exactly), and the patch affines themselves. Sampling is
checked statistically with fixed seeds.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.data import MetaTensor

from samv2_components.errors import SAMv2InputError
from samv2_components.transforms.patch_pairs import RandPatchPaird, VoxelSampler, sample_at_voxels

PATCH = (16, 40, 40)
NO_INTENSITY = dict(noise_prob=0.0, blur_prob=0.0)


def coordinate_ramps(shape) -> torch.Tensor:
    """``(3, D, H, W)``: channel i holds each voxel's own index along axis i."""
    axes = [torch.arange(n, dtype=torch.float32) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))


def linear_image(shape) -> torch.Tensor:
    """``(1, D, H, W)`` linear in the voxel coordinates, all above the foreground threshold."""
    r = coordinate_ramps(shape)
    return (r[0] + 0.5 * r[1] + 0.25 * r[2])[None]


def sample_trilinear(patch: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Independent sampler: ``patch`` ``(C, d, h, w)`` at voxel coordinates ``(3, ...)`` (D, H, W).

    Uses ``align_corners=True`` normalisation, unlike the transform, so the two code paths are independent.
    """
    size = torch.tensor(patch.shape[1:], dtype=torch.float64).reshape(3, *([1] * (coords.ndim - 1)))
    norm = coords.to(torch.float64) / (size - 1) * 2 - 1
    grid = norm.flip(0).permute(*range(1, coords.ndim), 0)[None].to(torch.float32)  # (1, ..., 3) as (x, y, z)
    return F.grid_sample(patch[None].float(), grid, mode="bilinear", align_corners=True)[0]


def patch_points(patch_size) -> torch.Tensor:
    """``(N, 4)`` homogeneous patch voxel coordinates, in C order of the patch."""
    axes = [torch.arange(n, dtype=torch.float64) for n in patch_size]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    return torch.cat([grid, torch.ones(len(grid), 1, dtype=torch.float64)], 1)


def decompose(affine: torch.Tensor):
    """Scales (column norms) and angles (a, b, c) of ``L = R_D(a) R_H(b) R_W(c) diag(s)`` for an isotropic volume."""
    linear = affine[:3, :3].numpy()
    scales = np.linalg.norm(linear, axis=0)
    rot = linear / scales
    b = np.arcsin(np.clip(rot[0, 2], -1, 1))
    c = np.arctan2(-rot[0, 1], rot[0, 0])
    a = np.arctan2(-rot[1, 2], rot[2, 2])
    return scales, rot, np.array([a, b, c])


@pytest.fixture(scope="module")
def ramp_volume():
    shape = (48, 130, 130)
    return {"image": linear_image(shape), "coords": coordinate_ramps(shape)}


def test_correspondence_exact_on_linear_volumes(ramp_volume):
    t = RandPatchPaird(interpolated_keys="coords", patch_size=PATCH, rotate_range=0.3, keep_source=True, **NO_INTENSITY)
    t.set_random_state(0)
    checked = 0
    for _ in range(10):
        out = t(ramp_volume)
        valid = out["valid_ab"][0]
        assert out["corr_ab"].shape == (3, *PATCH) and out["corr_ab"].dtype == torch.float32
        # patch a's coordinate ramps are the volume coordinates of its voxels: M_a p
        expected = (patch_points(PATCH) @ out["affine_a"].T)[:, :3].T.reshape(3, *PATCH)
        assert torch.allclose(out["coords_a"].double(), expected, atol=2e-3)
        for key in ("image", "coords"):
            a, b = out[f"{key}_a"], out[f"{key}_b"]
            b_at_corr = sample_trilinear(b, out["corr_ab"])
            err = (b_at_corr - a)[:, valid].abs().max() if valid.any() else torch.tensor(0.0)
            assert float(err) <= 1e-3 * float(a.abs().max()), key
        checked += int(valid.sum())
    assert checked > 0


def test_correspondence_matches_affines(ramp_volume):
    t = RandPatchPaird(
        patch_size=PATCH, rotate_range=(0.4, 0.2, 0.1), overlap_prob=0.5, keep_source=True, **NO_INTENSITY
    )
    t.set_random_state(1)
    shape = torch.tensor(ramp_volume["image"].shape[1:], dtype=torch.float64)
    for _ in range(6):
        out = t(ramp_volume)
        p = patch_points(PATCH)
        corr = out["corr_ab"].double().reshape(3, -1).T
        q = torch.cat([corr, torch.ones(len(corr), 1, dtype=torch.float64)], 1)
        # M_b(corr) == M_a(p) for every voxel of a
        assert torch.allclose(q @ out["affine_b"].T, p @ out["affine_a"].T, atol=1e-4)
        # valid == inside patch b and inside the volume
        n = torch.tensor(PATCH, dtype=torch.float64)
        v = (p @ out["affine_a"].T)[:, :3]
        tol = 1e-3
        inside = ((corr >= tol) & (corr <= n - 1 - tol)).all(1) & ((v >= tol) & (v <= shape - 1 - tol)).all(1)
        outside = ((corr < -tol) | (corr > n - 1 + tol)).any(1) | ((v < -tol) | (v > shape - 1 + tol)).any(1)
        valid = out["valid_ab"].reshape(-1)
        assert valid[inside].all() and not valid[outside].any()


def test_overlap_statistics():
    shape = (48, 128, 128)
    data = {"image": torch.full((1, *shape), 40.0)}
    t = RandPatchPaird(patch_size=(12, 32, 32), keep_source=True, **NO_INTENSITY)
    t.set_random_state(123)
    flags, fractions = [], []
    for _ in range(200):
        out = t(data)
        flags.append(bool(out["overlap"]))
        fractions.append(float(out["valid_ab"].float().mean()))
    flags, fractions = np.array(flags), np.array(fractions)
    assert out["overlap"].dtype == torch.bool and out["overlap"].shape == ()
    assert abs(flags.mean() - 0.8) <= 0.08
    assert np.median(fractions[flags]) > 0.3 and fractions[flags].min() > 0.05
    assert np.median(fractions[~flags]) < 0.05


def test_centres_prefer_foreground_and_warn_without(caplog):
    shape = (64, 160, 160)
    image = torch.full((1, *shape), -50.0)
    blob = torch.tensor([40.0, 100.0, 60.0])
    dist = (coordinate_ramps(shape) - blob.reshape(3, 1, 1, 1)).norm(dim=0)
    image[0][dist <= 5] = 100.0
    t = RandPatchPaird(patch_size=(8, 16, 16), overlap_prob=0.0, **NO_INTENSITY)
    t.set_random_state(5)
    centre = torch.tensor([3.5, 7.5, 7.5, 1.0], dtype=torch.float64)
    for _ in range(10):
        out = t({"image": image})
        for s in ("_a", "_b"):
            c = (out[f"affine{s}"] @ centre)[:3].float()
            assert (c - blob).norm() <= 5.0 + 1e-4

    empty = MetaTensor(torch.full((1, 20, 40, 40), -50.0), meta={"filename_or_obj": "empty_scan.nii.gz"})
    with caplog.at_level(logging.WARNING, logger="samv2_components"):
        for _ in range(3):
            out = t({"image": empty})
    warnings = [r for r in caplog.records if "empty_scan.nii.gz" in r.getMessage()]
    assert len(warnings) == 1 and out["image_a"].shape == (1, 8, 16, 16)


def test_scale_and_rotation_ranges():
    data = {"image": torch.full((1, 60, 160, 160), 10.0)}
    ranges = (0.3, 0.0, 0.1)
    t = RandPatchPaird(patch_size=(8, 16, 16), scale_range=(0.7, 1.3), rotate_range=ranges, **NO_INTENSITY)
    t.set_random_state(3)
    all_scales, all_angles = [], []
    for _ in range(60):
        out = t(data)
        for s in ("_a", "_b"):
            scales, rot, angles = decompose(out[f"affine{s}"])
            assert np.allclose(rot @ rot.T, np.eye(3), atol=1e-9) and np.isclose(np.linalg.det(rot), 1.0)
            assert np.allclose(scales, scales[0])  # isotropic by default
            all_scales.append(scales[0])
            all_angles.append(angles)
    all_scales, all_angles = np.array(all_scales), np.array(all_angles)
    assert all_scales.min() >= 0.7 and all_scales.max() <= 1.3 and np.ptp(all_scales) > 0.4
    assert (np.abs(all_angles) <= np.array(ranges) + 1e-9).all()
    assert np.abs(all_angles[:, 0]).max() > 0.2 and np.abs(all_angles[:, 1]).max() < 1e-12

    t = RandPatchPaird(patch_size=(8, 16, 16), isotropic_scale=False, rotate_range=0.0, **NO_INTENSITY)
    t.set_random_state(4)
    scales, _, _ = decompose(t(data)["affine_a"])
    assert scales.min() >= 0.8 and scales.max() <= 1.2 and np.ptp(scales) > 0


def test_determinism_and_intensity_augmentation(ramp_volume):
    def run(seed, **kwargs):
        t = RandPatchPaird(patch_size=PATCH, keep_source=True, **kwargs)
        t.set_random_state(seed)
        return [t(ramp_volume) for _ in range(3)]

    aug = dict(noise_prob=1.0, blur_prob=1.0)
    first, second, other = run(7, **aug), run(7, **aug), run(8, **aug)
    for x, y in zip(first, second):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(torch.as_tensor(x[k]), torch.as_tensor(y[k])), k
    assert not torch.equal(first[0]["affine_a"], other[0]["affine_a"])
    # same seed without intensity augmentation: same geometry for the first pair, different intensities
    clean = run(7, **NO_INTENSITY)[0]
    assert torch.equal(clean["affine_a"], first[0]["affine_a"])
    assert not torch.allclose(clean["image_a"], first[0]["image_a"])


@pytest.mark.parametrize("spacing", [(2.0, 2.0, 2.0), (3.0, 1.5, 1.0)])
def test_metatensor_patch_affines(spacing):
    shape = (64, 110, 110)  # large enough for every rotated patch to lie inside (no padding at voxel 0)
    rot = torch.tensor(np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))[0])
    affine = torch.eye(4, dtype=torch.float64)
    affine[:3, :3] = rot @ torch.diag(torch.tensor(spacing, dtype=torch.float64))
    affine[:3, 3] = torch.tensor([-100.0, 20.0, 355.5])
    meta = {"filename_or_obj": "scan.nii.gz", "space": "RAS"}
    image = MetaTensor(linear_image(shape), affine=affine, meta=meta)
    t = RandPatchPaird(interpolated_keys="coords", patch_size=PATCH, rotate_range=0.2, **NO_INTENSITY)
    t.set_random_state(2)
    for _ in range(4):
        out = t({"image": image, "coords": coordinate_ramps(shape)})
        assert "image" not in out and "coords" not in out
        for s in ("_a", "_b"):
            patch = out[f"image{s}"]
            assert isinstance(patch, MetaTensor) and patch.meta["filename_or_obj"] == "scan.nii.gz"
            # world point of patch voxel (0, 0, 0) from the sampled coordinate ramps (volume voxel) -> world
            voxel = out[f"coords{s}"][:, 0, 0, 0].double()
            world = affine[:3, :3] @ voxel + affine[:3, 3]
            assert bool(((voxel >= -1e-3) & (voxel <= torch.tensor(shape) - 1 + 1e-3)).all())
            assert torch.allclose(patch.affine[:3, 3], world, atol=1e-2)
            assert torch.allclose(patch.affine, affine @ out[f"affine{s}"])
            # physical rotation: patch axes are orthogonal in mm with lengths spacing * scale (no shear)
            cols = patch.affine[:3, :3]
            gram = cols.T @ cols
            assert torch.allclose(gram, torch.diag(torch.diag(gram)), atol=1e-6)
            ratio = cols.norm(dim=0) / torch.tensor(spacing, dtype=torch.float64)
            assert torch.allclose(ratio, ratio[0].expand(3), atol=1e-9) and 0.8 <= float(ratio[0]) <= 1.2


def test_small_scans():
    tiny = MetaTensor(torch.zeros(1, 10, 96, 96), meta={"filename_or_obj": "tiny_scan.nii.gz"})
    t = RandPatchPaird(**NO_INTENSITY)
    with pytest.raises(SAMv2InputError, match="tiny_scan.nii.gz"):
        t({"image": tiny})
    # smaller than the patch but more than half of it: padded with pad_value
    small = {"image": torch.full((1, 20, 60, 60), 100.0)}
    t.set_random_state(0)
    out = t(small)
    assert out["image_a"].shape == (1, 32, 96, 96)
    assert float(out["image_a"].min()) == pytest.approx(-50.0) and float(out["image_a"].max()) == pytest.approx(100.0)
    assert 0 < float(out["valid_ab"].float().mean()) < 1
    # pad_value=None pads with the volume minimum
    small["image"][0, 0, 0, 0] = -7.0
    out = RandPatchPaird(pad_value=None, **NO_INTENSITY)(small)
    assert float(out["image_a"].min()) == pytest.approx(-7.0)


def test_labels_are_sampled_nearest():
    shape = (32, 80, 80)
    r = coordinate_ramps(shape)
    label = torch.zeros(shape, dtype=torch.int64)
    label[r[1] > 40] = 3
    label[(r[2] > 30) & (r[0] < 16)] = 7
    t = RandPatchPaird(label_keys="label", patch_size=PATCH, rotate_range=0.3, **NO_INTENSITY)
    t.set_random_state(11)
    for _ in range(5):
        out = t({"image": linear_image(shape), "label": label[None]})
        for s in ("_a", "_b"):
            lab = out[f"label{s}"]
            assert lab.dtype == torch.int64 and lab.shape == (1, *PATCH)
            assert set(lab.unique().tolist()) <= {0, 3, 7}
            # inside the volume, each label voxel is the label of the nearest volume voxel (outside: 0)
            idx = (patch_points(PATCH) @ out[f"affine{s}"].T)[:, :3].T.reshape(3, *PATCH)
            inside = ((idx >= 0) & (idx <= torch.tensor(shape).reshape(3, 1, 1, 1) - 1)).all(0)
            near = torch.round(idx).long()
            frac = (idx - torch.floor(idx) - 0.5).abs().min(0).values > 1e-3  # away from rounding ties
            keep = inside & frac
            expected = label[near[0][keep], near[1][keep], near[2][keep]]
            assert torch.equal(lab[0][keep], expected)
            far_out = ((idx < -0.6) | (idx > torch.tensor(shape).reshape(3, 1, 1, 1) - 0.4)).any(0)
            assert (lab[0][far_out] == 0).all()


# -- simulated subject variation: a smooth displacement of patch a -----------------------------------------------


class KnownField(RandPatchPaird):
    """The transform with a known analytic displacement instead of a random one (voxels of patch a)."""

    def draw_displacement(self, voxel_mm):
        grid = patch_points(self.patch_size)[:, :3].T.reshape(3, *self.patch_size)
        n = torch.tensor(self.patch_size, dtype=torch.float64).reshape(3, 1, 1, 1)
        phase = torch.pi * grid / (n - 1)
        return torch.stack([1.5 * torch.sin(phase[1]), -2.0 * torch.cos(phase[2]), 2.5 * torch.sin(phase[0] + phase[2])])


def test_deformed_pairs_carry_a_known_field_exactly(ramp_volume):
    t = KnownField(interpolated_keys="coords", patch_size=PATCH, rotate_range=0.2, deform_prob=1.0, keep_source=True,
                   **NO_INTENSITY)
    t.set_random_state(3)
    checked = 0
    for _ in range(6):
        out = t(ramp_volume)
        field = t.draw_displacement(None)
        # patch a samples the volume at M_a (p + w(p)): its coordinate ramps show exactly that
        p = patch_points(PATCH)
        p[:, :3] += field.reshape(3, -1).T
        expected = (p @ out["affine_a"].T)[:, :3].T.reshape(3, *PATCH)
        size = torch.tensor(ramp_volume["image"].shape[1:], dtype=torch.float64).reshape(3, 1, 1, 1)
        inside = ((expected >= 0) & (expected <= size - 1)).all(0)  # points pushed out of the volume read padding
        assert inside.float().mean() > 0.5
        assert torch.allclose(out["coords_a"].double()[:, inside], expected[:, inside], atol=2e-3)
        # and its partner in b is the same volume point: M_b corr == M_a (p + w)
        corr = out["corr_ab"].double().reshape(3, -1).T
        q = torch.cat([corr, torch.ones(len(corr), 1, dtype=torch.float64)], 1)
        assert torch.allclose((q @ out["affine_b"].T)[:, :3], (p @ out["affine_a"].T)[:, :3], atol=1e-4)
        valid = out["valid_ab"][0]
        for key in ("image", "coords"):
            a, b = out[f"{key}_a"], out[f"{key}_b"]
            err = (sample_trilinear(b, out["corr_ab"]) - a)[:, valid].abs()
            assert float(err.max()) <= 1e-3 * float(a.abs().max()) if valid.any() else True, key
        checked += int(valid.sum())
        # without the field the correspondence would be off by w: the field really moved patch a
        plain = (patch_points(PATCH) @ out["affine_a"].T)[:, :3].T.reshape(3, *PATCH)
        assert float((out["coords_a"].double() - plain)[:, inside].abs().max()) > 1.0
    assert checked > 0


def test_random_displacement_is_smooth_bounded_and_one_to_one(ramp_volume):
    from samv2_components.transforms.patch_pairs import smooth_displacement

    rng = np.random.RandomState(0)
    voxel_mm = np.array([2.4, 1.8, 2.0])
    for sigma in (2.0, 5.0):  # 5.0 = the largest allowed for 40 mm control points
        field = smooth_displacement((32, 96, 96), voxel_mm, sigma, 40.0, rng)
        mm = field * torch.tensor(voxel_mm).reshape(3, 1, 1, 1)
        assert float(mm.abs().max()) <= 3 * sigma + 1e-9 and float(mm.std()) > 0.3 * sigma
        # Jacobian of p -> p + w(p) in voxels: finite differences; det > 0 everywhere = no folding
        grads = [torch.gradient(field[i], dim=(0, 1, 2)) for i in range(3)]
        jac = torch.stack([torch.stack(g) for g in grads]) + torch.eye(3, dtype=torch.float64).reshape(3, 3, 1, 1, 1)
        det = torch.linalg.det(jac.permute(2, 3, 4, 0, 1))
        assert float(det.min()) > 0.2
    t = RandPatchPaird(patch_size=PATCH, deform_prob=0.5, **NO_INTENSITY)
    t.set_random_state(0)
    drawn = []
    for _ in range(20):
        t(ramp_volume)
        drawn.append(t.displacement is not None)
    assert 4 <= sum(drawn) <= 16


@pytest.mark.parametrize(
    "kwargs, key",
    [(dict(deform_prob=1.5), "deform_prob"), (dict(deform_sigma_mm=-1.0), "deform_sigma_mm"),
     (dict(deform_sigma_mm=10.0, deform_control_spacing_mm=40.0), "deform_sigma_mm"),
     (dict(deform_control_spacing_mm=0.0), "deform_control_spacing_mm")],
)
def test_bad_deformation_settings_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key):
        RandPatchPaird(**kwargs)


def test_one_voxel_sampler_serves_the_image_and_its_labels():
    """A sampler built once for a set of points samples an image (trilinear, padded) and a label map (nearest)
    exactly as separate calls would and as a linear volume says by hand; a volume of another size is refused."""
    d, h, w = np.meshgrid(np.arange(9.0), np.arange(11.0), np.arange(13.0), indexing="ij")
    ramp = torch.as_tensor(2.0 * d - h + 0.5 * w, dtype=torch.float32)[None]
    labels = torch.as_tensor((d >= 4) * 1 + (w >= 6) * 2, dtype=torch.float32)[None]
    points = torch.tensor([[[1.25, 2.5, 3.75], [4.0, 5.0, 6.0]], [[7.5, 0.5, 11.25], [-2.0, 3.0, 3.0]]], dtype=torch.float64)
    sampler = VoxelSampler(points, ramp.shape[1:])
    image = sampler(ramp, "bilinear", -7.0)
    label = sampler(labels, "nearest", 0.0)
    assert image.shape == label.shape == (1, 2, 2)
    inside = points[..., 0] >= 0
    expected = 2.0 * points[..., 0] - points[..., 1] + 0.5 * points[..., 2]
    torch.testing.assert_close(image[0][inside], expected[inside].float(), rtol=0, atol=1e-4)
    assert image[0, 1, 1] == -7.0  # two voxels outside along D: padding only
    torch.testing.assert_close(label[0], torch.tensor([[0.0, 3.0], [3.0, 0.0]]))
    torch.testing.assert_close(image, sample_at_voxels(ramp, points, "bilinear", -7.0), rtol=0, atol=0)
    torch.testing.assert_close(label, sample_at_voxels(labels, points, "nearest", 0.0), rtol=0, atol=0)
    with pytest.raises(ValueError, match="spatial shape"):
        sampler(ramp[:, :5])
