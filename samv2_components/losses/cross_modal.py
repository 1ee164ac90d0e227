"""Cross-modal voxel-wise InfoNCE of CrossSAM (SAMv2 paper Eq. 8) on registered CT-MR pairs.

After AdaReg, the small-FOV scan ``b`` (e.g. MR) is resampled onto the grid of a patch of the large-FOV scan ``a``
(e.g. CT): voxel ``p`` of both is the same physical point, up to registration error. ``b`` has real data only
inside the overlap ``valid_b``. For an anchor position ``p`` drawn inside the overlap, the positive of ``a[p]`` is
``b[p]`` and vice versa; the negatives are other voxels of the *other* modality inside the overlap (hardest first,
then a random subset), plus, for the anchors of ``b``, extra "FOV negatives" from ``a`` outside the overlap, so
that the network learns that the anatomy outside the small scan does not match it:

.. math::

    \\mathcal{L}_{b \\to a}(p) = -\\log
        \\frac{\\exp(s^+_p/\\tau)}{\\exp(s^+_p/\\tau) + \\sum_{q \\in \\mathcal{N}_p} \\exp(b_p \\cdot a_q/\\tau)
        + \\sum_{q \\in \\mathcal{F}_p} \\exp(b_p \\cdot a_q/\\tau)}, \\qquad s^+_p = a_p \\cdot b_p

Defaults: :data:`CROSS_FINE_DEFAULTS` (the constructor defaults, also :func:`cross_modal_fine_loss`) and
:data:`CROSS_COARSE_DEFAULTS` (:func:`cross_modal_coarse_loss`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from monai.utils import LossReduction
from torch.nn.modules.loss import _Loss

from samv2_components.losses.appearance import _spacing_rows
from samv2_components.losses.negatives import hard_then_random_negatives, random_permutation
from samv2_components.losses.reduction import reduce_losses

__all__ = [
    "CrossModalInfoNCELoss",
    "CROSS_FINE_DEFAULTS",
    "CROSS_COARSE_DEFAULTS",
    "cross_modal_fine_loss",
    "cross_modal_coarse_loss",
]

#: fine head (4 mm grid at 2 mm input): paper N_pos = 200, N_neg = 500, N_fov = 100, tau_c = 0.5. The hard pools
#: (2000 -> 500 as in the intra-modality fine loss; 400 -> 100 for FOV negatives, the same 4:1 ratio) and the
#: 20 mm ignore radius (as intra fine) are this implementation's choice.
CROSS_FINE_DEFAULTS: dict[str, Any] = {
    "temperature": 0.5,
    "num_positives": 200,
    "num_hard_negatives": 2000,
    "num_negatives": 500,
    "num_hard_fov_negatives": 400,
    "num_fov_negatives": 100,
    "ignore_radius": 20.0,
    "min_overlap_voxels": 16,
    "direction": "both",
    "spacing": 4.0,
}

#: coarse head (8 x 32 x 32 mm grid at 2 mm input): paper N_pos = 100, N_neg = 200, no FOV negatives (set
#: ``num_fov_negatives`` to add them). Hard pool 250 as in the intra-modality coarse loss. Ignore radius 10 mm
#: (intra coarse uses 5 mm, which only excludes the anchor's own voxel): it also excludes the two depth neighbours
#: (8 mm away), which CT-MR registration error (5-11 mm in the paper) can make the true match, but no in-plane
#: neighbour (32 mm).
CROSS_COARSE_DEFAULTS: dict[str, Any] = {
    "temperature": 0.5,
    "num_positives": 100,
    "num_hard_negatives": 250,
    "num_negatives": 200,
    "num_hard_fov_negatives": None,
    "num_fov_negatives": 0,
    "ignore_radius": 10.0,
    "min_overlap_voxels": 16,
    "direction": "both",
    "spacing": (8.0, 32.0, 32.0),
}

_DIRECTIONS = ("both", "a_to_b", "b_to_a")


class CrossModalInfoNCELoss(_Loss):
    """Symmetric cross-modal voxel-wise InfoNCE with hard, diverse and FOV negatives (CrossSAM, SAMv2 Eq. 8).

    Inputs are one head's embeddings of a registered pair on the *same* grid: ``emb_a`` of the large-FOV modality
    (e.g. CT), ``emb_b`` of the small-FOV modality resampled onto it (e.g. MR), and ``valid_b``, where ``b`` has
    real data (the overlap). For each pair ``k`` of the batch:

    1. **Anchors.** Up to ``num_positives`` positions ``p`` are drawn uniformly without replacement among the
       overlap voxels (all of them if None). The same positions serve both directions. A pair whose overlap has
       fewer than ``min_overlap_voxels`` voxels is skipped: it contributes no anchor (zero weight in ``"mean"``,
       nothing to ``"sum"``, no entry in ``"none"``).
    2. **Positive.** ``s+ = a[p] . b[p]`` (same voxel, both directions).
    3. **a -> b** (anchor ``a[p]``): negatives ``a[p] . b[q]`` for overlap voxels ``q`` of ``b``; no FOV
       negatives, since ``b`` has no data outside the overlap and ``a``'s own voxels there would be
       intra-modality negatives, which the intra-modality steps already train.
    4. **b -> a** (anchor ``b[p]``): negatives ``b[p] . a[q]`` for overlap voxels ``q`` of ``a``, **plus FOV
       negatives** ``b[p] . a[q]`` for ``q`` outside the overlap (and inside ``fov_a`` when given, e.g. the body
       of the large scan): the non-overlapping region of the large-FOV scan, which the small scan's anatomy must
       not match. Only this direction uses them: it is the one whose negatives come from the large-FOV scan,
       and it is the direction in which a small-FOV template point is searched for in a large-FOV scan.
    5. **Exclusions.** Candidates closer than ``ignore_radius`` mm to ``p`` (Euclidean, ``spacing`` mm per grid
       voxel along D, H, W) are neither positive nor negative (registration is not exact); this applies to FOV
       candidates too. The positive voxel ``q = p`` is never a negative, whatever the radius.
    6. **Selection.** Overlap negatives: the ``num_hard_negatives`` most similar candidates (by this head's
       similarity; all if None), then ``num_negatives`` of them at random per anchor (all if None or fewer
       remain). FOV negatives: likewise with ``num_hard_fov_negatives`` / ``num_fov_negatives`` (a separate pool
       added on top; ``num_fov_negatives=0`` disables them, ``num_hard_fov_negatives=None`` makes the draw purely
       random over the FOV region). An anchor with no candidate left gets the loss ``0`` in that direction.
    7. ``loss_dir(p) = -log(exp(s+/tau) / (exp(s+/tau) + sum exp(s-/tau)))``; with ``direction="both"`` the
       per-anchor loss is ``(loss_ab(p) + loss_ba(p)) / 2``, so ``"mean"`` is the average of the two directions'
       means; ``"a_to_b"`` / ``"b_to_a"`` keep one direction.

    Anchors of all pairs are pooled for ``"mean"``. Deviations from the upstream code
    (``Sam_uniform_cross_volume_dual_head_mri_ct.single_inter_{fine,coarse}_loss``): upstream draws negatives
    from both modalities for both directions and ranks fine negatives by fine + coarse similarity; its released
    version has no FOV negatives. Here each direction contrasts across modalities only, as Eq. 8 describes.

    Args:
        temperature: tau_c (0.5 in the paper).
        num_positives: anchors per pair (paper: 200 fine, 100 coarse); None: every overlap voxel.
        num_hard_negatives: hardest overlap candidates kept per anchor and direction; None: all.
        num_negatives: overlap negatives drawn among the hard ones (paper N_neg: 500 fine, 200 coarse); None: all.
        num_hard_fov_negatives: hardest FOV candidates kept per anchor (b -> a only); None: all.
        num_fov_negatives: FOV negatives drawn among those (paper N_fov: 100 fine); 0: none; None: all.
        ignore_radius: mm around the anchor's location inside which candidates are ignored.
        min_overlap_voxels: pairs with fewer overlap voxels are skipped (at least 1).
        direction: ``"both"`` (symmetric, default), ``"a_to_b"`` or ``"b_to_a"``.
        spacing: default grid spacing in mm (D, H, W) of the embeddings (4 mm fine, 8 x 32 x 32 mm coarse).
        reduction: ``"mean"`` over anchors, ``"sum"`` or ``"none"`` (one value per anchor, pairs in order).
    """

    def __init__(
        self,
        temperature: float = CROSS_FINE_DEFAULTS["temperature"],
        num_positives: int | None = CROSS_FINE_DEFAULTS["num_positives"],
        num_hard_negatives: int | None = CROSS_FINE_DEFAULTS["num_hard_negatives"],
        num_negatives: int | None = CROSS_FINE_DEFAULTS["num_negatives"],
        num_hard_fov_negatives: int | None = CROSS_FINE_DEFAULTS["num_hard_fov_negatives"],
        num_fov_negatives: int | None = CROSS_FINE_DEFAULTS["num_fov_negatives"],
        ignore_radius: float = CROSS_FINE_DEFAULTS["ignore_radius"],
        min_overlap_voxels: int = CROSS_FINE_DEFAULTS["min_overlap_voxels"],
        direction: str = CROSS_FINE_DEFAULTS["direction"],
        spacing: float | Sequence[float] = CROSS_FINE_DEFAULTS["spacing"],
        reduction: LossReduction | str = LossReduction.MEAN,
    ) -> None:
        super().__init__(reduction=LossReduction(reduction).value)
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        for name, value in (
            ("num_positives", num_positives),
            ("num_hard_negatives", num_hard_negatives),
            ("num_negatives", num_negatives),
            ("num_hard_fov_negatives", num_hard_fov_negatives),
        ):
            if value is not None and int(value) < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value}")
        if num_fov_negatives is not None and int(num_fov_negatives) < 0:
            raise ValueError(f"num_fov_negatives must be >= 0 or None, got {num_fov_negatives}")
        if ignore_radius < 0:
            raise ValueError(f"ignore_radius must be >= 0, got {ignore_radius}")
        if int(min_overlap_voxels) < 1:
            raise ValueError(f"min_overlap_voxels must be >= 1, got {min_overlap_voxels}")
        if direction not in _DIRECTIONS:
            raise ValueError(f"direction must be one of {_DIRECTIONS}, got {direction!r}")
        self.temperature = float(temperature)
        self.num_positives = None if num_positives is None else int(num_positives)
        self.num_hard_negatives = None if num_hard_negatives is None else int(num_hard_negatives)
        self.num_negatives = None if num_negatives is None else int(num_negatives)
        self.num_hard_fov_negatives = None if num_hard_fov_negatives is None else int(num_hard_fov_negatives)
        self.num_fov_negatives = None if num_fov_negatives is None else int(num_fov_negatives)
        self.ignore_radius = float(ignore_radius)
        self.min_overlap_voxels = int(min_overlap_voxels)
        self.direction = direction
        self.spacing = spacing

    def forward(
        self,
        emb_a: torch.Tensor,
        emb_b: torch.Tensor,
        valid_b: torch.Tensor,
        fov_a: torch.Tensor | None = None,
        spacing: float | Sequence[float] | torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """
        Args:
            emb_a: ``(B, C, d, h, w)`` L2-normalised head embeddings of the large-FOV modality (e.g. CT).
            emb_b: ``(B, C, d, h, w)`` the same head's embeddings of the small-FOV modality registered onto the
                same grid (voxel ``p`` of both is the same physical point).
            valid_b: ``(B, 1, d, h, w)`` bool (or 0/1) on the embedding grid: where ``b`` has real data (the
                overlap). Input-resolution masks can be brought to a head grid with
                :func:`~samv2_components.losses.labels_to_grid`.
            fov_a: optional ``(B, 1, d, h, w)`` bool (or 0/1): where FOV negatives may come from (e.g. inside the
                large scan's body); FOV candidates are ``fov_a & ~valid_b`` (``~valid_b`` if None).
            spacing: grid spacing in mm: a number, 3 values (D, H, W) or ``(B, 3)``; default ``self.spacing``.
            generator: random source for anchor and negative draws (global RNG if None).

        Returns:
            The reduced loss; with ``"none"`` a ``(N,)`` tensor, one value per anchor (pairs in order). When no pair
            has enough overlap: a zero (``"mean"`` / ``"sum"``) or an empty tensor (``"none"``) still connected to
            both embeddings.
        """
        if emb_a.ndim != 5 or emb_b.ndim != 5:
            raise ValueError(f"embeddings must be (B, C, d, h, w), got {tuple(emb_a.shape)}, {tuple(emb_b.shape)}")
        if emb_a.shape != emb_b.shape:
            raise ValueError(
                f"emb_a and emb_b must have the same shape (same grid): {tuple(emb_a.shape)} vs {tuple(emb_b.shape)}"
            )
        batch = emb_a.shape[0]
        mask_shape = (batch, 1, *emb_a.shape[2:])
        if tuple(valid_b.shape) != mask_shape:
            raise ValueError(f"valid_b must be {mask_shape} (B, 1, d, h, w), got {tuple(valid_b.shape)}")
        if fov_a is not None and tuple(fov_a.shape) != mask_shape:
            raise ValueError(f"fov_a must be {mask_shape} (B, 1, d, h, w), got {tuple(fov_a.shape)}")
        device = emb_a.device

        def as_bool(mask: torch.Tensor) -> torch.Tensor:
            mask = mask.to(device)
            return mask if mask.dtype == torch.bool else mask > 0.5

        spacing_rows = _spacing_rows(self.spacing if spacing is None else spacing, batch, device)
        with torch.autocast(device_type=device.type, enabled=False):
            losses = self._per_anchor_losses(
                emb_a.float(),
                emb_b.float(),
                as_bool(valid_b),
                None if fov_a is None else as_bool(fov_a),
                spacing_rows,
                generator,
            )
        return reduce_losses(losses, self.reduction, emb_a, emb_b)

    def _per_anchor_losses(
        self,
        emb_a: torch.Tensor,
        emb_b: torch.Tensor,
        valid_b: torch.Tensor,
        fov_a: torch.Tensor | None,
        spacing: torch.Tensor,
        generator: torch.Generator | None,
    ) -> torch.Tensor | None:
        device = emb_a.device
        batch, channels = emb_a.shape[:2]
        grid = emb_a.shape[2:]
        axes = [torch.arange(int(n), dtype=torch.float32, device=device) for n in grid]
        index = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)  # (n, 3) grid voxels
        flat_a = emb_a.reshape(batch, channels, -1)
        flat_b = emb_b.reshape(batch, channels, -1)
        radius2 = self.ignore_radius**2
        use_ab = self.direction in ("both", "a_to_b")
        use_ba = self.direction in ("both", "b_to_a")
        use_fov = use_ba and (self.num_fov_negatives is None or self.num_fov_negatives > 0)

        out: list[torch.Tensor] = []
        for k in range(batch):
            overlap = valid_b[k].reshape(-1)
            overlap_idx = torch.nonzero(overlap).flatten()
            if overlap_idx.numel() < self.min_overlap_voxels:
                continue
            with torch.no_grad():
                anchors = overlap_idx
                if self.num_positives is not None and anchors.numel() > self.num_positives:
                    anchors = anchors[random_permutation(anchors.numel(), generator, device)[: self.num_positives]]
                pos_mm = index * spacing[k]  # (n, 3)

                def far_from_anchors(columns: torch.Tensor) -> torch.Tensor:
                    diff = pos_mm[columns][None, :, :] - pos_mm[anchors][:, None, :]
                    keep = (diff * diff).sum(dim=2) >= radius2
                    return keep & (columns[None, :] != anchors[:, None])  # the positive is never a negative

                keep_overlap = far_from_anchors(overlap_idx)  # (N, n_overlap)
                if use_fov:
                    fov = ~overlap if fov_a is None else (~overlap & fov_a[k].reshape(-1))
                    fov_idx = torch.nonzero(fov).flatten()
                    keep_fov = far_from_anchors(fov_idx)

            a_anchor = flat_a[k][:, anchors].t()  # (N, C)
            b_anchor = flat_b[k][:, anchors].t()
            s_pos = (a_anchor * b_anchor).sum(dim=1, keepdim=True)
            terms: list[torch.Tensor] = []
            if use_ab:
                neg = hard_then_random_negatives(
                    a_anchor, flat_b[k][:, overlap_idx].t(), keep_overlap, self.num_hard_negatives,
                    self.num_negatives, generator,
                )
                terms.append(self._infonce([s_pos, neg]))
            if use_ba:
                neg = hard_then_random_negatives(
                    b_anchor, flat_a[k][:, overlap_idx].t(), keep_overlap, self.num_hard_negatives,
                    self.num_negatives, generator,
                )
                parts = [s_pos, neg]
                if use_fov:
                    parts.append(
                        hard_then_random_negatives(
                            b_anchor, flat_a[k][:, fov_idx].t(), keep_fov, self.num_hard_fov_negatives,
                            self.num_fov_negatives, generator,
                        )
                    )
                terms.append(self._infonce(parts))
            out.append(terms[0] if len(terms) == 1 else 0.5 * (terms[0] + terms[1]))
        return torch.cat(out) if out else None

    def _infonce(self, parts: list[torch.Tensor]) -> torch.Tensor:
        logits = torch.cat(parts, dim=1) / self.temperature
        return torch.logsumexp(logits, dim=1) - logits[:, 0]


def cross_modal_fine_loss(**overrides: Any) -> CrossModalInfoNCELoss:
    """:class:`CrossModalInfoNCELoss` with :data:`CROSS_FINE_DEFAULTS` (= the constructor defaults), ``overrides``."""
    return CrossModalInfoNCELoss(**{**CROSS_FINE_DEFAULTS, **overrides})


def cross_modal_coarse_loss(**overrides: Any) -> CrossModalInfoNCELoss:
    """:class:`CrossModalInfoNCELoss` with :data:`CROSS_COARSE_DEFAULTS`, updated by ``overrides``."""
    return CrossModalInfoNCELoss(**{**CROSS_COARSE_DEFAULTS, **overrides})
