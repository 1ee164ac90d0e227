"""Semantic-SAM training iteration on MONAI's ``SupervisedTrainer`` (pytorch-ignite).

Each iteration is either an **appearance step** (the default): the two augmented patches of a
:class:`~samv2_components.transforms.patch_pairs.RandPatchPaird` pair go through the network together and the
voxel-wise InfoNCE loss (paper Eq. 1) is taken at the fine and the coarse level; or, with probability
``semantic_prob`` when labelled scans are configured, a **semantic step**: a batch of labelled crops from a second
loader and the prototypical supervised contrastive loss (paper Eq. 2) on the semantic head.
"""

from __future__ import annotations

import logging
import numbers
import os
import random
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from ignite.engine import Events
from monai.data.utils import set_rnd
from monai.engines import SupervisedTrainer
from monai.utils import MAX_SEED, set_determinism
from torch import nn

from samv2_components.errors import SAMv2InputError, parse_bool
from samv2_components.inference.embedder import bf16_supported
from samv2_components.io.image import plain_tensor
from samv2_components.networks import HEAD_GRIDS

__all__ = ["BatchesOnDemand", "HeadsModel", "SAMv2Trainer", "cpp_compiler_available", "isotropic_spacing"]

logger = logging.getLogger("samv2_components")


def cpp_compiler_available() -> bool:
    """Whether a C++ compiler is on the ``PATH`` (``$CXX``, ``g++``, ``c++`` or ``clang++``): ``torch.compile``'s
    inductor builds its kernels with one, on the CPU and (for its launchers) on the GPU."""
    return any(shutil.which(name) for name in (os.environ.get("CXX"), "g++", "c++", "clang++") if name)


def isotropic_spacing(spacing: float | Sequence[float], name: str = "spacing_mm") -> float:
    """The one voxel size (mm) of an isotropic ``spacing``: a number, or a sequence of three equal numbers.

    Training measures distances in the patches with a single voxel size (the losses' mm radii), so a
    non-isotropic spacing is refused rather than silently reduced to its first value.

    Raises:
        SAMv2InputError (a ValueError) naming ``name``: not a positive number or three equal positive numbers.
    """
    values = [spacing] if isinstance(spacing, numbers.Real) else spacing
    try:
        values = [] if isinstance(values, str) else [float(v) for v in values]
    except (TypeError, ValueError):
        values = []
    if len(values) not in (1, 3) or not all(v > 0 for v in values):
        raise SAMv2InputError(name, f"must be a positive voxel size in mm or three equal ones, got {spacing!r}")
    if max(values) - min(values) > 1e-6 * max(values):
        raise SAMv2InputError(
            name,
            f"must be isotropic for training (three equal voxel sizes), got {spacing!r}: the training losses use "
            "one voxel size in mm",
        )
    return values[0]


class HeadsModel(nn.Module):
    """Wrap :class:`~samv2_components.networks.SAMv2Net` so that ``forward`` returns the per-head dict.

    Training needs every head on its own grid, and DistributedDataParallel only synchronises gradients of calls
    that go through ``forward``. ``net`` (the bundle's ``network_def``) keeps the plain state-dict keys.

    ``channels_last``: run the network in the ``channels_last_3d`` memory format (parameters converted once here,
    inputs on every call); with bf16 autocast on the CPU it cut the forward pass of a training batch from 1.2 s to
    0.5 s (width 0.25, 4 x 32x96x96, one thread). The head outputs stay channels_last: the appearance and semantic
    losses read them as one row per voxel (:func:`~samv2_components.losses.voxel_rows`, a view of that layout),
    so neither the forward pass nor the gradient is copied into another layout.

    A MetaTensor input is run as its plain tensor (same storage, no copy): every operation on a MetaTensor goes
    through its ``__torch_function__``, and the network's in-place ReLUs and residual additions on MetaTensor views
    recorded a ``CopySlices`` node each, whose backward copies the whole activation (measured on the bundle's
    training run: a ninth of the step's time, the same values and gradients).

    ``compile``: run the forward pass through ``torch.compile`` (inductor, static shapes: one graph per input shape
    and head set, each compiled on first use: minutes on a CPU with an empty inductor cache). The network's forward
    and backward then take 13-20 % less time on 2 CPU cores (batch norms, ReLUs and residual sums fused around the
    convolutions); worth it for long runs only.
    Without a C++ compiler (which inductor needs) it warns and runs eagerly.
    """

    def __init__(self, net: nn.Module, channels_last: bool = True, compile: bool = False):
        super().__init__()
        self.channels_last = bool(channels_last)
        self.net = net.to(memory_format=torch.channels_last_3d) if self.channels_last else net
        compile = parse_bool(compile, "compile")  # "--compile false" arrives as a string
        self.compiled = compile and cpp_compiler_available()
        if compile and not self.compiled:
            logger.warning("compile=True but no C++ compiler is on the PATH (torch.compile needs one): running eagerly")
        if self.compiled:
            # the module, its parameters and state-dict keys stay the same; only __call__ goes through the compiled graph
            self.compile(dynamic=False)

    def forward(self, x: torch.Tensor, heads: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """``{head: embedding}`` of ``x`` for ``heads`` (all heads if None)."""
        wanted = None if heads is None else list(heads)
        x = plain_tensor(x)
        if not self.channels_last:
            return self.net.forward_heads(x, wanted)
        return self.net.forward_heads(x.contiguous(memory_format=torch.channels_last_3d), wanted)


class BatchesOnDemand:
    """``loader``'s batches, each made only when the iteration calls the item it was handed.

    Ignite fetches a batch before every iteration, but only appearance steps use the pair loader's batch: a
    semantic step (40 % of SAMv2's steps) or a cross-modal one (half of CrossSAM's) would throw away a pair
    sampled and augmented for nothing (about 0.09 s per batch of two pairs on 2 CPU cores). Each pass yields
    ``len(loader)`` items, all the same function ``fetch()`` that returns the loader's next batch; the loader's
    iterator is made at the pass's first call, so an epoch's draws still start after the trainer's per-epoch
    re-seeding and a pass never asks for more batches than the loader has.
    """

    def __init__(self, loader: Iterable):
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Callable[[], Any]]:
        batches: Iterator | None = None

        def fetch() -> Any:
            nonlocal batches
            if batches is None:
                batches = iter(self.loader)
            return next(batches)

        for _ in range(len(self.loader)):
            yield fetch


def _cycle(loader: Iterable) -> Iterator:
    """Repeat ``loader`` forever; a ``DistributedSampler`` gets a new epoch (a new shuffle) on every pass."""
    epoch = 0
    while True:
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


class SAMv2Trainer(SupervisedTrainer):
    """``SupervisedTrainer`` whose iteration is a SAMv2 appearance step or, at random, a semantic step.

    Args:
        network: a :class:`HeadsModel` (possibly wrapped in DistributedDataParallel).
        fine_loss, coarse_loss: :class:`~samv2_components.losses.VoxelInfoNCELoss` instances.
        coarse_weight: weight of the coarse InfoNCE term.
        semantic_loss: :class:`~samv2_components.losses.PrototypeContrastiveLoss`, or None.
        semantic_loader: loader of labelled crops (``image`` (B,1,D,H,W), ``label`` (B,1,D,H,W)), or None.
        semantic_prob: probability of a semantic step when ``semantic_loader`` is given (0.4 in the reference).
        bf16: autocast the forward pass in bf16 (``"auto"``: where the device supports it).
        volume_spacing: voxel size (mm) of the preprocessed scans the pairs are cut from (a number, or three
            equal ones: the bundles pass their ``spacing_mm``; a non-isotropic one raises
            :class:`~samv2_components.errors.SAMv2InputError` naming ``spacing_mm``); with the pair affines
            (patch voxel -> volume voxel, ``affine_a`` / ``affine_b``) it gives each patch's own voxel size, which
            the losses' mm radii need.
        seed: seed of the step-type draw (the same on every DDP rank, so that all ranks take the same step type).
        data_seed: when given, every random draw of an epoch (the sampler, the augmentations' own random states,
            PyTorch/NumPy/Python global generators, the step types) is re-seeded at the epoch's start from
            ``data_seed`` and the epoch number alone, so a run interrupted and resumed from an epoch checkpoint
            ends with the same weights as the uninterrupted run (single process, ``num_workers`` 0; a DDP run
            passes a per-rank seed and resumes statistically). None: seeded once, at the start.
        pair_keys: keys of the two patches, the correspondence field and its validity mask in a pair batch.
        Other arguments as :class:`monai.engines.SupervisedTrainer` (``loss_function`` is ``fine_loss``).

    A sized ``train_data_loader`` (the pair loader, kept as ``pair_loader``) is handed to ignite through
    :class:`BatchesOnDemand`: ``engine.state.batch`` is then a function that makes the batch, called by appearance
    steps only.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable,
        network: nn.Module,
        optimizer: torch.optim.Optimizer,
        fine_loss: Callable,
        coarse_loss: Callable,
        coarse_weight: float = 1.0,
        semantic_loss: Callable | None = None,
        semantic_loader: Iterable | None = None,
        semantic_prob: float = 0.4,
        bf16: bool | str = "auto",
        volume_spacing: float | Sequence[float] = 2.0,
        seed: int = 0,
        data_seed: int | None = None,
        pair_keys: Sequence[str] = ("image_a", "image_b", "corr_ab", "valid_ab"),
        epoch_length: int | None = None,
        train_handlers: Sequence | None = None,
        **kwargs: Any,
    ):
        volume_spacing = isotropic_spacing(volume_spacing)  # before the (slower) engine set-up
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            train_data_loader=train_data_loader,
            network=network,
            optimizer=optimizer,
            loss_function=fine_loss,
            epoch_length=epoch_length,
            train_handlers=train_handlers,
            **kwargs,
        )
        if (semantic_loss is None) != (semantic_loader is None):
            raise ValueError("semantic_loss and semantic_loader must be given together")
        self.fine_loss, self.coarse_loss, self.coarse_weight = fine_loss, coarse_loss, coarse_weight
        self.semantic_loss, self.semantic_loader, self.semantic_prob = semantic_loss, semantic_loader, semantic_prob
        self._semantic_batches: Iterator | None = None
        self.bf16 = bf16
        self.volume_spacing = volume_spacing
        self.pair_keys = tuple(pair_keys)
        self.seed, self.data_seed = seed, data_seed
        self._step_rng = random.Random(seed)
        if data_seed is not None:
            self.add_event_handler(Events.EPOCH_STARTED, self._reseed_epoch)
        self.pair_loader = self.data_loader
        if hasattr(self.pair_loader, "__len__"):  # ignite hands each iteration a fetch() (see BatchesOnDemand)
            self.data_loader = BatchesOnDemand(self.pair_loader)

    def _reseed_epoch(self, engine) -> None:
        """Make this epoch's draws a function of ``data_seed`` and the epoch number (see ``data_seed``)."""
        epoch_seed = (self.data_seed * 100_003 + engine.state.epoch) % MAX_SEED
        set_determinism(seed=epoch_seed)
        set_rnd(self.pair_loader.dataset, seed=epoch_seed)  # the transforms' own RandomState objects
        if self.semantic_loader is not None:
            set_rnd(self.semantic_loader.dataset, seed=epoch_seed + 1)
            self._semantic_batches = None  # a fresh pass over the labelled crops, drawn from this epoch's seed
        self._step_rng = random.Random(self.seed * 100_003 + engine.state.epoch)

    def _autocast(self, device: torch.device):
        use = bf16_supported(device) if self.bf16 == "auto" else bool(self.bf16)
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16) if use else nullcontext()

    def _appearance_losses(self, engine, batch: dict) -> dict[str, torch.Tensor]:
        device = engine.state.device
        key_a, key_b, key_corr, key_valid = self.pair_keys
        # plain tensors: the collated batch holds MetaTensors, whose per-operation dispatch the losses do not need
        a, b = plain_tensor(batch[key_a]).to(device), plain_tensor(batch[key_b]).to(device)
        corr, valid = plain_tensor(batch[key_corr]).to(device), plain_tensor(batch[key_valid]).to(device)
        with self._autocast(device):
            # one pass: both views share batch-norm statistics; the semantic head is not needed here
            heads = engine.network(torch.cat([a, b]), heads=("fine", "coarse"))
        n = a.shape[0]
        spacing = {}
        for view in ("a", "b"):  # column norms of patch->volume matrices = per-axis scale of each patch
            affine = batch.get(f"affine_{view}")
            spacing[view] = None if affine is None else self.volume_spacing * affine[:, :3, :3].float().norm(dim=1).to(device)
        losses = {}
        for level, loss_fn in (("fine", self.fine_loss), ("coarse", self.coarse_loss)):
            stride, offset = HEAD_GRIDS[level]
            # split, not two slices: the gradient is then one concatenation, not two zero-filled copies of the batch
            emb_a, emb_b = heads[level].float().split(n)
            losses[level] = loss_fn(emb_a, emb_b, corr, valid, stride, offset, spacing["a"], spacing["b"])
        fine, coarse = losses["fine"], losses["coarse"]
        return {"loss": fine + self.coarse_weight * coarse, "fine": fine, "coarse": coarse}

    def _semantic_losses(self, engine) -> dict[str, torch.Tensor]:
        from samv2_components.losses import labels_to_grid

        if self._semantic_batches is None:
            self._semantic_batches = _cycle(self.semantic_loader)
        batch = next(self._semantic_batches)
        device = engine.state.device
        image, label = plain_tensor(batch["image"]).to(device), plain_tensor(batch["label"]).to(device)
        with self._autocast(device):
            emb = engine.network(image, heads=("semantic",))["semantic"].float()
        stride, offset = HEAD_GRIDS["semantic"]
        semantic = self.semantic_loss(emb, labels_to_grid(label, stride, offset, emb.shape[2:]))
        return {"loss": semantic, "semantic": semantic}

    def _step_losses(self, engine, batchdata: dict) -> tuple[str, dict[str, torch.Tensor]]:
        """Draw this iteration's step type and compute its losses: ``(step_type, {"loss": total, term: value})``.

        Subclasses add step types here (e.g. :class:`~samv2_components.engines.crosssam.CrossSAMTrainer`)."""
        if self.semantic_loader is not None and self._step_rng.random() < self.semantic_prob:
            return "semantic", self._semantic_losses(engine)
        return "appearance", self._appearance_losses(engine, batchdata() if callable(batchdata) else batchdata)

    def _iteration(self, engine, batchdata: dict) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=True)
        step_type, losses = self._step_losses(engine, batchdata)
        losses["loss"].backward()
        engine.optimizer.step()
        output: dict[str, Any] = {k: v.detach() for k, v in losses.items()}  # "loss" is Keys.LOSS
        output["step_type"] = step_type
        engine.state.output = output
        return output
