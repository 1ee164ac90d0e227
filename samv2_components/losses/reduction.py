"""Reduction shared by the SAMv2 losses, including the empty case (no anchor, no class)."""

from __future__ import annotations

import torch
from monai.utils import LossReduction


def reduce_losses(losses: torch.Tensor | None, reduction: str, *inputs: torch.Tensor) -> torch.Tensor:
    """Reduce per-item ``losses`` by ``reduction`` ("mean", "sum" or "none").

    ``None`` (nothing to learn from in this batch) gives a zero -- or an empty tensor for "none" -- that is still
    connected to ``inputs``, so that backward() and DistributedDataParallel's gradient hooks run as usual.
    """
    if losses is None:
        zero = sum(x.sum() for x in inputs) * 0.0
        return zero.reshape(1)[:0] if reduction == LossReduction.NONE.value else zero
    if reduction == LossReduction.MEAN.value:
        return losses.mean()
    if reduction == LossReduction.SUM.value:
        return losses.sum()
    return losses
