"""Tests of the CrossSAM/AggSAM intensity augmentation (:mod:`samv2_components.transforms.aggressive_intensity`)
and of its hook in :class:`~samv2_components.transforms.patch_pairs.RandPatchPaird`.

The Bezier curve is checked against an independent de Casteljau evaluation; the mapping's properties (a function,
end points, range, monotonicity) are checked exactly over many random draws.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose

from samv2_components.transforms import (
    RandBezierIntensity,
    RandBezierIntensityd,
    RandBodyContrastRemap,
    RandIntensityInversion,
    RandIntensityInversiond,
    RandPatchPaird,
    aggressive_intensity_augmentation,
)
from samv2_components.transforms.aggressive_intensity import bezier_curve, bezier_lookup_table, share_random_state

LOW, HIGH = -50.0, 205.0
PATCH = (8, 24, 24)
NO_NOISE = dict(noise_prob=0.0, blur_prob=0.0)


def de_casteljau(p1, p2, t: np.ndarray) -> np.ndarray:
    """``(len(t), 2)`` points of the cubic Bezier curve (0, 0), p1, p2, (1, 1) by repeated linear interpolation."""
    pts = np.array([[0.0, 0.0], p1, p2, [1.0, 1.0]], dtype=np.float64)[None].repeat(len(t), 0)
    t = np.asarray(t, dtype=np.float64)[:, None, None]
    while pts.shape[1] > 1:
        pts = (1 - t) * pts[:, :-1] + t * pts[:, 1:]
    return pts[:, 0]


def control_point_sets(
    n_random: int = 300, seed: int = 0, grid: tuple[float, ...] = (0.0, 0.5, 1.0)
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Random control points in [0, 1]^2 plus every combination of the coordinates in ``grid`` (extreme cases)."""
    rng = np.random.RandomState(seed)
    sets = [(rng.uniform(0, 1, 2), rng.uniform(0, 1, 2)) for _ in range(n_random)]
    sets += [(np.array([a, b]), np.array([c, d])) for a in grid for b in grid for c in grid for d in grid]
    return sets


def reference_map(values: np.ndarray, p1, p2, decreasing: bool) -> np.ndarray:
    """Independent implementation: np.interp on a very dense de Casteljau curve (x is monotone, see below)."""
    curve = de_casteljau(p1, p2, np.linspace(0, 1, 50001))
    x01 = (np.clip(values, LOW, HIGH) - LOW) / (HIGH - LOW)
    y = np.interp(x01, curve[:, 0], curve[:, 1])
    return LOW + (HIGH - LOW) * (1 - y if decreasing else y)


def test_bezier_curve_coordinates_are_monotone_in_t():
    """The claim the construction rests on: with P0 = (0, 0), P3 = (1, 1) and P1, P2 in [0, 1]^2 both x(t) and
    y(t) are non-decreasing (so the curve is the graph of a monotone function of x), and ``bezier_curve`` is the
    curve (checked against de Casteljau)."""
    t = np.linspace(0, 1, 4001)
    worst = 0.0
    for p1, p2 in control_point_sets():
        ref = de_casteljau(p1, p2, t)
        x, y = bezier_curve(p1, p2, num=4001)
        assert np.allclose(np.stack([x, y], 1), ref, atol=1e-12)
        assert (x[0], y[0], x[-1], y[-1]) == (0.0, 0.0, 1.0, 1.0)
        worst = min(worst, np.diff(ref[:, 0]).min(), np.diff(ref[:, 1]).min())
    assert worst >= -1e-12
    # ... whereas a control point outside [0, 1]^2 does break it (so the test above can fail)
    ref = de_casteljau(np.array([1.6, 0.2]), np.array([-0.6, 0.8]), t)
    assert np.diff(ref[:, 0]).min() < -1e-5


def test_lookup_table_follows_the_curve():
    values = np.linspace(LOW, HIGH, 301)
    outside = np.array([LOW - 20.0, HIGH + 20.0])
    curve_t = np.linspace(0, 1, 4001)  # curve points at most 0.27 intensity units apart
    for p1, p2 in control_point_sets(30, seed=1, grid=(0.0, 1.0)):
        curve = LOW + (HIGH - LOW) * de_casteljau(p1, p2, curve_t)  # (x(t), y(t)) in intensity units
        for decreasing in (False, True):
            table = bezier_lookup_table(p1, p2, decreasing)
            assert table.shape == (1001,) and table[0] == float(decreasing) and table[-1] == float(not decreasing)
            t = RandBezierIntensity(prob=1.0)
            t.randomize()
            t.table = table
            out = t(values, randomize=False)
            graph_y = LOW + HIGH - curve[:, 1] if decreasing else curve[:, 1]
            # every (x, f(x)) lies within 1.5 intensity units (L-inf) of the curve: robust where f is steep
            dist = np.maximum(np.abs(values[:, None] - curve[None, :, 0]), np.abs(out[:, None] - graph_y[None]))
            assert dist.min(1).max() < 1.5, (p1, p2, decreasing)
            # and close to an independent dense interpolation almost everywhere
            assert np.median(np.abs(out - reference_map(values, p1, p2, decreasing))) < 0.05
            assert np.array_equal(t(outside, randomize=False), out[[0, -1]])  # clipped to value_range


@pytest.mark.parametrize("value_range", [(LOW, HIGH), (0.0, 1.0)])
def test_bezier_map_is_a_monotone_function_with_fixed_end_points(value_range):
    low, high = value_range
    span = high - low
    base = np.linspace(low - 0.2 * span, high + 0.2 * span, 3001).astype(np.float32)
    base = np.concatenate([base, np.array([low, high], dtype=np.float32)])
    rng = np.random.RandomState(0)
    values = np.concatenate([base, base[rng.permutation(len(base))]])  # every value twice, in another order
    directions, changes = [], []
    t = RandBezierIntensity(prob=1.0, value_range=value_range).set_random_state(11)
    for _ in range(200):
        out = t(values)
        assert out.dtype == np.float32 and out.shape == values.shape
        # a function: the same input value always gives the same output
        order = np.argsort(values, kind="stable")
        v, o = values[order], out[order]
        same = v[1:] == v[:-1]
        assert same.any() and np.array_equal(o[1:][same], o[:-1][same])
        # within the range, clipped outside it, end points fixed (swapped when decreasing)
        assert o.min() >= low and o.max() <= high
        f_low, f_high = out[values == np.float32(low)][0], out[values == np.float32(high)][0]
        assert (f_low, f_high) == ((high, low) if t.decreasing else (low, high))
        assert np.all(o[v <= low] == f_low) and np.all(o[v >= high] == f_high)
        # monotone, exactly
        steps = np.diff(o)
        assert (steps <= 0).all() if t.decreasing else (steps >= 0).all()
        directions.append(t.decreasing)
        changes.append(np.abs(np.where(t.decreasing, low + high - o, o) - v.clip(low, high)).max() / span)
    directions = np.array(directions)
    assert 0.35 < directions.mean() < 0.65  # decreasing_prob = 0.5
    assert np.median(changes) > 0.05  # really non-linear, not the identity


def test_decreasing_is_the_mirrored_increasing_map():
    x = np.linspace(LOW, HIGH, 777).astype(np.float64)
    for seed in range(10):
        up = RandBezierIntensity(prob=1.0, decreasing_prob=0.0).set_random_state(seed)
        down = RandBezierIntensity(prob=1.0, decreasing_prob=1.0).set_random_state(seed)
        a, b = up(x), down(x)
        assert np.array_equal(up.control_points, down.control_points) and not up.decreasing and down.decreasing
        assert np.allclose(b, LOW + HIGH - a, atol=1e-9)


def test_decreasing_prob_validation_and_randomize_first():
    with pytest.raises(ValueError):
        RandBezierIntensity(decreasing_prob=1.5)
    with pytest.raises(ValueError):
        RandBezierIntensity(value_range=(5.0, 5.0))
    with pytest.raises(ValueError):
        RandIntensityInversion(prob=-0.1)
    t = RandBezierIntensity(prob=1.0)
    t._do_transform = True
    with pytest.raises(RuntimeError):
        t(np.zeros(3), randomize=False)


def test_types_dtypes_and_metatensor():
    rng = np.random.RandomState(3)
    arr = rng.uniform(LOW - 10, HIGH + 10, size=(1, 4, 5, 6)).astype(np.float32)
    t = RandBezierIntensity(prob=1.0).set_random_state(5)
    out_np = t(arr)
    out_t = t(torch.from_numpy(arr), randomize=False)
    assert isinstance(out_np, np.ndarray) and out_np.dtype == np.float32 and out_np.shape == arr.shape
    assert isinstance(out_t, torch.Tensor) and out_t.dtype == torch.float32 and out_t.shape == arr.shape
    assert np.allclose(out_np, out_t.numpy(), atol=1e-4)
    assert t(arr.astype(np.float64), randomize=False).dtype == np.float64
    ints = np.arange(-50, 206, dtype=np.int16)
    assert t(ints, randomize=False).dtype == np.float32
    assert t(torch.from_numpy(ints), randomize=False).dtype == torch.float32

    affine = torch.diag(torch.tensor([2.0, -3.0, 1.5, 1.0], dtype=torch.float64))
    affine[:3, 3] = torch.tensor([10.0, -4.0, 7.0], dtype=torch.float64)
    meta = MetaTensor(torch.from_numpy(arr), affine=affine, meta={"filename_or_obj": "scan.nii.gz", "modality": "ct"})
    for transform in (RandBezierIntensity(prob=1.0).set_random_state(5), RandIntensityInversion(prob=1.0)):
        out = transform(meta)
        assert isinstance(out, MetaTensor)
        assert torch.equal(out.affine, affine) and out.meta["filename_or_obj"] == "scan.nii.gz"
        assert out.meta["modality"] == "ct" and out.shape == meta.shape
    assert np.allclose(RandBezierIntensity(prob=1.0).set_random_state(5)(meta).numpy(), out_np, atol=1e-4)


def test_inversion_is_an_involution_swapping_the_end_points():
    values = np.linspace(LOW, HIGH, 1021).astype(np.float32)
    inv = RandIntensityInversion(prob=1.0)
    out = inv(values)
    assert out[0] == HIGH and out[-1] == LOW and out.min() >= LOW and out.max() <= HIGH
    assert np.allclose(out, LOW + HIGH - values)
    assert np.allclose(inv(out), values, atol=1e-5)
    tensor = torch.from_numpy(values)
    assert torch.allclose(inv(tensor), LOW + HIGH - tensor) and torch.allclose(inv(inv(tensor)), tensor, atol=1e-5)
    assert inv(torch.tensor([LOW, HIGH])).tolist() == [HIGH, LOW]
    assert inv(np.array([LOW - 10.0]))[0] == HIGH + 10.0  # mirrored, not clipped
    other = RandIntensityInversion(prob=1.0, value_range=(0.0, 1.0))
    assert np.allclose(other(np.array([0.0, 0.25, 1.0])), [1.0, 0.75, 0.0])


def test_prob_zero_is_identity_and_prob_is_respected():
    x = np.linspace(LOW, HIGH, 50).astype(np.float32)
    tensor = torch.from_numpy(x.copy())
    for t in (RandBezierIntensity(prob=0.0), RandIntensityInversion(prob=0.0), aggressive_intensity_augmentation(0, 0)):
        t.set_random_state(0)
        for _ in range(5):
            assert np.array_equal(t(x), x)
            assert torch.equal(torch.as_tensor(t(tensor)), tensor)
    t = RandIntensityInversion(prob=0.3).set_random_state(1)
    inverted = np.mean([not np.array_equal(t(x), x) for _ in range(400)])
    assert abs(inverted - 0.3) < 0.07


def test_determinism_under_set_random_state():
    x = np.linspace(LOW, HIGH, 300).astype(np.float32)

    def run(make, seed):
        t = make().set_random_state(seed)
        return [t(x) for _ in range(6)]

    makers = (
        lambda: RandBezierIntensity(prob=0.7),
        lambda: RandIntensityInversion(prob=0.5),
        aggressive_intensity_augmentation,
    )
    for make in makers:
        a, b, c = run(make, 4), run(make, 4), run(make, 9)
        assert all(np.array_equal(u, v) for u, v in zip(a, b))
        assert not all(np.array_equal(u, v) for u, v in zip(a, c))


def test_dictionary_versions():
    x = np.linspace(LOW - 5, HIGH + 5, 400).astype(np.float32)
    y = x[::-1].copy()
    for seed in range(5):
        d = RandBezierIntensityd(keys=["a", "b"], prob=1.0).set_random_state(seed)
        out = d({"a": x, "b": y, "other": x})
        # one shared draw for all keys, equal to the array transform with the same seed
        expected = RandBezierIntensity(prob=1.0).set_random_state(seed)(x)
        assert np.array_equal(out["a"], expected) and np.array_equal(out["b"], expected[::-1])
        assert out["other"] is x
    # prob: all keys or none
    d = RandIntensityInversiond(keys=["a", "b"], prob=0.5).set_random_state(2)
    flags = []
    for _ in range(40):
        out = d({"a": x, "b": y})
        fa, fb = not np.array_equal(out["a"], x), not np.array_equal(out["b"], y)
        assert fa == fb
        if fa:
            assert np.allclose(out["a"], LOW + HIGH - x) and np.allclose(out["b"], LOW + HIGH - y)
        flags.append(fa)
    assert 0 < np.mean(flags) < 1
    # determinism, missing keys
    run = [RandBezierIntensityd("a", prob=0.5).set_random_state(7)({"a": x})["a"] for _ in range(2)]
    assert np.array_equal(run[0], run[1])
    for cls in (RandBezierIntensityd, RandIntensityInversiond):
        with pytest.raises(KeyError):
            cls(keys=["a", "missing"], prob=1.0)({"a": x})
        out = cls(keys=["a", "missing"], prob=1.0, allow_missing_keys=True)({"a": x})
        assert "missing" not in out and not np.array_equal(out["a"], x)
        assert cls(keys="a", prob=0.0)({"a": x})["a"] is x
    meta = MetaTensor(torch.from_numpy(x)[None], affine=torch.eye(4) * 2, meta={"filename_or_obj": "f"})
    out = RandBezierIntensityd("img", prob=1.0)({"img": meta})["img"]
    assert isinstance(out, MetaTensor) and out.meta["filename_or_obj"] == "f" and torch.equal(out.affine, meta.affine)


def test_aggressive_composition():
    aug = aggressive_intensity_augmentation(prob_bezier=1.0, prob_inversion=1.0, value_range=(0.0, 10.0))
    assert isinstance(aug, Compose)
    remap, bezier, inversion = aug.transforms
    assert isinstance(remap, RandBodyContrastRemap) and remap.prob == 0.0  # the paper's defaults: no body remap
    assert isinstance(bezier, RandBezierIntensity) and isinstance(inversion, RandIntensityInversion)
    assert bezier.value_range == inversion.value_range == (0.0, 10.0)
    x = np.linspace(0.0, 10.0, 101)
    for seed in range(8):
        aug.set_random_state(seed)
        out = np.asarray(aug(x))
        # Bezier then inversion: the end points swap exactly when the curve was increasing
        assert (out[0], out[-1]) == ((0.0, 10.0) if bezier.decreasing else (10.0, 0.0))
        assert np.allclose(out, 10.0 - bezier(x, randomize=False))
    default = aggressive_intensity_augmentation()
    assert (default.transforms[1].prob, default.transforms[2].prob) == (0.8, 0.5)
    assert default.transforms[0].value_range == (LOW, HIGH)


def test_share_random_state_draws_nothing():
    aug = aggressive_intensity_augmentation()
    nested = Compose([aug, RandIntensityInversion()])
    state = np.random.RandomState(42)
    before = state.get_state()[1].copy(), state.get_state()[2]
    share_random_state(nested, state)
    after = state.get_state()
    assert np.array_equal(before[0], after[1]) and before[1] == after[2]
    assert nested.R is state and aug.R is state and all(t.R is state for t in aug.transforms)
    share_random_state(None, state)
    share_random_state(lambda v: v, state)


# ---- RandPatchPaird hook ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def volume():
    shape = (20, 60, 60)
    axes = [torch.arange(n, dtype=torch.float32) for n in shape]
    d, h, w = torch.meshgrid(*axes, indexing="ij")
    image = (2.0 * d + 1.5 * h + 1.0 * w - 40.0)[None]  # -40 .. 167: spans most of [-50, 205]
    return {"image": MetaTensor(image, affine=torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0])))}


class RecordingBezier(RandBezierIntensity):
    """Keeps each draw's lookup table."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.tables: list[np.ndarray] = []

    def __call__(self, img, randomize=True):
        out = super().__call__(img, randomize)
        self.tables.append(self.table.copy())
        return out


def apply_table(values: torch.Tensor, table: np.ndarray) -> np.ndarray:
    grid = np.linspace(0, 1, len(table))
    x01 = (np.clip(values.numpy().astype(np.float64), LOW, HIGH) - LOW) / (HIGH - LOW)
    return LOW + (HIGH - LOW) * np.interp(x01, grid, table)


def test_patch_pairs_apply_the_augmentation_to_each_patch(volume):
    recorder = RecordingBezier(prob=1.0)
    aug = RandPatchPaird(patch_size=PATCH, intensity_augmentation=recorder, keep_source=True, **NO_NOISE)
    plain = RandPatchPaird(patch_size=PATCH, keep_source=True, **NO_NOISE)
    aug.set_random_state(3)
    plain.set_random_state(3)
    assert recorder.R is aug.R
    differences = []
    for call in range(4):
        recorder.tables.clear()
        a, p = aug(volume), plain(volume)
        if call == 0:  # same seed: same geometry (the hook draws nothing before the geometry)
            for key in ("corr_ab", "valid_ab", "affine_a", "affine_b", "overlap"):
                assert torch.equal(a[key], p[key]), key
            assert torch.equal(a["image_a"].affine, p["image_a"].affine)
        assert len(recorder.tables) == 2  # once per patch
        table_a, table_b = recorder.tables
        differences.append(np.abs(table_a - table_b).max())
        # each patch went through its own map, applied to the geometry-only patch of the same draw
        assert isinstance(a["image_a"], MetaTensor) and a["image_a"].dtype == torch.float32
        for key, table in (("a", table_a), ("b", table_b)):
            if call == 0:
                assert np.allclose(a[f"image_{key}"].numpy(), apply_table(p[f"image_{key}"], table), atol=1e-3)
            assert a[f"image_{key}"].min() >= LOW and a[f"image_{key}"].max() <= HIGH
    assert min(differences) > 0.02  # independent draws for a and b

    # the hook sees the geometry-only patch: after resampling, before noise and blur
    seen = []

    def spy(patch):
        seen.append(patch.clone())
        return patch

    noisy = RandPatchPaird(patch_size=PATCH, intensity_augmentation=spy, noise_prob=1.0, blur_prob=1.0)
    out = noisy.set_random_state(3)(volume)
    first = plain.set_random_state(3)(volume)
    assert len(seen) == 2 and torch.equal(seen[0], first["image_a"].as_tensor())
    assert torch.equal(seen[1], first["image_b"].as_tensor()) and not torch.allclose(out["image_a"], seen[0])


def test_patch_pairs_with_composed_augmentation(volume):
    def run(seed, augment):
        kwargs = dict(noise_prob=1.0, blur_prob=1.0)
        if augment:
            kwargs["intensity_augmentation"] = aggressive_intensity_augmentation(prob_bezier=1.0, prob_inversion=0.5)
        t = RandPatchPaird(patch_size=PATCH, keep_source=True, **kwargs)
        t.set_random_state(seed)
        if augment:
            assert all(m.R is t.R for m in t.intensity_augmentation.transforms) and t.intensity_augmentation.R is t.R
        return [t(volume) for _ in range(3)]

    first, second, clean = run(5, True), run(5, True), run(5, False)
    for x, y in zip(first, second):
        for k in x:
            assert torch.equal(torch.as_tensor(x[k]), torch.as_tensor(y[k])), k
    for key in ("corr_ab", "valid_ab", "affine_a", "affine_b"):
        assert torch.equal(first[0][key], clean[0][key]), key
    assert not torch.allclose(first[0]["image_a"], clean[0]["image_a"], atol=1.0)

    # a transform that changes the shape is refused; a non-callable too
    bad = RandPatchPaird(patch_size=PATCH, intensity_augmentation=lambda v: v[:, :2], **NO_NOISE)
    with pytest.raises(ValueError, match="shape"):
        bad(volume)
    with pytest.raises(TypeError):
        RandPatchPaird(patch_size=PATCH, intensity_augmentation="bezier")


@pytest.mark.parametrize("reverse", [False, True])
def test_body_remap_ranks_the_body_and_keeps_the_background(reverse):
    rng = np.random.default_rng(0)
    x = rng.uniform(LOW, HIGH, (1, 6, 10, 10)).astype(np.float32)
    x[0, :, :3] = rng.uniform(LOW, -30.0, (6, 3, 10))  # background
    t = RandBodyContrastRemap(prob=1.0, reverse_prob=float(reverse), body_threshold=-25.0, body_low=0.0).set_random_state(0)
    y = t(x)
    assert y.shape == x.shape and y.dtype == np.float32
    background = x <= -25.0
    assert np.array_equal(y[background], x[background])
    body_in, body_out = x[~background], y[~background]
    assert body_out.min() == pytest.approx(0.0) and body_out.max() == pytest.approx(HIGH)
    order = np.argsort(body_in)
    steps = np.diff(body_out[order])
    assert np.all(steps < 0) if reverse else np.all(steps > 0)  # strictly monotone: ranks of distinct values
    # equalised: the output of the body is uniform on [body_low, high]
    assert np.allclose(np.sort(body_out), np.linspace(0.0, HIGH, body_out.size), atol=1e-3)


def test_body_remap_keeps_type_and_metadata_and_prob_zero_is_identity():
    x = torch.linspace(LOW, HIGH, 64, dtype=torch.float64).reshape(1, 4, 4, 4)
    meta = MetaTensor(x.clone(), affine=torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0])))
    out = RandBodyContrastRemap(prob=1.0).set_random_state(3)(meta)
    assert isinstance(out, MetaTensor) and out.dtype == torch.float64 and torch.equal(out.affine, meta.affine)
    assert not torch.equal(out.as_tensor(), x)
    assert torch.equal(RandBodyContrastRemap(prob=0.0)(x), x)
    with pytest.raises(ValueError, match="body_threshold < body_low"):
        RandBodyContrastRemap(body_threshold=10.0, body_low=0.0)


def test_project_augmentation_never_brightens_the_background():
    """The crosssam train.json settings (body remap, increasing Bezier, no whole-patch inversion) keep air dark:
    the background stays below the body's lowest value after every draw."""
    rng = np.random.default_rng(1)
    x = np.full((1, 6, 12, 12), LOW, dtype=np.float32)
    x[0, :, 3:9, 3:9] = rng.uniform(5.0, 80.0, (6, 6, 6))
    aug = aggressive_intensity_augmentation(prob_bezier=0.5, prob_inversion=0.0, decreasing_prob=0.0, prob_body_remap=0.5)
    share_random_state(aug, np.random.RandomState(0))
    for _ in range(50):
        y = aug(x)
        assert y[0, :, :3].max() <= y[0, :, 3:9, 3:9].min()
