"""Self-supervised appearance loss of SAM/SAMv2: voxel-wise InfoNCE between two views (paper Eq. 1).

Two overlapping, differently augmented patches ``a`` and ``b`` of one scan are embedded by the same head. For an
anchor voxel of ``a`` the *positive* is ``b``'s embedding at the same physical location; the *negatives* are
other voxels, the hardest (most similar) ones first, then a random ("diverse") subset of those:

.. math::

    \\mathcal{L} = -\\frac{1}{N}\\sum_{i} \\log
        \\frac{\\exp(s^+_i/\\tau)}{\\exp(s^+_i/\\tau) + \\sum_{j \\in \\mathcal{N}_i} \\exp(s^-_{ij}/\\tau)}

The same loss class serves the fine and the coarse head with different settings:
:data:`FINE_INFONCE_DEFAULTS` (the constructor defaults) and :data:`COARSE_INFONCE_DEFAULTS`, also available as
the factories :func:`fine_infonce_loss` and :func:`coarse_infonce_loss`. Their numbers are those of the upstream
training config ``configs/samv2/samv2_NIHLN.py`` (``train_cfg.intra_cfg``); where this implementation departs
from the upstream code (``Sam_uniform_cross_volume_dual_head_mean_vector.single_intra_{fine,coarse}_loss``)
the class docstring says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.utils import LossReduction

from samv2_components.io.image import plain_tensor
from samv2_components.losses.negatives import hard_then_random_negatives, random_permutation
from samv2_components.losses.reduction import reduce_losses
from torch.nn.modules.loss import _Loss

__all__ = [
    "VoxelInfoNCELoss",
    "FINE_INFONCE_DEFAULTS",
    "COARSE_INFONCE_DEFAULTS",
    "fine_infonce_loss",
    "coarse_infonce_loss",
    "head_grid_positions",
    "voxel_rows",
]

#: fine head (4 mm grid at 2 mm input). Upstream: 100 positives, 2000 hardest -> 500 random negatives,
#: negatives ignored within 20 mm of the anchor's location, tau = 0.5. Positives: see ``positive_mode``.
FINE_INFONCE_DEFAULTS: dict[str, Any] = {
    "temperature": 0.5,
    "num_positives": 100,
    "num_hard_negatives": 2000,
    "num_negatives": 500,
    "num_global_negatives": 0,
    "ignore_radius": 20.0,
    "positive_mode": "trilinear",
    "positive_radius": None,
    "positive_depth_radius": None,
    "negatives_from": "both",
}

#: coarse head (8 x 32 x 32 mm grid). Upstream: every coarse voxel whose nearest voxel in the other view is within
#: 25 mm (and within 6 mm along depth) is a positive; 250 hardest -> 200 random negatives, ignored within 5 mm;
#: plus 1000 random negatives from the other samples of the batch; tau = 0.5.
COARSE_INFONCE_DEFAULTS: dict[str, Any] = {
    "temperature": 0.5,
    "num_positives": None,
    "num_hard_negatives": 250,
    "num_negatives": 200,
    "num_global_negatives": 1000,
    "ignore_radius": 5.0,
    "positive_mode": "nearest",
    "positive_radius": 25.0,
    "positive_depth_radius": 6.0,
    "negatives_from": "both",
}

_VALID_EPS = 1e-6


def head_grid_positions(
    grid_shape: Sequence[int],
    stride: Sequence[float],
    offset: Sequence[float],
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Input-voxel coordinates ``(n, 3)`` (D, H, W order) of every head voxel, flattened in C order.

    Head voxel ``i`` is centred on input voxel ``stride * i + offset`` (see ``HEAD_GRIDS`` in the network).
    """
    axes = [torch.arange(int(n), dtype=torch.float32, device=device) for n in grid_shape]
    idx = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)
    stride_t = torch.as_tensor(stride, dtype=torch.float32, device=device)
    offset_t = torch.as_tensor(offset, dtype=torch.float32, device=device)
    return idx * stride_t + offset_t


def voxel_rows(emb: torch.Tensor) -> torch.Tensor:
    """``(B, C, d, h, w)`` -> ``(B, n, C)``: one row per voxel, voxels in C order.

    A view (no copy) for a ``channels_last_3d`` tensor, which is how the training network's heads come out; the
    losses work on rows so that neither the forward pass nor the gradient is transposed to ``(C, n)`` and back.
    """
    return emb.permute(0, 2, 3, 4, 1).reshape(emb.shape[0], -1, emb.shape[1])


_CORNERS = torch.tensor([[(c >> 2) & 1, (c >> 1) & 1, c & 1] for c in range(8)])  # (8, 3) unit-cube corners


def _trilinear(rows: torch.Tensor, grid_shape: Sequence[int], points: torch.Tensor, border: bool) -> torch.Tensor:
    """Sample a field given as ``rows`` ``(n, C)`` (voxels of ``grid_shape`` ``(D, H, W)`` in C order) at voxel
    coordinates ``points`` ``(N, 3)``; returns ``(N, C)``.

    ``border=False``: corners outside the field contribute zero (zero padding). ``border=True``: points are
    clamped into the field first. Differentiable w.r.t. ``rows``; the eight corners are gathered in one
    indexing call, so the backward pass scatters into one zero tensor of the field's size, not eight.
    """
    size = torch.tensor(list(grid_shape), device=points.device)
    if border:
        points = torch.minimum(points.clamp_min(0.0), (size - 1).to(points.dtype))
    base = points.floor()
    frac = points - base
    corners = _CORNERS.to(points.device)
    idx = base.long().unsqueeze(0) + corners.unsqueeze(1)  # (8, N, 3)
    weight = torch.where(corners.bool().unsqueeze(1), frac.unsqueeze(0), 1.0 - frac.unsqueeze(0)).prod(dim=2)
    weight = weight * ((idx >= 0) & (idx < size)).all(dim=2)  # (8, N)
    idx = torch.minimum(idx.clamp_min(0), size - 1)
    lin = (idx[..., 0] * size[1] + idx[..., 1]) * size[2] + idx[..., 2]
    values = rows[lin.reshape(-1)].reshape(8, points.shape[0], rows.shape[1])
    return (values * weight.unsqueeze(2).to(rows.dtype)).sum(dim=0)


def _spacing_rows(spacing: Any, batch: int, device: torch.device) -> torch.Tensor:
    """``(B, 3)`` spacing in mm from a number, a 3-sequence or a ``(B, 3)`` tensor."""
    value = torch.as_tensor(spacing, dtype=torch.float32, device=device)
    if value.ndim == 0:
        value = value.repeat(3)
    if value.ndim == 1:
        if value.numel() != 3:
            raise ValueError(f"spacing must have 3 values (D, H, W), got {tuple(value.shape)}")
        value = value.unsqueeze(0).expand(batch, 3)
    if value.shape != (batch, 3):
        raise ValueError(f"spacing must be a number, 3 values or shape ({batch}, 3), got {tuple(value.shape)}")
    return value


def _squared_distance(
    points: torch.Tensor, targets: torch.Tensor, spacing: torch.Tensor
) -> torch.Tensor:
    """``(N, M)`` squared distances in mm between ``targets`` ``(N, 3)`` and ``points`` ``(M, 3)`` (voxel units).

    One ``cdist`` instead of per-axis broadcasts: the (N, M, 3) intermediates of the latter were a third of a
    training step's loss time. Exact (no matrix-product shortcut), as the ignore radius is a hard threshold."""
    return torch.cdist(targets * spacing, points * spacing, compute_mode="donot_use_mm_for_euclid_dist").square()


class VoxelInfoNCELoss(_Loss):
    """Voxel-wise InfoNCE with hard and diverse negatives between two views of one scan (SAMv2 paper Eq. 1).

    For each pair ``(a[k], b[k])`` of the batch:

    1. **Anchors.** Head voxel ``i`` of ``a`` sits on input voxel ``p = stride * i + offset``. Its correspondence
       ``t`` in ``b`` (input-voxel coordinates of ``b``) is ``corr_ab`` sampled trilinearly at ``p``; the anchor
       is usable when ``valid_ab`` is true at every input voxel with non-zero interpolation weight (exact for the
       affine correspondences of two crops). ``t`` maps to ``b``'s head grid as ``q = (t - offset) / stride``.
       Up to ``num_positives`` usable anchors are drawn uniformly without replacement (all if None).
    2. **Positive.** ``positive_mode="trilinear"``: ``b``'s head embedding interpolated trilinearly at ``q``
       (clamped to the grid) and re-normalised; anchors need ``q`` within half a head voxel of the grid.
       ``positive_mode="nearest"`` (upstream): the embedding of the head voxel nearest to ``q``; when
       ``positive_radius`` / ``positive_depth_radius`` (mm) are set, the anchor is kept only if that voxel's
       centre lies strictly within those distances of ``t`` (Euclidean / along depth), otherwise only if ``q`` is
       within half a head voxel of the grid.
    3. **Negatives.** Candidates are every head voxel of ``b`` and, with ``negatives_from="both"`` (upstream),
       every head voxel of ``a``, except those within ``ignore_radius`` mm of the anchor's physical location
       (``t`` in ``b``, ``p`` in ``a``): they are neither positive nor negative. Voxels of ``b`` within one head
       voxel of ``q`` along every axis (those the positive is interpolated from) and the anchor itself are never
       negatives, whatever the radius. The ``num_hard_negatives`` candidates most similar to the anchor are kept
       (all if None), then ``num_negatives`` of them drawn uniformly at random per anchor (all if None or if
       fewer remain). ``num_global_negatives`` > 0 adds that many voxels drawn at random from the *other* pairs
       of the batch (both views, no distance rule), one draw shared by all anchors of the pair.
    4. ``loss_i = -log(exp(s+/tau) / (exp(s+/tau) + sum exp(s-/tau)))`` with cosine similarities ``s``.

    Distances are in mm: input-voxel offsets times ``spacing`` (per view; the views of a pair may have been
    resampled differently, pass ``spacing_a`` / ``spacing_b`` to ``forward`` then). The loss is one-directional
    (anchors in ``a``); upstream symmetrises, i.e. average ``loss(a, b, corr_ab)`` and ``loss(b, a, corr_ba)``.

    Deviations from the upstream code (all deliberate):

    * Positives (fine): upstream uses the nearest ``b`` head voxel and keeps only anchors whose nearest voxel is
      within 2 mm; the default here interpolates ``b``'s embedding at the exact correspondence, so every anchor
      of the overlap is usable. ``positive_mode="nearest", positive_radius=2.0`` reproduces upstream.
    * Ignored candidates are excluded; upstream multiplies their similarity by 0, so they can still be chosen as
      "hard" negatives, and at the coarse level the positive voxel itself (up to 25 mm away, outside the 5 mm
      ignore radius) could be a negative.
    * Hard negatives are ranked by this head's similarity; upstream ranks fine negatives by fine + coarse
      similarity (coarse resampled to the fine grid), which needs both heads in one call.
    * Upstream's coarse "diverse" draw indexes the similarity row with ``randperm(250)[:200]`` instead of the
      top-250 indices (so it picks among the first 250 voxels of the volume, not the hardest): fixed here.
    * Upstream's coarse depth rule is 8 mm for one direction and ``coarse_z_thres`` = 6 mm for the other; 6 mm
      is used here.
    * Upstream averages per pair, then over pairs; here anchors of all pairs are pooled (identical when every
      pair has the same number of anchors, e.g. 100).
    * A pair with no usable anchor contributes nothing (upstream falls back to a self-contrast loss).

    Args:
        temperature: tau (0.5 upstream, both levels).
        num_positives: anchors drawn per pair; None: all usable anchors (upstream: 100 fine, all coarse).
        num_hard_negatives: hardest candidates kept per anchor; None: all (upstream: 2000 fine, 250 coarse).
        num_negatives: negatives drawn at random among the hard ones; None: all (upstream: 500 fine, 200 coarse).
        num_global_negatives: extra random negatives from the other pairs of the batch (upstream: 1000 coarse).
        ignore_radius: mm around the anchor's location inside which candidates are ignored (upstream: 20 fine,
            5 coarse).
        positive_mode: ``"trilinear"`` or ``"nearest"``, see above.
        positive_radius: nearest mode only: max Euclidean mm from the correspondence to the positive voxel
            centre (upstream: 2 fine, 25 coarse); None: half a head voxel along every axis.
        positive_depth_radius: nearest mode only: max mm along depth (upstream coarse: 6).
        negatives_from: ``"both"`` (candidates from ``a`` and ``b``, upstream) or ``"b"``.
        spacing: default input-voxel spacing in mm (D, H, W) of both views (2 mm in the reference).
        reduction: ``"mean"`` over anchors, ``"sum"``, or ``"none"`` (one value per anchor, pairs in order).
    """

    def __init__(
        self,
        temperature: float = FINE_INFONCE_DEFAULTS["temperature"],
        num_positives: int | None = FINE_INFONCE_DEFAULTS["num_positives"],
        num_hard_negatives: int | None = FINE_INFONCE_DEFAULTS["num_hard_negatives"],
        num_negatives: int | None = FINE_INFONCE_DEFAULTS["num_negatives"],
        num_global_negatives: int = FINE_INFONCE_DEFAULTS["num_global_negatives"],
        ignore_radius: float = FINE_INFONCE_DEFAULTS["ignore_radius"],
        positive_mode: str = FINE_INFONCE_DEFAULTS["positive_mode"],
        positive_radius: float | None = FINE_INFONCE_DEFAULTS["positive_radius"],
        positive_depth_radius: float | None = FINE_INFONCE_DEFAULTS["positive_depth_radius"],
        negatives_from: str = FINE_INFONCE_DEFAULTS["negatives_from"],
        spacing: float | Sequence[float] = 2.0,
        reduction: LossReduction | str = LossReduction.MEAN,
    ) -> None:
        super().__init__(reduction=LossReduction(reduction).value)
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        for name, value in (
            ("num_positives", num_positives),
            ("num_hard_negatives", num_hard_negatives),
            ("num_negatives", num_negatives),
        ):
            if value is not None and int(value) < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value}")
        if num_global_negatives < 0:
            raise ValueError(f"num_global_negatives must be >= 0, got {num_global_negatives}")
        if ignore_radius < 0:
            raise ValueError(f"ignore_radius must be >= 0, got {ignore_radius}")
        if positive_mode not in ("trilinear", "nearest"):
            raise ValueError(f"positive_mode must be 'trilinear' or 'nearest', got {positive_mode!r}")
        if negatives_from not in ("both", "b"):
            raise ValueError(f"negatives_from must be 'both' or 'b', got {negatives_from!r}")
        self.temperature = float(temperature)
        self.num_positives = None if num_positives is None else int(num_positives)
        self.num_hard_negatives = None if num_hard_negatives is None else int(num_hard_negatives)
        self.num_negatives = None if num_negatives is None else int(num_negatives)
        self.num_global_negatives = int(num_global_negatives)
        self.ignore_radius = float(ignore_radius)
        self.positive_mode = positive_mode
        self.positive_radius = None if positive_radius is None else float(positive_radius)
        self.positive_depth_radius = None if positive_depth_radius is None else float(positive_depth_radius)
        self.negatives_from = negatives_from
        self.spacing = spacing

    def forward(
        self,
        emb_a: torch.Tensor,
        emb_b: torch.Tensor,
        corr_ab: torch.Tensor,
        valid_ab: torch.Tensor,
        stride: Sequence[float],
        offset: Sequence[float],
        spacing_a: float | Sequence[float] | torch.Tensor | None = None,
        spacing_b: float | Sequence[float] | torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """
        Args:
            emb_a: ``(B, C, d, h, w)`` L2-normalised head embeddings of view ``a``.
            emb_b: ``(B, C, d', h', w')`` the same head's embeddings of view ``b`` (pair ``k`` is ``a[k], b[k]``).
            corr_ab: ``(B, 3, D, H, W)`` for every input voxel of ``a``, its continuous input-voxel coordinate
                (D, H, W order) in ``b``.
            valid_ab: ``(B, 1, D, H, W)`` bool (or 0/1): where ``corr_ab`` is meaningful (inside ``b``).
            stride: the head grid's stride in input voxels (``HEAD_GRIDS[head][0]``).
            offset: the head grid's offset in input voxels (``HEAD_GRIDS[head][1]``).
            spacing_a: input-voxel spacing of ``a`` in mm: a number, 3 values or ``(B, 3)``; default ``spacing``.
            spacing_b: the same for ``b``.
            generator: random source for anchor, negative and global-negative draws (global RNG if None).

        Returns:
            The reduced loss; with reduction ``"none"`` a ``(N,)`` tensor, one value per anchor. When no pair has
            a usable anchor, a zero (``"mean"`` / ``"sum"``) or an empty tensor (``"none"``) that is still
            connected to both embeddings (``grad_fn`` set, zero gradients), so DDP does not wait for gradients
            that never come.
        """
        # plain tensors: per-pair views of a batched MetaTensor would try to split its metadata
        emb_a, emb_b = plain_tensor(emb_a), plain_tensor(emb_b)
        if emb_a.ndim != 5 or emb_b.ndim != 5:
            raise ValueError(f"embeddings must be (B, C, d, h, w), got {tuple(emb_a.shape)}, {tuple(emb_b.shape)}")
        if emb_a.shape[:2] != emb_b.shape[:2]:
            raise ValueError(f"emb_a and emb_b need the same batch and channels: {emb_a.shape} vs {emb_b.shape}")
        batch = emb_a.shape[0]
        if corr_ab.ndim != 5 or corr_ab.shape[:2] != (batch, 3):
            raise ValueError(f"corr_ab must be (B, 3, D, H, W), got {tuple(corr_ab.shape)}")
        if valid_ab.shape != (batch, 1, *corr_ab.shape[2:]):
            raise ValueError(f"valid_ab must be (B, 1, D, H, W) like corr_ab, got {tuple(valid_ab.shape)}")
        device = emb_a.device
        with torch.autocast(device_type=device.type, enabled=False):
            losses = self._per_anchor_losses(
                emb_a.float(),
                emb_b.float(),
                corr_ab.to(device=device, dtype=torch.float32),
                valid_ab.to(device) > 0.5 if valid_ab.dtype != torch.bool else valid_ab.to(device),
                stride,
                offset,
                _spacing_rows(self.spacing if spacing_a is None else spacing_a, batch, device),
                _spacing_rows(self.spacing if spacing_b is None else spacing_b, batch, device),
                generator,
            )
        return reduce_losses(losses, self.reduction, emb_a, emb_b)

    def _per_anchor_losses(
        self,
        emb_a: torch.Tensor,
        emb_b: torch.Tensor,
        corr: torch.Tensor,
        valid: torch.Tensor,
        stride: Sequence[float],
        offset: Sequence[float],
        spacing_a: torch.Tensor,
        spacing_b: torch.Tensor,
        generator: torch.Generator | None,
    ) -> torch.Tensor | None:
        device = emb_a.device
        batch = emb_a.shape[0]
        grid_a, grid_b = emb_a.shape[2:], emb_b.shape[2:]
        stride_t = torch.as_tensor(stride, dtype=torch.float32, device=device)
        offset_t = torch.as_tensor(offset, dtype=torch.float32, device=device)
        pos_a = head_grid_positions(grid_a, stride, offset, device)  # (Na, 3) input voxels of a
        pos_b = head_grid_positions(grid_b, stride, offset, device)  # (Nb, 3) input voxels of b
        idx_b = (pos_b - offset_t) / stride_t  # (Nb, 3) head-grid indices of b
        size_b = torch.tensor(grid_b, dtype=torch.float32, device=device)
        # one row per voxel, unbound per pair once: indexing a pair's rows then costs its own gradient buffer
        # only, where selecting pair k of a (B, C, n) tensor at every use zero-filled the whole batch's
        rows_a, rows_b = voxel_rows(emb_a).unbind(0), voxel_rows(emb_b).unbind(0)  # each (n, C)
        radius2 = self.ignore_radius**2

        out: list[torch.Tensor] = []
        for k in range(batch):
            # 1. anchors with a valid correspondence
            with torch.no_grad():
                valid_k = valid[k].float()  # (1, D, H, W)
                input_grid = valid_k.shape[1:]
                weight = _trilinear(valid_k.reshape(-1, 1), input_grid, pos_a, border=False)[:, 0]
                corr_rows = (corr[k] * valid_k).reshape(3, -1).t()
                target = _trilinear(corr_rows, input_grid, pos_a, border=False) / weight.clamp_min(_VALID_EPS)[:, None]
                usable = weight > 1.0 - _VALID_EPS
                q = (target - offset_t) / stride_t
                inside = ((q >= -0.5) & (q <= size_b - 0.5)).all(dim=1)
                nearest = torch.minimum(q.round().clamp_min(0.0), size_b - 1)
                if self.positive_mode == "nearest" and (
                    self.positive_radius is not None or self.positive_depth_radius is not None
                ):
                    diff_mm = (nearest * stride_t + offset_t - target) * spacing_b[k]
                    if self.positive_radius is not None:
                        usable &= diff_mm.norm(dim=1) < self.positive_radius
                    if self.positive_depth_radius is not None:
                        usable &= diff_mm[:, 0].abs() < self.positive_depth_radius
                else:
                    usable &= inside
                anchors = torch.nonzero(usable).flatten()
                if self.num_positives is not None and anchors.numel() > self.num_positives:
                    anchors = anchors[random_permutation(anchors.numel(), generator, device)[: self.num_positives]]
            if anchors.numel() == 0:
                continue
            q_sel, t_sel = q[anchors], target[anchors]
            anchor_emb = rows_a[k][anchors]  # (N, C)

            # 2. positives
            if self.positive_mode == "nearest":
                near = nearest[anchors].long()
                lin = (near[:, 0] * grid_b[1] + near[:, 1]) * grid_b[2] + near[:, 2]
                positive = rows_b[k][lin]
            else:
                positive = F.normalize(_trilinear(rows_b[k], grid_b, q_sel, border=True), dim=1)
            s_pos = (anchor_emb * positive).sum(dim=1, keepdim=True)

            # 3. candidate negatives: b's voxels (and a's), outside the ignore radius and the positive's support
            with torch.no_grad():
                q_clamped = torch.minimum(q_sel.clamp_min(0.0), size_b - 1)
                support = torch.cdist(q_clamped, idx_b, p=float("inf")) < 1.0  # within one voxel on every axis
                keep_b = (_squared_distance(pos_b, t_sel, spacing_b[k]) >= radius2) & ~support
                if self.negatives_from == "both":
                    keep_a = _squared_distance(pos_a, pos_a[anchors], spacing_a[k]) >= radius2
                    keep_a[torch.arange(anchors.numel(), device=device), anchors] = False
                    keep = torch.cat([keep_b, keep_a], dim=1)
                else:
                    keep = keep_b
            candidates = torch.cat([rows_b[k], rows_a[k]]) if self.negatives_from == "both" else rows_b[k]  # (M, C)
            negatives = hard_then_random_negatives(
                anchor_emb, candidates, keep, self.num_hard_negatives, self.num_negatives, generator
            )
            parts = [s_pos, negatives]

            if self.num_global_negatives > 0 and batch > 1:
                pool = torch.cat([rows[j] for j in range(batch) if j != k for rows in (rows_a, rows_b)])
                draw = random_permutation(pool.shape[0], generator, device)[: self.num_global_negatives]
                parts.append(anchor_emb @ pool[draw].t())

            logits = torch.cat(parts, dim=1) / self.temperature
            out.append(torch.logsumexp(logits, dim=1) - logits[:, 0])
        return torch.cat(out) if out else None


def fine_infonce_loss(**overrides: Any) -> VoxelInfoNCELoss:
    """:class:`VoxelInfoNCELoss` with :data:`FINE_INFONCE_DEFAULTS` (= the constructor defaults) and ``overrides``."""
    return VoxelInfoNCELoss(**{**FINE_INFONCE_DEFAULTS, **overrides})


def coarse_infonce_loss(**overrides: Any) -> VoxelInfoNCELoss:
    """:class:`VoxelInfoNCELoss` with :data:`COARSE_INFONCE_DEFAULTS`, updated by ``overrides``."""
    return VoxelInfoNCELoss(**{**COARSE_INFONCE_DEFAULTS, **overrides})
