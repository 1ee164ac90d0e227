"""SAMv2 losses: equality with slow loop references, sanity orderings, gradients, memory, edge cases."""

import itertools
import math
import time

import pytest
import torch
import torch.nn.functional as F

from samv2_components.losses import (
    COARSE_INFONCE_DEFAULTS,
    FINE_INFONCE_DEFAULTS,
    PrototypeContrastiveLoss,
    VoxelInfoNCELoss,
    coarse_infonce_loss,
    fine_infonce_loss,
    labels_to_grid,
)
from samv2_components.networks import HEAD_GRIDS, SAMv2Net

FINE_STRIDE, FINE_OFFSET = HEAD_GRIDS["fine"]
ALL = {"num_positives": None, "num_hard_negatives": None, "num_negatives": None}


def random_embedding(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=1).float()


def affine_correspondence(batch, size, scale, shift):
    """corr(p) = scale * p + shift for every input voxel of a, valid where inside b (same size)."""
    axes = [torch.arange(n, dtype=torch.float32) for n in size]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"))  # (3, D, H, W)
    corr = grid * torch.tensor(scale).view(3, 1, 1, 1) + torch.tensor(shift, dtype=torch.float32).view(3, 1, 1, 1)
    upper = torch.tensor(size, dtype=torch.float32).view(3, 1, 1, 1) - 1
    valid = ((corr >= 0) & (corr <= upper)).all(dim=0, keepdim=True)
    return corr.unsqueeze(0).repeat(batch, 1, 1, 1, 1), valid.unsqueeze(0).repeat(batch, 1, 1, 1, 1)


# ----------------------------------------------------------------------------------------------------------------
# slow references: explicit Python loops
# ----------------------------------------------------------------------------------------------------------------


def ref_infonce(emb_a, emb_b, scale, shift, valid_in, stride, offset, cfg, spacing=2.0):
    """Eq. 1 by loops over anchors and candidates (num_positives/negatives deterministic: all or top-k)."""
    tau, radius = cfg["temperature"], cfg["ignore_radius"]
    batch, _, d, h, w = emb_a.shape
    gb = emb_b.shape[2:]
    size = valid_in.shape[2:]
    ea, eb = emb_a.double(), emb_b.double()

    def centre(idx):
        return [stride[x] * idx[x] + offset[x] for x in range(3)]

    def dist(p1, p2):
        return math.sqrt(sum(((p1[x] - p2[x]) * spacing) ** 2 for x in range(3)))

    losses = []
    for k in range(batch):
        for i in itertools.product(range(d), range(h), range(w)):
            p = centre(i)
            # every input voxel with non-zero interpolation weight must be valid
            corner_sets = [sorted({math.floor(p[x]), math.ceil(p[x])}) for x in range(3)]
            ok = True
            for c in itertools.product(*corner_sets):
                if any(c[x] < 0 or c[x] >= size[x] for x in range(3)) or not bool(valid_in[k, 0, c[0], c[1], c[2]]):
                    ok = False
            if not ok:
                continue
            t = [scale[x] * p[x] + shift[x] for x in range(3)]  # exact (the field is affine)
            q = [(t[x] - offset[x]) / stride[x] for x in range(3)]
            near = [min(max(round(q[x]), 0), gb[x] - 1) for x in range(3)]
            if cfg["positive_mode"] == "nearest" and cfg.get("positive_radius") is not None:
                dn = [(stride[x] * near[x] + offset[x] - t[x]) * spacing for x in range(3)]
                if not math.sqrt(sum(v * v for v in dn)) < cfg["positive_radius"]:
                    continue
                if cfg.get("positive_depth_radius") is not None and not abs(dn[0]) < cfg["positive_depth_radius"]:
                    continue
            elif any(q[x] < -0.5 or q[x] > gb[x] - 0.5 for x in range(3)):
                continue
            anchor = ea[k, :, i[0], i[1], i[2]]
            qc = [min(max(q[x], 0.0), gb[x] - 1) for x in range(3)]
            if cfg["positive_mode"] == "nearest":
                positive = eb[k, :, near[0], near[1], near[2]]
            else:
                positive = torch.zeros_like(anchor)
                for c in itertools.product((0, 1), repeat=3):
                    idx, wgt = [], 1.0
                    for x in range(3):
                        lo = math.floor(qc[x])
                        fr = qc[x] - lo
                        idx.append(min(lo + c[x], gb[x] - 1))
                        wgt *= fr if c[x] else 1.0 - fr
                    positive = positive + wgt * eb[k, :, idx[0], idx[1], idx[2]]
                positive = positive / positive.norm()
            s_pos = float(anchor @ positive)
            negatives = []
            for j in itertools.product(*[range(n) for n in gb]):
                if dist(centre(j), t) < radius or all(abs(j[x] - qc[x]) < 1 for x in range(3)):
                    continue
                negatives.append(float(anchor @ eb[k, :, j[0], j[1], j[2]]))
            if cfg["negatives_from"] == "both":
                for j in itertools.product(range(d), range(h), range(w)):
                    if j == i or dist(centre(j), p) < radius:
                        continue
                    negatives.append(float(anchor @ ea[k, :, j[0], j[1], j[2]]))
            if cfg["num_hard_negatives"] is not None:
                negatives = sorted(negatives, reverse=True)[: cfg["num_hard_negatives"]]
            for j in range(batch):
                if j == k or cfg.get("num_global_negatives", 0) == 0:
                    continue
                for e in (ea[j], eb[j]):
                    negatives += [float(v) for v in anchor @ e.reshape(e.shape[0], -1)]
            denom = math.exp(s_pos / tau) + sum(math.exp(s / tau) for s in negatives)
            losses.append(-math.log(math.exp(s_pos / tau) / denom))
    return sum(losses) / len(losses), len(losses)


def ref_prototype(emb, labels, tau, include_background=False, ignore_label=-1, normalize=True):
    """Eq. 2 by loops over classes and their voxels; prototypes and softmax over the whole batch."""
    c = emb.shape[1]
    x = emb.double().permute(0, 2, 3, 4, 1).reshape(-1, c)
    lab = labels.reshape(-1).tolist()
    kept = [n for n in range(len(lab)) if lab[n] != ignore_label]
    classes = sorted({lab[n] for n in kept if include_background or lab[n] != 0})
    terms = []
    for p in classes:
        members = [n for n in kept if lab[n] == p]
        proto = sum(x[n] for n in members) / len(members)
        if normalize:
            proto = proto / proto.norm()
        denom = sum(math.exp(float(proto @ x[n]) / tau) for n in kept)
        terms.append(-sum(float(proto @ x[n]) / tau - math.log(denom) for n in members) / len(members))
    return sum(terms) / len(terms)


# ----------------------------------------------------------------------------------------------------------------
# VoxelInfoNCELoss
# ----------------------------------------------------------------------------------------------------------------

SIZE = (8, 12, 12)
GRID = (4, 6, 6)


@pytest.mark.parametrize(
    "overrides, scale, shift",
    [
        ({}, (1.0, 1.0, 1.0), (1.0, 2.0, -3.0)),  # integer shift, exhaustive anchors and negatives
        ({}, (0.9, 1.1, 0.95), (0.7, -1.3, 1.6)),  # fractional correspondences: trilinear positives
        ({"num_hard_negatives": 7, "num_negatives": 7}, (0.9, 1.1, 0.95), (0.7, -1.3, 1.6)),  # hardest only
        ({"negatives_from": "b", "ignore_radius": 0.0}, (1.0, 1.0, 1.0), (0.0, 1.0, 1.0)),
        ({"num_global_negatives": 10_000}, (1.0, 0.9, 1.0), (0.0, 1.0, 2.0)),  # all other-pair voxels
        ({"positive_mode": "nearest"}, (0.9, 1.1, 0.95), (0.7, -1.3, 1.6)),
        (
            {"positive_mode": "nearest", "positive_radius": 2.5, "positive_depth_radius": 1.0},
            (0.9, 1.1, 0.95),
            (0.7, -1.3, 1.6),
        ),
    ],
)
def test_infonce_matches_loop_reference(overrides, scale, shift):
    cfg = {**FINE_INFONCE_DEFAULTS, **ALL, "ignore_radius": 6.0, **overrides}
    emb_a = random_embedding((2, 8, *GRID), 0)
    emb_b = random_embedding((2, 8, *GRID), 1)
    corr, valid = affine_correspondence(2, SIZE, scale, shift)
    valid[1, :, :, :3] = False  # the second pair has a smaller overlap
    loss = VoxelInfoNCELoss(**cfg)(emb_a, emb_b, corr, valid, FINE_STRIDE, FINE_OFFSET)
    expected, n_anchors = ref_infonce(emb_a, emb_b, scale, shift, valid, FINE_STRIDE, FINE_OFFSET, cfg)
    assert n_anchors > 10
    assert abs(loss.item() - expected) < 1e-5
    per_anchor = VoxelInfoNCELoss(**cfg, reduction="none")(emb_a, emb_b, corr, valid, FINE_STRIDE, FINE_OFFSET)
    assert per_anchor.shape == (n_anchors,)


def test_infonce_sampling_is_reproducible_with_a_generator():
    emb_a, emb_b = random_embedding((2, 8, *GRID), 2), random_embedding((2, 8, *GRID), 3)
    corr, valid = affine_correspondence(2, SIZE, (1.0, 1.0, 1.0), (1.0, 1.0, 1.0))
    loss_fn = fine_infonce_loss(num_positives=5, num_hard_negatives=40, num_negatives=10, ignore_radius=4.0)

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return loss_fn(emb_a, emb_b, corr, valid, FINE_STRIDE, FINE_OFFSET, generator=g)

    per_anchor = VoxelInfoNCELoss(**{**FINE_INFONCE_DEFAULTS, "num_positives": 5, "reduction": "none"})
    assert per_anchor(emb_a, emb_b, corr, valid, FINE_STRIDE, FINE_OFFSET).shape == (10,)  # 5 per pair
    assert run(7).item() == run(7).item()
    assert len({round(run(s).item(), 6) for s in range(6)}) > 1


def test_identical_views_score_lower_than_shuffled():
    emb = random_embedding((2, 16, *GRID), 4)
    corr, valid = affine_correspondence(2, SIZE, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    loss_fn = fine_infonce_loss(num_hard_negatives=20, num_negatives=20, ignore_radius=4.0)
    same = loss_fn(emb, emb, corr, valid, FINE_STRIDE, FINE_OFFSET)
    perm = torch.randperm(emb[0, 0].numel(), generator=torch.Generator().manual_seed(0))
    shuffled = emb.flatten(2)[:, :, perm].reshape(emb.shape)
    other = loss_fn(emb, shuffled, corr, valid, FINE_STRIDE, FINE_OFFSET)
    unrelated = loss_fn(emb, random_embedding(emb.shape, 5), corr, valid, FINE_STRIDE, FINE_OFFSET)
    assert same.item() < other.item() - 1.0 and same.item() < unrelated.item() - 1.0


def test_infonce_gradients_reach_both_embeddings():
    raw_a = torch.randn(2, 8, *GRID, requires_grad=True)
    raw_b = torch.randn(2, 8, *GRID, requires_grad=True)
    corr, valid = affine_correspondence(2, SIZE, (1.0, 0.9, 1.1), (0.5, 1.0, -1.0))
    for loss_fn in (fine_infonce_loss(ignore_radius=4.0), coarse_infonce_loss(num_global_negatives=20)):
        raw_a.grad = raw_b.grad = None
        loss = loss_fn(F.normalize(raw_a, dim=1), F.normalize(raw_b, dim=1), corr, valid, FINE_STRIDE, FINE_OFFSET)
        loss.backward()
        assert torch.isfinite(loss) and loss.item() > 0
        assert raw_a.grad.abs().sum() > 0 and raw_b.grad.abs().sum() > 0


def test_no_valid_correspondence_gives_connected_zero():
    raw_a = torch.randn(2, 8, *GRID, requires_grad=True)
    raw_b = torch.randn(2, 8, *GRID, requires_grad=True)
    corr, valid = affine_correspondence(2, SIZE, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    valid[:] = False
    for reduction in ("mean", "sum"):
        loss = fine_infonce_loss(reduction=reduction)(raw_a, raw_b, corr, valid, FINE_STRIDE, FINE_OFFSET)
        assert loss.item() == 0.0 and loss.grad_fn is not None
        loss.backward()
        assert raw_a.grad.abs().sum() == 0 and raw_b.grad is not None
    none = fine_infonce_loss(reduction="none")(raw_a, raw_b, corr, valid, FINE_STRIDE, FINE_OFFSET)
    assert none.shape == (0,) and none.grad_fn is not None
    # correspondences that all fall outside b's head grid count as invalid too
    corr2, valid2 = affine_correspondence(2, SIZE, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    loss = fine_infonce_loss()(raw_a, raw_b, corr2 + 100.0, valid2, FINE_STRIDE, FINE_OFFSET)
    assert loss.item() == 0.0 and loss.grad_fn is not None


def test_factory_defaults_and_validation():
    coarse = coarse_infonce_loss()
    assert coarse.num_hard_negatives == 250 and coarse.num_negatives == 200 and coarse.num_global_negatives == 1000
    assert coarse.positive_radius == 25.0 and coarse.num_positives is None
    assert COARSE_INFONCE_DEFAULTS["temperature"] == FINE_INFONCE_DEFAULTS["temperature"] == 0.5
    fine = VoxelInfoNCELoss()
    assert (fine.num_positives, fine.num_hard_negatives, fine.num_negatives) == (100, 2000, 500)
    for bad in ({"temperature": 0}, {"positive_mode": "cubic"}, {"negatives_from": "a"}, {"num_negatives": 0}):
        with pytest.raises(ValueError):
            VoxelInfoNCELoss(**bad)


# ----------------------------------------------------------------------------------------------------------------
# PrototypeContrastiveLoss
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"include_background": True}, {"normalize_prototypes": False}, {"temperature": 0.5}],
)
def test_prototype_loss_matches_loop_reference(kwargs):
    emb = random_embedding((2, 6, 3, 4, 5), 10)
    labels = torch.randint(0, 4, (2, 1, 3, 4, 5), generator=torch.Generator().manual_seed(1))
    labels[0, 0, 0, 0, :3] = -1  # ignored voxels
    loss = PrototypeContrastiveLoss(**kwargs)(emb, labels)
    expected = ref_prototype(
        emb, labels, kwargs.get("temperature", 0.1), kwargs.get("include_background", False),
        normalize=kwargs.get("normalize_prototypes", True),
    )
    assert abs(loss.item() - expected) < 1e-5


def test_prototype_loss_per_sample_and_reduction_none():
    emb = random_embedding((2, 6, 3, 4, 5), 11)
    labels = torch.randint(0, 3, (2, 1, 3, 4, 5), generator=torch.Generator().manual_seed(2))
    labels[1] = 0  # the second sample has background only
    per_class = PrototypeContrastiveLoss(per_sample=True, reduction="none")(emb, labels)
    assert per_class.shape == (2,)  # classes 1 and 2 of the first sample
    single = PrototypeContrastiveLoss()(emb[:1], labels[:1])
    assert abs(per_class.mean().item() - single.item()) < 1e-6


def test_separable_semantic_embedding_scores_lower_than_random():
    labels = torch.randint(0, 4, (2, 1, 4, 6, 6), generator=torch.Generator().manual_seed(3))
    separable = F.one_hot(labels[:, 0], 8).permute(0, 4, 1, 2, 3).float()  # class p -> unit vector e_p
    loss_fn = PrototypeContrastiveLoss()
    assert loss_fn(separable, labels).item() < loss_fn(random_embedding(separable.shape, 4), labels).item() - 1.0


def test_prototype_loss_is_linear_in_voxels():
    n_side = (50, 64, 64)  # 204,800 voxels: an n x n matrix would need 168 GB
    emb = random_embedding((1, 32, *n_side), 5).requires_grad_(True)
    labels = torch.randint(0, 11, (1, 1, *n_side), generator=torch.Generator().manual_seed(4))  # K = 10 + background
    start = time.perf_counter()
    loss = PrototypeContrastiveLoss()(emb, labels)
    loss.backward()
    assert time.perf_counter() - start < 10.0
    assert torch.isfinite(loss) and emb.grad.abs().sum() > 0


def test_only_background_gives_connected_zero():
    raw = torch.randn(2, 6, 3, 4, 5, requires_grad=True)
    labels = torch.zeros(2, 1, 3, 4, 5, dtype=torch.long)
    labels[0, 0, 0] = -1
    loss = PrototypeContrastiveLoss()(F.normalize(raw, dim=1), labels)
    assert loss.item() == 0.0 and loss.grad_fn is not None
    loss.backward()
    assert raw.grad is not None and raw.grad.abs().sum() == 0
    with pytest.raises(ValueError):
        PrototypeContrastiveLoss()(raw, labels[:, :, :2])


def test_labels_to_grid_picks_the_centre_voxel():
    labels = torch.arange(8 * 32 * 32).reshape(1, 1, 8, 32, 32)
    for head in ("fine", "coarse"):
        stride, offset = HEAD_GRIDS[head]
        out = labels_to_grid(labels, stride, offset)
        assert out.shape == (1, 1, *[s // st for s, st in zip((8, 32, 32), stride)])
        for i in itertools.product(*[range(n) for n in out.shape[2:]]):
            src = [math.floor(stride[x] * i[x] + offset[x]) for x in range(3)]
            assert out[0, 0, i[0], i[1], i[2]] == labels[0, 0, src[0], src[1], src[2]]


# ----------------------------------------------------------------------------------------------------------------
# all three losses through a tiny SAMv2Net
# ----------------------------------------------------------------------------------------------------------------


def test_gradients_reach_every_head_of_the_network():
    torch.manual_seed(0)
    net = SAMv2Net(width=0.25).train()
    volume = torch.randn(2, 1, 16, 80, 80)
    view_a, view_b = volume[..., 0:64, 0:64], volume[..., 16:80, 16:80]  # b is a shifted by (0, 16, 16)
    heads = net.forward_heads(torch.cat([view_a, view_b]))
    corr, valid = affine_correspondence(2, (16, 64, 64), (1.0, 1.0, 1.0), (0.0, -16.0, -16.0))
    g = torch.Generator().manual_seed(0)
    fine = fine_infonce_loss(num_positives=20, num_hard_negatives=50, num_negatives=20)
    coarse = coarse_infonce_loss(num_global_negatives=16)
    loss_fine = fine(heads["fine"][:2], heads["fine"][2:], corr, valid, *HEAD_GRIDS["fine"], generator=g)
    loss_coarse = coarse(heads["coarse"][:2], heads["coarse"][2:], corr, valid, *HEAD_GRIDS["coarse"], generator=g)
    labels = torch.randint(0, 4, (4, 1, 16, 64, 64), generator=g)
    sem = heads["semantic"]
    sem_labels = labels_to_grid(labels, *HEAD_GRIDS["semantic"], grid_shape=sem.shape[2:])
    loss_sem = PrototypeContrastiveLoss()(sem, sem_labels)
    for loss in (loss_fine, loss_coarse, loss_sem):
        assert torch.isfinite(loss) and loss.item() > 0
    (loss_fine + loss_coarse + loss_sem).backward()
    for name, head in net.heads.items():
        grads = [p.grad for p in head.parameters()]
        assert all(gr is not None and gr.abs().sum() > 0 for gr in grads), name
    assert all(p.grad is not None for p in net.encoder.parameters())


# ----------------------------------------------------------------------------------------------------------------
# gradients against finite differences, in both memory layouts, and batched MetaTensor inputs
# ----------------------------------------------------------------------------------------------------------------


def directional_derivatives(loss_of, raw, direction, eps=1e-2):
    """(autograd, central finite difference) of ``loss_of(raw)`` along ``direction``."""
    raw = raw.detach().requires_grad_(True)
    loss_of(raw).backward()
    analytic = float((raw.grad * direction).sum())
    with torch.no_grad():
        numeric = (loss_of(raw + eps * direction).item() - loss_of(raw - eps * direction).item()) / (2 * eps)
    return analytic, numeric


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(
    "overrides",
    [
        {},  # trilinear positives, candidates from both views
        {"positive_mode": "nearest", "negatives_from": "b"},
        {"num_global_negatives": 10_000},  # every voxel of the other pair, too
        {"num_hard_negatives": 10_000},  # every candidate through the ranked path (ranked and gathered)
    ],
)
def test_infonce_gradient_matches_finite_differences(overrides, channels_last):
    # exhaustive anchors and negatives: the loss is then smooth in the embeddings (no top-k switching)
    cfg = {**FINE_INFONCE_DEFAULTS, **ALL, "ignore_radius": 6.0, **overrides}
    gen = torch.Generator().manual_seed(20)
    raw = torch.randn(4, 8, *GRID, generator=gen)
    direction = torch.randn(raw.shape, generator=gen)
    if channels_last:  # the layout the training network's heads come out in
        raw, direction = (t.contiguous(memory_format=torch.channels_last_3d) for t in (raw, direction))
    corr, valid = affine_correspondence(2, SIZE, (0.9, 1.1, 0.95), (0.7, -1.3, 1.6))
    loss_fn = VoxelInfoNCELoss(**cfg)

    def loss_of(x):
        emb_a, emb_b = F.normalize(x, dim=1).split(2)
        return loss_fn(emb_a, emb_b, corr, valid, FINE_STRIDE, FINE_OFFSET)

    analytic, numeric = directional_derivatives(loss_of, raw, direction)
    assert abs(numeric) > 1e-3
    assert analytic == pytest.approx(numeric, rel=1e-2)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("kwargs", [{}, {"per_sample": True}, {"normalize_prototypes": False}])
def test_prototype_gradient_matches_finite_differences(kwargs, channels_last):
    gen = torch.Generator().manual_seed(21)
    raw = torch.randn(2, 6, 3, 4, 5, generator=gen)
    direction = torch.randn(raw.shape, generator=gen)
    if channels_last:
        raw, direction = (t.contiguous(memory_format=torch.channels_last_3d) for t in (raw, direction))
    labels = torch.randint(0, 4, (2, 1, 3, 4, 5), generator=gen)
    labels[0, 0, 0, 0, :3] = -1  # ignored voxels
    loss_fn = PrototypeContrastiveLoss(**kwargs)
    analytic, numeric = directional_derivatives(lambda x: loss_fn(F.normalize(x, dim=1), labels), raw, direction)
    assert abs(numeric) > 1e-3
    assert analytic == pytest.approx(numeric, rel=1e-2)


def test_losses_take_batched_metatensors():
    """The bundle's semantic loader yields MetaTensors whose batch carries one affine per sample; the losses read
    them per sample, which must not try to split that metadata."""
    from monai.data import MetaTensor
    from monai.data.utils import list_data_collate

    def batched(tensors):
        samples = [MetaTensor(t, affine=torch.diag(torch.tensor([2.0, 2.0, 2.0 + i, 1.0]))) for i, t in enumerate(tensors)]
        return list_data_collate([{"x": s} for s in samples])["x"]

    emb = random_embedding((2, 6, 3, 4, 5), 22)
    labels = torch.randint(0, 4, (2, 1, 3, 4, 5), generator=torch.Generator().manual_seed(23))
    meta_emb, meta_labels = batched(emb.unbind(0)), batched(labels.unbind(0))
    assert isinstance(meta_emb, MetaTensor) and meta_emb.is_batch
    for per_sample in (False, True):
        loss_fn = PrototypeContrastiveLoss(per_sample=per_sample)
        assert loss_fn(meta_emb, meta_labels).item() == pytest.approx(loss_fn(emb, labels).item(), abs=1e-6)
    corr, valid = affine_correspondence(2, SIZE, (1.0, 1.0, 1.0), (1.0, 2.0, -3.0))
    emb_a, emb_b = random_embedding((2, 8, *GRID), 24), random_embedding((2, 8, *GRID), 25)
    loss_fn = VoxelInfoNCELoss(**{**FINE_INFONCE_DEFAULTS, **ALL, "ignore_radius": 6.0})
    expected = loss_fn(emb_a, emb_b, corr, valid, FINE_STRIDE, FINE_OFFSET).item()
    got = loss_fn(batched(emb_a.unbind(0)), batched(emb_b.unbind(0)), corr, valid, FINE_STRIDE, FINE_OFFSET)
    assert got.item() == pytest.approx(expected, abs=1e-6)


def test_ranked_negatives_give_the_dense_value_and_gradient():
    """The ranked path (hardest, then random negatives, gathered from the similarities) with every candidate chosen
    gives the dense path's loss and gradients: ranking and gathering neither drop nor repeat a candidate."""
    cfg = {**FINE_INFONCE_DEFAULTS, **ALL, "ignore_radius": 6.0}
    corr, valid = affine_correspondence(2, SIZE, (0.9, 1.1, 0.95), (0.7, -1.3, 1.6))
    raw = torch.randn(4, 8, *GRID, generator=torch.Generator().manual_seed(5))
    results = []
    for overrides in ({}, {"num_hard_negatives": 10_000}):
        x = raw.clone().requires_grad_(True)
        emb_a, emb_b = F.normalize(x, dim=1).split(2)
        loss = VoxelInfoNCELoss(**{**cfg, **overrides})(emb_a, emb_b, corr, valid, FINE_STRIDE, FINE_OFFSET)
        loss.backward()
        results.append((loss.detach(), x.grad))
    (dense, dense_grad), (ranked, ranked_grad) = results
    torch.testing.assert_close(ranked, dense, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ranked_grad, dense_grad, rtol=1e-5, atol=1e-7)
    assert dense_grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------------------
# the shared negative selection (samv2_components.losses.negatives)
# ---------------------------------------------------------------------------------------------------------------


def _negatives_from_the_full_product(anchors, candidates, keep, num_hard, num_random, generator):
    """The selection written plainly: one differentiable product with every candidate, then the chosen entries."""
    sim = anchors @ candidates.t()
    ranked = sim.detach().masked_fill(~keep, float("-inf"))
    hard_val, hard_idx = ranked.topk(min(num_hard, sim.shape[1]), dim=1)
    hard_ok = torch.isfinite(hard_val)
    if num_random < hard_idx.shape[1]:
        keys = torch.rand(hard_idx.shape, generator=generator).masked_fill(~hard_ok, -1.0)
        pick = keys.topk(num_random, dim=1).indices
        hard_idx, hard_ok = hard_idx.gather(1, pick), hard_ok.gather(1, pick)
    return sim.gather(1, hard_idx).masked_fill(~hard_ok, float("-inf"))


@pytest.mark.parametrize(
    "n_candidates, num_hard, num_random",
    [(400, 60, 20), (50, 30, 20), (12, 30, 20)],  # rows gathered; one product (many chosen); fewer than K kept
)
def test_negatives_equal_the_full_product_in_value_and_gradient(n_candidates, num_hard, num_random):
    from samv2_components.losses.negatives import hard_then_random_negatives

    torch.manual_seed(0)
    anchors = F.normalize(torch.randn(7, 16, dtype=torch.float64), dim=1)
    candidates = F.normalize(torch.randn(n_candidates, 16, dtype=torch.float64), dim=1)
    keep = torch.rand(7, n_candidates) > 0.3
    results = []
    for select in (hard_then_random_negatives, _negatives_from_the_full_product):
        a, c = anchors.clone().requires_grad_(True), candidates.clone().requires_grad_(True)
        neg = select(a, c, keep, num_hard, num_random, torch.Generator().manual_seed(3))
        weights = torch.linspace(0.5, 2.0, neg.shape[1], dtype=torch.float64)
        torch.where(torch.isfinite(neg), neg * weights, 0.0).sum().backward()
        results.append((neg.detach(), a.grad, c.grad))
    (neg, grad_a, grad_c), (ref, ref_a, ref_c) = results
    assert neg.shape == (7, min(num_random, num_hard, n_candidates))
    assert torch.equal(torch.isinf(neg), torch.isinf(ref))
    if n_candidates == 12:
        assert torch.isinf(neg).any()  # at most 12 kept: the rows are padded with -inf
    torch.testing.assert_close(neg[torch.isfinite(neg)], ref[torch.isfinite(ref)])
    torch.testing.assert_close(grad_a, ref_a)
    torch.testing.assert_close(grad_c, ref_c)


def test_negatives_without_candidates_are_an_empty_row_still_connected():
    from samv2_components.losses.negatives import hard_then_random_negatives

    anchors = torch.randn(5, 8, requires_grad=True)
    neg = hard_then_random_negatives(anchors, torch.randn(0, 8), torch.zeros(5, 0, dtype=torch.bool), 10, 4)
    assert neg.shape == (5, 0)
    neg.sum().backward()
    assert anchors.grad is not None and float(anchors.grad.abs().sum()) == 0.0
