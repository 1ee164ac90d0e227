"""CrossSAM training iteration (SAMv2 paper Sec. III-C, step (3)): cross-modal InfoNCE on registered CT-MR pairs,
mixed with the intra-modality self-supervised steps of :class:`~samv2_components.engines.trainer.SAMv2Trainer`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from monai.data.utils import set_rnd
from monai.utils import MAX_SEED

from samv2_components.engines.trainer import SAMv2Trainer, _cycle
from samv2_components.io.image import plain_tensor
from samv2_components.networks import HEAD_GRIDS

__all__ = ["CrossSAMTrainer"]


class CrossSAMTrainer(SAMv2Trainer):
    """:class:`SAMv2Trainer` whose iteration is, with probability ``cross_prob``, a **cross-modal step**, and
    otherwise the usual intra-modality step (appearance, or semantic with ``semantic_prob`` when configured).

    Cross-modal step: a batch from ``cross_loader`` (patches of registered pairs cut at the same place, e.g. by
    :class:`~samv2_components.transforms.RandRegisteredPatchd`: ``image_a`` the large-FOV modality, ``image_b`` the
    small-FOV one on the same grid, ``valid_b`` where ``b`` has data, optionally ``body_a``) goes through the
    network together (one pass: shared batch-norm statistics, as the appearance step); for the fine and the coarse
    head, ``valid_b`` (and ``body_a``, the region FOV negatives come from) is brought to the head's grid with
    :func:`~samv2_components.losses.labels_to_grid` (the input voxel at each head voxel's centre, ``HEAD_GRIDS``),
    and :class:`~samv2_components.losses.CrossModalInfoNCELoss` (paper Eq. 8) is taken with the grid spacing in mm:
    ``volume_spacing`` x the patch's scale (from ``patch_affine``, patch voxel -> volume voxel) x the head stride.
    Total: ``cross_fine + cross_coarse_weight * cross_coarse``. The output logs ``loss``, ``cross_fine``,
    ``cross_coarse`` and ``step_type == "cross"`` (appearance steps log ``fine`` / ``coarse`` as before).

    Args:
        cross_loader: loader of registered-pair patches (cycled forever); None: no cross-modal step.
        cross_fine_loss, cross_coarse_loss: e.g. :func:`~samv2_components.losses.cross_modal_fine_loss` and
            :func:`~samv2_components.losses.cross_modal_coarse_loss`.
        cross_prob: probability of a cross-modal step (drawn first, from the trainer's step generator).
        cross_coarse_weight: weight of the coarse cross-modal term (default: ``coarse_weight``).
        cross_keys: keys of the large-FOV patch, the small-FOV patch, the overlap mask and the optional body mask.
        cross_affine_key: key of the patch -> volume voxel matrices (absent: the patch has the volume's spacing).
        Everything else as :class:`SAMv2Trainer` (``train_data_loader`` yields the intra-modality pairs).
    """

    def __init__(
        self,
        *args: Any,
        cross_loader: Iterable | None = None,
        cross_fine_loss: Callable | None = None,
        cross_coarse_loss: Callable | None = None,
        cross_prob: float = 0.5,
        cross_coarse_weight: float | None = None,
        cross_keys: Sequence[str] = ("image_a", "image_b", "valid_b", "body_a"),
        cross_affine_key: str = "patch_affine",
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        if cross_loader is not None and (cross_fine_loss is None or cross_coarse_loss is None):
            raise ValueError("cross_loader needs cross_fine_loss and cross_coarse_loss")
        if not 0.0 <= float(cross_prob) <= 1.0:
            raise ValueError(f"cross_prob must be in [0, 1], got {cross_prob!r}")
        if len(cross_keys) != 4:
            raise ValueError(f"cross_keys must name (image_a, image_b, valid_b, body_a), got {cross_keys!r}")
        self.cross_loader, self.cross_prob = cross_loader, float(cross_prob)
        self.cross_fine_loss, self.cross_coarse_loss = cross_fine_loss, cross_coarse_loss
        self.cross_coarse_weight = self.coarse_weight if cross_coarse_weight is None else float(cross_coarse_weight)
        self.cross_keys, self.cross_affine_key = tuple(cross_keys), cross_affine_key
        self._cross_batches: Iterator | None = None

    def _reseed_epoch(self, engine) -> None:
        super()._reseed_epoch(engine)
        if self.cross_loader is not None:
            set_rnd(self.cross_loader.dataset, seed=(self.data_seed * 100_003 + engine.state.epoch + 2) % MAX_SEED)
            self._cross_batches = None

    def _cross_losses(self, engine) -> dict[str, torch.Tensor]:
        from samv2_components.losses import labels_to_grid

        if self._cross_batches is None:
            self._cross_batches = _cycle(self.cross_loader)
        batch = next(self._cross_batches)
        device = engine.state.device
        key_a, key_b, key_valid, key_body = self.cross_keys
        a, b = plain_tensor(batch[key_a]).to(device), plain_tensor(batch[key_b]).to(device)  # as SAMv2Trainer
        valid = plain_tensor(batch[key_valid]).to(device)
        body = plain_tensor(batch[key_body]).to(device) if key_body in batch else None
        with self._autocast(device):
            heads = engine.network(torch.cat([a, b]), heads=("fine", "coarse"))
        n = a.shape[0]
        affine = batch.get(self.cross_affine_key)
        if affine is None:
            patch_mm = torch.full((n, 3), float(self.volume_spacing), device=device)
        else:
            patch_mm = self.volume_spacing * affine[:, :3, :3].float().norm(dim=1).to(device)
        losses = {}
        for level, loss_fn in (("fine", self.cross_fine_loss), ("coarse", self.cross_coarse_loss)):
            stride, offset = HEAD_GRIDS[level]
            emb = heads[level].float()
            grid = emb.shape[2:]
            valid_grid = labels_to_grid(valid, stride, offset, grid)
            fov_grid = None if body is None else labels_to_grid(body, stride, offset, grid)
            spacing = patch_mm * torch.tensor(stride, dtype=patch_mm.dtype, device=device)
            emb_a, emb_b = emb.split(n)  # (one concatenation in the backward pass, see SAMv2Trainer)
            losses[level] = loss_fn(emb_a, emb_b, valid_grid, fov_grid, spacing)
        fine, coarse = losses["fine"], losses["coarse"]
        return {"loss": fine + self.cross_coarse_weight * coarse, "cross_fine": fine, "cross_coarse": coarse}

    def _step_losses(self, engine, batchdata: dict) -> tuple[str, dict[str, torch.Tensor]]:
        if self.cross_loader is not None and self._step_rng.random() < self.cross_prob:
            return "cross", self._cross_losses(engine)
        return super()._step_losses(engine, batchdata)
