"""CrossModalInfoNCELoss (CrossSAM, SAMv2 Eq. 8): loop reference, FOV negatives, ignore radius, gradients, shapes."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from samv2_components.losses import (
    CROSS_COARSE_DEFAULTS,
    CROSS_FINE_DEFAULTS,
    CrossModalInfoNCELoss,
    cross_modal_coarse_loss,
    cross_modal_fine_loss,
)

GRID = (3, 4, 5)
ALL = {
    "num_positives": None,
    "num_hard_negatives": None,
    "num_negatives": None,
    "num_hard_fov_negatives": None,
    "num_fov_negatives": None,
    "min_overlap_voxels": 1,
}


def random_embedding(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=1).float()


def masks(batch=2):
    """Pair 0: overlap W < 3 (36 voxels); pair 1: overlap D >= 1, H >= 1 (30 voxels); fov_a: random ~70 %."""
    valid = torch.zeros(batch, 1, *GRID, dtype=torch.bool)
    valid[0, :, :, :, :3] = True
    valid[1, :, 1:, 1:, :] = True
    fov = torch.rand(batch, 1, *GRID, generator=torch.Generator().manual_seed(11)) < 0.7
    return valid, fov


# ----------------------------------------------------------------------------------------------------------------
# slow reference: explicit Python loops over anchors and candidates
# ----------------------------------------------------------------------------------------------------------------


def ref_cross(emb_a, emb_b, valid, fov, cfg, spacing, anchor_generator=None):
    """Per-anchor losses (list, pairs in order). Selection must be deterministic: "all" or hardest only
    (num_negatives None or >= num_hard_negatives, likewise for FOV). With ``anchor_generator`` the anchors are
    ``randperm(n_overlap)[:num_positives]`` of the overlap voxels in C order, one draw per non-skipped pair."""
    tau, radius = cfg["temperature"], cfg["ignore_radius"]
    batch = emb_a.shape[0]
    ea, eb = emb_a.double(), emb_b.double()
    voxels = list(itertools.product(*[range(n) for n in GRID]))
    direction = cfg["direction"]

    def top(values, k):
        values = sorted(values, reverse=True)
        return values if k is None else values[:k]

    def nce(s_pos, negatives):
        denom = math.exp(s_pos / tau) + sum(math.exp(s / tau) for s in negatives)
        return -math.log(math.exp(s_pos / tau) / denom)

    losses = []
    for k in range(batch):
        sp = [float(v) for v in spacing[k]]

        def dist(p, q):
            return math.sqrt(sum(((p[x] - q[x]) * sp[x]) ** 2 for x in range(3)))

        overlap = [v for v in voxels if bool(valid[k, 0, v[0], v[1], v[2]])]
        outside = [v for v in voxels if not bool(valid[k, 0, v[0], v[1], v[2]])]
        if fov is not None:
            outside = [v for v in outside if bool(fov[k, 0, v[0], v[1], v[2]])]
        if len(overlap) < cfg["min_overlap_voxels"]:
            continue
        anchors = overlap
        if anchor_generator is not None and len(overlap) > cfg["num_positives"]:
            perm = torch.randperm(len(overlap), generator=anchor_generator)[: cfg["num_positives"]]
            anchors = [overlap[int(i)] for i in perm]
        for p in anchors:
            a_p, b_p = ea[k, :, p[0], p[1], p[2]], eb[k, :, p[0], p[1], p[2]]
            s_pos = float(a_p @ b_p)
            terms = []
            if direction in ("both", "a_to_b"):
                negs = [float(a_p @ eb[k, :, q[0], q[1], q[2]]) for q in overlap if q != p and dist(p, q) >= radius]
                terms.append(nce(s_pos, top(negs, cfg["num_hard_negatives"])))
            if direction in ("both", "b_to_a"):
                negs = [float(b_p @ ea[k, :, q[0], q[1], q[2]]) for q in overlap if q != p and dist(p, q) >= radius]
                negs = top(negs, cfg["num_hard_negatives"])
                if cfg["num_fov_negatives"] != 0:
                    fov_negs = [float(b_p @ ea[k, :, q[0], q[1], q[2]]) for q in outside if dist(p, q) >= radius]
                    negs = negs + top(fov_negs, cfg["num_hard_fov_negatives"])
                terms.append(nce(s_pos, negs))
            losses.append(sum(terms) / len(terms))
    return losses


@pytest.mark.parametrize(
    "overrides, use_fov_mask, spacing",
    [
        ({"ignore_radius": 6.0}, False, 4.0),  # exhaustive, both directions, FOV = everything outside the overlap
        (  # hardest only, FOV restricted to fov_a
            {"num_hard_negatives": 7, "num_negatives": 7, "num_hard_fov_negatives": 3, "num_fov_negatives": 3},
            True,
            4.0,
        ),
        ({"direction": "a_to_b", "ignore_radius": 0.0}, False, 4.0),
        ({"direction": "b_to_a", "ignore_radius": 5.0}, True, (2.0, 4.0, 3.0)),  # anisotropic spacing
        ({"num_fov_negatives": 0, "num_hard_negatives": 5, "num_negatives": 50}, False, (8.0, 32.0, 32.0)),
        ({"ignore_radius": 7.0}, True, torch.tensor([[4.0, 4.0, 4.0], [2.0, 6.0, 3.0]])),  # per-pair spacing
        ({"min_overlap_voxels": 31}, True, 4.0),  # pair 1 (30 overlap voxels) is skipped
    ],
)
def test_cross_modal_matches_loop_reference(overrides, use_fov_mask, spacing):
    cfg = {**CROSS_FINE_DEFAULTS, **ALL, "ignore_radius": 6.0, **overrides, "spacing": spacing}
    emb_a = random_embedding((2, 8, *GRID), 0)
    emb_b = random_embedding((2, 8, *GRID), 1)
    valid, fov = masks()
    fov_a = fov if use_fov_mask else None
    spacing_rows = torch.as_tensor(spacing, dtype=torch.float32).expand(2, 3)
    expected = ref_cross(emb_a, emb_b, valid, fov_a, cfg, spacing_rows)
    n_expected = 36 if cfg["min_overlap_voxels"] > 30 else 66
    assert len(expected) == n_expected

    per_anchor = CrossModalInfoNCELoss(**cfg, reduction="none")(emb_a, emb_b, valid, fov_a)
    assert per_anchor.shape == (n_expected,)
    assert torch.allclose(per_anchor.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-5)
    mean = CrossModalInfoNCELoss(**cfg)(emb_a, emb_b, valid, fov_a)
    assert abs(mean.item() - sum(expected) / len(expected)) < 1e-5
    total = CrossModalInfoNCELoss(**cfg, reduction="sum")(emb_a, emb_b, valid, fov_a)
    assert abs(total.item() - sum(expected)) < 1e-3
    # spacing given to forward overrides the constructor's
    other = CrossModalInfoNCELoss(**{**cfg, "spacing": 1.0})(emb_a, emb_b, valid, fov_a, spacing=spacing)
    assert abs(other.item() - mean.item()) < 1e-6


def test_symmetric_loss_is_the_average_of_the_directions():
    emb_a, emb_b = random_embedding((2, 8, *GRID), 2), random_embedding((2, 8, *GRID), 3)
    valid, fov = masks()
    cfg = {**ALL, "ignore_radius": 6.0}
    both = CrossModalInfoNCELoss(**cfg, reduction="none")(emb_a, emb_b, valid, fov)
    ab = CrossModalInfoNCELoss(**cfg, direction="a_to_b", reduction="none")(emb_a, emb_b, valid, fov)
    ba = CrossModalInfoNCELoss(**cfg, direction="b_to_a", reduction="none")(emb_a, emb_b, valid, fov)
    assert torch.allclose(both, 0.5 * (ab + ba), atol=1e-6)
    assert not torch.allclose(ab, ba, atol=1e-3)  # the directions differ (different negatives, FOV only in b->a)


def test_anchor_draw_uses_the_generator_and_the_overlap():
    emb_a, emb_b = random_embedding((2, 8, *GRID), 4), random_embedding((2, 8, *GRID), 5)
    valid, fov = masks()
    cfg = {**CROSS_FINE_DEFAULTS, **ALL, "num_positives": 5, "ignore_radius": 6.0}
    loss = CrossModalInfoNCELoss(**cfg, reduction="none")(
        emb_a, emb_b, valid, fov, generator=torch.Generator().manual_seed(3)
    )
    expected = ref_cross(
        emb_a, emb_b, valid, fov, cfg, torch.full((2, 3), 4.0), anchor_generator=torch.Generator().manual_seed(3)
    )
    assert loss.shape == (10,)  # 5 per pair
    assert torch.allclose(loss.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-5)


def test_sampling_is_reproducible_with_a_generator():
    emb_a, emb_b = random_embedding((2, 8, *GRID), 6), random_embedding((2, 8, *GRID), 7)
    valid, fov = masks()
    loss_fn = cross_modal_fine_loss(
        num_positives=6, num_hard_negatives=12, num_negatives=4, num_hard_fov_negatives=6, num_fov_negatives=2,
        ignore_radius=4.0, min_overlap_voxels=1,
    )

    def run(seed):
        return loss_fn(emb_a, emb_b, valid, fov, generator=torch.Generator().manual_seed(seed)).item()

    assert run(7) == run(7)
    assert len({round(run(s), 6) for s in range(6)}) > 1


def test_aligned_embeddings_score_lower_than_random():
    emb_a = random_embedding((2, 16, *GRID), 8)
    valid, fov = masks()
    for loss_fn in (
        cross_modal_fine_loss(ignore_radius=6.0, num_hard_negatives=20, num_negatives=10, min_overlap_voxels=1),
        cross_modal_coarse_loss(num_hard_negatives=20, num_negatives=10, num_fov_negatives=5, spacing=4.0),
    ):
        aligned = loss_fn(emb_a, emb_a.clone(), valid, fov, generator=torch.Generator().manual_seed(0))
        other = random_embedding(emb_a.shape, 9)
        unrelated = loss_fn(emb_a, other, valid, fov, generator=torch.Generator().manual_seed(0))
        assert aligned.item() < unrelated.item() - 1.0


# ----------------------------------------------------------------------------------------------------------------
# hand-built cases on a 1 x 1 x 6 grid (spacing 4 mm): anchor 0 is voxel 0
# ----------------------------------------------------------------------------------------------------------------

E1, E2, E3 = torch.eye(3)


def line(*vectors):
    """(1, 3, 1, 1, 6) embedding from six 3-vectors."""
    return F.normalize(torch.stack(vectors, dim=1), dim=0).reshape(1, 3, 1, 1, len(vectors))


def nce(s_pos, negatives, tau=0.5):
    return -math.log(math.exp(s_pos / tau) / (math.exp(s_pos / tau) + sum(math.exp(s / tau) for s in negatives)))


def test_fov_negatives_enter_the_b_to_a_direction():
    # overlap = voxels 0..2 (a == b there); outside: voxel 3 of a is a twin of b[0] -- anchor 0's only hard negative
    emb_a = line(E1, E2, E3, E1, -E1, -E2)
    emb_b = line(E1, E2, E3, E2, E2, E2)  # b outside the overlap is garbage and must never be used
    valid = torch.zeros(1, 1, 1, 1, 6, dtype=torch.bool)
    valid[..., :3] = True
    cfg = {**ALL, "ignore_radius": 0.0, "num_hard_fov_negatives": 1, "num_fov_negatives": 1}

    ba = CrossModalInfoNCELoss(**cfg, direction="b_to_a", reduction="none")
    with_fov = ba(emb_a, emb_b, valid)
    assert with_fov[0].item() == pytest.approx(nce(1.0, [0.0, 0.0, 1.0]), abs=1e-6)
    no_fov = CrossModalInfoNCELoss(**{**cfg, "num_fov_negatives": 0}, direction="b_to_a", reduction="none")
    assert no_fov(emb_a, emb_b, valid)[0].item() == pytest.approx(nce(1.0, [0.0, 0.0]), abs=1e-6)
    assert with_fov[0].item() > no_fov(emb_a, emb_b, valid)[0].item() + 0.3
    # fov_a excluding voxel 3: the hardest FOV negative of anchor 0 is now voxel 5 (similarity 0)
    fov_a = torch.ones_like(valid)
    fov_a[..., 3] = False
    assert ba(emb_a, emb_b, valid, fov_a)[0].item() == pytest.approx(nce(1.0, [0.0, 0.0, 0.0]), abs=1e-6)
    # the FOV twin outside the ignore radius counts; inside it (12 mm < 13 mm) it does not
    near = CrossModalInfoNCELoss(**{**cfg, "ignore_radius": 13.0}, direction="b_to_a", reduction="none")
    assert near(emb_a, emb_b, valid)[0].item() == pytest.approx(nce(1.0, [0.0]), abs=1e-6)  # voxel 4: -1 -> 5: 0
    # a -> b never uses FOV negatives
    ab = CrossModalInfoNCELoss(**cfg, direction="a_to_b", reduction="none")
    ab_no = CrossModalInfoNCELoss(**{**cfg, "num_fov_negatives": 0}, direction="a_to_b", reduction="none")
    assert torch.equal(ab(emb_a, emb_b, valid), ab_no(emb_a, emb_b, valid))
    assert ab(emb_a, emb_b, valid)[0].item() == pytest.approx(nce(1.0, [0.0, 0.0]), abs=1e-6)
    # symmetric default: average of the two
    both = CrossModalInfoNCELoss(**cfg, reduction="none")(emb_a, emb_b, valid)
    assert both[0].item() == pytest.approx(0.5 * (nce(1.0, [0.0, 0.0, 1.0]) + nce(1.0, [0.0, 0.0])), abs=1e-6)


def test_ignore_radius_excludes_near_voxels():
    # b[1] (4 mm from anchor 0) is a twin of the positive b[0]; voxel 2 at 8 mm is orthogonal
    emb_a = line(E1, E2, E3, E2, E3, E2)
    emb_b = line(E1, E1, E2, E3, E2, E3)
    valid = torch.ones(1, 1, 1, 1, 6, dtype=torch.bool)

    def anchor0(radius, spacing=4.0):
        loss_fn = CrossModalInfoNCELoss(**ALL, ignore_radius=radius, direction="a_to_b", reduction="none")
        return loss_fn(emb_a, emb_b, valid, spacing=spacing)[0].item()

    assert anchor0(3.0) == pytest.approx(nce(1.0, [1.0, 0.0, 0.0, 0.0, 0.0]), abs=1e-6)
    assert anchor0(5.0) == pytest.approx(nce(1.0, [0.0, 0.0, 0.0, 0.0]), abs=1e-6)
    assert anchor0(9.0) == pytest.approx(nce(1.0, [0.0, 0.0, 0.0]), abs=1e-6)
    assert anchor0(5.0, spacing=(4.0, 4.0, 8.0)) == pytest.approx(anchor0(3.0), abs=1e-6)  # W spacing 8 mm
    assert anchor0(3.0) > anchor0(5.0) + 0.5
    # the positive voxel is never a negative, even with radius 0
    assert anchor0(0.0) == pytest.approx(anchor0(3.0), abs=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# gradients, empty cases, shapes, defaults
# ----------------------------------------------------------------------------------------------------------------


def test_gradients_reach_both_embeddings():
    raw_a = torch.randn(2, 8, *GRID, requires_grad=True)
    raw_b = torch.randn(2, 8, *GRID, requires_grad=True)
    valid, fov = masks()
    for loss_fn in (
        cross_modal_fine_loss(ignore_radius=4.0, min_overlap_voxels=1),
        cross_modal_coarse_loss(spacing=4.0),
    ):
        for direction in ("both", "a_to_b", "b_to_a"):
            loss_fn.direction = direction
            raw_a.grad = raw_b.grad = None
            loss = loss_fn(F.normalize(raw_a, dim=1), F.normalize(raw_b, dim=1), valid, fov)
            loss.backward()
            assert torch.isfinite(loss) and loss.item() > 0
            assert raw_a.grad.abs().sum() > 0 and raw_b.grad.abs().sum() > 0
            assert torch.isfinite(raw_a.grad).all() and torch.isfinite(raw_b.grad).all()


def test_too_small_overlap_gives_connected_zero():
    raw_a = torch.randn(2, 8, *GRID, requires_grad=True)
    raw_b = torch.randn(2, 8, *GRID, requires_grad=True)
    valid = torch.zeros(2, 1, *GRID, dtype=torch.bool)
    valid[0, 0, 0, 0, :3] = True  # 3 voxels < min_overlap_voxels (16); pair 1 has none
    for reduction in ("mean", "sum"):
        raw_a.grad = raw_b.grad = None
        loss = cross_modal_fine_loss(reduction=reduction)(raw_a, raw_b, valid)
        assert loss.item() == 0.0 and loss.grad_fn is not None
        loss.backward()
        assert raw_a.grad.abs().sum() == 0 and raw_b.grad is not None
    none = cross_modal_fine_loss(reduction="none")(raw_a, raw_b, valid)
    assert none.shape == (0,) and none.grad_fn is not None
    # with a lower threshold the 3-voxel pair counts; 0/1 float masks work like bool ones
    low = cross_modal_fine_loss(min_overlap_voxels=3, ignore_radius=0.0, reduction="none")
    assert low(raw_a, raw_b, valid).shape == (3,)
    assert torch.equal(low(raw_a, raw_b, valid.float()), low(raw_a, raw_b, valid))


def test_bad_shapes_raise():
    loss_fn = cross_modal_fine_loss()
    emb = random_embedding((2, 8, *GRID), 10)
    valid, fov = masks()
    with pytest.raises(ValueError):
        loss_fn(emb[0], emb[0], valid[0])  # 4-D
    with pytest.raises(ValueError):
        loss_fn(emb, emb[:, :, :2], valid)  # different grids
    with pytest.raises(ValueError):
        loss_fn(emb, emb[:, :4], valid)  # different channels
    with pytest.raises(ValueError):
        loss_fn(emb, emb[:1], valid)  # different batch
    with pytest.raises(ValueError):
        loss_fn(emb, emb, valid[:, 0])  # mask without channel axis
    with pytest.raises(ValueError):
        loss_fn(emb, emb, valid[:, :, :2])  # mask on another grid
    with pytest.raises(ValueError):
        loss_fn(emb, emb, valid, fov[:1])
    with pytest.raises(ValueError):
        loss_fn(emb, emb, valid, spacing=(4.0, 4.0))
    with pytest.raises(ValueError):
        loss_fn(emb, emb, valid, spacing=torch.ones(3, 3))


def test_factory_defaults_and_validation():
    fine = CrossModalInfoNCELoss()
    assert (fine.num_positives, fine.num_negatives, fine.num_fov_negatives) == (200, 500, 100)
    assert fine.temperature == 0.5 and fine.ignore_radius == 20.0 and fine.direction == "both"
    assert fine.spacing == 4.0 and cross_modal_fine_loss().num_hard_negatives == fine.num_hard_negatives == 2000
    coarse = cross_modal_coarse_loss()
    assert (coarse.num_positives, coarse.num_negatives, coarse.num_fov_negatives) == (100, 200, 0)
    assert coarse.temperature == 0.5 and coarse.ignore_radius == 10.0 and coarse.spacing == (8.0, 32.0, 32.0)
    assert CROSS_COARSE_DEFAULTS["num_hard_negatives"] == 250 and CROSS_FINE_DEFAULTS["num_hard_fov_negatives"] == 400
    assert cross_modal_coarse_loss(num_fov_negatives=50).num_fov_negatives == 50
    for bad in (
        {"temperature": 0},
        {"direction": "ab"},
        {"num_negatives": 0},
        {"num_fov_negatives": -1},
        {"ignore_radius": -1.0},
        {"min_overlap_voxels": 0},
    ):
        with pytest.raises(ValueError):
            CrossModalInfoNCELoss(**bad)
