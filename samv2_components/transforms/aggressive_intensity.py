"""Aggressive intensity augmentation for CrossSAM's AggSAM step (Bai et al., arXiv:2311.15111).

CrossSAM trains the self-supervised embedding ("AggSAM") with augmentations strong enough that CT and MR patches
look alike to the network: the same tissue is bright in one modality and dark in the other, and the relation
between CT and MR intensities is not monotone (fat is dark on CT and bright on T1 MR, bone bright on CT and dark
on MR, air dark on both). A network that relies on absolute intensities, or on their order, cannot match across
modalities, so each patch's intensities are remapped at random:

* :class:`RandBezierIntensity`: a random smooth monotone curve, the non-linear intensity transformation of Models
  Genesis (Zhou et al., MICCAI 2019 / MedIA 2021): a cubic Bezier curve through (0, 0) and (1, 1) with two random
  control points in [0, 1]^2, applied to intensities normalised to [0, 1]; optionally reversed (decreasing).
* :class:`RandIntensityInversion`: ``x -> low + high - x`` (dark <-> bright).
* :class:`RandBodyContrastRemap`: inside the body only, replace intensities by their rank (histogram
  equalisation), optionally reversed, keeping the background dark. An addition of this project (see below).
* :func:`aggressive_intensity_augmentation`: the three in sequence (body remap, Bezier, inversion), per patch (e.g.
  as ``intensity_augmentation`` of :class:`~samv2_components.transforms.patch_pairs.RandPatchPaird`).

Why the body remap: measured here, the paper's two maps alone (applied to the whole patch) made the light fine head
collapse (every voxel the same embedding; loss at ``log(1 + n_negatives)``) within 100 steps, even at lr 0.002 and
with inversion at 15 %. Two reasons, visible in ``docs/augmentation_grid.png`` of the crosssam bundle: whole-patch
inversion turns the air around the body white, which neither CT nor MR ever shows, and on the [-50, 205] scale CT
soft tissue spans only a few units (fat ~7, muscle ~13), so no Bezier curve or inversion gives it the contrast it
has on MR. Rank-equalising the body stretches CT soft tissue to MR-like contrast, and reversing it inside the body
only maps CT to a T2-like picture (fat bright, muscle grey, cortical bone dark, air still dark).

Intensities are in the network's input range ``value_range`` (default [-50, 205], see
:mod:`samv2_components.transforms.intensity`). The array transforms take any shape (usually ``(C, D, H, W)`` or
``(C, H, W)``), numpy arrays or torch tensors (on any device), and return the same type (a ``MetaTensor`` keeps its
metadata and affine); floating inputs keep their dtype, others become float32. The mapping is per voxel, so the
shape and geometry never change.

Why the Bezier map is a monotone function (tested in ``tests/test_aggressive_intensity.py``): with ``P0 = (0, 0)``,
``P3 = (1, 1)`` and ``P1 = (a, .)``, ``P2 = (b, .)`` in [0, 1]^2, each coordinate of ``B(t)`` has derivative
``3 [a (1-t)^2 + 2 (b - a) t (1-t) + (1 - b) t^2]``, a quadratic Bernstein polynomial with non-negative end
coefficients; its middle coefficient is negative only if ``b < a``, and then ``(a - b)^2 <= a (1 - b)`` (the
difference is ``a (1 - a) + b (a - b) >= 0``), so it is >= 0 on [0, 1] with at most one isolated zero. Both
``x(t)`` and ``y(t)`` are therefore strictly increasing: the curve is the graph of a continuous, strictly increasing
bijection ``f: [0, 1] -> [0, 1]`` with ``f(0) = 0``, ``f(1) = 1`` (possibly with a vertical or horizontal tangent at
one point). Numerically the sampled ``x`` could still repeat or step back by rounding near such a tangent, so the
samples are sorted per coordinate (``np.sort(x)``, ``np.sort(y)``, as in Models Genesis' increasing branch; a
no-op up to rounding, by the above) and repeated ``x`` dropped before ``np.interp``: the table is non-decreasing
whatever the rounding. The decreasing variant is ``1 - f(x)``, i.e. the Bezier curve through (0, 1) and (1, 0)
with the control points mirrored (Models Genesis' reversed branch instead pairs ``x(t)`` with ``y(1 - t)``, another
decreasing curve through the same end points).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.config.type_definitions import NdarrayOrTensor
from monai.data import MetaTensor
from monai.transforms import Compose, MapTransform, Randomizable, RandomizableTransform
from monai.utils import TransformBackends
from monai.utils.type_conversion import convert_to_dst_type

__all__ = [
    "bezier_curve",
    "bezier_lookup_table",
    "RandBezierIntensity",
    "RandBezierIntensityd",
    "RandIntensityInversion",
    "RandIntensityInversiond",
    "RandBodyContrastRemap",
    "aggressive_intensity_augmentation",
    "share_random_state",
]

DEFAULT_VALUE_RANGE = (-50.0, 205.0)


def _check_range(value_range: Sequence[float]) -> tuple[float, float]:
    low, high = (float(v) for v in value_range)
    if not (np.isfinite(low) and np.isfinite(high) and low < high):
        raise ValueError(f"value_range must be (low, high) with low < high, got {value_range!r}")
    return low, high


def _check_prob(value: float, name: str) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return value


def bezier_curve(p1: Sequence[float], p2: Sequence[float], num: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """``num`` points ``(x, y)`` (float64 arrays) of the cubic Bezier curve ``(0, 0), p1, p2, (1, 1)`` at
    ``t = linspace(0, 1, num)``; ``x[0] = y[0] = 0`` and ``x[-1] = y[-1] = 1`` exactly."""
    t = np.linspace(0.0, 1.0, int(num))[:, None]
    p1, p2 = np.asarray(p1, dtype=np.float64), np.asarray(p2, dtype=np.float64)
    points = 3.0 * (1.0 - t) ** 2 * t * p1 + 3.0 * (1.0 - t) * t**2 * p2 + t**3  # P0 = 0 drops out, P3 = (1, 1)
    return points[:, 0], points[:, 1]


def bezier_lookup_table(
    p1: Sequence[float],
    p2: Sequence[float],
    decreasing: bool = False,
    num_curve: int = 1000,
    num_table: int = 1001,
) -> np.ndarray:
    """The Bezier intensity map ``f`` on the uniform grid ``linspace(0, 1, num_table)`` (float64, in [0, 1]).

    The curve is sampled at ``num_curve`` points, made a function of ``x`` (per-coordinate sort, repeated ``x``
    dropped; see the module docstring) and interpolated linearly with ``np.interp``. The table is non-decreasing
    from exactly 0 to exactly 1; with ``decreasing`` it is ``1 - f`` (exactly 1 down to exactly 0).
    """
    if num_curve < 2 or num_table < 2:
        raise ValueError("num_curve and num_table must be >= 2")
    x, y = bezier_curve(p1, p2, num_curve)
    x, y = np.clip(np.sort(x), 0.0, 1.0), np.clip(np.sort(y), 0.0, 1.0)
    x, first = np.unique(x, return_index=True)  # strictly increasing x; keeps the lowest y of a repeated x
    y = y[first]
    table = np.clip(np.interp(np.linspace(0.0, 1.0, int(num_table)), x, y), 0.0, 1.0)
    table[0], table[-1] = 0.0, 1.0
    return 1.0 - table if decreasing else table


def _work_dtypes(img: Any) -> tuple[Any, Any]:
    """(compute dtype, output dtype): float32/float64 kept, other floats computed in float32, non-floats -> float32."""
    if isinstance(img, torch.Tensor):
        out = img.dtype if torch.is_floating_point(img) else torch.float32
        work = out if out in (torch.float32, torch.float64) else torch.float32
        return work, out
    dtype = np.asarray(img).dtype
    out = dtype if np.issubdtype(dtype, np.floating) else np.dtype(np.float32)
    work = out if out in (np.float32, np.float64) else np.dtype(np.float32)
    return work, out


def _apply_table(img: NdarrayOrTensor, table: np.ndarray, value_range: tuple[float, float]) -> NdarrayOrTensor:
    """``low + (high - low) * table(clip((img - low) / (high - low), 0, 1))``, linear between the table's grid
    points; exactly monotone in floating point (each segment is clamped to its two table values)."""
    low, high = value_range
    n = table.shape[0] - 1
    work, out_dtype = _work_dtypes(img)
    if isinstance(img, torch.Tensor):
        x = (img.as_tensor() if isinstance(img, MetaTensor) else img).to(work)
        tab = torch.as_tensor(table, dtype=work, device=x.device)
        pos = torch.clamp((x - low) / (high - low), 0.0, 1.0) * n
        i0 = torch.clamp(torch.floor(pos), 0, n - 1)
        w = pos - i0
        i0 = i0.long()
        a, b = tab[i0], tab[i0 + 1]
        y = torch.minimum(torch.maximum(a + w * (b - a), torch.minimum(a, b)), torch.maximum(a, b))
        res = torch.clamp(low + (high - low) * y, low, high).to(out_dtype)
        return convert_to_dst_type(res, dst=img, dtype=out_dtype)[0]
    x = np.asarray(img).astype(work, copy=False)
    tab = table.astype(work)
    pos = np.clip((x - work.type(low)) / work.type(high - low), 0.0, 1.0) * work.type(n)
    i0 = np.clip(np.floor(pos), 0, n - 1)
    w = pos - i0
    i0 = i0.astype(np.int64)
    a, b = tab[i0], tab[i0 + 1]
    y = np.minimum(np.maximum(a + w * (b - a), np.minimum(a, b)), np.maximum(a, b))
    return np.clip(work.type(low) + work.type(high - low) * y, low, high).astype(out_dtype, copy=False)


def _invert(img: NdarrayOrTensor, value_range: tuple[float, float]) -> NdarrayOrTensor:
    low, high = value_range
    work, out_dtype = _work_dtypes(img)
    if isinstance(img, torch.Tensor):
        x = (img.as_tensor() if isinstance(img, MetaTensor) else img).to(work)
        res = ((low + high) - x).to(out_dtype)
        return convert_to_dst_type(res, dst=img, dtype=out_dtype)[0]
    x = np.asarray(img).astype(work, copy=False)
    return (work.type(low + high) - x).astype(out_dtype, copy=False)


class RandBezierIntensity(RandomizableTransform):
    """Randomly remap intensities through a monotone cubic Bezier curve (Models Genesis' non-linear transformation).

    With probability ``prob``: intensities are clipped to ``value_range`` and normalised to [0, 1]; two control
    points ``P1, P2 ~ U([0, 1]^2)`` define the curve ``(0, 0), P1, P2, (1, 1)``, sampled densely and turned into a
    lookup table ``f`` (see :func:`bezier_lookup_table` and the module docstring for why it is a function); with
    probability ``decreasing_prob`` the map is reversed to ``1 - f``; the result is mapped back to
    ``value_range``. So ``low -> low`` and ``high -> high`` (swapped when decreasing), every output lies in
    ``value_range`` and each draw is monotone (non-decreasing, or non-increasing when decreasing). Values outside
    ``value_range`` (e.g. padding) are clipped to it first.

    Why: CT and MR intensities of the same tissue relate non-monotonically and differ between scanners and MR
    sequences; random monotone and reversed curves stop the network from relying on absolute intensities.

    Args:
        prob: probability of remapping an image.
        value_range: ``(low, high)`` intensity range of the input (default: the network's [-50, 205]).
        decreasing_prob: probability that the drawn curve is reversed (decreasing), as in Models Genesis (0.5).
        num_curve: Bezier curve samples; num_table: lookup-table grid points (applied with linear interpolation).

    Call: ``img`` of any shape (numpy array or torch tensor, ``MetaTensor`` kept); returns the same type and
    shape, float (input float dtype kept, else float32). ``randomize=False`` reuses the last draw. After a draw,
    ``control_points`` (``[P1, P2]``, 2x2), ``decreasing`` and ``table`` hold its parameters.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(
        self,
        prob: float = 0.5,
        value_range: Sequence[float] = DEFAULT_VALUE_RANGE,
        decreasing_prob: float = 0.5,
        num_curve: int = 1000,
        num_table: int = 1001,
    ) -> None:
        RandomizableTransform.__init__(self, _check_prob(prob, "prob"))
        self.value_range = _check_range(value_range)
        self.decreasing_prob = _check_prob(decreasing_prob, "decreasing_prob")
        self.num_curve, self.num_table = int(num_curve), int(num_table)
        self.control_points: np.ndarray | None = None
        self.decreasing = False
        self.table: np.ndarray | None = None

    def randomize(self, data: Any | None = None) -> None:
        super().randomize(None)
        if not self._do_transform:
            return
        self.control_points = self.R.uniform(0.0, 1.0, size=(2, 2))
        self.decreasing = bool(self.R.rand() < self.decreasing_prob)
        self.table = bezier_lookup_table(
            self.control_points[0], self.control_points[1], self.decreasing, self.num_curve, self.num_table
        )

    def __call__(self, img: NdarrayOrTensor, randomize: bool = True) -> NdarrayOrTensor:
        if randomize:
            self.randomize()
        if not self._do_transform:
            return img
        if self.table is None:
            raise RuntimeError("call randomize() first (or __call__ with randomize=True)")
        return _apply_table(img, self.table, self.value_range)


class RandIntensityInversion(RandomizableTransform):
    """Randomly invert intensities: ``x -> low + high - x`` with probability ``prob`` (an involution swapping
    ``low`` and ``high``; values inside ``value_range`` stay inside, values outside are mirrored, not clipped).

    Why: dark and bright swap between CT and MR for many tissues (e.g. fat, bone, fluid), so the network must not
    rely on the direction of intensity changes either.

    Args:
        prob: probability of inverting an image.
        value_range: ``(low, high)`` intensity range (default: the network's [-50, 205]).

    Call: ``img`` of any shape (numpy array or torch tensor, ``MetaTensor`` kept); returns the same type and
    shape, float (input float dtype kept, else float32). ``randomize=False`` reuses the last draw.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(self, prob: float = 0.5, value_range: Sequence[float] = DEFAULT_VALUE_RANGE) -> None:
        RandomizableTransform.__init__(self, _check_prob(prob, "prob"))
        self.value_range = _check_range(value_range)

    def randomize(self, data: Any | None = None) -> None:
        super().randomize(None)

    def __call__(self, img: NdarrayOrTensor, randomize: bool = True) -> NdarrayOrTensor:
        if randomize:
            self.randomize()
        if not self._do_transform:
            return img
        return _invert(img, self.value_range)


class RandBezierIntensityd(RandomizableTransform, MapTransform):
    """Dictionary version of :class:`RandBezierIntensity`: one draw (curve and direction) shared by all ``keys``.

    Args:
        keys: keys of the images to remap.
        prob, value_range, decreasing_prob, num_curve, num_table: see :class:`RandBezierIntensity`.
        allow_missing_keys: don't raise for missing keys.
    """

    backend = RandBezierIntensity.backend

    def __init__(
        self,
        keys: KeysCollection,
        prob: float = 0.5,
        value_range: Sequence[float] = DEFAULT_VALUE_RANGE,
        decreasing_prob: float = 0.5,
        num_curve: int = 1000,
        num_table: int = 1001,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, _check_prob(prob, "prob"))
        self.bezier = RandBezierIntensity(1.0, value_range, decreasing_prob, num_curve, num_table)

    def set_random_state(
        self, seed: int | None = None, state: np.random.RandomState | None = None
    ) -> RandBezierIntensityd:
        super().set_random_state(seed, state)
        self.bezier.set_random_state(seed, state)
        return self

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        self.bezier.randomize(None)
        for key in self.key_iterator(d):
            d[key] = self.bezier(d[key], randomize=False)
        return d


class RandIntensityInversiond(RandomizableTransform, MapTransform):
    """Dictionary version of :class:`RandIntensityInversion`: all ``keys`` are inverted together or not at all.

    Args:
        keys: keys of the images to invert.
        prob, value_range: see :class:`RandIntensityInversion`.
        allow_missing_keys: don't raise for missing keys.
    """

    backend = RandIntensityInversion.backend

    def __init__(
        self,
        keys: KeysCollection,
        prob: float = 0.5,
        value_range: Sequence[float] = DEFAULT_VALUE_RANGE,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, _check_prob(prob, "prob"))
        self.value_range = _check_range(value_range)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            d[key] = _invert(d[key], self.value_range)
        return d


class RandBodyContrastRemap(RandomizableTransform):
    """Randomly replace the intensities of the body by their rank (histogram equalisation), optionally reversed;
    the background is left as it is.

    With probability ``prob``: the voxels above ``body_threshold`` (the body) get ``body_low + r (high - body_low)``
    where ``r`` in [0, 1] is the voxel's rank among the body voxels (ties in input order), or
    ``high - r (high - body_low)`` with probability ``reverse_prob``. Monotone (or reversed) inside the body, so
    it changes contrast, never structure; every output lies in ``[min(input), high]``.

    Args:
        prob: probability of remapping an image.
        reverse_prob: probability that a remap is reversed (bright <-> dark inside the body).
        body_threshold: body / background threshold on the input scale (default -25, AdaReg's body threshold).
        body_low: lowest output value of the body (above ``body_threshold``, so the body stays body).
        value_range: ``(low, high)`` intensity range (default: the network's [-50, 205]).

    Call: ``img`` of any shape (numpy array or torch tensor, ``MetaTensor`` kept); returns the same type and
    shape, float (input float dtype kept, else float32). ``randomize=False`` reuses the last draw.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(
        self,
        prob: float = 0.5,
        reverse_prob: float = 0.5,
        body_threshold: float = -25.0,
        body_low: float = 0.0,
        value_range: Sequence[float] = DEFAULT_VALUE_RANGE,
    ) -> None:
        RandomizableTransform.__init__(self, _check_prob(prob, "prob"))
        self.reverse_prob = _check_prob(reverse_prob, "reverse_prob")
        self.value_range = _check_range(value_range)
        self.body_threshold, self.body_low = float(body_threshold), float(body_low)
        if not self.body_threshold < self.body_low < self.value_range[1]:
            raise ValueError(f"need body_threshold < body_low < high, got {body_threshold}, {body_low}, {self.value_range[1]}")
        self._reverse = False

    def randomize(self, data: Any | None = None) -> None:
        super().randomize(None)
        self._reverse = bool(self.R.rand() < self.reverse_prob)

    def __call__(self, img: NdarrayOrTensor, randomize: bool = True) -> NdarrayOrTensor:
        if randomize:
            self.randomize()
        if not self._do_transform:
            return img
        work, out_dtype = _work_dtypes(img)
        if isinstance(img, torch.Tensor):
            x = (img.as_tensor() if isinstance(img, MetaTensor) else img).to(work)
        else:
            x = torch.from_numpy(np.asarray(img).astype(work, copy=False))
            work = x.dtype
        flat = x.reshape(-1).clone()
        body = torch.nonzero(flat > self.body_threshold).squeeze(1)
        if len(body) > 1:
            ranks = torch.empty(len(body), dtype=work)
            ranks[torch.argsort(flat[body], stable=True)] = torch.linspace(0.0, 1.0, len(body), dtype=work)
            if self._reverse:
                ranks = 1.0 - ranks
            flat[body] = self.body_low + ranks * (self.value_range[1] - self.body_low)
        res = flat.reshape(x.shape)
        if isinstance(img, torch.Tensor):
            return convert_to_dst_type(res.to(out_dtype), dst=img, dtype=out_dtype)[0]
        return res.numpy().astype(out_dtype, copy=False)


def aggressive_intensity_augmentation(
    prob_bezier: float = 0.8,
    prob_inversion: float = 0.5,
    value_range: Sequence[float] = DEFAULT_VALUE_RANGE,
    decreasing_prob: float = 0.5,
    prob_body_remap: float = 0.0,
    body_reverse_prob: float = 0.5,
    body_threshold: float = -25.0,
) -> Compose:
    """CrossSAM/AggSAM intensity augmentation of one image or patch: ``Compose([RandBodyContrastRemap(
    prob_body_remap), RandBezierIntensity(prob_bezier), RandIntensityInversion(prob_inversion)])`` (array
    transforms; any shape, see the module docstring). The defaults are the paper's (no body remap); the
    crosssam bundle's ``train.json`` sets the project's (body remap on, whole-patch inversion off).

    Use it per patch, e.g. ``RandPatchPaird(..., intensity_augmentation=aggressive_intensity_augmentation())``,
    so that the two views of a pair get independent intensity maps.
    """
    return Compose(
        [
            RandBodyContrastRemap(prob=prob_body_remap, reverse_prob=body_reverse_prob, body_threshold=body_threshold, value_range=value_range),
            RandBezierIntensity(prob=prob_bezier, value_range=value_range, decreasing_prob=decreasing_prob),
            RandIntensityInversion(prob=prob_inversion, value_range=value_range),
        ]
    )


def share_random_state(transform: Callable | None, state: np.random.RandomState) -> None:
    """Make ``transform`` draw from ``state`` (the same ``RandomState`` object, nothing drawn now).

    A ``Compose`` (or ``OneOf``/``SomeOf``/``RandomOrder``) gets ``state`` itself and so do its members,
    recursively (``Compose.set_random_state`` would instead seed each member from draws of ``state``, consuming
    them); another ``Randomizable`` gets ``set_random_state(state=state)``; anything else is left alone.
    """
    if isinstance(transform, Compose):
        Randomizable.set_random_state(transform, state=state)
        for member in transform.transforms:
            share_random_state(member, state)
    elif isinstance(transform, Randomizable):
        transform.set_random_state(state=state)
