"""Embedding a preprocessed scan with :class:`~samv2_components.networks.SAMv2Net`: precision, memory layout,
tiling for bounded memory, and the affine of every output grid.
"""

from __future__ import annotations

import itertools
import logging
import math
import weakref
from collections.abc import Sequence
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.inferers import Inferer

from samv2_components.allocator import return_freed_heap_memory
from samv2_components.errors import parse_bool
from samv2_components.geometry import strided_grid_affine
from samv2_components.networks import HEAD_GRIDS, INPUT_DIVISOR, SAMv2Net, fuse_conv_norm

__all__ = ["SAMv2Inferer", "bf16_supported"]

logger = logging.getLogger("samv2_components")

#: output dtypes the inferer can return (``output_dtype``)
OUTPUT_DTYPES = {"float32": torch.float32, "float16": torch.float16}
#: values normalised at once by :meth:`SAMv2Inferer._finish` (4 MB in float32: the block stays in cache)
_FINISH_BLOCK = 1 << 20


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 autocast is fast on ``device`` (CUDA with bf16, or a CPU with AVX-512 BF16/AMX)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


class SAMv2Inferer(Inferer):
    """Run :meth:`SAMv2Net.forward_heads` on a whole volume or in overlapping tiles, returning each head as a
    ``MetaTensor`` with the affine of its own grid.

    Args:
        bf16: ``"auto"`` uses bf16 autocast where the device supports it, ``True`` forces it, ``False`` is fp32.
            Outputs are always normalised to unit length in float32, whatever the network computed in.
        output_dtype: ``"float16"`` (default) or ``"float32"``: the dtype of the returned maps. float16 halves the memory of
            the maps (and of cache entries) at a cosine to the float32 map above 0.9999 per voxel.
        channels_last: use ``torch.channels_last_3d`` (faster convolutions on CPU with oneDNN).
        max_tile_voxels: largest input tile (including its halo) embedded in one pass; bounds peak memory.
            ``None`` never tiles.
        halo: input voxels (D, H, W) added on each side of a tile and discarded afterwards; multiples of
            :data:`INPUT_DIVISOR`. Larger halos bring tiled results closer to the whole-volume pass.
        pad_value: value used to pad an input that is not a multiple of :data:`INPUT_DIVISOR`
            (-50 is air after CT normalisation and the minimum after MR normalisation).

    Call: ``inferer(image, network)`` with ``image`` ``(B, 1, D, H, W)``; if it is a ``MetaTensor`` the outputs
    carry affines (same space as the input's) computed from :data:`HEAD_GRIDS`.
    Returns ``{head: (B, embedding_dim, d, h, w)}`` with ``d = ceil(D / stride_D)`` etc.
    """

    def __init__(
        self,
        bf16: bool | str = "auto",
        channels_last: bool = True,
        max_tile_voxels: int | None = 12_000_000,
        halo: Sequence[int] = (16, 64, 64),
        pad_value: float = -50.0,
        output_dtype: str = "float16",
    ):
        super().__init__()
        if output_dtype not in OUTPUT_DTYPES:
            raise ValueError(f"output_dtype must be one of {sorted(OUTPUT_DTYPES)}, got {output_dtype!r}")
        self.output_dtype = OUTPUT_DTYPES[output_dtype]
        if not (isinstance(bf16, str) and bf16.strip().lower() == "auto"):
            bf16 = parse_bool(bf16, "inferer#bf16 (true, false or auto)")
        else:
            bf16 = "auto"
        if any(h % d for h, d in zip(halo, INPUT_DIVISOR)):
            raise ValueError(f"halo {tuple(halo)} must be a multiple of {INPUT_DIVISOR}")
        self.bf16 = bf16
        self.channels_last = channels_last
        self.max_tile_voxels = max_tile_voxels
        self.halo = tuple(int(h) for h in halo)
        self.pad_value = pad_value
        #: (the caller's network (weak reference), its weights' addresses and versions, channels_last, the prepared
        #: copy): see :meth:`_inference_network`
        self._prepared: tuple | None = None

    def __getstate__(self) -> dict:
        # the prepared copy (and its weak reference, which cannot be pickled) is not part of the inferer's settings
        state = dict(self.__dict__)
        state["_prepared"] = None
        return state

    # ------------------------------------------------------------------ public
    def __call__(self, inputs: torch.Tensor, network: SAMv2Net, *args, **kwargs) -> dict[str, torch.Tensor]:
        if inputs.ndim != 5 or inputs.shape[1] != 1:
            raise ValueError(f"expected input (B, 1, D, H, W), got {tuple(inputs.shape)}")
        size = tuple(inputs.shape[2:])
        padded = self._pad(inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs)
        with torch.no_grad():
            heads = self._embed(padded, network)
        if padded.device.type == "cpu":
            return_freed_heap_memory()
        out: dict[str, torch.Tensor] = {}
        for name, emb in heads.items():
            stride, offset = HEAD_GRIDS[name]
            crop = [math.ceil(s / st) for s, st in zip(size, stride)]
            # a view, no copy: on the CPU the maps stay channels-last (each voxel's vector contiguous)
            emb = emb[:, :, : crop[0], : crop[1], : crop[2]]
            if isinstance(inputs, MetaTensor):
                emb = self._with_grid_meta(emb, inputs, stride, offset)
            out[name] = emb
        return out

    def tile_starts(self, size: Sequence[int]) -> list[tuple[tuple[int, int], ...]]:
        """Core regions ``((d0, d1), (h0, h1), (w0, w1))`` covering a (padded) input of ``size``.

        Among all splits into ``n_d x n_h x n_w`` equal cores (multiples of :data:`INPUT_DIVISOR`), take the one
        with the fewest tiles whose tile-with-halo fits ``max_tile_voxels``, then the least total work.
        If none fits, the smallest possible tile is used with a warning.
        """
        if self.max_tile_voxels is None:
            return [tuple((0, n) for n in size)]
        options = []
        splits = [range(1, min(max(1, n // d), 32) + 1) for n, d in zip(size, INPUT_DIVISOR)]
        for counts in itertools.product(*splits):
            core = [math.ceil(n / k / d) * d for n, k, d in zip(size, counts, INPUT_DIVISOR)]
            n_tiles = math.prod(math.ceil(n / c) for n, c in zip(size, core))
            tile = math.prod(min(c + 2 * h, n) for c, h, n in zip(core, self.halo, size))
            options.append((tile > self.max_tile_voxels, n_tiles if tile <= self.max_tile_voxels else tile, n_tiles * tile, core))
        too_big, _, _, core = min(options)
        if too_big:
            logger.warning("no tile with halo %s fits max_tile_voxels=%s; using cores of %s", self.halo, self.max_tile_voxels, core)
        ranges = [[(s, min(s + c, n)) for s in range(0, n, c)] for c, n in zip(core, size)]
        return list(itertools.product(*ranges))

    # ------------------------------------------------------------------ internals
    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        pad = [(-s) % d for s, d in zip(x.shape[2:], INPUT_DIVISOR)]
        if not any(pad):
            return x
        return F.pad(x, (0, pad[2], 0, pad[1], 0, pad[0]), value=self.pad_value)

    def _autocast(self, device: torch.device):
        use = bf16_supported(device) if self.bf16 == "auto" else bool(self.bf16)
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16) if use else nullcontext()

    def _forward(self, x: torch.Tensor, network: SAMv2Net) -> dict[str, torch.Tensor]:
        """Unnormalised head outputs (bf16 under autocast) of one input block."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        with self._autocast(x.device):
            return network.forward_heads(x, normalize=False)

    def _finish(self, emb: torch.Tensor, consume: bool = False) -> torch.Tensor:
        """Unit vectors in :attr:`output_dtype` (same memory layout), normalised in float32 a few depth slices at
        a time: one pass over each map that stays in cache, instead of the several whole-map float32 temporaries
        of a plain normalisation (they were a quarter of the light model's time, and its peak memory).

        ``consume``: the caller gives ``emb`` up; when its element size is the output's (bf16 heads, float16
        output) the result is written over it, block by block (each block is read into the float32 buffer before
        it is overwritten): the unnormalised and the normalised maps are then never held at once (0.6 GB for a
        large CT with the light model)."""
        if consume and emb.dtype.itemsize == self.output_dtype.itemsize:
            out = emb.view(self.output_dtype)
        else:
            out = torch.empty_like(emb, dtype=self.output_dtype)
        # (B, D, H, W, C) views: channels-last maps (the CPU default) are then contiguous, each vector in a row
        source, target = emb.movedim(1, -1), out.movedim(1, -1)
        step = max(1, _FINISH_BLOCK // max(1, source[:, :1].numel()))
        # one float32 buffer for all blocks: a fresh few-MB tensor per block is mapped and faulted in each time
        buffer = torch.empty_like(source[:, :step], dtype=torch.float32, memory_format=torch.contiguous_format)
        for d0 in range(0, source.shape[1], step):
            block = buffer[:, : min(step, source.shape[1] - d0)]
            block.copy_(source[:, d0 : d0 + step])
            block.div_(torch.linalg.vector_norm(block, dim=-1, keepdim=True).clamp_min_(1e-12))
            target[:, d0 : d0 + step].copy_(block)
        return out

    def _inference_network(self, network: SAMv2Net) -> SAMv2Net:
        """The network as the pass runs it: in eval mode a copy with the batch norms folded into the convs (the
        caller's network is not modified), in ``channels_last_3d`` where asked.

        The copy is kept for the next call while it is the same network with the same weights (every parameter and
        buffer at the same address and version: an optimiser step or ``load_state_dict`` makes a new copy): copying
        and folding took 15-25 ms of each light pass (about 1 s), paid again for every scan of a cohort."""
        if network.training:
            return network.to(memory_format=torch.channels_last_3d) if self.channels_last else network
        state = tuple((t.data_ptr(), t._version) for t in itertools.chain(network.parameters(), network.buffers()))
        cached = self._prepared
        if cached is not None and cached[0]() is network and cached[1] == state and cached[2] == self.channels_last:
            return cached[3]
        prepared = fuse_conv_norm(network)
        if self.channels_last:
            prepared = prepared.to(memory_format=torch.channels_last_3d)
        self._prepared = (weakref.ref(network), state, self.channels_last, prepared)
        return prepared

    def _embed(self, x: torch.Tensor, network: SAMv2Net) -> dict[str, torch.Tensor]:
        network = self._inference_network(network)
        size = tuple(x.shape[2:])
        tiles = self.tile_starts(size)
        if len(tiles) == 1:
            return {name: self._finish(emb, consume=True) for name, emb in self._forward(x, network).items()}
        logger.info("embedding %s in %d tiles (max_tile_voxels=%s)", size, len(tiles), self.max_tile_voxels)
        out: dict[str, torch.Tensor] = {}
        for core in tiles:
            lo = [max(0, c0 - h) for (c0, _), h in zip(core, self.halo)]
            hi = [min(n, c1 + h) for (_, c1), h, n in zip(core, self.halo, size)]
            heads = self._forward(x[:, :, lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]], network)
            for name in list(heads):
                emb = heads.pop(name)  # drop each tile output as soon as its core is copied: bounds memory
                stride = HEAD_GRIDS[name][0]
                if name not in out:
                    full = [n // s for n, s in zip(size, stride)]
                    out[name] = emb.new_empty((x.shape[0], emb.shape[1], *full), dtype=self.output_dtype)
                dst = tuple(slice(c0 // s, c1 // s) for (c0, c1), s in zip(core, stride))
                src = tuple(slice((c0 - l) // s, (c1 - l) // s) for (c0, c1), l, s in zip(core, lo, stride))
                out[name][(slice(None), slice(None), *dst)] = self._finish(emb[(slice(None), slice(None), *src)])
                del emb
        return out

    @staticmethod
    def _with_grid_meta(emb: torch.Tensor, image: MetaTensor, stride, offset) -> MetaTensor:
        affine = image.affine
        batched = affine.ndim == 3
        affines = affine if batched else affine[None]
        grid = torch.stack([torch.as_tensor(strided_grid_affine(a, stride, offset)) for a in affines])
        meta = {k: v for k, v in image.meta.items() if k in ("space", "filename_or_obj")}
        return MetaTensor(emb, affine=grid if batched else grid[0], meta=meta)
