"""Exhaustive nearest-neighbour (NN) matching of world points between two embedded scans.

Conventions:

* **Heads**: what :class:`~samv2_components.inference.SAMv2Inferer` returns for one scan,
  ``{head: MetaTensor (1, C, d, h, w)}`` (or un-batched ``(C, d, h, w)``), every voxel's vector L2-normalised,
  each head on its own grid with its own voxel-to-world ``affine`` (MONAI: RAS, ``meta["space"]``; LPS affines
  are accepted when ``meta["space"] == "LPS"``). Array axes are (S, P, L) = (D, H, W) after the bundle
  preprocessing, but nothing here assumes an axis order: the affines say where every voxel is.
* **Points** are world coordinates in millimetres, **LPS**, shape ``(N, 3)``; results are LPS too.
* **Descriptor** of a point: each head present (canonical order ``fine, coarse, semantic``) sampled trilinearly
  at the point on that head's own grid, re-normalised, concatenated: ``(N, 128 * n_heads)``.
* **Score** (design notes §2 "Score", `docs/design.md`): the mean of the per-head cosines, i.e. ``descriptor . map / n_heads``, in
  ``[-1, 1]``. On the query side the coarse head is upsampled to the fine grid with
  :func:`~samv2_components.networks.upsample_to_fine_grid` and re-normalised, as in ``SAMv2Net.forward`` (computed
  where it is read, not stored: :mod:`~samv2_components.matching.coarse_head`).
* NN searches the whole query **fine grid**; the answer is the world position of the best fine voxel, optionally
  refined to sub-voxel precision by a per-axis quadratic fit of the score (``subvoxel=True``).

A later coarse-to-fine / fixed-point matcher builds on :func:`descriptor_at_points`, :func:`query_descriptor_map`
and :func:`nearest_neighbour_search`.
"""

from __future__ import annotations

from collections.abc import Mapping
import numpy as np
import torch
import torch.nn.functional as F

from samv2_components.geometry import affine_and_space, as_points, voxel_to_world, world_to_voxel
from samv2_components.matching.coarse_head import CoarseHeadOnFineGrid
from samv2_components.networks import HEAD_NAMES

__all__ = [
    "DescriptorMap",
    "StoredHead",
    "present_heads",
    "descriptor_at_points",
    "query_descriptor_map",
    "nearest_neighbour_search",
    "match_nearest_neighbour",
]

#: the largest (points x voxels) score block held at once by :func:`nearest_neighbour_search` (128 MiB in fp32)
MAX_SCORE_BLOCK = 32 * 1024 * 1024
#: voxels per float32 block when a float16 map is normalised or scored (a 384-channel block: 96 MiB)
_ROW_BLOCK = 1 << 16
#: how far from 1 a float16 unit vector's length may be (rounding each channel moves it by at most 2**-11)
_UNIT_TOLERANCE = 1e-3


class StoredHead:
    """A head on the fine grid held as rows: a ``(n_voxels, C)`` float tensor (row = voxel in C order of the fine
    grid, unit length; float16 for the bundles' maps, every score computed in float32), often a view of the
    inferer's own head. Reads the same way as :class:`~samv2_components.matching.coarse_head.CoarseHeadOnFineGrid`.

    Args:
        data: the ``(n_voxels, C)`` rows.
        grid_shape: ``(d, h, w)`` of the fine grid.
    """

    def __init__(self, data: torch.Tensor, grid_shape):
        self.data = data
        self.grid_shape = tuple(int(n) for n in grid_shape)

    @property
    def n_rows(self) -> int:
        return int(self.data.shape[0])

    @property
    def n_channels(self) -> int:
        return int(self.data.shape[1])

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype

    @property
    def device(self) -> torch.device:
        return self.data.device

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """Rows ``(N, C)`` float32 of the voxels ``index`` (a float16 map is converted row by row, never whole)."""
        return self.data.index_select(0, index).float()

    def row_range(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``(stop - start, C)`` float32 of the voxels ``start:stop`` (C order)."""
        return self.data[start:stop].float()

    def planes(self, start: int, stop: int) -> torch.Tensor:
        """Rows of the depth planes ``start:stop`` as ``(stop - start, h, w, C)``, a view (the stored type)."""
        return self.data.view(*self.grid_shape, self.n_channels)[start:stop]

    def scores(self, descriptor: torch.Tensor) -> torch.Tensor:
        """Cosines ``(n_rows,)`` float32 of one head descriptor ``(C,)`` with every voxel, in float32 blocks."""
        out = torch.empty(self.n_rows, dtype=torch.float32, device=self.device)
        for v0 in range(0, self.n_rows, _ROW_BLOCK):
            torch.mv(self.data[v0 : v0 + _ROW_BLOCK].float(), descriptor, out=out[v0 : v0 + _ROW_BLOCK])
        return out

    def window_workspace(self, n_rows: int, staging: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A float32 ``(n_rows, C)`` buffer for :meth:`window_scores`' gathered rows, and ``staging`` (a buffer of
        the stored type, shared by the heads) unless the rows need no conversion."""
        buffer = torch.empty(n_rows, self.n_channels, dtype=torch.float32, device=self.device)
        return buffer, None if self.dtype == torch.float32 else staging

    def window_scores(self, descriptors: torch.Tensor, starts: torch.Tensor, window_index: torch.Tensor, window_size,
                      out: torch.Tensor | None = None, workspace=None) -> torch.Tensor:
        """Dot products ``(G, P, W)`` of descriptors ``(G, P, C)`` with the voxels ``window_index`` ``(G, W)`` of
        ``G`` windows, added to ``out`` when given: the rows are gathered into ``workspace``
        (:meth:`window_workspace`, staged in the stored type) as one contiguous float32 matrix, then multiplied.
        ``starts`` and ``window_size`` are not needed here (the computed head's interface)."""
        buffer, staging = workspace
        n_windows, n_voxels = window_index.shape
        index = window_index.reshape(-1)
        rows = buffer[: len(index)]
        if staging is None:
            torch.index_select(self.data, 0, index, out=rows)
        else:
            rows.copy_(torch.index_select(self.data, 0, index, out=staging[: len(index)]))
        rows = rows.view(n_windows, n_voxels, self.n_channels).transpose(1, 2)
        return torch.bmm(descriptors, rows) if out is None else out.baddbmm_(descriptors, rows)


class DescriptorMap:
    """The query's matching descriptor on its fine grid, one head of rows per head.

    Each head reads as a ``(d * h * w, C)`` block of rows (row = voxel in C order of ``(d, h, w)``, every row unit
    length); the descriptor of a voxel is the concatenation of its rows in :attr:`head_names` order,
    ``C_total = C * n_heads`` channels. Heads already on the fine grid are :class:`StoredHead` s: **views of the
    heads' own storage** when the inferer's channels-last layout makes them row matrices and they are unit length (no
    copy of two thirds of the map: 0.55 GB for a 512 x 512 x 600 CT); so the heads must not be modified while the map
    is in use. The coarse head is a :class:`~samv2_components.matching.coarse_head.CoarseHeadOnFineGrid`: its rows
    are computed where they are read, from the coarse grid (32 times smaller) and one inverse length per fine voxel.

    Args:
        blocks: per head a :class:`StoredHead`, a ``CoarseHeadOnFineGrid`` or a ``(n_voxels, C)`` float tensor (made a
            ``StoredHead``), of ``n_voxels`` rows of ``C`` channels; the stored ones of one type and device.
        grid_shape: ``(d, h, w)`` of the fine grid.
        affine: 4x4 voxel-to-world affine of the fine grid (float64 numpy), expressed in ``space``.
        space: ``"RAS"`` (MONAI default) or ``"LPS"``: the space of :attr:`affine`, not of any points.
        head_names: heads in channel order, one per block.
    """

    def __init__(self, blocks, grid_shape, affine, space: str, head_names):
        self.grid_shape = tuple(int(n) for n in grid_shape)
        self.blocks = tuple(StoredHead(b, self.grid_shape) if isinstance(b, torch.Tensor) else b for b in blocks)
        self.affine = np.asarray(affine, dtype=np.float64)
        self.space = str(space)
        self.head_names = tuple(head_names)
        n_voxels = int(np.prod(self.grid_shape))
        stored = [b for b in self.blocks if isinstance(b, StoredHead)]
        shapes = [tuple(b.data.shape) if isinstance(b, StoredHead) else (b.n_rows, b.n_channels) for b in self.blocks]
        if (len(self.blocks) != len(self.head_names) or not stored
                or any(shape != (n_voxels, stored[0].n_channels) for shape in shapes)):
            raise ValueError(f"one ({n_voxels}, C) block per head {self.head_names} expected, got {shapes}")
        if len({(b.dtype, b.device) for b in stored}) != 1:
            raise ValueError("the map's stored blocks must share one dtype and device")
        self._stored = stored

    @property
    def n_heads(self) -> int:
        return len(self.head_names)

    @property
    def n_voxels(self) -> int:
        return int(np.prod(self.grid_shape))

    @property
    def n_channels(self) -> int:
        """``C_total``: the length of a voxel's descriptor."""
        return self._stored[0].n_channels * self.n_heads

    @property
    def dtype(self) -> torch.dtype:
        """Storage type of the stored rows (scores are float32 whatever it is)."""
        return self._stored[0].dtype

    @property
    def device(self) -> torch.device:
        return self._stored[0].device

    def _parts(self, descriptors: torch.Tensor) -> tuple:
        """Each head's channels of ``(..., C_total)`` descriptors."""
        return descriptors.chunk(self.n_heads, dim=-1)

    def head_planes(self, head: int, start: int, stop: int) -> torch.Tensor:
        """Rows of head ``head`` (its position in :attr:`head_names`) for the depth planes ``start:stop``, as
        ``(stop - start, h, w, C)`` (a view of a stored head; float32 for a computed one)."""
        return self.blocks[head].planes(start, stop)

    def window_buffers(self, n_rows: int) -> tuple:
        """Per head the workspace of :meth:`window_scores` for windows of ``n_rows`` voxels in all (reused by every
        call: a fresh tensor of tens of MB per call is returned to the OS and faulted in again each time); the
        stored heads share one staging buffer of the map's type."""
        staging = torch.empty(n_rows, self._stored[0].n_channels, dtype=self.dtype, device=self.device)
        return tuple(b.window_workspace(n_rows, staging) if isinstance(b, StoredHead) else None for b in self.blocks)

    def window_scores(self, descriptors: torch.Tensor, starts: torch.Tensor, window_index: torch.Tensor,
                      window_size, buffers: tuple) -> torch.Tensor:
        """Dot products ``(G, P, W)`` float32 (``n_heads`` x score) of ``P`` descriptors per window with each voxel
        of ``G`` windows, summed head by head.

        Args:
            descriptors: ``(G, P, C_total)`` float32.
            starts: ``(G, 3)`` first voxel of each window; ``window_index``: ``(G, W)`` linear indices of its voxels
                (C order of ``window_size``, a box inside the grid).
            window_size: ``(wd, wh, ww)``.
            buffers: from :meth:`window_buffers`, large enough for ``G * W`` rows.

        A stored head's rows are gathered and multiplied; a computed head scores its coarse voxels and interpolates
        the scores.
        """
        scores = None
        for block, part, workspace in zip(self.blocks, self._parts(descriptors), buffers):
            scores = block.window_scores(part, starts, window_index, window_size, out=scores, workspace=workspace)
        return scores

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """Descriptors ``(N, C_total)`` float32 of the voxels with linear indices ``index`` ``(N,)``, whatever the
        map's storage type (a float16 map is converted row by row, never whole)."""
        index = torch.as_tensor(index, device=self.device).reshape(-1)
        return torch.cat([block.rows(index) for block in self.blocks], dim=1)

    def row_range(self, start: int, stop: int) -> torch.Tensor:
        """Descriptors ``(stop - start, C_total)`` float32 of the voxels ``start:stop`` (C order)."""
        stop = min(stop, self.n_voxels)
        return torch.cat([block.row_range(start, stop) for block in self.blocks], dim=1)

    def scores(self, descriptor: torch.Tensor) -> torch.Tensor:
        """SAMv2 score ``(d * h * w,)`` float32 of one descriptor ``(C_total,)`` with every voxel (C order)."""
        parts = self._parts(descriptor.to(device=self.device, dtype=torch.float32))
        return sum(block.scores(part) for block, part in zip(self.blocks, parts)).div_(self.n_heads)

    def voxel_to_world(self, indices) -> np.ndarray:
        """Fine-grid voxel coordinates ``(N, 3)`` (may be fractional) to world points ``(N, 3)``, LPS mm."""
        return voxel_to_world(indices, self.affine, affine_space=self.space, world_space="LPS")

    def world_to_voxel(self, points_lps) -> np.ndarray:
        """World points ``(N, 3)`` (LPS mm) to fractional fine-grid voxel coordinates ``(N, 3)``."""
        return world_to_voxel(points_lps, self.affine, affine_space=self.space, world_space="LPS")


# ---------------------------------------------------------------------------------------------------- helpers
def present_heads(heads: Mapping[str, torch.Tensor]) -> tuple:
    """Names of the heads in ``heads`` in canonical order (``fine``, ``coarse``, ``semantic``).

    Raises:
        ValueError: an unknown head name, or no ``fine`` head.
    """
    unknown = [h for h in heads if h not in HEAD_NAMES]
    if unknown or "fine" not in heads:
        raise ValueError(f"heads must be named from {HEAD_NAMES} and include 'fine', got {tuple(heads)}")
    return tuple(h for h in HEAD_NAMES if h in heads)


def _volume_and_affine(name: str, head: torch.Tensor) -> tuple[torch.Tensor, np.ndarray, str]:
    """``(C, d, h, w)`` tensor (no meta, the head's own dtype: no float32 copy of a large map), its 4x4 affine
    and the affine's space."""
    if not hasattr(head, "affine"):
        raise ValueError(f"head {name!r} must be a MetaTensor carrying its grid's affine (as SAMv2Inferer returns)")
    affine, space = affine_and_space(head)
    vol = head.as_tensor() if hasattr(head, "as_tensor") else head
    if vol.ndim == 5:
        if vol.shape[0] != 1:
            raise ValueError(f"head {name!r}: expected one scan (batch size 1), got shape {tuple(vol.shape)}")
        vol = vol[0]
    if vol.ndim != 4:
        raise ValueError(f"head {name!r}: expected (1, C, d, h, w) or (C, d, h, w), got shape {tuple(vol.shape)}")
    if not torch.is_floating_point(vol):
        raise ValueError(f"head {name!r} must hold floating-point embeddings, got {vol.dtype}")
    return vol, affine, space


def _sample_trilinear(volume: torch.Tensor, voxels: np.ndarray) -> torch.Tensor:
    """Trilinear samples ``(N, C)`` float32 of ``volume`` ``(C, d, h, w)`` at fractional voxel coordinates ``(N, 3)``.

    Voxel ``i`` is the centre of voxel ``i``; coordinates beyond the first/last voxel centre take the border value
    (``grid_sample`` with ``align_corners=True`` and border padding). Only the 8 neighbours of each point are read
    and converted to float32: a float16 map is not copied whole.
    """
    size = torch.tensor(volume.shape[1:], dtype=torch.float64)
    coords = torch.as_tensor(np.asarray(voxels, dtype=np.float64)).reshape(-1, 3).clamp(min=torch.zeros(3), max=size - 1)
    low = coords.floor().clamp(max=(size - 2).clamp_min(0))  # the last cell ends at the last voxel centre
    frac = (coords - low).float()  # (N, 3) in [0, 1]
    low = low.long()
    high = torch.minimum(low + 1, (size - 1).long())
    out = torch.zeros(len(coords), volume.shape[0], dtype=torch.float32, device=volume.device)
    voxel_major = volume.permute(1, 2, 3, 0)
    # the inferer's channels-last heads are a (voxels, C) matrix: whole rows are gathered (5x faster than indexing
    # the (C, d, h, w) view, which reads one strided value per channel)
    rows = voxel_major.reshape(-1, volume.shape[0]) if voxel_major.is_contiguous() else None
    strides = torch.tensor([volume.shape[2] * volume.shape[3], volume.shape[3], 1])
    for corner in range(8):
        pick = [(corner >> (2 - axis)) & 1 for axis in range(3)]
        corner_voxels = torch.stack([(high if p else low)[:, axis] for axis, p in enumerate(pick)], dim=1)
        weight = torch.ones(len(coords))
        for axis, p in enumerate(pick):
            weight = weight * (frac[:, axis] if p else 1 - frac[:, axis])
        if rows is not None:
            values = rows.index_select(0, (corner_voxels * strides).sum(1).to(volume.device))
        else:
            index = corner_voxels.to(volume.device).unbind(1)
            values = volume[:, index[0], index[1], index[2]].T
        out += weight.to(volume.device)[:, None] * values.float()
    return out


def grid_voxels(linear_index: torch.Tensor, shape) -> torch.Tensor:
    """Linear voxel indices ``(N,)`` (C order of ``shape = (d, h, w)``) to voxel coordinates ``(N, 3)`` float64."""
    return torch.stack(torch.unravel_index(linear_index, tuple(shape)), dim=1).double()


def subvoxel_offsets(descriptors: torch.Tensor, descriptor_map: DescriptorMap, best_index: torch.Tensor) -> torch.Tensor:
    """Sub-voxel correction ``(N, 3)`` (float64, voxels) of grid maxima by a per-axis parabola fit.

    For each axis the score at the best voxel and at its two neighbours along that axis define a parabola; its
    vertex, clamped to +-0.5 voxel, is the correction. No correction at the grid border or where the three scores
    are not concave (a plateau or a saddle), so an exact grid maximum stays where it is.

    Args:
        descriptors: ``(N, C_total)`` query descriptors (rows of the search).
        descriptor_map: the map searched.
        best_index: ``(N,)`` linear index of each descriptor's best voxel in the map's grid (C order).
    """
    shape = descriptor_map.grid_shape
    position = torch.stack(torch.unravel_index(best_index, shape), dim=1)
    strides = (shape[1] * shape[2], shape[2], 1)
    descriptors = descriptors.float()
    centre = (descriptors * descriptor_map.rows(best_index)).sum(1).double()
    offsets = torch.zeros(len(best_index), 3, dtype=torch.float64, device=descriptor_map.device)
    for axis in range(3):
        inside = (position[:, axis] > 0) & (position[:, axis] < shape[axis] - 1)
        lower = torch.where(inside, best_index - strides[axis], best_index)
        upper = torch.where(inside, best_index + strides[axis], best_index)
        s_lo = (descriptors * descriptor_map.rows(lower)).sum(1).double()
        s_hi = (descriptors * descriptor_map.rows(upper)).sum(1).double()
        curvature = s_lo - 2.0 * centre + s_hi
        concave = inside & (curvature < -1e-12)
        delta = torch.where(concave, 0.5 * (s_lo - s_hi) / torch.where(concave, curvature, -1.0), 0.0)
        offsets[:, axis] = delta.clamp(-0.5, 0.5)
    return offsets


# ------------------------------------------------------------------------------------------------- public API
def descriptor_at_points(heads: Mapping[str, torch.Tensor], points_lps) -> torch.Tensor:
    """Matching descriptors of world points.

    Args:
        heads: ``{head: MetaTensor (1, C, d, h, w) or (C, d, h, w)}`` with per-grid affines (see module doc).
        points_lps: ``(N, 3)`` world points, LPS mm (numpy, list or tensor).

    Returns:
        ``(N, C * n_heads)`` float32 tensor on the heads' device: per head (canonical order) the embedding
        trilinearly interpolated at the point on that head's own grid (points outside a grid take its border
        value) and re-normalised to unit length. ``a . b / n_heads`` of two descriptors is the SAMv2 score.
    """
    pts = as_points(points_lps)
    parts = []
    for name in present_heads(heads):
        vol, affine, space = _volume_and_affine(name, heads[name])
        voxels = world_to_voxel(pts, affine, affine_space=space, world_space="LPS")
        parts.append(F.normalize(_sample_trilinear(vol, voxels), dim=1))
    return torch.cat(parts, dim=1)


def _normalise_rows(rows: torch.Tensor) -> None:
    """Scale every row of ``rows`` ``(n, C)`` to unit length in place, in float32 blocks (rounded once)."""
    for part in rows.split(_ROW_BLOCK):
        block = part.float()
        part.copy_(block.div_(torch.linalg.vector_norm(block, dim=1, keepdim=True).clamp_min_(1e-12)))


def _rows_are_unit(rows: torch.Tensor) -> bool:
    """Whether every row of ``rows`` ``(n, C)`` is unit length to float16 rounding (or exactly zero)."""
    for part in rows.split(_ROW_BLOCK):
        norm = torch.linalg.vector_norm(part.float(), dim=1)
        if not bool((((norm - 1.0).abs() <= _UNIT_TOLERANCE) | (norm == 0)).all()):
            return False
    return True


def query_descriptor_map(heads: Mapping[str, torch.Tensor]) -> DescriptorMap:
    """The descriptor of every voxel of the fine grid (one row block per head) plus the fine grid's affine.

    Heads: ``fine``; ``coarse`` upsampled to the fine grid with :func:`upsample_to_fine_grid` (physically aligned,
    border values beyond the last coarse voxel) and re-normalised; ``semantic`` (already on the fine grid). The
    result equals ``SAMv2Net.forward`` of the same scan, with every head unit length. The map keeps the heads'
    precision: float16 heads (the inferer's default, the bundles' maps) give a float16 map, half the memory; float32
    heads a float32 map. Scores are computed in float32 either way.

    The fine-grid heads are used in place, as views of their own storage, when their layout is already voxel-major
    (the inferer's channels-last output) and their vectors unit length (a float16 head to its rounding, 2**-11);
    otherwise they are copied (and a float16 or bfloat16 head normalised). The coarse head is not stored upsampled:
    a :class:`~samv2_components.matching.coarse_head.CoarseHeadOnFineGrid` computes its rows (and window scores)
    where they are read, from its own grid and one inverse length per fine voxel (4 MB where the upsampled float16
    block was 0.27 GB for a 512 x 512 x 600 CT).

    Raises:
        ValueError: the coarse grid is not a strided sub-grid of the fine one sharing its first voxel centre, or
            the semantic head is not on the fine grid (heads of different scans mixed up).
    """
    names = present_heads(heads)
    fine, fine_affine, space = _volume_and_affine("fine", heads["fine"])
    n_channels, size = fine.shape[0], list(fine.shape[1:])
    n_voxels = int(np.prod(size))
    dtype = torch.float16 if fine.dtype == torch.float16 else torch.float32  # bfloat16 is too coarse for the windows
    blocks = []
    for name in names:
        vol, affine, head_space = _volume_and_affine(name, heads[name])
        if head_space != space:
            raise ValueError(f"head {name!r} has a {head_space} affine but 'fine' a {space} one")
        # fine voxel index -> this head's voxel index
        fine_to_head = np.linalg.solve(affine, fine_affine)
        if name == "coarse":
            ratios = np.diag(fine_to_head)[:3]
            if not np.allclose(fine_to_head[:3, :3], np.diag(ratios), atol=1e-4) or not np.allclose(
                fine_to_head[:3, 3], 0.0, atol=1e-3
            ):
                raise ValueError("the coarse grid is not aligned with the fine grid (are the heads from one scan?)")
            block = CoarseHeadOnFineGrid(vol, size, [float(r) for r in ratios])
        else:
            if list(vol.shape[1:]) != size or not np.allclose(fine_to_head, np.eye(4), atol=1e-4):
                raise ValueError(f"head {name!r} is not on the fine grid (are the heads from one scan?)")
            voxel_major = vol.permute(1, 2, 3, 0)
            block = voxel_major.reshape(n_voxels, n_channels)  # a view where the layout is voxel-major
            if not (voxel_major.is_contiguous() and vol.dtype == dtype
                    and (dtype == torch.float32 or _rows_are_unit(block))):
                block = torch.empty((n_voxels, n_channels), dtype=dtype, device=fine.device)
                block.view(*size, n_channels).copy_(voxel_major)  # no temporary of the head's own type
                if vol.dtype != torch.float32:
                    _normalise_rows(block)  # so that a voxel scores 1 with itself (to float16 rounding)
        blocks.append(block)
    return DescriptorMap(blocks, size, fine_affine, space, names)


def nearest_neighbour_search(
    descriptors: torch.Tensor,
    descriptor_map: DescriptorMap,
    batch_size: int = 256,
    subvoxel: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Best-scoring fine-grid voxel of ``descriptor_map`` for every descriptor.

    Args:
        descriptors: ``(N, C_total)`` from :func:`descriptor_at_points` (same heads as the map).
        descriptor_map: from :func:`query_descriptor_map`.
        batch_size: points scored per matrix product; with the voxels processed in chunks so that at most
            ``max(batch_size, MAX_SCORE_BLOCK)`` scores exist at once, memory stays bounded for any grid.
        subvoxel: refine each axis by the vertex of the parabola through the scores at the argmax and its two
            neighbours along that axis, clamped to +-0.5 voxel (no refinement at the grid border or where the
            scores are not concave).

    Returns:
        ``(voxels, scores)``: fractional fine-grid voxel coordinates ``(N, 3)`` (float64, axes of the map), and
        the score at the best grid voxel ``(N,)`` (float32, mean of per-head cosines in [-1, 1]).
    """
    n_heads, device = descriptor_map.n_heads, descriptor_map.device
    if descriptors.ndim != 2 or descriptors.shape[1] != descriptor_map.n_channels:
        raise ValueError(
            f"descriptors must be (N, {descriptor_map.n_channels}) to match the map's heads "
            f"{descriptor_map.head_names}, got {tuple(descriptors.shape)}"
        )
    descriptors = descriptors.to(device=device, dtype=torch.float32)
    n_points, n_voxels = descriptors.shape[0], descriptor_map.n_voxels
    batch_size = max(1, int(batch_size))
    # each block of rows is gathered from the heads' blocks (and a float16 map converted) in float32 first
    chunk = min(max(1, MAX_SCORE_BLOCK // batch_size), _ROW_BLOCK)
    best_idx = torch.empty(n_points, dtype=torch.long, device=device)
    best_score = torch.empty(n_points, dtype=torch.float32, device=device)
    for p0 in range(0, n_points, batch_size):
        desc = descriptors[p0 : p0 + batch_size]
        score = torch.full((desc.shape[0],), -float("inf"), dtype=torch.float32, device=device)
        index = torch.zeros(desc.shape[0], dtype=torch.long, device=device)
        for v0 in range(0, n_voxels, chunk):
            block_score, block_index = (desc @ descriptor_map.row_range(v0, v0 + chunk).T).max(dim=1)
            better = block_score > score
            score = torch.where(better, block_score, score)
            index = torch.where(better, block_index + v0, index)
        best_idx[p0 : p0 + batch_size] = index
        best_score[p0 : p0 + batch_size] = score / n_heads

    voxels = grid_voxels(best_idx, descriptor_map.grid_shape)
    if subvoxel:
        voxels += subvoxel_offsets(descriptors, descriptor_map, best_idx)
    return voxels.cpu().numpy(), best_score.cpu().numpy()


def match_nearest_neighbour(
    template_heads: Mapping[str, torch.Tensor],
    query_heads: Mapping[str, torch.Tensor],
    points_lps,
    batch_size: int = 256,
    subvoxel: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Match template points to the query scan by exhaustive NN over the query's fine grid.

    Args:
        template_heads, query_heads: the two scans' heads (see module doc); both must have the same head set.
        points_lps: ``(N, 3)`` template points, world LPS mm.
        batch_size: points per matrix product (see :func:`nearest_neighbour_search`).
        subvoxel: quadratic sub-voxel refinement (see :func:`nearest_neighbour_search`).

    Returns:
        ``(points, scores)``: matched query points ``(N, 3)``, world **LPS** mm (float64 numpy), and their scores
        ``(N,)`` (float32 numpy; mean of per-head cosines at the best grid voxel, in [-1, 1]).
    """
    if present_heads(template_heads) != present_heads(query_heads):
        raise ValueError(
            f"template heads {present_heads(template_heads)} and query heads {present_heads(query_heads)} differ"
        )
    descriptors = descriptor_at_points(template_heads, points_lps)
    descriptor_map = query_descriptor_map(query_heads)
    voxels, scores = nearest_neighbour_search(descriptors, descriptor_map, batch_size=batch_size, subvoxel=subvoxel)
    return descriptor_map.voxel_to_world(voxels), scores
