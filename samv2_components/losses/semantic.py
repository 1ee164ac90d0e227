"""Supervised semantic loss of SAMv2: prototypical contrastive loss over organ label maps (paper Eq. 2).

For every class ``p`` present, the prototype ``c_p`` is the (normalised) mean embedding of the class's voxels;
each voxel of the class should pick its own prototype out among *all* voxels:

.. math::

    \\mathcal{L}_p = -\\frac{1}{|P|} \\sum_{x \\in P} \\log
        \\frac{\\exp(c_p \\cdot x / \\tau_s)}{\\sum_{x'} \\exp(c_p \\cdot x' / \\tau_s)},
    \\qquad \\mathcal{L} = \\frac{1}{K} \\sum_p \\mathcal{L}_p

Cost is O(n K) for n voxels and K classes: no n x n similarity matrix is ever built. Upstream:
``SupConMeanLoss`` (``temperature=0.1``, ``base_temperature=1.0``) with prototypes from
``Sam_uniform_cross_volume_dual_head_mean_vector.get_mean_vector``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.utils import LossReduction

from samv2_components.io.image import plain_tensor
from samv2_components.losses.appearance import voxel_rows
from samv2_components.losses.reduction import reduce_losses
from torch.nn.modules.loss import _Loss

__all__ = ["PrototypeContrastiveLoss", "labels_to_grid"]


def labels_to_grid(
    labels: torch.Tensor,
    stride: Sequence[int],
    offset: Sequence[float],
    grid_shape: Sequence[int] | None = None,
) -> torch.Tensor:
    """Label map on a head grid: for each head voxel, the input label at its centre.

    Head voxel ``i`` is centred on input voxel ``stride * i + offset`` (``HEAD_GRIDS``). A fractional centre
    (offset 0.5 along depth) lies on the border of two input voxels; the lower one is taken, which is what the
    upstream ``F.interpolate(mode="nearest")`` picks. Indices past the end are clamped to the last voxel.

    Args:
        labels: ``(B, 1, D, H, W)`` integer labels on the input grid.
        stride: head stride in input voxels (D, H, W).
        offset: head offset in input voxels (D, H, W).
        grid_shape: head grid ``(d, h, w)``; default ``(D, H, W) // stride`` (the network's grid).

    Returns:
        ``(B, 1, d, h, w)`` labels, same dtype.
    """
    if labels.ndim != 5:
        raise ValueError(f"labels must be (B, 1, D, H, W), got {tuple(labels.shape)}")
    size = labels.shape[2:]
    if grid_shape is None:
        grid_shape = [int(s) // int(st) for s, st in zip(size, stride)]
    out = labels
    for axis in range(3):
        centres = torch.arange(int(grid_shape[axis]), dtype=torch.float64) * float(stride[axis]) + float(offset[axis])
        index = centres.floor().long().clamp(0, size[axis] - 1).to(labels.device)
        out = out.index_select(2 + axis, index)
    return out


class PrototypeContrastiveLoss(_Loss):
    """Prototypical supervised contrastive loss (SAMv2 paper Eq. 2) for the semantic head.

    * Voxels labelled ``ignore_label`` take no part at all (not in prototypes, not in any denominator).
    * Every other voxel, background included, is in the softmax denominator of every class.
    * Classes: the labels present among the non-ignored voxels; ``background_label`` is a class only when
      ``include_background=True`` (upstream: only labels > 0 get prototypes).
    * ``per_sample=False`` (upstream): prototypes are computed over the whole batch and the softmax runs over
      every voxel of the batch, so a class is pulled together *across* scans (upstream pairs two labelled
      volumes of different patients). ``per_sample=True``: each sample on its own; the loss averages all
      (sample, class) terms.
    * Gradients flow through the prototypes too (as upstream).

    Deviation: prototypes are re-normalised (``normalize_prototypes=True``), so ``c_p . x`` is a cosine and
    ``temperature`` has the same meaning for compact and diffuse classes; upstream uses the raw mean
    (``normalize_prototypes=False`` reproduces it). Temperature: 0.1 in the upstream code, 0.5 in the paper.

    Args:
        temperature: tau_s.
        background_label: label value of the background.
        include_background: whether the background is a class with its own prototype and loss term.
        ignore_label: label value of voxels to leave out (e.g. outside the scan or unlabelled); None: none.
        normalize_prototypes: L2-normalise each prototype.
        per_sample: prototypes and softmax per sample instead of over the batch.
        reduction: ``"mean"`` over classes, ``"sum"``, or ``"none"`` (one value per class, sorted by label;
            per sample then per class with ``per_sample=True``).
    """

    def __init__(
        self,
        temperature: float = 0.1,
        background_label: int = 0,
        include_background: bool = False,
        ignore_label: int | None = -1,
        normalize_prototypes: bool = True,
        per_sample: bool = False,
        reduction: LossReduction | str = LossReduction.MEAN,
    ) -> None:
        super().__init__(reduction=LossReduction(reduction).value)
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = float(temperature)
        self.background_label = int(background_label)
        self.include_background = bool(include_background)
        self.ignore_label = None if ignore_label is None else int(ignore_label)
        self.normalize_prototypes = bool(normalize_prototypes)
        self.per_sample = bool(per_sample)

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """
        Args:
            emb: ``(B, C, d, h, w)`` L2-normalised embeddings (the semantic head).
            labels: ``(B, 1, d, h, w)`` integer labels on the same grid (see :func:`labels_to_grid`).

        Returns:
            The reduced loss, or ``(K,)`` per-class values with reduction ``"none"``. When no class is present
            (e.g. only background), a zero (or an empty tensor) still connected to ``emb`` (``grad_fn`` set, zero
            gradient), so DDP does not hang.
        """
        # plain tensors: per-sample views of a batched MetaTensor would try to split its metadata
        emb, labels = plain_tensor(emb), plain_tensor(labels)
        if emb.ndim != 5:
            raise ValueError(f"emb must be (B, C, d, h, w), got {tuple(emb.shape)}")
        if labels.shape != (emb.shape[0], 1, *emb.shape[2:]):
            expected = (emb.shape[0], 1, *emb.shape[2:])
            raise ValueError(f"labels must be (B, 1, d, h, w) = {expected}, got {tuple(labels.shape)}")
        if labels.is_floating_point():
            labels = labels.round()
        labels = labels.to(device=emb.device, dtype=torch.long)
        with torch.autocast(device_type=emb.device.type, enabled=False):
            rows = voxel_rows(emb.float())  # (B, n, C), a view of a channels_last map
            flat_labels = labels.flatten(1)  # (B, n)
            if self.per_sample:
                pairs = zip(rows.unbind(0), flat_labels.unbind(0))
                parts = [self._class_losses(sample_rows, sample_labels) for sample_rows, sample_labels in pairs]
                parts = [p for p in parts if p is not None]
                losses = torch.cat(parts) if parts else None
            else:
                losses = self._class_losses(rows.reshape(-1, rows.shape[2]), flat_labels.reshape(-1))
        return reduce_losses(losses, self.reduction, emb)

    def _class_losses(self, rows: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
        """Per-class losses ``(K,)`` for voxel embeddings ``rows`` ``(n, C)`` and their ``labels`` ``(n,)``, or None
        if K == 0.

        O(n K) and no ``(n, K)`` membership matrix: class sums by ``index_add``, and a class's mean logit
        ``mean_x c_p . x / tau`` is ``c_p . mean_p / tau`` (the same value and gradient as averaging the logits)."""
        if self.ignore_label is not None:
            keep = labels != self.ignore_label
            if not bool(keep.all()):  # ignored voxels take no part at all
                rows, labels = rows[keep], labels[keep]
        classes = torch.unique(labels)
        if not self.include_background:
            classes = classes[classes != self.background_label]
        n_classes = classes.numel()
        if n_classes == 0:
            return None
        # each voxel's class index; n_classes for a voxel of no class (the background when it is not a class)
        slot = torch.searchsorted(classes, labels).clamp_max(n_classes - 1)
        slot = torch.where(classes[slot] == labels, slot, n_classes)
        sums = rows.new_zeros(n_classes + 1, rows.shape[1]).index_add(0, slot, rows)[:n_classes]
        counts = torch.bincount(slot, minlength=n_classes + 1)[:n_classes].to(rows.dtype)
        means = sums / counts.unsqueeze(1)  # (K, C)
        prototypes = F.normalize(means, dim=1) if self.normalize_prototypes else means
        logits = rows @ prototypes.t() / self.temperature  # (n, K)
        denominator = torch.logsumexp(logits, dim=0)
        positive = (prototypes * means).sum(dim=1) / self.temperature
        return denominator - positive
