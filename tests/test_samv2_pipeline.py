"""The ``samv2`` registration pipeline (``samv2_components.registration``: candidates, turn_search,
intensity_refinement, selection, pipeline): each step against known transforms (the footprint refinement and score
on a slab of the sample CT, the translation vote, the coarse turn ranking on the sample CT turned by 180 deg), the
refusal rules on constructed candidates, and the no-overlap refusal. The bundle's end-to-end run with this default is ``test_adareg.py``'s known rigid transform;
the no-overlap run through ``samv2 register`` is ``slow``."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

sitk = pytest.importorskip("SimpleITK")

from samv2_components.registration import (  # noqa: E402
    IntensityRefiner,
    MatchSet,
    ScanPair,
    ScoredCandidate,
    header_candidate,
    match_support,
    register_intensity,
    select_candidate,
)
from samv2_components.registration.selection import transforms_agree  # noqa: E402
from samv2_components.registration.intensity_baselines import matrix_to_sitk_transform, sitk_transform_to_matrix  # noqa: E402
from samv2_components.registration.candidates import translation_vote  # noqa: E402
from samv2_components.registration.intensity_refinement import footprint_mi, overlap_mask  # noqa: E402
from samv2_components.registration.pipeline import fov_gap_mm  # noqa: E402
from samv2_components.errors import SAMv2InputError  # noqa: E402
from samv2_components.sample_data import sample_path  # noqa: E402

from helpers import rigid, sample_ct_tre, sitk_affine, turned_sample_ct  # noqa: E402


@pytest.fixture(scope="module")
def ct_pair():
    """The sample CT (fixed) and its resampling through a known rigid transform (moving), with body masks
    (> -300 HU), as a :class:`ScanPair`; and the true fixed -> moving matrix."""
    fixed = sitk.ReadImage(sample_path("ct_abdomen"), sitk.sitkFloat32)
    truth = rigid(8.0, (0.2, 0.1, 1.0), (9.0, -14.0, 3.0))
    moving = sitk.Resample(fixed, fixed, sitk_affine(np.linalg.inv(truth)), sitk.sitkLinear, -1024.0)
    body = lambda im: sitk.Cast(im > -300.0, sitk.sitkUInt8)  # noqa: E731
    return ScanPair(fixed, moving, body(fixed), body(moving)), truth


def test_register_intensity_starts_from_the_given_matrix(ct_pair):
    """From a start 6 deg / 10 mm off the truth, the refinement lands on the truth; one iteration barely moves."""
    pair, truth = ct_pair
    start = rigid(6.0, (1.0, 0.3, 0.0), (6.0, -5.0, 5.0)) @ truth
    assert sample_ct_tre(start, truth)[1].mean() > 8.0
    res = register_intensity(pair.fixed, pair.moving, transform="rigid", initial_transform=start,
                             shrink_factors=(2, 1), smoothing_sigmas_mm=(2.0, 1.0), sampling_percentage=0.1, iterations=100)
    assert sample_ct_tre(sitk_transform_to_matrix(res.transform), truth)[1].mean() < 1.5
    # the start is really used: with a single tiny step the result stays at the start, not at a moments start
    one = register_intensity(pair.fixed, pair.moving, transform="rigid", initial_transform=start, shrink_factors=(2,),
                             smoothing_sigmas_mm=(2.0,), iterations=1, learning_rate_mm=0.01)
    assert np.abs(sitk_transform_to_matrix(one.transform) - start).max() < 0.1


@pytest.mark.parametrize("method", ["end", "symmetric"])
def test_refinement_pair_drops_the_network_padding(method):
    """The pair the refinement works on is the scan without the preprocessing's constant padding (a false body
    outline where a crop cuts the body): same voxels and same world position of every voxel as before padding."""
    from monai.transforms import DivisiblePadd

    from samv2_components.geometry import body_mask
    from samv2_components.registration.intensity_refinement import without_padding

    affine = torch.tensor([[0.0, 0.0, -2.0, 40.0], [0.0, -2.0, 0.0, 9.0], [2.0, 0.0, 0.0, -70.0], [0.0, 0.0, 0.0, 1.0]])
    array = torch.rand(1, 13, 21, 30) * 300.0 - 40.0
    scan = MetaTensor(array, affine=affine)
    padded = DivisiblePadd("image", k=(4, 16, 16), method=method, value=-50.0)({"image": scan})["image"]
    assert padded.shape[1:] == (16, 32, 32)
    unpadded, region = without_padding(padded)
    assert unpadded.shape == scan.shape and torch.equal(unpadded.as_tensor(), array)
    assert torch.allclose(unpadded.affine.double(), affine.double(), atol=1e-6)
    assert torch.equal(padded[(slice(None), *region)].as_tensor(), array)
    assert without_padding(scan)[0] is scan  # nothing recorded: nothing cut
    body = body_mask(padded, -25.0)
    pair = ScanPair.from_metatensors(padded, body, padded, body)
    assert pair.fixed.GetSize() == (13, 21, 30) and pair.moving_body.GetSize() == (13, 21, 30)
    assert np.array_equal(sitk.GetArrayFromImage(pair.fixed).transpose(2, 1, 0), array[0].numpy())
    assert np.array_equal(sitk.GetArrayFromImage(pair.fixed_body).transpose(2, 1, 0), body[region].numpy())


def test_overlap_mask_and_fraction_follow_the_transform(ct_pair):
    pair, truth = ct_pair
    mask, fraction = overlap_mask(pair, truth, margin_mm=0.0)
    assert fraction > 0.9  # the same body, aligned: nearly all of it is shared (some is resampled out of the grid)
    shifted_mask, shifted = overlap_mask(pair, rigid(0.0, (0, 0, 1), (0.0, 0.0, 60.0)) @ truth, margin_mm=0.0)
    assert 0.0 < shifted < fraction - 0.1  # a 6 cm shift along z shares less of the body
    far = rigid(0.0, (0, 0, 1), (2000.0, 0.0, 0.0)) @ truth  # the moving scan 2 m away
    far_mask, none = overlap_mask(pair, far, margin_mm=10.0)
    assert none == 0.0 and not sitk.GetArrayViewFromImage(far_mask).any()
    dilated, _ = overlap_mask(pair, truth, margin_mm=9.0)
    assert sitk.GetArrayViewFromImage(dilated).sum() > sitk.GetArrayViewFromImage(mask).sum()


@pytest.fixture(scope="module")
def slab_pair(ct_pair):
    """The ``ct_pair`` with the moving scan cut to a 40 mm axial slab through the middle: the small-FOV case."""
    pair, truth = ct_pair
    moving = pair.moving
    size = list(moving.GetSize())
    thickness = int(round(40.0 / moving.GetSpacing()[2]))
    start = [0, 0, (size[2] - thickness) // 2]
    slab = sitk.RegionOfInterest(moving, [size[0], size[1], thickness], start)
    body = sitk.Cast(slab > -300.0, sitk.sitkUInt8)
    return ScanPair(pair.fixed, slab, pair.fixed_body, body, small="moving"), truth


def test_refiner_recovers_a_known_transform_on_a_slab_and_scores_it_higher(slab_pair):
    """Refined on the slab's footprint, a start 5 deg / 10 mm off lands on the truth; the truth refined stays there
    (sampling on the large scan let it slide off the anatomy: 54 mm on the phantom benchmark)."""
    pair, truth = slab_pair
    refiner = IntensityRefiner(shrink_factors=(2, 1), smoothing_sigmas_mm=(2.0, 1.0))
    start = rigid(5.0, (0.0, 1.0, 0.3), (-7.0, 6.0, -4.0)) @ truth
    refined = refiner(pair, "start", start)
    assert not refined.error and sample_ct_tre(refined.fixed_to_moving, truth)[1].mean() < 2.0
    stay = refiner(pair, "truth", truth)
    assert sample_ct_tre(stay.fixed_to_moving, truth)[1].mean() < 1.5
    mi_start = footprint_mi(pair, start, pair.footprint(refiner.overlap_margin_mm))
    assert refined.mi > mi_start + 0.05 and refined.overlap_fraction > 0.9
    # a start with no overlap is not refined and says why
    far = refiner(pair, "far", rigid(0.0, (0, 0, 1), (0.0, 0.0, 3000.0)), min_overlap=0.0)
    assert far.error.startswith("body overlap 0.00") and np.isnan(far.mi)


def test_refiner_runs_each_level_on_the_cached_coarse_copy_with_the_full_resolution_footprint(slab_pair, monkeypatch):
    """One ITK run per pyramid level, on the pair's smoothed and shrunk copy (cached: a second candidate smooths
    nothing again), never ITK's own pyramid; the metric's mask is the full-resolution footprint at every level, and
    each level starts where the last ended."""
    from samv2_components.registration import intensity_refinement

    pair, truth = slab_pair
    pair = ScanPair(pair.fixed, pair.moving, pair.fixed_body, pair.moving_body, small="moving")  # an empty cache
    real, runs = intensity_refinement.register_intensity, []

    def recording(small, large, **kwargs):
        runs.append((small.GetSize(), large.GetSize(), kwargs["shrink_factors"], kwargs["smoothing_sigmas_mm"],
                     kwargs["fixed_mask"].GetSize(), kwargs["initial_transform"]))
        return real(small, large, **kwargs)

    monkeypatch.setattr(intensity_refinement, "register_intensity", recording)
    refiner = IntensityRefiner(shrink_factors=(4, 2, 1), smoothing_sigmas_mm=(4.0, 2.0, 1.0))
    start = rigid(4.0, (0.0, 1.0, 0.3), (-6.0, 5.0, -3.0)) @ truth
    refined = refiner.register(pair, start)
    size = np.asarray(pair.moving.GetSize())
    assert [r[0] for r in runs] == [tuple(int(n) for n in size // f) for f in (4, 2, 1)]  # the shrunk copies
    assert [r[1] for r in runs] == [tuple(int(n) for n in np.asarray(pair.fixed.GetSize()) // f) for f in (4, 2, 1)]
    assert all(r[2] == [1] and r[3] == [0.0] and r[4] == pair.moving.GetSize() for r in runs)
    np.testing.assert_allclose(runs[0][5], np.linalg.inv(start))  # small (moving) -> large: the inverse
    assert not np.allclose(runs[1][5], runs[0][5])  # the 4 mm level starts where the 8 mm one ended
    assert sample_ct_tre(refined, truth)[1].mean() < 2.0
    cached = {k for k in pair.cache if k[0] == "coarse"}
    assert cached == {("coarse", 4, 4.0), ("coarse", 2, 2.0), ("coarse", 1, 1.0)}
    copies = {k: pair.cache[k] for k in cached}
    refiner.register(pair, start)
    assert all(pair.cache[k] is copies[k] for k in cached)


class _ScriptedRefiner(IntensityRefiner):
    """A refiner whose registration runs return poses 1, 2, 3, ... (as translations along x) and whose score is
    ``mi_of[x]``: the restart logic alone, without an image."""

    def __init__(self, mi_of: dict, **settings):
        super().__init__(**settings)
        self.mi_of, self.runs = mi_of, []

    def register(self, pair, initial, shrink_factors=None, smoothing_sigmas_mm=None, **kwargs):
        self.runs.append(list(shrink_factors))
        matrix = np.eye(4)
        matrix[0, 3] = len(self.runs)
        return matrix

    def score(self, pair, fixed_to_moving):
        return self.mi_of[int(fixed_to_moving[0, 3])], 1.0


@pytest.mark.parametrize(
    "mi_of, levels, restarts, runs, pose",
    [
        # the first run stopped short: the finest level again, twice, each gain kept
        ({1: 0.49, 2: 0.58, 3: 0.60}, slice(None), 2, [[4, 2, 1], [1], [1]], 3),
        # a restart that does not gain by more than 0.2 % is dropped and ends the restarts
        ({1: 0.50, 2: 0.5005, 3: 0.9}, slice(None), 2, [[4, 2, 1], [1]], 1),
        ({1: 0.50, 2: 0.45}, slice(-1, None), 2, [[1], [1]], 1),
        # capped at `restarts`; none without the finest level or with restarts 0
        ({1: 0.1, 2: 0.2, 3: 0.3, 4: 0.4}, slice(-1, None), 1, [[1], [1]], 2),
        ({1: 0.1, 2: 0.2}, slice(0, -1), 2, [[4, 2]], 1),
        ({1: 0.1, 2: 0.2}, slice(None), 0, [[4, 2, 1]], 1),
    ],
)
def test_refinement_restarts_the_finest_level_while_the_score_rises(mi_of, levels, restarts, runs, pose):
    refiner = _ScriptedRefiner(mi_of, restarts=restarts)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("samv2_components.registration.intensity_refinement.overlap_mask", lambda *a, **k: (None, 1.0))
        refined = refiner(None, "c", np.eye(4), levels=levels)
    assert refiner.runs == runs
    assert refined.fixed_to_moving[0, 3] == pose and refined.mi == mi_of[pose]


def test_footprint_score_uses_the_same_samples_and_penalises_leaving_the_large_scan(slab_pair):
    """The slab placed at its true height scores higher than the slab slid 60 mm along the body, and a pose that
    maps it outside the CT scores nothing (those voxels meet the background)."""
    pair, truth = slab_pair
    footprint = pair.footprint(10.0)
    right = footprint_mi(pair, truth, footprint)
    slid = footprint_mi(pair, rigid(0.0, (0, 0, 1), (0.0, 0.0, 60.0)) @ truth, footprint)
    outside = footprint_mi(pair, rigid(0.0, (0, 0, 1), (0.0, 0.0, 400.0)) @ truth, footprint)
    assert right > slid + 0.05 and slid > outside and outside == 0.0
    # small and large swap roles: the score is the same map seen from the other side
    swapped = ScanPair(pair.moving, pair.fixed, pair.moving_body, pair.fixed_body, small="fixed")
    assert footprint_mi(swapped, np.linalg.inv(truth), footprint) == pytest.approx(right, rel=1e-6)


def _itk_mattes(pair, fixed_to_moving, footprint, bins=50):
    """ITK's own Mattes MI (MetricEvaluate over every footprint voxel), what footprint_mi computed until 0.9."""
    resampled = sitk.Resample(pair.large_image, pair.small_image, matrix_to_sitk_transform(pair.small_to_large(fixed_to_moving)),
                              sitk.sitkLinear, pair.background(), sitk.sitkFloat32)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=bins)
    reg.SetMetricSamplingStrategy(reg.NONE)
    reg.SetMetricFixedMask(footprint)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetInitialTransform(sitk.Transform(3, sitk.sitkIdentity))
    try:
        return -reg.MetricEvaluate(pair.small_image, resampled)
    except RuntimeError:  # every sample in the background: ITK refuses the constant image
        return 0.0


@pytest.mark.parametrize("bins", [50, 32])
def test_footprint_mi_is_itks_mattes_value(slab_pair, bins):
    """The footprint score equals ITK's MattesMutualInformationImageToImageMetricv4 value on the same samples, to
    1e-9 nats, from the truth to poses 60 mm off and partly outside the CT (background), both roles of the scans."""
    pair, truth = slab_pair
    footprint = pair.footprint(10.0)
    rng = np.random.default_rng(3)
    poses = [truth] + [rigid(float(rng.uniform(0, 30)), rng.normal(size=3), rng.normal(size=3) * 20.0) @ truth for _ in range(5)]
    poses.append(rigid(0.0, (0, 0, 1), (0.0, 0.0, 120.0)) @ truth)
    values = [footprint_mi(pair, pose, footprint, bins) for pose in poses]
    np.testing.assert_allclose(values, [_itk_mattes(pair, pose, footprint, bins) for pose in poses], rtol=0, atol=1e-9)
    assert values[0] > max(values[1:]) and len(set(np.round(values, 6))) == len(values)  # distinct, the truth best
    swapped = ScanPair(pair.moving, pair.fixed, pair.moving_body, pair.fixed_body, small="fixed")
    inverse = np.linalg.inv(poses[2])
    assert footprint_mi(swapped, inverse, footprint, bins) == pytest.approx(_itk_mattes(swapped, inverse, footprint, bins), abs=1e-9)


def test_mattes_value_of_degenerate_samples():
    """A constant image (ITK refuses it) scores 0; identical images score their entropy in the binned histogram."""
    from samv2_components.registration.intensity_refinement import mattes_mutual_information

    values = np.linspace(0.0, 1.0, 100_000)
    assert mattes_mutual_information(values, np.full(values.size, 3.0), (3.0, 3.0)) == 0.0
    assert mattes_mutual_information(np.full(values.size, 3.0), values, (0.0, 1.0)) == 0.0
    same = mattes_mutual_information(values, values, (0.0, 1.0))
    shuffled = mattes_mutual_information(values, np.random.default_rng(0).permutation(values), (0.0, 1.0))
    assert same > 2.5 and shuffled < 0.02


def test_normalized_gradient_fields_of_known_gradients():
    """Equal gradients of one size: each damped by eps = that size, (g.g)^2 / (2 |g|^2)^2 = 1/4, whatever the sign
    and scale of the contrast; orthogonal gradients and a constant image score 0; half the points agreeing, 1/8."""
    from samv2_components.registration.edge_agreement import normalized_gradient_fields

    g = np.tile([[3.0, 0.0, 4.0]], (50, 1))
    assert normalized_gradient_fields(g, g) == pytest.approx(0.25)
    assert normalized_gradient_fields(g, -2.0 * g) == pytest.approx(0.25)
    assert normalized_gradient_fields(g, np.tile([[4.0, 0.0, -3.0]], (50, 1))) == pytest.approx(0.0, abs=1e-12)
    assert normalized_gradient_fields(g, np.zeros_like(g)) == 0.0
    half = np.concatenate([g[:25], np.tile([[4.0, 0.0, -3.0]], (25, 1))])
    assert normalized_gradient_fields(g, half) == pytest.approx(0.125)


def test_edge_agreement_is_highest_at_the_truth_and_blind_to_the_contrast(slab_pair):
    """On the slab: the truth's edge agreement beats the slab slid 20 mm along the body and tilted 6 deg; with the
    roles swapped (the slab as the fixed scan, the inverse map) it is the same map seen from the other side and
    scores the same; the large scan with its contrast inverted and rescaled (bone dark, as in a T2 MR) scores the
    same; a pose that meets only the large scan's background scores 0, an empty footprint NaN."""
    from samv2_components.registration import footprint_edge_agreement

    pair, truth = slab_pair
    footprint = pair.footprint(10.0)
    right = footprint_edge_agreement(pair, truth, footprint)
    slid = footprint_edge_agreement(pair, rigid(0.0, (0, 0, 1), (0.0, 0.0, 20.0)) @ truth, footprint)
    tilted = footprint_edge_agreement(pair, rigid(6.0, (1, 0, 0), (0.0, 0.0, 0.0)) @ truth, footprint)
    assert right > 1.2 * max(slid, tilted) and 0.0 < right < 1.0
    swapped = ScanPair(pair.moving, pair.fixed, pair.moving_body, pair.fixed_body, small="fixed")
    assert footprint_edge_agreement(swapped, np.linalg.inv(truth), footprint) == pytest.approx(right, rel=1e-6)
    inverted = ScanPair(pair.fixed * -0.5 + 100.0, pair.moving, pair.fixed_body, pair.moving_body, small="moving")
    # equal up to the few footprint voxels that fall outside the CT's grid, where both take their own background
    assert footprint_edge_agreement(inverted, truth, footprint) == pytest.approx(right, rel=0.05)
    assert footprint_edge_agreement(pair, rigid(0.0, (0, 0, 1), (0.0, 0.0, 400.0)) @ truth, footprint) == 0.0
    assert np.isnan(footprint_edge_agreement(pair, truth, footprint * 0))


def test_translation_vote_finds_the_shift_one_match_in_ten_agrees_on():
    rng = np.random.default_rng(0)
    rotation = rigid(30.0, (0.2, 0.3, 1.0), (0, 0, 0))[:3, :3]
    shift = np.array([12.0, -40.0, 25.0])
    fixed = rng.uniform(-120, 120, (600, 3))
    moving = fixed @ rotation.T + shift + rng.normal(0.0, 1.5, (600, 3))
    wrong = rng.random(600) >= 0.1  # nine in ten matches land anywhere
    moving[wrong] = rng.uniform(-150, 150, (int(wrong.sum()), 3))
    t, count = translation_vote(MatchSet("m", fixed, moving, np.ones(600)), rotation, bandwidth_mm=10.0)
    assert np.linalg.norm(t - shift) < 1.5 and count >= 0.08 * 600
    assert translation_vote(MatchSet("none", np.zeros((0, 3)), np.zeros((0, 3)), np.zeros(0)), rotation)[1] == 0


def test_header_candidate_aligns_the_body_centres():
    affine = torch.tensor([[-2.0, 0, 0, 10], [0, -2.0, 0, 20], [0, 0, 2.0, -30], [0, 0, 0, 1]], dtype=torch.float64)  # RAS
    fixed, moving = torch.zeros(1, 20, 20, 20), torch.zeros(1, 20, 20, 20)
    fixed[0, 2:6, 4:8, 6:10] = 1.0  # centre index (3.5, 5.5, 7.5)
    moving[0, 10:14, 12:16, 3:7] = 1.0  # centre index (11.5, 13.5, 4.5): +8, +8, -3 voxels
    c = header_candidate(MetaTensor(fixed, affine=affine), fixed[0] > 0, MetaTensor(moving, affine=affine), moving[0] > 0)
    # 2 mm voxels; RAS x, y flip to LPS: index +8 along RAS -x is +16 mm in LPS x
    np.testing.assert_allclose(c.fixed_to_moving[:3, 3], [16.0, 16.0, -6.0], atol=1e-9)
    np.testing.assert_array_equal(c.fixed_to_moving[:3, :3], np.eye(3))


def test_classical_candidate_is_the_intensity_registration_from_the_centres_of_mass(ct_pair):
    """``classical``: SimpleITK rigid MI from the centres of mass on the whole scans recovers the known 8 deg /
    17 mm transform of the sample CT (the header start alone is far from it), with the settings passed through."""
    from samv2_components.registration.candidates import classical_candidate

    pair, truth = ct_pair
    fast = {"shrink_factors": (4, 2), "smoothing_sigmas_mm": (4.0, 2.0), "sampling_percentage": 0.1, "iterations": 100}
    c = classical_candidate(pair.fixed, pair.moving, {**fast, "transform": "affine"})  # stays rigid
    assert c.name == "classical" and c.info["seconds"] > 0
    np.testing.assert_allclose(c.fixed_to_moving[:3, :3] @ c.fixed_to_moving[:3, :3].T, np.eye(3), atol=1e-6)
    assert sample_ct_tre(c.fixed_to_moving, truth)[1].mean() < 2.0
    assert sample_ct_tre(np.eye(4), truth)[1].mean() > 10.0
    # the settings reach the registration: one tiny step from the moments start stays far from the truth
    stuck = classical_candidate(pair.fixed, pair.moving, {**fast, "iterations": 1, "learning_rate_mm": 0.01})
    assert sample_ct_tre(stuck.fixed_to_moving, truth)[1].mean() > 5.0


def test_match_support_counts_consistent_matches_in_the_best_set():
    rng = np.random.default_rng(0)
    truth = rigid(20.0, (0.0, 0.0, 1.0), (5.0, -3.0, 8.0))
    fixed = rng.uniform(-100, 100, (40, 3))
    moving = fixed @ truth[:3, :3].T + truth[:3, 3]
    moving[:10] += rng.normal(0, 1.0, (10, 3)) * 2.0  # within a few mm
    moving[30:] += 50.0  # 10 wrong matches
    good = MatchSet("right way round", fixed, moving, np.ones(40))
    garbage = MatchSet("wrong way round", fixed, rng.uniform(-100, 100, (40, 3)), np.ones(40))
    support, name = match_support(truth, [garbage, good], tolerance_mm=10.0)
    assert support == pytest.approx(0.75) and name == "right way round"
    off, _ = match_support(rigid(0.0, (0, 0, 1), (30.0, 0.0, 0.0)) @ truth, [good], tolerance_mm=10.0)
    assert off == 0.0
    assert match_support(truth, [], 10.0) == (0.0, "")


CORNERS = np.array([[a, b, c] for a in (-50.0, 50.0) for b in (-50.0, 50.0) for c in (-50.0, 50.0)])


def _candidate(name, shift_mm=0.0, mi=0.5, support=0.3, overlap=0.9, error=""):
    return ScoredCandidate(name, rigid(0.0, (0, 0, 1), (shift_mm, 0.0, 0.0)), mi, support, overlap, error)


def test_two_disagreeing_candidates_of_equal_score_are_a_refusal():
    sel = select_candidate([_candidate("a"), _candidate("b", shift_mm=30.0)], CORNERS)
    assert not sel.success and sel.winner is None and "no clear winner" in sel.reason
    assert sel.record["winner"] is None and {c["name"] for c in sel.record["candidates"]} == {"a", "b"}


def test_body_points_sample_the_mask_every_step_in_lps():
    """A RAS-affine MetaTensor with 2 x 2 x 4 mm voxels: every 4th, 4th and 2nd voxel of the mask (8 mm), placed by
    the affine and flipped to LPS."""
    from samv2_components.geometry import body_points

    affine_ras = np.diag([2.0, 2.0, 4.0, 1.0])
    affine_ras[:3, 3] = [10.0, -20.0, 30.0]
    mask = torch.zeros(12, 10, 6, dtype=torch.bool)
    mask[2:11, 0:5, 1:6] = True
    points = body_points(MetaTensor(torch.zeros(1, 12, 10, 6), affine=torch.as_tensor(affine_ras)), mask, step_mm=8.0)
    expected = [[-(10.0 + 2.0 * i), -(-20.0 + 2.0 * j), 30.0 + 4.0 * k]
                for i in (4, 8) for j in (0, 4) for k in (2, 4)]  # mask voxels on indices 0, 4, 8 / 0, 4 / 0, 2, 4
    np.testing.assert_allclose(sorted(points.tolist()), sorted(expected))


def test_answers_are_compared_by_their_mean_distance_over_the_body():
    """On a thin slab (300 x 200 x 40 mm) a 4 deg tilt about the anterior-posterior axis moves the far corners of its
    box by ~10 mm but its points by ~5 mm on average: one answer. A 10 mm shift is another answer."""
    grid = np.stack(np.meshgrid(np.arange(-150.0, 151.0, 8.0), np.arange(-100.0, 101.0, 8.0), np.arange(-20.0, 21.0, 8.0),
                                indexing="ij"), -1).reshape(-1, 3)
    tilted = rigid(4.0, (0.0, 1.0, 0.0), (0.0, 0.0, 0.0))
    box = np.array([[a, b, c] for a in (-150.0, 150.0) for b in (-100.0, 100.0) for c in (-20.0, 20.0)])
    assert np.max(np.linalg.norm(box @ tilted[:3, :3].T - box, axis=1)) > 8.0
    assert transforms_agree(np.eye(4), tilted, grid, 8.0)
    assert not transforms_agree(np.eye(4), rigid(0.0, (0, 0, 1), (10.0, 0.0, 0.0)), grid, 8.0)
    sel = select_candidate([_candidate("a", mi=0.50), ScoredCandidate("tilted", tilted, 0.49, 0.3, 0.9)], grid)
    assert sel.success and sel.record["agreeing"] == ["a", "tilted"] and sel.rival is None


def test_compared_points_of_a_small_moving_scan_are_mapped_back_through_the_best_candidate():
    """The small body's points (moving space, LPS) go into the fixed scan through the best-MI candidate's inverse: a
    known 25 deg / 30 mm transform maps them back onto the fixed points they came from; a small fixed scan's points
    stay as they are."""
    from samv2_components.registration import SAMv2RigidPipeline

    fixed_points = np.random.default_rng(1).uniform(-80.0, 80.0, size=(50, 3))
    truth = rigid(25.0, (0.2, 1.0, -0.5), (30.0, -12.0, 5.0))
    moving_points = fixed_points @ truth[:3, :3].T + truth[:3, 3]
    scored = [ScoredCandidate("worse", rigid(0.0, (0, 0, 1), (40.0, 0.0, 0.0)), 0.30, 0.1, 0.9),
              ScoredCandidate("best", truth, 0.55, 0.1, 0.9), ScoredCandidate("failed", np.eye(4), float("nan"), 0.0, 0.0, "x")]
    np.testing.assert_allclose(SAMv2RigidPipeline._compared_points("moving", moving_points, scored), fixed_points, atol=1e-9)
    np.testing.assert_array_equal(SAMv2RigidPipeline._compared_points("fixed", fixed_points, scored), fixed_points)


def test_selection_picks_a_clear_winner_and_merges_agreeing_candidates():
    # clearly higher MI
    sel = select_candidate([_candidate("a", mi=0.60), _candidate("b", shift_mm=30.0, mi=0.50)], CORNERS)
    assert sel.success and sel.winner.name == "a" and sel.rival.name == "b"
    # same MI but clearly more SAM support
    sel = select_candidate([_candidate("a", support=0.1), _candidate("b", shift_mm=30.0, support=0.4)], CORNERS)
    assert sel.success and sel.winner.name == "b"
    # higher MI but the rival is clearly better supported: the scores disagree, refusal
    sel = select_candidate([_candidate("a", mi=0.60, support=0.1), _candidate("b", shift_mm=30.0, mi=0.5, support=0.4)], CORNERS)
    assert not sel.success and "no clear winner" in sel.reason
    # candidates within agreement_mm are one answer: no rival, no refusal
    sel = select_candidate([_candidate("a"), _candidate("b", shift_mm=3.0)], CORNERS, agreement_mm=8.0)
    assert sel.success and sel.rival is None and sel.record["agreeing"] == ["a", "b"]


def test_selection_refuses_without_overlap_or_support():
    sel = select_candidate([_candidate("a", overlap=0.05), _candidate("b", error="body overlap 0.00 at the start", mi=float("nan"))], CORNERS)
    assert not sel.success and sel.reason.startswith("the scans do not overlap")
    sel = select_candidate([_candidate("a", support=0.01)], CORNERS, min_support=0.05)
    assert not sel.success and "is supported by the embedding matches" in sel.reason
    # an ineligible candidate cannot be a rival, and a refined-but-failed one is never the winner
    sel = select_candidate([_candidate("a", mi=0.4), _candidate("b", shift_mm=40.0, mi=0.9, support=0.0)], CORNERS)
    assert sel.success and sel.winner.name == "a"


def test_selection_refuses_when_no_candidate_shares_information():
    """A noise scan against a body: MI of a few thousandths of a nat, where a 10 % relative lead is noise too (the
    bundle run on such a scan had written a 120 deg "answer" at MI 0.0016 over a rival's 0.0014)."""
    noise = [_candidate("a", mi=0.0016, support=0.02), _candidate("b", shift_mm=40.0, mi=0.0014, support=0.02)]
    sel = select_candidate(noise, CORNERS, min_support=0.0)
    assert not sel.success and sel.reason.startswith("the scans share no information") and "0.002 nats" in sel.reason
    assert select_candidate(noise, CORNERS, min_support=0.0, min_mi=0.001).success  # the rule, not another, refused
    # a candidate below the floor is not eligible, so it is no rival either
    sel = select_candidate([_candidate("a", mi=0.30), _candidate("b", shift_mm=40.0, mi=0.04)], CORNERS)
    assert sel.success and sel.rival is None


def test_edges_settle_a_near_tie_in_mi():
    """Rule 5's edge witness (the values of a validation slab, seed 1: the right answer 1.3 % ahead in MI, 11.5 % in
    edge agreement, of the slab slid one level, 21.8 mm off): a clear win with ``edge_margin`` 0.1, a refusal with
    MI alone, with a smaller edge lead, with the edges behind the MI winner, or unmeasured; never for a turned
    winner (rule 6 asks MI)."""
    right, slid = _candidate("header", mi=0.5607), _candidate("shift_header_1", shift_mm=20.0, mi=0.5533)
    right.edges, slid.edges = 0.0967, 0.0867
    assert not select_candidate([right, slid], CORNERS, edge_margin=float("inf")).success
    sel = select_candidate([right, slid], CORNERS, edge_margin=0.1)
    assert sel.success and sel.winner.name == "header" and sel.record["candidates"][0]["edges"] == 0.0967
    slid.edges = 0.09
    sel = select_candidate([right, slid], CORNERS, edge_margin=0.1)
    assert not sel.success and "edges 0.097" in sel.reason and "edges 0.090" in sel.reason
    slid.edges, right.mi, slid.mi = 0.0867, 0.5533, 0.5607  # the edges favour the MI loser: no clear winner
    assert not select_candidate([right, slid], CORNERS, edge_margin=0.1).success
    right.mi, slid.mi, slid.edges = 0.5607, 0.5533, float("nan")
    assert not select_candidate([right, slid], CORNERS, edge_margin=0.1).success
    turned = ScoredCandidate("turned", rigid(180.0, (0, 1, 0), (0.0, 0.0, 0.0)), 0.5607, 0.3, 0.9, edges=0.0967)
    other = ScoredCandidate("turned_other", rigid(90.0, (1, 0, 0), (0.0, 0.0, 0.0)), 0.5533, 0.3, 0.9, edges=0.0867)
    assert not select_candidate([turned, other], CORNERS, edge_margin=0.1).success


def test_far_better_edges_of_another_answer_veto_the_mi_winner():
    """Rule 5b (the values of a validation hard case, seed 4): a 180 deg turned answer 25 % ahead in MI, with 41 %
    less edge agreement than the right-way-up answer it beats, is a refusal with ``edges_against_margin`` 0.3 and
    the turned answer without it (rule 6 alone lets a 10 % lead overturn the headers); a lead of 8 % in edges (the
    most any right answer's rival had on the validation draws) vetoes nothing; unmeasured edges veto nothing."""
    turned = ScoredCandidate("turn_21", rigid(180.0, (0, 1, 0), (0.0, 0.0, 0.0)), 0.5564, 0.0, 0.9, edges=0.0443)
    upright = ScoredCandidate("vote", rigid(0.0, (0, 0, 1), (30.0, 0.0, 0.0)), 0.4442, 0.034, 0.9, edges=0.0751)
    sel = select_candidate([turned, upright], CORNERS, min_support=0.0, edges_against_margin=float("inf"))
    assert sel.success and sel.winner.name == "turn_21"
    sel = select_candidate([turned, upright], CORNERS, min_support=0.0, edges_against_margin=0.3)
    assert not sel.success and sel.record["rival"] == "vote" and "by far in edge agreement" in sel.reason
    assert sel.record["rules"]["edges_against_margin"] == 0.3
    upright.edges = 0.0443 * 1.08
    assert select_candidate([turned, upright], CORNERS, min_support=0.0, edges_against_margin=0.3).success
    upright.edges = float("nan")
    assert select_candidate([turned, upright], CORNERS, min_support=0.0, edges_against_margin=0.3).success
    # an answer that agrees with the winner is the same answer: its edges veto nothing
    near = ScoredCandidate("shift_turn_21_0", rigid(180.0, (0, 1, 0), (2.0, 0.0, 0.0)), 0.50, 0.0, 0.9, edges=0.09)
    assert select_candidate([turned, near], CORNERS, min_support=0.0, edges_against_margin=0.3).success


def test_a_turned_winner_must_clearly_beat_the_headers_orientation():
    """Rule 6: a candidate turned 180 deg that leads the best upright answer by less than turn_margin is a refusal
    (a thin slab looks alike turned about the anterior axis), even where more SAM support makes it the clear
    winner of rule 5; by more, it wins."""
    turned = lambda name, mi, support=0.3: ScoredCandidate(name, rigid(180.0, (0, 1, 0), (0.0, 0.0, 0.0)), mi, support, 0.9)  # noqa: E731
    sel = select_candidate([turned("turned", 0.54), _candidate("upright", mi=0.50)], CORNERS, mi_margin=0.05, turn_margin=0.1)
    assert not sel.success and sel.record["rival"] == "upright"
    sel = select_candidate([turned("turned", 0.54, support=0.5), _candidate("upright", mi=0.50)], CORNERS, mi_margin=0.05, turn_margin=0.1)
    assert not sel.success and "turned 180 deg" in sel.reason and sel.record["rival"] == "upright"
    sel = select_candidate([turned("turned", 0.60), _candidate("upright", mi=0.50)], CORNERS, mi_margin=0.05, turn_margin=0.1)
    assert sel.success and sel.winner.name == "turned"
    # a turned winner needs turn_margin over its rival too, turned or not (mi_margin would pass 3.4 %)
    other_turn = ScoredCandidate("turned_other", rigid(90.0, (1, 0, 0), (0.0, 0.0, 0.0)), 0.58, 0.3, 0.9)
    sel = select_candidate([turned("turned", 0.60), other_turn, _candidate("upright", mi=0.40)], CORNERS, mi_margin=0.03, turn_margin=0.1)
    assert not sel.success and sel.record["rival"] == "turned_other" and "no clear winner: turned" in sel.reason
    other_turn.mi = 0.53
    assert select_candidate([turned("turned", 0.60), other_turn, _candidate("upright", mi=0.40)], CORNERS, mi_margin=0.03, turn_margin=0.1).success
    # an upright winner needs only the ordinary margin over a turned rival
    sel = select_candidate([_candidate("upright", mi=0.54), turned("turned", 0.50)], CORNERS, mi_margin=0.05, turn_margin=0.1)
    assert sel.success and sel.winner.name == "upright"


def test_tilted_answers_compete_only_when_they_clearly_win():
    """Rule 2: a tilt-born answer 30 mm from the best other one, ahead by less than ``tilt_margin``, is set aside
    with every tilt-born candidate (the other answer wins; a tilt-born rival within ``mi_margin`` no longer makes
    the run refuse); ahead by more, it competes and wins; one agreeing with the best other answer changes nothing."""
    tilted = lambda name, shift, mi: ScoredCandidate(name, rigid(0.0, (0, 0, 1), (shift, 0.0, 0.0)), mi, 0.3, 0.9, tilt=True)  # noqa: E731
    # a tilt 1.7 % ahead: set aside, the header-born answer wins (without the rule: a refusal between the two)
    close = [tilted("tilt_4", 30.0, 0.5615), _candidate("adareg", mi=0.5522), tilted("shift_tilt_4_0", -30.0, 0.55)]
    sel = select_candidate(close, CORNERS, tilt_margin=0.05)
    assert sel.success and sel.winner.name == "adareg" and sel.record["tilts_set_aside"] == ["tilt_4", "shift_tilt_4_0"]
    assert not select_candidate(close, CORNERS, tilt_margin=0.0).success
    # behind the header-born winner but within mi_margin: set aside too, no refusal
    sel = select_candidate([_candidate("adareg", mi=0.56), tilted("tilt_4", 30.0, 0.55)], CORNERS, tilt_margin=0.05)
    assert sel.success and sel.winner.name == "adareg" and sel.rival is None
    # clearly ahead: it competes (and wins by mi_margin)
    sel = select_candidate([tilted("tilt_4", 30.0, 0.60), _candidate("adareg", mi=0.55)], CORNERS, tilt_margin=0.05)
    assert sel.success and sel.winner.name == "tilt_4" and "tilts_set_aside" not in sel.record
    # agreeing with the best other answer (3 mm): nothing set aside, one answer
    sel = select_candidate([tilted("tilt_4", 3.0, 0.56), _candidate("adareg", mi=0.55)], CORNERS, tilt_margin=0.05)
    assert sel.success and sel.winner.name == "tilt_4" and "tilts_set_aside" not in sel.record
    # only tilt-born candidates: they stand
    assert select_candidate([tilted("tilt_4", 0.0, 0.56)], CORNERS, min_support=0.0).winner.name == "tilt_4"


def test_fov_gap_of_scans_two_metres_apart():
    image = MetaTensor(torch.zeros(1, 10, 10, 10), affine=torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0], dtype=torch.float64)))
    far_affine = torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0], dtype=torch.float64))
    far_affine[0, 3] = 2000.0
    assert fov_gap_mm(image, image) == 0.0
    assert fov_gap_mm(image, MetaTensor(torch.zeros(1, 10, 10, 10), affine=far_affine)) == pytest.approx(2000.0 - 18.0)


@pytest.mark.slow
def test_scans_without_overlap_are_refused_with_exit_3(tmp_path, capsys):
    """The sample CT moved 2 m away (its origin): ``samv2 register`` refuses with one line saying the scans do not
    overlap, exit status 3, only summary.json written."""
    from samv2_components.cli import EXIT_NOT_CONFIDENT, main

    ct = sitk.ReadImage(sample_path("ct_abdomen"))
    far = sitk.Image(ct)
    far.SetOrigin((np.array(ct.GetOrigin()) + [0.0, 0.0, 2000.0]).tolist())
    path = str(tmp_path / "ct_far.nii.gz")
    sitk.WriteImage(far, path)
    out = tmp_path / "out"
    status = main(["register", "--fixed", sample_path("ct_abdomen"), "--moving", path, "--moving_modality", "ct",
                   "--output_dir", str(out), "--deformable", "false"])
    err = capsys.readouterr().err
    assert status == EXIT_NOT_CONFIDENT, err[-2000:]
    (line,) = [x for x in err.splitlines() if x.startswith("ERROR:")]
    assert "do not overlap" in line
    folder = out / "ct_abdomen__ct_far"
    assert sorted(os.listdir(folder)) == ["summary.json"]
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["confidence"]["success"] is False and summary["confidence"]["pipeline"] == "samv2"


def test_turn_search_ranks_the_true_turn_of_a_reversed_scan_first(tmp_path):
    """The sample CT turned head-to-foot (180 deg about y, plus 7 deg and a shift) and preprocessed by the bundle:
    the coarse intensity ranking puts the true turn first, with a coarse pose close enough for the refinement."""
    from samv2_components.geometry import body_mask
    from samv2_components.inference import BundlePipeline
    from samv2_components.geometry import rotation_angle_deg
    from samv2_components.registration.turn_search import IntensityTurnSearch

    path, truth = turned_sample_ct(str(tmp_path / "ct_turned.nii.gz"), np.diag([-1.0, 1.0, -1.0]))
    bundle = BundlePipeline(os.path.join(os.path.dirname(__file__), "..", "bundles", "crosssam_registration"))
    fixed, moving = bundle.preprocess(sample_path("ct_abdomen"), "ct"), bundle.preprocess(path, "ct")
    pair = ScanPair.from_metatensors(fixed, body_mask(fixed), moving, body_mask(moving))
    ranked, record = IntensityTurnSearch()(pair, moving, IntensityRefiner())
    assert len(ranked) == 24 and len({c.index for c in ranked}) == 24 and record["level_mm"] == pytest.approx(8.0)
    best = ranked[0]
    assert best.registered and rotation_angle_deg(np.linalg.inv(truth) @ best.fixed_to_moving) < 15.0
    assert sample_ct_tre(best.fixed_to_moving, truth)[1].mean() < 20.0
    # the header orientation (turn 0) is far from it
    (upright,) = [c for c in ranked if c.index == 0]
    assert rotation_angle_deg(np.linalg.inv(truth) @ upright.fixed_to_moving) > 90.0


def test_tilt_lattice_covers_every_rotation_within_its_range():
    """32 proper rotations between 20 and 40 deg; any rotation within 40 deg lies within 20 deg of one of them or of
    the identity (so within the refinement's capture range of a candidate); a coarser lattice leaves gaps."""
    from samv2_components.geometry import rotation_angle_deg
    from samv2_components.registration.turn_search import tilt_lattice

    tilts = tilt_lattice(20.0, 40.0)
    assert len(tilts) == 32
    for r in tilts:
        assert np.allclose(r.T @ r, np.eye(3), atol=1e-12) and np.linalg.det(r) == pytest.approx(1.0)
    angles = sorted(rotation_angle_deg(r) for r in tilts)
    assert angles[0] == pytest.approx(20.0) and angles[-1] == pytest.approx(40.0)
    assert sum(a == pytest.approx(20.0) for a in angles) == 6  # +-20 deg about each axis

    rng = np.random.default_rng(0)
    samples = [rigid(rng.uniform(0.0, 40.0), rng.normal(size=3), np.zeros(3))[:3, :3] for _ in range(300)]

    def worst_gap(lattice):
        return max(min(rotation_angle_deg(r.T @ s) for r in [np.eye(3), *lattice]) for s in samples)

    assert worst_gap(tilts) < 20.0
    assert worst_gap(tilt_lattice(40.0, 40.0)) > 20.0
    with pytest.raises(SAMv2InputError, match="step_deg"):
        tilt_lattice(0.0, 40.0)


def test_tilt_search_ranks_the_tilt_nearest_an_oblique_turn_first(tmp_path):
    """The sample CT turned 35 deg about an oblique axis (plus 7 deg and a shift): the coarse tilt ranking puts a
    tilt near the truth first, with a coarse pose the refinement can finish, where the headers' orientation is 30+
    deg off."""
    from samv2_components.geometry import body_mask
    from samv2_components.inference import BundlePipeline
    from samv2_components.geometry import rotation_angle_deg
    from samv2_components.registration.turn_search import IntensityTiltSearch

    turn = rigid(35.0, (1.0, 0.4, -0.6), np.zeros(3))[:3, :3]
    path, truth = turned_sample_ct(str(tmp_path / "ct_tilted.nii.gz"), turn)
    bundle = BundlePipeline(os.path.join(os.path.dirname(__file__), "..", "bundles", "crosssam_registration"))
    fixed, moving = bundle.preprocess(sample_path("ct_abdomen"), "ct"), bundle.preprocess(path, "ct")
    pair = ScanPair.from_metatensors(fixed, body_mask(fixed), moving, body_mask(moving))
    search = IntensityTiltSearch()
    ranked, record = search(pair, IntensityRefiner())
    assert len(ranked) == 32 and record["ranked"][0] == ranked[0].describe() and "tilt" in record["ranked"][0]
    assert rotation_angle_deg(truth) > 30.0
    best = ranked[0]
    assert best.registered and best.voxel_rotation is None
    assert rotation_angle_deg(np.linalg.inv(truth) @ best.fixed_to_moving) < 15.0
    assert sample_ct_tre(best.fixed_to_moving, truth)[1].mean() < 20.0


class _RecordingRefiner:
    """Records ``(name, levels, restarts)`` of each refinement and ``("restart", x shift)`` of each restart; a
    refinement answers ``results[name]`` (default: ``result``, None: the start) with ``mi_of.get(name, mi)``, a
    restart keeps the pose and adds 0.01 to its MI."""

    overlap_margin_mm = 10.0

    def __init__(self, mi: float, overlap: float, result=None, results=None, mi_of=None):
        self.mi, self.overlap, self.result, self.results, self.mi_of, self.calls = mi, overlap, result, results or {}, mi_of or {}, []

    def __call__(self, pair_, name, initial, min_overlap=0.0, levels=slice(None), restarts=None):
        from samv2_components.registration.intensity_refinement import RefinedCandidate

        self.calls.append((name, levels, restarts))
        result = self.results.get(name, initial if self.result is None else self.result)
        return RefinedCandidate(name, initial, result, self.mi_of.get(name, self.mi), self.overlap, 0.5)

    def restart(self, pair_, matrix, mi, fraction, restarts=None):
        self.calls.append(("restart", float(matrix[0, 3])))
        return matrix, mi + 0.01, fraction


def _pipeline_recording_refinements(mi: float, overlap: float, result=None, **settings):
    """A pipeline whose refiner is a :class:`_RecordingRefiner`; returns it and its list of calls."""
    from samv2_components.registration import SAMv2RigidPipeline

    pipeline = SAMv2RigidPipeline(adareg=None, **settings)
    pipeline.refiner = _RecordingRefiner(mi, overlap, result)
    return pipeline, pipeline.refiner.calls


def _coarse_candidates(*rows):
    """Scored candidates ``(name, x shift mm, mi, finest level done)``, support 0.1, overlap 0.9, 1 s refinement."""
    return [ScoredCandidate(name, rigid(0.0, (0, 0, 1), (shift, 0.0, 0.0)), mi, 0.1, 0.9, "",
                            {"finest_level": finest, "refinement_seconds": 1.0}, start=np.eye(4))
            for name, shift, mi, finest in rows]


def test_only_the_best_distinct_answers_get_the_finest_level(ct_pair):
    """``refine_top_k`` 2: the finest pyramid level runs for the best answer and the best *different* one; a
    candidate agreeing with a better one, and the rest, keep their coarse refinement."""
    pair, _ = ct_pair
    pipeline, calls = _pipeline_recording_refinements(mi=0.9, overlap=1.0, refine_top_k=2)
    scored = _coarse_candidates(("a", 0.0, 0.5, False), ("b", 3.0, 0.45, False), ("c", 30.0, 0.4, False), ("d", 60.0, 0.3, False))
    pipeline._finish(pair, scored, CORNERS, [])
    assert calls[:2] == [("a", slice(-1, None), 0), ("c", slice(-1, None), 0)]
    assert [c.info["finest_level"] for c in scored] == [True, False, True, False]
    assert scored[0].mi == 0.91 and scored[1].mi == 0.45 and scored[0].info["refinement_seconds"] >= 1.5


@pytest.mark.parametrize("c_lands_mm, restarted", [(2.0, ["a"]), (30.0, ["a", "c"])])
def test_restarts_go_to_the_answers_still_distinct_after_the_finest_level(ct_pair, c_lands_mm, restarted):
    """The finest level runs once for the best distinct answers (``a`` and ``c``, 30 mm apart after the coarser
    levels); when ``c``'s finest run lands on ``a``'s answer (2 mm), only ``a`` is restarted (one answer, polished
    once); when ``c`` stays 30 mm away, both are."""
    pair, _ = ct_pair
    pipeline, calls = _pipeline_recording_refinements(mi=0.6, overlap=1.0, refine_top_k=2)
    pipeline.refiner.results = {"a": rigid(0.0, (0, 0, 1), (0.0, 0.0, 0.0)), "c": rigid(0.0, (0, 0, 1), (c_lands_mm, 0.0, 0.0))}
    pipeline.refiner.mi_of = {"c": 0.58}
    scored = _coarse_candidates(("a", 0.0, 0.5, False), ("b", 3.0, 0.45, False), ("c", 30.0, 0.4, False), ("d", 60.0, 0.3, False))
    pipeline._finish(pair, scored, CORNERS, [])
    by_name = {c.name: c for c in scored}
    assert calls == [("a", slice(-1, None), 0), ("c", slice(-1, None), 0)] + [("restart", by_name[n].fixed_to_moving[0, 3]) for n in restarted]
    assert [n for n in "ac" if by_name[n].info["restarted"]] == restarted
    assert by_name["a"].mi == pytest.approx(0.61) and by_name["c"].mi == pytest.approx(0.58 + 0.01 * ("c" in restarted))


@pytest.mark.parametrize("settle_rivals", [0, 2])
def test_a_rival_refined_only_coarsely_gets_the_finest_level_before_a_refusal(ct_pair, settle_rivals):
    """The winner (fully refined) and a rival 20 mm away with nearly its MI, the rival refined only coarsely: the
    rival gets the finest level, lands on the winner's answer, and the selection succeeds; with
    ``settle_rivals`` 0 (or a rival already fully refined) the same tie is a refusal."""
    pair, _ = ct_pair
    pipeline, calls = _pipeline_recording_refinements(mi=0.49, overlap=0.9, result=np.eye(4), settle_rivals=settle_rivals,
                                                      min_support=0.0)
    scored = _coarse_candidates(("winner", 0.0, 0.5, True), ("rival", 20.0, 0.49, False), ("far", 80.0, 0.2, False))
    selection = pipeline._select(pair, scored, CORNERS, [], same_modality=True)
    if settle_rivals:
        assert selection.success and selection.winner.name == "winner"
        assert calls == [("rival", slice(-1, None), None)] and scored[1].info["finest_level"] and scored[1].info["restarted"]
    else:
        assert not selection.success and selection.rival.name == "rival" and calls == []
    # the finished answers' edge agreement is measured for the selection, the others' is not
    assert np.isfinite(scored[0].edges) and np.isnan(scored[2].edges)
    assert np.isfinite(scored[1].edges) == bool(settle_rivals)
    # a rival that is already fully refined is not refined again: the tie stands
    scored[1].fixed_to_moving, scored[1].mi, scored[1].support = rigid(0.0, (0, 0, 1), (20.0, 0.0, 0.0)), 0.49, 0.1
    scored[1].info["finest_level"] = True
    calls.clear()
    assert not pipeline._select(pair, scored, CORNERS, [], same_modality=True).success and calls == []


def test_a_refusal_gets_the_classical_registration_as_one_more_candidate(ct_pair, monkeypatch):
    """``classical_rescue``: a tie between two fully refined answers 20 mm apart is a refusal; the rescue adds the
    classical intensity registration as a candidate (refined and scored like the others) and selects again: its
    clearly better answer wins. When it cannot run (every sample left the scan) the refusal stands, with the
    reason in the summary."""
    import samv2_components.registration.pipeline as pipeline_module
    from samv2_components.errors import SAMv2InputError
    from samv2_components.registration.candidates import RigidCandidate

    pair, _ = ct_pair
    pipeline, calls = _pipeline_recording_refinements(mi=0.49, overlap=0.9, min_support=0.0)
    pipeline.refiner.mi_of = {"classical": 0.6}
    assert pipeline.classical is None and pipeline.classical_rescue == {}
    settings = []
    monkeypatch.setattr(pipeline_module, "classical_candidate",
                        lambda fixed, moving, kw: settings.append(kw) or RigidCandidate("classical", rigid(0.0, (0, 0, 1), (40.0, 0.0, 0.0))))
    scored = _coarse_candidates(("a", 0.0, 0.5, True), ("b", 20.0, 0.49, True))
    assert not pipeline._select(pair, scored, CORNERS, [], same_modality=True).success
    summary = {}
    selection = pipeline._rescue(pair, scored, "moving", CORNERS, [], True, summary)
    assert selection.success and selection.winner.name == "classical" and settings == [{}]
    assert [c.name for c in scored] == ["a", "b", "classical"] and ("classical", slice(0, -1), None) in calls
    assert summary["classical_rescue"]["ran"] and summary["classical_rescue"]["success"]

    def no_samples(fixed, moving, kw):
        raise SAMv2InputError("classical", "every sample left the moving scan")

    monkeypatch.setattr(pipeline_module, "classical_candidate", no_samples)
    summary = {}
    assert pipeline._rescue(pair, scored[:2], "moving", CORNERS, [], True, summary) is None
    assert not summary["classical_rescue"]["ran"] and "every sample left" in summary["classical_rescue"]["reason"]


def test_turn_rotation_is_the_rotate_volume_world_map_and_body_axis_follows_the_header():
    """Geometry of the turn search: ``turn_world_rotation`` is the linear part of the exact world map
    ``rotate_volume`` applies (an oblique RAS header with cubic voxels), a proper rotation; ``body_axis`` of a box
    elongated along one index axis of an oblique SimpleITK mask is that axis in LPS, centred where ITK puts it."""
    from samv2_components.geometry import axis_angle_rotation
    from samv2_components.registration.orientation import axis_aligned_rotations, rotate_volume, turn_world_rotation
    from samv2_components.registration.turn_search import body_axis

    oblique = axis_angle_rotation([0.3, 1.0, 0.2], 25.0)
    affine = np.eye(4)
    affine[:3, :3], affine[:3, 3] = 2.0 * oblique, (10.0, -20.0, 30.0)
    image = MetaTensor(torch.zeros(1, 6, 8, 10), affine=torch.as_tensor(affine))
    for s in axis_aligned_rotations():
        rotation = turn_world_rotation(image, s)
        np.testing.assert_allclose(rotation, rotate_volume(image, s)[1][:3, :3], atol=1e-9)
        np.testing.assert_allclose(rotation @ rotation.T, np.eye(3), atol=1e-9)
        assert np.linalg.det(rotation) == pytest.approx(1.0)

    mask = sitk.Image([40, 12, 10], sitk.sitkUInt8)
    mask.SetSpacing((1.5, 1.5, 2.0))
    mask.SetOrigin((-5.0, 7.0, 3.0))
    mask.SetDirection(oblique.flatten().tolist())
    mask[2:38, 3:9, 2:8] = 1  # long along the first index axis
    centre, axis = body_axis(mask)
    expected = np.array(mask.TransformContinuousIndexToPhysicalPoint([19.5, 5.5, 4.5]))
    np.testing.assert_allclose(centre, expected, atol=1e-9)
    assert abs(float(axis @ oblique[:, 0])) == pytest.approx(1.0, abs=1e-9)


def test_histogram_mi_of_independent_and_identical_images():
    from samv2_components.registration.translation_search import histogram_mi

    independent = np.full((4, 4), 10)  # uniform joint histogram: the marginals explain it
    identical = np.diag([10, 10, 10, 10])
    assert histogram_mi(independent) == pytest.approx(0.0, abs=1e-12)
    assert histogram_mi(identical) == pytest.approx(np.log(4.0))
    assert histogram_mi(np.stack([independent, identical])).shape == (2,)


def test_translation_search_finds_a_slab_slid_along_the_body(slab_pair):
    """The slab started 48 mm too high and 20 mm to the side (the rotation right): the best pose of the search is
    within one step (6 mm) of the truth, keeps the start's rotation, and scores higher than the start; seen from
    the other side (the slab as the fixed scan) the search finds the same pose."""
    from samv2_components.registration.translation_search import TranslationSearch

    pair, truth = slab_pair
    start = rigid(0.0, (0, 0, 1), (20.0, 0.0, 48.0)) @ truth
    assert sample_ct_tre(start, truth)[1].mean() > 50.0
    search = TranslationSearch(shrink_factor=1, smoothing_sigma_mm=1.5, range_mm=60.0, step_mm=6.0, peaks=3)
    peaks = search(pair, start, 10.0)
    assert len(peaks) == 3 and peaks[0].score > peaks[1].score >= peaks[2].score
    best = peaks[0]
    assert sample_ct_tre(best.fixed_to_moving, truth)[1].mean() < 6.0
    np.testing.assert_allclose(best.fixed_to_moving[:3, :3], start[:3, :3], atol=1e-9)
    assert np.linalg.norm(best.shift_mm) > 40.0  # it moved from the start, along the turned grid's axes
    # distinct peaks only: no two closer than the separation
    assert all(np.linalg.norm(a.shift_mm - b.shift_mm) >= search.peak_separation_mm for a in peaks for b in peaks if a is not b)
    swapped = ScanPair(pair.moving, pair.fixed, pair.moving_body, pair.fixed_body, small="fixed")
    back = search(swapped, np.linalg.inv(start), 10.0)[0]
    np.testing.assert_allclose(np.linalg.inv(back.fixed_to_moving), best.fixed_to_moving, atol=1e-6)
    # anisotropic voxels (3 x 3 x 6 mm): steps and range are counted per axis, the answer is the same place
    slab = pair.moving
    size = [slab.GetSize()[0], slab.GetSize()[1], slab.GetSize()[2] // 2]
    thick = sitk.Resample(slab, size, sitk.Transform(), sitk.sitkLinear, slab.GetOrigin(),
                          (slab.GetSpacing()[0], slab.GetSpacing()[1], 2 * slab.GetSpacing()[2]), slab.GetDirection(), -1024.0)
    coarse_pair = ScanPair(pair.fixed, thick, pair.fixed_body, sitk.Cast(thick > -300.0, sitk.sitkUInt8), small="moving")
    anisotropic = search(coarse_pair, start, 10.0)[0]
    assert sample_ct_tre(anisotropic.fixed_to_moving, truth)[1].mean() < 6.0


def test_translation_candidates_come_from_distinct_rotations_best_peaks_first(ct_pair):
    """``search_rotations`` 2: the search runs for the best candidate and the best one turned more than 10 deg from
    it (a candidate 3 deg from the best, a failed one, and the rest are skipped); the best ``translation_top_k``
    peaks over both rotations become ``shift_*`` candidates, best first."""
    from samv2_components.registration import SAMv2RigidPipeline
    from samv2_components.registration.translation_search import TranslationPeak

    pair, _ = ct_pair
    pipeline = SAMv2RigidPipeline(adareg=None, search_rotations=2, translation_top_k=3)
    calls = []

    def search(pair_, start, footprint_margin_mm):
        assert footprint_margin_mm == pipeline.refiner.overlap_margin_mm  # the refinement's footprint, not a copy
        calls.append(start)
        base = 0.5 if len(calls) == 1 else 0.55
        return [TranslationPeak(start, base, np.zeros(3)), TranslationPeak(start, base - 0.2, np.array([40.0, 0, 0]))]

    pipeline.translation_search = search
    candidates = [("a", rigid(0.0, (0, 0, 1), (0, 0, 0)), 0.6, ""), ("b", rigid(3.0, (0, 0, 1), (5, 0, 0)), 0.58, ""),
                  ("bad", rigid(40.0, (1, 0, 0), (0, 0, 0)), 0.9, "failed"), ("c", rigid(30.0, (1, 0, 0), (0, 0, 0)), 0.4, ""),
                  ("d", rigid(60.0, (0, 1, 0), (0, 0, 0)), 0.3, "")]
    scored = [ScoredCandidate(n, m, mi if not err else float("nan"), 0.1, 0.9, err, {}) for n, m, mi, err in candidates]
    found, record = pipeline._translation_candidates(pair, scored)
    assert record["rotations_from"] == ["a", "c"] and len(calls) == 2
    assert [c.name for c in found] == ["shift_c_0", "shift_a_0", "shift_c_1"]
    assert found[0].info["search_score"] == pytest.approx(0.55)


@pytest.mark.parametrize("embed_below, embedded", [(False, [17]), (True, [17, 15, 16])])
def test_only_turns_ranked_above_the_headers_orientation_are_embedded(monkeypatch, embed_below, embedded):
    """The turn search ranks turn 17 above the headers' orientation (turn 0, embedded already) and 15, 16 below
    it: every one of them gives its coarse pose, only 17 is embedded (a network pass and AdaReg's fit), unless
    ``embed_turns_below_header``."""
    from types import SimpleNamespace

    from samv2_components.registration import SAMv2RigidPipeline
    from samv2_components.registration.turn_search import TurnCandidate

    pipeline = SAMv2RigidPipeline(adareg=SimpleNamespace(min_match_score=0.0), search_top_k=4, embed_turns_below_header=embed_below)
    ranked = [TurnCandidate(k, np.eye(3), np.eye(4), score, [0.0, 0.0, 0.0], True)
              for k, score in [(17, 0.6), (0, 0.5), (15, 0.4), (16, 0.3), (4, 0.2)]]
    pipeline.turn_search = lambda pair, moving, refiner: (ranked, {})
    tried = []

    class FakeSearch:
        def __init__(self, *args, **kwargs):
            pass

        def try_turn(self, k, voxel_rotation, *args, **kwargs):
            tried.append(k)
            result = SimpleNamespace(success=False, points_small=np.zeros((0, 3)), summary={})
            return SimpleNamespace(result=result, rotation=np.eye(3)), None

    monkeypatch.setattr("samv2_components.registration.orientation.OrientationSearch", FakeSearch)
    candidates, sets, record = pipeline._turn_candidates(None, None, {}, None, embed=lambda image: {})
    assert tried == embedded and record["embedded_turns"] == embedded and sets == []
    assert [c.name for c in candidates] == ["turn_17", "turn_0", "turn_15", "turn_16"]


def test_spilled_heads_come_back_equal_and_leave_nothing_behind():
    """The fixed scan's heads wait on disk while the refinement runs: the dict is emptied (the caller's memory goes),
    the tensors come back with their values, dtypes and shapes, and the file goes when the block ends."""
    import tempfile

    from samv2_components.inference.spilled_heads import SpilledHeads

    affine = torch.tensor([[0.0, 0.0, 4.0, -10.0], [0.0, 4.0, 0.0, 20.0], [-4.0, 0.0, 0.0, 30.0], [0.0, 0.0, 0.0, 1.0]])
    heads = {"fine": MetaTensor(torch.randn(3, 5, 6, 4).half().permute(3, 0, 1, 2), affine=affine),  # channels last
             "coarse": torch.randn(2, 3, 5, 6),
             "other": torch.randn(1, 2, 3, 5, 6).bfloat16().contiguous(memory_format=torch.channels_last_3d)}
    copies = {k: v.clone() for k, v in heads.items()}
    with SpilledHeads(heads) as spilled:
        assert heads == {} and len(os.listdir(spilled.folder)) == 3 and spilled.nbytes == 4 * 90 * 2 + 2 * 90 * 4 + 2 * 90 * 2
        back = spilled.load()
        assert back.keys() == copies.keys()
        for name, tensor in back.items():
            assert type(tensor) is type(copies[name]) and tensor.dtype == copies[name].dtype
            assert tensor.stride() == copies[name].stride()  # the layout kept: the matcher reads channels-last heads
            torch.testing.assert_close(tensor.as_subclass(torch.Tensor), copies[name].as_subclass(torch.Tensor), rtol=0, atol=0)
        # the matcher reads each head's grid from its affine (a MetaTensor, as SAMv2Inferer returns it)
        torch.testing.assert_close(back["fine"].affine, copies["fine"].affine, rtol=0, atol=0)
    assert not os.path.exists(spilled.folder)
    assert os.path.dirname(spilled.folder) == tempfile.gettempdir()


@pytest.mark.parametrize("search", ["auto", "off"])
def test_release_heads_empties_both_dicts_after_adaregs_fit_and_removes_the_spill(monkeypatch, search):
    """``release_heads``: AdaReg's fit reads both heads; then both dicts are empty (the moving scan's are not read
    again; the fixed scan's are on disk while the orientation search may still need them, ``auto``), and the spilled
    file is gone however the registration ends (here: AdaReg finds no body points, a refusal)."""
    from types import SimpleNamespace

    from samv2_components.inference import spilled_heads
    from samv2_components.registration import SAMv2RigidPipeline, RigidRegistration

    seen, spills = {}, []

    def fit(fixed_image, fixed_heads, moving_image, moving_heads):
        seen["sizes"] = (len(fixed_heads), len(moving_heads))
        return RigidRegistration(False, "no body", np.eye(4), "moving", np.zeros((0, 3)), np.zeros((0, 3)),
                                 np.zeros(0), np.zeros(0, bool), {}, None)

    real = spilled_heads.SpilledHeads

    class Recorded(real):
        def __init__(self, heads):
            super().__init__(heads)
            spills.append(self.folder)

    monkeypatch.setattr("samv2_components.registration.pipeline.SpilledHeads", Recorded)
    image = MetaTensor(torch.zeros(1, 8, 8, 8), affine=torch.eye(4))
    fixed_heads, moving_heads = {"fine": torch.ones(2, 4, 4, 4)}, {"fine": torch.ones(2, 4, 4, 4)}
    pipeline = SAMv2RigidPipeline(adareg=SimpleNamespace(rigid=fit), orientation_search=search)
    result = pipeline.rigid(image, fixed_heads, image, moving_heads, embed=lambda im: {}, release_heads=True)
    assert not result.success and seen["sizes"] == (1, 1)
    assert fixed_heads == {} and moving_heads == {}
    assert len(spills) == (1 if search == "auto" else 0) and not any(os.path.exists(p) for p in spills)
    # without release_heads the caller's dicts stay as they were
    kept = {"fine": torch.ones(2, 4, 4, 4)}
    pipeline.rigid(image, kept, image, {"fine": torch.ones(1)}, embed=lambda im: {})
    assert list(kept) == ["fine"]
