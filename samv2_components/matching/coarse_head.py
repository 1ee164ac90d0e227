"""The coarse head as the fine grid sees it, computed where it is read instead of stored upsampled.

The matching score reads the coarse head on the fine grid: trilinearly upsampled
(:func:`~samv2_components.networks.upsample_to_fine_grid`: fine voxel ``f`` sits at coarse voxel ``f * ratio``
along each axis, border values beyond the last coarse voxel) and re-normalised, as ``SAMv2Net.forward`` does.
Stored that way it is a ``(fine voxels, 128)`` block: 0.27 GB in float16 for a 512 x 512 x 600 CT, a sixth of the
1.5 GB a whole ``samv2 match`` may use, for a head whose own grid has 32 times fewer voxels
(:data:`~samv2_components.networks.HEAD_GRIDS`: strides ``(4, 16, 16)`` against the fine ``(2, 2, 2)``).

:class:`CoarseHeadOnFineGrid` keeps the coarse vectors on their own grid plus one number per fine voxel, the
inverse length ``1 / |u(f)|`` of the interpolated vector ``u(f)``, and produces the same rows on demand:

* rows of any fine voxels (:meth:`~CoarseHeadOnFineGrid.rows`): the 8 coarse neighbours weighted, times ``1 / |u|``;
* whole depth planes (:meth:`~CoarseHeadOnFineGrid.planes`): separable interpolation, axis by axis;
* **scores of search windows** (:meth:`~CoarseHeadOnFineGrid.window_scores`): since ``q . u(f) = sum_i w_i(f)
  (q . c_i)``, a window is scored on the few coarse voxels under it and the *scores* are interpolated, then divided
  by ``|u(f)|``: about 20 times fewer dot products than scoring the window's fine voxels.

Every value equals the stored upsampled-and-normalised head's up to float32 rounding (the stored float16 block was
rounded to 2**-11).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["CoarseHeadOnFineGrid"]

#: fine depth planes interpolated at once when the inverse lengths are computed
_PLANES_PER_BLOCK = 8


def _axis_weights(n_fine: int, n_coarse: int, ratio: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per fine position along one axis: ``(low, high, weight of high)``, ``(n_fine,)`` each.

    Fine voxel ``f`` sits at coarse coordinate ``f * ratio``, clamped to ``[0, n_coarse - 1]`` (the border value
    beyond the last voxel); ``low`` and ``high = low + 1`` are its two coarse neighbours (both the last voxel, with
    weight 0 on ``high``, at the far border or when the axis has a single coarse voxel).
    """
    position = (torch.arange(n_fine, dtype=torch.float64) * ratio).clamp(0.0, n_coarse - 1)
    low = position.floor().clamp(max=max(n_coarse - 2, 0)).long()
    weight = (position - low).float()
    high = (low + 1).clamp(max=n_coarse - 1)
    return low, high, weight


def _interpolate_axis(x: torch.Tensor, axis: int, low: torch.Tensor, high: torch.Tensor, weight: torch.Tensor):
    """Linear interpolation of ``x`` along ``axis`` at the positions given by ``low``/``high``/``weight``."""
    shape = [1] * x.ndim
    shape[axis] = len(weight)
    w = weight.view(shape)
    return x.index_select(axis, low) * (1 - w) + x.index_select(axis, high) * w


class CoarseHeadOnFineGrid:
    """The coarse head upsampled to the fine grid and re-normalised, read on demand (see the module doc).

    Args:
        coarse: the coarse head ``(C, cd, ch, cw)`` on its own grid (any float type; kept as float32, voxel-major).
        fine_shape: ``(d, h, w)`` of the fine grid.
        ratios: ``fine stride / coarse stride`` per axis (fine voxel ``f`` sits at coarse voxel ``f * ratio``; the
            two grids share their first voxel centre).

    Rows are indexed like the fine grid's voxels, C order of ``(d, h, w)``; every value is float32.
    """

    def __init__(self, coarse: torch.Tensor, fine_shape, ratios):
        if coarse.ndim != 4:
            raise ValueError(f"the coarse head must be (C, d, h, w), got shape {tuple(coarse.shape)}")
        self.n_channels = int(coarse.shape[0])
        self.coarse_shape = tuple(int(n) for n in coarse.shape[1:])
        self.fine_shape = tuple(int(n) for n in fine_shape)
        self.ratios = tuple(float(r) for r in ratios)
        self.device = coarse.device
        # (n_coarse, C): a coarse voxel's vector is one contiguous row (gathered whole)
        self.table = coarse.permute(1, 2, 3, 0).reshape(-1, self.n_channels).float().contiguous()
        self._coarse_strides = (self.coarse_shape[1] * self.coarse_shape[2], self.coarse_shape[2], 1)
        self._axes = [tuple(t.to(self.device) for t in _axis_weights(n, c, r))
                      for n, c, r in zip(self.fine_shape, self.coarse_shape, self.ratios)]
        self._box_sizes: dict = {}
        self.inverse_length = torch.empty(self.n_rows, dtype=torch.float32, device=self.device)
        plane = self.fine_shape[1] * self.fine_shape[2]
        for d0 in range(0, self.fine_shape[0], _PLANES_PER_BLOCK):
            d1 = min(d0 + _PLANES_PER_BLOCK, self.fine_shape[0])
            lengths = self._squared_lengths(d0, d1).sqrt_().clamp_min_(1e-12).reciprocal_()
            self.inverse_length[d0 * plane : d1 * plane] = lengths.reshape(-1)

    @property
    def n_rows(self) -> int:
        return int(np.prod(self.fine_shape))

    @property
    def nbytes(self) -> int:
        """Memory held: the coarse vectors and one inverse length per fine voxel."""
        return self.table.numel() * self.table.element_size() + self.inverse_length.numel() * 4

    # --------------------------------------------------------------------------------------------- reading
    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """Rows ``(N, C)`` float32 of the fine voxels with linear indices ``index`` ``(N,)``."""
        index = torch.as_tensor(index, device=self.device).reshape(-1)
        position = torch.unravel_index(index, self.fine_shape)
        out = torch.zeros(len(index), self.n_channels, dtype=torch.float32, device=self.device)
        sides = []
        for axis, (low, high, weight) in enumerate(self._axes):
            p = position[axis]
            stride = self._coarse_strides[axis]
            sides.append(((low[p] * stride, 1 - weight[p]), (high[p] * stride, weight[p])))
        for (i0, w0) in sides[0]:
            for (i1, w1) in sides[1]:
                for (i2, w2) in sides[2]:
                    out.addcmul_(self.table.index_select(0, i0 + i1 + i2), (w0 * w1 * w2)[:, None])
        return out.mul_(self.inverse_length[index, None])

    def _depth_and_height(self, start: int, stop: int) -> torch.Tensor:
        """The coarse vectors interpolated along depth and height for fine planes ``start:stop``:
        ``(stop - start, h, cw, C)`` float32, not normalised."""
        low, high, weight = (t[start:stop] for t in self._axes[0])
        first, last = int(low.min()), int(high.max())
        block = self.table.view(*self.coarse_shape, self.n_channels)[first : last + 1]
        block = _interpolate_axis(block, 0, low - first, high - first, weight)
        return _interpolate_axis(block, 1, *self._axes[1])

    def _squared_lengths(self, start: int, stop: int) -> torch.Tensor:
        """``|u(f)|^2`` ``(stop - start, h, w)`` of the interpolated vectors of fine planes ``start:stop`` (``stop``
        at most the fine depth).

        Along the last axis ``u = (1 - a) v_lo + a v_hi`` of two vectors interpolated along the other axes, so
        ``|u|^2 = (1 - a)^2 |v_lo|^2 + 2 a (1 - a) v_lo . v_hi + a^2 |v_hi|^2``: computed from the coarse columns'
        lengths and neighbours' dot products, without interpolating the 128 channels along the last axis.
        """
        partial = self._depth_and_height(start, stop)  # (n, h, cw, C)
        low, high, a = self._axes[2]
        # per coarse column and pair of neighbouring columns (few), then gathered along the fine axis
        squared = partial.square().sum(-1)  # (n, h, cw)
        shifted = torch.cat([partial[:, :, 1:], partial[:, :, -1:]], dim=2)
        cross = (partial * shifted).sum(-1)  # v_j . v_{j+1}
        return ((1 - a) ** 2 * squared.index_select(2, low) + 2 * a * (1 - a) * cross.index_select(2, low)
                + a**2 * squared.index_select(2, high))

    def planes(self, start: int, stop: int) -> torch.Tensor:
        """Rows of the fine depth planes ``start:stop`` as ``(stop - start, h, w, C)`` float32."""
        stop = min(stop, self.fine_shape[0])
        if stop <= start:
            return torch.empty(0, *self.fine_shape[1:], self.n_channels, device=self.device)
        block = _interpolate_axis(self._depth_and_height(start, stop), 2, *self._axes[2])
        plane = self.fine_shape[1] * self.fine_shape[2]
        lengths = self.inverse_length[start * plane : stop * plane].view(stop - start, *self.fine_shape[1:])
        return block.mul_(lengths[..., None])

    def row_range(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``(stop - start, C)`` float32 of the fine voxels ``start:stop`` (C order): the planes they lie in,
        interpolated whole (faster than gathering each row's 8 neighbours)."""
        plane = self.fine_shape[1] * self.fine_shape[2]
        first, last = start // plane, -(-stop // plane)
        return self.planes(first, last).view(-1, self.n_channels)[start - first * plane : stop - first * plane]

    def scores(self, descriptor: torch.Tensor) -> torch.Tensor:
        """Cosines ``(n_fine,)`` float32 of one head descriptor ``(C,)`` with every fine voxel (C order)."""
        coarse_scores = (self.table @ descriptor.float()).view(*self.coarse_shape, 1)
        for axis in range(3):
            coarse_scores = _interpolate_axis(coarse_scores, axis, *self._axes[axis])
        return coarse_scores.reshape(-1).mul_(self.inverse_length)

    # ------------------------------------------------------------------------------------------ window search
    def box_size(self, window_size) -> tuple[int, int, int]:
        """Coarse voxels ``(bd, bh, bw)`` under any window of ``window_size`` fine voxels inside the grid (computed
        once per window size: a search asks for it with every batch of windows)."""
        key = tuple(int(n) for n in window_size)
        if key not in self._box_sizes:
            # along each axis: the window starting at s spans coarse voxels low[s] .. high[s + n - 1]
            self._box_sizes[key] = tuple(int((high[n - 1 :] - low[: len(low) - n + 1]).max()) + 1
                                         for (low, high, _), n in zip(self._axes, key))
        return self._box_sizes[key]

    def window_scores(self, descriptors: torch.Tensor, starts: torch.Tensor, window_index: torch.Tensor,
                      window_size, out: torch.Tensor | None = None, workspace=None) -> torch.Tensor:
        """Dot products ``(G, P, W)`` of descriptors with every fine voxel of ``G`` windows.

        Args:
            descriptors: ``(G, P, C)`` float32, this head's part of ``P`` descriptors per window.
            starts: ``(G, 3)`` first fine voxel of each window (the window lies inside the grid).
            window_index: ``(G, W)`` linear fine indices of each window's voxels, C order of ``window_size``.
            window_size: ``(wd, wh, ww)`` fine voxels, ``W`` their product.
            out: ``(G, P, W)`` float32 scores to add to (in place), or ``None`` for a new tensor.
            workspace: unused (the stored heads' interface: they gather rows into a buffer).

        The descriptors are scored on the window's coarse box (``B`` voxels) and the scores carried to the window's
        voxels by one ``(W, B)`` matrix per window: the product of the three axes' linear-interpolation weights,
        each row scaled by its voxel's inverse length.
        """
        n_windows, box_size = len(starts), self.box_size(window_size)
        box_index, weights = 0, []
        for axis, ((low, high, weight), n, b) in enumerate(zip(self._axes, window_size, box_size)):
            position = starts[:, axis, None] + torch.arange(n, device=self.device)  # (G, n)
            first = low[position[:, 0]].clamp(max=self.coarse_shape[axis] - b)  # the box lies inside the grid
            matrix = torch.zeros(n_windows, n, b, dtype=torch.float32, device=self.device)
            w = weight[position]
            matrix.scatter_add_(2, (low[position] - first[:, None])[..., None], (1 - w)[..., None])
            matrix.scatter_add_(2, (high[position] - first[:, None])[..., None], w[..., None])
            weights.append(matrix)
            along = (first[:, None] + torch.arange(b, device=self.device)) * self._coarse_strides[axis]  # (G, b)
            box_index = box_index + along.view(n_windows, *[b if i == axis else 1 for i in range(3)])
        box_rows = self.table.index_select(0, box_index.reshape(-1)).view(n_windows, -1, self.n_channels)
        box_scores = torch.bmm(descriptors, box_rows.transpose(1, 2))  # (G, P, B)
        # (G, B, W): box voxel (x, y, z) -> window voxel (i, j, k), weight Md[i, x] Mh[j, y] Mw[k, z] / |u|
        spread = torch.einsum("gix,gjy,gkz->gxyzijk", *weights).reshape(n_windows, box_scores.shape[2], -1)
        spread.mul_(self.inverse_length[window_index][:, None])
        return torch.bmm(box_scores, spread) if out is None else out.baddbmm_(box_scores, spread)
