"""Coarse-to-fine nearest-neighbour search: score coarse cells first, then search fine voxels only near the best.

The exhaustive search (:func:`~samv2_components.matching.nearest_neighbour.nearest_neighbour_search`) scores
every fine voxel of the query for every point: ``n_points x n_voxels x 384`` multiply-adds, about 0.3 GFLOP per
point on a 96 x 96 x 80 fine grid. This search does the same job in two stages:

1. **Cells.** The fine descriptor map is average-pooled into cells of ``cell_size`` fine voxels (default
   ``(2, 8, 8)``: the coarse head's own grid, 8 x 32 x 32 mm). A cell's row is the mean of its voxels' rows, so a
   point's score with a cell is the *mean* score over the cell's voxels. Every point is scored against every
   cell (``cell_size`` product = 128 times fewer operations than the fine grid) and its ``top_k`` cells are kept.
2. **Windows.** Each kept cell's footprint, widened by ``margin`` fine voxels on each side, is searched
   exhaustively with the exact SAMv2 score. Points that picked the same cell share one gather of the cell's window
   (batched matrix products over cells), which is what makes fixed-point matching cheap: the 125 grid points
   around a landmark mostly land in the same few cells.

The answer is the exact grid maximum whenever that maximum lies in one of the ``top_k`` windows; the benchmark
(``scripts/benchmark_matching.py``) reports how often it agrees with the exhaustive search. Scores are the mean
of per-head cosines (the :class:`~samv2_components.matching.nearest_neighbour.DescriptorMap` convention).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from samv2_components.matching.nearest_neighbour import _ROW_BLOCK, DescriptorMap, grid_voxels, subvoxel_offsets

__all__ = ["CoarseToFineSearch"]

#: depth planes of the map pooled in-plane at once when the cell sums are built
_PLANES_PER_BLOCK = 8
#: most (point, cell) scores held at once by the cell stage (16 MiB in bfloat16): a batch's points are ranked in
#: parts on a large scan (a 512 x 512 x 600 CT has 18,000 cells), then searched together (their windows shared)
_MAX_CELL_SCORES = 8 * 1024 * 1024


def _triple(value, name: str) -> tuple[int, int, int]:
    values = (value,) * 3 if np.isscalar(value) else tuple(value)
    if len(values) != 3 or any(int(v) != v or v < 0 for v in values):
        raise ValueError(f"{name} must be a non-negative integer or three of them, got {value!r}")
    return tuple(int(v) for v in values)


def _box_sums(x: torch.Tensor, axis: int, kernel: int, stride: int) -> torch.Tensor:
    """Sums of ``kernel`` consecutive entries along ``axis``, every ``stride``, centred on ``0, stride, 2 stride...``.

    Entries beyond either end count as zero; as many windows as ``avg_pool3d(..., ceil_mode=True)`` makes (the last
    one may hang over the end). Accumulated term by term into the (``stride`` times smaller) output: a zero-padded
    copy of the input would be as large as the whole descriptor map (1.7 GB for a 512 x 512 x 600 CT). A float16
    input is summed in float32.
    """
    n, pad = x.shape[axis], kernel // 2
    n_cells = -(-(n + 2 * pad - kernel) // stride) + 1
    if (n_cells - 1) * stride >= n + pad:  # a window must start inside the input or the front padding
        n_cells -= 1
    shape = list(x.shape)
    shape[axis] = n_cells
    out = x.new_zeros(shape, dtype=torch.float32 if x.dtype == torch.float16 else x.dtype)
    for offset in range(-pad, kernel - pad):  # cell c adds entry c * stride + offset
        first = max(0, -(offset // stride)) if offset < 0 else 0
        last = min(n_cells - 1, (n - 1 - offset) // stride)
        if last < first:
            continue
        count = last - first + 1
        terms = x.narrow(axis, first * stride + offset, (count - 1) * stride + 1)
        terms = terms[(slice(None),) * axis + (slice(None, None, stride),)]
        out.narrow(axis, first, count).add_(terms)  # float16 terms are converted: the caller passes small blocks
    return out


class CoarseToFineSearch:
    """Best-scoring fine-grid voxel of a :class:`DescriptorMap` for many descriptors at once.

    Args:
        descriptor_map: the map searched (from :func:`~samv2_components.matching.query_descriptor_map`).
        cell_size: fine voxels per cell along ``(d, h, w)``; ``(2, 8, 8)`` is the coarse head's grid.
        top_k: cells whose windows are searched exactly per point.
        margin: fine voxels added on each side of a cell's footprint to form its search window.
        points_per_batch: points searched together (points that chose one cell share its window gather); their
            ``points x cells`` scores are computed in parts of at most :data:`_MAX_CELL_SCORES` entries.
        cells_per_batch: cell windows gathered at once (bounds the ``cells x window x channels`` gather).
        cell_dtype: ``"bfloat16"`` (default) or ``"float32"``: precision of the cell stage (ranking cells only;
            bf16 matrix products are 2-4x faster on CPUs with bf16 units and on GPUs). The window stage is always
            float32: neighbouring fine voxels of a smooth map differ by less than bf16's resolution (measured: bf16
            windows moved 23 % of the maxima by more than a voxel on a real CT).

    A cell ``c`` (along one axis, stride ``s = cell_size``) is centred on fine voxel ``c * s`` and averages the
    fine voxels within ``s // 2`` of it (odd kernel ``s + 1`` for even ``s``, so neighbouring cells overlap by a
    voxel and the mean is centred). Its window covers fine voxels ``c * s - s // 2 - margin`` to
    ``c * s + s // 2 + margin``, shifted inwards at the grid border so that every window has the same size.
    When ``top_k`` windows would cover the whole grid the search is exhaustive.
    """

    def __init__(
        self,
        descriptor_map: DescriptorMap,
        cell_size: Sequence[int] | int = (2, 8, 8),
        top_k: int = 3,
        margin: Sequence[int] | int = (1, 2, 2),
        points_per_batch: int = 2048,
        cells_per_batch: int = 64,
        cell_dtype: str = "bfloat16",
    ):
        self.map = descriptor_map
        self.cell_size = _triple(cell_size, "cell_size")
        if min(self.cell_size) < 1:
            raise ValueError(f"cell_size must be >= 1 along every axis, got {self.cell_size}")
        self.margin = _triple(margin, "margin")
        self.top_k = int(top_k)
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if cell_dtype not in ("bfloat16", "float32"):
            raise ValueError(f"cell_dtype must be 'bfloat16' or 'float32', got {cell_dtype!r}")
        self.cell_dtype = getattr(torch, cell_dtype)
        self.points_per_batch = max(1, int(points_per_batch))
        self.cells_per_batch = max(1, int(cells_per_batch))

        shape = descriptor_map.grid_shape
        self._kernel = tuple(s + 1 - s % 2 for s in self.cell_size)  # odd, so a cell is centred on voxel c * s
        self.window_size = tuple(min(k + 2 * m, n) for k, m, n in zip(self._kernel, self.margin, shape))
        # per-cell sums straight from each head's voxel-major rows (a (C, d, h, w) pooling would first need a 1 GB
        # transpose on a chest CT); the scale of a sum does not matter, since each head is re-normalised
        sums = torch.cat([self._cell_sums(lambda start, stop, h=h: descriptor_map.head_planes(h, start, stop), shape[0])
                          for h in range(descriptor_map.n_heads)], dim=3)
        self.cell_grid_shape = tuple(sums.shape[:3])
        cell_rows = sums.reshape(-1, descriptor_map.n_heads, sums.shape[3] // descriptor_map.n_heads)
        # each head re-normalised: the cell's mean direction, so a varied cell (an edge) is not penalised for it
        cell_rows = F.normalize(cell_rows, dim=2).reshape(cell_rows.shape[0], -1)
        self.cell_rows = cell_rows.to(self.cell_dtype).contiguous()  # (n_cells, C)
        device = sums.device
        n_windows = min(self.top_k, self.cell_rows.shape[0])
        self.exhaustive = n_windows * int(np.prod(self.window_size)) >= int(np.prod(shape))
        # linear offsets of a window's voxels relative to its first voxel, C order of (d, h, w)
        strides = (shape[1] * shape[2], shape[2], 1)
        axes = [torch.arange(n, device=device) * st for n, st in zip(self.window_size, strides)]
        self._window_offsets = (axes[0][:, None, None] + axes[1][None, :, None] + axes[2][None, None, :]).reshape(-1)
        self._strides = torch.tensor(strides, device=device)

    # ------------------------------------------------------------------------------------------------ helpers
    def _cell_sums(self, read_planes, depth: int) -> torch.Tensor:
        """Per-cell sums ``(cd, ch, cw, C)`` float32 of one head's rows; ``read_planes(start, stop)`` gives the rows
        of depth planes ``start:stop`` as ``(stop - start, h, w, C)``, ``depth`` is ``d``.

        The two in-plane axes are pooled a few depth planes at a time into a buffer of ``(d, ch, cw, C)``, then
        depth: pooling depth first would hold a float32 intermediate of ``d / cell_size[0]`` whole planes (430 MB
        for a 512 x 512 x 600 CT with the bundle's 4-voxel cells), this one is ``cell_size[1] * cell_size[2]``
        times smaller than the map.
        """
        planes = None
        for d0 in range(0, depth, _PLANES_PER_BLOCK):
            block = read_planes(d0, min(d0 + _PLANES_PER_BLOCK, depth))
            for axis in (1, 2):
                block = _box_sums(block, axis, self._kernel[axis], self.cell_size[axis])
            if planes is None:
                planes = block.new_empty((depth, *block.shape[1:]))
            planes[d0 : d0 + len(block)] = block
        return _box_sums(planes, 0, self._kernel[0], self.cell_size[0])

    def _best_cells(self, descriptors: torch.Tensor, k: int) -> torch.Tensor:
        """Linear indices ``(N, k)`` of the ``k`` best-scoring cells of each descriptor ``(N, C)``."""
        part = max(1, _MAX_CELL_SCORES // len(self.cell_rows))
        return torch.cat([(chunk.to(self.cell_dtype) @ self.cell_rows.T).topk(k, dim=1).indices
                          for chunk in descriptors.split(part)])

    def _window_indices(self, cells: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """First voxels ``(n, 3)`` and linear fine-voxel indices ``(n, W)`` of the windows of cells (linear cell
        indices ``(n,)``)."""
        cell_pos = torch.stack(torch.unravel_index(cells, self.cell_grid_shape), dim=1)  # (n, 3)
        shape = torch.tensor(self.map.grid_shape, device=cells.device)
        size = torch.tensor(self.window_size, device=cells.device)
        lead = torch.tensor([k // 2 + m for k, m in zip(self._kernel, self.margin)], device=cells.device)
        step = torch.tensor(self.cell_size, device=cells.device)
        start = torch.minimum((cell_pos * step - lead).clamp(min=0), shape - size)
        return start, (start * self._strides).sum(1, keepdim=True) + self._window_offsets[None]

    def _search_windows(
        self, descriptors: torch.Tensor, cells: torch.Tensor, buffers: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact best voxel inside the windows of ``cells`` ``(N, K)`` for each descriptor ``(N, C)``.

        ``buffers``: the map's :meth:`~DescriptorMap.window_buffers` for ``cells_per_batch`` windows, reused by every
        batch.
        Returns ``(best_index (N,), best_raw_score (N,))``; the raw score is the dot product (``n_heads`` x score).
        """
        n, k = cells.shape
        pair_cell = cells.reshape(-1)
        pair_point = torch.arange(n, device=cells.device).repeat_interleave(k)
        unique, inverse, counts = torch.unique(pair_cell, return_inverse=True, return_counts=True)
        # relabel the cells by how many points chose them, so that a batch of cells pads to similar counts
        by_count = torch.argsort(counts, stable=True)
        rank_of_cell = torch.empty_like(by_count)
        rank_of_cell[by_count] = torch.arange(len(by_count), device=cells.device)
        unique, counts, label = unique[by_count], counts[by_count], rank_of_cell[inverse]
        order = torch.argsort(label, stable=True)  # pairs grouped by cell label
        first_pair = torch.cumsum(counts, 0) - counts
        rank_in_cell = torch.arange(len(order), device=cells.device) - first_pair[label[order]]

        pair_score = torch.empty(len(pair_cell), dtype=torch.float32, device=cells.device)
        pair_index = torch.empty(len(pair_cell), dtype=torch.long, device=cells.device)
        for c0 in range(0, len(unique), self.cells_per_batch):
            c1 = min(c0 + self.cells_per_batch, len(unique))
            pairs = order[first_pair[c0] : first_pair[c1 - 1] + counts[c1 - 1]]
            local_cell, rank = label[pairs] - c0, rank_in_cell[first_pair[c0] : first_pair[c1 - 1] + counts[c1 - 1]]
            padded = torch.zeros(c1 - c0, int(counts[c0:c1].max()), self.map.n_channels, dtype=torch.float32,
                                 device=descriptors.device)
            padded[local_cell, rank] = descriptors[pair_point[pairs]]
            starts, window_index = self._window_indices(unique[c0:c1])  # (G, 3), (G, W)
            # (G, P_max, W): the dot products summed head by head
            scores = self.map.window_scores(padded, starts, window_index, self.window_size, buffers)
            best_score, best_pos = scores.max(dim=2)
            pair_score[pairs] = best_score[local_cell, rank].float()
            pair_index[pairs] = window_index[local_cell, best_pos[local_cell, rank]]
        best_of_k = pair_score.view(n, k).argmax(dim=1)
        rows = torch.arange(n, device=cells.device)
        return pair_index.view(n, k)[rows, best_of_k], pair_score.view(n, k)[rows, best_of_k]

    def _search_exhaustive(self, descriptors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # a grid this small is searched whole, its rows gathered (and a float16 map converted) block by block
        scores = torch.cat([descriptors @ self.map.row_range(v0, v0 + _ROW_BLOCK).T
                            for v0 in range(0, self.map.n_voxels, _ROW_BLOCK)], dim=1)
        best_score, best_index = scores.max(dim=1)
        return best_index, best_score

    # ------------------------------------------------------------------------------------------------- search
    def search_indices(self, descriptors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Best fine voxel per descriptor, as linear indices into the map's grid.

        Args:
            descriptors: ``(N, C_total)`` (same heads and channel order as the map).

        Returns:
            ``(index, score)``: ``(N,)`` long linear indices (C order of ``(d, h, w)``) and ``(N,)`` float scores
            (mean of per-head cosines at that voxel), both on the map's device.
        """
        n_channels, device = self.map.n_channels, self.map.device
        if descriptors.ndim != 2 or descriptors.shape[1] != n_channels:
            raise ValueError(
                f"descriptors must be (N, {n_channels}) to match the map's heads {self.map.head_names}, "
                f"got {tuple(descriptors.shape)}"
            )
        descriptors = descriptors.to(device=device, dtype=torch.float32)
        index = torch.empty(len(descriptors), dtype=torch.long, device=device)
        score = torch.empty(len(descriptors), dtype=torch.float32, device=device)
        k = min(self.top_k, self.cell_rows.shape[0])
        if not self.exhaustive:
            # one buffer for the windows of every batch of every point batch: a fresh tensor of tens of MB per batch
            # is returned to the OS and faulted in again each time, which cost more than the gather itself (lung2:
            # 1,000 points 0.61 -> 0.20 s)
            n_rows = min(self.cells_per_batch, len(descriptors) * k) * len(self._window_offsets)
            buffers = self.map.window_buffers(n_rows)
        for p0 in range(0, len(descriptors), self.points_per_batch):
            batch = descriptors[p0 : p0 + self.points_per_batch]
            if self.exhaustive:
                best = self._search_exhaustive(batch)
            else:
                cells = self._best_cells(batch, k)
                best = self._search_windows(batch, cells, buffers)
            index[p0 : p0 + len(batch)], score[p0 : p0 + len(batch)] = best[0], best[1] / self.map.n_heads
        return index, score

    def search(self, descriptors: torch.Tensor, subvoxel: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Like :func:`~samv2_components.matching.nearest_neighbour.nearest_neighbour_search`.

        Returns:
            ``(voxels, scores)``: fractional fine-grid voxel coordinates ``(N, 3)`` (float64 numpy) and the score
            at the best grid voxel ``(N,)`` (float32 numpy, in [-1, 1]).
        """
        index, score = self.search_indices(descriptors)
        voxels = grid_voxels(index, self.map.grid_shape)
        if subvoxel:
            descriptors = descriptors.to(device=self.map.device, dtype=torch.float32)
            voxels += subvoxel_offsets(descriptors, self.map, index)
        return voxels.cpu().numpy(), score.float().cpu().numpy()
